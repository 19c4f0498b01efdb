"""Tests of dinomix_ros.maps.index: PlaceIndex against a numpy brute force, approximate recall, masked search,
serialisation, and the index of a map (stored blob or rebuilt)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from dinomix_ros.maps.index import INDEX_KIND_NAMES, PlaceIndex, index_for_map, save_map_with_index
from dinomix_ros.maps.errors import (
    DescriptorError,
    EmptyIndexError,
    IndexConfigError,
    IndexFormatError,
    MaskError,
    PlaceIndexError,
)
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.masks import mask_exclude_last
from dinomix_ros.maps.storage import save_map
from dinomix_ros.maps.loading import load_map

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")

# exact backends that run on this machine: (constructor kwargs, float32 tolerance on scores)
EXACT_CPU = [
    pytest.param({"backend": "faiss"}, id="faiss-cpu"),
    pytest.param({"backend": "torch"}, id="torch-cpu-fp32"),
    pytest.param({"backend": "torch", "torch_dtype": "float16"}, id="torch-cpu-fp16"),
]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def noisy_copies(rng: np.random.Generator, xb: np.ndarray, nq: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Queries that are noisy copies of random database rows: each has one clear true neighbour."""
    src = rng.choice(xb.shape[0], nq, replace=False)
    xq = unit(xb[src] + sigma * rng.standard_normal((nq, xb.shape[1])).astype(np.float32) / np.sqrt(xb.shape[1]))
    return xq, src


def stored(xb: np.ndarray, kwargs: dict) -> np.ndarray:
    """The vectors as the index stores them (float16 storage rounds them)."""
    if kwargs.get("torch_dtype") == "float16":
        return xb.astype(np.float16).astype(np.float32)
    return xb


def brute_force(xq, xb, k, allowed=None):
    """Reference top-k in float64: D, I padded like PlaceIndex, plus the fully sorted scores for tie detection."""
    S = xq.astype(np.float64) @ xb.astype(np.float64).T
    if allowed is not None:
        S = np.where(allowed, S, -np.inf)
    order = np.argsort(-S, axis=1, kind="stable")
    S_sorted = np.take_along_axis(S, order, axis=1)
    D = np.full((xq.shape[0], k), -np.inf)
    I = np.full((xq.shape[0], k), -1, dtype=np.int64)  # noqa: E741
    kk = min(k, xb.shape[0])
    D[:, :kk] = S_sorted[:, :kk]
    I[:, :kk] = order[:, :kk]
    I[~np.isfinite(D)] = -1
    return D, I, S_sorted


def assert_knn_equal(D, I, xq, xb, k, allowed=None, atol=1e-5):  # noqa: E741
    """Scores equal the reference to atol; ids equal it except among tied scores (faiss check_ref_knn_with_draws)."""
    Dref, Iref, S_sorted = brute_force(xq, xb, k, allowed)
    assert D.shape == I.shape == (xq.shape[0], k)
    assert D.dtype == np.float32 and I.dtype == np.int64
    np.testing.assert_array_equal(I < 0, Iref < 0, err_msg="padding differs from the reference")
    np.testing.assert_allclose(D, Dref, atol=atol, err_msg="scores differ from the brute force")
    rows, cols = np.nonzero(I >= 0)
    true = np.einsum("ij,ij->i", xq[rows].astype(np.float64), xb[I[rows, cols]].astype(np.float64))
    np.testing.assert_allclose(D[rows, cols], true, atol=atol, err_msg="a returned id does not have its score")
    if allowed is not None:
        a = np.broadcast_to(allowed, (xq.shape[0], xb.shape[0]))
        assert a[rows, I[rows, cols]].all(), "a row that is not allowed was returned"
    for r in range(I.shape[0]):
        ids = I[r][I[r] >= 0]
        assert len(set(ids.tolist())) == ids.size, f"duplicate ids in row {r}: {ids}"
    # away from ties, the ids must be exactly the reference ids
    with np.errstate(invalid="ignore"):  # -inf - -inf among excluded rows
        gaps = np.abs(np.diff(S_sorted, axis=1))
    n = S_sorted.shape[1]
    for r, c in zip(*np.nonzero(Iref >= 0)):
        tied = (c > 0 and gaps[r, c - 1] <= 2 * atol) or (c + 1 < n and gaps[r, c] <= 2 * atol)
        if not tied:
            assert I[r, c] == Iref[r, c], f"query {r} rank {c}: id {I[r, c]}, expected {Iref[r, c]}"


@pytest.fixture
def data(rng):
    xb = unit(rng.standard_normal((700, 64)))
    xq = unit(rng.standard_normal((23, 64)))
    return xb, xq


# ---------------------------------------------------------------------- exact search


@pytest.mark.parametrize("kwargs", EXACT_CPU)
def test_exact_matches_brute_force(kwargs, data):
    xb, xq = data
    index = PlaceIndex(64, "exact", "cpu", **kwargs)
    index.add(xb)
    D, I = index.search(xq, 10)  # noqa: E741
    assert_knn_equal(D, I, xq, stored(xb, kwargs), 10)


@pytest.mark.parametrize("kwargs", EXACT_CPU)
def test_exact_shared_and_per_query_masks(kwargs, data, rng):
    xb, xq = data
    xs = stored(xb, kwargs)
    index = PlaceIndex(64, "exact", "cpu", **kwargs)
    index.add(xb)
    shared = rng.random(700) < 0.3
    D, I = index.search(xq, 8, allowed=shared)  # noqa: E741
    assert_knn_equal(D, I, xq, xs, 8, shared)
    per_query = rng.random((23, 700)) < 0.5
    per_query[3] = per_query[4]  # two queries sharing a mask: grouped into one faiss call
    per_query[5] = False  # nothing allowed: all padding
    per_query[6] = False
    per_query[6, [11, 42]] = True  # fewer allowed rows than k: partial padding
    D, I = index.search(xq, 8, allowed=per_query)  # noqa: E741
    assert_knn_equal(D, I, xq, xs, 8, per_query)
    assert (I[5] == -1).all() and np.isneginf(D[5]).all()
    assert sorted(I[6, :2].tolist()) == [11, 42] and (I[6, 2:] == -1).all()


@pytest.mark.parametrize("kwargs", EXACT_CPU)
def test_exact_all_false_mask_and_identical_rows(kwargs, data):
    xb, xq = data
    index = PlaceIndex(64, "exact", "cpu", **kwargs)
    index.add(xb)
    D, I = index.search(xq, 5, allowed=np.zeros(700, dtype=bool))  # noqa: E741
    assert (I == -1).all() and np.isneginf(D).all()
    same = np.tile(np.arange(700) % 3 == 0, (23, 1))  # (nq, N) with identical rows: one batched search
    D, I = index.search(xq, 5, allowed=same)  # noqa: E741
    assert_knn_equal(D, I, xq, stored(xb, kwargs), 5, same)


@pytest.mark.parametrize("kwargs", EXACT_CPU)
def test_k_larger_than_ntotal_pads(kwargs, rng):
    xb = unit(rng.standard_normal((6, 64)))
    xq = unit(rng.standard_normal((4, 64)))
    index = PlaceIndex(64, **kwargs)
    index.add(xb)
    D, I = index.search(xq, 9)  # noqa: E741
    assert_knn_equal(D, I, xq, stored(xb, kwargs), 9)
    assert (I[:, 6:] == -1).all() and np.isneginf(D[:, 6:]).all()
    assert (np.sort(I[:, :6], axis=1) == np.arange(6)).all()


@pytest.mark.parametrize("kwargs", EXACT_CPU)
def test_float16_input_and_single_query(kwargs, data):
    xb, xq = data
    xb16 = xb.astype(np.float16)
    index = PlaceIndex(64, **kwargs)
    index.add(xb16)
    D, I = index.search(xq[0].astype(np.float16), 4)  # (dim,) float16 query -> (1, k)  # noqa: E741
    assert D.shape == (1, 4)
    assert_knn_equal(D, I, xq[:1].astype(np.float16).astype(np.float32), xb16.astype(np.float32), 4)


@pytest.mark.parametrize("kwargs", EXACT_CPU)
def test_append_equals_single_add(kwargs, data):
    xb, xq = data
    once = PlaceIndex(64, **kwargs)
    once.add(xb)
    parts = PlaceIndex(64, **kwargs)
    for i0 in range(0, 700, 97):  # uneven chunks, including one-by-one growth of the torch buffer
        parts.add(xb[i0:i0 + 97])
    parts.add(xb[:0])  # empty add is a no-op
    assert len(parts) == parts.ntotal == 700
    D1, I1 = once.search(xq, 7)
    D2, I2 = parts.search(xq, 7)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_allclose(D1, D2, atol=1e-6)


@pytest.mark.parametrize("kwargs", EXACT_CPU)
def test_large_read_only_add_is_chunked_and_atomic(kwargs, rng, tmp_path):
    """A memory-mapped float16 map larger than one add chunk (65536 rows); a NaN in the last chunk adds nothing."""
    xb = unit(rng.standard_normal((70000, 8))).astype(np.float16)
    path = tmp_path / "xb.npy"
    np.save(path, xb)
    xb_mm = np.load(path, mmap_mode="r")  # read-only
    xq = unit(rng.standard_normal((5, 8)))
    index = PlaceIndex(8, **kwargs)
    bad = np.array(xb_mm)
    bad[69999, 3] = np.inf
    with pytest.raises(DescriptorError, match=r"1 row\(s\) with NaN/inf values \(first: row 69999\)"):
        index.add(bad)
    assert index.ntotal == 0
    index.add(xb_mm)
    assert index.ntotal == 70000
    assert_knn_equal(*index.search(xq, 4), xq, xb.astype(np.float32), 4, atol=1e-5)


def test_exact_dim_4096(rng):
    xb = unit(rng.standard_normal((300, 4096)))
    xq, src = noisy_copies(rng, xb, 12, sigma=0.5)
    for kwargs in ({"backend": "faiss"}, {"backend": "torch"}, {"backend": "torch", "torch_dtype": "float16"}):
        index = PlaceIndex(4096, **kwargs)
        index.add(xb)
        D, I = index.search(xq, 5)  # noqa: E741
        assert_knn_equal(D, I, xq, stored(xb, kwargs), 5)
        np.testing.assert_array_equal(I[:, 0], src)
    hnsw = PlaceIndex(4096, "hnsw")
    hnsw.add(xb)
    D, I = hnsw.search(xq, 5)  # noqa: E741
    np.testing.assert_array_equal(I[:, 0], src)
    np.testing.assert_allclose(D[:, 0], np.einsum("ij,ij->i", xq, xb[src]), atol=1e-5)


def test_short_mask_excludes_newest_rows(data):
    xb, xq = data
    index = PlaceIndex(64)
    index.add(xb)
    short = np.ones(650, dtype=bool)  # built before the last 50 rows were appended
    D, I = index.search(xq, 10, allowed=short)  # noqa: E741
    assert_knn_equal(D, I, xq, xb, 10, np.arange(700) < 650)


# ---------------------------------------------------------------------- approximate indexes


@pytest.fixture(scope="module")
def approx():
    """12k unit vectors (d=256), noisy-copy queries, and trained hnsw / ivfpq indexes (built once: seconds each)."""
    rng = np.random.default_rng(1338)
    xb = unit(rng.standard_normal((12000, 256)))
    xq, src = noisy_copies(rng, xb, 300, sigma=0.6)
    hnsw = PlaceIndex(256, "hnsw", hnsw_ef_construction=100)
    hnsw.add(xb)
    ivfpq = PlaceIndex(256, "ivfpq", pq_m=16, ivf_nprobe=32)
    ivfpq.add(xb[:6000])  # below 39 * 256 = 9984: buffered and searched exactly
    pending_mask = rng.random(6000) < 0.5
    pending = {"trained": ivfpq.is_trained, "describe": ivfpq.describe(), "search": ivfpq.search(xq, 5),
               "mask": pending_mask, "masked": ivfpq.search(xq, 5, allowed=pending_mask), "bytes": ivfpq.to_bytes()}
    ivfpq.add(xb[6000:])  # reaches the threshold: trains on all 12000 rows, then encodes them
    return {"xb": xb, "xq": xq, "src": src, "hnsw": hnsw, "ivfpq": ivfpq, "pending": pending}


def test_ivfpq_trains_when_enough_vectors(approx):
    pending = approx["pending"]
    assert pending["trained"] is False
    assert pending["describe"]["train_threshold"] == 39 * 256
    assert pending["describe"]["ntotal"] == 6000
    D, I = pending["search"]  # noqa: E741
    assert_knn_equal(D, I, approx["xq"], approx["xb"][:6000], 5)  # exact while untrained
    D, I = pending["masked"]  # noqa: E741
    assert_knn_equal(D, I, approx["xq"], approx["xb"][:6000], 5, pending["mask"])
    desc = approx["ivfpq"].describe()
    assert desc["trained"] and desc["ntotal"] == 12000
    # nlist = clamp(round(4 * sqrt(12000)), 1, 12000 // 39) = 307
    assert desc["params"]["trained_nlist"] == 307 and desc["params"]["trained_on"] == 12000
    assert desc["storage"] == "IndexRefineFlat"


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_recall_at_1(kind, approx):
    xb, xq, src = approx["xb"], approx["xq"], approx["src"]
    _, Iref, _ = brute_force(xq, xb, 1)
    assert (Iref[:, 0] == src).mean() > 0.99  # the data gives each query a clear neighbour
    D, I = approx[kind].search(xq, 10)  # noqa: E741
    recall = (I[:, 0] == Iref[:, 0]).mean()
    assert recall >= 0.95, f"{kind} recall@1 {recall:.3f} < 0.95"
    found = I[:, 0] >= 0
    # refined ivfpq and hnsw (flat storage) both return exact inner products
    np.testing.assert_allclose(D[found, 0], np.einsum("ij,ij->i", xq[found], xb[I[found, 0]]), atol=1e-5)
    assert (np.diff(D, axis=1) <= 1e-6).all(), "scores are not in descending order"


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_masks(kind, approx, rng):
    xb, xq, src = approx["xb"], approx["xq"], approx["src"]
    index = approx[kind]
    # loop-closure style shared mask that keeps most rows, and the true neighbours
    shared = rng.random(12000) < 0.7
    shared[src] = True
    D, I = index.search(xq, 5, allowed=shared)  # noqa: E741
    assert shared[I[I >= 0]].all()
    assert (I[:, 0] == src).mean() >= 0.95
    # per-query masks (one group per query)
    per_query = rng.random((len(xq), 12000)) < 0.5
    per_query[np.arange(len(xq)), src] = True
    D, I = index.search(xq[:40], 3, allowed=per_query[:40])  # noqa: E741
    rows, cols = np.nonzero(I >= 0)
    assert per_query[rows, I[rows, cols]].all()
    assert (I[:, 0] == src[:40]).mean() >= 0.95
    # restrictive mask (<= filter_exact_max rows): searched exactly on the flat storage
    small = np.zeros(12000, dtype=bool)
    small[rng.choice(12000, 500, replace=False)] = True
    D, I = index.search(xq[:50], 10, allowed=small)  # noqa: E741
    assert_knn_equal(D, I, xq[:50], xb, 10, small)
    D, I = index.search(xq[:5], 3, allowed=np.zeros(12000, dtype=bool))  # noqa: E741
    assert (I == -1).all() and np.isneginf(D).all()


def test_ivfpq_without_refine_restrictive_mask(rng):
    xb = unit(rng.standard_normal((10000, 32)))
    xq, src = noisy_copies(rng, xb, 40, sigma=0.3)
    index = PlaceIndex(32, "ivfpq", pq_m=8, refine=False, ivf_nprobe=16)
    index.add(xb)
    assert index.describe()["storage"] == "IndexIVFPQ"
    small = np.zeros(10000, dtype=bool)
    small[rng.choice(10000, 200, replace=False)] = True
    small[src[:20]] = True
    D, I = index.search(xq, 4, allowed=small)  # noqa: E741
    assert small[I[I >= 0]].all() and (I >= 0).all()
    assert (I[:20, 0] == src[:20]).mean() >= 0.9
    # the restrictive path scans all inverted lists: same as a copy searched with nprobe = nlist and no fallback
    nlist = index.describe()["params"]["trained_nlist"]
    full = PlaceIndex.from_bytes(index.to_bytes(), ivf_nprobe=nlist, filter_exact_max=0)
    D2, I2 = full.search(xq, 4, allowed=small)
    np.testing.assert_array_equal(I, I2)
    np.testing.assert_array_equal(D, D2)
    true = np.einsum("ij,ij->i", xq, xb[I[:, 0]])
    np.testing.assert_allclose(D[:, 0], true, atol=0.25)  # PQ-approximated scores (8 bytes per vector)


def test_ivfpq_explicit_train_then_block_adds(rng):
    xb = unit(rng.standard_normal((12000, 64)))
    xq, src = noisy_copies(rng, xb, 100, sigma=0.5)
    index = PlaceIndex(64, "ivfpq", pq_m=8)
    index.add(xb[:100])  # buffered, untrained
    with pytest.raises(DescriptorError, match="xt has 5000 vectors, ivfpq training needs at least 9984"):
        index.train(xb[:5000])
    index.train(xb)  # the whole map: nlist sized for 12000 rows, buffered rows encoded
    assert index.is_trained and index.ntotal == 100
    for i0 in range(100, 12000, 1000):  # block adds (as a map loader does) only encode
        index.add(xb[i0:i0 + 1000])
    desc = index.describe()
    assert desc["ntotal"] == 12000 and desc["params"]["trained_on"] == 12000
    assert desc["params"]["trained_nlist"] == 307
    _, I = index.search(xq, 1)  # noqa: E741
    assert (I[:, 0] == src).mean() >= 0.95
    with pytest.raises(IndexConfigError, match="already trained"):
        index.train(xb)
    exact = PlaceIndex(64)
    exact.train(xb)  # no training needed: nothing happens
    assert exact.ntotal == 0


# ---------------------------------------------------------------------- serialisation


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivfpq"])
def test_serialize_round_trip(kind, approx, tmp_path):
    xb, xq = approx["xb"], approx["xq"]
    if kind == "exact":
        index = PlaceIndex(256)
        index.add(xb[:3000])
    else:
        index = approx[kind]
    buf = index.to_bytes()
    assert buf.dtype == np.uint8 and buf.ndim == 1
    path = tmp_path / "index.faiss"
    path.write_bytes(buf.tobytes())  # a map directory stores it as a plain faiss index file
    loaded = PlaceIndex.from_bytes(path.read_bytes())
    assert loaded.kind == kind and loaded.ntotal == index.ntotal
    skip = ("ivf_nlist", "trained_on")  # an automatic nlist is explicit once stored; the training size is not stored
    assert {k: v for k, v in loaded.describe()["params"].items() if k not in skip} == \
        {k: v for k, v in index.describe()["params"].items() if k not in skip}
    mask = np.arange(index.ntotal) % 4 != 0
    for allowed in (None, mask):
        D1, I1 = index.search(xq, 5, allowed=allowed)
        D2, I2 = loaded.search(xq, 5, allowed=allowed)
        np.testing.assert_array_equal(I1, I2)
        np.testing.assert_array_equal(D1, D2)
    assert isinstance(faiss.read_index(str(path)), faiss.Index)
    if kind == "hnsw":  # search-time parameters may be overridden, the structure comes from the file
        tuned = PlaceIndex.from_bytes(buf, hnsw_ef_search=16, hnsw_m=8)
        assert tuned.describe()["params"]["hnsw_ef_search"] == 16
        assert tuned.describe()["params"]["hnsw_m"] == 32


def test_serialize_untrained_ivfpq_and_torch(approx):
    xq = approx["xq"]
    D0, I0 = approx["pending"]["search"]
    as_exact = PlaceIndex.from_bytes(approx["pending"]["bytes"])
    assert as_exact.kind == "exact"
    as_ivfpq = PlaceIndex.from_bytes(approx["pending"]["bytes"], kind="ivfpq", pq_m=16)
    assert as_ivfpq.kind == "ivfpq" and not as_ivfpq.is_trained and as_ivfpq.ntotal == 6000
    for loaded in (as_exact, as_ivfpq):
        D, I = loaded.search(xq, 5)  # noqa: E741
        np.testing.assert_array_equal(I, I0)

    torch_index = PlaceIndex(256, backend="torch")
    torch_index.add(approx["xb"][:2000])
    back = PlaceIndex.from_bytes(torch_index.to_bytes(), backend="torch")
    assert back.backend == "torch" and back.ntotal == 2000
    np.testing.assert_array_equal(back.search(xq, 5)[1], torch_index.search(xq, 5)[1])
    as_faiss = PlaceIndex.from_bytes(torch_index.to_bytes())
    assert as_faiss.backend == "faiss"
    assert_knn_equal(*as_faiss.search(xq, 5), xq, approx["xb"][:2000], 5)


def test_from_bytes_rejects_bad_input():
    with pytest.raises(IndexFormatError, match="could not read a faiss index"):
        PlaceIndex.from_bytes(b"not an index at all")
    l2 = faiss.IndexFlatL2(8)
    with pytest.raises(IndexFormatError, match="expected METRIC_INNER_PRODUCT"):
        PlaceIndex.from_bytes(faiss.serialize_index(l2))
    lsh = faiss.IndexScalarQuantizer(8, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    with pytest.raises(IndexFormatError, match="unsupported faiss index type IndexScalarQuantizer"):
        PlaceIndex.from_bytes(faiss.serialize_index(lsh))
    with pytest.raises(IndexFormatError, match="expected kind 'hnsw'"):
        PlaceIndex.from_bytes(PlaceIndex(8).to_bytes(), kind="hnsw")
    with pytest.raises(IndexFormatError, match="1-D uint8"):
        PlaceIndex.from_bytes(np.zeros(4, dtype=np.float32))


# ---------------------------------------------------------------------- errors and configuration


def test_input_errors(data):
    xb, xq = data
    index = PlaceIndex(64)
    with pytest.raises(EmptyIndexError, match="empty index"):
        index.search(xq, 3)
    with pytest.raises(DescriptorError, match=r"shape \(700, 32\), expected \(n, 64\)"):
        index.add(xb[:, :32])
    bad = xb[:10].copy()
    bad[4, 7] = np.nan
    with pytest.raises(DescriptorError, match="1 row\\(s\\) with NaN/inf values \\(first: row 4\\)"):
        index.add(bad)
    with pytest.raises(DescriptorError, match="dtype int64"):
        index.add(np.ones((3, 64), dtype=np.int64))
    assert index.ntotal == 0  # failed adds add nothing
    index.add(xb)
    with pytest.raises(DescriptorError, match="xq has shape"):
        index.search(np.zeros((2, 3, 64), dtype=np.float32), 3)
    with pytest.raises(IndexConfigError, match="k must be an int >= 1, found 0"):
        index.search(xq, 0)
    with pytest.raises(MaskError, match="bool mask, found dtype int64"):
        index.search(xq, 3, allowed=np.ones(700, dtype=np.int64))
    with pytest.raises(MaskError, match=r"shape \(701,\), expected \(700,\)"):
        index.search(xq, 3, allowed=np.ones(701, dtype=bool))
    with pytest.raises(MaskError, match=r"shape \(5, 700\)"):
        index.search(xq, 3, allowed=np.ones((5, 700), dtype=bool))
    fp16 = PlaceIndex(64, backend="torch", torch_dtype="float16")
    with pytest.raises(DescriptorError, match=r"\|value\| 100000 > 65504.*float16 max"):
        fp16.add(np.full((1, 64), 1e5, dtype=np.float32))


def test_config_errors():
    with pytest.raises(IndexConfigError, match="kind must be one of"):
        PlaceIndex(64, "lsh")
    with pytest.raises(IndexConfigError, match="device must be one of"):
        PlaceIndex(64, device="tpu")
    with pytest.raises(IndexConfigError, match="backend='torch' only implements kind 'exact'"):
        PlaceIndex(64, "hnsw", backend="torch")
    with pytest.raises(IndexConfigError, match="pq_m=48 does not divide dim=64"):
        PlaceIndex(64, "ivfpq", pq_m=48)
    with pytest.raises(IndexConfigError, match="dim must be an int >= 1"):
        PlaceIndex(0)
    with pytest.raises(IndexConfigError, match="torch_dtype must be one of"):
        PlaceIndex(64, backend="torch", torch_dtype="int8")
    with pytest.raises(IndexConfigError, match="backend='faiss' runs on the CPU only"):
        PlaceIndex(64, device="cuda", backend="faiss")  # refused whether or not CUDA is present: faiss is faiss-cpu
    assert PlaceIndex(64, "hnsw", device="auto").device == "cpu"
    auto = PlaceIndex(64, device="auto")
    assert auto.device == ("cuda" if CUDA else "cpu")
    assert auto.backend == ("torch" if CUDA else "faiss")
    faiss_auto = PlaceIndex(64, device="auto", backend="faiss")  # auto picks where the asked-for backend runs
    assert (faiss_auto.device, faiss_auto.backend) == ("cpu", "faiss")


@pytest.mark.skipif(CUDA, reason="checks the error raised when CUDA is absent")
def test_cuda_requested_without_cuda():
    with pytest.raises(IndexConfigError, match="torch.cuda.is_available\\(\\) is False"):
        PlaceIndex(64, device="cuda")


def test_describe(data):
    xb, _ = data
    index = PlaceIndex(64, "hnsw", hnsw_m=16)
    index.add(xb)
    desc = index.describe()
    assert desc["kind"] == "hnsw" and desc["backend"] == "faiss" and desc["device"] == "cpu"
    assert desc["ntotal"] == 700 and desc["dim"] == 64 and desc["trained"]
    assert desc["params"]["hnsw_m"] == 16 and desc["storage"] == "IndexHNSWFlat"
    assert PlaceIndex(64, backend="torch").describe()["params"]["torch_dtype"] == "float32"


# ---------------------------------------------------------------------- threads


@pytest.mark.parametrize("kind,kwargs", [("exact", {}), ("exact", {"backend": "torch"}), ("hnsw", {"hnsw_m": 8})])
def test_concurrent_add_and_search(kind, kwargs, rng):
    xb = unit(rng.standard_normal((1200, 32)))
    xq = unit(rng.standard_normal((8, 32)))
    index = PlaceIndex(32, kind, **kwargs)
    index.add(xb[:100])
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for i0 in range(100, 1200, 10):
                index.add(xb[i0:i0 + 10])
        except BaseException as e:  # reported by the test, whatever it is
            errors.append(e)
        finally:
            done.set()

    def reader() -> None:
        try:
            while not done.is_set():
                n = len(index)
                allowed = mask_exclude_last(n, 20)
                D, I = index.search(xq, 5, allowed=allowed)  # noqa: E741
                if not ((I < n - 20).all() and (I[:, 0] >= 0).all()):
                    raise AssertionError(f"results outside the mask: {I}")
        except BaseException as e:  # reported by the test, whatever it is
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert index.ntotal == 1200


# ---------------------------------------------------------------------- CUDA


@needs_cuda
def test_cuda_torch_float16_matches_brute_force(data, rng):
    xb, xq = data
    index = PlaceIndex(64, device="cuda")
    assert index.backend == "torch" and index.describe()["params"]["torch_dtype"] == "float16"
    index.add(xb)
    xs = xb.astype(np.float16).astype(np.float32)
    assert_knn_equal(*index.search(xq, 10), xq, xs, 10)
    per_query = rng.random((23, 700)) < 0.5
    assert_knn_equal(*index.search(xq, 10, allowed=per_query), xq, xs, 10, per_query)
    back = PlaceIndex.from_bytes(index.to_bytes(), device="cuda")
    np.testing.assert_array_equal(back.search(xq, 10)[1], index.search(xq, 10)[1])


# ---------------------------------------------------------------------- the index of a map


def _fingerprint(dim: int) -> dict:
    return {"id": "dmx-1a2b3c4d5e6f7a8b", "architecture": "dinomix_vits14", "weights_sha256": "ab" * 32,
            "preprocessing": "test", "descriptor_dim": dim}


def _map_of(xb: np.ndarray) -> KeyframeMap:
    kmap = KeyframeMap.empty(_fingerprint(xb.shape[1]), storage_dtype="float32")
    kmap.add(xb, stamps_ns=np.arange(len(xb)), cameras="cam", frame_ids="map")
    return kmap


def test_index_for_map_uses_a_fresh_stored_index_and_rebuilds_a_stale_one(
        tmp_path: Path, rng: np.random.Generator, caplog: pytest.LogCaptureFixture) -> None:
    dim = 64
    xb = unit(rng.standard_normal((200, dim)))
    kmap = _map_of(xb)
    # A planted hnsw index over OTHER vectors: if it is used, searches find the planted vectors, not the map's.
    planted = unit(rng.standard_normal((200, dim)))
    decoy = PlaceIndex(dim, "hnsw", "cpu")
    decoy.add(planted)
    save_map(kmap, tmp_path / "m.dinomap", decoy.to_bytes(), INDEX_KIND_NAMES["hnsw"])
    loaded = load_map(tmp_path / "m.dinomap")

    caplog.set_level(logging.INFO, logger="dinomix_ros.maps.index")
    index = index_for_map(loaded, "hnsw", "cpu")
    assert index.kind == "hnsw" and index.ntotal == 200
    D, I = index.search(planted[:5], 1)  # noqa: E741
    assert I[:, 0].tolist() == [0, 1, 2, 3, 4] and np.allclose(D[:, 0], 1.0, atol=1e-5)
    assert "using the stored faiss_hnsw_ip index of the map (200 rows)" in caplog.text

    exact = index_for_map(loaded, "exact", "cpu")  # another kind than stored: built from the descriptors
    D, I = exact.search(xb[:5], 1)  # noqa: E741
    assert I[:, 0].tolist() == [0, 1, 2, 3, 4] and np.allclose(D[:, 0], 1.0, atol=1e-5)
    assert "the stored index is 'faiss_hnsw_ip', not 'faiss_flat_ip'" in caplog.text

    loaded.add(unit(rng.standard_normal((3, dim))), stamps_ns=[300, 301, 302], cameras="cam", frame_ids="map")
    rebuilt = index_for_map(loaded, "hnsw", "cpu")  # the blob covers 200 of 203 rows: stale
    assert rebuilt.ntotal == 203
    D, I = rebuilt.search(xb[:5], 1)  # noqa: E741
    assert I[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert "hnsw index built over 203 rows" in caplog.text and "no fresh stored index" in caplog.text
    with pytest.raises(IndexConfigError, match="index kind 'lsh' is unknown"):
        index_for_map(loaded, "lsh", "cpu")


def test_index_for_map_rebuilds_an_unreadable_stored_index(tmp_path: Path, rng: np.random.Generator,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    xb = unit(rng.standard_normal((50, 32)))
    kmap = _map_of(xb)
    l2 = faiss.IndexFlatL2(32)  # a faiss index, but not an inner-product one
    l2.add(xb)
    save_map(kmap, tmp_path / "m.dinomap", faiss.serialize_index(l2), INDEX_KIND_NAMES["exact"])
    caplog.set_level(logging.INFO, logger="dinomix_ros.maps.index")
    index = index_for_map(load_map(tmp_path / "m.dinomap"), "exact", "cpu")
    assert index.ntotal == 50 and "the stored index could not be read (the stored index uses metric" in caplog.text
    assert issubclass(IndexFormatError, PlaceIndexError)


def test_save_map_stores_only_a_fresh_approximate_index(tmp_path: Path, rng: np.random.Generator) -> None:
    xb = unit(rng.standard_normal((300, 32)))
    hnsw = index_for_map(_map_of(xb), "hnsw", "cpu")
    save_map_with_index(_map_of(xb), tmp_path / "a.dinomap", hnsw)
    loaded = load_map(tmp_path / "a.dinomap")
    assert loaded.index_kind == INDEX_KIND_NAMES["hnsw"]
    again = index_for_map(loaded, "hnsw", "cpu")
    np.testing.assert_array_equal(again.search(xb[:20], 5)[1], hnsw.search(xb[:20], 5)[1])
    exact = index_for_map(_map_of(xb), "exact", "cpu")
    save_map_with_index(_map_of(xb), tmp_path / "b.dinomap", exact)  # an exact index is rebuilt on load
    assert load_map(tmp_path / "b.dinomap").index_blob is None
    grown = _map_of(xb)
    grown.add(unit(rng.standard_normal((1, 32))), stamps_ns=[999], cameras="cam", frame_ids="map")
    save_map_with_index(grown, tmp_path / "c.dinomap", hnsw)  # the index misses the new row: not stored
    assert load_map(tmp_path / "c.dinomap").index_blob is None


@pytest.mark.parametrize("kwargs", EXACT_CPU + [pytest.param({"kind": "hnsw"}, id="hnsw")])
def test_similarities_never_exceed_one(kwargs, rng):
    """float16 storage (the maps' default) rounds unit vectors to norms up to about 1 + 5e-4: an image matched with
    itself scored 1.000008 before the index clamped what it returns to [-1, 1]."""
    x = unit(rng.standard_normal((4000, 256)))
    raw = np.einsum("ij,ij->i", x.astype(np.float64), x.astype(np.float16).astype(np.float64))
    over = x[raw > 1.0 + 1e-6][:50]
    assert len(over) >= 10  # the float16 copies of these score above 1 against the originals
    index = PlaceIndex(256, **kwargs)
    index.add(over.astype(np.float16))
    D, I = index.search(over, 3)  # noqa: E741
    assert D.max() <= 1.0 and np.isfinite(D).all()
    np.testing.assert_array_equal(I[:, 0], np.arange(len(over)))
    np.testing.assert_allclose(D[:, 0], 1.0, atol=1e-3)
