"""Which search index a map gets (``map.index``, ``--index``): ``auto`` by map size, and the RAM each kind needs.

``auto`` keeps exact search below :data:`AUTO_EXACT_MAX_ROWS` keyframes and uses ``ivfpq_mmap``
(:mod:`dinomix_ros.maps.mmap_index`) from there on, or the kind stored with the map when the map carries a fresh
approximate index. Before an index is built, :func:`check_fits` estimates the RAM it needs and refuses, with the
estimate and the kind to choose instead, one that does not fit in the memory available (``MemAvailable``): an exact
index of a 1M x 4096 map is a 16 GB float32 copy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dinomix_ros.maps.errors import IndexConfigError
from dinomix_ros.maps.mmap_index import KIND as MMAP_KIND
from dinomix_ros.maps.mmap_index import STORED_KIND as MMAP_STORED_KIND
from dinomix_ros.maps.mmap_index import MmapIndexParams, min_train_rows

__all__ = ["AUTO_EXACT_MAX_ROWS", "available_ram_bytes", "check_fits", "estimate_ram_bytes", "resolve_kind"]

LOG = logging.getLogger(__name__)

#: ``auto`` searches maps of fewer keyframes exactly. Measured (bench/bench_search.py --configs exact-faiss, 2-core
#: build machine, load average ~3.5, 2026-12-06): exact batch-1 search of 4096-d rows p50 17 ms at 10k keyframes,
#: 56 ms at 20k, 73 ms at 50k, 180 ms at 100k: past the 20 ms budget above ~10k, where ivfpq_mmap answers in 4-13 ms
#: (bench_scale.py, 100k-1M) with recall@1 0.98 of exact; ivfpq_mmap also needs ~10k rows to train.
AUTO_EXACT_MAX_ROWS = 10_000
#: Share of ``MemAvailable`` an index may take.
RAM_SHARE = 0.8
_GB = 1e9


def resolve_kind(requested: str, kmap: Any, stored_names: dict[str, str]) -> tuple[str, str]:
    """(kind, why) for ``requested`` ("auto" or a kind) over ``kmap``; ``stored_names`` maps kinds to stored labels."""
    if requested != "auto":
        return requested, "asked for"
    stored = kmap.index_kind
    by_label = {label: kind for kind, label in stored_names.items()}
    if stored is not None and by_label.get(stored) not in (None, "exact"):
        return by_label[stored], f"the map carries a fresh {stored} index"
    n = len(kmap)
    if n >= AUTO_EXACT_MAX_ROWS and n >= min_train_rows(MmapIndexParams()):
        return MMAP_KIND, f"{n} keyframes >= {AUTO_EXACT_MAX_ROWS}"
    return "exact", f"{n} keyframes < {AUTO_EXACT_MAX_ROWS}"


def estimate_ram_bytes(kind: str, n: int, dim: int, device: str = "cpu", params: dict[str, Any] | None = None) -> int:
    """RAM (host memory) an index of ``kind`` over ``n`` ``dim``-d rows needs at its peak, approximately."""
    params = params or {}
    if kind == "exact":
        return 0 if device == "cuda" else n * dim * 4  # faiss IndexFlatIP / torch float32 (CUDA: GPU memory)
    if kind == "hnsw":
        return n * (dim * 4 + 2 * params.get("hnsw_m", 32) * 4 + 16)
    if kind == "ivfpq":
        refine = n * dim * 4 if params.get("refine", True) else 0
        return refine + n * (params.get("pq_m", 64) + 8) + 65536 * dim * 4
    if kind == MMAP_KIND:
        p = MmapIndexParams()
        training = min(n, p.train_sample) * dim * 4 + dim * dim * 4  # the float32 sample, the PCA covariance
        return n * (p.pq_m + 2 + 8) + training
    raise IndexConfigError(f"unknown index kind {kind!r}")


def available_ram_bytes() -> int | None:
    """``MemAvailable`` of this machine (Linux), None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(kind: str, n: int, dim: int, device: str = "cpu", params: dict[str, Any] | None = None,
               limit_bytes: int | None = None) -> int:
    """Refuse an index that would not fit in RAM; returns its estimate in bytes.

    Args:
        limit_bytes: RAM the index may take; None: :data:`RAM_SHARE` of ``MemAvailable`` (no check when unknown).

    Raises:
        IndexConfigError: the estimate exceeds the limit; the message gives both and the kind to use instead.
    """
    need = estimate_ram_bytes(kind, n, dim, device, params)
    if limit_bytes is None:
        available = available_ram_bytes()
        limit_bytes = None if available is None else int(available * RAM_SHARE)
    if limit_bytes is None or need <= limit_bytes:
        return need
    alternative = estimate_ram_bytes(MMAP_KIND, n, dim)
    if kind == MMAP_KIND or alternative > limit_bytes:
        raise IndexConfigError(f"map.index {kind} needs about {need / _GB:.2f} GB of RAM for {n} keyframes of {dim}-d "
                               f"descriptors, more than the {limit_bytes / _GB:.2f} GB this machine can give it: free "
                               "memory, or split the map")
    raise IndexConfigError(
        f"map.index {kind} needs about {need / _GB:.2f} GB of RAM for {n} keyframes of {dim}-d descriptors "
        f"({'a float32 copy of every descriptor' if kind != 'hnsw' else 'float32 vectors and the graph'}), more "
        f"than the {limit_bytes / _GB:.2f} GB this machine can give it: use map.index {MMAP_KIND} (or auto), about "
        f"{alternative / _GB:.2f} GB, which re-ranks from the memory-mapped map")


def stored_label_kinds() -> dict[str, str]:
    """Stored index labels of the kinds this module adds to :data:`~dinomix_ros.maps.index.INDEX_KIND_NAMES`."""
    return {MMAP_KIND: MMAP_STORED_KIND}
