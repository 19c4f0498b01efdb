"""What a valid keyframe map holds: the checks shared by the in-memory table and its storage.

:meth:`KeyframeMap.add() <dinomix_ros.maps.keyframes.KeyframeMap.add>` coerces its arguments with the ``as_*``
functions and checks the result with :func:`check_columns`; loading a map checks the parsed keyframe CSV with the same
:func:`check_columns`, so a row that ``add()`` refuses is refused on load too. The fingerprint and metadata checks
guard both ``empty()``/``save()`` and the manifest. Each check takes the error class to raise where the same rule
means a bad argument in one place (:class:`MapError`) and a damaged file in another (:class:`MapFormatError`).

Internal to :mod:`dinomix_ros.maps`: users go through :class:`~dinomix_ros.maps.keyframes.KeyframeMap`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import numpy as np

from dinomix_ros.maps.errors import MapError, MapMismatchError

__all__ = [
    "BAD_CHAR_RE",
    "MAX_JSON_DEPTH",
    "MAX_TEXT_CHARS",
    "NORM_TOLERANCE",
    "QUAT_TOLERANCE",
    "STORAGE_DTYPES",
    "as_float_rows",
    "as_index_blob",
    "as_int_column",
    "as_str_column",
    "as_zone_column",
    "check_columns",
    "check_descriptors",
    "check_fingerprint",
    "check_index_kind",
    "check_json",
    "check_metadata",
    "check_same_model",
    "check_unit_rows",
    "dtype_name",
    "empty_columns",
    "json_nesting",
    "short_repr",
]

#: Descriptor storage dtypes by name: always little-endian, whatever the machine (the .npy files say so too).
STORAGE_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}

#: Allowed deviation of a descriptor's L2 norm from 1. Generous enough for descriptors normalised in float16
#: (per-component relative error 2**-11), tight enough to catch unnormalised vectors (norms of 10s, or 0).
NORM_TOLERANCE = 1e-2
#: Allowed deviation of a known orientation quaternion's norm from 1.
QUAT_TOLERANCE = 1e-3

#: Deepest JSON nesting (objects and arrays) in a manifest and its metadata: far above what maps use (about 6), far
#: below what could exhaust the parser's recursion.
MAX_JSON_DEPTH = 32
#: Longest text cell (camera, frame id, UTM band, source) of a keyframe, in characters: a source is a path or topic
#: (PATH_MAX is 4096 bytes); well below the csv module's default field limit, so a longer cell is a clear refusal.
MAX_TEXT_CHARS = 8192

#: Control characters and lone surrogates: refused in every string column (they would break the CSV or UTF-8).
BAD_CHAR_RE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")

FINGERPRINT_KEYS = {"id": str, "architecture": str, "weights_sha256": str, "preprocessing": str, "descriptor_dim": int}
UTM_BANDS = "CDEFGHJKLMNPQRSTUVWX"


def dtype_name(storage_dtype: Any) -> str:
    """Canonical name ("float16" / "float32") of a supported storage dtype given by name or dtype."""
    try:
        name = np.dtype(storage_dtype).name
    except TypeError:
        name = None
    if name not in STORAGE_DTYPES:
        raise MapError(f"storage_dtype {storage_dtype!r} is not supported; use one of {sorted(STORAGE_DTYPES)}")
    return name


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: messages stay one short line whatever a hostile file holds."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def json_depth(value: Any) -> int:
    """Nesting depth of dicts and lists in ``value`` (0 for a scalar), without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return depth


_JSON_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def json_nesting(raw: bytes) -> int:
    """Deepest ``[``/``{`` nesting in the JSON text ``raw`` (strings skipped), measured before parsing it."""
    brackets = np.frombuffer(_JSON_STRING_RE.sub(b"", raw), dtype=np.uint8)
    step = (brackets == ord("[")).astype(np.int32) + (brackets == ord("{"))
    step -= (brackets == ord("]")).astype(np.int32) + (brackets == ord("}"))
    return int(np.cumsum(step).max(initial=0))


def check_json(value: Any, what: str, exc_type: type[MapError], max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise ``exc_type`` unless ``value`` is plain JSON that a manifest can hold; ``what`` names it in the message.

    Plain: dicts with str keys, lists, str (valid UTF-8: no lone surrogates), int, finite float, bool, None, nested at
    most ``max_depth`` deep.
    """
    depth = json_depth(value)
    if depth > max_depth:
        raise exc_type(f"{what} nests {depth} levels deep, at most {max_depth} are allowed")
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError (lone surrogate) is a ValueError
        raise exc_type(f"{what} is not plain JSON ({short_repr(str(exc))}); use dicts, lists, str, int, finite "
                       "float, bool, None") from None


def check_metadata(metadata: Any, what: str, exc_type: type[MapError]) -> None:
    """Raise ``exc_type`` unless ``metadata`` is a plain-JSON dict whose known keys have their documented types.

    Free-form otherwise; ``calibration`` (written by ``dinomix map eval --calibrate``, read by the node and the CLI)
    must be an object when present.
    """
    if not isinstance(metadata, dict):
        raise exc_type(f"{what} must be a dict, got {type(metadata).__name__}")
    check_json(metadata, what, exc_type, MAX_JSON_DEPTH - 1)  # the manifest holds it one level down
    calibration = metadata.get("calibration")
    if calibration is not None and not isinstance(calibration, dict):
        raise exc_type(f"{what}['calibration'] is {short_repr(calibration)}, expected an object (as written by "
                       "`dinomix map eval --calibrate`) or no such key")


def check_fingerprint(fp: Any, what: str, exc_type: type[MapError]) -> None:
    """Raise ``exc_type`` unless ``fp`` is a model fingerprint dict with every key of :data:`FINGERPRINT_KEYS`."""
    if not isinstance(fp, dict):
        raise exc_type(f"{what} must be a dict, got {type(fp).__name__}")
    for key, kind in FINGERPRINT_KEYS.items():
        value = fp.get(key)
        ok = (type(value) is int and value > 0) if kind is int else (isinstance(value, str) and value != "")
        if not ok:
            raise exc_type(f"{what}[{key!r}] is {short_repr(value)}, expected a "
                           f"{'positive int' if kind is int else 'string'}; "
                           f"a fingerprint needs {sorted(FINGERPRINT_KEYS)} (from the model that made the "
                           "descriptors)")
    check_json(fp, what, exc_type)


def check_same_model(map_fp: dict[str, Any], other: Any, where: str) -> None:
    """Raise :class:`MapMismatchError` unless ``other`` is the fingerprint of the model that built ``where``."""
    if not isinstance(other, dict) or not isinstance(other.get("id"), str):
        raise MapError(f"expected a fingerprint dict with an 'id' string, got {other!r}")
    if other["id"] != map_fp.get("id"):
        raise MapMismatchError(
            f"{where} was built with model {map_fp.get('id')} ({map_fp.get('architecture')}), but the model in use is "
            f"{other['id']} ({other.get('architecture')}): descriptors of different models are not comparable. Use "
            "the model that built the map, or rebuild the map with this model"
        )


def check_descriptors(descriptors: Any, dim: int) -> np.ndarray:
    """Return ``descriptors`` as (N, dim) float rows, refusing non-finite and non-unit-norm rows."""
    arr = np.asarray(descriptors)
    if arr.dtype.kind != "f":
        raise MapError(f"descriptors must be a float array, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise MapError(f"descriptors have shape {np.shape(descriptors)}, expected (N, {dim}) for this map's model")
    check_unit_rows(arr, lambda i: f"descriptor row {i}", MapError,
                    hint="; L2-normalise descriptors before adding them (x / np.linalg.norm(x, axis=1, keepdims=True)),"
                         " and drop rows the encoder failed on (NaN)")
    return arr


def check_unit_rows(arr: np.ndarray, where: Callable[[int], str], exc_type: type[MapError], *, hint: str = "",
                    block_rows: int = 16384) -> None:
    """Raise ``exc_type`` naming the first row of the 2-D float ``arr`` that is non-finite or not of unit L2 norm.

    Works through ``arr`` in blocks of ``block_rows`` (a memory-mapped map is not copied whole); ``where(i)`` names
    row i in the message and ``hint`` ends it.
    """
    for start in range(0, arr.shape[0], block_rows):
        x = np.asarray(arr[start:start + block_rows])
        x = x.astype(np.float32) if x.dtype.itemsize < 4 else x  # fp16 squares of 4096 terms may lose precision
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            raise exc_type(f"{where(start + int(np.flatnonzero(~finite)[0]))} contains NaN or inf{hint}")
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        bad = np.abs(norms - 1.0) > NORM_TOLERANCE
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise exc_type(f"{where(start + i)} has L2 norm {norms[i]:.4g}, expected 1 +- {NORM_TOLERANCE} "
                           f"(descriptors are unit vectors){hint}")


def as_int_column(value: Any, n: int, name: str) -> np.ndarray:
    """An add() argument as an (n,) int64 column; floats are refused (stamps are integer nanoseconds)."""
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


def as_zone_column(value: Any, n: int) -> np.ndarray:
    """The ``utm_zones`` add() argument (None, one zone, or one per row) as an (n,) int16 column."""
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


def as_str_column(value: Any, n: int, name: str) -> np.ndarray:
    """An add() argument (one string, or one per row) as an (n,) object column of str."""
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


def as_float_rows(value: Any, n: int, width: int, name: str) -> np.ndarray:
    """An add() argument as (n, width) float64 rows; None means all unknown (NaN)."""
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


def check_columns(c: dict[str, np.ndarray], where: Callable[[int], str], exc_type: type[MapError], *,
                  categories: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    """Check keyframe invariants shared by add() and load(); ``where(i)`` names row i in messages.

    ``categories``: for text columns stored as indices into a few names (the binary table), ``{column: (names,
    (N,) indices)}`` with ``c[column] == names[indices]``: the names are checked once each, not per row (a million
    keyframes in milliseconds instead of a second).
    """
    categories = categories or {}

    def first(mask: np.ndarray) -> int:
        return int(np.flatnonzero(mask)[0])

    if (c["stamps_ns"] < 0).any():
        i = first(c["stamps_ns"] < 0)
        raise exc_type(f"{where(i)}: stamps_ns {c['stamps_ns'][i]} is negative")
    for col in ("cameras", "frame_ids", "utm_bands", "sources"):
        if col in categories:  # each name once; a bad name is reported at its first row
            names, index = categories[col]
            _check_text(names, col, lambda i: where(first(index == i)), exc_type)
        else:
            _check_text(c[col], col, where, exc_type)
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
    if "utm_bands" in categories:
        names, index = categories["utm_bands"]
        band_known = np.array([b != "" for b in names], dtype=bool)[index]
        band_valid = np.array([len(b) == 1 and b in UTM_BANDS for b in names], dtype=bool)[index]
    else:
        band_known = np.array([b != "" for b in bands], dtype=bool)
        band_valid = np.array([len(b) == 1 and b in UTM_BANDS for b in bands], dtype=bool)
    bad = (zones == 0) & (band_known | utm_known)
    bad |= (zones != 0) & (~band_valid | ~utm_known)
    if bad.any():
        i = first(bad)
        raise exc_type(f"{where(i)}: UTM zone {zones[i]}, band {bands[i]!r}, easting/northing {utm[i].tolist()} are "
                       f"inconsistent; give zone 1..60 with a band letter from {UTM_BANDS} and finite "
                       "easting/northing, or zone 0, band '' and NaN for unknown")


def _check_text(values: np.ndarray, col: str, where: Callable[[int], str], exc_type: type[MapError]) -> None:
    """The rules of a text column: bounded length, printable UTF-8, and non-empty cameras and frame ids."""
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    if (lengths > MAX_TEXT_CHARS).any():
        i = int(np.flatnonzero(lengths > MAX_TEXT_CHARS)[0])
        raise exc_type(f"{where(i)}: {col} value is {lengths[i]} characters long, at most {MAX_TEXT_CHARS} are "
                       "allowed")
    if BAD_CHAR_RE.search("".join(values)):  # one scan; locate the row only on failure
        i = next(i for i, s in enumerate(values) if BAD_CHAR_RE.search(s))
        raise exc_type(f"{where(i)}: {col} value {short_repr(values[i])} contains a control character or lone "
                       "surrogate; use printable UTF-8 text")
    if col in ("cameras", "frame_ids") and (values == "").any():
        raise exc_type(f"{where(int(np.flatnonzero(values == '')[0]))}: {col} is empty; every keyframe needs a "
                       "camera name and a frame id")


def empty_columns() -> dict[str, np.ndarray]:
    """The columns of a table with no rows, with the dtypes every column keeps."""
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


def as_index_blob(index_blob: Any) -> np.ndarray:
    """A serialized search index (bytes or 1-D uint8 array) as a read-only uint8 array the caller cannot alias."""
    if isinstance(index_blob, (bytes, bytearray, memoryview)):
        blob = np.frombuffer(bytes(index_blob), dtype=np.uint8)
    elif isinstance(index_blob, np.ndarray) and index_blob.dtype == np.uint8 and index_blob.ndim == 1:
        blob = index_blob.copy()
    else:
        found = f"{index_blob.dtype} array of shape {index_blob.shape}" if isinstance(index_blob, np.ndarray) \
            else type(index_blob).__name__
        raise MapError(f"index_blob must be bytes or a 1-D uint8 array (faiss.serialize_index output), got {found}")
    blob.flags.writeable = False
    return blob


def check_index_kind(index_kind: Any) -> None:
    """Raise :class:`MapError` unless ``index_kind`` is a short printable name such as "faiss_flat_ip"."""
    if not isinstance(index_kind, str) or not index_kind or len(index_kind) > 128 or BAD_CHAR_RE.search(index_kind):
        raise MapError(f"index_kind must be a short printable name such as 'faiss_flat_ip', got {index_kind!r}")
