"""``dinomix map build`` stores local features, a calibration and the camera's extrinsic; ``map info`` shows
them."""

from __future__ import annotations

from pathlib import Path

import pytest
from cliutil import MODEL, run, run_error, run_json


def test_build_with_a_calibration_then_info(tmp_path: Path, corridor_subset: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    ost = tmp_path / "ost.yaml"
    ost.write_text("image_width: 512\nimage_height: 384\ncamera_matrix: {rows: 3, cols: 3, data: [420, 0, 256, 0, "
                   "420, 192, 0, 0, 1]}\ndistortion_model: plumb_bob\ndistortion_coefficients: {rows: 1, cols: 5, "
                   "data: [0, 0, 0, 0, 0]}\n")
    run_json(capsys, "map", "build", tmp_path / "m.dinomap", "--images", corridor_subset, "--geotags", "none",
             "--calibration", ost, "--features-max-features", "300", "--extrinsic",
             "images: 0.4 -0.1 1.2 -1.5707963 0 -1.5707963", *MODEL)
    info = run_json(capsys, "map", "info", tmp_path / "m.dinomap", "--json")
    local = info["local_features"]
    assert (local["type"], local["slots"], local["intrinsics"]) == ("orb", 300, ["images"])
    assert local["bytes"] > 4 * 300 * 38
    camera = local["cameras"]["images"]
    assert (camera["frame_id"], camera["width"], camera["height"], camera["xyz"]) == ("images", 512, 384,
                                                                                      [0.4, -0.1, 1.2])
    code, text = run(capsys, "map", "info", tmp_path / "m.dinomap")
    assert code == 0 and "features     orb, 300 per keyframe" in text
    assert "extrinsics   images: frame images, 512x384, at (0.400, -0.100, 1.200) m in the base frame" in text
    run_json(capsys, "map", "build", tmp_path / "plain.dinomap", "--images", corridor_subset, "--geotags", "none",
             "--features-max-features", "0", *MODEL)
    assert run_json(capsys, "map", "info", tmp_path / "plain.dinomap", "--json")["local_features"] is None


def test_a_bad_extrinsic_fails_before_the_model_loads(tmp_path: Path, corridor_subset: Path,
                                                      capsys: pytest.CaptureFixture,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    message = run_error(capsys, caplog, "map", "build", tmp_path / "m.dinomap", "--images", corridor_subset,
                        "--extrinsic", "images: 0 0 0 0 0", *MODEL)
    assert "camera extrinsic 'images: 0 0 0 0 0': expected" in message
    assert not (tmp_path / "m.dinomap").exists()
