"""ONNX export and the onnxruntime backend: parity with PyTorch float32, metadata, dynamic batch, refusals."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from dinomix_ros.model import random_model
from dinomix_ros.model.backends import OnnxRuntimeBackend, make_backend
from dinomix_ros.model.encoder import Encoder, EncoderConfig
from dinomix_ros.model.export import OnnxExportError, export_onnx, read_onnx_metadata
from dinomix_ros.imaging.preprocess import PREPROCESSING_ID, normalize

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package (requirements.txt)")
ort = pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs onnxruntime (requirements.txt)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def prepared(request) -> np.ndarray:
    """Five real corridor frames resized to the model input (host path)."""
    from dinomix_ros.imaging.preprocess import resize_to_input
    from dinomix_ros.imaging.decode import read_image_file

    folder = Path(request.config.rootpath) / "test" / "data" / "rtabmap_corridor" / "samples"
    return np.stack([resize_to_input(*read_image_file(folder / f"{i}.jpg")) for i in (1, 9, 17, 25, 33)])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple]:
    """ViT-S and ViT-B with seeded random weights, exported once: variant -> (loaded model, path)."""
    out = {}
    for variant in ("vits14", "vitb14"):
        loaded = random_model(variant, seed=11)
        out[variant] = loaded, export_onnx(loaded, tmp_path_factory.mktemp("onnx") / f"{variant}.onnx")
    return out


def _torch_fp32(loaded, batch_u8: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return loaded.model(normalize(torch.from_numpy(batch_u8))).numpy()


@pytest.mark.parametrize("variant", ["vits14", "vitb14"])
def test_onnxruntime_matches_torch_float32(exported, prepared: np.ndarray, variant: str) -> None:
    loaded, path = exported[variant]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = _torch_fp32(loaded, prepared)
    for batch in (prepared[:1], prepared):  # the batch dimension is dynamic
        got = session.run(["descriptors"], {"images": batch})[0]
        assert got.shape == (len(batch), 4096) and got.dtype == np.float32
        cosine = (got * expected[:len(batch)]).sum(1)
        assert cosine.min() >= 0.99999, cosine
    logging.getLogger(__name__).info("%s onnxruntime vs torch float32: min cosine %.8f, max |diff| %.2e", variant,
                                     cosine.min(), np.abs(got - expected).max())


def test_metadata_names_the_fingerprint_preprocessing_and_input(exported) -> None:
    loaded, path = exported["vits14"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    custom = {p.key: p.value for p in model.metadata_props}
    meta = read_onnx_metadata(custom, str(path))
    assert meta["fingerprint"] == loaded.fingerprint.to_dict()
    assert custom["dinomix.fingerprint_id"] == loaded.fingerprint.id
    assert meta["preprocessing"] == PREPROCESSING_ID and meta["input"] == "uint8_nhwc"
    assert meta["architecture"] == "dinomix_vits14" and meta["descriptor_dim"] == 4096
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 224, 224, 3]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 4096]
    assert any(n.op_type == "LayerNormalization" for n in model.graph.node)


def test_float32_nchw_export_matches_too(tmp_path: Path, prepared: np.ndarray) -> None:
    loaded = random_model("vits14", seed=11)
    path = export_onnx(loaded, tmp_path / "nchw.onnx", input="float32_nchw")
    backend = OnnxRuntimeBackend(loaded, torch.device("cpu"), "float32", str(path))
    assert backend.layout == "float32_nchw"
    got = backend.forward(torch.from_numpy(prepared[:2]))
    assert (got * _torch_fp32(loaded, prepared[:2])).sum(1).min() >= 0.99999


def test_encoder_with_the_onnxruntime_backend(exported, prepared: np.ndarray, caplog) -> None:
    loaded, path = exported["vits14"]
    with caplog.at_level(logging.INFO):
        enc = Encoder(loaded, EncoderConfig(device="cpu", backend="onnxruntime", onnx=str(path)))
    info = enc.describe_info()
    assert info["backend"] == "onnxruntime" and info["providers"] == ["CPUExecutionProvider"]
    assert info["onnx"] == str(path) and info["dtype"] == "float32" and info["cuda_graph"] is False
    assert "providers CPUExecutionProvider" in caplog.text
    expected = _torch_fp32(loaded, prepared)
    assert (enc.describe_prepared(prepared) * expected).sum(1).min() >= 0.99999
    assert float(enc.describe_one(prepared[2], "rgb8") @ expected[2]) >= 0.99999


def test_backend_exports_at_start_up_without_a_file(prepared: np.ndarray) -> None:
    loaded = random_model("vits14", seed=12)
    enc = Encoder(loaded, EncoderConfig(device="cpu", backend="onnxruntime"))  # dtype auto
    info = enc.describe_info()
    assert info["onnx"] == "exported at start-up" and info["dtype"] == "float32"
    assert info["dtype_reason"] == "onnxruntime on the CPU: the exported float32 graph"
    assert (enc.describe_prepared(prepared[:2]) * _torch_fp32(loaded, prepared[:2])).sum(1).min() >= 0.99999


def test_a_file_of_other_weights_or_without_metadata_is_refused(exported, tmp_path: Path) -> None:
    _, path = exported["vits14"]
    other = random_model("vits14", seed=99)
    with pytest.raises(OnnxExportError, match=r"was exported from model dmx-\w+ \(dinomix_vits14\), but the loaded "
                                              r"weights are dmx-\w+ .*export it again"):
        make_backend("onnxruntime", other, torch.device("cpu"), "float32", onnx_path=str(path))
    bare = onnx.load(str(path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(OnnxExportError, match="has no dinomix metadata .* `dinomix model export`"):
        make_backend("onnxruntime", other, torch.device("cpu"), "float32", onnx_path=str(tmp_path / "bare.onnx"))
    with pytest.raises(FileNotFoundError, match="model.onnx .*missing.onnx does not exist"):
        make_backend("onnxruntime", other, torch.device("cpu"), "float32", onnx_path=str(tmp_path / "missing.onnx"))


def test_export_refusals(tmp_path: Path) -> None:
    loaded = random_model("vits14", seed=1)
    with pytest.raises(OnnxExportError, match="input layout must be one of uint8_nhwc, float32_nchw"):
        export_onnx(loaded, tmp_path / "x.onnx", input="uint8_nchw")
    with pytest.raises(OnnxExportError, match="opset 13 is too old"):
        export_onnx(loaded, tmp_path / "x.onnx", opset=13)
    Encoder(loaded, EncoderConfig(device="cpu", dtype="bfloat16"))  # converts the weights in place
    with pytest.raises(OnnxExportError, match=r"weights are \['torch.bfloat16'\], not float32"):
        export_onnx(loaded, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="model.dtype bfloat16 does not apply to backend onnxruntime"):
        EncoderConfig(backend="onnxruntime", dtype="bfloat16")
    assert not list(tmp_path.iterdir())  # nothing half-written


@cuda
def test_onnxruntime_on_cuda_uses_a_gpu_provider_where_installed(exported, prepared: np.ndarray) -> None:
    loaded, path = exported["vitb14"]
    if not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
        pytest.skip(f"onnxruntime {ort.__version__} has no GPU provider (pip's onnxruntime is CPU-only)")
    enc = Encoder(loaded, EncoderConfig(device="cuda", backend="onnxruntime", onnx=str(path), dtype="float32"))
    assert enc.describe_info()["providers"][0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    assert (enc.describe_prepared(prepared) * _torch_fp32(random_model("vitb14", seed=11), prepared)).sum(1).min() \
        >= 0.9999
