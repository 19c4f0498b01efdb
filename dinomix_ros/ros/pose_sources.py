"""Pose-source messages -> (stamp, frame, position, orientation), the same conventions as dinomix_ros.bagio.

``navsatfix`` fixes are projected to UTM (frame ``utm_<zone><band>``, no orientation); fixes without a fix
(status < 0) or with NaN coordinates are refused with a ValueError.
"""

from __future__ import annotations

import math

import numpy as np
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from sensor_msgs.msg import NavSatFix

from dinomix_ros.geo import latlon_to_utm

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
    """(stamp_ns, frame_id, position (3,), orientation (4,) x y z w or NaN) of one pose-source message."""
    stamp_ns = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
    if pose_type == "navsatfix":
        if msg.status.status < 0 or not (math.isfinite(msg.latitude) and math.isfinite(msg.longitude)):
            raise ValueError(f"NavSatFix without a fix (status {msg.status.status})")
        utm = latlon_to_utm(msg.latitude, msg.longitude, zone=utm_zone)
        alt = msg.altitude if math.isfinite(msg.altitude) else 0.0
        return stamp_ns, f"utm_{utm.zone}{utm.band}", np.array([utm.easting, utm.northing, alt]), _NAN_QUAT
    if pose_type not in POSE_TYPES:
        raise ValueError(f"unknown pose type {pose_type!r}; expected one of {', '.join(POSE_TYPES)}")
    pose = msg.pose if pose_type == "pose_stamped" else msg.pose.pose
    p, q = pose.position, pose.orientation
    return (stamp_ns, msg.header.frame_id, np.array([p.x, p.y, p.z], dtype=float),
            np.array([q.x, q.y, q.z, q.w], dtype=float))
