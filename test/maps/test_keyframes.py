"""Tests for dinomix_ros.maps.keyframes: the in-memory table (add() validation, accessors, lookups, subsets, the
attached index). Saving and loading are tested in test_storage.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from mapfactory import DIM, assert_same_map, fingerprint, full_map, unit

from dinomix_ros.maps.keyframes import KeyframeMap, KeyframeNotFoundError, MapError
from dinomix_ros.maps.loading import load_map
from dinomix_ros.maps.storage import save_map

# ---------------------------------------------------------------------- add() validation and accessors


def test_add_refuses_bad_input_and_changes_nothing(rng: np.random.Generator) -> None:
    m = KeyframeMap.empty(fingerprint())
    x = unit(rng, 3)
    ok = {"stamps_ns": [1, 2, 3], "cameras": "front", "frame_ids": "map"}
    cases = [
        ({"stamps_ns": [1, 2]}, r"stamps_ns has shape \(2,\), expected \(3,\)"),
        ({"stamps_ns": [1.5, 2.0, 3.0]}, "stamps_ns must be integers, got dtype float64: float seconds"),
        ({"stamps_ns": [-1, 2, 3]}, "row 0 of this add\\(\\): stamps_ns -1 is negative"),
        ({"cameras": ["a", "b"]}, "cameras has 2 entries, expected 3"),
        ({"cameras": ["a", "", "c"]}, "row 1 of this add\\(\\): cameras is empty"),
        ({"frame_ids": ["map", 3, "map"]}, r"frame_ids\[1\] is a int"),
        ({"sources": ["ok", "two\nlines", ""]}, "control character"),
        ({"positions": np.zeros((2, 3))}, r"positions has shape \(2, 3\), expected \(3, 3\)"),
        ({"positions": [[0, 0, 0], [1, np.nan, 1], [0, 0, 0]]}, "row 1 .*positions .* is partly NaN"),
        ({"positions": [[0, 0, 0], [1, np.inf, 1], [0, 0, 0]]}, "positions contains inf"),
        ({"orientations": [[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 1]]}, "expected a unit quaternion"),
        ({"gps": [[55.0, np.nan, 1.0]] * 3}, "mixes known and unknown"),
        ({"gps": [[95.0, 13.0, 1.0]] * 3}, "outside lat"),
        ({"utm": np.zeros((3, 2))}, "must be given together"),
        ({"utm_zones": 33, "utm_bands": "", "utm": np.ones((3, 2))}, "are inconsistent"),
        ({"utm_zones": 61, "utm_bands": "U", "utm": np.ones((3, 2))}, r"must be in 1\.\.60"),
    ]
    for change, match in cases:
        with pytest.raises(MapError, match=match):
            m.add(x, **{**ok, **change})
    with pytest.raises(MapError, match=r"L2 norm 2, expected 1"):
        m.add(x * 2, **ok)
    y = x.copy()
    y[2, 5] = np.nan
    with pytest.raises(MapError, match="descriptor row 2 contains NaN"):
        m.add(y, **ok)
    with pytest.raises(MapError, match=r"expected \(N, 64\)"):
        m.add(unit(rng, 3, 32), **ok)
    with pytest.raises(MapError, match="must be a float array"):
        m.add(np.ones((3, DIM), dtype=np.int64), **ok)
    assert len(m) == 0 and m.next_id == 0
    assert m.add(x.astype(np.float16), **ok).tolist() == [0, 1, 2]  # fp16 input within tolerance
    assert m.add(x[0], stamps_ns=9, cameras="front", frame_ids="map").tolist() == [3]  # one (D,) keyframe


def test_empty_refuses_bad_fingerprints() -> None:
    with pytest.raises(MapError, match=r"fingerprint\['weights_sha256'\] is None"):
        KeyframeMap.empty({**fingerprint(), "weights_sha256": None})
    with pytest.raises(MapError, match=r"descriptor_dim=128 but fingerprint\['descriptor_dim'\]=64"):
        KeyframeMap.empty(fingerprint(), descriptor_dim=128)
    with pytest.raises(MapError, match="storage_dtype 'float64' is not supported"):
        KeyframeMap.empty(fingerprint(), storage_dtype="float64")
    with pytest.raises(MapError, match="metadata is not plain JSON"):
        KeyframeMap.empty(fingerprint(), metadata={"threshold": float("nan")})


def test_lookup_subset_and_read_only_columns(tmp_path: Path, rng: np.random.Generator) -> None:
    m, _ = full_map(rng)
    assert m.row_of_id(5) == 5
    sub = m.subset(m.cameras == "front")
    assert sub.ids.tolist() == [0, 3, 6, 9]
    assert sub.row_of_id(9) == 3 and sub.keyframe(3).id == 9
    assert np.array_equal(sub.descriptors, m.descriptors[[0, 3, 6, 9]])
    with pytest.raises(KeyframeNotFoundError, match=r"keyframe id 4 is not in this map \(4 keyframes, ids 0\.\.9\)"):
        sub.row_of_id(4)
    assert m.subset([-1, 2]).ids.tolist() == [2, 11]
    m.add(unit(rng, 2), stamps_ns=[1, 2], cameras="front", frame_ids="map")  # a second in-memory chunk
    pick, kf = m.subset([1, 12, 13]), m.keyframe(13)  # before .descriptors merges the two chunks
    assert np.array_equal(pick.descriptors, np.asarray(m.descriptors)[[1, 12, 13]])
    assert np.array_equal(kf.descriptor, np.asarray(m.descriptors)[13])
    with pytest.raises(MapError, match="duplicates"):
        m.subset([1, 1])
    with pytest.raises(IndexError, match="row 14 out of range"):
        m.subset([14])
    assert sub.add(unit(rng, 1), stamps_ns=[1], cameras="f", frame_ids="map").tolist() == [12]  # next_id when subset
    with pytest.raises(ValueError, match="read-only"):
        m.positions[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        m.descriptors[0, 0] = 1.0
    with pytest.raises(IndexError, match="row 14 out of range"):
        m.keyframe(14)
    save_map(sub, tmp_path / "s")
    assert_same_map(sub, load_map(tmp_path / "s", mmap=False))


def test_set_index_refuses_bad_blobs_and_kinds_and_goes_stale_on_add(rng: np.random.Generator) -> None:
    m, _ = full_map(rng)
    bad_blobs = [(np.zeros(3, dtype=np.float32), r"got float32 array of shape \(3,\)"), ("text", "got str"),
                 (np.zeros((2, 2), dtype=np.uint8), r"got uint8 array of shape \(2, 2\)")]
    for blob, match in bad_blobs:
        with pytest.raises(MapError, match=r"index_blob must be bytes or a 1-D uint8 array .*" + match):
            m.set_index(blob, "faiss_flat_ip")
    for kind in ["", "two\nlines", 7, "x" * 129]:
        with pytest.raises(MapError, match="index_kind must be a short printable name"):
            m.set_index(b"blob", kind)
    assert m.index_blob is None and m.index_kind is None
    source = np.arange(4, dtype=np.uint8)
    m.set_index(source, "faiss_test")
    source[0] = 9  # the map keeps its own copy
    assert m.index_blob.tolist() == [0, 1, 2, 3] and m.index_kind == "faiss_test"
    with pytest.raises(ValueError, match="read-only"):
        m.index_blob[0] = 1
    m.add(unit(rng, 1), stamps_ns=[1], cameras="front", frame_ids="map")
    assert m.index_blob is None and m.index_kind is None  # built for fewer rows than the map now has: stale


def test_the_table_imports_none_of_its_storage() -> None:
    """KeyframeMap is the in-memory table: loading and saving are functions over it (no import cycle, not even one
    hidden in a function)."""
    import dinomix_ros.maps.keyframes as keyframes

    imported = set()
    for node in ast.walk(ast.parse(Path(keyframes.__file__).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    storage_modules = {f"dinomix_ros.maps.{m}" for m in ("storage", "loading", "manifest", "keyframe_csv")}
    assert not imported & storage_modules
    assert not hasattr(KeyframeMap, "save") and not hasattr(KeyframeMap, "load")
