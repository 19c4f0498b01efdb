"""Rotations and rigid motions as the pose code needs them: SO(3) exp/log, skew matrices, the SE(3) adjoint, and
the propagation of a pose covariance through fixed frames (ROS-free).

Conventions used everywhere in :mod:`dinomix_ros.localization`: a perturbation ``xi = (rho, phi)`` (ROS order: the
translation part first, then the rotation vector) of a pose ``T`` is a RIGHT perturbation, in the pose's own frame:
``T_true = T @ exp(xi)``; to first order the position moves by ``R @ rho`` and the orientation by the rotation
vector ``R @ phi`` about the parent frame's (fixed) axes, which is what a ROS ``PoseWithCovariance`` states.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["skew", "skew_batch", "so3_exp", "so3_exp_batch", "so3_log", "rotation_angle", "se3_adjoint", "pose_matrix",
           "right_covariance_through", "fixed_axes_covariance", "mean_rotation"]


def skew(v: np.ndarray) -> np.ndarray:
    """(3, 3) matrix ``[v]x`` with ``[v]x @ w == cross(v, w)``."""
    x, y, z = np.asarray(v, dtype=np.float64).reshape(3).tolist()
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def skew_batch(v: np.ndarray) -> np.ndarray:
    """(N, 3, 3) skew matrices of (N, 3) vectors."""
    v = np.asarray(v, dtype=np.float64)
    out = np.zeros(v.shape[:-1] + (3, 3))
    out[..., 0, 1], out[..., 0, 2] = -v[..., 2], v[..., 1]
    out[..., 1, 0], out[..., 1, 2] = v[..., 2], -v[..., 0]
    out[..., 2, 0], out[..., 2, 1] = -v[..., 1], v[..., 0]
    return out


def so3_exp(phi: np.ndarray) -> np.ndarray:
    """The rotation matrix of rotation vector ``phi`` (Rodrigues)."""
    phi = np.asarray(phi, dtype=np.float64).reshape(3)
    angle = float(np.linalg.norm(phi))
    K = skew(phi)
    if angle < 1e-8:
        return np.eye(3) + K + 0.5 * K @ K
    return np.eye(3) + math.sin(angle) / angle * K + (1.0 - math.cos(angle)) / angle ** 2 * K @ K


def so3_exp_batch(phi: np.ndarray) -> np.ndarray:
    """(K, 3, 3) rotation matrices of (K, 3) rotation vectors (Rodrigues; second order below 1e-8 rad)."""
    phi = np.asarray(phi, dtype=np.float64)
    angle = np.linalg.norm(phi, axis=1)
    small = angle < 1e-8
    a = np.where(small, 1.0, angle)
    c1 = np.where(small, 1.0, np.sin(a) / a)
    c2 = np.where(small, 0.5, (1.0 - np.cos(a)) / (a * a))
    K = skew_batch(phi)
    return np.eye(3) + c1[:, None, None] * K + c2[:, None, None] * (K @ K)


def so3_log(R: np.ndarray) -> np.ndarray:
    """The rotation vector of rotation matrix ``R`` (angle in [0, pi]); stable near 0 and near pi."""
    R = np.asarray(R, dtype=np.float64)
    cos = max(-1.0, min(1.0, (float(np.trace(R)) - 1.0) / 2.0))
    w = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    angle = math.acos(cos)
    if angle < 1e-6:
        return 0.5 * w
    if angle < math.pi - 1e-4:
        return angle / (2.0 * math.sin(angle)) * w
    # near pi: the axis from the symmetric part (R + R^T) / 2 - cos I = (1 - cos) a a^T, its sign from the (small)
    # antisymmetric part w = 2 sin(angle) a
    S = (R + R.T) / 2.0 - cos * np.eye(3)
    i = int(np.argmax(np.diag(S)))
    axis = S[i] / np.linalg.norm(S[i])
    if w @ axis < 0:
        axis = -axis
    return angle * axis


def rotation_angle(R: np.ndarray) -> float:
    """The angle of rotation matrix ``R`` in radians."""
    return float(np.linalg.norm(so3_log(R)))


def pose_matrix(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(4, 4) homogeneous transform of rotation ``R`` and translation ``t``."""
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, np.asarray(t, dtype=np.float64).reshape(3)
    return T


def se3_adjoint(T: np.ndarray) -> np.ndarray:
    """(6, 6) adjoint of ``T`` for perturbations ordered (rho, phi): ``T @ exp(xi) @ inv(T) == exp(Ad @ xi)``."""
    R, p = T[:3, :3], T[:3, 3]
    A = np.zeros((6, 6))
    A[:3, :3], A[3:, 3:] = R, R
    A[:3, 3:] = skew(p) @ R
    return A


def right_covariance_through(cov: np.ndarray, T_outer_inner: np.ndarray) -> np.ndarray:
    """A right-perturbation covariance of ``X`` carried to ``X @ inv(M)``: if ``X_true = X @ exp(xi)`` then
    ``X_true @ inv(M) = (X @ inv(M)) @ exp(Ad(M) @ xi)``; ``T_outer_inner`` is ``M``, e.g. a camera's mount
    ``T_base_cam`` turning a camera pose into a base pose."""
    A = se3_adjoint(T_outer_inner)
    return A @ cov @ A.T


def fixed_axes_covariance(cov: np.ndarray, R: np.ndarray) -> np.ndarray:
    """A right-perturbation covariance (pose frame) as ROS states it: position and rotation about the parent frame's
    fixed axes, to first order ``blockdiag(R, R) @ cov @ blockdiag(R, R).T``."""
    B = np.zeros((6, 6))
    B[:3, :3], B[3:, 3:] = R, R
    return B @ cov @ B.T


def mean_rotation(rotations: list[np.ndarray]) -> np.ndarray:
    """The chordal mean of a few rotations (projection of their sum onto SO(3))."""
    U, _, Vt = np.linalg.svd(np.sum(rotations, axis=0))
    return U @ np.diag([1.0, 1.0, float(np.sign(np.linalg.det(U @ Vt)))]) @ Vt
