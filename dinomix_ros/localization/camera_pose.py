"""The pose of the current robot from a verified match: keyframe pose composed with the relative camera motion,
and the covariance that comes with it (ROS-free).

A keyframe's pose in the map is the robot's (the pose source's) pose when it was recorded. Verification gives the
motion of the camera between the keyframe and the query (:class:`~dinomix_ros.localization.verification.
Verification`: ``X_q = R X_k + t`` in camera coordinates) and its covariance from the fit. With each camera's mount
on the robot (``T_base_cam``: the optical frame in the base frame, ``camera_mount.*`` until TF is used) the current
robot pose is::

    T_map_base(query) = T_map_base(keyframe) * T_base_cam(keyframe's camera) * inverse([R | t])
                        * inverse(T_base_cam(query's camera))

The middle part, the query's base frame in the keyframe's base frame, is :class:`RelativePose` (what a pose graph
adds as a loop-closure constraint, :func:`relative_base_pose`).

Covariances (see :mod:`.se3` for the conventions): the fit's covariance is over the right perturbation of the query
CAMERA's pose in the keyframe camera's frame; through the query camera's mount it becomes the right perturbation of
the query BASE's pose (the adjoint of ``T_base_cam``), and in the map the position and fixed-axes rotation that a
ROS ``PoseWithCovariance`` states. Floors (``verified_prior.min_sigma_m`` / ``min_sigma_rad``) are added to the
fit's variances (calibration errors, rolling shutter and the like, which the residuals do not show).

Which case applies (README, "Geometric verification and pose priors"):

* metric (keyframe depths, PnP with enough inliers of its own): full 6-DoF, covariance from the PnP fit;
* rotation (intrinsics, no depth: essential matrix, a pure rotation, or a plane whose solutions agree): orientation
  corrected, covariance from the fit; position = the keyframe's (the distance moved is unknown without depth) with
  ``verified_prior.no_depth_sigma_m``;
* keyframe: the matcher's keyframe prior. Without intrinsics nothing is known about the motion; for a plane seen
  without depth whose two solutions disagree in rotation the motion is ambiguous: no orientation is claimed, and the
  orientation covariance grows to cover every solution. Either way the position's covariance gets
  ``no_depth_sigma_m`` on top of the matcher's (the robot moved an unknown distance since the keyframe), so that a
  keyframe prior never claims more than a rotation prior of the same scene.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dinomix_ros.localization.matching import PosePrior
from dinomix_ros.localization.se3 import fixed_axes_covariance, right_covariance_through, so3_log
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
    min_sigma_m: float = setting(0.05, "position std-dev added (in quadrature) to a metric (depth) prior's fit: "
                                       "its smallest position std-dev", positive=True, max=1e3)
    min_sigma_rad: float = setting(0.01, "rotation std-dev added (in quadrature) to a verified prior's fit: its "
                                         "smallest rotation std-dev", positive=True, max=10.0)
    fit_sigma_scale: float = setting(1.0, "the fit's std-devs are multiplied by this (1: the fit's own covariance, "
                                          "calibrated by NEES; raise it for errors the residuals do not show, "
                                          "e.g. a rolling shutter)", positive=True, max=1e3)

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
        covariance: (6, 6) over ``(x, y, z, rot_x, rot_y, rot_z)`` (ROS order) of a perturbation ``delta`` of ``T`` on
            the RIGHT, in the query's base frame: ``T_true = T @ exp(delta)``. For a GTSAM
            ``BetweenFactor<Pose3>(keyframe, query, Pose3(T), noise)``: GTSAM's Pose3 also perturbs on the right (in
            the body frame) but orders the tangent vector ``[rot, trans]``: ``noise =
            Gaussian.Covariance(P @ covariance @ P.T)`` with ``P`` the permutation that swaps the two 3-blocks.
        case: "metric" (6-DoF, keyframe depths), "rotation" (the translation is unknown: ``T`` has the keyframe's
            base position, and the covariance's position block says how far off that can be) or "keyframe" (an
            ambiguous motion: ``T`` is the identity, the keyframe's own pose, with a covariance that covers every
            solution and the unknown distance).
        inliers: the inliers of the model the motion comes from (PnP's own when metric).
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


def _fit_rotation_covariance(verification: Verification) -> np.ndarray:
    """The fit's rotation covariance (query camera frame); a verification made without one (by hand, or by an older
    caller) gets a residual-based guess: the residual over sqrt(inliers)."""
    if verification.rotation_covariance is not None:
        return np.asarray(verification.rotation_covariance, dtype=np.float64)
    error = verification.error if math.isfinite(verification.error) else 0.0
    return np.eye(3) * error ** 2 / max(verification.pose_inliers, 1)


def relative_base_pose(verification: Verification, keyframe_mount: np.ndarray, query_mount: np.ndarray,
                       config: VerifiedPriorConfig) -> RelativePose | None:
    """The query's base frame in the keyframe's base frame, from the verified camera motion and both cameras' mounts.

    Args:
        verification: the verified relative camera motion (``R``, ``t``, covariances; ``R`` None without
            intrinsics or without a motion estimate).
        keyframe_mount: (4, 4) ``T_base_cam`` of the camera that recorded the keyframe.
        query_mount: (4, 4) ``T_base_cam`` of the query's camera.
        config: floors, the fit's scale, the position std-dev without depth.

    Returns:
        The relative pose, None when the verification determined no motion (no intrinsics).
    """
    if verification.R is None:
        return None
    M_k, M_q = (np.asarray(m, dtype=np.float64) for m in (keyframe_mount, query_mount))
    scale2 = config.fit_sigma_scale ** 2
    floors = np.diag([config.min_sigma_m ** 2] * 3 + [config.min_sigma_rad ** 2] * 3)
    no_depth = np.diag([config.no_depth_sigma_m ** 2] * 3 + [0.0] * 3)
    R_q = M_q[:3, :3]
    if verification.ambiguous:
        # two motions explain the matches: the keyframe's pose, with a rotation covariance that covers each of them
        cov = np.zeros((6, 6))
        cov[3:, 3:] = R_q @ _fit_rotation_covariance(verification) @ R_q.T * scale2
        for R in verification.alternatives:
            phi = so3_log(M_k[:3, :3] @ np.asarray(R).T @ R_q.T)  # the solution's rotation of the base
            cov[3:, 3:] += np.outer(phi, phi)
        cov += no_depth + np.diag([0.0] * 3 + [config.min_sigma_rad ** 2] * 3)
        return RelativePose(np.eye(4), cov, "keyframe", int(verification.inliers))
    T = M_k @ np.linalg.inv(_camera_motion(verification)) @ np.linalg.inv(M_q)
    if verification.metric and verification.covariance is not None:
        cov = right_covariance_through(np.asarray(verification.covariance) * scale2, M_q) + floors
        return RelativePose(T, cov, "metric", int(verification.pose_inliers))
    cov = np.zeros((6, 6))
    cov[3:, 3:] = R_q @ _fit_rotation_covariance(verification) @ R_q.T * scale2
    if verification.metric:  # metric without a covariance (made by hand): the residual-based guess, x depth
        depth = verification.median_depth_m if math.isfinite(verification.median_depth_m) else 1.0
        cov[:3, :3] = np.eye(3) * float(np.max(np.linalg.eigvalsh(cov[3:, 3:]))) * depth ** 2
        return RelativePose(T, cov + floors, "metric", int(verification.pose_inliers))
    T[:3, 3] = 0.0  # the distance moved is unknown without depth: the keyframe's base position
    cov += no_depth + np.diag([0.0] * 3 + [config.min_sigma_rad ** 2] * 3)
    return RelativePose(T, cov, "rotation", int(verification.pose_inliers))


def verified_prior(keyframe_prior: PosePrior, verification: Verification, keyframe_mount: np.ndarray,
                   query_mount: np.ndarray, config: VerifiedPriorConfig) -> tuple[PosePrior, str]:
    """The current robot pose from the best keyframe's prior and the verified camera motion.

    Args:
        keyframe_prior: the matcher's prior (the best keyframe's pose, its frame and covariance).
        verification: the verified relative camera motion (``R``, ``t`` and their covariance).
        keyframe_mount: (4, 4) ``T_base_cam`` of the camera that recorded the keyframe.
        query_mount: (4, 4) ``T_base_cam`` of the query's camera.
        config: covariance model.

    Returns:
        (prior, case): case is "metric", "rotation" or "keyframe" (the keyframe's pose; see the module docstring).
    """
    if not np.isfinite(keyframe_prior.orientation).all() \
            or np.allclose(np.diag(keyframe_prior.covariance)[3:], math.pi ** 2):
        return keyframe_prior, "keyframe"  # a keyframe without orientation (GPS maps): nothing to compose with
    T_map_kf = np.eye(4)
    T_map_kf[:3, :3] = quat_to_matrix(np.asarray(keyframe_prior.orientation, dtype=np.float64))
    T_map_kf[:3, 3] = keyframe_prior.position
    relative = relative_base_pose(verification, keyframe_mount, query_mount, config)
    if relative is None or relative.case == "keyframe":
        extra = np.diag([config.no_depth_sigma_m ** 2] * 3 + [0.0] * 3) if relative is None else relative.covariance
        cov = np.asarray(keyframe_prior.covariance, dtype=np.float64) + fixed_axes_covariance(extra, T_map_kf[:3, :3])
        return PosePrior(keyframe_prior.frame_id, np.asarray(keyframe_prior.position, dtype=np.float64).copy(),
                         np.asarray(keyframe_prior.orientation, dtype=np.float64).copy(), cov), "keyframe"
    T_map_q = T_map_kf @ relative.T
    R_map_q = T_map_q[:3, :3]
    cov = fixed_axes_covariance(relative.covariance, R_map_q)
    return PosePrior(keyframe_prior.frame_id, T_map_q[:3, 3].copy(), matrix_to_quat(R_map_q), cov), relative.case
