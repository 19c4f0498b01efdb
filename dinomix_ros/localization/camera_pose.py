"""The pose of the current robot from a verified match: keyframe pose composed with the relative camera motion.

A keyframe's pose in the map is the robot's (the pose source's) pose when it was recorded. Verification gives the
motion of the camera between the keyframe and the query (:class:`~dinomix_ros.localization.verification.
Verification`: ``X_q = R X_k + t`` in camera coordinates). With the camera's mount on the robot (``camera_mount.*``:
the optical frame in the base frame, until TF is used) the current robot pose is::

    T_map_base(query) = T_map_base(keyframe) * T_base_cam(keyframe's camera) * inverse([R | t])
                        * inverse(T_base_cam(query's camera))

The middle part, the query's base frame in the keyframe's base frame, is :class:`RelativePose` (what a pose graph
adds as a loop-closure constraint, :func:`relative_base_pose`).

Which case applies (README, "Pose priors"):

* metric (keyframe depths, PnP): full 6-DoF; covariance from the fit: the angular residual over sqrt(inliers),
  times the median depth for the position;
* rotation only (essential matrix or pure rotation, no depth): orientation corrected, position = the keyframe's
  (the translation's scale is unknown), with ``verified_prior.no_depth_sigma_m`` on the position;
* no intrinsics (fundamental matrix) or a keyframe without orientation: the matcher's keyframe prior, unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dinomix_ros.localization.matching import PosePrior
from dinomix_ros.localization.verification import Verification
from dinomix_ros.maps.sources.poses import quat_to_matrix
from dinomix_ros.settings import check, setting

__all__ = ["CameraMountConfig", "VerifiedPriorConfig", "RelativePose", "relative_base_pose", "verified_prior",
           "matrix_to_quat", "rpy_to_matrix"]


@dataclass(frozen=True)
class CameraMountConfig:
    """Where the cameras' optical frame is on the robot (used until TF is): the camera-to-base extrinsic."""

    SETTINGS_GROUP: ClassVar[str] = "camera_mount"

    x: float = setting(0.0, "optical frame origin in the base frame, x (m)", min=-100.0, max=100.0)
    y: float = setting(0.0, "optical frame origin in the base frame, y (m)", min=-100.0, max=100.0)
    z: float = setting(0.0, "optical frame origin in the base frame, z (m)", min=-100.0, max=100.0)
    roll: float = setting(-math.pi / 2, "optical frame orientation in the base frame, roll (rad; the default is a "
                                        "forward-looking camera: optical z forward, x right, y down)",
                          min=-7.0, max=7.0)
    pitch: float = setting(0.0, "optical frame orientation in the base frame, pitch (rad)", min=-7.0, max=7.0)
    yaw: float = setting(-math.pi / 2, "optical frame orientation in the base frame, yaw (rad)", min=-7.0, max=7.0)

    def __post_init__(self) -> None:
        check(self)

    def matrix(self) -> np.ndarray:
        """(4, 4) T_base_cam."""
        T = np.eye(4)
        T[:3, :3] = rpy_to_matrix(self.roll, self.pitch, self.yaw)
        T[:3, 3] = (self.x, self.y, self.z)
        return T


@dataclass(frozen=True)
class VerifiedPriorConfig:
    """Uncertainty of pose priors from verified matches (``verified_prior.*``)."""

    SETTINGS_GROUP: ClassVar[str] = "verified_prior"

    no_depth_sigma_m: float = setting(1.0, "position std-dev of a prior without depth (the keyframe's position: "
                                           "the distance moved is unknown)", positive=True, max=1e4)
    min_sigma_m: float = setting(0.05, "smallest position std-dev of a metric (depth) prior", positive=True,
                                 max=1e3)
    min_sigma_rad: float = setting(0.01, "smallest rotation std-dev of a verified prior", positive=True, max=10.0)
    fit_sigma_gain: float = setting(3.0, "std-devs = gain x fit residual / sqrt(inliers) (x median depth for the "
                                         "position)", positive=True, max=1e3)

    def __post_init__(self) -> None:
        check(self)


def rpy_to_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """R = Rz(yaw) Ry(pitch) Rx(roll) (the URDF / tf2 convention)."""
    cr, sr, cp, sp, cy, sy = math.cos(roll), math.sin(roll), math.cos(pitch), math.sin(pitch), math.cos(yaw), \
        math.sin(yaw)
    return np.array([[cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
                     [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
                     [-sp, cp * sr, cp * cr]])


def matrix_to_quat(R: np.ndarray) -> np.ndarray:
    """Quaternion (x, y, z, w), w >= 0, of a rotation matrix (Shepperd's method, stable for every angle)."""
    m = np.asarray(R, dtype=np.float64)
    tr = np.trace(m)
    if tr > 0:
        s = 2.0 * math.sqrt(tr + 1.0)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * math.sqrt(max(1.0 + m[i, i] - m[j, j] - m[k, k], 1e-300))
        q = [0.0, 0.0, 0.0, (m[k, j] - m[j, k]) / s]
        q[i] = 0.25 * s
        q[j] = (m[j, i] + m[i, j]) / s
        q[k] = (m[k, i] + m[i, k]) / s
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


@dataclass(frozen=True)
class RelativePose:
    """The verified motion between the robot at a keyframe and the robot now: a loop-closure constraint.

    Attributes:
        T: (4, 4) pose of the query's base frame in the keyframe's base frame (``T_kb_qb``).
        covariance: (6, 6) over (x, y, z, rot_x, rot_y, rot_z), ROS order, of a perturbation ``delta`` in the query's
            base frame: ``T_true = T @ exp(delta)``.
        case: "metric" (6-DoF, keyframe depths) or "rotation" (the translation is unknown: ``T`` has the keyframe's
            base position, and the covariance's position block says how far off that can be).
        inliers: the inliers of the model the motion comes from.
    """

    T: np.ndarray
    covariance: np.ndarray
    case: str
    inliers: int


def _camera_motion(verification: Verification) -> np.ndarray:
    """(4, 4) ``T_q_k``: keyframe camera coordinates -> query camera coordinates (translation 0 unless metric)."""
    T_q_k = np.eye(4)
    T_q_k[:3, :3] = verification.R
    if verification.metric:
        T_q_k[:3, 3] = verification.t
    return T_q_k


def relative_base_pose(verification: Verification, keyframe_mount: np.ndarray, query_mount: np.ndarray,
                       config: VerifiedPriorConfig) -> RelativePose | None:
    """The query's base frame in the keyframe's base frame, from the verified camera motion and both cameras' mounts.

    Args:
        verification: the verified relative camera motion (``R``, ``t``; None without intrinsics).
        keyframe_mount: (4, 4) ``T_base_cam`` of the camera that recorded the keyframe.
        query_mount: (4, 4) ``T_base_cam`` of the query's camera.
        config: covariance model.

    Returns:
        The relative pose, None when the verification determined no motion (no intrinsics).
    """
    if verification.R is None:
        return None
    T = np.asarray(keyframe_mount, dtype=np.float64) @ np.linalg.inv(_camera_motion(verification)) \
        @ np.linalg.inv(np.asarray(query_mount, dtype=np.float64))
    inliers = max(verification.inliers, 1)
    residual = verification.error if math.isfinite(verification.error) else 0.0
    angular = config.fit_sigma_gain * residual / math.sqrt(inliers)
    sigma_rot = max(config.min_sigma_rad, angular)
    if verification.metric:
        sigma_pos, case = max(config.min_sigma_m, angular * verification.median_depth_m), "metric"
    else:
        T[:3, 3] = 0.0  # the distance moved is unknown without depth: the keyframe's base position
        sigma_pos, case = config.no_depth_sigma_m, "rotation"
    cov = np.diag([sigma_pos ** 2] * 3 + [sigma_rot ** 2] * 3)  # isotropic blocks: the same in every frame
    return RelativePose(T, cov, case, int(verification.inliers))


def verified_prior(keyframe_prior: PosePrior, verification: Verification, keyframe_mount: np.ndarray,
                   query_mount: np.ndarray, config: VerifiedPriorConfig) -> tuple[PosePrior, str]:
    """The current robot pose from the best keyframe's prior and the verified camera motion.

    Args:
        keyframe_prior: the matcher's prior (the best keyframe's pose, its frame and covariance).
        verification: the verified relative camera motion (``R``, ``t``).
        keyframe_mount: (4, 4) ``T_base_cam`` of the camera that recorded the keyframe.
        query_mount: (4, 4) ``T_base_cam`` of the query's camera.
        config: covariance model.

    Returns:
        (prior, case): case is "metric", "rotation" or "keyframe" (the keyframe prior unchanged; see the module
        docstring).
    """
    if verification.R is None or not np.isfinite(keyframe_prior.orientation).all() \
            or np.allclose(np.diag(keyframe_prior.covariance)[3:], math.pi ** 2):
        return keyframe_prior, "keyframe"
    relative = relative_base_pose(verification, keyframe_mount, query_mount, config)
    T_map_kf = np.eye(4)
    T_map_kf[:3, :3] = quat_to_matrix(np.asarray(keyframe_prior.orientation, dtype=np.float64))
    T_map_kf[:3, 3] = keyframe_prior.position
    T_map_q = T_map_kf @ relative.T
    R_map_q = T_map_q[:3, :3]
    cov = np.zeros((6, 6))  # the relative covariance (query base frame) in the map frame
    cov[:3, :3] = R_map_q @ relative.covariance[:3, :3] @ R_map_q.T
    cov[3:, 3:] = R_map_q @ relative.covariance[3:, 3:] @ R_map_q.T
    return PosePrior(keyframe_prior.frame_id, T_map_q[:3, 3].copy(), matrix_to_quat(R_map_q), cov), relative.case
