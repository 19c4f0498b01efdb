"""The per-consumer parameter files (config/wiring_*.yaml, README "Wiring to SLAM and navigation stacks"): every key
is a parameter of the node, every value one it accepts, and each file asks for the mode its consumer needs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dinomix_ros.ros.parameters import PARAMETERS, NodeSettings

CONFIG = Path(__file__).resolve().parents[2] / "config"
EXPECTED = {"nav2_amcl": "when_lost", "robot_localization": "continuous", "rtabmap": "when_lost",
            "cuvslam": "on_request", "lio_sam": "on_request"}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


@pytest.mark.parametrize("consumer", sorted(EXPECTED))
def test_wiring_file_is_valid_for_the_node(consumer: str) -> None:
    path = CONFIG / f"wiring_{consumer}.yaml"
    values = _flatten(yaml.safe_load(path.read_text())["/**"]["ros__parameters"])
    unknown = sorted(set(values) - set(PARAMETERS))
    assert not unknown, f"{path.name}: not parameters of the node: {unknown}"
    settings = NodeSettings.from_values({**{n: e.default for n, e in PARAMETERS.items()}, **values})
    assert settings.output.pose_prior_mode == EXPECTED[consumer]


def test_every_wiring_file_is_tested() -> None:
    assert {p.stem.removeprefix("wiring_") for p in CONFIG.glob("wiring_*.yaml")} == set(EXPECTED)
