"""The inference engine: batching, the streaming pipeline, order, dtypes, threads; CUDA paths run only where CUDA
exists."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch

from dinomix_ros.model.encoder import DescribedBatch, Encoder, EncoderConfig, resolve_device
from dinomix_ros.imaging.decode import ImageDecodeError
from dinomix_ros.model import random_model
from dinomix_ros.imaging.preprocess import preprocess

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(random_model("vits14", seed=5),
                   EncoderConfig(device="cpu", dtype="float32", batch_size=3, workers=2))


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


def _pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("dinomix-prep", "dinomix-model"))]


def test_describe_stream_yields_batches_in_input_order_equal_to_describe(encoder: Encoder,
                                                                         corridor: list[Path]) -> None:
    tags = [f"frame{i}" for i in range(len(corridor))]
    batches = list(encoder.describe_stream((p, None, t) for p, t in zip(corridor, tags)))  # batch_size 3 (config)
    assert all(isinstance(b, DescribedBatch) for b in batches)
    assert [len(b) for b in batches] == [3, 3, 1] and [b.tags for b in batches] == [tags[:3], tags[3:6], tags[6:]]
    assert all(b.failed == [] and b.descriptors.dtype == np.float32 for b in batches)
    # the same pipeline as describe(), and each batch is one forward pass over its stacked prepared images
    np.testing.assert_array_equal(np.concatenate([b.descriptors for b in batches]), encoder.describe(corridor))
    for b, start in zip(batches, (0, 3, 6)):
        prepared = np.stack([encoder.prepare(p) for p in corridor[start:start + len(b)]])
        np.testing.assert_array_equal(b.descriptors, encoder.describe_prepared(prepared))
    two = list(encoder.describe_stream(((p, None, i) for i, p in enumerate(corridor)), batch_size=2))
    assert [b.tags for b in two] == [[0, 1], [2, 3], [4, 5], [6]]
    np.testing.assert_allclose(np.concatenate([b.descriptors for b in two]), encoder.describe(corridor), atol=1e-5)
    assert list(encoder.describe_stream(iter(()))) == []
    assert not _pipeline_threads()


def test_describe_stream_reports_failures_with_their_tags(encoder: Encoder, corridor: list[Path],
                                                          tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(corridor[0].read_bytes()[:5000])
    missing = tmp_path / "missing.jpg"
    bgr = np.zeros((48, 64, 3), np.uint8)
    items = [(corridor[0], None, "a"), (broken, None, "broken"), (corridor[1], None, "b"),
             (missing, None, "missing"), (bgr[:, :, :2], "bgr8", "two-channel"), (bgr, "bgr8", "c")]
    batches = list(encoder.describe_stream(items))
    assert [b.tags for b in batches] == [["a", "b"], ["c"]]
    failed = [(tag, type(exc)) for b in batches for tag, exc in b.failed]
    assert failed == [("broken", ImageDecodeError), ("missing", FileNotFoundError), ("two-channel", ImageDecodeError)]
    expected = encoder.describe([corridor[0], broken, corridor[1]], skip_errors=True)
    np.testing.assert_array_equal(batches[0].descriptors, expected[[0, 2]])
    all_bad = list(encoder.describe_stream([(broken, None, 1), (missing, None, 2)]))
    assert len(all_bad) == 1 and all_bad[0].descriptors.shape == (0, encoder.descriptor_dim)
    assert [tag for tag, _ in all_bad[0].failed] == [1, 2] and all_bad[0].tags == []


def test_describe_stream_keeps_at_most_two_batches_in_flight(encoder: Encoder, corridor: list[Path]) -> None:
    """Items are pulled lazily: when batch j comes out, no item past batch j + 1 has been read (or prepared)."""
    bs = encoder.config.batch_size
    pulled = [0]
    prepared = np.stack([encoder.prepare(p) for p in corridor])

    def frames() -> Iterator[tuple[np.ndarray, str, int]]:
        for i in range(1000):  # far more than the test reads: an eager pipeline would pull them all
            pulled[0] += 1
            yield prepared[i % len(prepared)], "rgb8", i

    seen = []
    with closing(encoder.describe_stream(frames())) as batches:
        for j, batch in enumerate(batches):
            assert (j + 1) * bs <= pulled[0] <= (j + 2) * bs, f"batch {j}: {pulled[0]} items pulled"
            seen += batch.tags
            if j == 3:
                break
    assert seen == list(range(4 * bs)) and pulled[0] <= 5 * bs
    assert not _pipeline_threads(), "closing the stream must stop its threads"


def test_describe_stream_errors_propagate_and_stop_the_threads(encoder: Encoder, corridor: list[Path]) -> None:
    def frames() -> Iterator[tuple[Path, None, int]]:
        for i, p in enumerate(corridor):
            yield p, None, i
        raise RuntimeError("the bag broke")

    got = []
    with pytest.raises(RuntimeError, match="the bag broke"):
        for batch in encoder.describe_stream(frames()):
            got += batch.tags
    assert got == [0, 1, 2]  # handed over before the error; the batches still in flight are dropped
    assert not _pipeline_threads()
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        encoder.describe_stream([], batch_size=0)  # at the call, before any iteration


def test_bf16_on_cpu_stays_close_to_fp32(corridor: list[Path]) -> None:
    loaded = random_model("vits14", seed=5)
    fp32 = Encoder(loaded, EncoderConfig(device="cpu", dtype="float32")).describe(corridor[:4])
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
        except BaseException as exc:  # reported below, whatever it is
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
        Encoder.from_random("s", 0, EncoderConfig(device="cpu", dtype="float32")).describe_prepared(
            np.zeros((2, 100, 100, 3)))


def test_describe_info_reports_device_and_fingerprint(encoder: Encoder) -> None:
    info = encoder.describe_info()
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["cuda_graph"] is False
    assert info["fingerprint"]["id"] == encoder.fingerprint.id and info["architecture"] == "dinomix_vits14"


@cuda
@pytest.mark.parametrize("dtype, min_cosine", [("float32", 0.999999), ("float16", 0.99999), ("bfloat16", 0.9999)])
def test_cuda_matches_cpu_fp32(corridor: list[Path], dtype: str, min_cosine: float) -> None:
    cpu = Encoder(random_model("vitb14", seed=5), EncoderConfig(device="cpu", dtype="float32")).describe(corridor)
    gpu = Encoder(random_model("vitb14", seed=5), EncoderConfig(device="cuda", dtype=dtype)).describe(corridor)
    assert (cpu * gpu).sum(1).min() >= min_cosine


@cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_graph_replay_equals_eager(corridor: list[Path], dtype: str) -> None:
    enc = Encoder(random_model("vitb14", seed=5), EncoderConfig(device="cuda", dtype=dtype, cuda_graphs=True))
    eager = Encoder(random_model("vitb14", seed=5), EncoderConfig(device="cuda", dtype=dtype, cuda_graphs=False))
    graphed = np.stack([enc.describe_one(p) for p in corridor])
    assert enc.describe_info()["cuda_graph"] is True and eager.describe_info()["cuda_graph"] is False
    np.testing.assert_allclose(graphed, eager.describe(corridor), atol=2e-3 if dtype != "float32" else 1e-5)


@cuda
def test_cuda_camera_batches_with_graphs_equal_one_by_one(corridor: list[Path]) -> None:
    """Frames of three cameras (sizes and encodings differ): one forward pass, graphs per batch size and per camera
    image shape, results equal to one at a time and close to the CPU's exact path."""
    import cv2

    enc = Encoder(random_model("vitb14", seed=5), EncoderConfig(device="cuda", dtype="float32"))
    assert enc.preprocess_on == "device"
    bgr = cv2.imread(str(corridor[0]))
    frames = [(bgr, "bgr8"), (cv2.resize(cv2.imread(str(corridor[1])), (1280, 720)), "bgr8"),
              (cv2.imread(str(corridor[2]))[:, :, 1].copy(), "mono8")]
    for _ in range(2):  # the second round replays the captured graphs
        one = np.stack([enc.describe_one(*f) for f in frames])
        batched = enc.describe_staged([enc.stage(*f) for f in frames])
        np.testing.assert_allclose(batched, one, atol=1e-5)
    assert len(enc.backend.graphs) == 2 and len(enc.backend.preprocess_graphs) == 4  # batch 1, 3; 224 + 3 cameras
    cpu = Encoder(random_model("vitb14", seed=5), EncoderConfig(device="cpu", dtype="float32"))
    assert (np.stack([cpu.describe_one(*f) for f in frames]) * batched).sum(1).min() > 0.9999


@cuda
def test_cuda_auto_dtype_is_float16_and_close_to_cpu_float32(corridor: list[Path]) -> None:
    enc = Encoder(random_model("vitb14", seed=5), EncoderConfig(device="cuda"))
    assert enc.describe_info()["dtype"] == "float16"
    cpu = Encoder(random_model("vitb14", seed=5),
                  EncoderConfig(device="cpu", dtype="float32", preprocess="device")).describe(corridor)
    assert (cpu * enc.describe(corridor)).sum(1).min() >= 0.99999 - 1e-6
