"""``dinomix describe`` (in-process through main()): descriptors in input order, a JSON sidecar, errors exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cliutil import run_error

from dinomix_ros.cli.main import main
from dinomix_ros.model import random_model
from dinomix_ros.model.encoder import Encoder, EncoderConfig


@pytest.fixture
def corridor(data_dir) -> Path:
    return data_dir / "rtabmap_corridor" / "samples"


def test_describe_files_and_folders_in_input_order(tmp_path: Path, corridor: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("10.jpg", "2.jpg"):  # natural order inside a folder: 2 before 10
        (folder / name).write_bytes((corridor / name).read_bytes())
    out = tmp_path / "desc.npy"
    code = main(["describe", str(corridor / "5.jpg"), str(folder), "--out", str(out), "--random-weights",
                 "--device", "cpu", "--dtype", "float32", "--batch-size", "2", "--quiet"])
    assert code == 0
    desc = np.load(out, allow_pickle=False)
    assert desc.shape == (3, 4096) and desc.dtype == np.float32
    sidecar = json.loads((tmp_path / "desc.npy.json").read_text())  # named after its output
    assert [Path(p).name for p in sidecar["images"]] == ["5.jpg", "2.jpg", "10.jpg"]
    assert sidecar["model"]["fingerprint"]["id"] == random_model("vits14", 0).fingerprint.id
    expected = Encoder.from_random("vits14", 0, EncoderConfig(device="cpu", dtype="float32")).describe(
        [corridor / "5.jpg", folder / "2.jpg", folder / "10.jpg"])
    np.testing.assert_allclose(desc, expected, atol=1e-5)


def test_describe_errors_exit_2_with_a_message(tmp_path: Path, corridor: Path, caplog) -> None:
    assert main(["describe", str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "x.npy"),
                 "--random-weights"]) == 2
    assert "missing.jpg does not exist" in caplog.text
    assert main(["describe", str(corridor / "1.jpg"), "--out", str(tmp_path / "x.npy"),
                 "--checkpoint", str(tmp_path / "none.ckpt")]) == 2
    assert "none.ckpt does not exist" in caplog.text
    with pytest.raises(SystemExit):  # argparse: exactly one of --checkpoint / --random-weights
        main(["describe", str(corridor / "1.jpg"), "--out", str(tmp_path / "x.npy")])


def test_describe_refuses_a_setting_out_of_range_with_the_flag_name(
        corridor: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    message = run_error(capsys, caplog, "describe", corridor / "1.jpg", "--out", tmp_path / "x.npy",
                        "--random-weights", "--batch-size", "0")
    assert message == "--batch-size must be >= 1, got 0"
    assert not (tmp_path / "x.npy").exists()
