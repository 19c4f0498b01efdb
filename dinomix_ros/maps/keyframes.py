"""Geotagged keyframe map: DINO-Mix descriptors plus poses, geotags and the model fingerprint, in memory and on disk.

A :class:`KeyframeMap` is a table with one row per keyframe (struct of arrays: row ``i`` of every column is keyframe
``i``). Rows are only ever appended; ids are assigned increasing by :meth:`KeyframeMap.add` and never reused, so an id
that went out in a message keeps meaning the same place.

On disk a map is a directory a person can inspect with standard tools (see ``maps/README.md``)::

    office.dinomap/
      manifest.json                  format, version, generation, counts, fingerprint, metadata, and every file's
                                     row count, byte size and sha256 (the single commit point)
      keyframes.g000003.csv          one row per keyframe (ids, stamps, camera, frame, pose, GPS, UTM, source)
      descriptors.g000001.npy        (rows, D) little-endian float16/float32, C order; append-only chunks, one per
      descriptors.g000003.npy        save that added rows, named by the generation that wrote it
      index.g000003.faiss            optional search index blob (always rebuildable from the descriptors)
      .lock                          advisory lock file (fcntl.flock) taken by writers

Atomicity: :meth:`KeyframeMap.save` writes every new file under a temporary name (``.tmp-*``) in the map directory,
fsyncs it and renames it to a name that no committed manifest references (names carry a generation number larger than
any in the directory), fsyncs the directory, then writes ``manifest.json`` the same way: the ``os.replace`` onto
``manifest.json`` is the commit point. Only after the directory is fsynced again are files that the new manifest no
longer references deleted. A crash at any moment therefore leaves either the old or the new manifest, and every file
that manifest references is complete; leftovers are unreferenced and are removed by the next successful save.

Concurrency: writers take an exclusive ``fcntl.flock`` on ``<map>/.lock`` (Linux/POSIX, local file systems; flock is
not reliable on NFS) for the whole save, so two processes never interleave. A writer also refuses to append when the
map on disk changed since it loaded or last saved it (:class:`MapConflictError`) instead of silently dropping the
other writer's rows. Readers take no lock: a reader whose files vanish under it because a writer committed a newer
generation re-reads the manifest and retries. A :class:`KeyframeMap` object itself is not thread-safe.

Memory: :meth:`KeyframeMap.load` memory-maps each descriptor chunk (``mmap=True``) and keeps the chunks separate;
:attr:`KeyframeMap.descriptors` concatenates them once, on first access, into RAM (a 1M x 4096 float16 map is 8 GB),
and is a zero-copy memory map when the map has a single chunk (``save(..., compact=True)`` rewrites all chunks into
one). :meth:`KeyframeMap.iter_descriptors_f32` streams float32 blocks without concatenating.

Nothing here uses pickle: manifest is JSON, keyframes are CSV, descriptor chunks are parsed with
:mod:`numpy.lib.format` header readers (float dtypes only) and memory-mapped from the already verified file
descriptor, and the index is raw bytes.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np

from dinomix_ros import __version__
from dinomix_ros.settings import check, setting

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CSV_COLUMNS",
    "NORM_TOLERANCE",
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
    "read_manifest",
]

logger = logging.getLogger(__name__)

FORMAT = "dinomix_ros.map"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"

#: Allowed deviation of a descriptor's L2 norm from 1. Generous enough for descriptors normalised in float16
#: (per-component relative error 2**-11), tight enough to catch unnormalised vectors (norms of 10s, or 0).
NORM_TOLERANCE = 1e-2
#: Allowed deviation of a known orientation quaternion's norm from 1.
QUAT_TOLERANCE = 1e-3

#: Header of the keyframe CSV, in order. Empty cell = unknown.
CSV_COLUMNS = (
    "id", "stamp_ns", "camera", "frame_id", "x", "y", "z", "qx", "qy", "qz", "qw",
    "lat", "lon", "alt", "utm_zone", "utm_band", "utm_easting", "utm_northing", "source",
)

_STORAGE_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


@dataclass(frozen=True)
class StorageConfig:
    """How new maps store descriptors (node parameter ``map.storage_dtype``, CLI ``--storage-dtype``)."""

    SETTINGS_GROUP: ClassVar[str] = "map"

    storage_dtype: str = setting("float16", "descriptor storage of new maps: float16 (half the size) or float32",
                                 choices=tuple(_STORAGE_DTYPES), reconfigure=True)

    def __post_init__(self) -> None:
        check(self)


_FINGERPRINT_KEYS = {"id": str, "architecture": str, "weights_sha256": str, "preprocessing": str, "descriptor_dim": int}
_UTM_BANDS = "CDEFGHJKLMNPQRSTUVWX"
_GEN_FILE_RE = re.compile(
    r"^(?:keyframes\.g(\d{6,})\.csv|descriptors\.g(\d{6,})\.npy|index\.g(\d{6,})\.(?:faiss|bin))$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_BAD_CHAR_RE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_IO_BLOCK = 8 << 20
_LOAD_ATTEMPTS = 5


class MapError(ValueError):
    """A keyframe map or an argument given to it is invalid."""


class MapFormatError(MapError):
    """A map on disk is unreadable: wrong format or version, corrupted, truncated or inconsistent files."""


class MapMismatchError(MapError):
    """A map was built by a different model than the one in use (fingerprint ids differ)."""


class MapConflictError(MapError):
    """The map on disk was changed by another writer since this object loaded or last saved it."""


class MapLockedError(MapError, TimeoutError):
    """Another process held the map's lock for longer than the timeout."""


class MapNotFoundError(MapError, FileNotFoundError):
    """No map at the given path (no directory, or no manifest.json in it)."""


class KeyframeNotFoundError(MapError, LookupError):
    """A keyframe id is not in the map."""


class _VanishedFileError(Exception):
    """A file named by the manifest disappeared while loading (internal: triggers a retry)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


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


@dataclass
class _DiskState:
    """What this object knows is committed at one map directory (used to append and to detect other writers)."""

    generation: int
    rows: int
    chunks: list[dict[str, Any]]
    index: dict[str, Any] | None


class KeyframeMap:
    """Keyframes with descriptors, poses, geotags and the fingerprint of the model that described them.

    Build one with :meth:`empty` and :meth:`add`, or :meth:`load` it; persist it with :meth:`save`. Column
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
        """Internal constructor; use :meth:`empty` or :meth:`load`."""
        self.fingerprint = fingerprint
        self.metadata = metadata
        self.created = created
        self._dim = descriptor_dim
        self._dtype_name = storage_dtype
        self._dtype = _STORAGE_DTYPES[storage_dtype]
        self._next_id = next_id
        self._cols = columns if columns is not None else _empty_columns()
        for arr in self._cols.values():
            arr.flags.writeable = False
        self._pending: list[dict[str, np.ndarray]] = []
        self._segments: list[np.ndarray] = segments if segments is not None else []
        self._count = int(self._cols["ids"].shape[0])
        self._index_blob: np.ndarray | None = None
        self._index_kind: str | None = None
        self._index_rows = -1
        self._index_sha = ""
        self._disk: dict[str, _DiskState] = {}

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
        _check_fingerprint(fingerprint, "fingerprint", MapError)
        if descriptor_dim is None:
            descriptor_dim = fingerprint["descriptor_dim"]
        if type(descriptor_dim) is not int or descriptor_dim != fingerprint["descriptor_dim"]:
            raise MapError(
                f"descriptor_dim={descriptor_dim!r} but fingerprint['descriptor_dim']={fingerprint['descriptor_dim']}: "
                "the map stores what the model outputs; leave descriptor_dim out or pass the fingerprint's value"
            )
        dtype_name = _dtype_name(storage_dtype)
        metadata = copy.deepcopy(metadata) if metadata is not None else {}
        if not isinstance(metadata, dict):
            raise MapError(f"metadata must be a dict, got {type(metadata).__name__}")
        _check_json(metadata, "metadata", MapError)
        return cls(fingerprint, descriptor_dim=descriptor_dim, storage_dtype=dtype_name, metadata=metadata,
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
    ) -> np.ndarray:
        """Append keyframes; everything is validated before anything is changed.

        Args:
            descriptors: (N, D) or (D,) float array of L2-normalised descriptors (finite, norm within
                :data:`NORM_TOLERANCE` of 1). Stored in the map's storage dtype.
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

        Returns:
            (N,) int64 ids of the new keyframes.

        Raises:
            MapError: A field has the wrong length (the message names it), a value is invalid, or a descriptor is not
                finite or not unit-norm.
        """
        desc = _check_descriptors(descriptors, self._dim)
        n = desc.shape[0]
        utm_given = [utm_zones is not None, utm_bands is not None, utm is not None]
        if any(utm_given) and not all(utm_given):
            raise MapError("utm_zones, utm_bands and utm must be given together (a UTM easting/northing means nothing "
                           "without its zone and band)")
        block = {
            "stamps_ns": _as_int_column(stamps_ns, n, "stamps_ns"),
            "cameras": _as_str_column(cameras, n, "cameras"),
            "frame_ids": _as_str_column(frame_ids, n, "frame_ids"),
            "positions": _as_float_rows(positions, n, 3, "positions"),
            "orientations": _as_float_rows(orientations, n, 4, "orientations"),
            "gps": _as_float_rows(gps, n, 3, "gps"),
            "utm_zones": _as_zone_column(utm_zones, n),
            "utm_bands": _as_str_column("" if utm_bands is None else utm_bands, n, "utm_bands"),
            "utm": _as_float_rows(utm, n, 2, "utm"),
            "sources": _as_str_column("" if sources is None else sources, n, "sources"),
        }
        block["ids"] = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        _check_columns(block, lambda i: f"row {i} of this add()", MapError)
        if n == 0:
            return block["ids"]
        seg = desc.astype(self._dtype)  # always a copy: the caller's array is never aliased
        seg.flags.writeable = False
        self._pending.append(block)
        self._segments.append(seg)
        self._next_id += n
        self._count += n
        return block["ids"].copy()

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

        With one chunk this is the chunk itself (a memory map after ``load(mmap=True)``). With several, they are
        concatenated into RAM once, on first access, and kept (N * D * itemsize bytes).
        """
        if len(self._segments) != 1:
            if self._segments:
                merged = np.concatenate(self._segments, axis=0)
            else:
                merged = np.empty((0, self._dim), dtype=self._dtype)
            merged.flags.writeable = False
            self._segments = [merged]
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
        return KeyframeMap(copy.deepcopy(self.fingerprint), descriptor_dim=self._dim, storage_dtype=self._dtype_name,
                           metadata=copy.deepcopy(self.metadata), created=self.created, next_id=self._next_id,
                           columns=cols, segments=[gathered])

    def check_compatible(self, fingerprint: dict[str, Any]) -> None:
        """Raise unless ``fingerprint`` is the model that built this map (equal ``id``).

        Raises:
            MapMismatchError: The ids differ; the message names both ids and architectures.
        """
        _check_same_model(self.fingerprint, fingerprint, "this map")

    # ------------------------------------------------------------------ search index

    @property
    def index_blob(self) -> np.ndarray | None:
        """Serialized search index (uint8), or None when there is none or it was built for fewer rows."""
        return self._index_blob if self._index_rows == self._count else None

    @property
    def index_kind(self) -> str | None:
        """Kind of :attr:`index_blob` (e.g. "faiss_flat_ip"), or None when there is no fresh index."""
        return self._index_kind if self._index_rows == self._count else None

    def set_index(self, index_blob: np.ndarray | bytes, index_kind: str) -> None:
        """Attach a serialized search index built over all current rows (saved by the next :meth:`save`).

        Args:
            index_blob: bytes or a 1-D uint8 array (e.g. ``faiss.serialize_index(index)``).
            index_kind: What the blob is, e.g. "faiss_flat_ip"; names starting with "faiss" get a ``.faiss`` file.

        Raises:
            MapError: The blob is not bytes/uint8 or the kind is empty or not printable.
        """
        if isinstance(index_blob, (bytes, bytearray, memoryview)):
            blob = np.frombuffer(bytes(index_blob), dtype=np.uint8)
        elif isinstance(index_blob, np.ndarray) and index_blob.dtype == np.uint8 and index_blob.ndim == 1:
            blob = index_blob.copy()
        else:
            found = f"{index_blob.dtype} array of shape {index_blob.shape}" if isinstance(index_blob, np.ndarray) \
                else type(index_blob).__name__
            raise MapError(f"index_blob must be bytes or a 1-D uint8 array (faiss.serialize_index output), "
                           f"got {found}")
        if not isinstance(index_kind, str) or not index_kind or len(index_kind) > 128 \
                or _BAD_CHAR_RE.search(index_kind):
            raise MapError(f"index_kind must be a short printable name such as 'faiss_flat_ip', got {index_kind!r}")
        blob.flags.writeable = False
        self._index_blob = blob
        self._index_kind = index_kind
        self._index_rows = self._count
        self._index_sha = hashlib.sha256(blob).hexdigest()

    # ------------------------------------------------------------------ save

    def save(
        self,
        path: str | os.PathLike[str],
        index_blob: np.ndarray | bytes | None = None,
        index_kind: str | None = None,
        *,
        overwrite: bool = False,
        compact: bool = False,
        lock_timeout_s: float = 30.0,
    ) -> Path:
        """Save atomically to the map directory ``path`` (created if missing).

        If this object loaded or last saved ``path`` and nobody changed it since, the save appends: it writes one new
        descriptor chunk with the rows added since (none if none were added), a new keyframe CSV and manifest, and
        never touches the existing chunk files. Otherwise it writes everything (one chunk).

        Args:
            path: Map directory, e.g. ``maps/office.dinomap``.
            index_blob: Optional serialized search index built over all current rows (see :meth:`set_index`).
                Without one, a previously attached or saved index is kept while it still covers all rows and
                dropped (logged) once rows were added.
            index_kind: Kind of ``index_blob``; required with it.
            overwrite: Replace a map at ``path`` that this object did not load/save, or that another writer changed.
            compact: Rewrite all descriptors into a single chunk (and delete the old chunks after the commit).
            lock_timeout_s: How long to wait for another writer's lock.

        Returns:
            The map directory.

        Raises:
            MapError: ``path`` holds a different map and ``overwrite`` is False, or the metadata is not JSON-able.
            MapConflictError: The map at ``path`` changed on disk since this object loaded/saved it.
            MapMismatchError: Appending to a map made by another model (the fingerprint id was changed).
            MapFormatError: The existing manifest is unreadable or newer, and ``overwrite`` is False.
            MapLockedError: Another process held the lock for ``lock_timeout_s``.
            OSError: Writing failed (disk full, permissions); the previous map is left intact.
        """
        t0 = time.monotonic()
        _check_fingerprint(self.fingerprint, "fingerprint", MapError)
        if self.fingerprint["descriptor_dim"] != self._dim:
            raise MapError(f"fingerprint['descriptor_dim'] is {self.fingerprint['descriptor_dim']} but the map holds "
                           f"{self._dim}-d descriptors; restore the fingerprint the map was created with")
        if not isinstance(self.metadata, dict):
            raise MapError(f"metadata must be a dict, got {type(self.metadata).__name__}")
        _check_json(self.metadata, "metadata", MapError)
        if index_blob is not None:
            if index_kind is None:
                raise MapError("index_blob given without index_kind; pass e.g. index_kind='faiss_flat_ip'")
            self.set_index(index_blob, index_kind)
        elif index_kind is not None:
            raise MapError("index_kind given without index_blob")
        cols = self._columns()

        directory = Path(path)
        if not directory.exists():
            directory.mkdir(parents=True, exist_ok=True)
            _fsync_dir(directory.parent)
        elif not directory.is_dir():
            raise MapError(f"{directory} exists and is not a directory; a map is saved as a directory "
                           "(e.g. maps/office.dinomap)")
        key = os.path.realpath(directory)

        with _DirLock(directory, lock_timeout_s):
            disk, disk_gen = _existing_manifest(directory, overwrite)
            known = self._disk.get(key)
            append = False
            ours = disk is not None and not overwrite  # checked below: this object wrote what is committed
            if ours:
                if known is None:
                    raise MapError(
                        f"{directory} already holds a map ({disk['count']} keyframes, generation "
                        f"{disk['generation']}, model {disk['fingerprint'].get('id')}) that this object did not load; "
                        "load it and add to it, choose a new path, or pass overwrite=True to replace it"
                    )
                if disk["generation"] != known.generation or disk["files"]["descriptors"] != known.chunks:
                    raise MapConflictError(
                        f"{directory} changed on disk since this object loaded or saved it (generation "
                        f"{disk['generation']} on disk, {known.generation} expected): another process saved it. "
                        "Load it again and re-add your keyframes, or pass overwrite=True to replace it"
                    )
                _check_same_model(disk["fingerprint"], self.fingerprint, f"the map at {directory}")
                append = not compact
            # Above every generation in the directory, leftovers included, so no name is ever reused.
            gen = max(disk_gen, _max_file_generation(directory)) + 1
            if disk is not None:
                # Leftovers of a crashed save are unreferenced by the committed manifest: safe to delete under the lock.
                _remove_unreferenced(directory, _referenced(disk))

            created: list[Path] = []
            committed = False
            try:
                chunks = list(known.chunks) if append and known is not None else []
                start = known.rows if append and known is not None else 0
                if self._count > start:
                    chunks.append(self._write_chunk(directory, gen, start, created))
                name = f"keyframes.g{gen:06d}.csv"
                sha, size = _atomic_write(directory, name, lambda w: _write_csv(w, cols, self._count))
                created.append(directory / name)
                kf_rec = {"file": name, "rows": self._count, "bytes": size, "sha256": sha}
                index_rec = self._index_for_save(directory, gen, known if ours else None, created)
                _fsync_dir(directory)  # the new names are durable before a manifest references them
                now = utc_now_iso()
                manifest = {
                    "format": FORMAT,
                    "version": FORMAT_VERSION,
                    "generation": gen,
                    "count": self._count,
                    "next_id": self._next_id,
                    "descriptor_dim": self._dim,
                    "descriptor_dtype": self._dtype_name,
                    "fingerprint": self.fingerprint,
                    "frames": self.frames,
                    "cameras": self.camera_names,
                    "metadata": self.metadata,
                    "created": self.created,
                    "updated": now,
                    "writer": f"dinomix_ros {__version__}",
                    "files": {"keyframes": kf_rec, "descriptors": chunks, "index": index_rec},
                }
                text = json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
                _atomic_write(directory, MANIFEST, lambda w: w.write(text.encode("utf-8")))
                committed = True  # os.replace onto manifest.json happened: this is the commit point
                self._disk[key] = _DiskState(generation=gen, rows=self._count, chunks=chunks, index=index_rec)
                _fsync_dir(directory)
            except BaseException:
                if not committed:
                    for p in created:
                        with contextlib.suppress(OSError):
                            os.unlink(p)
                raise
            removed = _remove_unreferenced(directory, _referenced(manifest))
            if removed:
                _fsync_dir(directory)
        logger.info("saved map %s: generation %d, %d keyframes (%s), %d chunk(s), index %s, %d file(s) removed, "
                    "%.3f s", directory, gen, self._count,
                    f"+{self._count - start} appended" if append else "full write", len(chunks),
                    index_rec["file"] if index_rec else "none", removed, time.monotonic() - t0)
        return directory

    def _write_chunk(self, directory: Path, gen: int, start: int, created: list[Path]) -> dict[str, Any]:
        """Write rows [start, count) as descriptors.g<gen>.npy; return its manifest record."""
        rows = self._count - start
        name = f"descriptors.g{gen:06d}.npy"

        def write(w: _HashingWriter) -> None:
            header = {"descr": np.lib.format.dtype_to_descr(self._dtype), "fortran_order": False,
                      "shape": (rows, self._dim)}
            np.lib.format.write_array_header_1_0(w, header)
            block = max(1, _IO_BLOCK // (self._dim * self._dtype.itemsize))
            offset = 0
            for seg in self._segments:
                lo, hi = max(start - offset, 0), seg.shape[0]
                offset += seg.shape[0]
                for a in range(lo, hi, block):
                    part = np.ascontiguousarray(seg[a:min(a + block, hi)], dtype=self._dtype)
                    w.write(memoryview(part).cast("B"))

        sha, size = _atomic_write(directory, name, write)
        created.append(directory / name)
        return {"file": name, "rows": rows, "bytes": size, "sha256": sha}

    def _index_for_save(self, directory: Path, gen: int, known: _DiskState | None,
                        created: list[Path]) -> dict[str, Any] | None:
        """Manifest record of the index to commit: reuse the committed file, write the attached blob, or none."""
        if self._index_blob is not None and self._index_rows == self._count:
            if known is not None and known.index is not None and known.index["sha256"] == self._index_sha \
                    and known.index["rows"] == self._count and known.index["kind"] == self._index_kind:
                return known.index
            suffix = "faiss" if self._index_kind.lower().startswith("faiss") else "bin"
            name = f"index.g{gen:06d}.{suffix}"
            blob = self._index_blob
            sha, size = _atomic_write(directory, name, lambda w: w.write(memoryview(blob).cast("B")))
            created.append(directory / name)
            return {"file": name, "kind": self._index_kind, "rows": self._count, "bytes": size, "sha256": sha}
        if known is not None and known.index is not None and known.index["rows"] == self._count:
            return known.index  # committed index still covers every row (e.g. loaded with load_index=False)
        if self._index_blob is not None:
            built_for = self._index_rows
        elif known is not None and known.index is not None:
            built_for = known.index["rows"]
        else:
            return None
        logger.info("index stale (built for %d rows, map has %d): not saved, will be rebuilt", built_for, self._count)
        self._index_blob, self._index_kind, self._index_rows, self._index_sha = None, None, -1, ""
        return None

    # ------------------------------------------------------------------ load

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        expected_fingerprint: dict[str, Any] | None = None,
        mmap: bool = True,
        verify: bool = True,
        load_index: bool = True,
    ) -> KeyframeMap:
        """Load and verify a map directory.

        Checks the format and version, the manifest's structure, that the keyframe CSV and every chunk have the
        manifest's row count, size, dtype and dimension, the sha256 of every file, and the keyframe invariants.

        Args:
            path: Map directory.
            expected_fingerprint: If given, the fingerprint of the model in use; a map from another model is refused.
            mmap: Memory-map descriptor chunks (read-only) instead of reading them into RAM.
            verify: Check the sha256 of the descriptor chunks and the index (reads every byte: ~8 GB for a 1M x 4096
                float16 map, several seconds). With False, only sizes and headers are checked, so a flipped byte goes
                unnoticed. The keyframe CSV is always hashed (it is read anyway).
            load_index: Read the search index blob (if fresh); with False it stays on disk, and is kept by later saves
                as long as no rows are added.

        Returns:
            The map; saving it back to ``path`` appends.

        Raises:
            MapNotFoundError: No directory or no manifest.json.
            MapFormatError: Unknown format, newer version, or a file is missing, corrupted, truncated or inconsistent
                with the manifest (the message names the file).
            MapMismatchError: ``expected_fingerprint`` has a different id than the map's.
        """
        directory = Path(path)
        for _ in range(_LOAD_ATTEMPTS):
            manifest = read_manifest(directory)
            if expected_fingerprint is not None:
                _check_same_model(manifest["fingerprint"], expected_fingerprint, f"the map at {directory}")
            try:
                return cls._from_manifest(directory, manifest, mmap=mmap, verify=verify, load_index=load_index)
            except _VanishedFileError as exc:
                try:
                    now = read_manifest(directory)["generation"]
                except MapError:
                    now = None
                if now == manifest["generation"]:
                    raise MapFormatError(
                        f"{directory / exc.name} is listed in manifest.json but missing: the map is damaged "
                        "(a file was deleted). Restore the directory from a backup or rebuild the map"
                    ) from None
                logger.info("map %s changed while loading (generation %d -> %s); retrying",
                            directory, manifest["generation"], now)
        raise MapFormatError(f"{directory} changed {_LOAD_ATTEMPTS} times while loading; another process is saving "
                             "it continuously. Try again, or load a copy")

    @classmethod
    def _from_manifest(cls, directory: Path, manifest: dict[str, Any], *, mmap: bool, verify: bool,
                       load_index: bool) -> KeyframeMap:
        t0 = time.monotonic()
        count = manifest["count"]
        dim = manifest["descriptor_dim"]
        dtype = _STORAGE_DTYPES[manifest["descriptor_dtype"]]
        files = manifest["files"]
        kf_rec, index_rec = files["keyframes"], files["index"]
        if index_rec is not None and index_rec["rows"] != count:
            logger.warning("map %s: index %s was built for %d rows but the map has %d: index stale, will be rebuilt",
                           directory, index_rec["file"], index_rec["rows"], count)
            index_rec = None
        with contextlib.ExitStack() as stack:
            # Open every referenced file before reading any: an open file survives a concurrent save deleting it,
            # so a writer can only race this reader during these few open() calls (then load() retries).
            kf_file = _open_referenced(directory, kf_rec, stack)
            chunk_files = [_open_referenced(directory, rec, stack) for rec in files["descriptors"]]
            index_file = None
            if index_rec is not None and load_index:
                try:
                    index_file = _open_referenced(directory, index_rec, stack)
                except _VanishedFileError:
                    logger.warning("map %s: index %s is missing: index stale, will be rebuilt", directory,
                                   index_rec["file"])
                    index_rec = None
            cols = _parse_csv(_read_verified(kf_file, kf_rec, verify=True), kf_rec["file"], count)
            ids = cols["ids"]
            if count and ids[-1] >= manifest["next_id"]:
                raise MapFormatError(f"{kf_rec['file']}: largest id {ids[-1]} is not below the manifest's next_id "
                                     f"{manifest['next_id']}; the files are inconsistent (edited by hand?)")
            for key, col in (("frames", "frame_ids"), ("cameras", "cameras")):
                found = sorted(set(cols[col].tolist()))
                if found != sorted(manifest[key]):
                    raise MapFormatError(f"manifest.json lists {key} {manifest[key]} but {kf_rec['file']} has "
                                         f"{found}; the files are inconsistent (edited by hand?)")
            segments = [_open_chunk(f, rec, dim, dtype, mmap=mmap, verify=verify)
                        for f, rec in zip(chunk_files, files["descriptors"])]
            blob = None
            if index_file is not None:
                try:
                    blob = _read_verified(index_file, index_rec, verify=verify)
                except MapFormatError as exc:
                    logger.warning("map %s: index unusable (%s): index stale, will be rebuilt", directory, exc)
                    index_rec = None
        obj = cls(manifest["fingerprint"], descriptor_dim=dim, storage_dtype=manifest["descriptor_dtype"],
                  metadata=manifest["metadata"], created=manifest["created"], next_id=manifest["next_id"],
                  columns=cols, segments=segments)
        if blob is not None:
            obj._index_blob = np.frombuffer(blob, dtype=np.uint8)  # read-only, no copy
            obj._index_kind = index_rec["kind"]
            obj._index_rows = count
            obj._index_sha = index_rec["sha256"]
        obj._disk[os.path.realpath(directory)] = _DiskState(
            generation=manifest["generation"], rows=count, chunks=files["descriptors"], index=index_rec)
        logger.info("loaded map %s: generation %d, %d keyframes x %d %s in %d chunk(s), index %s, %.3f s",
                    directory, manifest["generation"], count, dim, manifest["descriptor_dtype"], len(segments),
                    obj.index_kind, time.monotonic() - t0)
        return obj

    # ------------------------------------------------------------------ internals

    def _descriptor_row(self, i: int) -> np.ndarray:
        """Row i as a read-only view into its chunk (does not concatenate chunks)."""
        for seg in self._segments:
            if i < seg.shape[0]:
                return seg[i]
            i -= seg.shape[0]
        raise IndexError(i)

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


# ---------------------------------------------------------------------- manifest


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a map's manifest.json without touching its other files (for ``dinomix map info``).

    Args:
        path: Map directory.

    Returns:
        The manifest as a dict (see ``maps/README.md`` for its keys).

    Raises:
        MapNotFoundError: No directory, not a directory, or no manifest.json.
        MapFormatError: Not JSON, not a dinomix_ros map, written by a newer dinomix_ros, or malformed.
    """
    directory = Path(path)
    if not directory.exists():
        raise MapNotFoundError(f"no map at {directory}: the directory does not exist")
    if not directory.is_dir():
        raise MapNotFoundError(f"no map at {directory}: it is a file, but a map is a directory holding manifest.json "
                               f"(pass the directory, e.g. {directory.parent})")
    mpath = directory / MANIFEST
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        raise MapNotFoundError(f"no map at {directory}: it has no {MANIFEST} (not a dinomix map, or its first save "
                               "was interrupted before committing)") from None
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MapFormatError(f"{mpath} is not valid UTF-8 JSON ({exc}): corrupted; restore it from a backup") from None
    _validate_manifest(m, mpath)
    return m


def _validate_manifest(m: Any, mpath: Path) -> None:
    def fail(msg: str) -> MapFormatError:
        return MapFormatError(f"{mpath}: {msg}")

    if not isinstance(m, dict):
        raise fail(f"top level is a {type(m).__name__}, expected a JSON object")
    if m.get("format") != FORMAT:
        raise fail(f"format is {m.get('format')!r}, expected {FORMAT!r}: this is not a dinomix_ros map")
    version = m.get("version")
    if type(version) is not int or version < 1:
        raise fail(f"version is {version!r}, expected a positive integer")
    if version > FORMAT_VERSION:
        raise fail(f"written by a newer dinomix_ros (map format version {version}; dinomix_ros {__version__} reads up "
                   f"to version {FORMAT_VERSION}). Upgrade dinomix_ros on this machine to load it")

    def need(key: str, kind: type, minimum: int | None = None) -> Any:
        value = m.get(key)
        if (type(value) is not int) if kind is int else not isinstance(value, kind):
            raise fail(f"{key!r} is {value!r}, expected {kind.__name__}")
        if minimum is not None and value < minimum:
            raise fail(f"{key!r} is {value}, expected >= {minimum}")
        return value

    count = need("count", int, 0)
    need("generation", int, 1)
    need("next_id", int, 0)
    dim = need("descriptor_dim", int, 1)
    if need("descriptor_dtype", str) not in _STORAGE_DTYPES:
        raise fail(f"descriptor_dtype is {m['descriptor_dtype']!r}, expected one of {sorted(_STORAGE_DTYPES)}")
    _check_fingerprint(need("fingerprint", dict), f"{mpath}: fingerprint", MapFormatError)
    if m["fingerprint"]["descriptor_dim"] != dim:
        raise fail(f"fingerprint descriptor_dim {m['fingerprint']['descriptor_dim']} != descriptor_dim {dim}")
    need("metadata", dict)
    need("created", str)
    for key in ("frames", "cameras"):
        if not all(isinstance(s, str) for s in need(key, list)):
            raise fail(f"{key!r} must be a list of strings")
    files = need("files", dict)
    names: list[str] = []

    def record(rec: Any, what: str, extra: tuple[str, ...] = ()) -> None:
        if not isinstance(rec, dict):
            raise fail(f"files.{what} is {rec!r}, expected an object")
        name = rec.get("file")
        if not isinstance(name, str) or not _GEN_FILE_RE.match(name):
            raise fail(f"files.{what}.file is {name!r}, expected a plain file name like 'descriptors.g000001.npy'")
        for key in ("rows", "bytes"):
            if type(rec.get(key)) is not int or rec[key] < 0:
                raise fail(f"files.{what}.{key} is {rec.get(key)!r}, expected an integer >= 0")
        if not isinstance(rec.get("sha256"), str) or not _SHA256_RE.match(rec["sha256"]):
            raise fail(f"files.{what}.sha256 is {rec.get('sha256')!r}, expected 64 lowercase hex digits")
        for key in extra:
            if not isinstance(rec.get(key), str) or not rec[key]:
                raise fail(f"files.{what}.{key} is {rec.get(key)!r}, expected a non-empty string")
        names.append(name)

    record(files.get("keyframes"), "keyframes")
    if files["keyframes"]["rows"] != count:
        raise fail(f"files.keyframes.rows is {files['keyframes']['rows']} but count is {count}")
    chunks = files.get("descriptors")
    if not isinstance(chunks, list):
        raise fail(f"files.descriptors is {chunks!r}, expected a list of chunk records")
    for i, rec in enumerate(chunks):
        record(rec, f"descriptors[{i}]")
        if rec["rows"] < 1:
            raise fail(f"files.descriptors[{i}].rows is {rec['rows']}, expected >= 1")
    total = sum(rec["rows"] for rec in chunks)
    if total != count:
        raise fail(f"descriptor chunks hold {total} rows but count is {count}: the manifest is inconsistent")
    if files.get("index") is not None:
        record(files["index"], "index", extra=("kind",))
    if len(set(names)) != len(names):
        raise fail(f"a file is listed twice in files: {names}")


def _existing_manifest(directory: Path, overwrite: bool) -> tuple[dict[str, Any] | None, int]:
    """Return (committed manifest or None, its generation or 0) for a save into ``directory``."""
    try:
        disk = read_manifest(directory)
    except MapNotFoundError:
        return None, 0
    except MapFormatError as exc:
        if not overwrite:
            raise MapFormatError(f"cannot save into {directory}: its existing map is unreadable here ({exc}). "
                                 "Pass overwrite=True to replace it, or choose a new path") from None
        try:
            gen = json.loads((directory / MANIFEST).read_text("utf-8")).get("generation", 0)
        except (OSError, ValueError, AttributeError):
            gen = 0
        return None, gen if type(gen) is int else 0
    return disk, disk["generation"]


def _referenced(manifest: dict[str, Any]) -> set[str]:
    files = manifest["files"]
    names = {MANIFEST, LOCK_FILE, files["keyframes"]["file"]}
    names.update(rec["file"] for rec in files["descriptors"])
    if files["index"] is not None:
        names.add(files["index"]["file"])
    return names


def _max_file_generation(directory: Path) -> int:
    best = 0
    for name in os.listdir(directory):
        match = _GEN_FILE_RE.match(name)
        if match:
            best = max(best, int(next(g for g in match.groups() if g is not None)))
    return best


def _remove_unreferenced(directory: Path, referenced: set[str]) -> int:
    """Delete temp files and generation files that ``referenced`` does not name (caller holds the lock)."""
    removed = 0
    for name in os.listdir(directory):
        if name in referenced or not (name.startswith(TMP_PREFIX) or _GEN_FILE_RE.match(name)):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / name)
            removed += 1
            logger.debug("map %s: removed unreferenced %s", directory, name)
    return removed


# ---------------------------------------------------------------------- file I/O


class _HashingWriter:
    """Binary writer that hashes and counts what passes through it."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        n = self._f.write(data)
        self.size += n
        return n


def _atomic_write(directory: Path, name: str, fill: Callable[[_HashingWriter], None]) -> tuple[str, int]:
    """Write ``directory/name`` via a fsynced temp file + os.replace; return (sha256 hex, size)."""
    tmp = directory / f"{TMP_PREFIX}{name}.{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with open(fd, "wb") as f:
            w = _HashingWriter(f)
            fill(w)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return w.sha.hexdigest(), w.size


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DirLock:
    """Exclusive advisory lock on <map>/.lock (released by the kernel if the process dies)."""

    def __init__(self, directory: Path, timeout_s: float) -> None:
        self._path = directory / LOCK_FILE
        self._timeout_s = timeout_s
        self._fd = -1

    def __enter__(self) -> _DirLock:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise MapLockedError(
                        f"{self._path} is locked by another process saving this map (waited {self._timeout_s:g} s); "
                        "wait for it to finish, or raise lock_timeout_s"
                    ) from None
                time.sleep(0.02)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def _sha256_of(f: io.BufferedReader) -> str:
    h = hashlib.sha256()
    buf = bytearray(_IO_BLOCK)
    view = memoryview(buf)
    while True:
        n = f.readinto(view)
        if not n:
            return h.hexdigest()
        h.update(view[:n])


def _corrupt(name: str, what: str) -> MapFormatError:
    return MapFormatError(f"{name} is corrupted or truncated ({what}); restore the map directory from a backup or "
                          "rebuild the map")


def _open_referenced(directory: Path, rec: dict[str, Any], stack: contextlib.ExitStack) -> io.BufferedReader:
    try:
        f = open(directory / rec["file"], "rb")
    except FileNotFoundError:
        raise _VanishedFileError(rec["file"]) from None
    return stack.enter_context(f)


def _read_verified(f: io.BufferedReader, rec: dict[str, Any], *, verify: bool) -> bytes:
    """Read a whole file named by a manifest record, checking its size and (optionally) sha256."""
    data = f.read()
    if len(data) != rec["bytes"]:
        raise _corrupt(rec["file"], f"{len(data)} bytes, manifest says {rec['bytes']}")
    if verify:
        sha = hashlib.sha256(data).hexdigest()
        if sha != rec["sha256"]:
            raise _corrupt(rec["file"], f"sha256 {sha[:12]}..., manifest says {rec['sha256'][:12]}...")
    return data


def _open_chunk(f: io.BufferedReader, rec: dict[str, Any], dim: int, dtype: np.dtype, *, mmap: bool,
                verify: bool) -> np.ndarray:
    """Read or map one open descriptor chunk; checks size, sha256, .npy header, dtype and shape against the manifest."""
    name = rec["file"]
    size = os.fstat(f.fileno()).st_size
    if size != rec["bytes"]:
        raise _corrupt(name, f"{size} bytes, manifest says {rec['bytes']}")
    if verify:
        sha = _sha256_of(f)
        if sha != rec["sha256"]:
            raise _corrupt(name, f"sha256 {sha[:12]}..., manifest says {rec['sha256'][:12]}...")
        f.seek(0)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, found = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, found = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as exc:
        raise _corrupt(name, f"not a valid .npy file: {exc}") from None
    if found != dtype or fortran or shape != (rec["rows"], dim):
        raise MapFormatError(
            f"{name} holds a {'Fortran-order ' if fortran else ''}{found} array of shape {shape}, expected "
            f"{dtype} ({rec['rows']}, {dim}) as the manifest says; the files are inconsistent (mixed maps?)"
        )
    offset = f.tell()
    if offset + rec["rows"] * dim * dtype.itemsize != size:
        raise _corrupt(name, f"{size} bytes cannot hold a ({rec['rows']}, {dim}) {dtype} array")
    if mmap:
        # Map the already opened and verified file (np.load would reopen it by name, maybe another file by then).
        return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=(rec["rows"], dim))
    arr = np.empty((rec["rows"], dim), dtype=dtype)
    if f.readinto(memoryview(arr).cast("B")) != arr.nbytes:
        raise _corrupt(name, "short read")
    arr.flags.writeable = False
    return arr


# ---------------------------------------------------------------------- CSV


def _is_finite_text(v: str) -> bool:
    try:
        return math.isfinite(float(v))
    except ValueError:
        return False


def _fmt_float(x: float) -> str:
    return "" if x != x else repr(x)  # repr of a Python float round-trips exactly


def _write_csv(w: _HashingWriter, cols: dict[str, np.ndarray], n: int) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    ids, stamps, zones = cols["ids"].tolist(), cols["stamps_ns"].tolist(), cols["utm_zones"].tolist()
    pos, quat, gps, utm = (cols[k].tolist() for k in ("positions", "orientations", "gps", "utm"))
    cams, frames, bands, sources = (cols[k] for k in ("cameras", "frame_ids", "utm_bands", "sources"))
    for i in range(n):
        writer.writerow([
            ids[i], stamps[i], cams[i], frames[i], *map(_fmt_float, pos[i]), *map(_fmt_float, quat[i]),
            *map(_fmt_float, gps[i]), zones[i] or "", bands[i], *map(_fmt_float, utm[i]), sources[i],
        ])
        if buf.tell() > 1 << 20:
            w.write(buf.getvalue().encode("utf-8"))
            buf.seek(0)
            buf.truncate()
    w.write(buf.getvalue().encode("utf-8"))


def _parse_csv(data: bytes, name: str, count: int) -> dict[str, np.ndarray]:
    """Parse the keyframe CSV into typed columns and check them like add() does."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _corrupt(name, f"not UTF-8: {exc}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or tuple(header) != CSV_COLUMNS:
        raise MapFormatError(f"{name}: header is {header}, expected {list(CSV_COLUMNS)}")
    rows = []
    for row in reader:
        if len(row) != len(CSV_COLUMNS):
            raise MapFormatError(f"{name} line {reader.line_num}: {len(row)} cells, expected {len(CSV_COLUMNS)}")
        rows.append(row)
    if len(rows) != count:
        raise MapFormatError(f"{name} has {len(rows)} keyframe rows but manifest.json says {count}: the table is "
                             "truncated or was edited; restore the map directory from a backup or rebuild the map")
    cells = dict(zip(CSV_COLUMNS, zip(*rows))) if rows else {c: () for c in CSV_COLUMNS}

    def ints(col: str, empty: int | None = None) -> np.ndarray:
        out = []
        for i, v in enumerate(cells[col]):
            try:
                out.append(empty if (v == "" and empty is not None) else int(v))
            except ValueError:
                raise MapFormatError(f"{name} line {i + 2}, column {col}: {v!r} is not an integer") from None
        try:
            return np.array(out, dtype=np.int64)
        except OverflowError:
            raise MapFormatError(f"{name}, column {col}: a value does not fit in int64") from None

    def floats(*col_names: str) -> np.ndarray:
        out = np.full((len(rows), len(col_names)), np.nan)
        for j, col in enumerate(col_names):
            text = cells[col]
            try:
                out[:, j] = [float(v) if v else math.nan for v in text]
                suspects = np.flatnonzero(~np.isfinite(out[:, j]))  # unknowns, plus any "nan"/"inf" text
            except ValueError:
                suspects = range(len(text))
            bad = [i for i in suspects if text[i] != "" and not _is_finite_text(text[i])]
            if bad:
                raise MapFormatError(f"{name} line {bad[0] + 2}, column {col}: {text[bad[0]]!r} is not a finite "
                                     "number (unknown values are empty cells)")
        return out

    def strs(col: str) -> np.ndarray:
        out = np.empty(len(rows), dtype=object)
        out[:] = list(cells[col])
        return out

    cols = {
        "ids": ints("id"),
        "stamps_ns": ints("stamp_ns"),
        "cameras": strs("camera"),
        "frame_ids": strs("frame_id"),
        "positions": floats("x", "y", "z"),
        "orientations": floats("qx", "qy", "qz", "qw"),
        "gps": floats("lat", "lon", "alt"),
        "utm_zones": ints("utm_zone", empty=0),
        "utm_bands": strs("utm_band"),
        "utm": floats("utm_easting", "utm_northing"),
        "sources": strs("source"),
    }
    zones = cols["utm_zones"]
    if ((zones < 0) | (zones > 60)).any():
        bad = int(np.flatnonzero((zones < 0) | (zones > 60))[0])
        raise MapFormatError(f"{name} line {bad + 2}: utm_zone {zones[bad]} outside 1..60 (empty = unknown)")
    cols["utm_zones"] = zones.astype(np.int16)
    ids = cols["ids"]
    if ids.shape[0] > 1 and not (np.diff(ids) > 0).all():
        bad = int(np.flatnonzero(np.diff(ids) <= 0)[0]) + 1
        raise MapFormatError(f"{name} line {bad + 2}: id {ids[bad]} after {ids[bad - 1]}; ids must be strictly "
                             "increasing (the table was edited or reordered)")
    if ids.shape[0] and ids[0] < 0:
        raise MapFormatError(f"{name} line 2: negative id {ids[0]}")
    _check_columns(cols, lambda i: f"{name} line {i + 2}", MapFormatError)
    return cols


# ---------------------------------------------------------------------- validation


def utc_now_iso() -> str:
    """Now as ISO 8601 UTC with milliseconds (the map files' timestamps)."""
    # "+00:00" rather than "Z": datetime.fromisoformat() on Python 3.10 does not parse "Z".
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _dtype_name(storage_dtype: Any) -> str:
    try:
        name = np.dtype(storage_dtype).name
    except TypeError:
        name = None
    if name not in _STORAGE_DTYPES:
        raise MapError(f"storage_dtype {storage_dtype!r} is not supported; use one of {sorted(_STORAGE_DTYPES)}")
    return name


def _check_json(value: Any, what: str, exc_type: type[MapError]) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise exc_type(f"{what} is not plain JSON ({exc}); use dicts, lists, str, int, finite float, bool, None") \
            from None


def _check_fingerprint(fp: Any, what: str, exc_type: type[MapError]) -> None:
    if not isinstance(fp, dict):
        raise exc_type(f"{what} must be a dict, got {type(fp).__name__}")
    for key, kind in _FINGERPRINT_KEYS.items():
        value = fp.get(key)
        ok = (type(value) is int and value > 0) if kind is int else (isinstance(value, str) and value != "")
        if not ok:
            raise exc_type(f"{what}[{key!r}] is {value!r}, expected a {'positive int' if kind is int else 'string'}; "
                           f"a fingerprint needs {sorted(_FINGERPRINT_KEYS)} (from the model that made the "
                           "descriptors)")
    _check_json(fp, what, exc_type)


def _check_same_model(map_fp: dict[str, Any], other: Any, where: str) -> None:
    if not isinstance(other, dict) or not isinstance(other.get("id"), str):
        raise MapError(f"expected a fingerprint dict with an 'id' string, got {other!r}")
    if other["id"] != map_fp.get("id"):
        raise MapMismatchError(
            f"{where} was built with model {map_fp.get('id')} ({map_fp.get('architecture')}), but the model in use is "
            f"{other['id']} ({other.get('architecture')}): descriptors of different models are not comparable. Use "
            "the model that built the map, or rebuild the map with this model"
        )


def _check_descriptors(descriptors: Any, dim: int) -> np.ndarray:
    arr = np.asarray(descriptors)
    if arr.dtype.kind != "f":
        raise MapError(f"descriptors must be a float array, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise MapError(f"descriptors have shape {np.shape(descriptors)}, expected (N, {dim}) for this map's model")
    x = arr.astype(np.float32) if arr.dtype.itemsize < 4 else arr  # fp16 squares of 4096 terms may lose precision
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise MapError(f"descriptor row {int(np.flatnonzero(~finite)[0])} contains NaN or inf; the encoder failed on "
                       "that image, drop it")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    bad = np.abs(norms - 1.0) > NORM_TOLERANCE
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MapError(f"descriptor row {i} has L2 norm {norms[i]:.4g}, expected 1 +- {NORM_TOLERANCE}: L2-normalise "
                       "descriptors before adding them (x / np.linalg.norm(x, axis=1, keepdims=True))")
    return arr


def _as_int_column(value: Any, n: int, name: str) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(value))
    if arr.dtype.kind not in "iu":
        hint = (": float seconds cannot hold ROS-epoch nanoseconds exactly; pass ints such as "
                "Time.nanoseconds or sec * 10**9 + nanosec") if name == "stamps_ns" else ""
        raise MapError(f"{name} must be integers, got dtype {arr.dtype}{hint}")
    if arr.shape != (n,):
        raise MapError(f"{name} has shape {arr.shape}, expected ({n},): one value per descriptor row")
    if arr.dtype.kind == "u" and n and arr.max() > np.iinfo(np.int64).max:
        raise MapError(f"{name} has a value above the int64 range")
    return arr.astype(np.int64)


def _as_zone_column(value: Any, n: int) -> np.ndarray:
    if value is None:
        return np.zeros(n, dtype=np.int16)
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise MapError(f"utm_zones must be integers 1..60 (0 = unknown), got dtype {arr.dtype}")
    if arr.ndim == 0:
        arr = np.full(n, int(arr), dtype=np.int64)
    if arr.shape != (n,):
        raise MapError(f"utm_zones has shape {arr.shape}, expected ({n},) or a single zone for all rows")
    if n and (arr.min() < 0 or arr.max() > 60):
        raise MapError(f"utm_zones must be in 1..60 (0 = unknown), found {arr.min()}..{arr.max()}")
    return arr.astype(np.int16)


def _as_str_column(value: Any, n: int, name: str) -> np.ndarray:
    try:
        items = [value] * n if isinstance(value, str) else list(value)
    except TypeError:
        raise MapError(f"{name} must be a string or a sequence of {n} strings, got {type(value).__name__}") from None
    if len(items) != n:
        raise MapError(f"{name} has {len(items)} entries, expected {n} (one per descriptor row) or a single string")
    out = np.empty(n, dtype=object)
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise MapError(f"{name}[{i}] is a {type(s).__name__} ({s!r}), expected str")
        out[i] = str(s)
    return out


def _as_float_rows(value: Any, n: int, width: int, name: str) -> np.ndarray:
    if value is None:
        return np.full((n, width), np.nan)
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise MapError(f"{name} must be a numeric (N, {width}) array, got {type(value).__name__}") from None
    if arr.shape == (width,) and n == 1:
        arr = arr.reshape(1, width)
    if arr.shape != (n, width):
        raise MapError(f"{name} has shape {arr.shape}, expected ({n}, {width}): one row per descriptor row "
                       "(NaN rows for unknown)")
    return arr


def _check_columns(c: dict[str, np.ndarray], where: Callable[[int], str], exc_type: type[MapError]) -> None:
    """Check keyframe invariants shared by add() and load(); ``where(i)`` names row i in messages."""

    def first(mask: np.ndarray) -> int:
        return int(np.flatnonzero(mask)[0])

    if (c["stamps_ns"] < 0).any():
        i = first(c["stamps_ns"] < 0)
        raise exc_type(f"{where(i)}: stamps_ns {c['stamps_ns'][i]} is negative")
    for col in ("cameras", "frame_ids", "utm_bands", "sources"):
        values = c[col]
        if _BAD_CHAR_RE.search("".join(values)):  # one scan; locate the row only on failure
            i = next(i for i, s in enumerate(values) if _BAD_CHAR_RE.search(s))
            raise exc_type(f"{where(i)}: {col} value {values[i]!r} contains a control character or lone surrogate; "
                           "use printable UTF-8 text")
        if col in ("cameras", "frame_ids") and (values == "").any():
            raise exc_type(f"{where(first(values == ''))}: {col} is empty; every keyframe needs a camera name and a "
                           "frame id")
    for col, width in (("positions", 3), ("orientations", 4), ("utm", 2)):
        a = c[col]
        if np.isinf(a).any():
            raise exc_type(f"{where(first(np.isinf(a).any(axis=1)))}: {col} contains inf; use NaN for unknown")
        known = ~np.isnan(a)
        partial = known.any(axis=1) & ~known.all(axis=1)
        if partial.any():
            i = first(partial)
            raise exc_type(f"{where(i)}: {col} {a[i].tolist()} is partly NaN; a row is either fully known "
                           f"({width} finite values) or unknown (all NaN)")
    q = c["orientations"]
    norms = np.linalg.norm(q, axis=1)
    bad = ~np.isnan(norms) & (np.abs(norms - 1.0) > QUAT_TOLERANCE)
    if bad.any():
        i = first(bad)
        raise exc_type(f"{where(i)}: orientation {q[i].tolist()} has norm {norms[i]:.6g}, expected a unit quaternion "
                       "(x, y, z, w)")
    g = c["gps"]
    if np.isinf(g).any():
        raise exc_type(f"{where(first(np.isinf(g).any(axis=1)))}: gps contains inf; use NaN for unknown")
    lat_known, lon_known, alt_known = (~np.isnan(g[:, k]) for k in range(3))
    bad = (lat_known != lon_known) | (alt_known & ~lat_known)
    if bad.any():
        i = first(bad)
        raise exc_type(f"{where(i)}: gps {g[i].tolist()} mixes known and unknown values; latitude and longitude go "
                       "together (altitude alone may be NaN)")
    bad = lat_known & ((np.abs(g[:, 0]) > 90) | (np.abs(g[:, 1]) > 180))
    if bad.any():
        i = first(bad)
        raise exc_type(f"{where(i)}: gps {g[i].tolist()} is outside lat [-90, 90], lon [-180, 180] (degrees; is it "
                       "lon, lat order, or radians?)")
    zones, bands, utm = c["utm_zones"], c["utm_bands"], c["utm"]
    utm_known = ~np.isnan(utm[:, 0])
    band_known = np.array([b != "" for b in bands], dtype=bool)
    band_valid = np.array([len(b) == 1 and b in _UTM_BANDS for b in bands], dtype=bool)
    bad = (zones == 0) & (band_known | utm_known)
    bad |= (zones != 0) & (~band_valid | ~utm_known)
    if bad.any():
        i = first(bad)
        raise exc_type(f"{where(i)}: UTM zone {zones[i]}, band {bands[i]!r}, easting/northing {utm[i].tolist()} are "
                       f"inconsistent; give zone 1..60 with a band letter from {_UTM_BANDS} and finite "
                       "easting/northing, or zone 0, band '' and NaN for unknown")


def _empty_columns() -> dict[str, np.ndarray]:
    return {
        "ids": np.empty(0, dtype=np.int64),
        "stamps_ns": np.empty(0, dtype=np.int64),
        "cameras": np.empty(0, dtype=object),
        "frame_ids": np.empty(0, dtype=object),
        "positions": np.empty((0, 3)),
        "orientations": np.empty((0, 4)),
        "gps": np.empty((0, 3)),
        "utm_zones": np.empty(0, dtype=np.int16),
        "utm_bands": np.empty(0, dtype=object),
        "utm": np.empty((0, 2)),
        "sources": np.empty(0, dtype=object),
    }
