"""Top-K inner-product search over a keyframe map's descriptors, plus the masks that filter it.

DINO-Mix descriptors are L2-normalised, so cosine similarity is the inner product and larger is better. Results follow
faiss: ``D`` (nq, k) float32 similarities, descending, and ``I`` (nq, k) int64 row numbers (insertion order, i.e. the
row of the keyframe in the map's arrays), padded with ``-inf`` / ``-1`` where fewer than ``k`` rows qualify.

Index kinds (:class:`PlaceIndex`):

* ``"exact"``: brute force. On CPU a ``faiss.IndexFlatIP``. On CUDA a torch backend (one float16 tensor, matmul +
  ``torch.topk``, candidates re-scored in float32), or a faiss GPU ``GpuIndexFlatIP`` when asked for with
  ``backend="faiss"`` and the installed faiss has GPUs.
* ``"hnsw"``: ``faiss.IndexHNSWFlat`` (inner product), CPU only.
* ``"ivfpq"``: ``faiss.IndexIVFPQ`` on an ``IndexFlatIP`` coarse quantizer, wrapped by default in
  ``faiss.IndexRefineFlat`` so that the returned scores are exact inner products. CPU only. Trained lazily, see
  :class:`PlaceIndex`.

Filtering (``allowed=``) uses faiss ``SearchParameters`` with an ``IDSelectorBitmap`` for the HNSW and IVF indexes
(both honour selectors in faiss 1.15; ``IndexRefineSearchParameters`` ignores a selector of its own, so it goes into
``base_index_params``), ``-inf`` masking of a blocked matmul for the torch backend and for the faiss flat index
(IndexFlat honours selectors too, but only on its non-BLAS path, ~9x slower for query batches), and over-fetching for
faiss GPU indexes (whose ``search`` ignores ``SearchParameters``). The ``mask_*`` functions build such masks from a
map's arrays and :func:`combine_masks` ANDs them.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import faiss
import numpy as np
import torch

from dinomix_ros.settings import check, setting

__all__ = [
    "IndexConfig",
    "KINDS",
    "BACKENDS",
    "DEVICES",
    "PlaceIndex",
    "PlaceIndexError",
    "IndexConfigError",
    "DescriptorError",
    "MaskError",
    "EmptyIndexError",
    "IndexFormatError",
    "mask_exclude_recent",
    "mask_exclude_last",
    "mask_id_range",
    "mask_within_radius",
    "combine_masks",
]

LOG = logging.getLogger(__name__)

KINDS = ("exact", "hnsw", "ivfpq")
BACKENDS = ("auto", "faiss", "torch")
DEVICES = ("auto", "cpu", "cuda")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

PQ_NBITS = 8  # 256 centroids per sub-quantizer: one byte per sub-vector
MIN_POINTS_PER_CENTROID = 39  # below this faiss's k-means warns that the clustering is unreliable
MAX_NLIST = 65536
MIN_REFINE_CANDIDATES = 32  # IndexRefineFlat re-ranks at least this many IVF-PQ candidates, whatever k is
GPU_MAX_K = 2048  # faiss GPU k-selection limit without cuVS
FLOAT16_MAX = 65504.0
_TORCH_BLOCK_ELEMENTS = 1 << 26  # bound on the (queries x rows) score block and the re-scoring gather
_ADD_CHUNK = 65536  # rows converted to float32 at a time by add()
_STRUCTURAL_PARAMS = frozenset({"hnsw_m", "hnsw_ef_construction", "ivf_nlist", "pq_m", "refine"})


@dataclass(frozen=True)
class IndexConfig:
    """Which search index a map gets and where it runs (node parameters ``map.index``, ``map.search_device``; CLI
    ``--index``, ``--search-device``)."""

    SETTINGS_GROUP: ClassVar[str] = "map"

    index: str = setting("exact", "search index: exact, hnsw or ivfpq (approximate, for large maps)", choices=KINDS,
                         reconfigure=True)
    search_device: str = setting("auto", "where exact search runs: auto, cpu or cuda", choices=DEVICES,
                                 reconfigure=True)

    def __post_init__(self) -> None:
        check(self)


class PlaceIndexError(ValueError):
    """Base class of the errors raised by :mod:`dinomix_ros.maps.index`."""


class IndexConfigError(PlaceIndexError):
    """An unknown or inconsistent kind, backend, device or index parameter."""


class DescriptorError(PlaceIndexError):
    """Descriptors or queries with the wrong shape, dtype, or non-finite values."""


class MaskError(PlaceIndexError):
    """An ``allowed`` mask (or a filter input) with the wrong dtype or shape."""


class EmptyIndexError(PlaceIndexError):
    """A search on an index that holds no descriptors yet."""


class IndexFormatError(PlaceIndexError):
    """Bytes that are not a faiss index :class:`PlaceIndex` can load."""


class PlaceIndex:
    """Top-K inner-product search over a map's descriptors, exact or approximate, CPU or CUDA.

    Backends, per kind and device:

    ======== ====== =====================================================================================
    kind     device backend
    ======== ====== =====================================================================================
    exact    cpu    faiss ``IndexFlatIP`` (``backend="torch"`` gives the torch backend on CPU, float32)
    exact    cuda   torch: one CUDA tensor (float16 unless ``torch_dtype``), matmul + ``topk``; the best
                    ``max(2k, k+16)`` candidates are re-scored in float32 so scores are exact for the
                    stored vectors. ``backend="faiss"`` uses faiss ``GpuIndexFlatIP`` instead (needs a
                    GPU build of faiss); its ``search`` ignores selectors, so masks are applied by
                    over-fetching ``k + excluded`` results, which must stay <= 2048.
    hnsw     cpu    faiss ``IndexHNSWFlat(dim, hnsw_m, METRIC_INNER_PRODUCT)``
    ivfpq    cpu    faiss ``IndexRefineFlat(IndexIVFPQ(IndexFlatIP, dim, nlist, pq_m, 8, IP))``
    ======== ====== =====================================================================================

    ``"auto"`` device means CUDA when ``torch.cuda.is_available()`` and the kind is ``"exact"``, else CPU. hnsw and
    ivfpq run on CPU only: on a GPU an exact float16 scan of a million 4096-d descriptors is already fast.

    IVF-PQ training: the index is trained on the data the first time enough vectors are present, i.e. on the first
    ``add`` when that call brings at least ``39 * max(nlist, 256)`` vectors (faiss's 39 points per centroid, for the
    coarse quantizer and for the 256 PQ centroids; 9984 with the automatic nlist). Until then the vectors are kept in
    an exact ``IndexFlatIP`` and searched exactly (a warning says so once); the ``add`` that reaches the threshold
    trains on everything buffered plus the new rows, then encodes them. The automatic nlist is
    ``clamp(round(4 * sqrt(n)), 1, min(n // 39, 65536))`` for the n seen at training. Later ``add`` calls only encode
    (the quantizer is not retrained): rebuild the index when the map has grown several times over. To train on a
    whole map that is added in blocks, call :meth:`train` with all (or a sample of) its rows first. Training a
    4096-d index takes tens of seconds on a small CPU, under the lock, so build IVF-PQ maps offline.

    Filtering: a search only returns rows whose ``allowed`` entry is True. Exact faiss CPU indexes apply masks by a
    blocked torch matmul on a zero-copy view of their storage (faiss's selector path for IndexFlat is not BLAS).
    hnsw and ivfpq pass an ``IDSelectorBitmap``; per-query masks cost one faiss call per distinct mask. Masks that
    allow at most ``filter_exact_max`` rows are searched exactly on approximate indexes (the flat storage of HNSW
    and of the refinement stage, or all inverted lists without refinement), because graph and inverted-list
    traversal lose recall when few rows qualify.

    Thread safety: every public method holds one re-entrant lock, so a worker thread may search while another
    appends. Searches are serialised too (faiss and torch parallelise each call internally).

    Args:
        dim: Descriptor dimension (4096 for DINO-Mix).
        kind: ``"exact"``, ``"hnsw"`` or ``"ivfpq"``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        backend: ``"auto"``, ``"faiss"`` or ``"torch"`` (torch only for kind ``"exact"``).
        torch_dtype: Storage dtype of the torch backend, ``"float32"``, ``"float16"`` or ``"bfloat16"``; default
            float16 on CUDA, float32 on CPU.
        hnsw_m: HNSW graph degree M.
        hnsw_ef_construction: HNSW efConstruction (build beam width).
        hnsw_ef_search: HNSW efSearch (query beam width; at least k is used).
        ivf_nlist: Number of inverted lists; None picks it from the data at training time.
        pq_m: Number of PQ sub-quantizers (bytes per vector); must divide ``dim``.
        ivf_nprobe: Inverted lists visited per query.
        refine: Re-rank IVF-PQ candidates with exact inner products (``IndexRefineFlat``, stores the float32
            vectors too).
        refine_k_factor: IVF-PQ candidates re-ranked per result (at least 32 candidates in all).
        filter_exact_max: Masks allowing at most this many rows are searched exactly on hnsw/ivfpq indexes.

    Raises:
        IndexConfigError: For an unknown kind, device or backend, a combination that does not exist (hnsw on CUDA,
            torch with hnsw) or a parameter out of range.
    """

    def __init__(
        self,
        dim: int,
        kind: str = "exact",
        device: str = "cpu",
        *,
        backend: str = "auto",
        torch_dtype: str | None = None,
        hnsw_m: int = 32,
        hnsw_ef_construction: int = 200,
        hnsw_ef_search: int = 128,
        ivf_nlist: int | None = None,
        pq_m: int = 64,
        ivf_nprobe: int = 32,
        refine: bool = True,
        refine_k_factor: float = 8.0,
        filter_exact_max: int = 4096,
    ) -> None:
        _check_choice("kind", kind, KINDS)
        _check_choice("device", device, DEVICES)
        _check_choice("backend", backend, BACKENDS)
        _check_positive_int("dim", dim)
        for name, value in (
            ("hnsw_m", hnsw_m),
            ("hnsw_ef_construction", hnsw_ef_construction),
            ("hnsw_ef_search", hnsw_ef_search),
            ("pq_m", pq_m),
            ("ivf_nprobe", ivf_nprobe),
        ):
            _check_positive_int(name, value)
        if ivf_nlist is not None:
            _check_positive_int("ivf_nlist", ivf_nlist)
        if not isinstance(filter_exact_max, numbers.Integral) or filter_exact_max < 0:
            raise IndexConfigError(f"filter_exact_max must be an int >= 0, found {filter_exact_max!r}.")
        if not (isinstance(refine_k_factor, numbers.Real) and refine_k_factor >= 1.0):
            raise IndexConfigError(f"refine_k_factor must be a number >= 1, found {refine_k_factor!r}.")
        if kind == "ivfpq" and dim % pq_m != 0:
            raise IndexConfigError(
                f"pq_m={pq_m} does not divide dim={dim}: IVF-PQ splits each vector into pq_m equal sub-vectors. "
                f"Pick a divisor of {dim} (e.g. {_largest_divisor_at_most(dim, pq_m)})."
            )
        if torch_dtype is not None:
            _check_choice("torch_dtype", torch_dtype, tuple(TORCH_DTYPES))

        self.dim = int(dim)
        self.kind = kind
        self.params: dict[str, Any] = {}
        if kind == "hnsw":
            self.params = {"hnsw_m": int(hnsw_m), "hnsw_ef_construction": int(hnsw_ef_construction),
                           "hnsw_ef_search": int(hnsw_ef_search)}
        elif kind == "ivfpq":
            self.params = {"ivf_nlist": None if ivf_nlist is None else int(ivf_nlist), "pq_m": int(pq_m),
                           "pq_nbits": PQ_NBITS, "ivf_nprobe": int(ivf_nprobe), "refine": bool(refine),
                           "refine_k_factor": float(refine_k_factor)}
        if kind != "exact":
            self.params["filter_exact_max"] = int(filter_exact_max)

        self.device, self.backend = _resolve_device_backend(kind, device, backend)
        self._lock = threading.RLock()
        self._index: Any = None  # the faiss index (CPU or GPU); None for the torch backend
        self._pending: Any = None  # ivfpq before training: exact IndexFlatIP buffer
        self._torch: _TorchFlat | None = None
        self._gpu_res: Any = None
        self._warned_pending = False

        if self.backend == "torch":
            dtype_name = torch_dtype or ("float16" if self.device == "cuda" else "float32")
            self.params["torch_dtype"] = dtype_name
            self._torch = _TorchFlat(self.dim, torch.device(self.device), TORCH_DTYPES[dtype_name])
        elif kind == "exact":
            self._index = faiss.IndexFlatIP(self.dim)
            if self.device == "cuda":
                self._to_gpu()
        elif kind == "hnsw":
            self._index = faiss.IndexHNSWFlat(self.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = int(hnsw_ef_construction)
            self._index.hnsw.efSearch = int(hnsw_ef_search)
        else:
            self._pending = faiss.IndexFlatIP(self.dim)
        LOG.info("PlaceIndex: kind=%s backend=%s device=%s dim=%d (requested device=%s backend=%s, cuda=%s)",
                 self.kind, self.backend, self.device, self.dim, device, backend, torch.cuda.is_available())

    # ------------------------------------------------------------------ size

    @property
    def ntotal(self) -> int:
        """Number of descriptors in the index."""
        with self._lock:
            if self._torch is not None:
                return self._torch.ntotal
            if self._pending is not None:
                return int(self._pending.ntotal)
            return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def is_trained(self) -> bool:
        """False only for an ivfpq index still below its training threshold (searched exactly meanwhile)."""
        with self._lock:
            return self._pending is None

    def __repr__(self) -> str:
        return f"PlaceIndex(dim={self.dim}, kind={self.kind!r}, backend={self.backend!r}, device={self.device!r}, " \
               f"ntotal={self.ntotal})"

    # ------------------------------------------------------------------ add

    def add(self, xb: np.ndarray) -> None:
        """Append descriptors; their row numbers continue from ``ntotal``.

        All rows are validated before any is added, so a failed call adds nothing. An untrained ivfpq index buffers
        the rows, or trains on everything it holds once that reaches its threshold (see the class docstring).

        Args:
            xb: (N, dim) or (dim,) float32/float16/float64 descriptors, finite (L2-normalised for cosine scores).

        Raises:
            DescriptorError: For a wrong shape or dtype, non-finite values, or (float16 torch storage) values beyond
                the float16 range.
        """
        fp16 = self._torch is not None and self._torch.dtype == torch.float16
        xb = _check_matrix(xb, self.dim, "xb", FLOAT16_MAX if fp16 else None)  # validates all rows before adding any
        if xb.shape[0] == 0:
            return
        with self._lock:
            if self._pending is not None:  # ivfpq trains on everything it holds: one float32 copy of the batch
                self._add_untrained_ivfpq(np.ascontiguousarray(xb, dtype=np.float32))
                return
            # chunks bound the float32 conversion of a large float16 or read-only (memory-mapped) map
            for j0 in range(0, xb.shape[0], _ADD_CHUNK):
                chunk = np.ascontiguousarray(xb[j0:j0 + _ADD_CHUNK], dtype=np.float32)
                if self._torch is not None:
                    self._torch.add(chunk)
                else:
                    self._index.add(chunk)

    def _ivf_min_train(self) -> int:
        nlist = self.params["ivf_nlist"]
        return MIN_POINTS_PER_CENTROID * max(nlist or 0, 2 ** PQ_NBITS)

    def train(self, xt: np.ndarray) -> None:
        """Train an ivfpq index now on ``xt`` (e.g. all or a sample of the map) instead of on the first rows added.

        Use it when a large map is added in blocks: otherwise training happens on the first ``39 * max(nlist, 256)``
        rows only, and the automatic nlist is sized for them. The rows of ``xt`` are not added; rows already buffered
        are encoded into the trained index. Does nothing for kinds "exact" and "hnsw", which need no training.

        Args:
            xt: (n, dim) float training vectors, n >= ``describe()["train_threshold"]``.

        Raises:
            DescriptorError: For invalid vectors, or fewer than the training threshold.
            IndexConfigError: When the ivfpq index is already trained (build a new index to retrain).
        """
        if self.kind != "ivfpq":
            LOG.debug("train(): kind %r needs no training", self.kind)
            return
        xt = _as_matrix(xt, self.dim, "xt")
        need = self._ivf_min_train()
        if xt.shape[0] < need:
            raise DescriptorError(f"xt has {xt.shape[0]} vectors, ivfpq training needs at least {need} "
                                  f"({MIN_POINTS_PER_CENTROID} per coarse or PQ centroid). Pass more vectors, or let "
                                  "add() train once the index holds enough.")
        with self._lock:
            if self._pending is None:
                raise IndexConfigError("this ivfpq index is already trained; build a new PlaceIndex to retrain it.")
            index = self._build_ivfpq(xt)
            if self._pending.ntotal:
                index.add(self._pending.reconstruct_n(0, self._pending.ntotal))
            self._index, self._pending = index, None

    def _add_untrained_ivfpq(self, xb: np.ndarray) -> None:
        n = int(self._pending.ntotal) + xb.shape[0]
        need = self._ivf_min_train()
        if n < need:
            self._pending.add(xb)
            if not self._warned_pending:
                LOG.warning("ivfpq index holds %d < %d vectors needed to train (39 per centroid); searching exactly "
                            "until then", n, need)
                self._warned_pending = True
            return
        if self._pending.ntotal:
            xt = np.concatenate([self._pending.reconstruct_n(0, self._pending.ntotal), xb])
        else:
            xt = xb
        index = self._build_ivfpq(xt)
        index.add(xt)
        self._index, self._pending = index, None

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

    # ------------------------------------------------------------------ search

    def search(self, xq: np.ndarray, k: int, *, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Find the k most similar rows for each query.

        Args:
            xq: (nq, dim) or (dim,) float queries.
            k: Number of results per query (>= 1). Rows missing when fewer than k qualify are padded.
            allowed: None (all rows), a bool mask (ntotal,) shared by all queries, or (nq, ntotal) one per query.
                Only rows whose entry is True may be returned. A mask shorter than ntotal (built before rows were
                appended by another thread) treats the missing, newest rows as not allowed.

        Returns:
            ``(D, I)``: D (nq, k) float32 similarities in descending order, ``-inf`` for padding; I (nq, k) int64 row
            numbers, ``-1`` for padding.

        Raises:
            DescriptorError: For queries with a wrong shape or non-finite values.
            MaskError: For a mask that is not bool or does not match (nq, ntotal).
            EmptyIndexError: When the index holds no descriptors.
            IndexConfigError: For k < 1.
        """
        xq = _as_matrix(xq, self.dim, "xq")
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
            raise IndexConfigError(f"k must be an int >= 1, found {k!r}.")
        k = int(k)
        nq = xq.shape[0]
        with self._lock:
            ntotal = self.ntotal
            if ntotal == 0:
                raise EmptyIndexError("search on an empty index (ntotal=0): add() descriptors before searching.")
            mask = _as_allowed(allowed, nq, ntotal)
            D = np.full((nq, k), -np.inf, dtype=np.float32)
            I = np.full((nq, k), -1, dtype=np.int64)  # noqa: E741
            if nq == 0:
                return D, I
            k_eff = min(k, ntotal)
            if self._torch is not None:
                Dk, Ik = self._torch.search(xq, k_eff, mask)
            elif self._gpu_res is not None:
                Dk, Ik = self._search_gpu_faiss(xq, k_eff, mask)
            elif mask is not None and (self._pending is not None or self.kind == "exact"):
                Dk, Ik = self._search_flat_masked(xq, k_eff, mask)
            elif mask is None or mask.ndim == 1:
                Dk, Ik = self._search_faiss(xq, k_eff, mask)
            else:
                Dk, Ik = self._search_faiss_per_query(xq, k_eff, mask)
        D[:, :k_eff] = Dk
        I[:, :k_eff] = Ik
        D[I < 0] = -np.inf
        I[~np.isfinite(D)] = -1
        return D, I

    def _search_flat_masked(self, xq: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # IndexFlat's selector path is not BLAS (~9x slower on a 256-query batch in faiss 1.15): do the masked scan as
        # a blocked matmul on a zero-copy view of the faiss storage. Safe under the lock (no add can reallocate it).
        flat = self._pending if self._pending is not None else self._index
        xb = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
        return _matmul_topk(torch.from_numpy(xb), xq, k, mask)

    def _search_faiss_per_query(self, xq: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # faiss takes one selector per call: group the queries that share a mask (often all of them, or few groups).
        packed = np.packbits(mask, axis=1, bitorder="little")
        uniq, inverse = np.unique(packed, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        D = np.empty((xq.shape[0], k), dtype=np.float32)
        I = np.empty((xq.shape[0], k), dtype=np.int64)  # noqa: E741
        for g in range(uniq.shape[0]):
            rows = np.flatnonzero(inverse == g)
            D[rows], I[rows] = self._search_faiss(xq[rows], k, mask[rows[0]])
        return D, I

    def _search_faiss(self, xq: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        ntotal = self.ntotal
        n_allowed = ntotal if mask is None else int(np.count_nonzero(mask))
        if n_allowed == 0:
            return np.full((xq.shape[0], k), -np.inf, np.float32), np.full((xq.shape[0], k), -1, np.int64)
        bitmap = None
        if n_allowed < ntotal:
            bitmap = np.packbits(mask, bitorder="little")  # bit i of byte i >> 3 is row i, as IDSelectorBitmap reads
        sel = None if bitmap is None else faiss.IDSelectorBitmap(bitmap)
        restrictive = sel is not None and n_allowed <= self.params.get("filter_exact_max", 0)
        index, params = self._faiss_target(k, sel, restrictive)
        D, I = index.search(xq, k, params=params)  # noqa: E741
        del bitmap  # the selector reads the bitmap during search: keep it alive until here
        return D, I

    def _faiss_target(self, k: int, sel: Any, restrictive: bool) -> tuple[Any, Any]:
        """The faiss index to search and its SearchParameters for one selector (None: no filter)."""
        if self._pending is not None or self.kind == "exact":
            index = self._pending if self._pending is not None else self._index
            return index, None if sel is None else faiss.SearchParameters(sel=sel)
        if self.kind == "hnsw":
            if restrictive:  # exhaustive over the allowed rows of the flat storage (exact inner products)
                return faiss.downcast_index(self._index.storage), faiss.SearchParameters(sel=sel)
            ef = max(self.params["hnsw_ef_search"], k)
            return self._index, faiss.SearchParametersHNSW(efSearch=ef, sel=sel)
        # ivfpq
        if self.params["refine"]:
            if restrictive:
                return faiss.downcast_index(self._index.refine_index), faiss.SearchParameters(sel=sel)
            ivf_params = faiss.SearchParametersIVF(nprobe=self.params["ivf_nprobe"], sel=sel)
            k_factor = max(self.params["refine_k_factor"], MIN_REFINE_CANDIDATES / k)
            # IndexRefine ignores a selector passed to IndexRefineSearchParameters itself: it must filter the base.
            return self._index, faiss.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=ivf_params)
        nprobe = self._index.nlist if restrictive else self.params["ivf_nprobe"]
        return self._index, faiss.SearchParametersIVF(nprobe=nprobe, sel=sel)

    def _search_gpu_faiss(self, xq: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if mask is None:
            return self._index.search(xq, k)
        n_excluded = int((mask.shape[-1] - np.count_nonzero(mask, axis=-1)).max())
        k_fetch = min(self.ntotal, k + n_excluded)
        if k_fetch > GPU_MAX_K:
            raise MaskError(
                f"the mask excludes {n_excluded} rows, so the faiss GPU index (which ignores selectors) would have "
                f"to fetch k={k_fetch} > {GPU_MAX_K} results. Use backend='torch' on CUDA (the default) for masks "
                "that exclude many rows."
            )
        D, I = self._index.search(xq, k_fetch)  # noqa: E741
        return _keep_allowed(D, I, mask, k)

    # ------------------------------------------------------------------ serialisation

    def to_bytes(self) -> np.ndarray:
        """Serialise to a faiss index file image (uint8), no pickle.

        faiss CPU indexes are written as they are and GPU indexes after conversion to CPU. The torch backend and an
        ivfpq index still below its training threshold are written as an ``IndexFlatIP`` of their vectors (the
        torch vectors as stored, e.g. float16-rounded, in float32).

        Returns:
            The bytes of ``faiss.serialize_index``, also readable by ``faiss.deserialize_index``.
        """
        with self._lock:
            if self._torch is not None:
                index = faiss.IndexFlatIP(self.dim)
                if self._torch.ntotal:
                    index.add(self._torch.vectors())
            elif self._pending is not None:
                index = self._pending
            elif self._gpu_res is not None:
                index = faiss.index_gpu_to_cpu(self._index)
            else:
                index = self._index
            return faiss.serialize_index(index)

    @classmethod
    def from_bytes(
        cls,
        buf: np.ndarray | bytes,
        device: str = "cpu",
        *,
        kind: str | None = None,
        backend: str = "auto",
        **params: Any,
    ) -> PlaceIndex:
        """Load an index written by :meth:`to_bytes` (or any faiss inner-product index of a supported type).

        Supported: ``IndexFlatIP`` (kind exact, onto any device/backend; with ``kind="ivfpq"`` it becomes an
        untrained ivfpq buffer again), ``IndexHNSWFlat`` (hnsw), ``IndexIVFPQ`` and ``IndexRefineFlat`` over an
        ``IndexIVFPQ`` (ivfpq), all with METRIC_INNER_PRODUCT; hnsw and ivfpq load on CPU only. Their parameters
        (M, efConstruction, efSearch, nlist, nprobe, pq_m, k_factor) are read from the file; ``params`` overrides the
        search-time ones (``hnsw_ef_search``, ``ivf_nprobe``, ``refine_k_factor``) and passes other constructor
        arguments (``torch_dtype``, ``filter_exact_max``); structural ones that disagree with the file are ignored
        with a warning.

        Args:
            buf: uint8 array or bytes from :meth:`to_bytes` or ``faiss.serialize_index``.
            device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
            kind: Expected kind; None infers it from the index type.
            backend: ``"auto"``, ``"faiss"`` or ``"torch"`` (exact only).
            **params: Keyword arguments of :class:`PlaceIndex`.

        Returns:
            A PlaceIndex holding the stored vectors.

        Raises:
            IndexFormatError: When ``buf`` is not a faiss index, or one of an unsupported type or metric, or not of
                the requested kind.
        """
        if isinstance(buf, (bytes, bytearray, memoryview)):
            buf = np.frombuffer(buf, dtype=np.uint8)
        buf = np.ascontiguousarray(buf)
        if buf.dtype != np.uint8 or buf.ndim != 1:
            raise IndexFormatError(f"buf must be a 1-D uint8 array or bytes, found {buf.dtype} {buf.shape}.")
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
        found, fparams = _describe_faiss_index(index)
        if kind is not None:
            _check_choice("kind", kind, KINDS)
            if kind != found and not (kind == "ivfpq" and found == "exact"):
                raise IndexFormatError(f"the stored index is {type(index).__name__} (kind {found!r}), expected kind "
                                       f"{kind!r}. Pass kind=None to accept what is stored.")
        kind = kind or found
        if kind == "ivfpq" and found == "exact":
            obj = cls(index.d, "ivfpq", device, backend=backend, **params)
            if index.ntotal:
                obj.add(index.reconstruct_n(0, index.ntotal))
            return obj
        # structure comes from the file; search-time parameters (efSearch, nprobe, k_factor, ...) may be overridden
        for key in _STRUCTURAL_PARAMS & fparams.keys() & params.keys():
            if params[key] != fparams[key]:
                LOG.warning("from_bytes: ignoring %s=%r, the stored index was built with %r", key, params[key],
                            fparams[key])
        merged = dict(fparams)
        merged.update({key: v for key, v in params.items() if key not in _STRUCTURAL_PARAMS or key not in fparams})
        obj = cls(index.d, kind, device, backend=backend, **merged)
        with obj._lock:
            if obj._torch is not None:
                if index.ntotal:
                    obj._torch.add(index.reconstruct_n(0, index.ntotal))
                return obj
            obj._pending = None
            obj._index = index
            if kind == "hnsw":
                index.hnsw.efSearch = obj.params["hnsw_ef_search"]
            elif kind == "ivfpq":
                ivf = faiss.downcast_index(index.base_index) if obj.params["refine"] else index
                ivf.nprobe = obj.params["ivf_nprobe"]
                obj.params["trained_nlist"] = int(ivf.nlist)
                if obj.params["refine"]:
                    index.k_factor = obj.params["refine_k_factor"]
            elif obj.device == "cuda":
                obj._to_gpu()
        return obj

    def _to_gpu(self) -> None:
        self._gpu_res = faiss.StandardGpuResources()
        self._index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._index)

    # ------------------------------------------------------------------ diagnostics

    def describe(self) -> dict[str, Any]:
        """Kind, backend, device, size and parameters, for logs and diagnostics."""
        with self._lock:
            if self._torch is not None:
                storage = f"torch.{self.params['torch_dtype']}"
            elif self._pending is not None:
                storage = "IndexFlatIP (ivfpq not trained yet)"
            else:
                storage = type(self._index).__name__
            out: dict[str, Any] = {
                "kind": self.kind,
                "backend": self.backend,
                "device": self.device,
                "dim": self.dim,
                "ntotal": self.ntotal,
                "trained": self._pending is None,
                "storage": storage,
                "params": dict(self.params),
            }
            if self._pending is not None:
                out["train_threshold"] = self._ivf_min_train()
            return out


# ---------------------------------------------------------------------- backends and helpers


class _TorchFlat:
    """Brute-force inner product on a torch tensor: (N, dim) storage, matmul + topk, optional float32 re-scoring."""

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.dim = dim
        self.device = device
        self.dtype = dtype
        self.ntotal = 0
        self._xb = torch.empty((0, dim), dtype=dtype, device=device)

    def add(self, xb: np.ndarray) -> None:
        n_new = self.ntotal + xb.shape[0]
        if n_new > self._xb.shape[0]:  # grow by 1.5x so that one-by-one appends stay amortised O(1)
            cap = max(n_new, int(self._xb.shape[0] * 1.5), 1024)
            grown = torch.empty((cap, self.dim), dtype=self.dtype, device=self.device)
            grown[: self.ntotal] = self._xb[: self.ntotal]
            self._xb = grown
        src = torch.from_numpy(xb if xb.flags.writeable else xb.copy())  # from_numpy warns on read-only arrays
        self._xb[self.ntotal:n_new] = src.to(device=self.device, dtype=self.dtype)
        self.ntotal = n_new

    def vectors(self) -> np.ndarray:
        return self._xb[: self.ntotal].float().cpu().numpy()

    def search(self, xq: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return _matmul_topk(self._xb[: self.ntotal], xq, k, mask)


@torch.inference_mode()
def _matmul_topk(
    xb: torch.Tensor, xq: np.ndarray, k: int, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products by blocked matmul + topk; masked rows score -inf.

    Low-precision storage (float16/bfloat16) ranks ``max(2k, k + 16)`` candidates with the low-precision scores, then
    re-scores them in float32 against the float32 queries, so returned scores are exact for the stored vectors.
    """
    n, dim = xb.shape
    nq = xq.shape[0]
    rescore = xb.dtype != torch.float32
    kc = min(n, max(2 * k, k + 16)) if rescore else k
    block = max(1, _TORCH_BLOCK_ELEMENTS // n)
    if rescore:
        block = min(block, max(1, _TORCH_BLOCK_ELEMENTS // (kc * dim)))
    mask_t = None if mask is None else torch.tensor(mask, device=xb.device)
    D = np.empty((nq, k), dtype=np.float32)
    I = np.empty((nq, k), dtype=np.int64)  # noqa: E741
    for i0 in range(0, nq, block):
        i1 = min(nq, i0 + block)
        q32 = torch.tensor(xq[i0:i1], device=xb.device)  # (b, dim) float32 copy (xq may be read-only)
        S = q32.to(xb.dtype) @ xb.T  # (b, n) in the storage dtype
        if mask_t is not None:
            S.masked_fill_(~(mask_t if mask_t.ndim == 1 else mask_t[i0:i1]), -math.inf)
        Dc, Ic = torch.topk(S, kc, dim=1)
        if rescore:
            # float16 scores are rounded to ~5e-4 near 1: re-score the candidates exactly in float32
            cand = xb[Ic].float()  # (b, kc, dim)
            R = torch.bmm(cand, q32.unsqueeze(2)).squeeze(2)  # (b, kc)
            R = torch.where(torch.isneginf(Dc), -math.inf, R)
            Dc, order = torch.topk(R, k, dim=1)
            Ic = torch.gather(Ic, 1, order)
        D[i0:i1] = Dc.float().cpu().numpy()
        I[i0:i1] = Ic.cpu().numpy()
    return D, I


def _keep_allowed(
    D: np.ndarray, I: np.ndarray, mask: np.ndarray, k: int  # noqa: E741
) -> tuple[np.ndarray, np.ndarray]:
    """From over-fetched sorted results (nq, k'), keep the first k allowed ones per row, in order; pad the rest."""
    valid = I >= 0
    ok = np.zeros(I.shape, dtype=bool)
    if mask.ndim == 1:
        ok[valid] = mask[I[valid]]
    else:
        rows = np.nonzero(valid)[0]
        ok[valid] = mask[rows, I[valid]]
    order = np.argsort(~ok, axis=1, kind="stable")[:, :k]
    Dk = np.take_along_axis(D, order, axis=1).astype(np.float32)
    Ik = np.take_along_axis(I, order, axis=1).astype(np.int64)
    bad = ~np.take_along_axis(ok, order, axis=1)
    Dk[bad] = -np.inf
    Ik[bad] = -1
    if Dk.shape[1] < k:
        pad = k - Dk.shape[1]
        Dk = np.pad(Dk, ((0, 0), (0, pad)), constant_values=-np.inf)
        Ik = np.pad(Ik, ((0, 0), (0, pad)), constant_values=-1)
    return Dk, Ik


def _describe_faiss_index(index: Any) -> tuple[str, dict[str, Any]]:
    """Kind and PlaceIndex constructor parameters of a deserialised faiss index."""
    if isinstance(index, faiss.IndexHNSWFlat):
        hnsw = index.hnsw
        return "hnsw", {"hnsw_m": int(hnsw.nb_neighbors(1)), "hnsw_ef_construction": int(hnsw.efConstruction),
                        "hnsw_ef_search": int(hnsw.efSearch)}
    if isinstance(index, faiss.IndexRefineFlat):
        base = faiss.downcast_index(index.base_index)
        if isinstance(base, faiss.IndexIVFPQ):
            _, params = _describe_faiss_index(base)
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


def _resolve_device_backend(kind: str, device: str, backend: str) -> tuple[str, str]:
    cuda = torch.cuda.is_available()
    if backend == "torch" and kind != "exact":
        raise IndexConfigError(f"backend='torch' only implements kind 'exact', found kind {kind!r}. "
                               "Use backend='auto' or 'faiss' for hnsw/ivfpq.")
    if device == "cuda" and not cuda:
        raise IndexConfigError("device='cuda' was requested but torch.cuda.is_available() is False. "
                               "Use device='auto' (CUDA when present) or device='cpu'.")
    if kind != "exact":
        if device == "cuda":
            raise IndexConfigError(f"kind {kind!r} runs on CPU only, found device='cuda'. Use device='cpu'/'auto', "
                                   "or kind='exact' (a brute-force float16 scan) on CUDA.")
        if device == "auto":
            LOG.info("device='auto': kind %r runs on CPU", kind)
        return "cpu", "faiss"
    if device == "auto":
        device = "cuda" if cuda else "cpu"
        LOG.info("device='auto' resolved to %s (torch.cuda.is_available()=%s)", device, cuda)
    if device == "cpu":
        return "cpu", "torch" if backend == "torch" else "faiss"
    # exact on CUDA: torch unless faiss is asked for, because GpuIndexFlat.search ignores IDSelectors
    if backend == "faiss":
        if faiss.get_num_gpus() < 1 or not hasattr(faiss, "StandardGpuResources"):
            raise IndexConfigError("backend='faiss' on CUDA needs a GPU build of faiss (faiss.get_num_gpus()="
                                   f"{faiss.get_num_gpus()}). Use backend='auto' for the torch CUDA backend.")
        return "cuda", "faiss"
    return "cuda", "torch"


def _check_matrix(x: np.ndarray, dim: int, name: str, limit: float | None = None) -> np.ndarray:
    """Validate descriptors/queries: float dtype, (n, dim) or (dim,) shape, finite, |x| <= limit; return (n, dim)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise DescriptorError(f"{name} must be a float32/float16 array, found dtype {x.dtype}. "
                              "Pass the float descriptors returned by the encoder.")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise DescriptorError(f"{name} has shape {x.shape}, expected (n, {dim}) or ({dim},). "
                              "Check that the map and the encoder use the same descriptor dimension.")
    if limit is None and x.dtype.itemsize > 4:
        limit = float(np.finfo(np.float32).max)  # float64 values beyond this become inf in float32
    n_bad, first_bad, peak = 0, -1, 0.0
    for j0 in range(0, x.shape[0], _ADD_CHUNK):  # chunked: no full-size temporaries for a large map
        chunk = x[j0:j0 + _ADD_CHUNK]
        bad = np.flatnonzero(~np.isfinite(chunk).all(axis=1))
        if bad.size and first_bad < 0:
            first_bad = j0 + int(bad[0])
        n_bad += bad.size
        if limit is not None and not bad.size and chunk.size:
            peak = max(peak, float(np.abs(chunk).max()))
    if n_bad:
        raise DescriptorError(f"{name} has {n_bad} row(s) with NaN/inf values (first: row {first_bad}), expected "
                              "finite descriptors. Drop those rows or fix the encoder input.")
    if limit is not None and peak > limit:
        raise DescriptorError(f"{name} has |value| {peak:.6g} > {limit:.6g}, the largest value the index stores "
                              "(float16 max for float16 storage). L2-normalise the descriptors, or store float32.")
    return x


def _as_matrix(x: np.ndarray, dim: int, name: str) -> np.ndarray:
    """Validate queries and return them as a C-contiguous float32 (n, dim) array."""
    return np.ascontiguousarray(_check_matrix(x, dim, name), dtype=np.float32)


def _as_allowed(allowed: np.ndarray | None, nq: int, ntotal: int) -> np.ndarray | None:
    """Validate a mask; pad a short one with False up to ntotal; None when it allows everything."""
    if allowed is None:
        return None
    a = np.asarray(allowed)
    if a.dtype != np.bool_:
        raise MaskError(f"allowed must be a bool mask, found dtype {a.dtype}. Build it with the mask_* functions or "
                        "a comparison (to select rows by number use np.isin(np.arange(ntotal), rows)).")
    if a.ndim not in (1, 2) or (a.ndim == 2 and a.shape[0] != nq) or a.shape[-1] > ntotal:
        raise MaskError(f"allowed has shape {a.shape}, expected ({ntotal},) or ({nq}, {ntotal}) for {nq} queries "
                        f"on an index of {ntotal} rows (shorter masks are allowed: missing rows count as excluded).")
    if a.shape[-1] < ntotal:
        LOG.debug("mask covers %d of %d rows: the newest %d rows are excluded", a.shape[-1], ntotal,
                  ntotal - a.shape[-1])
        pad = [(0, 0)] * (a.ndim - 1) + [(0, ntotal - a.shape[-1])]
        a = np.pad(a, pad, constant_values=False)
    if a.ndim == 2 and a.shape[0] > 0 and (a == a[0]).all():
        a = a[0]  # one mask for all queries: a single batched search
    if a.all():
        return None
    return np.ascontiguousarray(a)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise IndexConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, found {value!r}.")


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise IndexConfigError(f"{name} must be an int >= 1, found {value!r}.")


def _largest_divisor_at_most(n: int, m: int) -> int:
    return max(d for d in range(1, min(n, m) + 1) if n % d == 0)


# ---------------------------------------------------------------------- masks


def _as_vector(x: np.ndarray, name: str, integer: bool) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise MaskError(f"{name} must be 1-D, found shape {a.shape}.")
    if integer and not np.issubdtype(a.dtype, np.integer):
        raise MaskError(f"{name} must hold integers, found dtype {a.dtype}. Convert with .astype(np.int64) "
                        "(nanosecond stamps do not fit float64 exactly).")
    return a


def mask_exclude_recent(stamps_ns: np.ndarray, query_stamp_ns: int, window_s: float) -> np.ndarray:
    """Allow keyframes at least ``window_s`` away in time from the query (loop closure skips the recent trajectory).

    Keyframes stamped slightly *after* the query (another camera of the rig, a map recorded later in sim time) are
    as "recent" as those just before it, so the window is symmetric.

    Args:
        stamps_ns: (N,) integer keyframe stamps in nanoseconds.
        query_stamp_ns: Stamp of the query in nanoseconds.
        window_s: Seconds around the query during which keyframes are excluded (>= 0).

    Returns:
        (N,) bool: True where ``|stamp - query_stamp| >= window``.

    Raises:
        MaskError: For non-integer or non-1-D stamps, or a negative/non-finite window.
    """
    stamps = _as_vector(stamps_ns, "stamps_ns", integer=True)
    if not (isinstance(window_s, numbers.Real) and math.isfinite(window_s) and window_s >= 0):
        raise MaskError(f"window_s must be a finite number >= 0, found {window_s!r}.")
    return np.abs(stamps.astype(np.int64) - int(query_stamp_ns)) >= int(round(window_s * 1e9))


def mask_exclude_last(n_total: int, count: int) -> np.ndarray:
    """Allow all but the last ``count`` of ``n_total`` keyframes (all False when count >= n_total).

    Raises:
        MaskError: For negative arguments.
    """
    if int(n_total) < 0 or int(count) < 0:
        raise MaskError(f"n_total and count must be >= 0, found n_total={n_total!r}, count={count!r}.")
    return np.arange(int(n_total)) < int(n_total) - int(count)


def mask_id_range(ids: np.ndarray, lo: int, hi: int, exclude: bool = True) -> np.ndarray:
    """Mask keyframes by id in the half-open range ``[lo, hi)``.

    Args:
        ids: (N,) integer keyframe ids.
        lo: First id of the range.
        hi: End of the range (excluded).
        exclude: True allows the ids outside the range, False only those inside.

    Returns:
        (N,) bool mask.

    Raises:
        MaskError: For non-integer or non-1-D ids, or hi < lo.
    """
    a = _as_vector(ids, "ids", integer=True)
    if hi < lo:
        raise MaskError(f"id range [{lo}, {hi}) is reversed: expected lo <= hi.")
    inside = (a >= lo) & (a < hi)
    return ~inside if exclude else inside


def mask_within_radius(positions: np.ndarray, center: np.ndarray, radius_m: float) -> np.ndarray:
    """Allow keyframes within ``radius_m`` (Euclidean, inclusive) of ``center``; NaN positions never are.

    Args:
        positions: (N, 3) or (N, 2) keyframe positions in metres (NaN where unknown).
        center: (3,) or (2,) position matching the columns of ``positions``.
        radius_m: Radius in metres (>= 0).

    Returns:
        (N,) bool mask.

    Raises:
        MaskError: For mismatched shapes, a non-finite center or a negative/non-finite radius.
    """
    p = np.asarray(positions, dtype=np.float64)
    c = np.asarray(center, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] not in (2, 3):
        raise MaskError(f"positions must have shape (N, 3) or (N, 2), found {p.shape}.")
    if c.shape != (p.shape[1],):
        raise MaskError(f"center has shape {c.shape}, expected ({p.shape[1]},) to match positions {p.shape}.")
    if not np.isfinite(c).all():
        raise MaskError(f"center must be finite, found {c.tolist()}.")
    if not (isinstance(radius_m, numbers.Real) and math.isfinite(radius_m) and radius_m >= 0):
        raise MaskError(f"radius_m must be a finite number >= 0, found {radius_m!r}.")
    d2 = ((p - c) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore"):
        return np.isfinite(d2) & (d2 <= float(radius_m) ** 2)


def combine_masks(*masks: np.ndarray | None) -> np.ndarray | None:
    """Logical AND of masks, ignoring None; None when all are None.

    (N,) and (nq, N) masks broadcast to (nq, N).

    Raises:
        MaskError: For a non-bool mask or shapes that do not broadcast.
    """
    out: np.ndarray | None = None
    for i, m in enumerate(masks):
        if m is None:
            continue
        a = np.asarray(m)
        if a.dtype != np.bool_ or a.ndim not in (1, 2):
            raise MaskError(f"mask {i} must be a 1-D or 2-D bool array, found dtype {a.dtype} shape {a.shape}.")
        if out is None:
            out = a.copy()
            continue
        if out.shape[-1] != a.shape[-1] or (out.ndim == 2 and a.ndim == 2 and out.shape[0] != a.shape[0]):
            raise MaskError(f"mask {i} has shape {a.shape}, which does not combine with {out.shape}: masks must "
                            "cover the same keyframes.")
        out = out & a
    return out
