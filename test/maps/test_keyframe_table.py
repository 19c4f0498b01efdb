"""The binary keyframe table: the same columns as the CSV, checked with the CSV's rules, and refused when damaged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from mapfactory import assert_same_map, full_map

import dinomix_ros.maps.loading as loading
from dinomix_ros.maps.errors import MapFormatError
from dinomix_ros.maps.keyframe_table import TABLE_DTYPE
from dinomix_ros.maps.loading import load_map
from dinomix_ros.maps.manifest import manifest_bytes
from dinomix_ros.maps.storage import save_map


@pytest.fixture
def table_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load the binary table from the first keyframe on (by default from 50000: larger maps than tests make)."""
    monkeypatch.setattr(loading, "TABLE_MIN_ROWS", 0)


def _rewrite(path: Path, key: str, data: bytes) -> None:
    """Replace a file the manifest lists and reseal the manifest (what a deliberate edit does)."""
    man = json.loads((path / "manifest.json").read_text())
    rec = man["files"][key]
    (path / rec["file"]).write_bytes(data)
    rec["bytes"], rec["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (path / "manifest.json").write_bytes(manifest_bytes(man))


def _npy(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_the_table_loads_the_same_map_as_the_csv(tmp_path: Path, rng: np.random.Generator, table_loads) -> None:
    kmap, _ = full_map(rng, 30)  # unknowns, unicode cameras, quoted sources, -0.0 and subnormal floats
    path = save_map(kmap, tmp_path / "m.dinomap")
    man = json.loads((path / "manifest.json").read_text())
    assert man["files"]["table"]["rows"] == man["files"]["sources"]["rows"] == 30
    from_table = load_map(path)
    assert_same_map(kmap, from_table)
    loading.TABLE_MIN_ROWS = 10**9  # the CSV, as for small maps
    assert_same_map(from_table, load_map(path))


@pytest.mark.parametrize("damage, message", [
    (lambda rec: rec.__setitem__("camera", 7), r"a camera index is 7, the manifest lists 3 cameras"),
    (lambda rec: rec["utm_band"].__setitem__(0, ord("?")), r"a UTM band byte is 63"),
    (lambda rec: rec["id"].__setitem__(3, 1), r"ids must be >= 0 and strictly increasing"),
    (lambda rec: rec["orientation"].__setitem__(2, [0.0, 0.0, 0.0, 2.0]), r"row 2: orientation .* has norm 2"),
    (lambda rec: rec["gps"].__setitem__(1, [95.0, 13.0, 0.0]), r"row 1: gps .* is outside lat"),
])
def test_a_damaged_table_is_refused(tmp_path: Path, rng: np.random.Generator, table_loads, damage, message) -> None:
    kmap, _ = full_map(rng, 12)
    path = save_map(kmap, tmp_path / "m.dinomap")
    man = json.loads((path / "manifest.json").read_text())
    records = np.load(path / man["files"]["table"]["file"])
    damage(records)
    _rewrite(path, "table", _npy(records))
    with pytest.raises(MapFormatError, match=message):
        load_map(path)


def test_table_of_another_shape_or_sources_of_another_length_are_refused(
    tmp_path: Path, rng: np.random.Generator, table_loads
) -> None:
    kmap, _ = full_map(rng, 12)
    path = save_map(kmap, tmp_path / "m.dinomap")
    man = json.loads((path / "manifest.json").read_text())
    table = (path / man["files"]["table"]["file"]).read_bytes()
    _rewrite(path, "table", _npy(np.zeros(11, dtype=TABLE_DTYPE)))
    with pytest.raises(MapFormatError, match=r"holds .* \(11,\), expected the keyframe table \(12,\)"):
        load_map(path)
    _rewrite(path, "table", table)
    _rewrite(path, "sources", b"only one line\n")
    with pytest.raises(MapFormatError, match="holds 1 lines, expected 12"):
        load_map(path)
    _rewrite(path, "sources", b"\xff\n" * 12)
    with pytest.raises(MapFormatError, match="is not UTF-8"):
        load_map(path)


def test_a_csv_that_disagrees_with_the_table_is_refused_by_the_content_check(
    tmp_path: Path, rng: np.random.Generator, table_loads
) -> None:
    kmap, _ = full_map(rng, 12)
    path = save_map(kmap, tmp_path / "m.dinomap")
    man = json.loads((path / "manifest.json").read_text())
    lines = (path / man["files"]["keyframes"]["file"]).read_text(encoding="utf-8").split("\n")
    cells = lines[5].split(",")
    cells[4] = repr(float(cells[4]) + 1.0)  # x of row 3, still a valid number
    lines[5] = ",".join(cells)
    _rewrite(path, "keyframes", "\n".join(lines).encode("utf-8"))
    with pytest.raises(MapFormatError, match=r"line 6 and table\.g000001\.npy row 4 disagree on positions"):
        load_map(path)
    deferred = load_map(path, verify="deferred")  # the table loads; the check finds the disagreement
    with pytest.raises(MapFormatError, match="disagree on positions"):
        deferred.integrity.run()
