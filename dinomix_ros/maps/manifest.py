"""The manifest of a map directory: the one file that says what the map is and which files make it up.

``manifest.json`` names every other file of the map with its row count, byte size and sha256, and replacing it is the
commit point of every save (see :mod:`dinomix_ros.maps.storage` and ``maps/README.md`` for the layout). This module
owns its format: the format name and version, the manifest's keys (:func:`new_manifest` writes them,
:func:`read_manifest` reads and validates them), and the names of the generation-numbered files it may reference.

Reading a manifest touches no other file, so ``dinomix map info`` can describe a large map at once.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dinomix_ros import __version__
from dinomix_ros.maps.errors import MapFormatError, MapNotFoundError
from dinomix_ros.maps.validation import STORAGE_DTYPES, check_fingerprint

if TYPE_CHECKING:
    from dinomix_ros.maps.keyframes import KeyframeMap

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "corrupted",
    "generation_file",
    "generation_of",
    "listed_files",
    "manifest_bytes",
    "new_manifest",
    "read_manifest",
]

FORMAT = "dinomix_ros.map"
FORMAT_VERSION = 2  # 2: local features per keyframe and intrinsics per camera (files.features, local_features)
MANIFEST = "manifest.json"

# The only names a manifest may reference: plain file names (no path), each carrying the generation that wrote it.
_GEN_FILE_RE = re.compile(
    r"^(?:keyframes\.g(\d{6,})\.csv|descriptors\.g(\d{6,})\.npy|index\.g(\d{6,})\.(?:faiss|bin)"
    r"|features\.g(\d{6,})\.npy)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def generation_file(stem: str, generation: int, ext: str) -> str:
    """Name of the ``stem`` file ("keyframes", "descriptors", "index") written by ``generation``."""
    return f"{stem}.g{generation:06d}.{ext}"


def generation_of(name: str) -> int | None:
    """The generation in a map file's name, or None when ``name`` is not a generation-numbered map file."""
    match = _GEN_FILE_RE.match(name)
    return None if match is None else int(next(g for g in match.groups() if g is not None))


def new_manifest(kmap: KeyframeMap, generation: int, updated: str, keyframes: dict[str, Any],
                 descriptors: list[dict[str, Any]], index: dict[str, Any] | None,
                 features: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest that commits ``kmap`` as ``generation``, given the records of the files that hold it.

    Args:
        kmap: The map being saved.
        generation: The generation this save commits.
        updated: ISO 8601 UTC time of the save.
        keyframes: ``{"file", "rows", "bytes", "sha256"}`` of the keyframe CSV.
        descriptors: Records of the descriptor chunks, in row order.
        index: ``{"file", "kind", "rows", "bytes", "sha256"}`` of the search index, or None.
        features: Records of the local-feature chunks in row order, None for a map without local features.

    Returns:
        The manifest as a JSON-able dict (see ``maps/README.md`` for its keys).
    """
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "generation": generation,
        "count": len(kmap),
        "next_id": kmap.next_id,
        "descriptor_dim": kmap.descriptor_dim,
        "descriptor_dtype": kmap.storage_dtype,
        "fingerprint": kmap.fingerprint,
        "frames": kmap.frames,
        "cameras": kmap.camera_names,
        "metadata": kmap.metadata,
        "created": kmap.created,
        "updated": updated,
        "writer": f"dinomix_ros {__version__}",
        "files": {"keyframes": keyframes, "descriptors": descriptors, "index": index, "features": features},
        "local_features": None if kmap.local_features is None else kmap.local_features.manifest_entry(),
    }


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """``manifest.json``'s content: indented UTF-8 JSON (non-ASCII kept readable), one trailing newline."""
    return (json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def listed_files(manifest: dict[str, Any]) -> set[str]:
    """Names of the files a (validated) manifest references."""
    files = manifest["files"]
    names = {files["keyframes"]["file"]}
    names.update(rec["file"] for rec in files["descriptors"])
    if files["index"] is not None:
        names.add(files["index"]["file"])
    names.update(rec["file"] for rec in files.get("features") or [])
    return names


def corrupted(name: str, what: str) -> MapFormatError:
    """The error for a map file that does not match its manifest record (``what`` says how)."""
    return MapFormatError(f"{name} is corrupted or truncated ({what}); restore the map directory from a backup or "
                          "rebuild the map")


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
    """Raise :class:`MapFormatError` on the first key of ``m`` that is missing, mistyped or inconsistent."""

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
    if need("descriptor_dtype", str) not in STORAGE_DTYPES:
        raise fail(f"descriptor_dtype is {m['descriptor_dtype']!r}, expected one of {sorted(STORAGE_DTYPES)}")
    check_fingerprint(need("fingerprint", dict), f"{mpath}: fingerprint", MapFormatError)
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
        if not isinstance(name, str) or generation_of(name) is None:
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
    _validate_features(m, fail, record, count)
    if len(set(names)) != len(names):
        raise fail(f"a file is listed twice in files: {names}")


def _validate_features(m: dict[str, Any], fail: Any, record: Any, count: int) -> None:
    """The local-feature part of a manifest (format 2): ``local_features`` and ``files.features`` go together."""
    from dinomix_ros.imaging.camera import CameraModel, CameraModelError
    from dinomix_ros.imaging.features import DESCRIPTOR_BYTES

    entry, chunks = m.get("local_features"), m["files"].get("features")
    if entry is None and chunks is None:
        return
    if m["version"] < 2:
        raise fail("local features in a format 1 manifest: the files are inconsistent")
    if not isinstance(entry, dict) or not isinstance(chunks, list):
        raise fail("local_features and files.features must both be present (an object and a list) or both null")
    if entry.get("type") not in DESCRIPTOR_BYTES:
        raise fail(f"local_features.type is {entry.get('type')!r}, expected one of {sorted(DESCRIPTOR_BYTES)}")
    if type(entry.get("slots")) is not int or entry["slots"] < 1:
        raise fail(f"local_features.slots is {entry.get('slots')!r}, expected a positive integer")
    if entry.get("keypoint_scale") != 4:
        raise fail(f"local_features.keypoint_scale is {entry.get('keypoint_scale')!r}, expected 4")
    intrinsics = entry.get("intrinsics")
    if not isinstance(intrinsics, dict):
        raise fail(f"local_features.intrinsics is {intrinsics!r}, expected an object (camera -> intrinsics)")
    for name, data in intrinsics.items():
        try:
            CameraModel.from_dict(data if isinstance(data, dict) else {})
        except CameraModelError as exc:
            raise fail(f"local_features.intrinsics[{name!r}]: {exc}") from None
    for i, rec in enumerate(chunks):
        record(rec, f"features[{i}]")
        if rec["rows"] < 1:
            raise fail(f"files.features[{i}].rows is {rec['rows']}, expected >= 1")
    total = sum(rec["rows"] for rec in chunks)
    if total != count:
        raise fail(f"local-feature chunks hold {total} rows but count is {count}: the manifest is inconsistent")
