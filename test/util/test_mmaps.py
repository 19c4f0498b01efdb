"""gather_rows: the rows of a memory-mapped array, their pages requested together; the same values as indexing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dinomix_ros.util.mmaps import gather_rows


def test_gather_rows_equals_indexing_for_memory_maps_and_arrays(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.standard_normal((5000, 300)).astype(np.float16)
    path = tmp_path / "rows.npy"
    np.save(path, data)
    mapped = np.load(path, mmap_mode="r")
    assert isinstance(mapped, np.memmap) and mapped.offset > 0
    rows = np.array([4999, 3, 3, 1200, 0, 2047])  # unsorted, repeated, first and last
    np.testing.assert_array_equal(gather_rows(mapped, rows), data[rows])
    np.testing.assert_array_equal(gather_rows(data, rows), data[rows])
    np.testing.assert_array_equal(gather_rows(mapped, rows[:1]), data[rows[:1]])
    assert gather_rows(mapped, np.empty(0, np.int64)).shape == (0, 300)
