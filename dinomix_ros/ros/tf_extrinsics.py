"""Camera extrinsics from TF: ``cameras.base_frame`` -> each image's ``header.frame_id`` (a thin, guarded adapter).

:class:`~dinomix_ros.localization.extrinsics.CameraExtrinsics` (ROS-free) calls the lookup this module makes when
it needs a frame's extrinsic (once per frame, then at most every ``TF_REFRESH_S``; it caches). ``tf2_ros`` ships with
every ROS 2 install but is not on PyPI: where it cannot be imported (this project's pip-installed test venvs) the node
logs that once and uses ``cameras.extrinsics`` and ``camera_mount.*`` only. NOT RUN in this project's tests (no
tf2_ros there): the parameter path is what they cover.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dinomix_ros.maps.sources.poses import quat_to_matrix

__all__ = ["tf_lookup"]


def tf_lookup(node: object, base_frame: str) -> tuple[Callable[[str], np.ndarray | None] | None, object, str]:
    """(lookup, listener, why): ``lookup(frame_id)`` gives T_base_cam from TF (None while TF has no such
    transform), or None with ``why`` when TF cannot be used (tf2_ros not importable, or no base frame).

    The listener (keep a reference; it subscribes to /tf and /tf_static on ``node``) is None without TF.
    """
    if not base_frame:
        return None, None, "cameras.base_frame is empty"
    try:
        import rclpy.time
        from tf2_ros import Buffer, TransformException, TransformListener
    except ImportError as exc:
        return None, None, f"tf2_ros cannot be imported ({exc})"
    buffer = Buffer()
    listener = TransformListener(buffer, node)

    def lookup(frame_id: str) -> np.ndarray | None:
        try:  # the latest transform, no waiting: the worker thread must not block here
            t = buffer.lookup_transform(base_frame, frame_id, rclpy.time.Time()).transform
        except TransformException:
            return None
        T = np.eye(4)
        T[:3, :3] = quat_to_matrix(np.array([t.rotation.x, t.rotation.y, t.rotation.z, t.rotation.w]))
        T[:3, 3] = (t.translation.x, t.translation.y, t.translation.z)
        return T

    return lookup, listener, ""
