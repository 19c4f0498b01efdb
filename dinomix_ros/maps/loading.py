"""Verified loading of a keyframe map directory: :func:`load_map` (the counterpart of
:func:`~dinomix_ros.maps.storage.save_map`).

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
import mmap as mmap_module
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.maps.errors import MapError, MapFormatError
from dinomix_ros.maps.integrity import VERIFY_MODES, ChunkCheck, MapIntegrity
from dinomix_ros.maps.geotags import rename_legacy_utm_frames
from dinomix_ros.maps.keyframe_csv import check_csv_matches, parse_csv
from dinomix_ros.maps.keyframe_table import parse_table
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.local_features import (
    CameraRecord, KeyframeFeatures, check_feature_rows, keypoint_bounds, slot_dtype,
)
from dinomix_ros.maps.manifest import corrupted, open_map_file, read_manifest
from dinomix_ros.maps.storage import _DiskState, _remember  # the committed state a later save appends to
from dinomix_ros.maps.validation import STORAGE_DTYPES, check_same_model, short_repr

__all__ = ["load_map"]

logger = logging.getLogger(__name__)

_LOAD_ATTEMPTS = 5
#: From this many keyframes on, the binary keyframe table is loaded (when the map has one) instead of parsing the CSV
#: (1 s per 30000 rows here); the CSV is then compared with it by the content check.
TABLE_MIN_ROWS = 50_000
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
    verify: bool | str = True,
    load_index: bool = True,
    map_type: type[KeyframeMap] = KeyframeMap,
) -> KeyframeMap:
    """Load and verify a map directory.

    Checks the format and version, the manifest's seal and structure, that the keyframe CSV and every chunk have
    the manifest's row count, size, dtype and dimension, the sha256 of every file, the keyframe invariants, and
    that descriptors are unit vectors. A map directory is untrusted input: only regular files are opened, never
    through a symbolic link, and sizes are bounded (``maps/README.md``).

    Args:
        path: Map directory.
        expected_fingerprint: If given, the fingerprint of the model in use; a map from another model is refused.
        mmap: Memory-map descriptor chunks (read-only) instead of reading them into RAM.
        verify: Check the content of the descriptor and local-feature chunks: the sha256 of every block (or file)
            and that every descriptor is a finite unit vector (:mod:`~dinomix_ros.maps.integrity`; reads every
            byte: ~8 GB for a 1M x 4096 float16 map). True: before returning. ``"background"``: in a background
            thread started now (``kmap.integrity`` says how far it got and whether it failed; the map can be
            searched meanwhile). ``"deferred"``: ``kmap.integrity`` is created, not started. False: never, so a
            flipped byte goes unnoticed. Sizes and headers are always checked, the keyframe CSV always hashed (it
            is read anyway), the manifest's seal always checked, and the index files hashed unless False.
        load_index: Read the search index blob (if fresh); with False it stays on disk, and is kept by later saves
            as long as no rows are added.
        map_type: The class to build (:class:`KeyframeMap` or a subclass).

    Returns:
        The map; saving it back to ``path`` appends.

    Raises:
        MapNotFoundError: No directory or no manifest.json.
        MapFormatError: Unknown format, newer version, or a file is missing, corrupted, truncated or inconsistent
            with the manifest (the message names the file).
        MapMismatchError: ``expected_fingerprint`` has a different id than the map's.
    """
    directory = Path(path)
    if verify not in (True, False) + VERIFY_MODES:
        raise MapError(f"verify must be True, False, 'background' or 'deferred', got {verify!r}")
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
                   verify: bool | str, load_index: bool) -> KeyframeMap:
    """Read and check the files ``manifest`` names (raises :class:`_VanishedFileError` if one is gone)."""
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
    checks: list[ChunkCheck] = []
    extra: list[tuple[int, Any, int | None]] = []
    try:
        with contextlib.ExitStack() as stack:
            # Open every referenced file before reading any: an open file survives a concurrent save deleting it,
            # so a writer can only race this reader during these few open() calls (then load() retries).
            kf_file = _open_referenced(directory, kf_rec, stack)
            table_files = None
            if files.get("table") is not None and count >= TABLE_MIN_ROWS:
                table_files = [_open_referenced(directory, files[key], stack) for key in ("table", "sources")]
            chunk_files = [_open_referenced(directory, rec, stack) for rec in files["descriptors"]]
            starts = np.cumsum([0] + [rec["rows"] for rec in files["descriptors"]]).tolist()
            feature_files = [_open_referenced(directory, rec, stack) for rec in files.get("features") or []]
            index_files = _open_index(directory, index_rec, stack) if index_rec is not None and load_index else None
            if index_files is None:
                index_rec = None if load_index else index_rec
            if table_files is None:
                cols = parse_csv(_read_verified(kf_file, kf_rec, verify=True), kf_rec["file"], count)
                _check_table_matches(manifest, cols, kf_rec["file"])
            else:  # the binary table; the CSV is hashed now and compared with it by the content check
                _read_verified(kf_file, kf_rec, verify=True)
                cols = _read_table(table_files, files, manifest)
                _check_table_matches(manifest, cols, files["table"]["file"])
                if verify is not False:
                    fd = os.dup(kf_file.fileno())
                    extra.append((kf_rec["bytes"], _csv_check(fd, kf_rec, cols, files["table"]["file"]), fd))
            cols["frame_ids"] = rename_legacy_utm_frames(cols["frame_ids"], cols["utm_zones"])  # utm_33U -> utm
            segments = []
            for f, rec, start in zip(chunk_files, files["descriptors"], starts):
                arr, offset = _open_chunk(f, rec, dim, dtype, mmap=mmap)
                segments.append(arr)
                if verify is not False:
                    checks.append(ChunkCheck(rec["file"], os.dup(f.fileno()), rec, offset, rec["rows"], dim, dtype,
                                             start))
            local = _load_features(manifest, feature_files, cols["cameras"],
                                   (checks, extra) if verify is not False else None, mmap=mmap)
            blob, codes = None, None
            if index_files is not None:
                try:
                    blob, codes = _read_index(index_files, index_rec, verify=verify is not False)
                except MapFormatError as exc:
                    logger.warning("map %s: index unusable (%s): index stale, will be rebuilt", directory, exc)
                    index_rec = None
    except BaseException:
        for fd in [chunk.fd for chunk in checks] + [e[2] for e in extra if e[2] is not None]:
            os.close(fd)
        raise
    obj = map_type(manifest["fingerprint"], descriptor_dim=dim, storage_dtype=manifest["descriptor_dtype"],
                   metadata=manifest["metadata"], created=manifest["created"], next_id=manifest["next_id"],
                   columns=cols, segments=segments)
    obj.local_features = local
    if blob is not None:
        obj._attach_verified_index(np.frombuffer(blob, dtype=np.uint8), index_rec["kind"], index_rec["sha256"],
                                   codes)
    if checks or extra:
        obj.integrity = MapIntegrity(directory, checks, extra)
        if verify is True:
            obj.integrity.run()  # the refusal of a damaged map, before anything uses it
        elif verify == "background":
            obj.integrity.start()
    _remember(obj, os.path.realpath(directory), _DiskState(
        generation=manifest["generation"], rows=count, chunks=files["descriptors"], index=index_rec,
        features=files.get("features")))
    logger.info("loaded map %s: generation %d, %d keyframes x %d %s in %d chunk(s), index %s, content check %s, "
                "%.3f s", directory, manifest["generation"], count, dim, manifest["descriptor_dtype"], len(segments),
                obj.index_kind, "none" if obj.integrity is None else obj.integrity.describe(), time.monotonic() - t0)
    return obj


def _csv_check(fd: int, rec: dict[str, Any], cols: dict[str, np.ndarray], table: str) -> Any:
    """The content check that the keyframe CSV (open as ``fd``, owned by the check) says what the binary table
    ``table`` loaded."""

    def check() -> None:
        with open(fd, "rb", closefd=False) as f:
            f.seek(0)
            check_csv_matches(f, rec["file"], rec["rows"], cols, table)

    return check


def _read_table(table_files: list[io.BufferedReader], files: dict[str, Any],
                manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """The keyframe columns from the binary table and sources (hashed; :mod:`.keyframe_table`)."""
    table_rec, sources_rec = files["table"], files["sources"]
    data = _read_verified(table_files[0], table_rec, verify=True)
    try:
        records = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError) as exc:
        raise corrupted(table_rec["file"], f"not a valid .npy file: {str(exc)[:200]}") from None
    sources = _read_verified(table_files[1], sources_rec, verify=True)
    return parse_table(records, sources, manifest, (table_rec["file"], sources_rec["file"]))


def _open_index(directory: Path, rec: dict[str, Any], stack: contextlib.ExitStack) -> list[io.BufferedReader] | None:
    """The index file and its code chunks, opened; None (logged: rebuilt) when one is missing or unusable."""
    try:
        return [_open_referenced(directory, r, stack) for r in [rec] + list(rec.get("codes") or [])]
    except _VanishedFileError as exc:
        logger.warning("map %s: index file %s is missing: index stale, will be rebuilt", directory, exc.name)
    except MapFormatError as exc:  # not a regular file, or not the manifest's size: optional, so dropped
        logger.warning("map %s: index unusable (%s): index stale, will be rebuilt", directory, exc)
    return None


def _read_index(files: list[io.BufferedReader], rec: dict[str, Any], *,
                verify: bool) -> tuple[bytes, list[np.ndarray] | None]:
    """The index blob and its code chunks (memory-mapped uint8 (rows, code_size), hashed when ``verify``)."""
    blob = _read_verified(files[0], rec, verify=verify)
    if "codes" not in rec:
        return blob, None
    codes, width = [], None
    for f, code_rec in zip(files[1:], rec["codes"]):
        arr, offset = _open_chunk(f, code_rec, None, np.dtype(np.uint8), mmap=True)
        if width is not None and arr.shape[1] != width:
            raise MapFormatError(f"{code_rec['file']} holds codes of {arr.shape[1]} bytes, the first chunk of "
                                 f"{width}: the files are inconsistent")
        width = arr.shape[1]
        if verify:
            MapIntegrity("index", [ChunkCheck(code_rec["file"], os.dup(f.fileno()), code_rec, offset,
                                              code_rec["rows"])], quiet=True).run()
        codes.append(arr)
    return blob, codes


def _load_features(manifest: dict[str, Any], files: list[io.BufferedReader], row_cameras: np.ndarray,
                   checks: tuple[list[ChunkCheck], list[tuple[int, Any, int | None]]] | None, *,
                   mmap: bool) -> KeyframeFeatures | None:
    """The map's local features from their open feature chunks (None for a map without: format 1). Their content
    checks (``checks``: the chunk and extra lists of :class:`MapIntegrity`; None: not checked) are each chunk's hashes,
    then every row's keypoints against its camera's image (:func:`check_feature_rows`)."""
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
        arr, offset = _open_chunk(f, rec, rec.get("slots", slots), slot_dtype(kind), mmap=mmap)
        segments.append(arr)
        if checks is not None:
            checks[0].append(ChunkCheck(rec["file"], os.dup(f.fileno()), rec, offset, rec["rows"]))
            checks[1].append((rec["bytes"], _keypoint_check(arr, bounds[which[start:start + rec["rows"]]],
                                                            rec["file"], start), None))
        start += rec["rows"]
    return KeyframeFeatures(kind, slots, segments, intrinsics, cameras)


def _keypoint_check(chunk: np.ndarray, bounds: np.ndarray, name: str, start: int) -> Any:
    """The content check that every row of a feature chunk holds keypoints of its camera's image."""

    def check() -> None:
        try:
            check_feature_rows(chunk, bounds, lambda i: f"{name} row {i} (map row {start + i})")
        except MapError as exc:
            raise MapFormatError(f"{exc}; restore the map directory from a backup or rebuild the map") from None

    return check


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


def _open_chunk(f: io.BufferedReader, rec: dict[str, Any], width: int | None, dtype: np.dtype, *,
                mmap: bool) -> tuple[np.ndarray, int]:
    """Map (or read) one open chunk; returns the (rows, width) array and the file offset of its data.

    Checks size, ``.npy`` header, dtype and shape against the manifest (``width`` None: any width), not the content
    (:mod:`~dinomix_ros.maps.integrity` does). The memory map is of the file already opened and checked (np.load
    would reopen it by name, maybe another file by then), read-only, and advised for random access: a search reads
    a few scattered rows, and read-ahead would fetch 16 times what it asks for from a cold disk.
    """
    name = rec["file"]
    size = os.fstat(f.fileno()).st_size
    if size != rec["bytes"]:
        raise corrupted(name, f"{size} bytes, manifest says {rec['bytes']}")
    f.seek(0)
    try:
        shape, fortran, found = _npy_header(f)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError) as exc:  # numpy parses it with ast
        raise corrupted(name, f"not a valid .npy file: {str(exc)[:200]}") from None
    expected = (rec["rows"], width if width is not None else (shape[1] if len(shape) == 2 else -1))
    if found != dtype or fortran or shape != expected:
        raise MapFormatError(
            f"{name} holds a {'Fortran-order ' if fortran else ''}{found} array of shape {shape}, expected "
            f"{dtype} ({rec['rows']}, {width if width is not None else 'N'}) as the manifest says; the files are "
            "inconsistent (mixed maps?)"
        )
    offset = f.tell()
    if offset + expected[0] * expected[1] * dtype.itemsize != size:
        raise corrupted(name, f"{size} bytes cannot hold a {expected} {dtype} array")
    if not mmap:
        arr = np.empty(expected, dtype=dtype)
        if f.readinto(memoryview(arr).cast("B")) != arr.nbytes:
            raise corrupted(name, "short read")
    elif size == 0 or expected[0] * expected[1] == 0:
        arr = np.empty(expected, dtype=dtype)
    else:
        arr = np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=expected)
        mapped = getattr(arr, "_mmap", None)  # numpy's mmap object of the array (no public accessor)
        if mapped is not None and hasattr(mapped, "madvise") and hasattr(mmap_module, "MADV_RANDOM"):
            mapped.madvise(mmap_module.MADV_RANDOM)
    arr.flags.writeable = False
    return arr, offset


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
