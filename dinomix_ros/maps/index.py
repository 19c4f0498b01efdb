"""The search index of a keyframe map: top-K inner-product search over its descriptors, and how a map gets one.

DINO-Mix descriptors are L2-normalised, so cosine similarity is the inner product and larger is better. Results follow
faiss: ``D`` (nq, k) float32 similarities, descending, and ``I`` (nq, k) int64 row numbers (insertion order, i.e. the
row of the keyframe in the map's arrays), padded with ``-inf`` / ``-1`` where fewer than ``k`` rows qualify.
Similarities leave the index clamped to [-1, 1]: rounding (float16 storage keeps unit vectors to about 5e-4, float32
sums to about 1e-6) would otherwise give an image matched with itself a cosine such as 1.000008, which every caller
(the node's messages, ``map query``, evaluation reports) would print.

* :class:`PlaceIndex`: exact or approximate search, CPU or CUDA, masks, serialisation. Its storage is a
  :class:`~dinomix_ros.maps.faiss_backend.FaissBackend` (CPU) or a
  :class:`~dinomix_ros.maps.torch_backend.TorchBackend` (exact, CPU or CUDA). The masks of ``allowed=`` are built
  by :mod:`dinomix_ros.maps.masks`.
* :class:`IndexConfig`: which index a map gets and where it runs (node and CLI settings).
* :func:`index_for_map` / :func:`save_map_with_index`: a map's index, from the blob stored with the map when that is
  fresh, else built from its descriptors; an approximate index is saved with the map (:data:`INDEX_KIND_NAMES`
  labels it).

Bad inputs raise the :class:`~dinomix_ros.maps.errors.PlaceIndexError` family of
:mod:`dinomix_ros.maps.errors`. faiss is faiss-cpu: exact search on CUDA is the torch backend.
"""

from __future__ import annotations

import logging
import numbers
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np
import torch

from dinomix_ros.maps.faiss_backend import MIN_POINTS_PER_CENTROID, PQ_NBITS, FaissBackend, read_faiss_index
from dinomix_ros.maps.errors import (
    DescriptorError,
    EmptyIndexError,
    IndexConfigError,
    IndexFormatError,
    PlaceIndexError,
)
from dinomix_ros.maps.index_choice import check_fits, resolve_kind
from dinomix_ros.maps.index_inputs import (
    ADD_CHUNK, as_matrix, check_choice, check_matrix, check_positive_int, largest_divisor_at_most,
    resolve_device_backend,
)
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.masks import normalize_allowed
from dinomix_ros.maps.mmap_index import KIND as MMAP_KIND
from dinomix_ros.maps.mmap_index import STORED_KIND as MMAP_STORED_KIND
from dinomix_ros.maps.mmap_index import MmapIndex, MmapIndexParams, min_train_rows
from dinomix_ros.maps.torch_backend import TORCH_DTYPES, TorchBackend
from dinomix_ros.maps.storage import save_map
from dinomix_ros.settings import check, setting

__all__ = [
    "IndexConfig",
    "KINDS",
    "MAP_KINDS",
    "BACKENDS",
    "DEVICES",
    "INDEX_KIND_NAMES",
    "PlaceIndex",
    "index_for_map",
    "save_map_with_index",
]

LOG = logging.getLogger(__name__)

KINDS = ("exact", "hnsw", "ivfpq")  # what PlaceIndex builds
#: What ``map.index`` takes: auto (by map size, :mod:`.index_choice`), PlaceIndex's kinds, and ivfpq_mmap
#: (:mod:`.mmap_index`: codes in RAM, exact re-ranking from the memory-mapped map; for large maps).
MAP_KINDS = ("auto",) + KINDS + (MMAP_KIND,)
BACKENDS = ("auto", "faiss", "torch")
DEVICES = ("auto", "cpu", "cuda")
#: Map ``index_kind`` label of each :class:`PlaceIndex` kind (stored in the map's manifest).
INDEX_KIND_NAMES: dict[str, str] = {
    "exact": "faiss_flat_ip", "hnsw": "faiss_hnsw_ip", "ivfpq": "faiss_ivfpq_ip", MMAP_KIND: MMAP_STORED_KIND,
}

FLOAT16_MAX = 65504.0
_STRUCTURAL_PARAMS = frozenset({"hnsw_m", "hnsw_ef_construction", "ivf_nlist", "pq_m", "refine"})
_IVF_TRAIN_SAMPLE = 65536  # rows index_for_map trains IVF-PQ on at most (k-means cost grows with it)


@dataclass(frozen=True)
class IndexConfig:
    """Which search index a map gets and where it runs (node parameters ``map.index``, ``map.search_device``; CLI
    ``--index``, ``--search-device``)."""

    SETTINGS_GROUP: ClassVar[str] = "map"

    index: str = setting("auto", "search index: auto (exact below 10000 keyframes, else ivfpq_mmap or the kind the map "
                                 "stores), exact, hnsw, ivfpq, or ivfpq_mmap (large maps: codes in RAM, exact re-rank "
                                 "from the memory-mapped map)", choices=MAP_KINDS, reconfigure=True)
    search_device: str = setting("auto", "where exact search runs: auto, cpu or cuda", choices=DEVICES,
                                 reconfigure=True)

    def __post_init__(self) -> None:
        check(self)


class PlaceIndex:
    """Top-K inner-product search over a map's descriptors, exact or approximate, CPU or CUDA.

    Backends, per kind and device:

    ======== ====== =====================================================================================
    kind     device backend
    ======== ====== =====================================================================================
    exact    cpu    faiss ``IndexFlatIP`` (``backend="torch"`` gives the torch backend on CPU, float32)
    exact    cuda   torch: one CUDA tensor (float16 unless ``torch_dtype``), matmul + ``topk``; the best
                    ``max(2k, k+16)`` candidates are re-scored in float32 so scores are exact for the
                    stored vectors. faiss runs on the CPU only.
    hnsw     cpu    faiss ``IndexHNSWFlat(dim, hnsw_m, METRIC_INNER_PRODUCT)``
    ivfpq    cpu    faiss ``IndexRefineFlat(IndexIVFPQ(IndexFlatIP, dim, nlist, pq_m, 8, IP))``
    ======== ====== =====================================================================================

    ``"auto"`` device means CUDA when ``torch.cuda.is_available()``, the kind is ``"exact"`` and the backend is not
    ``"faiss"``, else CPU. hnsw and ivfpq run on CPU only: on a GPU an exact float16 scan of a million 4096-d
    descriptors is already fast.

    IVF-PQ training: the index is trained on the data the first time enough vectors are present, i.e. on the first
    ``add`` when that call brings at least ``39 * max(nlist, 256)`` vectors (faiss's 39 points per centroid, for the
    coarse quantizer and for the 256 PQ centroids; 9984 with the automatic nlist). Until then the vectors are kept in
    an exact ``IndexFlatIP`` and searched exactly (a warning says so once); the ``add`` that reaches the threshold
    trains on everything buffered plus the new rows, then encodes them. The automatic nlist is
    ``clamp(round(4 * sqrt(n)), 1, min(n // 39, 65536))`` for the n seen at training. Later ``add`` calls only encode
    (the quantizer is not retrained): rebuild the index when the map has grown several times over. To train on a
    whole map that is added in blocks, call :meth:`train` with all (or a sample of) its rows first. Training a
    4096-d index takes tens of seconds on a small CPU, under the lock, so build IVF-PQ maps offline.

    Filtering: a search only returns rows whose ``allowed`` entry is True. Exact indexes apply masks by a blocked
    torch matmul (on a zero-copy view of the faiss storage: faiss's selector path for IndexFlat is not BLAS). hnsw
    and ivfpq pass an ``IDSelectorBitmap``; per-query masks cost one faiss call per distinct mask. Masks that allow
    at most ``filter_exact_max`` rows are searched exactly on approximate indexes (the flat storage of HNSW and of
    the refinement stage, or all inverted lists without refinement), because graph and inverted-list traversal lose
    recall when few rows qualify.

    Thread safety: every public method holds one re-entrant lock, so a worker thread may search while another
    appends. Searches are serialised too (faiss and torch parallelise each call internally).

    Args:
        dim: Descriptor dimension (4096 for DINO-Mix).
        kind: ``"exact"``, ``"hnsw"`` or ``"ivfpq"``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        backend: ``"auto"``, ``"faiss"`` (CPU only) or ``"torch"`` (kind ``"exact"`` only).
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
            torch with hnsw, faiss on CUDA) or a parameter out of range.
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
        check_choice("kind", kind, KINDS)
        check_choice("device", device, DEVICES)
        check_choice("backend", backend, BACKENDS)
        check_positive_int("dim", dim)
        for name, value in (("hnsw_m", hnsw_m), ("hnsw_ef_construction", hnsw_ef_construction),
                            ("hnsw_ef_search", hnsw_ef_search), ("pq_m", pq_m), ("ivf_nprobe", ivf_nprobe)):
            check_positive_int(name, value)
        if ivf_nlist is not None:
            check_positive_int("ivf_nlist", ivf_nlist)
        if not isinstance(filter_exact_max, numbers.Integral) or filter_exact_max < 0:
            raise IndexConfigError(f"filter_exact_max must be an int >= 0, found {filter_exact_max!r}.")
        if not (isinstance(refine_k_factor, numbers.Real) and refine_k_factor >= 1.0):
            raise IndexConfigError(f"refine_k_factor must be a number >= 1, found {refine_k_factor!r}.")
        if kind == "ivfpq" and dim % pq_m != 0:
            raise IndexConfigError(
                f"pq_m={pq_m} does not divide dim={dim}: IVF-PQ splits each vector into pq_m equal sub-vectors. "
                f"Pick a divisor of {dim} (e.g. {largest_divisor_at_most(dim, pq_m)})."
            )
        if torch_dtype is not None:
            check_choice("torch_dtype", torch_dtype, tuple(TORCH_DTYPES))

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

        self.device, self.backend = resolve_device_backend(kind, device, backend)
        self._lock = threading.RLock()
        self._store: TorchBackend | FaissBackend  # the rows and their search; self.backend names which
        if self.backend == "torch":
            dtype_name = torch_dtype or ("float16" if self.device == "cuda" else "float32")
            self.params["torch_dtype"] = dtype_name
            self._store = TorchBackend(self.dim, torch.device(self.device), TORCH_DTYPES[dtype_name])
        else:
            self._store = FaissBackend(self.dim, kind, self.params)
        LOG.info("PlaceIndex: kind=%s backend=%s device=%s dim=%d (requested device=%s backend=%s, cuda=%s)",
                 self.kind, self.backend, self.device, self.dim, device, backend, torch.cuda.is_available())

    # ------------------------------------------------------------------ size

    @property
    def ntotal(self) -> int:
        """Number of descriptors in the index."""
        with self._lock:
            return int(self._store.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def is_trained(self) -> bool:
        """False only for an ivfpq index still below its training threshold (searched exactly meanwhile)."""
        with self._lock:
            return self._store.is_trained

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
        fp16 = isinstance(self._store, TorchBackend) and self._store.dtype == torch.float16
        xb = check_matrix(xb, self.dim, "xb", FLOAT16_MAX if fp16 else None)  # validates all rows before adding any
        if xb.shape[0] == 0:
            return
        with self._lock:
            if not self._store.is_trained:  # ivfpq trains on everything it holds: one float32 copy of the batch
                self._store.add(np.ascontiguousarray(xb, dtype=np.float32))
                return
            # chunks bound the float32 conversion of a large float16 or read-only (memory-mapped) map
            for j0 in range(0, xb.shape[0], ADD_CHUNK):
                self._store.add(np.ascontiguousarray(xb[j0:j0 + ADD_CHUNK], dtype=np.float32))

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
        xt = as_matrix(xt, self.dim, "xt")
        need = self._store.min_train()
        if xt.shape[0] < need:
            raise DescriptorError(f"xt has {xt.shape[0]} vectors, ivfpq training needs at least {need} "
                                  f"({MIN_POINTS_PER_CENTROID} per coarse or PQ centroid). Pass more vectors, or let "
                                  "add() train once the index holds enough.")
        with self._lock:
            if self._store.is_trained:
                raise IndexConfigError("this ivfpq index is already trained; build a new PlaceIndex to retrain it.")
            self._store.train(xt)

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
            ``(D, I)``: D (nq, k) float32 similarities in [-1, 1], descending, ``-inf`` for padding; I (nq, k) int64
            row numbers, ``-1`` for padding.

        Raises:
            DescriptorError: For queries with a wrong shape or non-finite values.
            MaskError: For a mask that is not bool or does not match (nq, ntotal).
            EmptyIndexError: When the index holds no descriptors.
            IndexConfigError: For k < 1.
        """
        xq = as_matrix(xq, self.dim, "xq")
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
            raise IndexConfigError(f"k must be an int >= 1, found {k!r}.")
        k = int(k)
        nq = xq.shape[0]
        with self._lock:
            ntotal = self.ntotal
            if ntotal == 0:
                raise EmptyIndexError("search on an empty index (ntotal=0): add() descriptors before searching.")
            mask = normalize_allowed(allowed, nq, ntotal)
            D = np.full((nq, k), -np.inf, dtype=np.float32)
            I = np.full((nq, k), -1, dtype=np.int64)  # noqa: E741
            if nq == 0:
                return D, I
            k_eff = min(k, ntotal)
            Dk, Ik = self._store.search(xq, k_eff, mask)
        # A cosine: rounding must not leave [-1, 1] (module docstring); -inf marks rows a backend did not find.
        D[:, :k_eff] = np.where(np.isfinite(Dk), np.clip(Dk, -1.0, 1.0), Dk)
        I[:, :k_eff] = Ik
        D[I < 0] = -np.inf
        I[~np.isfinite(D)] = -1
        return D, I

    # ------------------------------------------------------------------ serialisation

    def to_bytes(self) -> np.ndarray:
        """Serialise to a faiss index file image (uint8), no pickle.

        faiss indexes are written as they are. The torch backend and an ivfpq index still below its training
        threshold are written as an ``IndexFlatIP`` of their vectors (the torch vectors as stored, e.g.
        float16-rounded, in float32).

        Returns:
            The bytes of ``faiss.serialize_index``, also readable by ``faiss.deserialize_index``.
        """
        with self._lock:
            if isinstance(self._store, TorchBackend):
                index = faiss.IndexFlatIP(self.dim)
                if self._store.ntotal:
                    index.add(self._store.vectors())
            else:
                index = self._store.faiss_index()
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
        index, found, fparams = read_faiss_index(buf)
        if kind is not None:
            check_choice("kind", kind, KINDS)
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
            if isinstance(obj._store, TorchBackend):
                if index.ntotal:
                    obj._store.add(index.reconstruct_n(0, index.ntotal))
            else:
                obj._store.adopt(index)
        return obj

    # ------------------------------------------------------------------ diagnostics

    def describe(self) -> dict[str, Any]:
        """Kind, backend, device, size and parameters, for logs and diagnostics."""
        with self._lock:
            if isinstance(self._store, TorchBackend):
                storage = f"torch.{self.params['torch_dtype']}"
            else:
                storage = self._store.storage
            out: dict[str, Any] = {
                "kind": self.kind,
                "backend": self.backend,
                "device": self.device,
                "dim": self.dim,
                "ntotal": self.ntotal,
                "trained": self._store.is_trained,
                "storage": storage,
                "params": dict(self.params),
            }
            if not self._store.is_trained:
                out["train_threshold"] = self._store.min_train()
            return out


# ---------------------------------------------------------------------- the index of a map


def index_for_map(kmap: KeyframeMap, kind: str = "auto", device: str = "auto", *,
                  memory_limit_bytes: int | None = None, mmap_params: MmapIndexParams | None = None,
                  **params: Any) -> PlaceIndex | MmapIndex:
    """The search index over every keyframe of ``kmap``.

    The map's stored index is used when it is fresh (built over all current rows) and of this kind
    (:data:`INDEX_KIND_NAMES`); otherwise the index is built from the map in blocks (no concatenated float32 copy of
    the map). The log says which, and why ``auto`` chose its kind (:func:`~.index_choice.resolve_kind`).

    Args:
        kmap: the map.
        kind: "auto", "exact", "hnsw", "ivfpq" or "ivfpq_mmap" (:data:`MAP_KINDS`). ivfpq_mmap on a map too small to
            train it (:func:`~.mmap_index.min_train_rows`) is exact, logged.
        device: "auto", "cpu" or "cuda" (only exact search runs on CUDA).
        memory_limit_bytes: RAM the index may take (None: 80 % of MemAvailable); see :func:`~.index_choice.check_fits`.
        mmap_params: parameters of an ivfpq_mmap index (search-time ones apply to a stored one too).
        **params: further :class:`PlaceIndex` arguments (e.g. ``hnsw_ef_search``).

    Returns:
        The index; row i is map row i.

    Raises:
        IndexConfigError: an unknown kind or device, a kind the device cannot run, or an index that would not fit in
            RAM (the message gives the estimate and the kind to use instead).
    """
    if kind not in MAP_KINDS:
        raise IndexConfigError(f"index kind {kind!r} is unknown; expected one of {', '.join(MAP_KINDS)}")
    requested = kind
    kind, why = resolve_kind(kind, kmap, INDEX_KIND_NAMES)
    if requested == "auto" and kind != "exact" and device == "cuda":
        device = "cpu"  # approximate kinds run on the CPU (exact search is what runs on CUDA)
    if kind == MMAP_KIND and len(kmap) < min_train_rows(mmap_params or MmapIndexParams()):
        LOG.info("index: %s needs %d keyframes to train, the map has %d: exact search instead", MMAP_KIND,
                 min_train_rows(mmap_params or MmapIndexParams()), len(kmap))
        kind, why = "exact", "too few keyframes for ivfpq_mmap"
    if kind == MMAP_KIND:
        return _mmap_index_for_map(kmap, why, memory_limit_bytes, mmap_params)
    blob, stored = kmap.index_blob, kmap.index_kind
    resolved_device = resolve_device_backend(kind, device, params.get("backend", "auto"))[0]
    check_fits(kind, len(kmap), kmap.descriptor_dim, resolved_device, params, memory_limit_bytes)
    if blob is None:
        reason = "the map has no fresh stored index"
    elif stored != INDEX_KIND_NAMES[kind]:
        reason = f"the stored index is {stored!r}, not {INDEX_KIND_NAMES[kind]!r}"
    else:
        try:
            index = PlaceIndex.from_bytes(blob, device, kind=kind, **params)
        except IndexConfigError:
            raise
        except PlaceIndexError as exc:
            reason = f"the stored index could not be read ({exc})"
        else:
            if index.ntotal == len(kmap) and index.dim == kmap.descriptor_dim:
                LOG.info("index: using the stored %s index of the map (%d rows), %s", stored, index.ntotal, why)
                return index
            reason = (f"the stored index holds {index.ntotal} rows of dim {index.dim}, the map {len(kmap)} of dim "
                      f"{kmap.descriptor_dim}")
    t0 = time.perf_counter()
    index = PlaceIndex(kmap.descriptor_dim, kind, device, **params)
    if kind == "ivfpq" and len(kmap) >= index.describe().get("train_threshold", len(kmap) + 1):
        # train on the whole map (a strided sample), not on its first block only
        stride = max(1, len(kmap) // _IVF_TRAIN_SAMPLE)
        index.train(np.concatenate([block[::stride] for block in kmap.iter_descriptors_f32(block_rows=stride * 4096)]))
    for block in kmap.iter_descriptors_f32():
        index.add(block)
    LOG.info("index: %s index built over %d rows in %.2f s (%s), %s", kind, index.ntotal, time.perf_counter() - t0,
             reason, why)
    return index


def _mmap_index_for_map(kmap: KeyframeMap, why: str, memory_limit_bytes: int | None,
                        params: MmapIndexParams | None) -> MmapIndex:
    """The map's stored ivfpq_mmap index when fresh and readable, else one trained on the map."""
    if kmap.index_kind == MMAP_STORED_KIND:
        try:
            index = MmapIndex.from_stored(kmap, params)
        except PlaceIndexError as exc:
            reason = f"the stored index could not be read ({exc})"
        else:
            LOG.info("index: using the stored %s index of the map (%d rows), %s", MMAP_KIND, index.ntotal, why)
            return index
    else:
        reason = "the map has no fresh stored ivfpq_mmap index"
    check_fits(MMAP_KIND, len(kmap), kmap.descriptor_dim, "cpu", None, memory_limit_bytes)
    LOG.info("index: training %s over %d rows (%s; %s)", MMAP_KIND, len(kmap), reason, why)
    return MmapIndex.train(kmap, params)


def save_map_with_index(kmap: KeyframeMap, path: str | Path, index: PlaceIndex | MmapIndex | None = None) -> Path:
    """Save ``kmap`` atomically; an approximate index is stored with it (exact ones are rebuilt on load).

    Args:
        kmap: the map.
        path: the map directory.
        index: the map's index; stored when it is approximate and covers every row of the map (an ivfpq_mmap index
            as its quantizers plus code chunks that later saves append to).

    Returns:
        The path the map was saved to.
    """
    if isinstance(index, MmapIndex) and index.ntotal == len(kmap):
        blob, codes = index.stored()
        kmap.set_index(blob, MMAP_STORED_KIND, codes=codes)
        return save_map(kmap, path)
    if index is not None and index.kind not in ("exact", MMAP_KIND) and index.ntotal == len(kmap):
        return save_map(kmap, path, index.to_bytes(), INDEX_KIND_NAMES[index.kind])
    return save_map(kmap, path)
