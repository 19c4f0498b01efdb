"""Keyframes as rows of the fleet collection, and back: the schema's fields and both conversions.

One row per keyframe, keyed ``robot/map/keyframe id`` (:func:`keyframe_key`): the robot's id, a short id of the map
it was recorded into (:func:`map_uid`, from the map's creation time and model) and its id there. So several robots
pushing at once never collide, and pushing a keyframe again replaces it (an upsert) instead of duplicating it.

Fields (:data:`SCALAR_FIELDS`, plus the model's vector field and marker field, named by
:func:`~dinomix_ros.maps.fleet.config.vector_field` and :func:`~dinomix_ros.maps.fleet.config.model_field`):

* the descriptor: FLOAT_VECTOR of the model's dimension (float32: the only vector type Milvus Lite has; a map's
  float16 descriptors convert to float32 exactly, so search scores equal a local float32 search);
* robot, map_uid, keyframe_id, stamp_ns, camera, frame_id, source; pose x, y, z, qx, qy, qz, qw; geotag lat, lon,
  alt, utm_zone, utm_band, utm_easting, utm_northing (DOUBLE fields are nullable: null = unknown, never NaN);
* features: the keyframe's local features as text, ``<type>:<base64 of its used records>`` (the records of
  :mod:`dinomix_ros.maps.local_features`, strongest first), "" for none. A VARCHAR holds at most 65,535 bytes:
  the strongest features that fit are kept (1,293 ORB or 366 SIFT features; 400 ORB take 20,268 bytes);
* camera_info: JSON ``{"intrinsics": CameraModel dict or null, "extrinsics": null}`` of the camera that recorded
  the keyframe; ``extrinsics`` is where a camera's mount (``T_base_cam``) goes once maps record one.

Pulled keyframes (:class:`PulledKeyframes`) enter a local map with source ``fleet:<key>`` (:data:`PULLED_PREFIX`):
they are never pushed back and never pulled twice; cameras of other robots are named ``<robot>:<camera>``, so their
intrinsics never mix with this robot's cameras of the same name.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinomix_ros.imaging.camera import CameraModel, CameraModelError
from dinomix_ros.imaging.features import DESCRIPTOR_BYTES, LocalFeatures
from dinomix_ros.maps.errors import MapError
from dinomix_ros.maps.geotags import geotag_columns
from dinomix_ros.maps.local_features import EMPTY, slot_dtype, unpack
from dinomix_ros.maps.validation import MAX_TEXT_CHARS

__all__ = ["FEATURES_BYTES", "KEY_BYTES", "PULLED_PREFIX", "SCALAR_FIELDS", "TEXT_BYTES", "AddResult",
           "PulledKeyframes", "decode_features", "encode_features", "is_pulled", "keyframe_key", "map_uid",
           "to_records"]

PULLED_PREFIX = "fleet:"
KEY_BYTES = 160
TEXT_BYTES = 4 * MAX_TEXT_CHARS  # what a local map accepts (characters), as UTF-8 bytes
FEATURES_BYTES = 65535  # Milvus's largest VARCHAR
_POSE = ("x", "y", "z")
_QUAT = ("qx", "qy", "qz", "qw")
_GPS = ("lat", "lon", "alt")
_UTM = ("utm_easting", "utm_northing")

#: (name, Milvus data type, parameters) of every field but the key and the vector.
SCALAR_FIELDS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("robot", "VARCHAR", {"max_length": 64}),
    ("map_uid", "VARCHAR", {"max_length": 32}),
    ("keyframe_id", "INT64", {}),
    ("stamp_ns", "INT64", {}),
    ("camera", "VARCHAR", {"max_length": TEXT_BYTES}),
    ("frame_id", "VARCHAR", {"max_length": TEXT_BYTES}),
    *((name, "DOUBLE", {"nullable": True}) for name in _POSE + _QUAT + _GPS),
    ("utm_zone", "INT16", {}),
    ("utm_band", "VARCHAR", {"max_length": 2}),
    *((name, "DOUBLE", {"nullable": True}) for name in _UTM),
    ("source", "VARCHAR", {"max_length": TEXT_BYTES}),
    ("features", "VARCHAR", {"max_length": FEATURES_BYTES}),
    ("camera_info", "JSON", {}),
)


def map_uid(kmap: Any) -> str:
    """A short id of a map: sha256 of its creation time and model id (stable across saves, loads and subsets)."""
    return hashlib.sha256(f"{kmap.created}|{kmap.fingerprint['id']}".encode()).hexdigest()[:12]


def keyframe_key(robot: str, uid: str, keyframe_id: int) -> str:
    """The primary key of a keyframe in the fleet collection."""
    return f"{robot}/{uid}/{int(keyframe_id)}"


def is_pulled(source: str) -> bool:
    """Whether a local keyframe came from the fleet (its source is ``fleet:<key>``)."""
    return source.startswith(PULLED_PREFIX)


def encode_features(store: Any, row: int) -> tuple[str, bool]:
    """The ``features`` text of keyframe ``row`` of a map's feature store, and whether features were dropped to fit."""
    records = store.records(row)
    used = records[records["x"] != EMPTY]
    if used.shape[0] == 0:
        return "", False
    prefix = f"{store.kind}:"
    fit = (FEATURES_BYTES - len(prefix)) // 4 * 3 // used.dtype.itemsize
    text = base64.b64encode(np.ascontiguousarray(used[:fit]).tobytes()).decode("ascii")
    return prefix + text, used.shape[0] > fit


def decode_features(text: str) -> LocalFeatures | None:
    """The local features of a ``features`` text (None for ""); ValueError for anything malformed."""
    if not text:
        return None
    if len(text) > FEATURES_BYTES:
        raise ValueError(f"features text of {len(text)} characters, more than a fleet row holds ({FEATURES_BYTES})")
    kind, _, payload = text.partition(":")
    if kind not in DESCRIPTOR_BYTES:
        raise ValueError(f"unknown local feature type {kind!r}")
    try:
        raw = base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"features are not base64: {exc}") from None
    dtype = slot_dtype(kind)
    if len(raw) % dtype.itemsize:
        raise ValueError(f"features have {len(raw)} bytes, not a whole number of {dtype.itemsize}-byte records")
    return unpack(np.frombuffer(raw, dtype=dtype), kind)


def _nullable(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def to_records(kmap: Any, rows: np.ndarray, robot: str, uid: str, vector: str, marker: str
               ) -> tuple[list[dict], int]:
    """Rows of the fleet collection for map rows ``rows`` (descriptor field ``vector``, model marker field
    ``marker``); returns them and how many lost features to fit."""
    store = kmap.local_features
    ids, stamps, cams, frames = kmap.ids, kmap.stamps_ns, kmap.cameras, kmap.frame_ids
    pos, quat, gps, zones, bands, utm, sources = (kmap.positions, kmap.orientations, kmap.gps, kmap.utm_zones,
                                                  kmap.utm_bands, kmap.utm, kmap.sources)
    out, truncated = [], 0
    for r in (int(r) for r in rows):
        features, cut = encode_features(store, r) if store is not None else ("", False)
        truncated += cut
        intrinsics = store.intrinsics.get(cams[r]) if store is not None else None
        descriptor = kmap.keyframe(r).descriptor  # a view into its chunk: a large map is never concatenated
        rec = {"key": keyframe_key(robot, uid, ids[r]), vector: np.asarray(descriptor, np.float32).tolist(),
               marker: True, "robot": robot, "map_uid": uid, "keyframe_id": int(ids[r]), "stamp_ns": int(stamps[r]),
               "camera": cams[r], "frame_id": frames[r], "utm_zone": int(zones[r]), "utm_band": bands[r],
               "source": sources[r], "features": features,
               "camera_info": {"intrinsics": None if intrinsics is None else intrinsics.to_dict(), "extrinsics": None}}
        for names, values in ((_POSE, pos[r]), (_QUAT, quat[r]), (_GPS, gps[r]), (_UTM, utm[r])):
            rec.update(zip(names, map(_nullable, values)))
        out.append(rec)
    return out, truncated


@dataclass
class AddResult:
    """What adding pulled keyframes to a map did."""

    ids: np.ndarray
    present: int = 0
    refused: list[str] = field(default_factory=list)


@dataclass
class PulledKeyframes:
    """Keyframes read from the fleet collection, ready for :meth:`add_to` a local map (see the module docstring).

    Attributes:
        keys: fleet key per row.
        descriptors: (N, D) float32.
        columns: ``KeyframeMap.add`` keyword arguments (stamps_ns, cameras, frame_ids, positions, orientations, gps,
            utm_zones, utm_bands, utm, sources).
        features: local features per row (None: none).
        cameras: camera name (as the local map will call it) -> its camera_info JSON.
        refused: one line per row that could not be read (malformed on the server).
    """

    keys: list[str]
    descriptors: np.ndarray
    columns: dict[str, Any]
    features: list[LocalFeatures | None]
    cameras: dict[str, dict]
    refused: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_records(cls, records: list[dict], vector: str, dim: int, own_robot: str) -> PulledKeyframes:
        """Parse rows of the collection; a malformed row is refused (with its reason), never raised."""
        keys, desc, features, cameras, refused = [], [], [], {}, []
        cols: dict[str, list] = {k: [] for k in ("stamps_ns", "cameras", "frame_ids", "positions", "orientations",
                                                 "gps", "utm_zones", "utm_bands", "utm", "sources")}
        for rec in records:
            try:
                key = str(rec["key"])
                vec = np.asarray(rec[vector], dtype=np.float32)
                if vec.shape != (dim,):
                    raise ValueError(f"descriptor has shape {vec.shape}, expected ({dim},)")
                robot = str(rec["robot"])
                camera = str(rec["camera"]) if robot == own_robot else f"{robot}:{rec['camera']}"
                row = {"stamps_ns": int(rec["stamp_ns"]), "cameras": camera, "frame_ids": str(rec["frame_id"]),
                       "positions": [_value(rec, k) for k in _POSE], "orientations": [_value(rec, k) for k in _QUAT],
                       "gps": [_value(rec, k) for k in _GPS], "utm_zones": int(rec["utm_zone"]),
                       "utm_bands": str(rec["utm_band"]), "utm": [_value(rec, k) for k in _UTM],
                       "sources": PULLED_PREFIX + key}
                feats = decode_features(str(rec.get("features") or ""))
                info = rec.get("camera_info")
            except (KeyError, TypeError, ValueError) as exc:
                refused.append(f"row {rec.get('key', '?') if isinstance(rec, dict) else '?'}: {exc}")
                continue
            keys.append(key)
            desc.append(vec)
            features.append(feats)
            for k, v in row.items():
                cols[k].append(v)
            if isinstance(info, dict):
                cameras.setdefault(camera, info)
        columns: dict[str, Any] = {k: v for k, v in cols.items()}
        for k, width in (("positions", 3), ("orientations", 4), ("gps", 3), ("utm", 2)):
            columns[k] = np.array(cols[k], dtype=np.float64).reshape(-1, width)
        columns["stamps_ns"] = np.array(cols["stamps_ns"], dtype=np.int64)
        columns["utm_zones"] = np.array(cols["utm_zones"], dtype=np.int64)
        descriptors = np.array(desc, dtype=np.float32).reshape(-1, dim)
        return cls(keys, descriptors, columns, features, cameras, refused)

    def select(self, rows: np.ndarray | list[int]) -> PulledKeyframes:
        """The given rows (in that order)."""
        rows = [int(r) for r in rows]
        cols = {k: (v[rows] if isinstance(v, np.ndarray) else [v[r] for r in rows]) for k, v in self.columns.items()}
        names = {self.columns["cameras"][r] for r in rows}
        return PulledKeyframes([self.keys[r] for r in rows], self.descriptors[rows], cols,
                               [self.features[r] for r in rows],
                               {k: v for k, v in self.cameras.items() if k in names}, list(self.refused))

    def add_to(self, kmap: Any, *, enable_features: bool = False) -> AddResult:
        """Append these keyframes to ``kmap`` (the model's map), skipping those it holds already.

        UTM positions are moved into the map's UTM zone when they are in another (from their GPS fix; unknown without
        one). Local features go into the map's feature store when their type is the map's; with
        ``enable_features`` an empty map without a store gets one (the pulled type, the most features of a row).

        Returns:
            The new ids, how many were present already, and a line per row refused by the map's checks.
        """
        present = {s[len(PULLED_PREFIX):] for s in kmap.sources if is_pulled(s)}
        new = [i for i, key in enumerate(self.keys) if key not in present]
        part = self.select(new)
        if enable_features and kmap.local_features is None and len(kmap) == 0:
            kinds = Counter(f.kind for f in part.features if f is not None and len(f))
            if kinds:
                kind = kinds.most_common(1)[0][0]
                slots = max(len(f) for f in part.features if f is not None and f.kind == kind)
                kmap.enable_local_features(kind, min(slots, 4000))
        _align_utm(part.columns, kmap)
        store = kmap.local_features
        feats = None if store is None else [f if f is not None and f.kind == store.kind else None
                                            for f in part.features]
        refused = list(self.refused)
        try:
            ids = kmap.add(part.descriptors, **part.columns, features=feats)
        except MapError:  # one bad row must not cost the others: add them one by one
            ids = []
            for i in range(len(part)):
                one = part.select([i])
                try:
                    ids.extend(kmap.add(one.descriptors, **one.columns,
                                        features=None if feats is None else [feats[i]]).tolist())
                except MapError as exc:
                    refused.append(f"row {part.keys[i]}: {exc}")
            ids = np.asarray(ids, dtype=np.int64)
        if store is not None:
            for name, info in part.cameras.items():
                intrinsics = info.get("intrinsics")
                if name in store.intrinsics or not isinstance(intrinsics, dict):
                    continue
                try:
                    store.intrinsics[name] = CameraModel.from_dict(intrinsics)
                except CameraModelError as exc:
                    refused.append(f"camera {name}: intrinsics ignored: {exc}")
        return AddResult(ids, len(self.keys) - len(new), refused)


def _value(rec: dict, key: str) -> float:
    value = rec.get(key)
    return math.nan if value is None else float(value)


def _align_utm(columns: dict[str, Any], kmap: Any) -> None:
    """Move UTM positions in another zone than the map's into it (from their GPS fix; unknown without one)."""
    zones = kmap.utm_zones[kmap.utm_zones > 0]
    if not zones.size:
        return
    target = int(zones[0])
    moved = np.flatnonzero((columns["utm_zones"] > 0) & (columns["utm_zones"] != target))
    if not moved.size:
        return
    geo = geotag_columns(columns["gps"][moved], zone=target)
    for j, i in enumerate(moved):
        columns["utm"][i] = geo["utm"][j]
        columns["utm_zones"][i] = geo["utm_zones"][j]
        columns["utm_bands"][i] = geo["utm_bands"][j]
