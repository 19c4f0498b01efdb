"""Synthetic posed image pairs for the pose tests: random 3-D scenes seen by two real camera models (pinhole,
distorted pinhole, fisheye) with pixel noise and outliers, as the LocalFeatures that verification matches.

Descriptors match by construction: each scene point gets a random 32-byte ORB-like descriptor in the keyframe and
the same one with a few flipped bits in the query (Hamming distance <= 12 against ~128 for any other), so descriptor
matching pairs the right keypoints; outliers are query keypoints of a scene point moved to a random pixel (a wrong
match with a perfect descriptor), and unrelated features with random descriptors are added to both images.

A :class:`Pair` carries the truth: the robot's motion in the keyframe's base frame (``T_kb_qb``), each camera's mount
(``T_base_cam``) and the camera motion ``T_q_k`` (keyframe camera coordinates -> query camera coordinates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.imaging.features import LocalFeatures
from dinomix_ros.localization.camera_pose import CameraMountConfig, rpy_to_matrix
from dinomix_ros.localization.se3 import pose_matrix, so3_exp, so3_log

PINHOLE = CameraModel(640, 480, np.array([[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]]))
DISTORTED = CameraModel(640, 480, np.array([[420.0, 0, 322], [0, 421.0, 238], [0, 0, 1]]), "plumb_bob",
                        np.array([-0.28, 0.09, 0.0005, -0.0003, -0.012]))
# the T265's left fisheye (kapture's sensors.txt of test/data/t265_office_bag)
FISHEYE = CameraModel(848, 800, np.array([[284.468, 0, 424.355], [0, 285.51, 393.742], [0, 0, 1]]), "equidistant",
                      np.array([0.0008, 0.031, -0.03, 0.005]))

FRONT = CameraMountConfig(x=0.3, z=0.5).matrix()
REAR = CameraMountConfig(x=-0.4, z=0.5, yaw=math.pi / 2).matrix()  # optical z = base -x
LEFT = CameraMountConfig(y=0.2, z=0.5, yaw=0.0).matrix()  # optical z = base +y


@dataclass
class Pair:
    query: LocalFeatures
    keyframe: LocalFeatures
    cam_q: CameraModel
    cam_k: CameraModel
    mount_q: np.ndarray
    mount_k: np.ndarray
    T_kb_qb: np.ndarray  # the robot's motion: query base in the keyframe base frame
    family: str

    @property
    def T_q_k(self) -> np.ndarray:
        return np.linalg.inv(self.mount_q) @ np.linalg.inv(self.T_kb_qb) @ self.mount_k


def project(camera: CameraModel, X: np.ndarray) -> np.ndarray:
    """Pixels of camera-frame points (N, 3) through the camera's own model (OpenCV's projection)."""
    pts = np.ascontiguousarray(X, dtype=np.float64).reshape(-1, 1, 3)
    zero = np.zeros(3)
    if camera.fisheye:
        uv, _ = cv2.fisheye.projectPoints(pts, zero, zero, camera.K, camera.D)
    else:
        uv, _ = cv2.projectPoints(pts, zero, zero, camera.K, camera.D if camera.D.size else None)
    return uv.reshape(-1, 2)


def _visible(camera: CameraModel, X: np.ndarray, margin: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, mask) of points in front of the camera and inside its image (fisheye: within 80 degrees)."""
    uv = project(camera, X)
    angle = np.arccos(np.clip(X[:, 2] / np.linalg.norm(X, axis=1), -1, 1))
    max_angle = math.radians(80.0) if camera.fisheye else math.radians(75.0)
    ok = (X[:, 2] > 0.05) & (angle < max_angle) & np.isfinite(uv).all(axis=1)
    ok &= (uv[:, 0] > margin) & (uv[:, 0] < camera.width - margin) & (uv[:, 1] > margin) & \
        (uv[:, 1] < camera.height - margin)
    return uv, ok


def _descriptors(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 32), dtype=np.uint8)


def _flip_bits(rng: np.random.Generator, d: np.ndarray, max_bits: int = 12) -> np.ndarray:
    out = d.copy()
    bits = np.unpackbits(out, axis=1)
    for i in range(out.shape[0]):
        idx = rng.choice(256, size=rng.integers(0, max_bits + 1), replace=False)
        bits[i, idx] ^= 1
    return np.packbits(bits, axis=1)


def make_pair(rng: np.random.Generator, points_k: np.ndarray, T_kb_qb: np.ndarray, *, family: str,
              cam_k: CameraModel = PINHOLE, cam_q: CameraModel | None = None, mount_k: np.ndarray | None = None,
              mount_q: np.ndarray | None = None, noise_px: float = 1.0, outliers: float = 0.2,
              depth: str = "none", depth_count: int | None = None, depth_noise: float = 0.005,
              distractors: int = 60, max_points: int = 400) -> Pair:
    """A pair from scene points given in the KEYFRAME CAMERA's frame.

    Args:
        points_k: (M, 3) scene points in the keyframe camera frame.
        T_kb_qb: the robot's motion (query base in the keyframe base frame).
        depth: "none", "all" (every keyframe keypoint has its depth, with ``depth_noise`` relative noise) or "some"
            (``depth_count`` of the matched points have one).
        noise_px: keypoint noise (pixels, both images).
        outliers: fraction of the query's matched keypoints moved to random pixels.
    """
    cam_q = cam_q or cam_k
    mount_k = FRONT if mount_k is None else mount_k
    mount_q = mount_k if mount_q is None else mount_q
    T_q_k = np.linalg.inv(mount_q) @ np.linalg.inv(T_kb_qb) @ mount_k
    Xq = points_k @ T_q_k[:3, :3].T + T_q_k[:3, 3]
    uk, ok_k = _visible(cam_k, points_k)
    uq, ok_q = _visible(cam_q, Xq)
    keep = np.flatnonzero(ok_k & ok_q)[:max_points]
    n = keep.size
    uk = uk[keep] + rng.normal(0.0, noise_px, (n, 2))
    uq = uq[keep] + rng.normal(0.0, noise_px, (n, 2))
    bad = rng.random(n) < outliers
    uq[bad] = np.c_[rng.uniform(0, cam_q.width, bad.sum()), rng.uniform(0, cam_q.height, bad.sum())]
    desc = _descriptors(rng, n)
    depths = np.full(n, np.nan, np.float32)
    z = points_k[keep, 2] * (1.0 + depth_noise * rng.standard_normal(n))
    if depth == "all":
        depths = z.astype(np.float32)
    elif depth == "some":
        chosen = rng.choice(n, size=min(depth_count, n), replace=False)  # outliers may have depths too
        depths[chosen] = z[chosen]
    dk = np.c_[rng.uniform(0, cam_k.width, distractors), rng.uniform(0, cam_k.height, distractors)]
    dq = np.c_[rng.uniform(0, cam_q.width, distractors), rng.uniform(0, cam_q.height, distractors)]
    keyframe = LocalFeatures(np.r_[uk, dk].astype(np.float32), np.r_[desc, _descriptors(rng, distractors)],
                             np.r_[depths, np.full(distractors, np.nan, np.float32)],
                             (cam_k.width, cam_k.height))
    order = rng.permutation(n + distractors)  # the query's features in another order
    query = LocalFeatures(np.r_[uq, dq].astype(np.float32)[order],
                          np.r_[_flip_bits(rng, desc), _descriptors(rng, distractors)][order],
                          np.full(n + distractors, np.nan, np.float32), (cam_q.width, cam_q.height))
    return Pair(query, keyframe, cam_q, cam_k, mount_q, mount_k, T_kb_qb, family)


def box_points(rng: np.random.Generator, n: int, near: float, far: float, spread: float = 1.0) -> np.ndarray:
    """Points in a frustum-like box in front of a camera: depth uniform in 1/z between ``near`` and ``far``."""
    z = 1.0 / rng.uniform(1.0 / far, 1.0 / near, n)
    x = rng.uniform(-spread, spread, n) * z
    y = rng.uniform(-0.75 * spread, 0.75 * spread, n) * z
    return np.c_[x, y, z]


def plane_points(rng: np.random.Generator, n: int, distance: float, tilt: float, size: float = 6.0) -> np.ndarray:
    """Points on a plane ``distance`` ahead whose normal is tilted by ``tilt`` (rad) about the camera's y axis."""
    normal = np.array([math.sin(tilt), 0.0, -math.cos(tilt)])  # towards the camera
    a = rng.uniform(-size, size, (n, 2))
    e1 = np.array([math.cos(tilt), 0.0, math.sin(tilt)])
    e2 = np.array([0.0, 1.0, 0.0])
    return np.array([0.0, 0.0, distance]) + a[:, :1] * e1 + 0.75 * a[:, 1:] * e2 + 0.0 * normal


def robot_motion(yaw: float, forward: float, left: float, up: float = 0.0, roll: float = 0.0,
                 pitch: float = 0.0) -> np.ndarray:
    """``T_kb_qb`` of a robot that moved (base frame: x forward, y left, z up) and turned."""
    return pose_matrix(rpy_to_matrix(roll, pitch, yaw), np.array([forward, left, up]))


def motion_error(T_est: np.ndarray, T_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rho, phi): the true pose as a right perturbation of the estimate, ``T_true = T_est @ exp(xi)`` (first order
    in the translation)."""
    R = T_est[:3, :3]
    return R.T @ (T_true[:3, 3] - T_est[:3, 3]), so3_log(R.T @ T_true[:3, :3])


def map_error(position: np.ndarray, R_est: np.ndarray, T_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position and fixed-axes rotation error of a map-frame prior (what a ROS covariance describes)."""
    return T_true[:3, 3] - position, so3_log(T_true[:3, :3] @ R_est.T)


def nees(error: np.ndarray, cov: np.ndarray) -> float:
    return float(error @ np.linalg.solve(cov, error))


def sigma_along(error: np.ndarray, cov: np.ndarray) -> float:
    """How many std-devs off the estimate is along its error's direction."""
    norm = float(np.linalg.norm(error))
    if norm == 0:
        return 0.0
    u = error / norm
    return norm / math.sqrt(float(u @ cov @ u))


def random_rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    axis = rng.normal(size=3)
    return so3_exp(axis / np.linalg.norm(axis) * rng.uniform(0, max_angle))


# ---------------------------------------------------------------------------------------------- the NEES families

def _noise(rng: np.random.Generator) -> dict:
    return {"noise_px": float(rng.uniform(0.5, 1.5)), "outliers": float(rng.uniform(0.1, 0.3))}


def family_pair(name: str, seed: int) -> Pair:
    """One seeded pair of a NEES family (see test_pose_nees.py for what each family is)."""
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    base = CameraMountConfig().matrix()  # a camera at the base origin (forward-looking)
    if name.startswith("near"):  # a 3-D scene 2-10 m ahead, a general motion
        pts = box_points(rng, 700, 2.0, 10.0)
        T = robot_motion(rng.uniform(-0.3, 0.3), rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0),
                         rng.uniform(-0.1, 0.1), roll=rng.uniform(-0.05, 0.05), pitch=rng.uniform(-0.05, 0.05))
        return make_pair(rng, pts, T, family=name, depth="all" if name.endswith("depth") else "none", **_noise(rng))
    if name.startswith("far"):  # 30-120 m away, the robot moved 0.5 m sideways (the far scene)
        pts = box_points(rng, 700, 30.0, 120.0)
        T = robot_motion(rng.uniform(-0.2, 0.2), 0.0, 0.5 * rng.choice([-1.0, 1.0]))
        return make_pair(rng, pts, T, family=name, **_noise(rng))
    if name.startswith("plane"):  # a wall 3 m ahead (facing, or tilted 20-45 degrees), moving sideways
        tilt = 0.0 if "facing" in name else rng.uniform(0.35, 0.8) * rng.choice([-1.0, 1.0])
        pts = plane_points(rng, 900, 3.0, tilt)
        T = robot_motion(rng.uniform(-0.1, 0.1), rng.uniform(-0.2, 0.2), 0.5 * rng.choice([-1.0, 1.0]))
        return make_pair(rng, pts, T, family=name, mount_k=base, depth="all" if name.endswith("depth") else "none",
                         **_noise(rng))
    if name == "pure_rotation":  # the camera only turned (about its own centre)
        pts = box_points(rng, 700, 2.0, 50.0)
        T = robot_motion(rng.uniform(-0.4, 0.4), 0.0, 0.0, roll=rng.uniform(-0.1, 0.1), pitch=rng.uniform(-0.1, 0.1))
        return make_pair(rng, pts, T, family=name, mount_k=base, **_noise(rng))
    if name == "forward":
        pts = box_points(rng, 700, 3.0, 15.0)
        T = robot_motion(rng.uniform(-0.1, 0.1), rng.uniform(0.5, 1.5), rng.uniform(-0.1, 0.1))
        return make_pair(rng, pts, T, family=name, **_noise(rng))
    if name == "sideways":
        pts = box_points(rng, 700, 2.0, 8.0)
        T = robot_motion(rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1), rng.uniform(0.5, 1.0) * rng.choice([-1, 1]))
        return make_pair(rng, pts, T, family=name, **_noise(rng))
    if name == "few_pnp":  # keyframe depths for only 7-13 of the matched points
        pts = box_points(rng, 700, 2.0, 8.0)
        T = robot_motion(rng.uniform(-0.3, 0.3), rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0))
        return make_pair(rng, pts, T, family=name, depth="some", depth_count=int(rng.integers(7, 14)), **_noise(rng))
    if name.startswith("cross_camera"):  # a rear keyframe matched by the front camera: the robot turned around
        pts_world = box_points(rng, 700, 2.0, 10.0)  # seen by the rear camera at the keyframe
        T = robot_motion(math.pi + rng.uniform(-0.3, 0.3), rng.uniform(-1.6, -0.6), rng.uniform(-0.5, 0.5))
        return make_pair(rng, pts_world, T, family=name, mount_k=REAR, mount_q=FRONT,
                         depth="all" if name.endswith("depth") else "none", **_noise(rng))
    if name.startswith("side_camera"):  # the left camera, the robot drove on (forward for the camera: sideways)
        pts = box_points(rng, 700, 2.0, 10.0)
        T = robot_motion(rng.uniform(-0.3, 0.3), rng.uniform(-1.0, 1.0), rng.uniform(-0.3, 0.3))
        return make_pair(rng, pts, T, family=name, mount_k=LEFT, depth="all" if name.endswith("depth") else "none",
                         **_noise(rng))
    if name.startswith("fisheye"):  # the T265's fisheye, 3-D scene, general motion
        pts = box_points(rng, 900, 1.5, 8.0, spread=2.5)
        T = robot_motion(rng.uniform(-0.3, 0.3), rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8))
        return make_pair(rng, pts, T, family=name, cam_k=FISHEYE, depth="all" if name.endswith("depth") else "none",
                         **_noise(rng))
    if name.startswith("distorted"):  # a pinhole with strong radial distortion
        pts = box_points(rng, 700, 2.0, 10.0)
        T = robot_motion(rng.uniform(-0.3, 0.3), rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0))
        return make_pair(rng, pts, T, family=name, cam_k=DISTORTED, depth="all" if name.endswith("depth") else "none",
                         **_noise(rng))
    raise ValueError(name)


FAMILIES = ("near", "near_depth", "far", "plane_facing", "plane_facing_depth", "plane_tilted", "plane_tilted_depth",
            "pure_rotation", "forward", "sideways", "few_pnp", "cross_camera", "cross_camera_depth", "side_camera",
            "side_camera_depth", "fisheye", "fisheye_depth", "distorted", "distorted_depth")
