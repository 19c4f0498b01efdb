"""Pose-source messages -> (stamp, frame, position, orientation), with the conventions of dinomix_ros.bagio.

``navsatfix`` fixes are projected to UTM (frame ``utm_<zone><band>``, no orientation, an unknown altitude stored as
0 m); fixes without a fix (status < 0) or with NaN coordinates are refused. Poses with a non-finite position are
refused; a non-finite or zero quaternion (position-only sources often send all zeros) means "orientation unknown".
Refusals are ValueErrors the node logs (throttled) before dropping the message.
"""

from __future__ import annotations

import math

import numpy as np
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from sensor_msgs.msg import NavSatFix

from dinomix_ros.maps.sources.geo import latlon_to_utm, utm_frame_id
from dinomix_ros.ros.conversions import time_to_ns

__all__ = ["POSE_TYPES", "pose_from_msg"]

POSE_TYPES = {
    "odometry": Odometry,
    "pose_stamped": PoseStamped,
    "pose_cov": PoseWithCovarianceStamped,
    "navsatfix": NavSatFix,
}

_NAN_QUAT = np.full(4, np.nan)


def pose_from_msg(msg: object, pose_type: str, utm_zone: int | None = None
                  ) -> tuple[int, str, np.ndarray, np.ndarray]:
    """(stamp_ns, frame_id, position (3,), orientation (4,) x y z w or NaN) of one pose-source message.

    Raises:
        ValueError: no GNSS fix, a non-finite position, or an unknown pose type.
    """
    stamp_ns = time_to_ns(msg.header.stamp)
    if pose_type == "navsatfix":
        if msg.status.status < 0 or not (math.isfinite(msg.latitude) and math.isfinite(msg.longitude)):
            raise ValueError(f"NavSatFix without a fix (status {msg.status.status})")
        utm = latlon_to_utm(msg.latitude, msg.longitude, zone=utm_zone)
        alt = msg.altitude if math.isfinite(msg.altitude) else 0.0
        return stamp_ns, utm_frame_id(utm.zone, utm.band), np.array([utm.easting, utm.northing, alt]), _NAN_QUAT
    if pose_type not in POSE_TYPES:
        raise ValueError(f"unknown pose type {pose_type!r}; expected one of {', '.join(POSE_TYPES)}")
    pose = msg.pose if pose_type == "pose_stamped" else msg.pose.pose
    p, q = pose.position, pose.orientation
    position = np.array([p.x, p.y, p.z], dtype=float)
    if not np.isfinite(position).all():
        raise ValueError(f"pose with a non-finite position {position.tolist()}")
    orientation = np.array([q.x, q.y, q.z, q.w], dtype=float)
    norm = float(np.linalg.norm(orientation)) if np.isfinite(orientation).all() else 0.0
    return stamp_ns, msg.header.frame_id, position, orientation / norm if norm > 1e-6 else _NAN_QUAT
