"""Geotagged keyframe map in memory: DINO-Mix descriptors plus poses, geotags and the model fingerprint.

A :class:`KeyframeMap` is a table with one row per keyframe (struct of arrays: row ``i`` of every column is keyframe
``i``). Rows are only ever appended; ids are assigned increasing by :meth:`KeyframeMap.add` and never reused, so an id
that went out in a message keeps meaning the same place. A :class:`KeyframeMap` object is not thread-safe.

Memory: a loaded map keeps its descriptor chunks separate (memory maps after ``load_map(path, mmap=True)``);
:attr:`KeyframeMap.descriptors` concatenates them once, on first access, into RAM (a 1M x 4096 float16 map is 8 GB),
and is a zero-copy memory map when the map has a single chunk (``save_map(kmap, path, compact=True)`` rewrites all
chunks into one). :meth:`KeyframeMap.iter_descriptors_f32` streams float32 blocks without concatenating, and
:meth:`KeyframeMap.descriptor_rows` gathers a few rows (a search's short list) from any chunk.

Persistence is not this module's: :func:`dinomix_ros.maps.storage.save_map` and
:func:`dinomix_ros.maps.loading.load_map` are functions over the table (the on-disk format, its atomic generations and
its lock live there and in :mod:`dinomix_ros.maps.manifest`, documented in ``maps/README.md``), and this module
imports none of them. What a valid row is lives in :mod:`dinomix_ros.maps.validation`, shared by
:meth:`KeyframeMap.add` and loading. The map's errors are defined in :mod:`dinomix_ros.maps.errors` and importable
from here.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np

from dinomix_ros.maps.errors import (  # defined there, importable from here (see the module docstring)
    KeyframeNotFoundError, MapConflictError, MapError, MapFormatError, MapLockedError, MapMismatchError,
    MapNotFoundError,
)
from dinomix_ros.imaging.features import LocalFeatures
from dinomix_ros.maps.local_features import KeyframeFeatures
from dinomix_ros.maps.validation import (
    STORAGE_DTYPES, as_float_rows, as_index_blob, as_int_column, as_str_column, as_zone_column, check_columns,
    check_descriptors, check_fingerprint, check_index_kind, check_metadata, check_same_model, dtype_name, empty_columns,
)
from dinomix_ros.settings import check, setting
from dinomix_ros.util.mmaps import gather_rows

__all__ = [
    "Keyframe",
    "KeyframeMap",
    "StorageConfig",
    "KeyframeNotFoundError",
    "MapConflictError",
    "MapError",
    "MapFormatError",
    "MapLockedError",
    "MapMismatchError",
    "MapNotFoundError",
    "utc_now_iso",
]


@dataclass(frozen=True)
class StorageConfig:
    """How new maps store descriptors (node parameter ``map.storage_dtype``, CLI ``--storage-dtype``)."""

    SETTINGS_GROUP: ClassVar[str] = "map"

    storage_dtype: str = setting("float16", "descriptor storage of new maps: float16 (half the size) or float32",
                                 choices=tuple(STORAGE_DTYPES), reconfigure=True)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class Keyframe:
    """One row of a :class:`KeyframeMap`, as plain Python values (for messages and logs).

    Unknown values are ``None`` (``position``, ``orientation``, ``gps``, ``utm``), ``0`` (``utm_zone``) or ``""``
    (``utm_band``, ``source``). ``gps`` is ``(lat, lon, alt)`` with ``alt`` NaN when unknown; ``orientation`` is
    ``(x, y, z, w)``; ``utm`` is ``(easting, northing)``. ``descriptor`` is a read-only view in storage dtype.
    """

    row: int
    id: int
    stamp_ns: int
    camera: str
    frame_id: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float] | None
    gps: tuple[float, float, float] | None
    utm_zone: int
    utm_band: str
    utm: tuple[float, float] | None
    source: str
    descriptor: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True)
class _AttachedIndex:
    """A serialized search index attached to a map: the blob, its kind, the row count it covers and its sha256, and
    for an index stored as codes per row (kind "faiss_ivfpq_mmap") those codes, in row order."""

    blob: np.ndarray
    kind: str
    rows: int
    sha256: str
    codes: tuple[np.ndarray, ...] | None = None


class KeyframeMap:
    """Keyframes with descriptors, poses, geotags and the fingerprint of the model that described them.

    Build one with :meth:`empty` and :meth:`add`, or load one with :func:`~dinomix_ros.maps.loading.load_map`;
    save it with :func:`~dinomix_ros.maps.storage.save_map`. Column
    properties (:attr:`ids`, :attr:`positions`, ...) return read-only arrays with row ``i`` = keyframe ``i``.

    Attributes:
        fingerprint: The model fingerprint (JSON dict with at least ``id``, ``architecture``, ``weights_sha256``,
            ``preprocessing``, ``descriptor_dim``). Maps and models are compatible iff ``fingerprint["id"]`` matches.
        metadata: Free-form JSON-able dict (name, created, source, notes, calibration, ...); saved with the map.
        created: ISO 8601 UTC time the map was created.
    """

    def __init__(
        self,
        fingerprint: dict[str, Any],
        *,
        descriptor_dim: int,
        storage_dtype: str,
        metadata: dict[str, Any],
        created: str,
        next_id: int = 0,
        columns: dict[str, np.ndarray] | None = None,
        segments: list[np.ndarray] | None = None,
    ) -> None:
        """Internal constructor, for :meth:`subset`, loading and importing; use :meth:`empty` or ``load_map``."""
        self.fingerprint = fingerprint
        self.metadata = metadata
        self.created = created
        self._dim = descriptor_dim
        self._dtype_name = storage_dtype
        self._dtype = STORAGE_DTYPES[storage_dtype]
        self._next_id = next_id
        self._cols = columns if columns is not None else empty_columns()
        for arr in self._cols.values():
            arr.flags.writeable = False
        self._pending: list[dict[str, np.ndarray]] = []
        self._segments: list[np.ndarray] = segments if segments is not None else []
        self._segment_ends: np.ndarray | None = None  # cumulative row counts of _segments, built on use
        self._count = int(self._cols["ids"].shape[0])
        self._index: _AttachedIndex | None = None
        # What this object knows is committed on disk, per map directory: owned by dinomix_ros.maps.storage and
        # .loading (which use it to append and to detect other writers) and opaque here. A new object (subset())
        # starts with none.
        self._storage_state: Any = None
        # The content check of a loaded map's chunks (dinomix_ros.maps.integrity.MapIntegrity), set by loading; None
        # for a map built in memory or loaded with verify=False. Opaque here.
        self.integrity: Any = None
        # Local features per row and intrinsics per camera (map format 2), None for maps without them (format 1).
        self.local_features: KeyframeFeatures | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def empty(
        cls,
        fingerprint: dict[str, Any],
        *,
        descriptor_dim: int | None = None,
        storage_dtype: str = "float16",
        metadata: dict[str, Any] | None = None,
    ) -> KeyframeMap:
        """Create a map with no keyframes.

        Args:
            fingerprint: Fingerprint of the model that will describe the keyframes (copied).
            descriptor_dim: Descriptor length; defaults to ``fingerprint["descriptor_dim"]`` and must agree with it.
            storage_dtype: ``"float16"`` (half the size, ~5e-4 relative error) or ``"float32"``.
            metadata: Free-form JSON-able dict (copied).

        Returns:
            The empty map.

        Raises:
            MapError: The fingerprint lacks a key or has a wrong type, the dims disagree, the dtype is not
                supported, or the metadata is not JSON-able.
        """
        fingerprint = copy.deepcopy(fingerprint)
        check_fingerprint(fingerprint, "fingerprint", MapError)
        if descriptor_dim is None:
            descriptor_dim = fingerprint["descriptor_dim"]
        if type(descriptor_dim) is not int or descriptor_dim != fingerprint["descriptor_dim"]:
            raise MapError(
                f"descriptor_dim={descriptor_dim!r} but fingerprint['descriptor_dim']={fingerprint['descriptor_dim']}: "
                "the map stores what the model outputs; leave descriptor_dim out or pass the fingerprint's value"
            )
        name = dtype_name(storage_dtype)
        metadata = copy.deepcopy(metadata) if metadata is not None else {}
        check_metadata(metadata, "metadata", MapError)
        return cls(fingerprint, descriptor_dim=descriptor_dim, storage_dtype=name, metadata=metadata,
                   created=utc_now_iso())

    def add(
        self,
        descriptors: np.ndarray,
        *,
        stamps_ns: Sequence[int] | np.ndarray,
        cameras: str | Sequence[str],
        frame_ids: str | Sequence[str],
        positions: np.ndarray | None = None,
        orientations: np.ndarray | None = None,
        gps: np.ndarray | None = None,
        utm_zones: int | Sequence[int] | np.ndarray | None = None,
        utm_bands: str | Sequence[str] | None = None,
        utm: np.ndarray | None = None,
        sources: str | Sequence[str] | None = None,
        features: Sequence[LocalFeatures | None] | None = None,
    ) -> np.ndarray:
        """Append keyframes; everything is validated before anything is changed.

        Args:
            descriptors: (N, D) or (D,) float array of L2-normalised descriptors (finite, norm within
                :data:`~dinomix_ros.maps.validation.NORM_TOLERANCE` of 1). Stored in the map's storage dtype.
            stamps_ns: (N,) integer capture stamps in nanoseconds (ROS time). Floats are refused: float seconds
                cannot hold ROS epoch nanoseconds exactly.
            cameras: Camera name per row, or one name for all rows. Non-empty.
            frame_ids: Frame the pose is expressed in ("map", "odom", "utm", ...) per row, or one for all.
            positions: (N, 3) x, y, z; a row of NaN = unknown. Default: all unknown.
            orientations: (N, 4) quaternion x, y, z, w (unit norm); a row of NaN = unknown.
            gps: (N, 3) latitude, longitude (degrees), altitude (m); NaN = unknown (altitude may be unknown alone).
            utm_zones: (N,) UTM zone 1..60 per row (0 = unknown), or one zone for all rows.
            utm_bands: (N,) latitude band letter ("C".."X", "" = unknown), or one band for all rows.
            utm: (N, 2) easting, northing in metres; NaN row = unknown. Zone, band and utm go together.
            sources: Where each keyframe came from (image path, "bag:<topic>@<stamp>", "live:<topic>"), or one
                string for all rows. Default "".
            features: Local features per row (None: none for that row), for a map with :attr:`local_features`
                (see :meth:`enable_local_features`); ignored (must be None) for a map without.

        Returns:
            (N,) int64 ids of the new keyframes.

        Raises:
            MapError: A field has the wrong length (the message names it), a value is invalid, or a descriptor is not
                finite or not unit-norm.
        """
        desc = check_descriptors(descriptors, self._dim)
        n = desc.shape[0]
        utm_given = [utm_zones is not None, utm_bands is not None, utm is not None]
        if any(utm_given) and not all(utm_given):
            raise MapError("utm_zones, utm_bands and utm must be given together (a UTM easting/northing means nothing "
                           "without its zone and band)")
        block = {
            "stamps_ns": as_int_column(stamps_ns, n, "stamps_ns"),
            "cameras": as_str_column(cameras, n, "cameras"),
            "frame_ids": as_str_column(frame_ids, n, "frame_ids"),
            "positions": as_float_rows(positions, n, 3, "positions"),
            "orientations": as_float_rows(orientations, n, 4, "orientations"),
            "gps": as_float_rows(gps, n, 3, "gps"),
            "utm_zones": as_zone_column(utm_zones, n),
            "utm_bands": as_str_column("" if utm_bands is None else utm_bands, n, "utm_bands"),
            "utm": as_float_rows(utm, n, 2, "utm"),
            "sources": as_str_column("" if sources is None else sources, n, "sources"),
        }
        block["ids"] = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        check_columns(block, lambda i: f"row {i} of this add()", MapError)
        feature_block = self._feature_block(features, n)
        if n == 0:
            return block["ids"]
        seg = desc.astype(self._dtype)  # always a copy: the caller's array is never aliased
        seg.flags.writeable = False
        self._pending.append(block)
        self._segments.append(seg)
        self._segment_ends = None
        if feature_block is not None:
            self.local_features.append_block(feature_block)
        self._next_id += n
        self._count += n
        return block["ids"].copy()

    def enable_local_features(self, kind: str, slots: int) -> KeyframeFeatures:
        """Give the map a local-feature store (rows already in the map get none); returns it (kept if it exists).

        Raises:
            MapError: the map stores another feature type.
        """
        if self.local_features is None:
            self.local_features = KeyframeFeatures(kind, slots)
            self.local_features.append([None] * self._count)
        elif self.local_features.kind != kind:
            raise MapError(f"this map stores {self.local_features.kind} local features, not {kind}: set "
                           f"features.type to {self.local_features.kind} for it, or build a new map")
        return self.local_features

    def _feature_block(self, features: Sequence[LocalFeatures | None] | None, n: int) -> np.ndarray | None:
        """Packed local-feature rows for an add() of ``n`` rows (validated), None for a map without features."""
        if self.local_features is None:
            if features is not None and any(f is not None for f in features):
                raise MapError("features given to add() but this map has no local-feature store (a format 1 map); "
                               "call enable_local_features() first")
            return None
        features = [None] * n if features is None else list(features)
        if len(features) != n:
            raise MapError(f"features has {len(features)} entries for {n} rows; give one per row (None: none)")
        return self.local_features.pack_block(features)

    # ------------------------------------------------------------------ accessors

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (f"KeyframeMap(count={self._count}, descriptor_dim={self._dim}, storage_dtype={self._dtype_name}, "
                f"model={self.fingerprint.get('id')!r}, frames={self.frames})")

    @property
    def descriptor_dim(self) -> int:
        """Descriptor length D."""
        return self._dim

    @property
    def storage_dtype(self) -> str:
        """``"float16"`` or ``"float32"``."""
        return self._dtype_name

    @property
    def next_id(self) -> int:
        """The id the next added keyframe will get."""
        return self._next_id

    @property
    def ids(self) -> np.ndarray:
        """(N,) int64 keyframe ids, strictly increasing."""
        return self._columns()["ids"]

    @property
    def stamps_ns(self) -> np.ndarray:
        """(N,) int64 capture stamps, nanoseconds."""
        return self._columns()["stamps_ns"]

    @property
    def cameras(self) -> np.ndarray:
        """(N,) object array of camera names."""
        return self._columns()["cameras"]

    @property
    def frame_ids(self) -> np.ndarray:
        """(N,) object array of pose frames."""
        return self._columns()["frame_ids"]

    @property
    def positions(self) -> np.ndarray:
        """(N, 3) float64 x, y, z; NaN rows unknown."""
        return self._columns()["positions"]

    @property
    def orientations(self) -> np.ndarray:
        """(N, 4) float64 quaternion x, y, z, w; NaN rows unknown."""
        return self._columns()["orientations"]

    @property
    def gps(self) -> np.ndarray:
        """(N, 3) float64 latitude, longitude, altitude; NaN unknown."""
        return self._columns()["gps"]

    @property
    def utm_zones(self) -> np.ndarray:
        """(N,) int16 UTM zones, 0 = unknown."""
        return self._columns()["utm_zones"]

    @property
    def utm_bands(self) -> np.ndarray:
        """(N,) object array of UTM latitude bands, "" = unknown."""
        return self._columns()["utm_bands"]

    @property
    def utm(self) -> np.ndarray:
        """(N, 2) float64 UTM easting, northing; NaN rows unknown."""
        return self._columns()["utm"]

    @property
    def sources(self) -> np.ndarray:
        """(N,) object array of keyframe sources ("" = unknown)."""
        return self._columns()["sources"]

    @property
    def frames(self) -> list[str]:
        """Sorted distinct frame ids."""
        return sorted(set(self.frame_ids.tolist()))

    @property
    def camera_names(self) -> list[str]:
        """Sorted distinct camera names."""
        return sorted(set(self.cameras.tolist()))

    @property
    def descriptors(self) -> np.ndarray:
        """(N, D) read-only descriptors in storage dtype.

        With one chunk this is the chunk itself (a memory map after ``load_map(path, mmap=True)``). With several, they
        are concatenated into RAM once, on first access, and kept (N * D * itemsize bytes).
        """
        if len(self._segments) != 1:
            if self._segments:
                merged = np.concatenate(self._segments, axis=0)
            else:
                merged = np.empty((0, self._dim), dtype=self._dtype)
            merged.flags.writeable = False
            self._segments = [merged]
            self._segment_ends = None
        seg = self._segments[0]
        if seg.flags.writeable:
            seg.flags.writeable = False
        return seg

    def descriptors_f32(self) -> np.ndarray:
        """(N, D) float32 descriptors for search: a copy for float16 storage, a read-only view for float32."""
        return np.asarray(self.descriptors, dtype=np.float32)

    def iter_descriptors_f32(self, block_rows: int = 65536) -> Iterator[np.ndarray]:
        """Yield consecutive float32 blocks of at most ``block_rows`` rows, without concatenating chunks.

        Use this to build a search index over a map larger than RAM (e.g. ``index.add(block)`` per block).
        """
        if block_rows < 1:
            raise MapError(f"block_rows must be >= 1, got {block_rows}")
        for seg in self._segments:
            for start in range(0, seg.shape[0], block_rows):
                yield np.asarray(seg[start:start + block_rows], dtype=np.float32)

    def descriptor_rows(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """(len(rows), D) descriptors of the given rows in storage dtype (a copy), gathered chunk by chunk.

        Reads only those rows of a memory-mapped map: what a search re-ranks (its short list) costs len(rows) x D x
        itemsize bytes, never the map. The rows of a memory-mapped chunk are requested from the disk together
        (``madvise(MADV_WILLNEED)``) before they are copied, not one page fault after the other.

        Raises:
            IndexError: A row is out of range.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((rows.shape[0], self._dim), dtype=self._dtype)
        if rows.shape[0] == 0:
            return out
        if rows.min() < 0 or rows.max() >= self._count:
            raise IndexError(f"rows {rows.min()}..{rows.max()} out of range for a map of {self._count} keyframes")
        if self._segment_ends is None:
            self._segment_ends = np.cumsum([seg.shape[0] for seg in self._segments], dtype=np.int64)
        ends = self._segment_ends
        which = np.searchsorted(ends, rows, side="right")
        if which[0] == which[-1] and (which == which[0]).all():
            s = int(which[0])
            return gather_rows(self._segments[s], rows - (ends[s - 1] if s else 0))
        for s in np.unique(which).tolist():
            sel = which == s
            out[sel] = gather_rows(self._segments[s], rows[sel] - (ends[s - 1] if s else 0))
        return out

    def keyframe(self, i: int) -> Keyframe:
        """Return row ``i`` (negative counts from the end) as a :class:`Keyframe`.

        Raises:
            IndexError: ``i`` is out of range.
        """
        n = self._count
        if not -n <= i < n:
            raise IndexError(f"keyframe row {i} out of range for a map of {n} keyframes")
        i = int(i) % n
        c = self._columns()
        pos = c["positions"][i]
        quat = c["orientations"][i]
        gps = c["gps"][i]
        utm = c["utm"][i]
        return Keyframe(
            row=i,
            id=int(c["ids"][i]),
            stamp_ns=int(c["stamps_ns"][i]),
            camera=c["cameras"][i],
            frame_id=c["frame_ids"][i],
            position=tuple(pos.tolist()) if np.isfinite(pos).all() else None,
            orientation=tuple(quat.tolist()) if np.isfinite(quat).all() else None,
            gps=tuple(gps.tolist()) if np.isfinite(gps[:2]).all() else None,
            utm_zone=int(c["utm_zones"][i]),
            utm_band=c["utm_bands"][i],
            utm=tuple(utm.tolist()) if np.isfinite(utm).all() else None,
            source=c["sources"][i],
            descriptor=self._descriptor_row(i),
        )

    def row_of_id(self, keyframe_id: int) -> int:
        """Return the row of keyframe ``keyframe_id``.

        Raises:
            KeyframeNotFoundError: No keyframe has that id.
        """
        if isinstance(keyframe_id, (bool, np.bool_)) or not isinstance(keyframe_id, (int, np.integer)):
            raise MapError(f"keyframe id must be an int, got {type(keyframe_id).__name__} ({keyframe_id!r})")
        ids = self.ids
        row = int(np.searchsorted(ids, keyframe_id))
        if row < ids.shape[0] and ids[row] == keyframe_id:
            return row
        span = f"ids {ids[0]}..{ids[-1]}" if ids.shape[0] else "no keyframes"
        raise KeyframeNotFoundError(
            f"keyframe id {keyframe_id} is not in this map ({self._count} keyframes, {span}); it was never added, or "
            "this is a subset or a different map"
        )

    def subset(self, mask_or_rows: np.ndarray | Sequence[int] | Sequence[bool]) -> KeyframeMap:
        """Return a new map with the selected rows, in this map's order, ids unchanged.

        Args:
            mask_or_rows: (N,) boolean mask, or row indices (negative allowed; sorted, duplicates refused).

        Returns:
            A map with copied columns, descriptors in RAM, the same fingerprint/metadata (copied) and ``next_id``, and
            no search index. It is not tied to any directory: saving it over an existing map needs ``overwrite=True``.

        Raises:
            MapError: Wrong mask length, duplicate rows, or a non-integer selection.
            IndexError: A row is out of range.
        """
        sel = np.asarray(mask_or_rows)
        if sel.dtype == bool:
            if sel.shape != (self._count,):
                raise MapError(f"mask has shape {sel.shape}, expected ({self._count},): one bool per keyframe")
            rows = np.flatnonzero(sel)
        elif sel.size == 0:
            rows = np.empty(0, dtype=np.int64)
        elif sel.dtype.kind in "iu" and sel.ndim == 1:
            bad = (sel < -self._count) | (sel >= self._count)
            if bad.any():
                raise IndexError(f"row {int(sel[bad][0])} out of range for a map of {self._count} keyframes")
            rows = np.sort(sel.astype(np.int64) % max(self._count, 1))
            if rows.shape[0] > 1 and (np.diff(rows) == 0).any():
                raise MapError("subset rows contain duplicates; keyframe ids must stay unique")
        else:
            raise MapError(f"subset takes a bool mask or 1-D integer rows, got dtype {sel.dtype} shape {sel.shape}")
        cols = {k: v[rows].copy() for k, v in self._columns().items()}
        gathered = np.empty((rows.shape[0], self._dim), dtype=self._dtype)
        offset = 0
        for seg in self._segments:  # per chunk, so a memory-mapped map is not concatenated first
            inside = (rows >= offset) & (rows < offset + seg.shape[0])
            gathered[inside] = seg[rows[inside] - offset]
            offset += seg.shape[0]
        out = KeyframeMap(copy.deepcopy(self.fingerprint), descriptor_dim=self._dim, storage_dtype=self._dtype_name,
                          metadata=copy.deepcopy(self.metadata), created=self.created, next_id=self._next_id,
                          columns=cols, segments=[gathered])
        if self.local_features is not None:
            out.local_features = self.local_features.subset(rows)
        return out

    def check_compatible(self, fingerprint: dict[str, Any]) -> None:
        """Raise unless ``fingerprint`` is the model that built this map (equal ``id``).

        Raises:
            MapMismatchError: The ids differ; the message names both ids and architectures.
        """
        check_same_model(self.fingerprint, fingerprint, "this map")

    # ------------------------------------------------------------------ search index

    @property
    def index_blob(self) -> np.ndarray | None:
        """Serialized search index (uint8), or None when there is none or it was built for fewer rows."""
        return self._index.blob if self._index is not None and self._index.rows == self._count else None

    @property
    def index_kind(self) -> str | None:
        """Kind of :attr:`index_blob` (e.g. "faiss_flat_ip"), or None when there is no fresh index."""
        return self._index.kind if self._index is not None and self._index.rows == self._count else None

    @property
    def index_codes(self) -> tuple[np.ndarray, ...] | None:
        """The per-row codes of a fresh index stored as codes (:meth:`set_index` ``codes``), else None."""
        return self._index.codes if self._index is not None and self._index.rows == self._count else None

    def set_index(self, index_blob: np.ndarray | bytes, index_kind: str,
                  codes: Sequence[np.ndarray] | None = None) -> None:
        """Attach a serialized search index built over all current rows (saved by the next ``save_map``).

        Args:
            index_blob: bytes or a 1-D uint8 array (e.g. ``faiss.serialize_index(index)``).
            index_kind: What the blob is, e.g. "faiss_flat_ip"; names starting with "faiss" get a ``.faiss`` file.
            codes: For an index whose rows are stored apart from its blob (the blob holds the trained quantizers):
                (n_i, code_size) uint8 blocks, in row order, together one row per keyframe. Saves append them like
                descriptor chunks (``codes.gNNNNNN.npy``).

        Raises:
            MapError: The blob is not bytes/uint8, the kind is empty or not printable, or the codes do not cover
                every row with one uint8 code width.
        """
        blob = as_index_blob(index_blob)
        check_index_kind(index_kind)
        if codes is not None:
            codes = tuple(codes)
            widths = {c.shape[1] for c in codes if c.ndim == 2}
            if any(c.dtype != np.uint8 or c.ndim != 2 for c in codes) or len(widths) > 1 \
                    or sum(c.shape[0] for c in codes) != self._count:
                raise MapError(f"index codes must be (rows, code_size) uint8 blocks of one width covering the map's "
                               f"{self._count} rows, got {[(c.dtype.name, c.shape) for c in codes]}")
        self._index = _AttachedIndex(blob, index_kind, self._count, hashlib.sha256(blob).hexdigest(), codes)

    # ------------------------------------------------------------------ storage interface
    # For dinomix_ros.maps.storage and .loading only: what a save or load needs beyond the public API, without
    # copying rows.

    def _attached_index(self) -> _AttachedIndex | None:
        """The attached index, fresh or stale (stale: its ``rows`` differ from ``len(self)``)."""
        return self._index

    def _attach_verified_index(self, blob: np.ndarray, kind: str, sha256: str,
                               codes: Sequence[np.ndarray] | None = None) -> None:
        """Attach an index blob (and codes) read from disk whose kind and sha256 the manifest gives (no re-hashing)."""
        self._index = _AttachedIndex(blob, kind, self._count, sha256, None if codes is None else tuple(codes))

    def _drop_index(self) -> None:
        """Forget the attached index (it is stale and will be rebuilt)."""
        self._index = None

    def _stored_blocks(self, start: int, block_rows: int) -> Iterator[np.ndarray]:
        """Rows ``start:`` in storage dtype as C-contiguous blocks of at most ``block_rows``, without concatenating."""
        offset = 0
        for seg in self._segments:
            lo, hi = max(start - offset, 0), seg.shape[0]
            offset += seg.shape[0]
            for a in range(lo, hi, block_rows):
                yield np.ascontiguousarray(seg[a:min(a + block_rows, hi)], dtype=self._dtype)

    # ------------------------------------------------------------------ internals

    def _descriptor_row(self, i: int) -> np.ndarray:
        """Row i as a read-only view into its chunk (does not concatenate chunks)."""
        if self._segment_ends is None:
            self._segment_ends = np.cumsum([seg.shape[0] for seg in self._segments], dtype=np.int64)
        s = int(np.searchsorted(self._segment_ends, i, side="right"))
        if s >= len(self._segments):
            raise IndexError(i)
        return self._segments[s][i - (int(self._segment_ends[s - 1]) if s else 0)]

    def _columns(self) -> dict[str, np.ndarray]:
        """Merge pending add() blocks into the column arrays (once per batch of adds)."""
        if self._pending:
            merged = {}
            for k, v in self._cols.items():
                merged[k] = np.concatenate([v] + [b[k] for b in self._pending], axis=0)
                merged[k].flags.writeable = False
            self._cols = merged
            self._pending = []
        return self._cols


def utc_now_iso() -> str:
    """Now as ISO 8601 UTC with milliseconds (the map files' timestamps)."""
    # "+00:00" rather than "Z": datetime.fromisoformat() on Python 3.10 does not parse "Z".
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
