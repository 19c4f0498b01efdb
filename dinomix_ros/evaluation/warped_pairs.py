"""Known-motion pairs: a real image and the view a camera moved by a known motion would see (ROS-free).

Used by :func:`~dinomix_ros.evaluation.posed_pairs.render_pair` for the rows of a posed-pairs file whose query is
rendered:

* ``rotation_warp``: the camera turns in place; the query is the image warped by ``H = K R K^-1``, exact for any
  scene (no parallax);
* ``plane_warp``: the image is taken as a textured plane (``n . X = d`` in the keyframe camera, distance
  ``plane_distance_m``, normal tilted by ``plane_tilt_rad`` about the camera's y axis); the query is
  ``H = K (R + t n^T / d) K^-1`` and the keyframe's depth is the plane's;
* ``depth_warp``: the keyframe's measured depth (an RGB-D frame) is the scene: its points are moved into the query
  camera (z-buffered), and the query image is sampled back from the keyframe through them; surfaces hidden in the
  keyframe (disocclusions) and points without depth are left out and in-painted, so the pair has real 3-D structure,
  parallax and occlusions.

The rendered view has the keyframe's camera. Only pinhole cameras without distortion can be warped this way.
"""

from __future__ import annotations

import cv2
import numpy as np

from dinomix_ros.imaging.camera import CameraModel

__all__ = ["WARP_KINDS", "render_view", "rotation_view", "plane_view", "depth_view"]

WARP_KINDS = ("rotation_warp", "plane_warp", "depth_warp")

_MIN_Z = 0.05  # points closer to the query camera than this (metres) are not rendered
_HOLE_FILL_PX = 5  # a min filter of this size closes the cracks of forward-splatted depth


def _pinhole(cam: CameraModel) -> np.ndarray:
    if cam.fisheye or (cam.D.size and np.any(cam.D)):
        raise ValueError(f"only a pinhole camera without distortion can be warped (got {cam.distortion_model} "
                         f"{cam.D.tolist()})")
    return cam.K


def rotation_view(gray: np.ndarray, K: np.ndarray, R: np.ndarray) -> np.ndarray:
    """The image a camera turned by ``R`` (``X_q = R X_k``) sees."""
    h, w = gray.shape
    return cv2.warpPerspective(gray, K @ R @ np.linalg.inv(K), (w, h), flags=cv2.INTER_LINEAR)


def _plane_normal(tilt: float) -> np.ndarray:
    return np.array([np.sin(tilt), 0.0, np.cos(tilt)])


def plane_view(gray: np.ndarray, K: np.ndarray, R: np.ndarray, t: np.ndarray, distance: float,
               tilt: float) -> tuple[np.ndarray, np.ndarray]:
    """(query image, keyframe depth in metres) when the keyframe image is a plane ``n . X = distance``."""
    h, w = gray.shape
    n = _plane_normal(tilt)
    H = K @ (R + np.outer(t, n) / distance) @ np.linalg.inv(K)
    query = cv2.warpPerspective(gray, H, (w, h), flags=cv2.INTER_LINEAR)
    u, v = np.meshgrid(np.arange(w), np.arange(h))
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1]], axis=-1)
    denom = rays @ n[:2] + n[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.where(denom > 1e-6, distance / denom, np.nan).astype(np.float32)
    return query, depth


def depth_view(gray: np.ndarray, depth: np.ndarray, K: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The image the camera moved by ``(R, t)`` sees of the scene the keyframe's depth describes."""
    h, w = gray.shape
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    v, u = np.mgrid[0:h, 0:w]
    valid = np.isfinite(depth) & (depth > 0)
    z = depth[valid].astype(np.float64)
    P = np.stack([(u[valid] - cx) / fx * z, (v[valid] - cy) / fy * z, z], axis=1)
    Q = P @ R.T + t
    front = Q[:, 2] > _MIN_Z
    Q = Q[front]
    iu = np.rint(fx * Q[:, 0] / Q[:, 2] + cx).astype(np.int64)
    iv = np.rint(fy * Q[:, 1] / Q[:, 2] + cy).astype(np.int64)
    inside = (iu >= 0) & (iu < w) & (iv >= 0) & (iv < h)
    zq = np.full(h * w, np.inf)
    np.minimum.at(zq, iv[inside] * w + iu[inside], Q[inside, 2])  # z-buffer: the nearest surface wins
    zq = zq.reshape(h, w).astype(np.float32)
    closed = cv2.erode(np.where(np.isfinite(zq), zq, np.float32(1e9)), np.ones((_HOLE_FILL_PX,) * 2, np.uint8))
    zq = np.where(np.isfinite(zq), zq, np.where(closed < 1e8, closed, np.inf)).astype(np.float32)
    has = np.isfinite(zq)
    # back to the keyframe: X_k = R^T (X_q - t), sampled bilinearly where the query pixel sees a surface
    zs = np.where(has, zq, np.float32(1.0))
    Xq = np.stack([(u - cx) / fx * zs, (v - cy) / fy * zs, zs], axis=-1)
    Xk = (Xq - t) @ R
    with np.errstate(divide="ignore", invalid="ignore"):
        map_x = (fx * Xk[..., 0] / Xk[..., 2] + cx).astype(np.float32)
        map_y = (fy * Xk[..., 1] / Xk[..., 2] + cy).astype(np.float32)
    map_x[~has], map_y[~has] = -1.0, -1.0
    query = cv2.remap(gray, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    holes = (~has).astype(np.uint8)
    return cv2.inpaint(query, holes, 3, cv2.INPAINT_TELEA) if holes.any() else query


def render_view(kind: str, gray: np.ndarray, camera: CameraModel, depth: np.ndarray | None, T_q_k: np.ndarray, *,
                plane_distance_m: float = 3.0, plane_tilt_rad: float = 0.0) -> tuple[np.ndarray, np.ndarray | None]:
    """(query image, keyframe depth) of a known-motion pair: the view the camera moved by ``T_q_k`` sees.

    Args:
        kind: ``rotation_warp``, ``plane_warp`` or ``depth_warp`` (see the module docstring).
        gray: the real (keyframe) image.
        camera: its camera (pinhole, no distortion); the rendered view has the same one.
        depth: its depth in metres (NaN unknown): required by ``depth_warp``, replaced by the plane's for
            ``plane_warp``, passed through otherwise.
        T_q_k: the motion, keyframe camera -> query camera (its translation must be 0 for ``rotation_warp``).
        plane_distance_m, plane_tilt_rad: the plane of ``plane_warp``.

    Raises:
        ValueError: a distorted camera, a translation for a rotation warp, a depth warp without depth.
    """
    K = _pinhole(camera)
    R, t = T_q_k[:3, :3], T_q_k[:3, 3]
    if kind == "rotation_warp":
        if np.linalg.norm(t) > 1e-9:
            raise ValueError(f"a rotation warp cannot move the camera (t = {t.tolist()})")
        return rotation_view(gray, K, R), depth
    if kind == "plane_warp":
        if not plane_distance_m > 0:
            raise ValueError(f"plane_distance_m must be positive, got {plane_distance_m}")
        return plane_view(gray, K, R, t, plane_distance_m, plane_tilt_rad)
    if kind == "depth_warp":
        if depth is None:
            raise ValueError("a depth warp needs the keyframe's depth (keyframe_depth)")
        return depth_view(gray, depth, K, R, t), depth
    raise ValueError(f"unknown warp {kind!r}; expected one of {', '.join(WARP_KINDS)}")
