"""Pose-source messages -> pose samples: the one parser for the live node and for bags.

ROS-free and duck-typed: rclpy messages and rosbags' dataclasses have the same field names, so the node's pose
subscription and the offline bag reader go through this code and give the same result on the same data (tested
with the same cases both ways).

Sources (:data:`POSE_KINDS`):

* ``odometry`` (nav_msgs/Odometry), ``pose_stamped`` (geometry_msgs/PoseStamped), ``pose_cov``
  (geometry_msgs/PoseWithCovarianceStamped): the position in the header frame; the orientation normalised, or
  unknown (NaN) when it is non-finite or of (near) zero norm: position-only sources often send all zeros.
* ``navsatfix`` (sensor_msgs/NavSatFix): projected to UTM, frame ``utm`` (navsat_transform's frame; the zone is
  :attr:`PoseSample.utm_zone`), position (easting, northing, altitude or 0 m when unknown), orientation unknown; the
  WGS84 fix is kept in :attr:`PoseSample.gps` with the altitude NaN when unknown. Fixes without a fix (status < 0)
  or with non-finite coordinates are refused.

Refused (a :class:`PoseMessageError`, which callers count and skip): non-finite positions and positions beyond
:data:`MAX_ABS_POSITION_M` in any axis (a corrupted or uninitialised pose, e.g. x = 1e300).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dinomix_ros.maps.sources.geo import UTM_FRAME, latlon_to_utm
from dinomix_ros.util.stamps import header_stamp_ns

__all__ = ["POSE_KINDS", "MAX_ABS_POSITION_M", "PoseMessageError", "PoseSample", "pose_from_msg", "kind_of_msgtype"]

#: Pose-source kind -> ROS message type name.
POSE_KINDS: dict[str, str] = {
    "odometry": "nav_msgs/msg/Odometry",
    "pose_stamped": "geometry_msgs/msg/PoseStamped",
    "pose_cov": "geometry_msgs/msg/PoseWithCovarianceStamped",
    "navsatfix": "sensor_msgs/msg/NavSatFix",
}
#: Largest accepted |x|, |y| or |z| in metres: above any UTM coordinate (northings < 1e7 m) and any local map.
MAX_ABS_POSITION_M = 1e8
_MIN_QUAT_NORM = 1e-6
_UNKNOWN_ORIENTATION = np.full(4, np.nan)
_UNKNOWN_ORIENTATION.flags.writeable = False


class PoseMessageError(ValueError):
    """A pose-source message that gives no usable pose (no GNSS fix, a non-finite or absurd position)."""


@dataclass(frozen=True)
class PoseSample:
    """One pose of a pose source.

    Attributes:
        stamp_ns: the header stamp (or the caller's fallback for a zero stamp).
        frame_id: the frame of ``position`` (``utm`` for NavSatFix; may be "" when the header has none).
        position: (3,) metres.
        orientation: (4,) unit quaternion x, y, z, w, or all NaN when unknown.
        gps: (3,) latitude, longitude (degrees), altitude (metres, NaN when unknown) for NavSatFix, else None.
        utm_zone: the UTM zone of ``position`` for NavSatFix (1..60), else 0.
    """

    stamp_ns: int
    frame_id: str
    position: np.ndarray
    orientation: np.ndarray
    gps: np.ndarray | None = None
    utm_zone: int = 0

    @property
    def has_orientation(self) -> bool:
        return bool(np.isfinite(self.orientation).all())


def kind_of_msgtype(msgtype: str) -> str | None:
    """The pose kind of a message type name such as ``nav_msgs/msg/Odometry`` (None when it is not a pose source)."""
    return next((kind for kind, name in POSE_KINDS.items() if name == msgtype), None)


def _checked_position(values: tuple[float, float, float]) -> np.ndarray:
    position = np.array(values, dtype=np.float64)
    if not np.isfinite(position).all():
        raise PoseMessageError(f"pose with a non-finite position {position.tolist()}")
    if np.abs(position).max() > MAX_ABS_POSITION_M:
        raise PoseMessageError(f"pose with an absurd position {position.tolist()} (beyond {MAX_ABS_POSITION_M:g} m "
                               "in an axis): a corrupted or uninitialised pose")
    return position


def _orientation(q: object) -> np.ndarray:
    quat = np.array([q.x, q.y, q.z, q.w], dtype=np.float64)  # type: ignore[attr-defined]
    if not np.isfinite(quat).all():
        return _UNKNOWN_ORIENTATION
    norm = float(np.linalg.norm(quat))
    return quat / norm if norm > _MIN_QUAT_NORM else _UNKNOWN_ORIENTATION


def pose_from_msg(msg: object, kind: str, *, utm_zone: int | None = None,
                  fallback_stamp_ns: int | None = None) -> PoseSample:
    """The pose sample of one pose-source message (see the module docstring for each kind).

    Args:
        msg: an Odometry, PoseStamped, PoseWithCovarianceStamped or NavSatFix message (rclpy or rosbags).
        kind: one of :data:`POSE_KINDS`.
        utm_zone: NavSatFix only: project in this UTM zone (a map's zone) instead of the fix's own.
        fallback_stamp_ns: stamp to use when the header stamp is zero (a driver that does not stamp).

    Raises:
        PoseMessageError: no GNSS fix, a non-finite or absurd position, or an unknown kind.
    """
    if kind not in POSE_KINDS:
        raise PoseMessageError(f"unknown pose type {kind!r}; expected one of {', '.join(POSE_KINDS)}")
    stamp_ns = header_stamp_ns(msg, fallback_stamp_ns)
    if kind == "navsatfix":
        status = int(msg.status.status)  # type: ignore[attr-defined]
        lat, lon, alt = float(msg.latitude), float(msg.longitude), float(msg.altitude)  # type: ignore[attr-defined]
        if status < 0 or not (math.isfinite(lat) and math.isfinite(lon)):
            raise PoseMessageError(f"NavSatFix without a fix (status {status}, lat {lat}, lon {lon})")
        try:
            utm = latlon_to_utm(lat, lon, zone=utm_zone)
        except ValueError as exc:  # outside UTM (polar), or too far from a forced zone
            raise PoseMessageError(f"NavSatFix ({lat}, {lon}) cannot be projected to UTM: {exc}") from None
        known_alt = alt if math.isfinite(alt) else math.nan
        position = _checked_position((utm.easting, utm.northing, known_alt if math.isfinite(known_alt) else 0.0))
        return PoseSample(stamp_ns, UTM_FRAME, position, _UNKNOWN_ORIENTATION, np.array([lat, lon, known_alt]),
                          utm.zone)
    pose = msg.pose if kind == "pose_stamped" else msg.pose.pose  # type: ignore[attr-defined]
    p = pose.position
    position = _checked_position((p.x, p.y, p.z))
    return PoseSample(stamp_ns, str(msg.header.frame_id), position, _orientation(pose.orientation))  # type: ignore
