"""The node's one parameter table: descriptors, validation, and the generated yaml file and README table."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rcl_interfaces.msg import ParameterType

from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.ros.parameters import (
    PARAMETERS,
    NodeSettings,
    build,
    descriptor,
    markdown_table,
    validate,
    yaml_text,
)
from dinomix_ros.settings import SettingError

REPO = Path(__file__).resolve().parents[2]


def test_config_yaml_is_generated_from_the_table() -> None:
    committed = (REPO / "config" / "localize.yaml").read_text()
    assert committed == yaml_text(), "config/localize.yaml is stale: regenerate it from dinomix_ros.ros.parameters"
    tree = yaml.safe_load(committed)["/**"]["ros__parameters"]

    def flatten(d: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in d.items():
            out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    assert flatten(tree) == {name: list(e.default) if e.type is tuple else e.default for name, e in PARAMETERS.items()}


def test_readme_table_is_generated_from_the_table() -> None:
    readme = (REPO / "README.md").read_text()
    begin = readme.index("<!-- parameters:begin")
    table = readme[readme.index("\n", begin) + 1:readme.index("<!-- parameters:end -->")]
    assert table == markdown_table(), "README parameter table is stale: regenerate it from dinomix_ros.ros.parameters"


def test_the_table_has_no_defaults_of_its_own() -> None:
    """Core settings come from the core's dataclasses: a default changed there changes the node's."""
    for field, default in vars(MatcherConfig()).items():
        assert PARAMETERS[f"matching.{field}"].default == default
    assert PARAMETERS["matching.top_k"].owner is MatcherConfig


def test_descriptors_carry_ranges_and_read_only() -> None:
    top_k = descriptor(PARAMETERS["matching.top_k"])
    assert top_k.type == ParameterType.PARAMETER_INTEGER and not top_k.read_only
    assert (top_k.integer_range[0].from_value, top_k.integer_range[0].to_value) == (1, 1000)
    sim = descriptor(PARAMETERS["matching.min_similarity"])
    assert (sim.floating_point_range[0].from_value, sim.floating_point_range[0].to_value) == (-1.0, 1.0)
    assert descriptor(PARAMETERS["model.dtype"]).read_only
    assert descriptor(PARAMETERS["cameras.topics"]).type == ParameterType.PARAMETER_STRING_ARRAY
    for name, entry in PARAMETERS.items():
        d = descriptor(entry)
        assert d.description == entry.spec.description, name
        if entry.type is float:  # every float has a finite range: a typo (1e300) or inf is refused at set time
            assert d.floating_point_range, f"{name} has no range"


@pytest.mark.parametrize("name, value, reason", [
    ("pose.buffer_s", float("inf"), "pose.buffer_s must be a finite number"),
    ("matching.sigma_position_m", float("nan"), "matching.sigma_position_m must be a finite number"),
    ("cameras.min_period_s", float("inf"), "cameras.min_period_s must be a finite number"),
    ("matching.top_k", 0, "matching.top_k must be >= 1, got 0"),
    ("output.loop_closure_scope", "sometimes", "must be one of session, all, got 'sometimes'"),
    ("model.device", "tpu", None),  # refused by EncoderConfig's own rule, at build time
    ("cameras.topics", ["/ok", "bad topic"], "cameras.topics: 'bad topic' is not a valid topic name"),
    ("pose.topic", "no spaces allowed", "pose.topic: 'no spaces allowed' is not a valid topic name"),
])
def test_validation_refuses_non_finite_absurd_and_malformed_values(name: str, value: object, reason: str) -> None:
    values = {n: e.default for n, e in PARAMETERS.items()}
    values[name] = value
    got = validate({name: value})
    if reason is None:
        assert got is None
        with pytest.raises(SettingError, match="model.device must be auto, cpu or cuda"):
            NodeSettings.from_values(values)
    else:
        assert got is not None and reason in got
        with pytest.raises(SettingError):
            NodeSettings.from_values(values)


def test_node_settings_build_every_object_from_defaults() -> None:
    s = NodeSettings.from_values({n: e.default for n, e in PARAMETERS.items()})
    assert s.matcher == MatcherConfig() and s.cameras.topics == ("camera/image_raw",)
    assert build(MatcherConfig, {"matching.top_k": 9}).top_k == 9
    with pytest.raises(SettingError, match="model.checkpoint and model.random_weights are both set"):
        NodeSettings.from_values({**{n: e.default for n, e in PARAMETERS.items()},
                                  "model.checkpoint": "/x.ckpt", "model.random_weights": True})
