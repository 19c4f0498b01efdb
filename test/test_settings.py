"""Settings declared once: validation, coercion, command-line flags and documents come from one declaration."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import yaml

from dinomix_ros.settings import (
    SettingError,
    add_flags,
    check,
    entries,
    from_flags,
    render_markdown,
    render_yaml,
    setting,
    spec_of,
    table,
)


@dataclass(frozen=True)
class Demo:
    SETTINGS_GROUP: ClassVar[str] = "demo"

    count: int = setting(3, "how many", min=1, max=10)
    ratio: float = setting(0.5, "a fraction", min=0.0, max=1.0)
    scale: float = setting(2.0, "strictly positive", positive=True, max=100.0)
    mode: str = setting("fast", "speed", choices=("fast", "slow"), reconfigure=True)
    enabled: bool = setting(True, "on or off")
    topics: tuple[str, ...] = setting(("/a",), "topics", nonempty=True)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class Other:
    SETTINGS_GROUP: ClassVar[str] = "other"
    FLAG_PREFIX: ClassVar[str] = "other-"

    count: int = setting(7, "another count", min=0, max=100)

    def __post_init__(self) -> None:
        check(self)


@pytest.mark.parametrize("kwargs, message", [
    ({"count": 0}, "demo.count must be >= 1, got 0"),
    ({"count": 11}, "demo.count must be <= 10, got 11"),
    ({"count": True}, "demo.count must be an integer, got True"),
    ({"count": 2.0}, "demo.count must be an integer, got 2.0"),
    ({"ratio": math.nan}, "demo.ratio must be a finite number, got nan"),
    ({"ratio": math.inf}, "demo.ratio must be a finite number, got inf"),
    ({"ratio": "0.5"}, "demo.ratio must be a number, got '0.5'"),
    ({"scale": 0.0}, "demo.scale must be > 0, got 0.0"),
    ({"mode": "medium"}, "demo.mode must be one of fast, slow, got 'medium'"),
    ({"enabled": 1}, "demo.enabled must be a boolean, got 1"),
    ({"topics": ()}, "demo.topics must not be empty"),
    ({"topics": ("/a", "")}, "demo.topics must not be empty (nor hold an empty entry)"),
    ({"topics": ("/a\n",)}, "demo.topics must be printable text without control characters"),
])
def test_refusals_name_the_setting_the_limit_and_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(SettingError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        Demo(**kwargs)
    assert info.value.name.startswith("demo.")


def test_lossless_coercion() -> None:
    import numpy as np

    demo = Demo(ratio=1, count=np.int64(4), topics=["/x", "/y"])
    assert demo.ratio == 1.0 and isinstance(demo.ratio, float)
    assert demo.count == 4 and type(demo.count) is int
    assert demo.topics == ("/x", "/y")


def test_table_and_entries() -> None:
    t = table(Demo, (Other, ("count",)))
    assert list(t) == ["demo.count", "demo.ratio", "demo.scale", "demo.mode", "demo.enabled", "demo.topics",
                       "other.count"]
    assert t["demo.mode"].spec.reconfigure and not t["demo.count"].spec.reconfigure
    assert t["demo.topics"].type is tuple and t["other.count"].default == 7
    with pytest.raises(ValueError, match="declared twice"):
        table(Demo, Demo)
    with pytest.raises(ValueError, match="group 'demo' are split by another group"):
        table((Demo, ("count",)), Other, (Demo, ("ratio",)))
    assert spec_of(Demo, "ratio").limits_text() == "[0 .. 1]"
    assert spec_of(Demo, "scale").limits_text() == "(0 .. 100]"
    assert spec_of(Demo, "mode").limits_text() == "one of fast, slow"


def test_flags_carry_defaults_help_and_refuse_with_the_flag_name() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, Demo, fields=["count", "mode", "enabled", "topics"], count=5)
    add_flags(parser, Other)
    args = parser.parse_args([])
    built = from_flags(Demo, args)
    assert (built.count, built.mode, built.enabled, built.topics) == (5, "fast", True, ("/a",))  # 5: the override
    assert from_flags(Other, args).count == 7
    args = parser.parse_args(["--count", "2", "--mode", "slow", "--no-enabled", "--topics", "/b", "/c",
                              "--other-count", "9"])
    built = from_flags(Demo, args)
    assert (built.count, built.mode, built.enabled, built.topics) == (2, "slow", False, ("/b", "/c"))
    assert from_flags(Other, args).count == 9
    with pytest.raises(SettingError, match="--count must be >= 1, got 0"):
        from_flags(Demo, parser.parse_args(["--count", "0"]))
    with pytest.raises(SystemExit):  # choices: argparse refuses before the dataclass sees it
        parser.parse_args(["--mode", "medium"])
    help_text = parser.format_help()
    assert "how many ([1 .. 10])" in " ".join(help_text.split())


def test_yaml_and_markdown_show_every_default_and_description() -> None:
    t = table(Demo, Other)
    text = render_yaml(t, "/**", "header line")
    tree = yaml.safe_load(text)["/**"]["ros__parameters"]
    assert tree == {"demo": {e.field: (list(e.default) if e.type is tuple else e.default) for e in entries(Demo)},
                    "other": {"count": 7}}
    assert text.startswith("# header line\n")
    assert "# speed; one of fast, slow (read at configure)" in text
    md = render_markdown(t)
    assert "| `demo.mode` * | string | `fast` | one of fast, slow | speed |" in md
    assert "| `demo.topics` | list of strings | `/a` |  | topics |" in md
