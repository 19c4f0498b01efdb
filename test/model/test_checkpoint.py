"""Weight files in the official formats (written here with seeded random weights) load back exactly."""

from __future__ import annotations

import argparse
import datetime
import os
import pickle
import re
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dinomix_ros.model import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
    build_model,
    load_model,
    random_model,
    save_model,
)
from dinomix_ros.model.checkpoint import ModelFingerprint, infer_variant, read_weights_file

PREFIX = "backbone.dino_model."


@pytest.fixture(scope="module")
def reference():
    """A random ViT-S DINO-Mix model and its descriptors for two fixed inputs."""
    loaded = random_model("vits14", seed=21)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        desc = loaded.model(x)
    return loaded, x, desc


def _descriptors(loaded, x):
    with torch.inference_mode():
        return loaded.model(x)


def _fake_lightning_module(monkeypatch) -> type:
    """Lightning is not installed; recreate the AttributeDict class under its real import path for pickling."""
    module = types.ModuleType("pytorch_lightning.utilities.parsing")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__ = module.__name__
    AttributeDict.__qualname__ = "AttributeDict"
    module.AttributeDict = AttributeDict
    for name in ("pytorch_lightning", "pytorch_lightning.utilities", module.__name__):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return AttributeDict


def test_official_lightning_checkpoint_round_trip(tmp_path: Path, reference, monkeypatch) -> None:
    loaded, x, desc = reference
    AttributeDict = _fake_lightning_module(monkeypatch)
    ckpt = {
        "epoch": 9,
        "global_step": 12345,
        "pytorch-lightning_version": "1.9.0",
        "state_dict": loaded.model.state_dict(),
        "hyper_parameters": AttributeDict(backbone_arch="dinov2_vits14", agg_config={"out_rows": 4},
                                          args=argparse.Namespace(lr=0.05)),
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.05}]}],
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.92), "kth_value": np.float64(0.9)}},
    }
    path = tmp_path / "dinov2_vits14_mix.ckpt"
    torch.save(ckpt, path)
    monkeypatch.undo()  # loading must work without the fake module: globals map to inert stand-ins
    again = load_model(path)
    assert again.source_format == "dinomix-lightning" and again.aggregator_trained
    assert again.spec.name == "dinov2_vits14"
    assert again.fingerprint == loaded.fingerprint
    torch.testing.assert_close(_descriptors(again, x), desc, rtol=0, atol=0)


def test_bare_state_dict_round_trip(tmp_path: Path, reference) -> None:
    loaded, x, desc = reference
    path = tmp_path / "bare.ckpt"
    torch.save(loaded.model.state_dict(), path)
    again = load_model(path, expected_variant="s")
    assert again.source_format == "dinomix-state-dict"
    torch.testing.assert_close(_descriptors(again, x), desc, rtol=0, atol=0)


def test_dinov2_pretrain_file_loads_backbone_and_warns_about_the_aggregator(tmp_path: Path, reference) -> None:
    loaded, x, _ = reference
    state = {k[len(PREFIX):]: v for k, v in loaded.model.state_dict().items() if k.startswith(PREFIX)}
    state["norm.weight"], state["norm.bias"] = torch.ones(384), torch.zeros(384)  # present in DINOv2 files
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    with pytest.warns(UserWarning, match="NOT DINO-Mix descriptors"):
        again = load_model(path)
    assert again.source_format == "dinov2-pretrain" and not again.aggregator_trained
    with torch.inference_mode():
        torch.testing.assert_close(again.model.backbone(x), loaded.model.backbone(x), rtol=0, atol=0)
    # the untrained aggregator is seeded: the same file always gives the same model and fingerprint
    with pytest.warns(UserWarning):
        assert load_model(path).fingerprint == again.fingerprint


def test_own_format_round_trip_and_tamper_detection(tmp_path: Path, reference) -> None:
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    loaded, x, desc = reference
    path = save_model(loaded, tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match="RANDOM"):
        again = load_model(path)
    assert again.fingerprint == loaded.fingerprint and again.source_format == "random"
    torch.testing.assert_close(_descriptors(again, x), desc, rtol=0, atol=0)

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors["aggregator.row_proj.bias"] = tensors["aggregator.row_proj.bias"] + 1e-3
    save_file(tensors, str(tmp_path / "tampered.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="do not match the fingerprint stored in the file"):
        load_model(tmp_path / "tampered.safetensors")


def test_fingerprint_depends_on_weights_and_round_trips_as_dict(reference) -> None:
    loaded, _, _ = reference
    other = random_model("vits14", seed=22)
    assert other.fingerprint.id != loaded.fingerprint.id
    assert ModelFingerprint.from_dict(loaded.fingerprint.to_dict()) == loaded.fingerprint
    assert loaded.fingerprint.id.startswith("dmx-") and loaded.fingerprint.descriptor_dim == 4096
    bad = dict(loaded.fingerprint.to_dict(), id="dmx-0000000000000000")
    with pytest.raises(CheckpointError, match="does not match its fields"):
        ModelFingerprint.from_dict(bad)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("aggregator.row_proj.bias"), r"missing keys \[aggregator.row_proj.bias\]"),
        (lambda sd: sd.__setitem__("aggregator.extra.weight", torch.zeros(1)), r"unexpected keys \[aggregator.extra"),
        (lambda sd: sd.__setitem__("aggregator.row_proj.weight", torch.zeros(4, 255)),
         r"shape mismatches \[aggregator.row_proj.weight: file \(4, 255\) vs model \(4, 256\)\]"),
        (lambda sd: sd.pop(PREFIX + "blocks.3.ls1.gamma"), r"missing keys \[backbone.dino_model.blocks.3.ls1.gamma\]"),
    ],
)
def test_files_that_do_not_fit_are_refused_naming_the_key(tmp_path: Path, reference, edit, message) -> None:
    loaded, _, _ = reference
    state = dict(loaded.model.state_dict())
    edit(state)
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointMismatchError, match=message):
        load_model(path)


def test_unknown_architecture_and_wrong_variant_are_refused(tmp_path: Path, reference) -> None:
    loaded, _, _ = reference
    state = {k: v for k, v in loaded.model.state_dict().items() if ".blocks.11." not in k}  # 11 blocks
    torch.save(state, tmp_path / "eleven.ckpt")
    with pytest.raises(CheckpointMismatchError, match="no DINO-Mix backbone has width 384, 11 blocks"):
        load_model(tmp_path / "eleven.ckpt")
    torch.save(loaded.model.state_dict(), tmp_path / "s.ckpt")
    with pytest.raises(CheckpointMismatchError, match="holds a dinov2_vits14 model, but dinov2_vitb14 was asked"):
        load_model(tmp_path / "s.ckpt", expected_variant="vitb14")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointMismatchError, match="neither 'backbone.dino_model"):
        load_model(tmp_path / "other.pth")


def test_register_token_backbones_are_refused(tmp_path: Path, reference) -> None:
    loaded, _, _ = reference
    state = {k[len(PREFIX):]: v for k, v in loaded.model.state_dict().items() if k.startswith(PREFIX)}
    state["register_tokens"] = torch.zeros(1, 4, 384)
    torch.save(state, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    with pytest.raises(CheckpointMismatchError, match="register tokens"):
        load_model(tmp_path / "dinov2_vits14_reg4_pretrain.pth")


def test_missing_truncated_and_non_dict_files(tmp_path: Path, reference) -> None:
    loaded, _, _ = reference
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.ckpt")
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": loaded.model.state_dict()}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="is a truncated or damaged zip archive"):
        load_model(truncated)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor, expected a state dict"):
        load_model(tmp_path / "tensor.pt")


class _Payload:
    """Unpickling this runs a shell command: exactly what weights_only loading must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_payloads_are_refused_and_never_run(tmp_path: Path, reference) -> None:
    loaded, _, _ = reference
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": loaded.model.state_dict(), "hyper_parameters": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"posix.system|os.system"):
        load_model(path)
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("variant", ["dinov2_vitl14", "dinov2_vitg14"])
def test_variant_is_inferred_from_shapes_for_large_models(variant: str) -> None:
    state = build_model(variant, device="meta").state_dict()  # shapes only, no memory
    assert infer_variant(state, PREFIX).name == variant
    dinov2_names = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    assert infer_variant(dinov2_names).name == variant


def test_torch_without_safe_globals_context_still_loads_plain_lightning_files(tmp_path, reference, monkeypatch):
    """torch 2.4 (JetPack 6) has only add_safe_globals: Namespace/numpy hyper-parameters load, pickles still don't."""
    loaded, x, desc = reference
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": loaded.model.state_dict(), "hyper_parameters": {"args": argparse.Namespace(lr=0.1)},
                "callbacks": {"kth_value": np.float64(0.5)}}, path)
    monkeypatch.delattr(torch.serialization, "safe_globals")
    again = load_model(path)
    torch.testing.assert_close(_descriptors(again, x), desc, rtol=0, atol=0)
    evil = tmp_path / "evil.ckpt"
    marker = tmp_path / "pwned"
    torch.save({"state_dict": loaded.model.state_dict(), "hyper_parameters": _Payload(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_model(evil)
    assert not marker.exists()


def _legacy_bytes(obj: object) -> bytes:
    """``obj`` as torch.save wrote files before the zip format (a pickle, then the tensor data)."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


# Each case: a file that is not usable weights, and what the message must say it is (and must not say).
NOT_WEIGHTS = {
    "text.ckpt": (b"model: dinov2_vitb14_mix\nepochs: 10\n" * 20, r"is not a weights file: it is a text file "
                  r"starting 'model: dinov2_vitb14_mix'"),
    "short.ckpt": (b"abc\n", r"it is a text file starting 'abc'"),  # once a KeyError traceback from the unpickler
    "page.ckpt": (b"<!DOCTYPE html><html><body>Not Found</body></html>", r"an HTML page: a failed download\?"),
    "lfs.ckpt": (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n", r"a Git LFS pointer"),
    "random.ckpt": (np.random.default_rng(7).bytes(4096), r"it is binary data starting [0-9a-f]{2} [0-9a-f]{2}"),
    "image.ckpt": (b"\x89PNG\r\n\x1a\n" + bytes(64), r"it is a PNG image"),
    "empty.ckpt": (b"", r"is empty \(0 bytes\): the download or copy did not finish"),
    "plain.pkl": (pickle.dumps({"a": [1, 2]}, protocol=4), r"is a Python pickle that safe loading cannot read \("
                  r"Unsupported operand 149\); it is not a PyTorch checkpoint"),
    "legacy_truncated.pt": (_legacy_bytes({"w": torch.zeros(64)})[:40], r"ends too early: the file is truncated"),
}


@pytest.mark.parametrize("name", sorted(NOT_WEIGHTS))
def test_files_that_are_not_weights_are_named_for_what_they_are(tmp_path: Path, name: str,
                                                                capfd: pytest.CaptureFixture) -> None:
    data, message = NOT_WEIGHTS[name]
    path = tmp_path / name
    path.write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as exc:
            read_weights_file(path)
    text = str(exc.value)
    assert type(exc.value) is CheckpointError and re.search(message, text), text
    assert not re.search(r"could run arbitrary code|model convert|does not exist|: $", text), text
    assert not [w for w in caught if "torch" in w.filename], [str(w.message) for w in caught]  # nothing leaks
    assert capfd.readouterr().err == ""


def test_a_directory_and_damaged_archives_are_told_apart(tmp_path: Path, reference) -> None:
    (tmp_path / "dir.ckpt").mkdir()
    with pytest.raises(CheckpointError, match=r"dir.ckpt is a directory; expected a weights file") as exc:
        read_weights_file(tmp_path / "dir.ckpt")
    assert not isinstance(exc.value, FileNotFoundError)
    with zipfile.ZipFile(tmp_path / "notes.ckpt", "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(CheckpointError, match=r"is a zip archive but not a PyTorch checkpoint \(no data.pkl; it "
                                              r"holds \[notes.txt\]\)"):
        read_weights_file(tmp_path / "notes.ckpt")
    loaded, _, _ = reference
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": loaded.model.state_dict()}, good)
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cut.ckpt is a truncated or damaged zip archive \(1000 bytes"):
        read_weights_file(tmp_path / "cut.ckpt")


def test_unsafe_pickle_names_the_global_and_gives_advice_that_works_here(tmp_path: Path, reference) -> None:
    """On this torch (>= 2.5) `dinomix model convert` refuses the same file, so the advice is the extraction
    snippet; the snippet, run as printed, gives a file that loads."""
    loaded, x, desc = reference
    path = tmp_path / "trusted.ckpt"
    torch.save({"state_dict": loaded.model.state_dict(), "hyper_parameters": {"when": datetime.date(2024, 5, 1)}},
               path)
    with pytest.raises(UnsafeCheckpointError) as exc:
        load_model(path)
    text = str(exc.value)
    assert "(datetime.date)" in text and "model convert" not in text
    command = re.search(r'python -c "(.+?)"', text).group(1)
    subprocess.run([sys.executable, "-c", command], cwd=tmp_path, check=True, capture_output=True)
    again = load_model(tmp_path / "weights.ckpt")
    torch.testing.assert_close(_descriptors(again, x), desc, rtol=0, atol=0)
    legacy = tmp_path / "legacy.ckpt"  # the finder of torch does not read legacy files: the message still names it
    legacy.write_bytes(_legacy_bytes({"state_dict": {}, "when": datetime.date(2024, 5, 1)}))
    with pytest.raises(UnsafeCheckpointError, match=r"\(datetime.date\): loading it could run arbitrary code"):
        read_weights_file(legacy)


def test_torch_without_safe_globals_advises_converting_lightning_files_elsewhere(
        tmp_path: Path, reference, monkeypatch) -> None:
    """torch 2.4 cannot allow Lightning's AttributeDict: only there is `dinomix model convert` on a newer torch
    the advice (on torch >= 2.5 the same file loads, see test_official_lightning_checkpoint_round_trip)."""
    loaded, _, _ = reference
    AttributeDict = _fake_lightning_module(monkeypatch)
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": loaded.model.state_dict(), "hyper_parameters": AttributeDict(lr=0.1)}, path)
    monkeypatch.undo()
    monkeypatch.delattr(torch.serialization, "safe_globals")
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_lightning.utilities.parsing.AttributeDict.*convert it "
                                                    r"once on a machine with torch >= 2.5 \(`dinomix model convert"):
        load_model(path)
