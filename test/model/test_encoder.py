"""The inference engine: batching, order, dtypes, threads; CUDA paths run only where CUDA exists."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from dinomix_ros.model.encoder import Encoder, EncoderConfig, resolve_device
from dinomix_ros.imaging.decode import ImageDecodeError
from dinomix_ros.model import random_model
from dinomix_ros.imaging.preprocess import preprocess

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(random_model("vits14", seed=5), EncoderConfig(device="cpu", batch_size=3, workers=2))


@pytest.fixture
def corridor(data_dir) -> list[Path]:
    return [data_dir / "rtabmap_corridor" / "samples" / f"{i}.jpg" for i in (1, 9, 17, 25, 33, 41, 49)]


def test_describe_batches_keep_input_order_and_equal_the_model(encoder: Encoder, corridor: list[Path]) -> None:
    out = encoder.describe(corridor)  # batch_size 3: batches of 3, 3, 1
    assert out.shape == (7, 4096) and out.dtype == np.float32
    with torch.inference_mode():
        expected = encoder.model(preprocess(corridor)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    reversed_out = encoder.describe(corridor[::-1], batch_size=2)
    np.testing.assert_allclose(reversed_out[::-1], out, atol=1e-5)


def test_describe_one_equals_the_batch_row(encoder: Encoder, corridor: list[Path]) -> None:
    batch = encoder.describe(corridor[:3])
    for i in range(3):
        np.testing.assert_allclose(encoder.describe_one(corridor[i]), batch[i], atol=1e-5)


def test_mixed_inputs_and_encodings(encoder: Encoder, corridor: list[Path]) -> None:
    import cv2

    bgr = cv2.imread(str(corridor[0]))
    by_path = encoder.describe_one(corridor[0])
    np.testing.assert_allclose(encoder.describe_one(bgr, "bgr8"), by_path, atol=1e-6)
    np.testing.assert_allclose(encoder.describe_one(corridor[0].read_bytes()), by_path, atol=1e-6)
    rgb_as_bgr = encoder.describe_one(bgr, "rgb8")  # wrong channel order: a different descriptor
    assert float(rgb_as_bgr @ by_path) < 0.9999


def test_bad_images_raise_with_their_index_or_become_nan_rows(encoder: Encoder, corridor: list[Path],
                                                              tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(corridor[0].read_bytes()[:5000])
    items = [corridor[0], broken, corridor[1]]
    with pytest.raises(ImageDecodeError, match=r"image 1 \(.*broken.jpg\).*truncated"):
        encoder.describe(items)
    out = encoder.describe(items, skip_errors=True)
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    np.testing.assert_allclose(out[[0, 2]], encoder.describe([corridor[0], corridor[1]]), atol=1e-6)


def test_bf16_on_cpu_stays_close_to_fp32(corridor: list[Path]) -> None:
    loaded = random_model("vits14", seed=5)
    fp32 = Encoder(loaded, EncoderConfig(device="cpu")).describe(corridor[:4])
    bf16 = Encoder(random_model("vits14", seed=5), EncoderConfig(device="cpu", dtype="bfloat16")).describe(corridor[:4])
    cosine = (fp32 * bf16).sum(1)
    assert bf16.dtype == np.float32 and cosine.min() > 0.999, cosine


def test_concurrent_callers_get_the_serial_results(encoder: Encoder, corridor: list[Path]) -> None:
    serial = encoder.describe(corridor[:4])
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = encoder.describe_one(corridor[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        np.testing.assert_allclose(results[i], serial[i], atol=1e-5)


def test_config_and_device_errors() -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        EncoderConfig(dtype="fp8")
    with pytest.raises(ValueError, match="model.batch_size must be >= 1, got 0"):
        EncoderConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"model.device must be auto, cpu or cuda\[:N\], got 'tpu'"):
        EncoderConfig(device="tpu")
    with pytest.raises(ValueError, match="must be 'auto', 'cpu' or 'cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="PyTorch sees no CUDA GPU"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match=r"describe_prepared takes \(B, 224, 224, 3\) uint8"):
        Encoder.from_random("s", 0, EncoderConfig(device="cpu")).describe_prepared(np.zeros((2, 100, 100, 3)))


def test_describe_info_reports_device_and_fingerprint(encoder: Encoder) -> None:
    info = encoder.describe_info()
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["cuda_graph"] is False
    assert info["fingerprint"]["id"] == encoder.fingerprint.id and info["architecture"] == "dinomix_vits14"


@cuda
@pytest.mark.parametrize("dtype, min_cosine", [("float32", 0.999999), ("float16", 0.99999), ("bfloat16", 0.9999)])
def test_cuda_matches_cpu_fp32(corridor: list[Path], dtype: str, min_cosine: float) -> None:
    cpu = Encoder(random_model("vitb14", seed=5), EncoderConfig(device="cpu")).describe(corridor)
    gpu = Encoder(random_model("vitb14", seed=5), EncoderConfig(device="cuda", dtype=dtype)).describe(corridor)
    assert (cpu * gpu).sum(1).min() >= min_cosine


@cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_graph_replay_equals_eager(corridor: list[Path], dtype: str) -> None:
    enc = Encoder(random_model("vitb14", seed=5), EncoderConfig(device="cuda", dtype=dtype, cuda_graphs=True))
    eager = enc.describe(corridor)
    graphed = np.stack([enc.describe_one(p) for p in corridor])
    assert enc.describe_info()["cuda_graph"] is True
    np.testing.assert_allclose(graphed, eager, atol=2e-3 if dtype != "float32" else 1e-5)
