"""Local features stored per keyframe (map format 2): compact fixed-size records, plus intrinsics per camera.

A map's :class:`KeyframeFeatures` is row-aligned with its keyframes (row ``i`` = keyframe ``i``). Each keyframe
has ``slots`` records of :func:`slot_dtype` (``max_features`` at the time its chunk was written), strongest
feature first, unused slots marked by ``x == EMPTY``::

    descriptor   uint8[B]   the feature's descriptor (ORB: B = 32)
    x, y         uint16     keypoint position in full-resolution pixels x 4 (quarter-pixel precision, < 16384 px)
    depth_mm     uint16     keypoint depth in millimetres (REP 118's 16UC1 unit), 0 = unknown

With ORB and 400 slots that is 400 x 38 = 15,200 bytes per keyframe. On disk, chunks are ``features.gNNNNNN.npy``
files of shape (rows, slots) with this structured dtype (numpy's .npy header, no pickle), written, listed and
sha256-checked by the map's storage engine like the descriptor chunks (:mod:`dinomix_ros.maps.storage`,
:mod:`dinomix_ros.maps.loading`). The intrinsics (:class:`~dinomix_ros.imaging.camera.CameraModel` per camera
name) are JSON in the manifest.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.imaging.features import DESCRIPTOR_BYTES, FeatureConfig, FeatureExtractor, LocalFeatures, to_gray
from dinomix_ros.maps.errors import MapError

__all__ = ["EMPTY", "KEYPOINT_SCALE", "slot_dtype", "pack", "unpack", "KeyframeFeatures", "FeatureRecorder"]

EMPTY = 0xFFFF
KEYPOINT_SCALE = 4
_MAX_COORD = (EMPTY - 1) / KEYPOINT_SCALE

_logger = logging.getLogger(__name__)


def slot_dtype(kind: str) -> np.dtype:
    """The record of one feature slot for feature type ``kind`` (see the module docstring)."""
    return np.dtype([("descriptor", "u1", (DESCRIPTOR_BYTES[kind],)), ("x", "<u2"), ("y", "<u2"),
                     ("depth_mm", "<u2")])


def pack(features: LocalFeatures | None, kind: str, slots: int) -> np.ndarray:
    """(slots,) records of one keyframe's features (the strongest ``slots``; None: all slots empty).

    Raises:
        MapError: features of another type, or keypoints outside the storable range.
    """
    out = np.zeros(slots, dtype=slot_dtype(kind))
    out["x"] = EMPTY
    if features is None or len(features) == 0:
        return out
    if features.kind != kind:
        raise MapError(f"this map stores {kind} features, got {features.kind}: extract {kind} features "
                       "(features.type) for it, or build a new map")
    n = min(len(features), slots)
    pts = np.asarray(features.keypoints[:n], dtype=np.float64)
    if not np.isfinite(pts).all() or (pts < -0.5).any() or (pts > _MAX_COORD).any():
        raise MapError(f"keypoints must lie in [0, {_MAX_COORD:g}] pixels, got {pts.min():g}..{pts.max():g}")
    out["descriptor"][:n] = features.descriptors[:n]
    out["x"][:n] = np.rint(np.clip(pts[:, 0], 0, None) * KEYPOINT_SCALE)
    out["y"][:n] = np.rint(np.clip(pts[:, 1], 0, None) * KEYPOINT_SCALE)
    depth = np.asarray(features.depths[:n], dtype=np.float64)
    out["depth_mm"][:n] = np.where(np.isfinite(depth) & (depth > 0), np.clip(np.rint(depth * 1e3), 1, EMPTY - 1), 0)
    return out


def unpack(records: np.ndarray, kind: str) -> LocalFeatures:
    """The features in one keyframe's (slots,) records (empty slots dropped)."""
    used = records[records["x"] != EMPTY]
    depth = used["depth_mm"].astype(np.float32) * 1e-3
    depth[used["depth_mm"] == 0] = np.nan
    pts = np.stack([used["x"], used["y"]], axis=1).astype(np.float32) / KEYPOINT_SCALE
    return LocalFeatures(pts, np.ascontiguousarray(used["descriptor"]), depth, (0, 0), kind)


class KeyframeFeatures:
    """The local features of every keyframe of a map, and the intrinsics of its cameras (see the module docstring).

    Args:
        kind: feature type ("orb", "sift").
        slots: feature slots per keyframe of chunks written from now on.
        segments: (rows, slots) record chunks in row order (loaded, possibly memory-mapped).
        intrinsics: camera name -> intrinsics.
    """

    def __init__(self, kind: str, slots: int, segments: list[np.ndarray] | None = None,
                 intrinsics: dict[str, CameraModel] | None = None) -> None:
        if kind not in DESCRIPTOR_BYTES:
            raise MapError(f"unknown local feature type {kind!r}; expected one of {', '.join(DESCRIPTOR_BYTES)}")
        if type(slots) is not int or slots < 1:
            raise MapError(f"feature slots per keyframe must be a positive integer, got {slots!r}")
        self.kind = kind
        self.slots = slots
        self._segments = list(segments or [])
        self._offsets = np.cumsum([0] + [s.shape[0] for s in self._segments])
        self.intrinsics: dict[str, CameraModel] = dict(intrinsics or {})

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def bytes_per_keyframe(self) -> int:
        return self.slots * slot_dtype(self.kind).itemsize

    def pack_block(self, features: Sequence[LocalFeatures | None]) -> np.ndarray:
        """(len(features), slots) records for :meth:`append_block` (None: a keyframe without features).

        Raises:
            MapError: features of another type or keypoints outside the storable range (nothing is changed).
        """
        if not len(features):
            return np.zeros((0, self.slots), slot_dtype(self.kind))
        return np.stack([pack(f, self.kind, self.slots) for f in features])

    def append_block(self, block: np.ndarray) -> None:
        """Append packed rows (from :meth:`pack_block`)."""
        if block.shape[0] == 0:
            return
        block.flags.writeable = False
        self._segments.append(block)
        self._offsets = np.append(self._offsets, self._offsets[-1] + block.shape[0])

    def append(self, features: Sequence[LocalFeatures | None]) -> None:
        """Add one row per keyframe (None: a keyframe without features); validated before anything changes."""
        self.append_block(self.pack_block(features))

    def records(self, row: int) -> np.ndarray:
        """The (slots,) records of keyframe ``row``."""
        if not 0 <= row < len(self):
            raise IndexError(f"keyframe row {row} out of range for {len(self)} rows of local features")
        seg = int(np.searchsorted(self._offsets, row, side="right")) - 1
        return self._segments[seg][row - self._offsets[seg]]

    def row(self, row: int) -> LocalFeatures:
        """The features of keyframe ``row`` (empty when it has none)."""
        return unpack(self.records(row), self.kind)

    def blocks(self, start: int) -> list[np.ndarray]:
        """Rows ``start:`` as (rows, slots) blocks of THIS store's current slot count (for writing a chunk)."""
        out = []
        for seg, lo in zip(self._segments, self._offsets[:-1]):
            hi = lo + seg.shape[0]
            if hi <= start:
                continue
            part = seg[max(start - lo, 0):]
            if part.shape[1] != self.slots:  # older chunk of another slot count: re-pad (extra slots are empty)
                padded = np.zeros((part.shape[0], self.slots), dtype=part.dtype)
                padded["x"] = EMPTY
                k = min(self.slots, part.shape[1])
                padded[:, :k] = part[:, :k]
                part = padded
            out.append(np.ascontiguousarray(part))
        return out

    def subset(self, rows: np.ndarray) -> KeyframeFeatures:
        """A store with the given rows (in order), in RAM."""
        blocks = self.blocks(0)
        merged = np.concatenate(blocks, axis=0) if blocks else np.zeros((0, self.slots), slot_dtype(self.kind))
        return KeyframeFeatures(self.kind, self.slots, [merged[rows]], self.intrinsics)

    def manifest_entry(self) -> dict[str, Any]:
        """What the manifest says about the local features (besides the chunk records)."""
        return {"type": self.kind, "slots": self.slots, "keypoint_scale": KEYPOINT_SCALE,
                "intrinsics": {name: cam.to_dict() for name, cam in sorted(self.intrinsics.items())}}


class FeatureRecorder:
    """Local features for the keyframes an offline build adds (:mod:`dinomix_ros.maps.build_bag`,
    :mod:`dinomix_ros.maps.build_folder`).

    A new (empty) map gets a feature store; a map that has one keeps its feature type and slot count; a map without
    one (format 1, appended to) gets none, and the log says so. Intrinsics given per camera are stored in the map.

    Args:
        kmap: the map being built.
        config: feature type and count (None or ``max_features`` 0: no local features).
        intrinsics: camera name -> intrinsics (from the bag's camera_info or a calibration YAML).
    """

    def __init__(self, kmap: Any, config: FeatureConfig | None, intrinsics: dict[str, CameraModel] | None = None
                 ) -> None:
        self._extractor = None
        if config is None or config.max_features == 0:
            return
        if kmap.local_features is None and len(kmap) > 0:
            _logger.warning("the map has no local features (format 1): the keyframes added now get none either, "
                            "and verification stays off for this map; rebuild it to verify matches")
            return
        store = kmap.enable_local_features(config.type, config.max_features)
        store.intrinsics.update(intrinsics or {})
        self._extractor = FeatureExtractor(FeatureConfig(type=store.kind, max_features=store.slots,
                                                         max_image_side=config.max_image_side))

    @property
    def active(self) -> bool:
        return self._extractor is not None

    def extract(self, image: np.ndarray, encoding: str) -> LocalFeatures | None:
        """The features of one decoded keyframe image (None when not recording features)."""
        return None if self._extractor is None else self._extractor.extract(to_gray(image, encoding))
