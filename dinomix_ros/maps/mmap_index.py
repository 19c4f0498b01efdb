"""The search index of a large map: compact codes in RAM, exact re-ranking from the map's memory-mapped descriptors.

Kind ``"ivfpq_mmap"`` (``map.index``; stored with the map as ``"faiss_ivfpq_mmap"``). For a map of N keyframes it
holds in RAM only a faiss ``IndexPreTransform(LinearTransform, IndexIVFPQ(nlist, pq_m x 8 bits))`` (the transform:
PCA from D to ``pca_dim`` dimensions and a random rotation; the quantizers: ~5 MB at the defaults) and N codes of
``pq_m`` + 2 bytes plus an 8-byte id (~74 MB per million keyframes), never a float32 copy of the map. A query

1. searches the codes (``nprobe`` of ``nlist`` inverted lists) for a short list of ``shortlist`` candidate rows,
2. reads those rows' stored descriptors from the map (:meth:`KeyframeMap.descriptor_rows`, which touches only
   their pages of the memory-mapped chunks) and scores them exactly (float32 inner products of the stored values,
   the numbers exact search gives),
3. returns the best ``k`` of them.

Rows the PCA represents badly (it keeps less than half of their energy: descriptors unlike the training sample, e.g.
an indoor area recorded into an index trained on streets) cannot be placed by their codes; they form an exact side
list that every query re-ranks with its short list (up to ``exact_max`` of them; beyond that the log asks for a
rebuild).

Masks (``allowed=``, position and recency gates) stay exact: a mask allowing at most ``exact_max`` rows is searched
exhaustively over those rows (gathered from the memory map), so a tight gate always finds its true best; a wider
one filters the inverted lists with an ``IDSelectorBitmap`` while visiting more of them (``nprobe`` grows as the
allowed fraction shrinks, up to 8x) and re-ranks as above.

Training takes a strided sample of ``train_sample`` rows (65536 by default: minutes for a million-keyframe map on
two cores, not hours). Rows added later (recording into the map) are encoded with the trained quantizers and go
straight into the inverted lists: they are searched from the next query on and saved as a new code chunk; the
quantizers are not retrained (rebuild the index, ``dinomix map import``/``build``, once the map has grown several
times over what it was trained on: :meth:`describe` says both).

Stored with the map (:func:`~dinomix_ros.maps.storage.save_map`): the trained, empty index as one faiss blob
(read back through :func:`~dinomix_ros.maps.faiss_backend.read_faiss_index`'s guard: a forked child with a capped
address space first) and the codes as ``codes.gNNNNNN.npy`` chunks (uint8 (rows, list-number bytes + ``pq_m`` + 1):
faiss's ``sa_encode`` code, then the share of the row's energy the PCA keeps x 255), appended by each save like the
descriptor chunks, memory-mapped at load and checked (every list number below nlist) before faiss sees them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import faiss
import numpy as np

from dinomix_ros.maps.errors import DescriptorError, EmptyIndexError, IndexConfigError, IndexFormatError
from dinomix_ros.maps.faiss_backend import MIN_POINTS_PER_CENTROID, PQ_NBITS, read_trusted_blob
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.masks import normalize_allowed

__all__ = ["KIND", "STORED_KIND", "MmapIndex", "MmapIndexParams", "min_train_rows"]

LOG = logging.getLogger(__name__)

KIND = "ivfpq_mmap"
STORED_KIND = "faiss_ivfpq_mmap"
_ENCODE_BLOCK = 16384  # rows converted to float32 and encoded at a time (256 MB at 4096-d)
_GATHER_BLOCK = 8192  # rows gathered from the map at a time by an exhaustive masked search
_MAX_NPROBE_GROWTH = 8
_PCA_SAMPLE = 16384
#: Rows whose PCA projection keeps less than this share of their energy (unlike what the index was trained on: the
#: corridor's random-weight descriptors in a synthetic city keep 6 %, the city's own rows 72-76 %) are re-ranked
#: with every query's short list: their codes cannot place them.
_OUTLIER_ENERGY = 0.5


@dataclass(frozen=True)
class MmapIndexParams:
    """Structure (fixed at training) and search parameters of an ``ivfpq_mmap`` index.

    Attributes:
        pca_dim: dimension after PCA (with a random rotation, so PQ sub-vectors share the variance); 0 (or at
            least D): no PCA.
        nlist: inverted lists; None: ``clamp(2 sqrt(N), 1, N / 39, 65536)`` for the N rows at training.
        pq_m: PQ sub-quantizers (code bytes per row); must divide ``pca_dim`` (or D without PCA).
        nprobe: inverted lists visited per query; None: 15 % of nlist, at least 32 (recall@1 vs exact is set by
            the share of lists visited, not by the short list: measured on the bench city, 0.95 at 4 %, 0.98 at
            10 % (1M keyframes) and 15 % (100k)).
        shortlist: candidates re-ranked exactly per query (at least k).
        exact_max: masks allowing at most this many rows are searched exhaustively.
        train_sample: rows the quantizers are trained on (a strided sample of the map).
    """

    pca_dim: int = 256
    nlist: int | None = None
    pq_m: int = 64
    nprobe: int | None = None
    shortlist: int = 128
    exact_max: int = 8192
    train_sample: int = 65536

    def __post_init__(self) -> None:
        if self.nprobe is not None and (type(self.nprobe) is not int or self.nprobe < 1):
            raise IndexConfigError(f"nprobe must be an int >= 1 or None, found {self.nprobe!r}")
        for name in ("pq_m", "shortlist", "train_sample"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise IndexConfigError(f"{name} must be an int >= 1, found {value!r}")
        for name in ("pca_dim", "exact_max"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise IndexConfigError(f"{name} must be an int >= 0, found {value!r}")
        if self.nlist is not None and (type(self.nlist) is not int or self.nlist < 1):
            raise IndexConfigError(f"nlist must be an int >= 1 or None, found {self.nlist!r}")
        if self.pca_dim and self.pca_dim % self.pq_m:
            raise IndexConfigError(f"pq_m={self.pq_m} does not divide pca_dim={self.pca_dim}")


def min_train_rows(params: MmapIndexParams) -> int:
    """Rows a map needs before this index can be trained (39 per coarse centroid and per PQ centroid)."""
    return MIN_POINTS_PER_CENTROID * max(params.nlist or 0, 2 ** PQ_NBITS)


class MmapIndex:
    """An ``ivfpq_mmap`` index over a map (see the module docstring); build it with :meth:`train` or
    :meth:`from_stored`, or through :func:`~dinomix_ros.maps.index.index_for_map`.

    Same search interface as :class:`~dinomix_ros.maps.index.PlaceIndex`: ``search(xq, k, allowed=)`` returns
    ``(D, I)``, similarities in [-1, 1] descending (``-inf`` padding) and map rows (``-1`` padding). Row ``i`` is map
    row ``i``; the map must hold every row the index does (the live map adds to the map first). Thread-safe: one
    re-entrant lock around adds and searches.
    """

    kind = KIND
    backend = "faiss"
    device = "cpu"
    is_trained = True

    def __init__(self, kmap: KeyframeMap, index: Any, blob: np.ndarray, params: MmapIndexParams,
                 codes: list[np.ndarray], trained_on: int | None = None) -> None:
        """Internal: use :meth:`train` or :meth:`from_stored`."""
        self.kmap = kmap
        self.dim = kmap.descriptor_dim
        self.params = params
        self._index = index  # IndexPreTransform(PCA, IVFPQ) or IndexIVFPQ
        self._ivf = faiss.extract_index_ivf(index)
        self._blob = blob  # the trained, empty index: what is stored with the map
        self._codes = codes  # per-row stored codes in row order (memory-mapped chunks, then added blocks)
        self._outliers = np.empty(0, dtype=np.int64)  # rows the PCA keeps less than half of: searched exactly
        self._warned_outliers = False
        self._lock = threading.RLock()
        self._ivf.nprobe = self.nprobe
        self.trained_on = trained_on  # rows of the map at training (None: loaded, unknown)

    # ------------------------------------------------------------------ building

    @classmethod
    def train(cls, kmap: KeyframeMap, params: MmapIndexParams | None = None,
              progress: Callable[[int], None] | None = None) -> MmapIndex:
        """Train on a strided sample of ``kmap`` and encode every row (in blocks: no float32 copy of the map).

        Raises:
            IndexConfigError: the map has fewer rows than training needs (:func:`min_train_rows`), or the PCA or PQ
                sizes do not fit its dimension.
        """
        params = params or MmapIndexParams()
        n, dim = len(kmap), kmap.descriptor_dim
        need = min_train_rows(params)
        if n < need:
            raise IndexConfigError(f"map.index {KIND} needs at least {need} keyframes to train its quantizers, the map "
                                   f"has {n}: use map.index exact (or auto) for a map this small")
        if params.pca_dim >= dim:  # nothing to reduce
            params = replace(params, pca_dim=0)
        if (params.pca_dim or dim) % params.pq_m:
            raise IndexConfigError(f"pq_m {params.pq_m} does not divide the {params.pca_dim or dim} dimensions it "
                                   "encodes")
        t0 = time.perf_counter()
        sample_rows = np.unique(np.linspace(0, n - 1, min(n, params.train_sample)).astype(np.int64))
        sample = kmap.descriptor_rows(sample_rows).astype(np.float32)
        nlist = params.nlist or max(1, min(int(round(2 * math.sqrt(n))), n // MIN_POINTS_PER_CENTROID, 65536))
        nlist = min(nlist, sample.shape[0] // MIN_POINTS_PER_CENTROID)
        params = replace(params, nlist=nlist)
        LOG.info("training %s: %d-row sample of %d, %s", KIND, sample.shape[0], n, asdict(params))
        blob = _trained_blob(sample, dim, params)
        del sample
        obj = cls(kmap, faiss.deserialize_index(blob), blob, params, [], trained_on=n)
        t1 = time.perf_counter()
        for start in range(0, n, _ENCODE_BLOCK):
            obj.add(kmap.descriptor_rows(np.arange(start, min(start + _ENCODE_BLOCK, n))))
            if progress is not None:
                progress(min(start + _ENCODE_BLOCK, n))
        LOG.info("%s over %d rows: trained in %.1f s, encoded in %.1f s", KIND, n, t1 - t0, time.perf_counter() - t1)
        return obj

    @classmethod
    def from_stored(cls, kmap: KeyframeMap, params: MmapIndexParams | None = None) -> MmapIndex:
        """The index stored with ``kmap`` (``kmap.index_blob`` / ``kmap.index_codes``, kind ``faiss_ivfpq_mmap``).

        Search parameters (nprobe, shortlist, exact_max) come from ``params``; the structure from the stored blob.

        Raises:
            IndexFormatError: no such stored index, a blob that is not a trained empty PCA/IVF-PQ inner-product
                index of the map's dimension, or codes of another width or with list numbers out of range.
        """
        if kmap.index_kind != STORED_KIND or kmap.index_codes is None:
            raise IndexFormatError(f"the map has no fresh stored {STORED_KIND} index (found {kmap.index_kind!r})")
        blob = kmap.index_blob
        index = read_trusted_blob(blob)
        ivf = faiss.extract_index_ivf(index) if isinstance(index, (faiss.IndexPreTransform, faiss.IndexIVF)) else None
        if ivf is None or index.d != kmap.descriptor_dim or index.metric_type != faiss.METRIC_INNER_PRODUCT \
                or ivf.ntotal != 0 or not index.is_trained:
            raise IndexFormatError(f"the stored {STORED_KIND} blob is not a trained, empty {kmap.descriptor_dim}-d "
                                   "PCA/IVF-PQ inner-product index: rebuild the index")
        pq = faiss.downcast_index(ivf).pq
        pca_dim = index.chain.at(0).d_out if isinstance(index, faiss.IndexPreTransform) else 0
        params = replace(params or MmapIndexParams(), pca_dim=pca_dim, nlist=int(ivf.nlist), pq_m=int(pq.M))
        codes = list(kmap.index_codes)
        width = int(index.sa_code_size()) + 1
        obj = cls(kmap, index, blob, params, [])
        for block in codes:
            if block.shape[1] != width:
                raise IndexFormatError(f"the stored codes are {block.shape[1]} bytes wide, the index's are {width}")
            obj._add_codes(block)
        return obj

    @property
    def nprobe(self) -> int:
        """Inverted lists a query visits (``params.nprobe``, or 15 % of the lists and at least 32)."""
        nlist = int(self._ivf.nlist)
        return min(nlist, self.params.nprobe or max(32, math.ceil(0.15 * nlist)))

    # ------------------------------------------------------------------ size

    @property
    def ntotal(self) -> int:
        with self._lock:
            return int(self._ivf.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return f"MmapIndex(dim={self.dim}, ntotal={self.ntotal}, {asdict(self.params)})"

    def ram_bytes(self) -> int:
        """Bytes this index holds in RAM: the inverted lists (codes and ids) and the quantizers."""
        with self._lock:
            per_row = self._ivf.code_size + 8
            return int(self._ivf.ntotal) * per_row + len(self._blob)

    # ------------------------------------------------------------------ add

    def add(self, xb: np.ndarray) -> None:
        """Encode (n, D) descriptors (the map's next rows) with the trained quantizers and add them."""
        xb = np.asarray(xb)
        if xb.ndim == 1:
            xb = xb[None]
        if xb.ndim != 2 or xb.shape[1] != self.dim or xb.dtype.kind != "f":
            raise DescriptorError(f"xb must be float (n, {self.dim}), found {xb.dtype} {xb.shape}")
        if xb.shape[0] == 0:
            return
        x = np.ascontiguousarray(xb, dtype=np.float32)
        if not np.isfinite(x).all():
            raise DescriptorError("xb holds NaN or inf: expected finite unit descriptors")
        kept = np.ones(x.shape[0], dtype=np.float32)
        if isinstance(self._index, faiss.IndexPreTransform):  # the share of each row's energy the PCA keeps
            transform = faiss.downcast_VectorTransform(self._index.chain.at(0))
            a = faiss.vector_to_array(transform.A).reshape(transform.d_out, transform.d_in)
            kept = np.einsum("ij,ij->i", x @ a.T, x @ a.T) / np.maximum(np.einsum("ij,ij->i", x, x), 1e-12)
        energy = np.clip(np.rint(kept * 255), 0, 255).astype(np.uint8)[:, None]
        with self._lock:
            self._add_codes(np.concatenate([self._index.sa_encode(x), energy], axis=1))

    def _add_codes(self, stored: np.ndarray) -> None:
        """Add (n, code_size + 1) stored codes as the next rows: faiss's sa code (checked: list numbers below nlist)
        and the share of the row's energy the PCA keeps (x 255; below half: the row goes to the exact side list)."""
        codes = stored[:, :-1]
        with self._lock:
            nbytes = int(self._ivf.coarse_code_size())
            lists = np.zeros(codes.shape[0], dtype=np.int64)
            for b in range(nbytes):
                lists |= codes[:, b].astype(np.int64) << (8 * b)
            if codes.shape[0] and int(lists.max()) >= self._ivf.nlist:
                raise IndexFormatError(f"codes name inverted list {int(lists.max())}, the index has {self._ivf.nlist}:"
                                       " damaged codes; rebuild the index")
            start = int(self._ivf.ntotal)
            self._ivf.add_sa_codes(np.ascontiguousarray(codes), np.arange(start, start + codes.shape[0],
                                                                          dtype=np.int64))
            self._index.ntotal = self._ivf.ntotal
            self._codes.append(stored)
            poor = np.flatnonzero(stored[:, -1] < _OUTLIER_ENERGY * 255) + start
            if poor.size:
                self._outliers = np.concatenate([self._outliers, poor])
                if self._outliers.size > self.params.exact_max and not self._warned_outliers:
                    self._warned_outliers = True
                    LOG.warning("%s: %d keyframes lie outside the subspace the index was trained on (more than "
                                "exact_max %d are searched exactly only by their codes): rebuild the index on the "
                                "map as it is now", KIND, self._outliers.size, self.params.exact_max)

    # ------------------------------------------------------------------ search

    def search(self, xq: np.ndarray, k: int, *, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar rows per query (see the class docstring; ``allowed`` as in ``PlaceIndex.search``)."""
        xq = np.asarray(xq)
        if xq.ndim == 1:
            xq = xq[None]
        if xq.ndim != 2 or xq.shape[1] != self.dim or xq.dtype.kind != "f" or not np.isfinite(xq).all():
            raise DescriptorError(f"xq must be finite float (nq, {self.dim}), found {xq.dtype} {xq.shape}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise IndexConfigError(f"k must be an int >= 1, found {k!r}.")
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        nq, k = xq.shape[0], int(k)
        D = np.full((nq, k), -np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)  # noqa: E741
        with self._lock:
            ntotal = int(self._ivf.ntotal)
            if ntotal == 0:
                raise EmptyIndexError("search on an empty index (ntotal=0): add() descriptors before searching.")
            mask = normalize_allowed(allowed, nq, ntotal)
            for q in range(nq):
                m = mask if mask is None or mask.ndim == 1 else mask[q]
                D[q], I[q] = self._search_one(xq[q], k, m, ntotal)
        return D, I

    def _search_one(self, q: np.ndarray, k: int, mask: np.ndarray | None,
                    ntotal: int) -> tuple[np.ndarray, np.ndarray]:
        n_allowed = ntotal if mask is None else int(np.count_nonzero(mask))
        if n_allowed == 0:
            return np.full(k, -np.inf, np.float32), np.full(k, -1, np.int64)
        if mask is not None and n_allowed <= self.params.exact_max:
            return self._exhaustive(q, k, np.flatnonzero(mask))
        nprobe = self.nprobe
        sel = bitmap = None
        if mask is not None:
            bitmap = np.packbits(mask, bitorder="little")  # bit i of byte i >> 3 is row i, as IDSelectorBitmap reads
            sel = faiss.IDSelectorBitmap(bitmap)
            nprobe = math.ceil(nprobe * min(ntotal / n_allowed, _MAX_NPROBE_GROWTH))
        ivf_params = faiss.SearchParametersIVF(nprobe=min(nprobe, self._ivf.nlist), sel=sel)
        params = faiss.SearchParametersPreTransform(index_params=ivf_params) \
            if isinstance(self._index, faiss.IndexPreTransform) else ivf_params
        _, cand = self._index.search(q[None], max(self.params.shortlist, k), params=params)
        del bitmap  # the selector reads the bitmap during the search: kept alive until here
        side = self._outliers[-self.params.exact_max:] if self.params.exact_max else self._outliers[:0]
        if mask is not None and side.size:
            side = side[mask[side]]
        rows = np.unique(np.concatenate([cand[0][cand[0] >= 0], side]))
        return self._rerank(q, k, rows)

    def _rerank(self, q: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The best k of ``rows`` by exact inner product with their stored descriptors."""
        D, I = np.full(k, -np.inf, np.float32), np.full(k, -1, np.int64)  # noqa: E741
        if rows.size == 0:
            return D, I
        scores = _scores(self.kmap.descriptor_rows(rows), q)
        top = _top(scores, k)
        D[:top.size], I[:top.size] = np.clip(scores[top], -1.0, 1.0), rows[top]
        return D, I

    def _exhaustive(self, q: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the allowed ``rows`` (a tight gate), gathered from the map in blocks."""
        best_s, best_r = np.empty(0, np.float32), np.empty(0, np.int64)
        for start in range(0, rows.size, _GATHER_BLOCK):
            part = rows[start:start + _GATHER_BLOCK]
            s = _scores(self.kmap.descriptor_rows(part), q)
            best_s, best_r = np.concatenate([best_s, s]), np.concatenate([best_r, part])
            top = _top(best_s, k)
            best_s, best_r = best_s[top], best_r[top]
        D, I = np.full(k, -np.inf, np.float32), np.full(k, -1, np.int64)  # noqa: E741
        D[:best_s.size], I[:best_r.size] = np.clip(best_s, -1.0, 1.0), best_r
        return D, I

    # ------------------------------------------------------------------ storing and diagnostics

    def stored(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """(blob, codes): what :func:`~dinomix_ros.maps.index.save_map_with_index` stores with the map."""
        with self._lock:
            return self._blob, list(self._codes)

    def describe(self) -> dict[str, Any]:
        """Kind, size, RAM and parameters, for logs and diagnostics."""
        with self._lock:
            return {"kind": KIND, "backend": self.backend, "device": self.device, "dim": self.dim,
                    "ntotal": int(self._ivf.ntotal), "trained": True, "trained_on": self.trained_on,
                    "exact_side_list": int(self._outliers.size),
                    "storage": "IVF-PQ codes in RAM, exact re-rank from the map's memory-mapped descriptors",
                    "ram_bytes": self.ram_bytes(), "nprobe": self.nprobe, "params": asdict(self.params)}


def _trained_blob(sample: np.ndarray, dim: int, params: MmapIndexParams) -> np.ndarray:
    """The trained, empty index serialised (what is stored with the map; deserialised, it owns all its parts)."""
    width = params.pca_dim or dim
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(width), width, params.nlist, params.pq_m, PQ_NBITS,
                           faiss.METRIC_INNER_PRODUCT)
    if not params.pca_dim:
        ivf.train(sample)
        return faiss.serialize_index(ivf)
    pca = _pca_transform(sample, params.pca_dim)
    index = faiss.IndexPreTransform(pca, ivf)
    index.train(sample)  # the transform is trained: only the IVF-PQ trains, on the projected sample
    return faiss.serialize_index(index)


def _pca_transform(sample: np.ndarray, width: int, seed: int = 0) -> Any:
    """``y = R V (x - mean)``: the top ``width`` principal directions V of the sample and a random rotation R (so
    that the PQ sub-vectors share the variance), as a trained faiss LinearTransform.

    Randomized SVD (Halko et al. 2011: range finder with two power iterations) on at most :data:`_PCA_SAMPLE` rows:
    seconds for 4096-d, where faiss's PCAMatrix (a full D x D eigendecomposition) takes minutes on two cores.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(sample[:: max(1, sample.shape[0] // _PCA_SAMPLE)], dtype=np.float32)
    mean = x.mean(axis=0)
    x = x - mean
    y = x @ rng.standard_normal((x.shape[1], width + 64)).astype(np.float32)
    for _ in range(2):
        q, _ = np.linalg.qr(y)
        y = x @ (x.T @ q)
    q, _ = np.linalg.qr(y)
    _, _, vt = np.linalg.svd(q.T @ x, full_matrices=False)
    rotation, _ = np.linalg.qr(rng.standard_normal((width, width)))
    a = (rotation @ vt[:width]).astype(np.float32)
    transform = faiss.LinearTransform(x.shape[1], width, True)
    faiss.copy_array_to_vector(a.ravel(), transform.A)
    faiss.copy_array_to_vector((-a @ mean).astype(np.float32), transform.b)
    transform.is_trained = True
    return transform


def _scores(rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Inner products of the stored ``rows`` (float16/float32) with the float32 query, in float32.

    A short list is scored by a plain loop (einsum): a BLAS matrix-vector product wakes the BLAS thread pool, which
    on a loaded 2-core machine cost 10 ms for 128 rows instead of 0.04 ms (measured). Large blocks use BLAS.
    """
    rows = rows.astype(np.float32, copy=False)
    return rows @ q if rows.shape[0] > 2048 else np.einsum("ij,j->i", rows, q)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first."""
    if scores.size <= k:
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]
