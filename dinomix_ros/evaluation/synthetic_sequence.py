"""A rendered image sequence with exact ground truth: a robot drives around a city block of photo-textured facades.

No public sequence with images, ground-truth poses and a revisit could be stored in test/data (KITTI and TUM images
are not available here; the RTAB-Map corridor has loop labels but no poses), so this module makes one from real
photos: each facade of a known 3-D scene is a vertical rectangle covered by photos (e.g. test/data/lund_gps, street
photos under BSD-2-Clause), and a pinhole RGB-D camera on a robot is rendered exactly along a known trajectory:

* the scene (:class:`BlockScene`): a rectangular block of buildings (its facades face the street) inside a ring of
  buildings across the street (facing it), one photo per panel of about ``panel_width_m``, every photo used once so
  that no two places look alike; a plain floor (with depth) and a plain sky (no depth);
* the trajectory (:func:`block_loop_sequence`): one lap counter-clockwise around the block along a rounded rectangle
  in the middle of the street, then on past the start for ``revisit_m`` (the revisit), with a lateral offset and a
  heading wiggle so that the revisit sees each place from a slightly different pose than the first lap;
* rendering (:meth:`BlockScene.render`): per pixel, the camera ray is intersected with every facade plane and the
  floor (a z-buffer keeps the nearest hit); facades are sampled from a mip-map of their photos (level chosen from the
  pixel's footprint on the wall, blended between two levels) so that far walls do not alias; seeded pixel noise;
* :func:`drifting_odometry`: the robot's odometry: the true motion between frames with a heading bias, a scale error
  and seeded noise, integrated from the first true pose (what a SLAM front end would give a pose graph).

Deterministic: the same photos and :class:`SequenceConfig` give the same images, depths and poses, and frame ``i``
is rendered on demand (:meth:`SyntheticSequence.frame`), so a sequence costs no memory until it is read. Frames are
RGB ``uint8`` (``rgb8``), depths ``float32`` metres (NaN: sky); poses follow REP 103 (base: x forward, y left, z up)
and the camera is mounted on the base by ``CameraMountConfig`` (optical frame: z forward, x right, y down).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.localization.camera_pose import CameraMountConfig

__all__ = ["Facade", "BlockScene", "SequenceConfig", "SyntheticSequence", "OdometryConfig", "block_loop_sequence",
           "distinct_photos", "drifting_odometry", "load_photos", "planar_pose"]

SKY_RGB = (196, 214, 236)
FLOOR_RGB = (118, 116, 112)
_MIP_LEVELS = 6


@dataclass(frozen=True, eq=False)
class Facade:
    """A vertical photo-textured rectangle from ``start`` to ``end`` (x, y in metres), floor to ``height``.

    Its texture runs left to right from ``start`` to ``end`` as seen from the side it faces: the side to the right
    of the direction start -> end (its normal is ``(dy, -dx) / length``).
    """

    start: np.ndarray
    end: np.ndarray
    height: float
    texture: np.ndarray  # (Ht, Wt, 3) uint8 RGB, Ht / height == Wt / length pixels per metre
    mips: list[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.mips:
            self.mips.append(np.ascontiguousarray(self.texture))
            while len(self.mips) < _MIP_LEVELS and min(self.mips[-1].shape[:2]) >= 8:
                self.mips.append(cv2.pyrDown(self.mips[-1]))

    @property
    def length(self) -> float:
        return float(np.linalg.norm(self.end - self.start))

    @property
    def pixels_per_m(self) -> float:
        return self.texture.shape[0] / self.height


class BlockScene:
    """Facades, a floor at z = 0 and a sky; :meth:`render` draws them for one camera pose.

    Args:
        facades: the textured walls.
    """

    def __init__(self, facades: Sequence[Facade]) -> None:
        self.facades = list(facades)
        self._rays: dict[tuple, np.ndarray] = {}

    def _camera_rays(self, camera: CameraModel) -> np.ndarray:
        """(H, W, 3) ray of each pixel centre in the optical frame, z = 1 (so a hit's ray parameter is its depth)."""
        key = (camera.width, camera.height, *np.asarray(camera.K).ravel().tolist())
        if key not in self._rays:
            K = np.asarray(camera.K, dtype=np.float64)
            u, v = np.meshgrid(np.arange(camera.width, dtype=np.float64), np.arange(camera.height, dtype=np.float64))
            x = (u - K[0, 2] - K[0, 1] * (v - K[1, 2]) / K[1, 1]) / K[0, 0]
            self._rays[key] = np.stack([x, (v - K[1, 2]) / K[1, 1], np.ones_like(u)], axis=-1).astype(np.float32)
        return self._rays[key]

    def render(self, T_world_cam: np.ndarray, camera: CameraModel) -> tuple[np.ndarray, np.ndarray]:
        """The view of a pinhole camera (no distortion) at ``T_world_cam`` (optical frame in the world).

        Returns:
            (rgb, depth): (H, W, 3) uint8 RGB and (H, W) float32 depth along the optical axis in metres (NaN: sky).
        """
        rays = self._camera_rays(camera)  # (H, W, 3) optical frame, float32
        R, c = T_world_cam[:3, :3], T_world_cam[:3, 3]
        d = rays @ R.T.astype(np.float32)  # (H, W, 3) world directions, depth-scaled
        focal = float(np.sqrt(camera.K[0, 0] * camera.K[1, 1]))
        depth = np.full(d.shape[:2], np.inf, np.float32)
        owner = np.full(d.shape[:2], -1, dtype=np.int32)  # -2 floor, -1 sky, else the facade
        tex_u = np.zeros(d.shape[:2], np.float32)
        tex_v = np.zeros(d.shape[:2], np.float32)
        footprint = np.zeros(d.shape[:2], np.float32)  # texels per pixel on the hit facade
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = np.where(d[..., 2] < 0, -c[2] / d[..., 2], np.inf).astype(np.float32)  # the floor, z = 0
            floor = np.isfinite(lam) & (lam > 0)
            depth[floor], owner[floor] = lam[floor], -2
            for k, f in enumerate(self.facades):
                e = (f.end - f.start) / f.length  # along the facade (x, y)
                n = np.array([e[1], -e[0]])  # the side it faces
                corners = np.array([[*p, z] for p in (f.start, f.end) for z in (0.0, f.height)])
                if n @ (c[:2] - f.start) <= 0 or np.all((corners - c) @ R[:, 2] <= 0):
                    continue  # seen from behind (the camera is inside the building), or behind the camera
                dn = d[..., 0] * np.float32(n[0]) + d[..., 1] * np.float32(n[1])
                lam = np.float32(n @ (f.start - c[:2])) / dn
                s = (c[0] - f.start[0] + lam * d[..., 0]) * np.float32(e[0]) \
                    + (c[1] - f.start[1] + lam * d[..., 1]) * np.float32(e[1])
                z = np.float32(c[2]) + lam * d[..., 2]
                hit = (lam > 0) & (lam < depth) & (s >= 0) & (s <= f.length) & (z >= 0) & (z <= f.height)
                if not hit.any():
                    continue
                ppm = f.pixels_per_m
                lam_hit = lam[hit]
                depth[hit], owner[hit] = lam_hit, k
                tex_u[hit] = s[hit] * ppm - 0.5
                tex_v[hit] = (f.height - z[hit]) * ppm - 0.5
                # footprint of one pixel on the wall: distance / focal, stretched by 1 / cos(incidence) across it
                dist = lam_hit * np.linalg.norm(d[hit], axis=-1)  # along the ray (|d| is 1 / cos of the ray's angle)
                cos_inc = np.abs(dn[hit]) * lam_hit / dist
                footprint[hit] = dist / focal * ppm / np.sqrt(np.maximum(cos_inc, 0.05))
        rgb = np.empty(d.shape[:2] + (3,), np.uint8)
        rgb[owner == -1] = SKY_RGB
        rgb[owner == -2] = FLOOR_RGB
        for k in np.unique(owner[owner >= 0]):
            sel = owner == k
            rgb[sel] = _sample_mipmap(self.facades[k].mips, tex_u[sel], tex_v[sel], footprint[sel])
        depth[owner == -1] = np.nan
        return rgb, depth


def _sample_mipmap(mips: list[np.ndarray], u: np.ndarray, v: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 colours at texel coordinates (u, v) of level 0, trilinear between the two nearest mip levels."""
    level = np.clip(np.log2(np.maximum(footprint, 1e-6)), 0.0, len(mips) - 1.0)
    lo = np.floor(level).astype(int)
    frac = (level - lo)[:, None]
    out = np.zeros((u.size, 3), np.float32)
    for lv in np.unique(lo):
        for j, w in ((lv, 1.0 - frac), (min(lv + 1, len(mips) - 1), frac)):
            sel = lo == lv
            scale = 0.5 ** j
            mx, my = _as_rows((u[sel] + 0.5) * scale - 0.5), _as_rows((v[sel] + 0.5) * scale - 0.5)
            colour = cv2.remap(mips[j], mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            out[sel] += w[sel] * colour.reshape(-1, 3)[: int(sel.sum())]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _as_rows(x: np.ndarray, width: int = 1024) -> np.ndarray:
    """A flat coordinate array as a (rows, width) float32 map, zero-padded (cv2.remap maps are < 32767 wide)."""
    out = np.zeros(-(-x.size // width) * width, np.float32)
    out[: x.size] = x
    return out.reshape(-1, width)


@dataclass(frozen=True)
class SequenceConfig:
    """The block, the route and the camera of :func:`block_loop_sequence` (lengths in metres)."""

    route_half_x: float = 9.0  # the route: a rounded rectangle centred at the origin
    route_half_y: float = 5.0
    corner_radius: float = 2.0
    street_width: float = 5.0  # facades stand street_width / 2 either side of the route
    facade_height: float = 3.0
    panel_width: float = 4.5  # about one photo per this many metres of facade
    texture_px_per_m: float = 128.0
    step_m: float = 0.6  # distance between frames
    revisit_m: float = 12.0  # driven past the start after the first lap
    frame_period_s: float = 0.5
    revisit_offset_m: float = -0.35  # lateral offset on the revisit (positive: towards the block)
    revisit_ramp_m: float = 6.0  # the offset builds up over the last metres before the start
    yaw_wiggle_rad: float = 0.05  # heading oscillation about the route's direction (amplitude)
    yaw_wiggle_period_m: float = 7.0
    width: int = 640
    height: int = 480
    focal_px: float = 525.0
    camera_forward_m: float = 0.2  # the camera on the robot: forward of the base origin, at this height
    camera_height_m: float = 1.3
    pixel_noise: float = 2.0  # std-dev of seeded Gaussian pixel noise (grey levels)
    start_stamp_ns: int = 1_700_000_000_000_000_000
    seed: int = 0


@dataclass(frozen=True, eq=False)
class SyntheticSequence:
    """A rendered RGB-D sequence with ground truth.

    Attributes:
        scene: what is rendered.
        camera: the pinhole camera (no distortion).
        mount: the camera on the robot (``camera_mount.*``).
        stamps_ns: (N,) int64 frame stamps.
        poses: (N, 4, 4) ground-truth ``T_world_base`` of each frame.
        lap_frames: frames of the first lap; frames from here on revisit the start.
        config: how it was made.
    """

    scene: BlockScene
    camera: CameraModel
    mount: CameraMountConfig
    stamps_ns: np.ndarray
    poses: np.ndarray
    lap_frames: int
    config: SequenceConfig

    def __len__(self) -> int:
        return int(self.stamps_ns.shape[0])

    def frame(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame ``i``: (H, W, 3) uint8 RGB and (H, W) float32 depth in metres (NaN: no return)."""
        rgb, depth = self.scene.render(self.poses[i] @ self.mount.matrix(), self.camera)
        if self.config.pixel_noise > 0:
            rng = np.random.default_rng([self.config.seed, i])
            noisy = rgb + np.float32(self.config.pixel_noise) * rng.standard_normal(rgb.shape, dtype=np.float32)
            rgb = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        return rgb, depth


def load_photos(folder: str | Path, pattern: str = "*.jpg") -> list[np.ndarray]:
    """The photos of ``folder`` (sorted by name) as RGB arrays.

    Raises:
        FileNotFoundError: no photo matches.
    """
    paths = sorted(Path(folder).glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no {pattern} photos in {folder}")
    return [cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for p in paths]


_TEXTURE_FEATURES = 400  # ORB features that tell the textures apart (see distinct_photos)


def distinct_photos(photos: Sequence[np.ndarray], max_inliers: int = 15, side: int = 512) -> list[np.ndarray]:
    """Textures no two of which look like the same place to geometric verification: photos and mirrored photos.

    Consecutive photos of a walk overlap (the same building seen twice), and a scene textured with both would have
    two places that ARE alike: a verified match between them would be right, and the ground truth wrong. Greedily,
    in order, each photo and then its mirror image (ORB descriptors are not mirror-invariant, so the two do not
    verify against each other) is kept when it verifies with fewer than ``max_inliers`` inliers against every
    texture kept so far (400 ORB features, fundamental matrix, ``side`` pixels wide). Unrelated street photos give at
    most ~12 inliers, overlapping ones 27 or more (test/data/lund_gps). The feature count is fixed (where the
    threshold was measured), not the node's default: the scene does not change with ``features.max_features``.
    """
    from dinomix_ros.imaging.features import FeatureConfig, FeatureExtractor
    from dinomix_ros.localization.verification import VerificationConfig, verify_pair

    extractor = FeatureExtractor(FeatureConfig(max_features=_TEXTURE_FEATURES))
    config = VerificationConfig(min_inliers=0, min_inlier_ratio=0.0)
    kept: list[np.ndarray] = []
    features: list = []
    for photo in photos:
        for version in (photo, np.ascontiguousarray(photo[:, ::-1])):
            h, w = version.shape[:2]
            small = cv2.resize(version, (side, max(1, round(side * h / w))), interpolation=cv2.INTER_AREA)
            mine = extractor.extract(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
            if all(verify_pair(mine, other, config).inliers < max_inliers for other in features):
                kept.append(version)
                features.append(mine)
    return kept


def _route_segments(c: SequenceConfig) -> list[tuple[str, float, tuple]]:
    """The rounded rectangle, counter-clockwise from the middle of its bottom side: (kind, length, parameters)."""
    a, b, r = c.route_half_x, c.route_half_y, c.corner_radius
    sx, sy = 2 * (a - r), 2 * (b - r)
    segs: list[tuple[str, float, tuple]] = [("line", a - r, ((0.0, -b), 0.0))]
    corners = [((a - r, -b + r), -math.pi / 2), ((a - r, b - r), 0.0), ((-a + r, b - r), math.pi / 2),
               ((-a + r, -b + r), math.pi)]
    sides = [(((a, -b + r), math.pi / 2), sy), (((a - r, b), math.pi), sx), (((-a, b - r), -math.pi / 2), sy),
             (((-a + r, -b), 0.0), a - r)]
    for (centre, angle0), (line, length) in zip(corners, sides):
        segs.append(("arc", r * math.pi / 2, (centre, angle0)))
        segs.append(("line", length, line))
    return segs


def _route_point(segs: list[tuple[str, float, tuple]], radius: float, s: float) -> tuple[float, float, float]:
    """(x, y, heading) at arc length ``s`` (wraps around the lap)."""
    s = s % sum(seg[1] for seg in segs)
    for kind, length, params in segs:
        if s <= length:
            break
        s -= length
    if kind == "line":
        (x0, y0), heading = params
        return x0 + s * math.cos(heading), y0 + s * math.sin(heading), heading
    (cx, cy), angle0 = params
    angle = angle0 + s / radius
    return cx + radius * math.cos(angle), cy + radius * math.sin(angle), angle + math.pi / 2


def planar_pose(x: float, y: float, yaw: float) -> np.ndarray:
    """(4, 4) pose of a ground robot at (x, y) heading ``yaw``."""
    T = np.eye(4)
    T[:2, :2] = [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]
    T[:2, 3] = (x, y)
    return T


def _facades(c: SequenceConfig, photos: Sequence[np.ndarray]) -> list[Facade]:
    """The block's facades (facing out) and the ring's (facing in), one photo per panel, each photo once."""
    half = c.street_width / 2
    walls = []
    for inset, inward in ((-half, False), (half, True)):  # the block (route shrunk), the ring (route grown)
        ax, ay = c.route_half_x + inset, c.route_half_y + inset
        corners = [(-ax, -ay), (ax, -ay), (ax, ay), (-ax, ay)]  # counter-clockwise: the right-hand side is outside
        if inward:
            corners = corners[::-1]  # clockwise: the right-hand side is inside
        walls += [(np.array(corners[i - 1], float), np.array(corners[i], float)) for i in range(4)]
    panels = [max(1, round(float(np.linalg.norm(e - s)) / c.panel_width)) for s, e in walls]
    if sum(panels) > len(photos):
        raise ValueError(f"the block needs {sum(panels)} photos (one per facade panel), got {len(photos)}: pass more "
                         "photos or make the route smaller")
    height_px = max(8, round(c.facade_height * c.texture_px_per_m))
    facades, used = [], 0
    for (s, e), count in zip(walls, panels):
        width_px = max(8, round(float(np.linalg.norm(e - s)) * c.texture_px_per_m / count))
        strip = [cv2.resize(photos[used + i], (width_px, height_px), interpolation=cv2.INTER_AREA)
                 for i in range(count)]
        used += count
        facades.append(Facade(s, e, c.facade_height, np.ascontiguousarray(np.hstack(strip))))
    return facades


def block_loop_sequence(photos: Sequence[np.ndarray], config: SequenceConfig | None = None) -> SyntheticSequence:
    """One lap around a photo-textured block and a revisit of its start (see the module docstring).

    Args:
        photos: RGB photos, one per facade panel (the default block needs 24), none alike (:func:`distinct_photos`).
        config: the block, route and camera.

    Raises:
        ValueError: too few photos for the block's panels.
    """
    c = config or SequenceConfig()
    segs = _route_segments(c)
    lap_m = sum(seg[1] for seg in segs)
    lap_frames = int(math.ceil(lap_m / c.step_m))
    n = int(math.floor((lap_m + c.revisit_m) / c.step_m)) + 1
    poses = np.empty((n, 4, 4))
    for i in range(n):
        s = i * c.step_m
        x, y, heading = _route_point(segs, c.corner_radius, s)
        ramp = float(np.clip((s - (lap_m - c.revisit_ramp_m)) / c.revisit_ramp_m, 0.0, 1.0))
        offset = c.revisit_offset_m * (3 * ramp ** 2 - 2 * ramp ** 3)  # smooth step
        wiggle = c.yaw_wiggle_rad * math.sin(2 * math.pi * s / c.yaw_wiggle_period_m)
        poses[i] = planar_pose(x - offset * math.sin(heading), y + offset * math.cos(heading), heading + wiggle)
    K = np.array([[c.focal_px, 0.0, (c.width - 1) / 2], [0.0, c.focal_px, (c.height - 1) / 2], [0.0, 0.0, 1.0]])
    stamps = c.start_stamp_ns + np.round(np.arange(n) * c.frame_period_s * 1e9).astype(np.int64)
    mount = CameraMountConfig(x=c.camera_forward_m, z=c.camera_height_m)
    return SyntheticSequence(BlockScene(_facades(c, photos)), CameraModel(c.width, c.height, K), mount, stamps,
                             poses, lap_frames, c)


@dataclass(frozen=True)
class OdometryConfig:
    """How the simulated odometry drifts: per metre driven and per frame (seeded)."""

    yaw_bias_rad_per_m: float = 0.006  # a heading bias (e.g. uneven wheel radii), per metre driven
    scale_error: float = 0.02  # distances read 2 % long
    sigma_xy_m: float = 0.01  # per-frame noise
    sigma_yaw_rad: float = 0.002
    seed: int = 0


def drifting_odometry(poses: np.ndarray, config: OdometryConfig | None = None) -> np.ndarray:
    """(N, 4, 4) odometry poses: the true frame-to-frame motion of ``poses`` (planar) with bias, scale error and
    noise, integrated from ``poses[0]``."""
    c = config or OdometryConfig()
    rng = np.random.default_rng(c.seed)
    out = np.empty_like(poses)
    out[0] = poses[0]
    for i in range(1, len(poses)):
        step = np.linalg.inv(poses[i - 1]) @ poses[i]
        dist = float(np.linalg.norm(step[:2, 3]))
        dyaw = math.atan2(step[1, 0], step[0, 0]) + c.yaw_bias_rad_per_m * dist + rng.normal(0.0, c.sigma_yaw_rad)
        dxy = step[:2, 3] * (1.0 + c.scale_error) + rng.normal(0.0, c.sigma_xy_m, 2)
        out[i] = out[i - 1] @ planar_pose(dxy[0], dxy[1], dyaw)
    return out
