"""``dinomix model info|convert`` (in-process through main())."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinomix_ros.cli.main import main
from dinomix_ros.model import random_model, save_model


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


def test_model_export_writes_a_verified_onnx_file(tmp_path: Path, capsys) -> None:
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (requirements.txt)")
    loaded = random_model("vits14", seed=4)
    weights = tmp_path / "model.safetensors"
    save_model(loaded, weights)
    out = tmp_path / "model.onnx"
    assert main(["model", "export", str(weights), str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fingerprint"] == loaded.fingerprint.id and report["input"] == "uint8_nhwc"
    assert report["verify"]["min_cosine"] >= 0.99999
    meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta["dinomix.fingerprint_id"] == loaded.fingerprint.id
    assert main(["model", "export", str(weights), str(tmp_path / "nchw.onnx"), "--input", "float32_nchw",
                 "--no-verify"]) == 0
    assert "verify" not in json.loads(capsys.readouterr().out)
