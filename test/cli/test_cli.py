"""The `dinomix` command line: describe, model info/convert, bench (in-process through main())."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dinomix_ros.cli.main import main
from dinomix_ros.model.encoder import Encoder, EncoderConfig
from dinomix_ros.model import random_model


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
                 "--device", "cpu", "--batch-size", "2", "--quiet"])
    assert code == 0
    desc = np.load(out, allow_pickle=False)
    assert desc.shape == (3, 4096) and desc.dtype == np.float32
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert [Path(p).name for p in sidecar["images"]] == ["5.jpg", "2.jpg", "10.jpg"]
    assert sidecar["model"]["fingerprint"]["id"] == random_model("vits14", 0).fingerprint.id
    expected = Encoder.from_random("vits14", 0, EncoderConfig(device="cpu")).describe(
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


def test_model_info_and_convert(tmp_path: Path, capsys) -> None:
    loaded = random_model("vits14", seed=3)
    ckpt = tmp_path / "dinov2_vits14_mix.ckpt"
    torch.save({"state_dict": loaded.model.state_dict(), "epoch": 1}, ckpt)
    assert main(["model", "info", str(ckpt)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "dinomix_vits14" and info["source_format"] == "dinomix-lightning"
    assert info["fingerprint"]["id"] == loaded.fingerprint.id and info["parameters"] > 20_000_000
    converted = tmp_path / "model.safetensors"
    assert main(["model", "convert", str(ckpt), str(converted)]) == 0
    capsys.readouterr()
    assert main(["model", "info", str(converted)]) == 0
    assert json.loads(capsys.readouterr().out)["fingerprint"]["id"] == loaded.fingerprint.id


def test_bench_prints_json(capsys) -> None:
    assert main(["bench", "--variants", "vits14", "--dtypes", "float32", "--device", "cpu", "--batch", "2",
                 "--iters", "2", "--warmup", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    entry = result["results"][0]
    assert result["environment"]["torch"] == torch.__version__
    assert entry["variant"] == "dinov2_vits14" and entry["latency_224"]["n"] == 2
    assert entry["throughput"]["images_per_s"] > 0
