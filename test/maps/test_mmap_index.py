"""ivfpq_mmap: recall against exact search on clustered data, stored with the map, appended to, gated exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scalefactory import SCALE_DIM, city_map

from dinomix_ros.maps.errors import IndexConfigError, IndexFormatError
from dinomix_ros.maps.index import index_for_map, save_map_with_index
from dinomix_ros.maps.index_choice import check_fits
from dinomix_ros.maps.loading import load_map
from dinomix_ros.maps.mmap_index import MmapIndex, MmapIndexParams

#: Small structure for 256-d test descriptors (the defaults are for 4096-d DINO-Mix ones).
PARAMS = MmapIndexParams(pca_dim=64, pq_m=16, nprobe=32, shortlist=64)


@pytest.fixture(scope="module")
def city50k() -> tuple:
    """50k clustered keyframes, their ivfpq_mmap index and the exact index (built once for the module)."""
    kmap, queries = city_map(50_000)
    return kmap, queries, index_for_map(kmap, "ivfpq_mmap", mmap_params=PARAMS), index_for_map(kmap, "exact")


def test_recall_against_exact_on_clustered_data_at_50k(city50k: tuple) -> None:
    kmap, queries, approx, exact = city50k
    De, Ie = exact.search(queries, 5)
    Da, Ia = approx.search(queries, 5)
    recall1 = np.mean(Ia[:, 0] == Ie[:, 0])
    recall5 = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(Ia, Ie)])
    assert recall1 >= 0.98, recall1
    assert recall5 >= 0.95, recall5
    same = Ia[:, 0] == Ie[:, 0]  # re-ranked from the stored float16 rows: the exact index's scores
    np.testing.assert_allclose(Da[same, 0], De[same, 0], atol=1e-5)
    assert (np.diff(Da, axis=1) <= 0).all() and (Da <= 1.0).all()
    d = approx.describe()
    assert d["kind"] == "ivfpq_mmap" and d["ntotal"] == len(kmap) and d["trained_on"] == len(kmap)
    # RAM: codes + ids + quantizers, far below a float32 copy of the map (50k x 256 x 4 = 51 MB)
    assert approx.ram_bytes() < 0.2 * len(kmap) * SCALE_DIM * 4


def test_a_tight_gate_finds_its_true_best(city50k: tuple) -> None:
    """A gate far from every good match: the approximate short list holds none of its rows, exact search over the
    gate still finds the best allowed one (exhaustive below exact_max allowed rows)."""
    kmap, queries, approx, exact = city50k
    q = queries[0]
    _, best = exact.search(q, 1)
    far = np.ones(len(kmap), dtype=bool)
    far[max(0, best[0, 0] - 20000):best[0, 0] + 20000] = False  # the whole neighbourhood of the best is excluded
    gate = np.zeros(len(kmap), dtype=bool)
    gate[np.flatnonzero(far)[:3000]] = True
    De, Ie = exact.search(q, 5, allowed=gate)
    Da, Ia = approx.search(q, 5, allowed=gate)
    np.testing.assert_array_equal(Ia, Ie)
    np.testing.assert_allclose(Da, De, atol=1e-5)
    wide = np.zeros(len(kmap), dtype=bool)
    wide[::3] = True  # 16667 rows allowed: filtered inside the inverted lists, more lists visited
    De, Ie = exact.search(queries[:50], 5, allowed=wide)
    Da, Ia = approx.search(queries[:50], 5, allowed=wide)
    assert wide[Ia[Ia >= 0]].all()
    assert np.mean(Ia[:, 0] == Ie[:, 0]) >= 0.95
    none = np.zeros(len(kmap), dtype=bool)
    D, I = approx.search(q, 3, allowed=none)
    assert (I == -1).all() and np.isneginf(D).all()


def test_stored_with_the_map_reloaded_and_appended(tmp_path: Path) -> None:
    kmap, queries = city_map(12_000, seed=1)
    index = index_for_map(kmap, "ivfpq_mmap", mmap_params=PARAMS)
    path = save_map_with_index(kmap, tmp_path / "m.dinomap", index)
    loaded = load_map(path)
    again = index_for_map(loaded, "auto", mmap_params=PARAMS)  # the stored one, not retrained
    assert isinstance(again, MmapIndex) and again.trained_on is None
    np.testing.assert_array_equal(again.search(queries, 5)[1], index.search(queries, 5)[1])
    # recording: new rows go into the trained lists and are found at once
    new = queries[:3]
    loaded.add(new, stamps_ns=[10**12] * 3, cameras="front", frame_ids="map")
    again.add(new)
    assert again.search(new, 1)[1][:, 0].tolist() == [12_000, 12_001, 12_002]
    save_map_with_index(loaded, path, again)
    index_rec = json.loads((path / "manifest.json").read_text())["files"]["index"]
    assert [c["rows"] for c in index_rec["codes"]] == [12_000, 3]  # appended, the first code chunk kept
    third = index_for_map(load_map(path), "ivfpq_mmap", mmap_params=PARAMS)
    assert third.ntotal == 12_003
    np.testing.assert_array_equal(third.search(queries, 5)[1], again.search(queries, 5)[1])


def test_damaged_codes_and_blobs_are_refused_and_rebuilt(tmp_path: Path) -> None:
    kmap, queries = city_map(12_000, seed=2)
    index = index_for_map(kmap, "ivfpq_mmap", mmap_params=PARAMS)
    blob, codes = index.stored()
    bad = codes[0].copy()
    bad[5, :2] = 0xFF  # a list number (1 or 2 bytes) beyond the index's lists
    fresh, _ = city_map(12_000, seed=2)
    fresh.set_index(blob, "faiss_ivfpq_mmap", codes=[bad])
    with pytest.raises(IndexFormatError, match=r"codes name inverted list \d+, the index has \d+"):
        MmapIndex.from_stored(fresh, PARAMS)
    fresh.set_index(blob, "faiss_ivfpq_mmap", codes=[codes[0][:, :-1]])
    with pytest.raises(IndexFormatError, match="bytes wide"):
        MmapIndex.from_stored(fresh, PARAMS)
    fresh.set_index(np.zeros(100, np.uint8), "faiss_ivfpq_mmap", codes=codes)
    with pytest.raises(IndexFormatError):
        MmapIndex.from_stored(fresh, PARAMS)
    rebuilt = index_for_map(fresh, "ivfpq_mmap", mmap_params=PARAMS)  # unreadable stored index: trained again
    assert rebuilt.ntotal == 12_000 and rebuilt.trained_on == 12_000


def test_too_small_for_ivfpq_mmap_is_exact_and_auto_picks_by_size(tmp_path: Path) -> None:
    small, _ = city_map(2_000, seed=3)
    assert index_for_map(small, "ivfpq_mmap").kind == "exact"
    with pytest.raises(IndexConfigError, match="needs at least"):
        MmapIndex.train(small, PARAMS)
    assert index_for_map(small, "auto").kind == "exact"
    big, _ = city_map(20_000, seed=3)
    index = index_for_map(big, "auto", mmap_params=PARAMS)
    assert index.kind == "ivfpq_mmap"  # AUTO_EXACT_MAX_ROWS keyframes and more
    save_map_with_index(big, tmp_path / "b.dinomap", index)
    loaded = load_map(tmp_path / "b.dinomap")
    assert loaded.index_kind == "faiss_ivfpq_mmap" and index_for_map(loaded, "auto").trained_on is None  # stored


def test_an_index_that_does_not_fit_in_ram_is_refused_with_the_estimate_and_the_alternative() -> None:
    # the estimate before anything is built: 1M x 4096 float32 is 16.4 GB; ivfpq_mmap's peak is its training sample
    with pytest.raises(IndexConfigError, match=r"map.index exact needs about 16\.38 GB of RAM for 1000000 keyframes of "
                                               r"4096-d .* more than the 8\.00 GB .* use map.index ivfpq_mmap \(or "
                                               r"auto\), about 1\.2\d GB"):
        check_fits("exact", 1_000_000, 4096, limit_bytes=8 * 10**9)
    assert check_fits("ivfpq_mmap", 1_000_000, 4096, limit_bytes=8 * 10**9) < 1.3e9
    kmap, _ = city_map(12_000, seed=4)
    with pytest.raises(IndexConfigError, match="map.index exact needs about 0.01 GB of RAM for 12000 keyframes"):
        index_for_map(kmap, "exact", "cpu", memory_limit_bytes=5_000_000)
    with pytest.raises(IndexConfigError, match="hnsw needs about"):
        index_for_map(kmap, "hnsw", "cpu", memory_limit_bytes=5_000_000)
    assert index_for_map(kmap, "exact", "cpu", memory_limit_bytes=10**9).ntotal == 12_000


def test_rows_unlike_the_training_sample_are_searched_exactly(tmp_path: Path) -> None:
    """Rows the PCA keeps little of (foreign descriptors recorded into a trained index) go to an exact side list:
    their queries still find them, also after a save and load."""
    kmap, queries = city_map(12_000, seed=8)
    index = index_for_map(kmap, "ivfpq_mmap", mmap_params=PARAMS)
    foreign = np.random.default_rng(9).standard_normal((30, SCALE_DIM)).astype(np.float32)
    foreign /= np.linalg.norm(foreign, axis=1, keepdims=True)  # isotropic: 64 of 256 dimensions keep ~25 %
    kmap.add(foreign, stamps_ns=[10**12] * 30, cameras="indoor", frame_ids="map")
    index.add(foreign)
    assert index.describe()["exact_side_list"] == 30
    near = foreign + 0.05 * np.random.default_rng(10).standard_normal(foreign.shape).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    assert index.search(near, 1)[1][:, 0].tolist() == list(range(12_000, 12_030))
    gate = np.zeros(len(kmap), dtype=bool)
    gate[::2] = True  # a wide gate (6015 rows > exact_max is not needed: the side list is masked too)
    assert all(gate[r] or r < 0 for r in index.search(near, 3, allowed=gate)[1].ravel())
    path = save_map_with_index(kmap, tmp_path / "m.dinomap", index)
    again = index_for_map(load_map(path), "auto", mmap_params=PARAMS)
    assert again.describe()["exact_side_list"] == 30
    assert again.search(near, 1)[1][:, 0].tolist() == list(range(12_000, 12_030))
