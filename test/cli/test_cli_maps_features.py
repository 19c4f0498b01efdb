"""``dinomix map build`` stores local features and a calibration; ``map info`` shows them."""

from __future__ import annotations

from pathlib import Path

import pytest
from cliutil import MODEL, run, run_json


def test_build_with_a_calibration_then_info(tmp_path: Path, corridor_subset: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    ost = tmp_path / "ost.yaml"
    ost.write_text("image_width: 512\nimage_height: 384\ncamera_matrix: {rows: 3, cols: 3, data: [420, 0, 256, 0, "
                   "420, 192, 0, 0, 1]}\ndistortion_model: plumb_bob\ndistortion_coefficients: {rows: 1, cols: 5, "
                   "data: [0, 0, 0, 0, 0]}\n")
    run_json(capsys, "map", "build", tmp_path / "m.dinomap", "--images", corridor_subset, "--geotags", "none",
             "--calibration", ost, "--features-max-features", "300", *MODEL)
    info = run_json(capsys, "map", "info", tmp_path / "m.dinomap", "--json")
    local = info["local_features"]
    assert (local["type"], local["slots"], local["intrinsics"]) == ("orb", 300, ["images"])
    assert local["bytes"] > 4 * 300 * 38
    code, text = run(capsys, "map", "info", tmp_path / "m.dinomap")
    assert code == 0 and "features     orb, 300 per keyframe" in text
    run_json(capsys, "map", "build", tmp_path / "plain.dinomap", "--images", corridor_subset, "--geotags", "none",
             "--features-max-features", "0", *MODEL)
    assert run_json(capsys, "map", "info", tmp_path / "plain.dinomap", "--json")["local_features"] is None
