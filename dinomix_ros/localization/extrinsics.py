"""Where each camera is on the robot: its optical frame in the base frame (``T_base_cam``), per image frame_id.

A verified match turns the camera's motion into the robot's (:mod:`.camera_pose`) through the extrinsic of the camera
each image came from, so a robot with a front, a rear and a side camera needs three. They are looked up by the image's
``header.frame_id`` (the camera's optical frame: z forward, x right, y down, as ``sensor_msgs/Image`` defines it),
in this order (:class:`CameraExtrinsics`):

1. ``cameras.extrinsics`` entries (:class:`ExtrinsicsConfig`), one string per frame:
   ``"<frame_id>: x y z roll pitch yaw"`` (metres, radians; R = Rz(yaw) Ry(pitch) Rx(roll), the URDF convention) or
   ``"<frame_id>: x y z qx qy qz qw"``, the same numbers ``static_transform_publisher`` takes for the transform from
   the base frame to the optical frame;
2. TF, when the node has it (``tf2_ros`` importable and ``cameras.base_frame`` set): the transform from
   ``cameras.base_frame`` to the frame, looked up when the frame is first seen and again at most every
   :data:`TF_REFRESH_S` (a changed transform replaces the cached one, and the log says so);
3. ``camera_mount.*`` (:class:`~.camera_pose.CameraMountConfig`) for every other frame, so configurations written for
   one camera keep working.

The log says once per frame which source it got (and again when that changes). Every extrinsic is checked
(:func:`check_mount`): finite, a proper rotation, at most :data:`MAX_OFFSET_M` from the base; a bad one is refused
with one line. ROS-free: the TF lookup is a callable the node passes in (:mod:`dinomix_ros.ros.tf_extrinsics`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dinomix_ros.localization.camera_pose import rpy_to_matrix
from dinomix_ros.maps.sources.poses import quat_to_matrix
from dinomix_ros.settings import SettingError, check, setting

__all__ = ["ExtrinsicsError", "ExtrinsicsConfig", "Mount", "CameraExtrinsics", "check_mount", "parse_extrinsic",
           "parse_extrinsics", "same_mount", "MAX_OFFSET_M", "TF_REFRESH_S", "ROTATION_TOLERANCE"]

_logger = logging.getLogger(__name__)

#: Largest distance of a camera from the base frame's origin per axis, metres (camera_mount.* has the same limits).
MAX_OFFSET_M = 100.0
#: A rotation matrix R must satisfy |R^T R - I| <= this (elementwise) and det R > 0.
ROTATION_TOLERANCE = 1e-6
#: Seconds after which a TF extrinsic is looked up again (static transforms do not change; a re-published one does).
TF_REFRESH_S = 1.0
#: Two extrinsics are the same camera mount when they differ by less than this (metres; radians of rotation).
SAME_MOUNT_M = 1e-4
SAME_MOUNT_RAD = 1e-4
_MAX_FRAME_ID = 256
_MAX_ANNOUNCED = 64  # camera frames whose extrinsic source is logged


class ExtrinsicsError(ValueError):
    """An extrinsic that cannot describe a camera on a robot (not a rigid transform, too far, malformed text)."""


def check_mount(T: object, what: str = "extrinsic") -> np.ndarray:
    """``T`` as a (4, 4) float64 rigid transform, checked (see the module docstring).

    Raises:
        ExtrinsicsError: not 16 finite numbers, a bottom row other than [0, 0, 0, 1], a rotation that is not proper
            (orthonormal within :data:`ROTATION_TOLERANCE`, det +1), or an offset beyond :data:`MAX_OFFSET_M`.
    """
    try:
        M = np.array(T, dtype=np.float64)
    except (TypeError, ValueError):
        raise ExtrinsicsError(f"{what} is not a 4x4 matrix of numbers: {str(T)[:120]}") from None
    if M.size != 16:
        raise ExtrinsicsError(f"{what} must be a 4x4 transform (16 numbers), got {M.size}")
    M = M.reshape(4, 4)
    if not np.isfinite(M).all():
        raise ExtrinsicsError(f"{what} holds NaN or inf")
    if not np.array_equal(M[3], [0.0, 0.0, 0.0, 1.0]):
        raise ExtrinsicsError(f"{what}'s bottom row is {M[3].tolist()}, expected [0, 0, 0, 1]")
    R = M[:3, :3]
    if np.abs(R.T @ R - np.eye(3)).max() > ROTATION_TOLERANCE or np.linalg.det(R) <= 0:
        raise ExtrinsicsError(f"{what}'s rotation is not a rotation matrix (orthonormal with determinant +1): "
                              f"{np.round(R, 6).tolist()}")
    if np.abs(M[:3, 3]).max() > MAX_OFFSET_M:
        raise ExtrinsicsError(f"{what} puts the camera {np.abs(M[:3, 3]).max():g} m from the base frame, more than "
                              f"{MAX_OFFSET_M:g} m")
    return M


def same_mount(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two extrinsics describe the same mount (within :data:`SAME_MOUNT_M` and :data:`SAME_MOUNT_RAD`)."""
    if np.abs(a[:3, 3] - b[:3, 3]).max() > SAME_MOUNT_M:
        return False
    cos = (float(np.trace(a[:3, :3].T @ b[:3, :3])) - 1.0) / 2.0
    return math.acos(max(-1.0, min(1.0, cos))) <= SAME_MOUNT_RAD


def parse_extrinsic(text: str) -> tuple[str, np.ndarray]:
    """``"<frame_id>: x y z roll pitch yaw"`` or ``"<frame_id>: x y z qx qy qz qw"`` -> (frame_id, T_base_cam).

    Raises:
        ExtrinsicsError: not that form (the message shows the form), or a transform :func:`check_mount` refuses.
    """
    frame, sep, numbers = str(text).rpartition(":")
    frame = frame.strip()
    form = "expected \"<frame_id>: x y z roll pitch yaw\" or \"<frame_id>: x y z qx qy qz qw\""
    if not sep or not frame:
        raise ExtrinsicsError(f"camera extrinsic {text!r}: {form}")
    if len(frame) > _MAX_FRAME_ID or any(c.isspace() for c in frame):
        raise ExtrinsicsError(f"camera extrinsic {text[:80]!r}: the frame id must be one word of at most "
                              f"{_MAX_FRAME_ID} characters")
    try:
        values = [float(v) for v in numbers.split()]
    except ValueError:
        raise ExtrinsicsError(f"camera extrinsic {text!r}: {form}") from None
    if len(values) not in (6, 7) or not all(math.isfinite(v) for v in values):
        raise ExtrinsicsError(f"camera extrinsic {text!r}: {form} (finite numbers)")
    T = np.eye(4)
    T[:3, 3] = values[:3]
    if len(values) == 6:
        if max(abs(v) for v in values[3:]) > 7.0:
            raise ExtrinsicsError(f"camera extrinsic {text!r}: roll, pitch and yaw are radians within +-7")
        T[:3, :3] = rpy_to_matrix(*values[3:])
    else:
        q = np.asarray(values[3:])
        if abs(np.linalg.norm(q) - 1.0) > 1e-3:
            raise ExtrinsicsError(f"camera extrinsic {text!r}: the quaternion (qx qy qz qw) has norm "
                                  f"{np.linalg.norm(q):g}, expected 1")
        T[:3, :3] = quat_to_matrix(q / np.linalg.norm(q))
    return frame, check_mount(T, f"camera extrinsic of {frame}")


def parse_extrinsics(entries: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """``cameras.extrinsics`` -> frame_id -> T_base_cam; empty entries are skipped (ROS cannot declare an empty
    string array: the default is ``[""]``).

    Raises:
        ExtrinsicsError: a malformed entry, or a frame listed twice.
    """
    out: dict[str, np.ndarray] = {}
    for text in entries:
        if not str(text).strip():
            continue
        frame, T = parse_extrinsic(text)
        if frame in out:
            raise ExtrinsicsError(f"camera extrinsic of {frame} is given twice")
        out[frame] = T
    return out


@dataclass(frozen=True)
class ExtrinsicsConfig:
    """Camera extrinsics per image frame (node parameters ``cameras.base_frame``, ``cameras.extrinsics``)."""

    SETTINGS_GROUP: ClassVar[str] = "cameras"

    base_frame: str = setting("base_link", "the robot's base frame (the pose source's child frame): camera "
                                           "extrinsics come from TF as base_frame -> each image's header.frame_id "
                                           "when tf2_ros is available; empty: TF is not used", reconfigure=True)
    # default [""], not []: ROS cannot declare a parameter whose default is an empty (untyped) array
    extrinsics: tuple[str, ...] = setting(("",), "camera extrinsics per image frame_id, each \"<frame_id>: x y z "
                                                 "roll pitch yaw\" (or \"... x y z qx qy qz qw\"): the optical "
                                                 "frame in the base frame (m, rad; static_transform_publisher's "
                                                 "numbers). They win over TF; frames in neither use camera_mount.*")

    def __post_init__(self) -> None:
        check(self)
        try:
            parse_extrinsics(self.extrinsics)
        except ExtrinsicsError as exc:
            raise SettingError("cameras.extrinsics", f"cameras.extrinsics: {exc}") from None

    def parsed(self) -> dict[str, np.ndarray]:
        """frame_id -> T_base_cam of the ``extrinsics`` entries."""
        return parse_extrinsics(self.extrinsics)


@dataclass(frozen=True)
class Mount:
    """One camera's extrinsic and where it came from ("parameter", "tf" or "camera_mount")."""

    T: np.ndarray
    source: str


class CameraExtrinsics:
    """The extrinsic of each image frame (see the module docstring). Thread-safe.

    Args:
        default: (4, 4) T_base_cam for frames with no other source (``camera_mount.*``).
        fixed: frame_id -> T_base_cam from ``cameras.extrinsics``.
        lookup: frame_id -> T_base_cam from TF, None when the frame is not (yet) in TF; None: no TF.
        clock: seconds of a monotonic clock (for the TF refresh).
    """

    def __init__(self, default: np.ndarray, fixed: dict[str, np.ndarray] | None = None,
                 lookup: Callable[[str], np.ndarray | None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._default = check_mount(default, "camera_mount.*")
        self._fixed = {k: check_mount(v, f"camera extrinsic of {k}") for k, v in (fixed or {}).items()}
        self._lookup = lookup
        self._clock = clock
        self._tf: dict[str, tuple[float, np.ndarray | None]] = {}  # frame -> (looked up at, T or None)
        self._announced: dict[str, tuple[str, bytes]] = {}  # frame -> (source, T bytes) last logged
        self._capped = False

    @property
    def uses_tf(self) -> bool:
        return self._lookup is not None

    @property
    def default(self) -> np.ndarray:
        return self._default

    def update(self, default: np.ndarray, fixed: dict[str, np.ndarray]) -> None:
        """New ``camera_mount.*`` and ``cameras.extrinsics`` (a parameter change), in force from the next frame."""
        default = check_mount(default, "camera_mount.*")
        fixed = {k: check_mount(v, f"camera extrinsic of {k}") for k, v in fixed.items()}
        with self._lock:
            self._default, self._fixed = default, fixed

    def mount(self, frame_id: str) -> Mount:
        """The extrinsic of the camera whose images carry ``frame_id``."""
        with self._lock:
            if frame_id in self._fixed:
                found = Mount(self._fixed[frame_id], "parameter")
            else:
                T = self._tf_mount(frame_id) if frame_id else None
                found = Mount(T, "tf") if T is not None else Mount(self._default, "camera_mount")
            self._announce(frame_id, found)
            return found

    def _tf_mount(self, frame_id: str) -> np.ndarray | None:
        if self._lookup is None:
            return None
        now = self._clock()
        cached = self._tf.get(frame_id)
        if cached is not None and now - cached[0] < TF_REFRESH_S:
            return cached[1]
        try:
            found = self._lookup(frame_id)
            T = None if found is None else check_mount(found, f"the TF transform to {frame_id}")
        except ExtrinsicsError as exc:
            _logger.warning("camera frame %s: %s; not used", frame_id, exc)
            T = None
        if T is None and cached is not None and cached[1] is not None:
            T = cached[1]  # a transient lookup failure keeps the last good transform
        if len(self._tf) > 1024 and frame_id not in self._tf:  # bounded: frame ids come from the images
            self._tf.clear()
        self._tf[frame_id] = (now, T)
        return T

    def _announce(self, frame_id: str, found: Mount) -> None:
        key = (found.source, found.T.tobytes())
        if self._announced.get(frame_id) == key:
            return
        if frame_id not in self._announced and len(self._announced) >= _MAX_ANNOUNCED:
            if not self._capped:  # frame ids come from the images: a bounded log
                self._capped = True
                _logger.warning("more than %d camera frames seen: the extrinsics of further frames are not logged",
                                _MAX_ANNOUNCED)
            return
        changed = frame_id in self._announced
        self._announced[frame_id] = key
        xyz = ", ".join(f"{v:.3f}" for v in found.T[:3, 3])
        where = {"parameter": "cameras.extrinsics", "tf": "TF",
                 "camera_mount": "camera_mount.* (no cameras.extrinsics entry" +
                                 (", not in TF)" if self._lookup is not None else ")")}[found.source]
        _logger.info("camera frame %r: extrinsic %sfrom %s: position (%s) m in the base frame",
                     frame_id, "changed, now " if changed else "", where, xyz)
