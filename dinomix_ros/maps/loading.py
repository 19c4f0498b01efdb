"""Verified loading of a keyframe map directory: the reader behind :meth:`KeyframeMap.load
<dinomix_ros.maps.keyframes.KeyframeMap.load>` (call that; it documents the arguments and errors).

The layout, the atomic generations written by saves and the writers' lock are :mod:`dinomix_ros.maps.storage`'s.
Readers take no lock: every file the manifest names is opened before any is read (an open file survives a concurrent
save deleting it), and a reader whose files vanish under it because a writer committed a newer generation re-reads the
manifest and retries. Only regular files are opened, never through a link; sizes are checked against the manifest
before anything is read, sha256 optionally, and descriptor chunks are parsed with :mod:`numpy.lib.format` header
readers (float dtypes only, bounded headers) and memory-mapped from the already verified file descriptor. No pickle.
A loaded map records what it loaded in its ``_storage_state``, so that saving it back appends
(:mod:`~dinomix_ros.maps.storage`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.maps.errors import MapError, MapFormatError
from dinomix_ros.maps.keyframe_csv import parse_csv
from dinomix_ros.maps.geotags import rename_legacy_utm_frames
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.local_features import (
    CameraRecord, KeyframeFeatures, check_feature_rows, keypoint_bounds, slot_dtype,
)
from dinomix_ros.maps.manifest import corrupted, open_map_file, read_manifest
from dinomix_ros.maps.storage import _IO_BLOCK, _DiskState, _remember  # the committed state a later save appends to
from dinomix_ros.maps.validation import STORAGE_DTYPES, check_same_model, check_unit_rows, short_repr

__all__ = ["load_map"]

logger = logging.getLogger(__name__)

_LOAD_ATTEMPTS = 5
#: Largest .npy header accepted in a descriptor chunk (numpy writes ~128 bytes): bounds what its parser is fed.
_NPY_HEADER_MAX = 4096


class _VanishedFileError(Exception):
    """A file named by the manifest disappeared while loading (internal: triggers a retry)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


# ---------------------------------------------------------------------- load


def load_map(
    path: str | os.PathLike[str],
    *,
    expected_fingerprint: dict[str, Any] | None = None,
    mmap: bool = True,
    verify: bool = True,
    load_index: bool = True,
    map_type: type[KeyframeMap] = KeyframeMap,
) -> KeyframeMap:
    """Load and verify the map directory ``path`` as a ``map_type``; see :meth:`KeyframeMap.load` for the rest."""
    directory = Path(path)
    for _ in range(_LOAD_ATTEMPTS):
        manifest = read_manifest(directory)
        if expected_fingerprint is not None:
            check_same_model(manifest["fingerprint"], expected_fingerprint, f"the map at {directory}")
        try:
            return _from_manifest(map_type, directory, manifest, mmap=mmap, verify=verify, load_index=load_index)
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


def _from_manifest(map_type: type[KeyframeMap], directory: Path, manifest: dict[str, Any], *, mmap: bool,
                   verify: bool, load_index: bool) -> KeyframeMap:
    """Read and verify the files ``manifest`` names (raises :class:`_VanishedFileError` if one is gone)."""
    t0 = time.monotonic()
    count = manifest["count"]
    dim = manifest["descriptor_dim"]
    dtype = STORAGE_DTYPES[manifest["descriptor_dtype"]]
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
        starts = np.cumsum([0] + [rec["rows"] for rec in files["descriptors"]]).tolist()
        feature_files = [_open_referenced(directory, rec, stack) for rec in files.get("features") or []]
        index_file = None
        if index_rec is not None and load_index:
            try:
                index_file = _open_referenced(directory, index_rec, stack)
            except _VanishedFileError:
                logger.warning("map %s: index %s is missing: index stale, will be rebuilt", directory,
                               index_rec["file"])
                index_rec = None
            except MapFormatError as exc:  # not a regular file, or not the manifest's size: optional, so dropped
                logger.warning("map %s: index unusable (%s): index stale, will be rebuilt", directory, exc)
                index_rec = None
        cols = parse_csv(_read_verified(kf_file, kf_rec, verify=True), kf_rec["file"], count)
        _check_table_matches(manifest, cols, kf_rec["file"])
        cols["frame_ids"] = rename_legacy_utm_frames(cols["frame_ids"], cols["utm_zones"])  # utm_33U -> utm
        segments = [_open_chunk(f, rec, dim, dtype, start, mmap=mmap, verify=verify)
                    for f, rec, start in zip(chunk_files, files["descriptors"], starts)]
        local = _load_features(manifest, feature_files, cols["cameras"], mmap=mmap, verify=verify)
        blob = None
        if index_file is not None:
            try:
                blob = _read_verified(index_file, index_rec, verify=verify)
            except MapFormatError as exc:
                logger.warning("map %s: index unusable (%s): index stale, will be rebuilt", directory, exc)
                index_rec = None
    obj = map_type(manifest["fingerprint"], descriptor_dim=dim, storage_dtype=manifest["descriptor_dtype"],
                   metadata=manifest["metadata"], created=manifest["created"], next_id=manifest["next_id"],
                   columns=cols, segments=segments)
    obj.local_features = local
    if blob is not None:
        obj._attach_verified_index(np.frombuffer(blob, dtype=np.uint8), index_rec["kind"], index_rec["sha256"])
    _remember(obj, os.path.realpath(directory), _DiskState(
        generation=manifest["generation"], rows=count, chunks=files["descriptors"], index=index_rec,
        features=files.get("features")))
    logger.info("loaded map %s: generation %d, %d keyframes x %d %s in %d chunk(s), index %s, %.3f s",
                directory, manifest["generation"], count, dim, manifest["descriptor_dtype"], len(segments),
                obj.index_kind, time.monotonic() - t0)
    return obj


def _load_features(manifest: dict[str, Any], files: list[io.BufferedReader], row_cameras: np.ndarray, *,
                   mmap: bool, verify: bool) -> KeyframeFeatures | None:
    """The map's local features from its open, verified feature chunks (None for a map without: format 1); with
    ``verify``, every row's keypoints are checked against its camera's image (:func:`check_feature_rows`)."""
    entry = manifest.get("local_features")
    if entry is None:
        return None
    kind, slots = entry["type"], entry["slots"]
    intrinsics = {name: CameraModel.from_dict(data) for name, data in entry["intrinsics"].items()}
    cameras = {name: CameraRecord.from_dict(data) for name, data in entry.get("cameras", {}).items()}
    without = sorted(set(row_cameras.tolist()) - set(cameras))
    if without and len(row_cameras):
        logger.info("map: camera(s) %s have no camera record (written before maps stored them): their keyframes' "
                    "pose priors use camera_mount.*, their keypoints are checked against %s", short_repr(without, 200),
                    "their intrinsics' image size" if all(c in intrinsics for c in without) else
                    "their intrinsics' image size where known, else the largest image side a map describes")
    names, which = np.unique(row_cameras.astype(str), return_inverse=True)
    bounds = np.array([keypoint_bounds(n, cameras, intrinsics) for n in names.tolist()], np.float64).reshape(-1, 2)
    segments, start = [], 0
    for f, rec in zip(files, manifest["files"]["features"]):
        chunk = _open_chunk(f, rec, rec.get("slots", slots), slot_dtype(kind), None, mmap=mmap, verify=verify)
        if verify:
            try:
                check_feature_rows(chunk, bounds[which[start:start + rec["rows"]]],
                                   lambda i, s=start, n=rec["file"]: f"{n} row {i} (map row {s + i})")
            except MapError as exc:
                raise MapFormatError(f"{exc}; restore the map directory from a backup or rebuild the map") from None
        segments.append(chunk)
        start += rec["rows"]
    return KeyframeFeatures(kind, slots, segments, intrinsics, cameras)


def _check_table_matches(manifest: dict[str, Any], cols: dict[str, np.ndarray], name: str) -> None:
    """Refuse a keyframe table whose ids, frames or cameras contradict the manifest."""
    ids = cols["ids"]
    if manifest["count"] and ids[-1] >= manifest["next_id"]:
        raise MapFormatError(f"{name}: largest id {ids[-1]} is not below the manifest's next_id "
                             f"{manifest['next_id']}; the files are inconsistent (edited by hand?)")
    for key, col in (("frames", "frame_ids"), ("cameras", "cameras")):
        found = sorted(set(cols[col].tolist()))
        if found != sorted(manifest[key]):
            raise MapFormatError(f"manifest.json lists {key} {short_repr(manifest[key], 200)} but {name} has "
                                 f"{short_repr(found, 200)}; the files are inconsistent (edited by hand?)")


def _open_referenced(directory: Path, rec: dict[str, Any], stack: contextlib.ExitStack) -> io.BufferedReader:
    """Open a file the manifest names, kept open by ``stack``; a missing file raises :class:`_VanishedFileError`.

    Only a regular file is opened, never through a link (:func:`~dinomix_ros.maps.manifest.open_map_file`), and its
    size must be the manifest's before anything reads it.
    """
    try:
        f = stack.enter_context(open_map_file(directory, rec["file"]))
    except FileNotFoundError:
        raise _VanishedFileError(rec["file"]) from None
    size = os.fstat(f.fileno()).st_size
    if size != rec["bytes"]:
        raise corrupted(rec["file"], f"{size} bytes, manifest says {rec['bytes']}")
    return f


def _read_verified(f: io.BufferedReader, rec: dict[str, Any], *, verify: bool) -> bytes:
    """Read a whole file named by a manifest record (opened by :func:`_open_referenced`), checking its size and
    (optionally) sha256; never reads more than the manifest's size plus one byte."""
    data = f.read(rec["bytes"] + 1)
    if len(data) != rec["bytes"]:
        raise corrupted(rec["file"], f"{len(data)} bytes, manifest says {rec['bytes']}")
    if verify:
        sha = hashlib.sha256(data).hexdigest()
        if sha != rec["sha256"]:
            raise corrupted(rec["file"], f"sha256 {sha[:12]}..., manifest says {rec['sha256'][:12]}...")
    return data


def _sha256_of(f: io.BufferedReader) -> str:
    """Hash an open file from its current position to the end, in blocks."""
    h = hashlib.sha256()
    buf = bytearray(_IO_BLOCK)
    view = memoryview(buf)
    while True:
        n = f.readinto(view)
        if not n:
            return h.hexdigest()
        h.update(view[:n])


def _open_chunk(f: io.BufferedReader, rec: dict[str, Any], dim: int, dtype: np.dtype, start: int | None, *,
                mmap: bool, verify: bool) -> np.ndarray:
    """Read or map one open chunk (map rows from ``start``); checks size, sha256, .npy header, dtype and shape
    against the manifest, and with ``verify`` that every row of a descriptor chunk (``start`` given) is a finite
    unit vector (``start`` None: a chunk of another kind, e.g. local features)."""
    name = rec["file"]
    size = os.fstat(f.fileno()).st_size
    if size != rec["bytes"]:
        raise corrupted(name, f"{size} bytes, manifest says {rec['bytes']}")
    if verify:
        sha = _sha256_of(f)
        if sha != rec["sha256"]:
            raise corrupted(name, f"sha256 {sha[:12]}..., manifest says {rec['sha256'][:12]}...")
        f.seek(0)
    try:
        shape, fortran, found = _npy_header(f)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError) as exc:  # numpy parses it with ast
        raise corrupted(name, f"not a valid .npy file: {str(exc)[:200]}") from None
    if found != dtype or fortran or shape != (rec["rows"], dim):
        raise MapFormatError(
            f"{name} holds a {'Fortran-order ' if fortran else ''}{found} array of shape {shape}, expected "
            f"{dtype} ({rec['rows']}, {dim}) as the manifest says; the files are inconsistent (mixed maps?)"
        )
    offset = f.tell()
    if offset + rec["rows"] * dim * dtype.itemsize != size:
        raise corrupted(name, f"{size} bytes cannot hold a ({rec['rows']}, {dim}) {dtype} array")
    if mmap:
        # Map the already opened and verified file (np.load would reopen it by name, maybe another file by then).
        arr = np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=(rec["rows"], dim))
    else:
        arr = np.empty((rec["rows"], dim), dtype=dtype)
        if f.readinto(memoryview(arr).cast("B")) != arr.nbytes:
            raise corrupted(name, "short read")
        arr.flags.writeable = False
    if verify and start is not None:  # a sealed, hashed file is not yet a descriptor: search assumes unit vectors
        check_unit_rows(arr, lambda i: f"{name} row {i} (map row {start + i})", MapFormatError,
                        hint="; the file is not a dinomix descriptor chunk (edited or damaged): restore the map "
                             "directory from a backup or rebuild the map")
    return arr


def _npy_header(f: io.BufferedReader) -> tuple[Any, bool, np.dtype]:
    """(shape, fortran_order, dtype) from the .npy header at the start of ``f``, refusing oversized headers."""
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy version {version}")
    size_bytes = 2 if version == (1, 0) else 4
    here = f.tell()
    length = int.from_bytes(f.read(size_bytes), "little")
    if length > _NPY_HEADER_MAX:
        raise ValueError(f"its header is {length} bytes long, at most {_NPY_HEADER_MAX} are accepted")
    f.seek(here)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)
