"""The manifest of a map directory: the one file that says what the map is and which files make it up.

``manifest.json`` names every other file of the map with its row count, byte size and sha256, and replacing it is the
commit point of every save (see :mod:`dinomix_ros.maps.storage` and ``maps/README.md`` for the layout). This module
owns its format: the format name and version, the manifest's keys (:func:`new_manifest` writes them,
:func:`read_manifest` reads and validates them), and the names of the generation-numbered files it may reference.

It also owns how any file of a map directory is opened (:func:`open_map_file`): a map directory is untrusted input,
so only regular files are opened (never a FIFO, device or socket, which could block or have side effects on open)
and no symbolic link is followed. Every symlink inside a map directory is refused, not only those that resolve
outside it: saves never create one, a link's target can change between a check and the open (only ``O_NOFOLLOW`` is
race-free), and a link resolving inside would give one file two names, which breaks the rule that a save deletes
only files no manifest references. The map directory itself may be a symlink (the user names it).

The manifest seals itself: ``manifest_sha256`` is the sha256 of the canonical JSON of every other key
(:func:`manifest_seal`), so an edit of any field that load trusts (metadata, fingerprint, counts, frames, file
records) is detected. Manifests written before the seal existed have no such key and still load (format version 1 is
unchanged; readers that predate the seal ignore the extra key): their fields are validated as before, load logs that
they are unsealed, and the next save seals them. A seal that is present but wrong or malformed is refused. The seal
detects edits and damage, not forgery: whoever can write the directory can also recompute it.

Reading a manifest touches no other file, so ``dinomix map info`` can describe a large map at once. Its size and
JSON nesting are bounded (:data:`MAX_MANIFEST_BYTES`, :data:`~dinomix_ros.maps.validation.MAX_JSON_DEPTH`), and
saves refuse to write a manifest that load would refuse.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dinomix_ros import __version__
from dinomix_ros.maps.errors import MapError, MapFormatError, MapNotFoundError
from dinomix_ros.maps.validation import (
    MAX_JSON_DEPTH, STORAGE_DTYPES, check_fingerprint, check_json, check_metadata, json_nesting,
    short_repr as _short,
)

if TYPE_CHECKING:
    from dinomix_ros.maps.keyframes import KeyframeMap

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "MAX_MANIFEST_BYTES",
    "SEAL_KEY",
    "claimed_generation",
    "corrupted",
    "generation_file",
    "generation_of",
    "listed_files",
    "manifest_bytes",
    "manifest_seal",
    "new_manifest",
    "open_map_file",
    "read_manifest",
]

logger = logging.getLogger(__name__)

FORMAT = "dinomix_ros.map"
FORMAT_VERSION = 2  # 2: local features per keyframe and intrinsics per camera (files.features, local_features)
MANIFEST = "manifest.json"
#: The manifest's own checksum key (see the module docstring).
SEAL_KEY = "manifest_sha256"
#: Largest manifest.json read or written. A chunk record takes ~170 bytes, so this is ~100k chunks (compact the map
#: long before: every chunk is an open file while loading); metadata is meant for notes and calibration, not data.
MAX_MANIFEST_BYTES = 16 << 20
_INT64_MAX = 2**63 - 1
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

# The only names a manifest may reference: plain file names (no path), each carrying the generation that wrote it.
_GEN_FILE_RE = re.compile(
    r"^(?:keyframes\.g(\d{6,})\.csv|descriptors\.g(\d{6,})\.npy|index\.g(\d{6,})\.(?:faiss|bin)"
    r"|features\.g(\d{6,})\.npy|codes\.g(\d{6,})\.npy|table\.g(\d{6,})\.npy|sources\.g(\d{6,})\.txt)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def generation_file(stem: str, generation: int, ext: str) -> str:
    """Name of the ``stem`` file ("keyframes", "descriptors", "features", "index", "codes") of ``generation``."""
    return f"{stem}.g{generation:06d}.{ext}"


def generation_of(name: str) -> int | None:
    """The generation in a map file's name, or None when ``name`` is not a generation-numbered map file."""
    match = _GEN_FILE_RE.match(name)
    return None if match is None else int(next(g for g in match.groups() if g is not None))


def new_manifest(kmap: KeyframeMap, generation: int, updated: str, keyframes: dict[str, Any],
                 descriptors: list[dict[str, Any]], index: dict[str, Any] | None,
                 features: list[dict[str, Any]] | None = None,
                 table: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest that commits ``kmap`` as ``generation``, given the records of the files that hold it.

    Args:
        kmap: The map being saved.
        generation: The generation this save commits.
        updated: ISO 8601 UTC time of the save.
        keyframes: ``{"file", "rows", "bytes", "sha256"}`` of the keyframe CSV.
        descriptors: Records of the descriptor chunks, in row order.
        index: ``{"file", "kind", "rows", "bytes", "sha256"}`` of the search index, or None.
        features: Records of the local-feature chunks in row order, None for a map without local features.
        table: ``{"table": record, "sources": record}`` of the binary keyframe table (:mod:`.keyframe_table`).

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
        "files": {"keyframes": keyframes, "descriptors": descriptors, "index": index, "features": features,
                  **(table or {})},
        "local_features": None if kmap.local_features is None else kmap.local_features.manifest_entry(),
    }


def manifest_seal(manifest: dict[str, Any]) -> str:
    """The sha256 (hex) of the canonical JSON of every key of ``manifest`` but :data:`SEAL_KEY`.

    Canonical: keys sorted, no whitespace, UTF-8, floats as Python writes them (they read back exactly), so the seal
    of a parsed manifest equals the seal of the dict that was written.
    """
    body = {k: v for k, v in manifest.items() if k != SEAL_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """``manifest.json``'s content, sealed: indented UTF-8 JSON (non-ASCII kept readable), one trailing newline.

    Any :data:`SEAL_KEY` in ``manifest`` is replaced by the seal of the other keys.

    Raises:
        MapError: the manifest would be larger than :data:`MAX_MANIFEST_BYTES` (metadata too large, or too many
            chunks: save with ``compact=True``) or nested deeper than load accepts.
    """
    check_json(manifest, "the manifest", MapError)
    sealed = {**{k: v for k, v in manifest.items() if k != SEAL_KEY}, SEAL_KEY: manifest_seal(manifest)}
    data = (json.dumps(sealed, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    if len(data) > MAX_MANIFEST_BYTES:
        raise MapError(f"the manifest would be {len(data)} bytes, more than the {MAX_MANIFEST_BYTES} that load accepts "
                       f"({len(manifest['files']['descriptors'])} chunks, metadata of "
                       f"{len(json.dumps(manifest['metadata']))} bytes): shrink the metadata, or save with "
                       "compact=True")
    return data


def listed_files(manifest: dict[str, Any]) -> set[str]:
    """Names of the files a (validated) manifest references."""
    files = manifest["files"]
    names = {files["keyframes"]["file"]}
    names.update(files[key]["file"] for key in ("table", "sources") if files.get(key) is not None)
    names.update(rec["file"] for rec in files["descriptors"])
    if files["index"] is not None:
        names.add(files["index"]["file"])
        names.update(rec["file"] for rec in files["index"].get("codes") or [])
    names.update(rec["file"] for rec in files.get("features") or [])
    return names


def corrupted(name: str, what: str) -> MapFormatError:
    """The error for a map file that does not match its manifest record (``what`` says how)."""
    return MapFormatError(f"{name} is corrupted or truncated ({what}); restore the map directory from a backup or "
                          "rebuild the map")


def open_map_file(directory: Path, name: str) -> io.BufferedReader:
    """Open the file ``name`` of the map directory ``directory`` for reading: a regular file, never through a link.

    The entry is checked with ``lstat`` before it is opened (so a device or FIFO is never opened) and opened with
    ``O_NOFOLLOW | O_NONBLOCK`` (a link swapped in meanwhile fails, a FIFO swapped in cannot block), then checked
    again on the open descriptor. Every reader of a map file goes through here.

    Raises:
        FileNotFoundError: no such entry (callers decide whether that means damage or a concurrent save).
        MapFormatError: the entry is a symbolic link, directory, FIFO, device or socket.
        OSError: the file exists but cannot be opened (permissions).
    """
    path = directory / name
    _require_regular(os.lstat(path).st_mode, directory, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # became a symlink after the lstat
            _require_regular(stat.S_IFLNK, directory, name)
        raise
    try:
        _require_regular(os.fstat(fd).st_mode, directory, name)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _require_regular(mode: int, directory: Path, name: str) -> None:
    """Raise :class:`MapFormatError` unless ``mode`` is a regular file's."""
    if stat.S_ISREG(mode):
        return
    kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode) else
            "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    raise MapFormatError(f"{directory / name} is {kind}: a map directory holds only regular files (links, FIFOs, "
                         "devices and sockets are refused, never opened or followed). Replace it with the real file "
                         "from a backup, or rebuild the map")


def _manifest_json(directory: Path) -> Any:
    """Parse ``directory``'s manifest.json (bounded size and nesting, no NaN, no duplicate keys); not validated.

    Raises:
        FileNotFoundError: no manifest.json.
        MapFormatError: not a regular file, too large, too deeply nested, or not strict UTF-8 JSON.
    """
    mpath = directory / MANIFEST
    with open_map_file(directory, MANIFEST) as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise MapFormatError(f"{mpath} is larger than {MAX_MANIFEST_BYTES} bytes: not a manifest this dinomix_ros "
                             "wrote (corrupted?); restore it from a backup")
    depth = json_nesting(raw)
    if depth > MAX_JSON_DEPTH:
        raise MapFormatError(f"{mpath} nests {depth} levels deep, at most {MAX_JSON_DEPTH} are allowed: not a "
                             "manifest this dinomix_ros wrote (corrupted?); restore it from a backup")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limits, our hooks
        raise MapFormatError(f"{mpath} is not valid UTF-8 JSON ({exc}): corrupted; restore it from a backup") from None


def claimed_generation(directory: Path) -> int:
    """The generation an unreadable manifest.json in ``directory`` still claims, or 0 (a save replacing it with
    ``overwrite=True`` stays above it)."""
    try:
        gen = _manifest_json(directory).get("generation", 0)
    except (OSError, MapError, AttributeError):
        return 0
    return gen if type(gen) is int and 0 <= gen <= _INT64_MAX else 0


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"key {_short(dup)} appears twice in one object")
    return out


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a map's manifest.json without touching its other files (for ``dinomix map info``).

    Args:
        path: Map directory.

    Returns:
        The manifest as a dict (see ``maps/README.md`` for its keys).

    Raises:
        MapNotFoundError: No directory, not a directory, or no manifest.json.
        MapFormatError: Not a regular file, too large or deeply nested, not JSON, not a dinomix_ros map, written by a
            newer dinomix_ros, edited after it was written (seal mismatch), or malformed.
    """
    directory = Path(path)
    if not directory.exists():
        raise MapNotFoundError(f"no map at {directory}: the directory does not exist")
    if not directory.is_dir():
        parent_is_map = (directory.parent / MANIFEST).is_file()
        raise MapNotFoundError(f"no map at {directory}: it is a file, but a map is a directory holding manifest.json"
                               + (f" (pass the map directory {directory.parent})" if parent_is_map else ""))
    mpath = directory / MANIFEST
    try:
        m = _manifest_json(directory)
    except FileNotFoundError:
        raise MapNotFoundError(f"no map at {directory}: it has no {MANIFEST} (not a dinomix map, or its first save "
                               "was interrupted before committing)") from None
    _check_format(m, mpath)
    _check_seal(m, mpath)
    _validate_manifest(m, mpath)
    return m


def _check_seal(m: dict[str, Any], mpath: Path) -> None:
    """Refuse a manifest whose seal does not match its content; log one that has none (see the module docstring)."""
    check_json(m, str(mpath), MapFormatError)  # lone surrogates: the seal could not even be computed
    seal = m.get(SEAL_KEY)
    if seal is None:
        logger.warning("%s has no %s (written before manifests were sealed): its fields are checked, but an edit "
                       "cannot be detected; the next save seals it", mpath, SEAL_KEY)
        return
    if not isinstance(seal, str) or not _SHA256_RE.match(seal):
        raise MapFormatError(f"{mpath}: {SEAL_KEY} is {_short(seal)}, expected 64 lowercase hex digits; the "
                             "manifest was edited or damaged: restore the map directory from a backup or rebuild "
                             "the map")
    actual = manifest_seal(m)
    if actual != seal:
        raise MapFormatError(f"{mpath} was changed after it was written (its content hashes to {actual[:12]}..., its "
                             f"{SEAL_KEY} says {seal[:12]}...): edited by hand or damaged. Restore the map directory "
                             "from a backup or rebuild the map")


def _check_format(m: Any, mpath: Path) -> None:
    """Refuse what is not a manifest of a format version this dinomix_ros reads (checked before the seal: a newer
    version may seal differently, and its message says to upgrade)."""

    def fail(msg: str) -> MapFormatError:
        return MapFormatError(f"{mpath}: {msg}")

    if not isinstance(m, dict):
        raise fail(f"top level is a {type(m).__name__}, expected a JSON object")
    if m.get("format") != FORMAT:
        raise fail(f"format is {_short(m.get('format'))}, expected {FORMAT!r}: this is not a dinomix_ros map")
    version = m.get("version")
    if type(version) is not int or version < 1:
        raise fail(f"version is {_short(version)}, expected a positive integer")
    if version > FORMAT_VERSION:
        raise fail(f"written by a newer dinomix_ros (map format version {version}; dinomix_ros {__version__} reads up "
                   f"to version {FORMAT_VERSION}). Upgrade dinomix_ros on this machine to load it")


def _validate_manifest(m: dict[str, Any], mpath: Path) -> None:
    """Raise :class:`MapFormatError` on the first key of ``m`` that is missing, mistyped or inconsistent."""

    def fail(msg: str) -> MapFormatError:
        return MapFormatError(f"{mpath}: {msg}")

    def need(key: str, kind: type, minimum: int | None = None) -> Any:
        value = m.get(key)
        if (type(value) is not int) if kind is int else not isinstance(value, kind):
            raise fail(f"{key!r} is {_short(value)}, expected {kind.__name__}")
        if minimum is not None and not minimum <= value <= _INT64_MAX:
            raise fail(f"{key!r} is {_short(value)}, expected {minimum}..{_INT64_MAX}")
        return value

    count = need("count", int, 0)
    need("generation", int, 1)
    need("next_id", int, 0)
    dim = need("descriptor_dim", int, 1)
    if need("descriptor_dtype", str) not in STORAGE_DTYPES:
        raise fail(f"descriptor_dtype is {_short(m['descriptor_dtype'])}, expected one of {sorted(STORAGE_DTYPES)}")
    check_fingerprint(need("fingerprint", dict), f"{mpath}: fingerprint", MapFormatError)
    if m["fingerprint"]["descriptor_dim"] != dim:
        raise fail(f"fingerprint descriptor_dim {m['fingerprint']['descriptor_dim']} != descriptor_dim {dim}")
    check_metadata(need("metadata", dict), f"{mpath}: metadata", MapFormatError)
    for key in ("created", "updated", "writer"):
        need(key, str)
    for key in ("frames", "cameras"):
        if not all(isinstance(s, str) for s in need(key, list)):
            raise fail(f"{key!r} must be a list of strings")
    files = need("files", dict)
    names: list[str] = []

    def record(rec: Any, what: str, extra: tuple[str, ...] = ()) -> None:
        if not isinstance(rec, dict):
            raise fail(f"files.{what} is {_short(rec)}, expected an object")
        name = rec.get("file")
        if not isinstance(name, str) or generation_of(name) is None:
            raise fail(f"files.{what}.file is {_short(name)}, expected a plain file name like "
                       "'descriptors.g000001.npy'")
        for key in ("rows", "bytes"):
            if type(rec.get(key)) is not int or not 0 <= rec[key] <= _INT64_MAX:
                raise fail(f"files.{what}.{key} is {_short(rec.get(key))}, expected an integer >= 0")
        if not isinstance(rec.get("sha256"), str) or not _SHA256_RE.match(rec["sha256"]):
            raise fail(f"files.{what}.sha256 is {_short(rec.get('sha256'))}, expected 64 lowercase hex digits")
        for key in extra:
            if not isinstance(rec.get(key), str) or not rec[key] or len(rec[key]) > 128:
                raise fail(f"files.{what}.{key} is {_short(rec.get(key))}, expected a short non-empty string")
        _validate_blocks(rec, what, fail)
        names.append(name)

    for key in ("keyframes", "table", "sources"):
        if key == "keyframes" or files.get(key) is not None:
            record(files.get(key), key)
            if files[key]["rows"] != count:
                raise fail(f"files.{key}.rows is {files[key]['rows']} but count is {count}")
    if (files.get("table") is None) != (files.get("sources") is None):
        raise fail("files.table and files.sources go together (the binary keyframe table): one is missing")
    chunks = files.get("descriptors")
    if not isinstance(chunks, list):
        raise fail(f"files.descriptors is {_short(chunks)}, expected a list of chunk records")
    _validate_chunks(chunks, "descriptors", "descriptor", fail, record, count)
    if files.get("index") is not None:
        record(files["index"], "index", extra=("kind",))
        codes = files["index"].get("codes")
        if codes is not None:
            if not isinstance(codes, list):
                raise fail(f"files.index.codes is {_short(codes)}, expected a list of chunk records")
            _validate_chunks(codes, "index.codes", "index code", fail, record, files["index"]["rows"])
    _validate_features(m, fail, record, count)
    if len(set(names)) != len(names):
        raise fail(f"a file is listed twice in files: {sorted(n for n in set(names) if names.count(n) > 1)}")


def _validate_features(m: dict[str, Any], fail: Any, record: Any, count: int) -> None:
    """The local-feature part of a manifest (format 2): ``local_features`` and ``files.features`` go together."""
    from dinomix_ros.imaging.camera import CameraModel, CameraModelError
    from dinomix_ros.imaging.features import DESCRIPTOR_BYTES, FeatureConfig
    from dinomix_ros.maps.local_features import CameraRecord
    from dinomix_ros.settings import spec_of

    entry, chunks = m.get("local_features"), m["files"].get("features")
    if entry is None and chunks is None:
        return
    if m["version"] < 2:
        raise fail("local features in a format 1 manifest: the files are inconsistent")
    if not isinstance(entry, dict) or not isinstance(chunks, list):
        raise fail("local_features and files.features must both be present (an object and a list) or both null")
    if entry.get("type") not in DESCRIPTOR_BYTES:
        raise fail(f"local_features.type is {entry.get('type')!r}, expected one of {sorted(DESCRIPTOR_BYTES)}")
    max_slots = int(spec_of(FeatureConfig, "max_features").max)
    if type(entry.get("slots")) is not int or not 1 <= entry["slots"] <= max_slots:
        raise fail(f"local_features.slots is {_short(entry.get('slots'))}, expected an integer in 1..{max_slots}")
    if entry.get("keypoint_scale") != 4:
        raise fail(f"local_features.keypoint_scale is {_short(entry.get('keypoint_scale'))}, expected 4")
    intrinsics = entry.get("intrinsics")
    if not isinstance(intrinsics, dict):
        raise fail(f"local_features.intrinsics is {_short(intrinsics)}, expected an object (camera -> intrinsics)")
    models = {}
    for name, data in intrinsics.items():
        try:
            models[name] = CameraModel.from_dict(data if isinstance(data, dict) else {})
        except CameraModelError as exc:
            raise fail(f"local_features.intrinsics[{_short(name)}]: {exc}") from None
    cameras = entry.get("cameras", {})  # absent in maps written before camera records (format 2 as well)
    if not isinstance(cameras, dict):
        raise fail(f"local_features.cameras is {_short(cameras)}, expected an object (camera -> record)")
    for name, data in cameras.items():
        try:
            rec = CameraRecord.from_dict(data)
        except MapError as exc:
            raise fail(f"local_features.cameras[{_short(name)}]: {exc}") from None
        model = models.get(name)
        if model is not None and (model.width, model.height) != rec.size:
            raise fail(f"local_features: camera {_short(name)}'s intrinsics are for {model.width}x{model.height} "
                       f"images, its record says {rec.width}x{rec.height}: the files are inconsistent")
    for i, rec in enumerate(chunks):
        if "slots" in rec and (type(rec["slots"]) is not int or not 1 <= rec["slots"] <= max_slots):
            raise fail(f"files.features[{i}].slots is {_short(rec['slots'])}, expected an integer in 1..{max_slots}")
    _validate_chunks(chunks, "features", "local-feature", fail, record, count)


def _validate_blocks(rec: dict[str, Any], what: str, fail: Any) -> None:
    """The optional block hashes of a file record: ``block_bytes`` and one ``block_sha256`` per block of the file."""
    if "block_bytes" not in rec and "block_sha256" not in rec:
        return
    size, blocks = rec.get("block_bytes"), rec.get("block_sha256")
    if type(size) is not int or not 4096 <= size <= _INT64_MAX:
        raise fail(f"files.{what}.block_bytes is {_short(size)}, expected an integer >= 4096")
    expected = -(-rec["bytes"] // size)
    if not isinstance(blocks, list) or len(blocks) != expected:
        raise fail(f"files.{what}.block_sha256 must list {expected} block hashes ({rec['bytes']} bytes in blocks of "
                   f"{size}), found {_short(blocks)}")
    if not all(isinstance(h, str) and _SHA256_RE.match(h) for h in blocks):
        raise fail(f"files.{what}.block_sha256 holds an entry that is not 64 lowercase hex digits")


def _validate_chunks(chunks: list, key: str, what: str, fail: Any, record: Any, count: int) -> None:
    """The chunk records of ``files[key]``: each valid with at least one row, together exactly ``count`` rows."""
    for i, rec in enumerate(chunks):
        record(rec, f"{key}[{i}]")
        if rec["rows"] < 1:
            raise fail(f"files.{key}[{i}].rows is {rec['rows']}, expected >= 1")
    total = sum(rec["rows"] for rec in chunks)
    if total != count:
        raise fail(f"{what} chunks hold {total} rows but count is {count}: the manifest is inconsistent")
