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

Each camera also has a :class:`CameraRecord` (manifest ``local_features.cameras``): the frame_id of its images, its
extrinsic ``T_base_cam`` when its keyframes were recorded, and its image size, so that a keyframe's pose prior uses
its own camera's mount (also in a map from another robot) and its keypoints can be checked against its image. A
camera name holds one record: when a camera's frame, extrinsic, image size or intrinsics change while keyframes are
added to a map (a re-calibration, another robot, TF arriving late), the new keyframes go under a new version of the
name, ``<camera>#2``, ``#3`` ... (:meth:`KeyframeFeatures.record_name`), and the earlier keyframes keep theirs.

A map directory is untrusted: :func:`check_feature_rows` refuses, at load, a chunk whose keypoints lie outside its
camera's image (the record's size; for maps written before records existed, the intrinsics' size, else only the
format's own range, :data:`~dinomix_ros.imaging.camera.MAX_IMAGE_SIDE`) or all at one point or on one line, which
no feature extractor produces and which make geometric verification degenerate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from dinomix_ros.imaging.camera import MAX_IMAGE_SIDE, CameraModel, fit_to_image
from dinomix_ros.imaging.features import DESCRIPTOR_BYTES, FeatureConfig, FeatureExtractor, LocalFeatures, to_gray
from dinomix_ros.maps.errors import MapError

__all__ = ["EMPTY", "KEYPOINT_SCALE", "MAX_CAMERA_VERSIONS", "MIN_SPREAD_PX", "slot_dtype", "pack", "unpack",
           "CameraRecord", "KeyframeFeatures", "FeatureRecorder", "check_feature_rows", "keypoint_bounds"]

EMPTY = 0xFFFF
KEYPOINT_SCALE = 4
_MAX_COORD = (EMPTY - 1) / KEYPOINT_SCALE
#: Most records one camera name may have in a map (``camera``, ``camera#2`` ... ``camera#100``).
MAX_CAMERA_VERSIONS = 100
#: A keyframe's keypoints (at least :data:`_MIN_CHECKED` of them) must spread at least this far (pixels, the smaller
#: standard deviation of their positions): all at one point or on one line is not an image's features.
MIN_SPREAD_PX = 1.0
_MIN_CHECKED = 8
_CHECK_ROWS = 4096  # rows checked at a time (bounded temporary memory)

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


@dataclass(frozen=True, eq=False)
class CameraRecord:
    """What a map knows about the camera of its keyframes (manifest ``local_features.cameras[name]``).

    Attributes:
        frame_id: the ``header.frame_id`` of its images (its optical frame).
        T_base_cam: (4, 4) its extrinsic when the keyframes were recorded (optical frame in the robot's base frame).
        width: width of its images in pixels (the keypoints' image).
        height: height of its images in pixels.
    """

    frame_id: str
    T_base_cam: np.ndarray
    width: int
    height: int

    def __post_init__(self) -> None:
        from dinomix_ros.localization.extrinsics import ExtrinsicsError, check_mount

        if not isinstance(self.frame_id, str) or len(self.frame_id) > 256 or \
                any(ord(c) < 32 or ord(c) == 127 for c in self.frame_id):
            raise MapError(f"camera frame_id {str(self.frame_id)[:80]!r} must be printable text of at most 256 "
                           "characters")
        for name in ("width", "height"):
            value = getattr(self, name)
            if type(value) not in (int, np.int64) or not 1 <= value <= MAX_IMAGE_SIDE:
                raise MapError(f"camera image {name} is {value!r}, expected an integer in 1..{MAX_IMAGE_SIDE}")
            object.__setattr__(self, name, int(value))
        try:
            T = check_mount(self.T_base_cam, "T_base_cam")
        except ExtrinsicsError as exc:
            raise MapError(str(exc)) from None
        T.flags.writeable = False
        object.__setattr__(self, "T_base_cam", T)

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``T_base_cam`` as 16 numbers, row-major."""
        return {"frame_id": self.frame_id, "T_base_cam": [float(v) for v in self.T_base_cam.reshape(-1)],
                "width": self.width, "height": self.height}

    @classmethod
    def from_dict(cls, data: Any) -> CameraRecord:
        """Inverse of :meth:`to_dict`.

        Raises:
            MapError: a key is missing or a value is refused (one line).
        """
        if not isinstance(data, dict) or set(data) != {"frame_id", "T_base_cam", "width", "height"}:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise MapError(f"a camera record has the keys frame_id, T_base_cam, width, height; got {keys}")
        T = data["T_base_cam"]
        if not isinstance(T, list) or len(T) != 16 or not all(type(v) in (int, float) for v in T):
            raise MapError(f"T_base_cam must be 16 numbers (row-major 4x4), got {str(T)[:120]}")
        return cls(data["frame_id"], np.asarray(T, dtype=np.float64).reshape(4, 4), data["width"], data["height"])

    def matches(self, other: CameraRecord) -> bool:
        """The same camera: frame, image size and extrinsic (within the same-mount tolerance)."""
        from dinomix_ros.localization.extrinsics import same_mount

        return (self.frame_id, self.size) == (other.frame_id, other.size) and \
            same_mount(self.T_base_cam, other.T_base_cam)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CameraRecord) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.frame_id, self.width, self.height, self.T_base_cam.tobytes()))


def keypoint_bounds(name: str, cameras: dict[str, CameraRecord], intrinsics: dict[str, CameraModel]
                    ) -> tuple[float, float]:
    """The (width, height) a camera's keypoints must lie below: its record's image size; for maps written before
    records existed, its intrinsics' size; else the largest image side a map can describe."""
    if name in cameras:
        return float(cameras[name].width), float(cameras[name].height)
    if name in intrinsics:
        return float(intrinsics[name].width), float(intrinsics[name].height)
    return float(MAX_IMAGE_SIDE), float(MAX_IMAGE_SIDE)


def check_feature_rows(records: np.ndarray, bounds: np.ndarray, where: Callable[[int], str]) -> None:
    """Refuse local-feature rows a feature extractor cannot have produced (see the module docstring).

    Args:
        records: (rows, slots) records of :func:`slot_dtype`.
        bounds: (rows, 2) width and height each row's keypoints must lie below.
        where: row index -> how to name it in the error ("features.g000001.npy row 3 (map row 3)").

    Raises:
        MapError: a row with a keypoint outside its image, or whose keypoints are all at one point or on one line.
    """
    for lo in range(0, records.shape[0], _CHECK_ROWS):
        block = np.asarray(records[lo:lo + _CHECK_ROWS])
        b = bounds[lo:lo + _CHECK_ROWS]
        qx, qy = block["x"], block["y"]  # quarter pixels; EMPTY marks an unused slot
        used = qx != EMPTY
        outside = used & ((qx >= b[:, :1] * KEYPOINT_SCALE) | (qy >= b[:, 1:] * KEYPOINT_SCALE))
        if outside.any():
            r, c = np.argwhere(outside)[0]
            raise MapError(f"{where(lo + int(r))} has a keypoint at ({qx[r, c] / KEYPOINT_SCALE:g}, "
                           f"{qy[r, c] / KEYPOINT_SCALE:g}), outside its camera's {b[r, 0]:g}x{b[r, 1]:g} image: not "
                           "features of that image (edited or damaged)")
        n = used.sum(axis=1)
        checked = n >= _MIN_CHECKED
        if not checked.any():
            continue
        x = np.where(used, qx, 0).astype(np.float32) / KEYPOINT_SCALE  # exact: quarter pixels below 16384
        y = np.where(used, qy, 0).astype(np.float32) / KEYPOINT_SCALE
        m = np.maximum(n, 1).astype(np.float64)
        mx, my = x.sum(axis=1, dtype=np.float64) / m, y.sum(axis=1, dtype=np.float64) / m
        sxx = np.einsum("ij,ij->i", x, x, dtype=np.float64) / m - mx * mx  # the 2x2 covariance of the keypoints
        syy = np.einsum("ij,ij->i", y, y, dtype=np.float64) / m - my * my
        sxy = np.einsum("ij,ij->i", x, y, dtype=np.float64) / m - mx * my
        smallest = 0.5 * (sxx + syy) - np.sqrt(0.25 * (sxx - syy) ** 2 + sxy ** 2)  # its smaller eigenvalue
        flat = checked & (smallest < MIN_SPREAD_PX ** 2)
        if flat.any():
            r = int(np.flatnonzero(flat)[0])
            raise MapError(f"{where(lo + r)} has {int(n[r])} keypoints all at one point or on one line (spread "
                           f"{math.sqrt(max(smallest[r], 0.0)):.2g} px): not features of an image (edited or damaged)")


class KeyframeFeatures:
    """The local features of every keyframe of a map, and the intrinsics and records of its cameras (see the module
    docstring).

    Args:
        kind: feature type ("orb", "sift").
        slots: feature slots per keyframe of chunks written from now on.
        segments: (rows, slots) record chunks in row order (loaded, possibly memory-mapped).
        intrinsics: camera name -> intrinsics.
        cameras: camera name -> record (frame, extrinsic, image size).
    """

    def __init__(self, kind: str, slots: int, segments: list[np.ndarray] | None = None,
                 intrinsics: dict[str, CameraModel] | None = None,
                 cameras: dict[str, CameraRecord] | None = None) -> None:
        if kind not in DESCRIPTOR_BYTES:
            raise MapError(f"unknown local feature type {kind!r}; expected one of {', '.join(DESCRIPTOR_BYTES)}")
        if type(slots) is not int or slots < 1:
            raise MapError(f"feature slots per keyframe must be a positive integer, got {slots!r}")
        self.kind = kind
        self.slots = slots
        self._segments = list(segments or [])
        self._offsets = np.cumsum([0] + [s.shape[0] for s in self._segments])
        self.intrinsics: dict[str, CameraModel] = dict(intrinsics or {})
        self.cameras: dict[str, CameraRecord] = dict(cameras or {})

    def record_name(self, camera: str, record: CameraRecord, intrinsics: CameraModel | None,
                    existing: Callable[[], set[str]]) -> str:
        """The camera name a new keyframe of ``camera`` is stored under, its record and intrinsics registered.

        A version of the name (``camera``, ``camera#2`` ...) whose record matches ``record``, and whose intrinsics
        are the same or unknown on either side, is reused (unknown intrinsics filled in). Else the first version
        that nothing uses yet (no record, no intrinsics, no keyframe: ``existing()`` gives the map's camera names)
        is created; keyframes of a map written before camera records existed keep their name, and with it
        ``camera_mount.*`` (see the module docstring).

        Raises:
            MapError: ``camera`` already has :data:`MAX_CAMERA_VERSIONS` versions in this map.
        """
        names = [camera] + [f"{camera}#{v}" for v in range(2, MAX_CAMERA_VERSIONS + 1)]
        for name in names:
            known, known_k = self.cameras.get(name), self.intrinsics.get(name)
            if known is not None and known.matches(record) and \
                    (known_k is None or intrinsics is None or known_k == intrinsics):
                if known_k is None and intrinsics is not None:
                    self.intrinsics[name] = intrinsics
                return name
        used = existing()
        for name in names:
            if name in self.cameras or name in self.intrinsics or name in used:
                continue
            self.cameras[name] = record
            if intrinsics is not None:
                self.intrinsics[name] = intrinsics
            if name != camera:
                _logger.warning("camera %s: the keyframes of %s in this map were recorded with another frame, "
                                "extrinsic, image size or intrinsics (or before maps stored them): its new keyframes "
                                "are stored as camera %s", camera, camera, name)
            return name
        raise MapError(f"camera {camera} has {MAX_CAMERA_VERSIONS} versions (frame, extrinsic, image size, intrinsics) "
                       "in this map already: its keyframes are not recorded; record into a new map")

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
        return KeyframeFeatures(self.kind, self.slots, [merged[rows]], self.intrinsics, self.cameras)

    def manifest_entry(self) -> dict[str, Any]:
        """What the manifest says about the local features (besides the chunk records)."""
        return {"type": self.kind, "slots": self.slots, "keypoint_scale": KEYPOINT_SCALE,
                "intrinsics": {name: cam.to_dict() for name, cam in sorted(self.intrinsics.items())},
                "cameras": {name: rec.to_dict() for name, rec in sorted(self.cameras.items())}}


class FeatureRecorder:
    """Local features and camera records for the keyframes an offline build adds
    (:mod:`dinomix_ros.maps.build_bag`, :mod:`dinomix_ros.maps.build_folder`).

    A new (empty) map gets a feature store; a map that has one keeps its feature type and slot count; a map without
    one (format 1, appended to) gets none, and the log says so. Each keyframe's camera gets a record (its image
    frame, extrinsic and image size) and its intrinsics, fitted to the image size (a calibration of another
    resolution is scaled when the aspect ratio matches, else not stored, with one log line per camera).

    Args:
        kmap: the map being built.
        config: feature type and count (None or ``max_features`` 0: no local features).
        intrinsics: camera name -> intrinsics (from the bag's camera_info or a calibration YAML).
        extrinsics: image frame_id -> extrinsic (None: ``camera_mount.*``'s default for every frame).
    """

    def __init__(self, kmap: Any, config: FeatureConfig | None, intrinsics: dict[str, CameraModel] | None = None,
                 extrinsics: Any = None) -> None:
        self._extractor = None
        self._kmap = kmap
        self._intrinsics = dict(intrinsics or {})
        self._fitted: dict[tuple[str, int, int], CameraModel | None] = {}
        if extrinsics is None:
            from dinomix_ros.localization.camera_pose import CameraMountConfig
            from dinomix_ros.localization.extrinsics import CameraExtrinsics

            extrinsics = CameraExtrinsics(CameraMountConfig().matrix())
        self._extrinsics = extrinsics
        if config is None or config.max_features == 0:
            return
        if kmap.local_features is None and len(kmap) > 0:
            _logger.warning("the map has no local features (format 1): the keyframes added now get none either, "
                            "and verification stays off for this map; rebuild it to verify matches")
            return
        store = kmap.enable_local_features(config.type, config.max_features)
        self._extractor = FeatureExtractor(FeatureConfig(type=store.kind, max_features=store.slots,
                                                         max_image_side=config.max_image_side))

    @property
    def active(self) -> bool:
        return self._extractor is not None

    def extract(self, image: np.ndarray, encoding: str) -> LocalFeatures | None:
        """The features of one decoded keyframe image (None when not recording features)."""
        return None if self._extractor is None else self._extractor.extract(to_gray(image, encoding))

    def keyframe(self, image: np.ndarray, encoding: str, camera: str, frame_id: str) -> tuple[LocalFeatures | None,
                                                                                              str]:
        """(features, camera name to store the keyframe under) of one decoded keyframe image of ``camera`` whose
        images carry ``frame_id`` (the name is ``camera``, or a version of it: :meth:`KeyframeFeatures.record_name`).

        Raises:
            MapError: the camera has too many versions in the map.
        """
        if self._extractor is None:
            return None, camera
        h, w = image.shape[:2]
        features = self._extractor.extract(to_gray(image, encoding))
        record = CameraRecord(frame_id, self._extrinsics.mount(frame_id).T, w, h)
        store = self._kmap.local_features
        name = store.record_name(camera, record, self._fit(camera, w, h), lambda: set(self._kmap.camera_names))
        return features, name

    def _fit(self, camera: str, width: int, height: int) -> CameraModel | None:
        given = self._intrinsics.get(camera)
        if given is None:
            return None
        key = (camera, width, height)
        if key not in self._fitted:
            model, how = fit_to_image(given, width, height)
            self._fitted[key] = model
            if how == "scaled":
                _logger.info("camera %s: its calibration is for %dx%d images, its images are %dx%d: intrinsics scaled",
                             camera, given.width, given.height, width, height)
            elif how == "mismatch":
                _logger.warning("camera %s: its calibration is for %dx%d images, its images are %dx%d (another aspect "
                                "ratio: a crop or ROI?): no intrinsics stored for it, its keyframes verify without",
                                camera, given.width, given.height, width, height)
        return self._fitted[key]
