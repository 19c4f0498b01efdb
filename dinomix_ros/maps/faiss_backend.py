"""The faiss CPU indexes behind :class:`~dinomix_ros.maps.index.PlaceIndex` (``backend="faiss"``).

* ``"exact"``: ``faiss.IndexFlatIP``.
* ``"hnsw"``: ``faiss.IndexHNSWFlat`` (inner product).
* ``"ivfpq"``: ``faiss.IndexIVFPQ`` on an ``IndexFlatIP`` coarse quantizer, by default wrapped in
  ``faiss.IndexRefineFlat`` so that returned scores are exact inner products. Until it is trained the rows are kept in
  an exact ``IndexFlatIP`` buffer (see :class:`~dinomix_ros.maps.index.PlaceIndex` for when training happens).

Masks: hnsw and ivfpq get an ``IDSelectorBitmap`` in their ``SearchParameters`` (both honour selectors in faiss 1.15;
``IndexRefineSearchParameters`` ignores a selector of its own, so it goes into ``base_index_params``). Flat storage is
searched with a masked torch matmul instead (:func:`~dinomix_ros.maps.torch_backend.matmul_topk`): IndexFlat honours
selectors only on its non-BLAS path, ~9x slower for query batches.

:func:`read_faiss_index` reads a stored faiss index back, with the PlaceIndex kind and parameters it was built with.

:class:`FaissBackend` trusts its inputs: PlaceIndex validates descriptors, queries, masks and training sets, clamps
``k`` to the number of rows and holds the lock around every call.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from dinomix_ros.maps.errors import IndexFormatError
from dinomix_ros.maps.torch_backend import matmul_topk

__all__ = ["PQ_NBITS", "MIN_POINTS_PER_CENTROID", "FaissBackend", "read_faiss_index", "read_trusted_blob"]

LOG = logging.getLogger(__name__)

PQ_NBITS = 8  # 256 centroids per sub-quantizer: one byte per sub-vector
MIN_POINTS_PER_CENTROID = 39  # below this faiss's k-means warns that the clustering is unreliable
MAX_NLIST = 65536
MIN_REFINE_CANDIDATES = 32  # IndexRefineFlat re-ranks at least this many IVF-PQ candidates, whatever k is


class FaissBackend:
    """One faiss CPU index of kind ``"exact"``, ``"hnsw"`` or ``"ivfpq"``.

    Args:
        dim: Descriptor dimension.
        kind: ``"exact"``, ``"hnsw"`` or ``"ivfpq"``.
        params: The PlaceIndex parameters of that kind (``hnsw_m``, ``ivf_nlist``, ``pq_m``, ``filter_exact_max``,
            ...). Read when building and searching; ivfpq training records ``trained_nlist`` and ``trained_on`` in
            it, so that the owner's ``describe()`` reports them.
    """

    def __init__(self, dim: int, kind: str, params: dict[str, Any]) -> None:
        self.dim = dim
        self.kind = kind
        self.params = params
        self.index: Any = None  # the faiss index; None while an ivfpq index is untrained
        self.pending: Any = None  # ivfpq before training: exact IndexFlatIP buffer
        self._warned_pending = False
        if kind == "exact":
            self.index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = params["hnsw_ef_construction"]
            self.index.hnsw.efSearch = params["hnsw_ef_search"]
        else:
            self.pending = faiss.IndexFlatIP(dim)

    @property
    def ntotal(self) -> int:
        """Number of rows held (buffered ones included)."""
        return int((self.pending if self.pending is not None else self.index).ntotal)

    @property
    def is_trained(self) -> bool:
        """False only for an ivfpq index still buffering rows in its exact IndexFlatIP."""
        return self.pending is None

    @property
    def storage(self) -> str:
        """The faiss type that holds the rows, for diagnostics."""
        if self.pending is not None:
            return "IndexFlatIP (ivfpq not trained yet)"
        return type(self.index).__name__

    def min_train(self) -> int:
        """Rows ivfpq training needs: 39 per coarse centroid and per PQ centroid (256)."""
        return MIN_POINTS_PER_CENTROID * max(self.params["ivf_nlist"] or 0, 2 ** PQ_NBITS)

    def faiss_index(self) -> Any:
        """The faiss index that holds the rows (the exact buffer of an untrained ivfpq index), to serialise."""
        return self.pending if self.pending is not None else self.index

    # ------------------------------------------------------------------ add and train

    def add(self, xb: np.ndarray) -> None:
        """Append (n, dim) float32 rows; an untrained ivfpq index buffers them, or trains once it holds enough."""
        if self.pending is None:
            self.index.add(xb)
            return
        n = int(self.pending.ntotal) + xb.shape[0]
        need = self.min_train()
        if n < need:
            self.pending.add(xb)
            if not self._warned_pending:
                LOG.warning("ivfpq index holds %d < %d vectors needed to train (39 per centroid); searching exactly "
                            "until then", n, need)
                self._warned_pending = True
            return
        if self.pending.ntotal:
            xt = np.concatenate([self.pending.reconstruct_n(0, self.pending.ntotal), xb])
        else:
            xt = xb
        index = self._build_ivfpq(xt)
        index.add(xt)
        self.index, self.pending = index, None

    def train(self, xt: np.ndarray) -> None:
        """Train an untrained ivfpq index on (n >= min_train(), dim) float32 rows, then encode the buffered rows."""
        index = self._build_ivfpq(xt)
        if self.pending.ntotal:
            index.add(self.pending.reconstruct_n(0, self.pending.ntotal))
        self.index, self.pending = index, None

    def _build_ivfpq(self, xt: np.ndarray) -> Any:
        n = xt.shape[0]
        nlist = self.params["ivf_nlist"]
        if nlist is None:
            nlist = max(1, min(int(round(4 * math.sqrt(n))), n // MIN_POINTS_PER_CENTROID, MAX_NLIST))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFPQ(quantizer, self.dim, nlist, self.params["pq_m"], PQ_NBITS, faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = self.params["ivf_nprobe"]
        LOG.info("training ivfpq: n=%d dim=%d nlist=%d pq_m=%d", n, self.dim, nlist, self.params["pq_m"])
        ivf.train(xt)
        self.params["trained_nlist"] = nlist
        self.params["trained_on"] = n
        if self.params["refine"]:
            index = faiss.IndexRefineFlat(ivf)
            index.k_factor = self.params["refine_k_factor"]
            return index
        return ivf

    def adopt(self, index: Any) -> None:
        """Hold a deserialised faiss index of this kind, with this backend's search-time parameters."""
        self.index, self.pending = index, None
        if self.kind == "hnsw":
            index.hnsw.efSearch = self.params["hnsw_ef_search"]
        elif self.kind == "ivfpq":
            ivf = faiss.downcast_index(index.base_index) if self.params["refine"] else index
            ivf.nprobe = self.params["ivf_nprobe"]
            self.params["trained_nlist"] = int(ivf.nlist)
            if self.params["refine"]:
                index.k_factor = self.params["refine_k_factor"]

    # ------------------------------------------------------------------ search

    def search(self, xq: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows for (nq, dim) float32 queries, 1 <= k <= ntotal, among those a (ntotal,) or (nq, ntotal) mask
        allows (None: all); padding has score ``-inf``."""
        if mask is not None and (self.pending is not None or self.kind == "exact"):
            return self._search_flat_masked(xq, k, mask)
        if mask is None or mask.ndim == 1:
            return self._search_selector(xq, k, mask)
        return self._search_per_query(xq, k, mask)

    def _search_flat_masked(self, xq: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # IndexFlat's selector path is not BLAS (~9x slower on a 256-query batch in faiss 1.15): do the masked scan as
        # a blocked matmul on a zero-copy view of the faiss storage. Safe under the owner's lock (no add can
        # reallocate it).
        flat = self.faiss_index()
        xb = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
        return matmul_topk(torch.from_numpy(xb), xq, k, mask)

    def _search_per_query(self, xq: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # faiss takes one selector per call: group the queries that share a mask (often all of them, or few groups).
        packed = np.packbits(mask, axis=1, bitorder="little")
        uniq, inverse = np.unique(packed, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        D = np.empty((xq.shape[0], k), dtype=np.float32)
        I = np.empty((xq.shape[0], k), dtype=np.int64)  # noqa: E741
        for g in range(uniq.shape[0]):
            rows = np.flatnonzero(inverse == g)
            D[rows], I[rows] = self._search_selector(xq[rows], k, mask[rows[0]])
        return D, I

    def _search_selector(self, xq: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        ntotal = self.ntotal
        n_allowed = ntotal if mask is None else int(np.count_nonzero(mask))
        if n_allowed == 0:
            return np.full((xq.shape[0], k), -np.inf, np.float32), np.full((xq.shape[0], k), -1, np.int64)
        bitmap = None
        if n_allowed < ntotal:
            bitmap = np.packbits(mask, bitorder="little")  # bit i of byte i >> 3 is row i, as IDSelectorBitmap reads
        sel = None if bitmap is None else faiss.IDSelectorBitmap(bitmap)
        restrictive = sel is not None and n_allowed <= self.params.get("filter_exact_max", 0)
        index, params = self._target(k, sel, restrictive)
        D, I = index.search(xq, k, params=params)  # noqa: E741
        del bitmap  # the selector reads the bitmap during search: keep it alive until here
        return D, I

    def _target(self, k: int, sel: Any, restrictive: bool) -> tuple[Any, Any]:
        """The faiss index to search and its SearchParameters for one selector (None: no filter).

        A restrictive selector (at most ``filter_exact_max`` rows) is searched exhaustively: graph and inverted-list
        traversal lose recall when few rows qualify.
        """
        if self.pending is not None or self.kind == "exact":
            return self.faiss_index(), None if sel is None else faiss.SearchParameters(sel=sel)
        if self.kind == "hnsw":
            if restrictive:  # exhaustive over the allowed rows of the flat storage (exact inner products)
                return faiss.downcast_index(self.index.storage), faiss.SearchParameters(sel=sel)
            ef = max(self.params["hnsw_ef_search"], k)
            return self.index, faiss.SearchParametersHNSW(efSearch=ef, sel=sel)
        # ivfpq
        if self.params["refine"]:
            if restrictive:
                return faiss.downcast_index(self.index.refine_index), faiss.SearchParameters(sel=sel)
            ivf_params = faiss.SearchParametersIVF(nprobe=self.params["ivf_nprobe"], sel=sel)
            k_factor = max(self.params["refine_k_factor"], MIN_REFINE_CANDIDATES / k)
            # IndexRefine ignores a selector passed to IndexRefineSearchParameters itself: it must filter the base.
            return self.index, faiss.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=ivf_params)
        nprobe = self.index.nlist if restrictive else self.params["ivf_nprobe"]
        return self.index, faiss.SearchParametersIVF(nprobe=nprobe, sel=sel)


# ---------------------------------------------------------------------- stored indexes


def read_faiss_index(buf: np.ndarray | bytes) -> tuple[Any, str, dict[str, Any]]:
    """Deserialise a faiss inner-product index and read its PlaceIndex kind and constructor parameters.

    Args:
        buf: uint8 array or bytes from ``faiss.serialize_index`` (or ``PlaceIndex.to_bytes()``).

    Returns:
        ``(index, kind, params)``: the faiss index, ``"exact"``, ``"hnsw"`` or ``"ivfpq"``, and the structure and
        search parameters stored in the file (``hnsw_m``, ``ivf_nlist``, ``ivf_nprobe``, ``refine_k_factor``, ...).

    Raises:
        IndexFormatError: When ``buf`` is not a faiss index, or one of an unsupported type or metric.
    """
    index = read_trusted_blob(buf)
    kind, params = _kind_and_params(index)
    return index, kind, params


def read_trusted_blob(buf: np.ndarray | bytes) -> Any:
    """Deserialise a faiss inner-product index from untrusted bytes (a map file), guarded.

    The bytes are first read in a forked child whose address space is capped (:func:`_deserializes_within_memory`):
    a blob declaring far more memory than its size, or crashing faiss's reader, is refused without touching this
    process. Then faiss reads it here.

    Raises:
        IndexFormatError: not a faiss index, one that asks for far more memory than its size, or not inner product.
    """
    if isinstance(buf, (bytes, bytearray, memoryview)):
        buf = np.frombuffer(buf, dtype=np.uint8)
    buf = np.ascontiguousarray(buf)
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise IndexFormatError(f"buf must be a 1-D uint8 array or bytes, found {buf.dtype} {buf.shape}.")
    if not _deserializes_within_memory(buf):
        raise IndexFormatError(
            f"the {buf.size}-byte faiss index asks for far more memory than its size when read (a damaged or crafted "
            "file): refused; rebuild the index from the map's descriptors"
        )
    try:
        index = faiss.deserialize_index(buf)
    except RuntimeError as e:
        raise IndexFormatError(
            f"could not read a faiss index from {buf.size} bytes ({str(e).splitlines()[0]}). Pass the output of "
            "PlaceIndex.to_bytes() or the content of a faiss index file."
        ) from e
    # deserialize_index already returns the concrete type. (Do not downcast_index() it again: rebinding the only
    # owning proxy would free the index.)
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexFormatError(
            f"the stored index uses metric {index.metric_type}, expected METRIC_INNER_PRODUCT "
            f"({faiss.METRIC_INNER_PRODUCT}): rebuild it with PlaceIndex."
        )
    return index


def _deserializes_within_memory(buf: np.ndarray, timeout_s: float = 120.0) -> bool:
    """Whether faiss can read ``buf`` without allocating much more than its size: tried first in a forked child
    whose address space is capped at its current size + 2 x the blob + 256 MiB.

    faiss trusts the sizes written in the file: a blob of a few KB can declare gigabytes of codes, and reading it
    in the node would allocate them (and get the node killed). Where fork or the cap is not available (not Linux),
    the check is skipped.
    """
    if not hasattr(os, "fork") or not Path("/proc/self/status").is_file():
        return True
    vm_size = next((int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmSize:")), 0)
    cap = vm_size + 2 * buf.nbytes + (256 << 20)
    with warnings.catch_warnings():  # the child only reads the blob and exits: no lock of another thread is needed
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: 0 read, 2 not a faiss index (the caller reports it), 3 out of memory
        code = 3
        try:
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            faiss.deserialize_index(buf)
            code = 0
        except RuntimeError as exc:
            code = 3 if "alloc" in str(exc) or "memory" in str(exc).lower() else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) in (0, 2)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return False
        time.sleep(0.01)


def _kind_and_params(index: Any) -> tuple[str, dict[str, Any]]:
    """Kind and PlaceIndex constructor parameters of a deserialised faiss index."""
    if isinstance(index, faiss.IndexHNSWFlat):
        hnsw = index.hnsw
        return "hnsw", {"hnsw_m": int(hnsw.nb_neighbors(1)), "hnsw_ef_construction": int(hnsw.efConstruction),
                        "hnsw_ef_search": int(hnsw.efSearch)}
    if isinstance(index, faiss.IndexRefineFlat):
        base = faiss.downcast_index(index.base_index)
        if isinstance(base, faiss.IndexIVFPQ):
            _, params = _kind_and_params(base)
            params.update(refine=True, refine_k_factor=float(index.k_factor))
            return "ivfpq", params
    elif isinstance(index, faiss.IndexIVFPQ):
        if index.pq.nbits != PQ_NBITS:
            raise IndexFormatError(f"the stored IndexIVFPQ uses {index.pq.nbits}-bit codes, expected {PQ_NBITS}.")
        return "ivfpq", {"ivf_nlist": int(index.nlist), "pq_m": int(index.pq.M), "ivf_nprobe": int(index.nprobe),
                         "refine": False}
    elif isinstance(index, faiss.IndexFlat):
        return "exact", {}
    raise IndexFormatError(
        f"unsupported faiss index type {type(index).__name__}: PlaceIndex loads IndexFlatIP, IndexHNSWFlat, "
        "IndexIVFPQ and IndexRefineFlat(IndexIVFPQ). Rebuild the index from the map's descriptors."
    )
