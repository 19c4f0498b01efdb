"""The rendered sequence is what it claims: a lap around the block and a revisit, depths that put each pixel on the
surface it shows, the same texture at the same 3-D point seen from two poses, deterministic frames, no two facades
alike, and odometry that drifts as configured."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from dinomix_ros.evaluation.synthetic_sequence import (
    OdometryConfig, SequenceConfig, block_loop_sequence, distinct_photos, drifting_odometry, load_photos, planar_pose,
)
from dinomix_ros.localization.verification import rotation_angle_deg


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return load_photos(Path(__file__).resolve().parents[1] / "data" / "lund_gps" / "images")


@pytest.fixture(scope="module")
def sequence(photos):
    return block_loop_sequence(distinct_photos(photos))


def _yaw(T: np.ndarray) -> float:
    return math.atan2(T[1, 0], T[0, 0])


def test_one_lap_then_a_revisit_of_the_start_inside_the_street(sequence) -> None:
    c = sequence.config
    n, lap = len(sequence), sequence.lap_frames
    assert 60 <= n <= 150 and n - lap >= 15
    assert np.all(np.diff(sequence.stamps_ns) == round(c.frame_period_s * 1e9))
    xy = sequence.poses[:, :2, 3]
    steps = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    # even spacing: 0.6 m of route per frame (a chord is a little shorter in a corner; the revisit's outward offset
    # makes its corner's radius, and so its steps, longer by |offset| / radius)
    assert steps.min() > 0.97 * c.step_m and steps.max() < c.step_m * (1 + abs(c.revisit_offset_m) / c.corner_radius)
    # the lap closes: the first revisit frame is next to the start, and every revisit frame near a first-lap frame
    revisit = xy[lap:]
    nearest = np.min(np.linalg.norm(revisit[:, None] - xy[None, :lap], axis=2), axis=1)
    assert np.linalg.norm(xy[lap] - xy[0]) < c.step_m + abs(c.revisit_offset_m)
    assert np.all(nearest <= math.hypot(c.step_m / 2, c.revisit_offset_m) + 1e-6)
    assert np.all(nearest >= abs(c.revisit_offset_m) * 0.9)  # but never on the same spot: a real relative pose
    # the robot stays in the street, clear of the block (its corners are cut by the route's arcs) and the ring
    hx, hy = c.route_half_x - c.street_width / 2, c.route_half_y - c.street_width / 2
    to_block = np.hypot(np.maximum(np.abs(xy[:, 0]) - hx, 0), np.maximum(np.abs(xy[:, 1]) - hy, 0))
    to_ring = np.minimum(hx + c.street_width - np.abs(xy[:, 0]), hy + c.street_width - np.abs(xy[:, 1]))
    assert to_block.min() > 1.2 and to_ring.min() > 1.5
    # planar poses, heading along the route (within the wiggle)
    assert np.allclose(sequence.poses[:, 2, :3], [0, 0, 1]) and np.allclose(sequence.poses[:, :3, 3][:, 2], 0)
    heading = np.arctan2(np.diff(xy[:, 1]), np.diff(xy[:, 0]))
    yaw_off = np.angle(np.exp(1j * (np.array([_yaw(T) for T in sequence.poses[:-1]]) - heading)))
    assert np.abs(yaw_off).max() < c.yaw_wiggle_rad + 0.3  # turns of ~0.3 rad per step in the corners


def _world_points(sequence, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels of frame i with a depth, back-projected: (points (M, 3) world, pixel indices (M, 2), colours)."""
    rgb, depth = sequence.frame(i)
    K = sequence.camera.K
    v, u = np.nonzero(np.isfinite(depth))
    z = depth[v, u].astype(np.float64)
    cam = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z, np.ones_like(z)])
    world = (sequence.poses[i] @ sequence.mount.matrix() @ cam)[:3].T
    return world, np.stack([u, v], axis=1), rgb[v, u]


def test_depth_puts_every_pixel_on_the_floor_or_on_a_facade(sequence) -> None:
    for i in (0, 40, sequence.lap_frames + 5):
        world, _, _ = _world_points(sequence, i)
        on_floor = np.abs(world[:, 2]) < 2e-3
        on_facade = np.zeros(len(world), bool)
        for f in sequence.scene.facades:  # distance to the facade's plane, inside its rectangle
            e = (f.end - f.start) / f.length
            rel = world[:, :2] - f.start
            across = rel @ np.array([e[1], -e[0]])
            along = rel @ e
            on_facade |= (np.abs(across) < 2e-3 * np.maximum(1.0, np.abs(along))) & (along > -1e-3) \
                & (along < f.length + 1e-3) & (world[:, 2] > -1e-3) & (world[:, 2] < f.height + 1e-3)
        assert (on_floor | on_facade).all(), f"frame {i}: {np.sum(~(on_floor | on_facade))} pixels on nothing"
        assert on_facade.mean() > 0.3 and on_floor.mean() > 0.1


def test_a_3d_point_seen_from_the_revisit_has_the_same_texture(sequence) -> None:
    """Frame 0's textured pixels, moved into the first revisit frame by the true poses and depths, land on the same
    colours there (the geometry the verification will measure is the ground truth's)."""
    q = sequence.lap_frames
    world, _, colours = _world_points(sequence, 0)
    rgb_q, depth_q = sequence.frame(q)
    T_cam_world = np.linalg.inv(sequence.poses[q] @ sequence.mount.matrix())
    cam = (T_cam_world[:3, :3] @ world.T).T + T_cam_world[:3, 3]
    K = sequence.camera.K
    front = cam[:, 2] > 0.5
    u = np.rint(K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2]).astype(int)
    v = np.rint(K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2]).astype(int)
    inside = front & (u >= 0) & (u < sequence.camera.width) & (v >= 0) & (v < sequence.camera.height)
    seen = inside.copy()
    seen[inside] = np.abs(depth_q[v[inside], u[inside]] - cam[inside, 2]) < 0.02 * cam[inside, 2]  # not occluded
    assert seen.sum() > 50_000
    textured = seen & (np.abs(colours.astype(int) - [118, 116, 112]).sum(axis=1) > 30)  # facades, not the floor
    diff = np.abs(rgb_q[v[textured], u[textured]].astype(int) - colours[textured].astype(int)).mean(axis=1)
    shuffled = np.abs(rgb_q[v[textured], u[textured]].astype(int)
                      - np.roll(colours[textured].astype(int), 997, axis=0)).mean(axis=1)
    assert np.median(diff) < 12 and np.median(shuffled) > 3 * np.median(diff), (np.median(diff), np.median(shuffled))


def test_frames_are_deterministic(photos, sequence) -> None:
    rgb, depth = sequence.frame(7)
    again = block_loop_sequence(distinct_photos(photos)).frame(7)
    assert np.array_equal(rgb, again[0]) and np.array_equal(depth, again[1], equal_nan=True)
    assert rgb.shape == (480, 640, 3) and rgb.dtype == np.uint8 and depth.dtype == np.float32
    other = block_loop_sequence(distinct_photos(photos), SequenceConfig(seed=1)).frame(7)
    assert not np.array_equal(rgb, other[0]) and np.array_equal(depth, other[1], equal_nan=True)  # noise only


def test_distinct_photos_keeps_one_of_two_photos_of_the_same_place(photos) -> None:
    same_place = distinct_photos([photos[8], photos[9]])  # Lund 09 and 10: 97 verified inliers
    assert len(same_place) == 2  # 09 and its mirror image: 10 looks like 09 either way round
    assert np.array_equal(same_place[0], photos[8]) and np.array_equal(same_place[1], photos[8][:, ::-1])
    assert len(distinct_photos([photos[0], photos[19]])) == 4  # far apart: both, each also mirrored


def test_too_few_photos_is_a_clear_error(photos) -> None:
    with pytest.raises(ValueError, match=r"the block needs 24 photos \(one per facade panel\), got 3"):
        block_loop_sequence(photos[:3])


def test_odometry_drifts_by_its_bias_and_scale(sequence) -> None:
    exact = drifting_odometry(sequence.poses, OdometryConfig(0.0, 0.0, 0.0, 0.0))
    assert np.allclose(exact, sequence.poses, atol=1e-9)
    config = OdometryConfig(yaw_bias_rad_per_m=0.01, scale_error=0.05, sigma_xy_m=0.0, sigma_yaw_rad=0.0)
    odo = drifting_odometry(sequence.poses, config)
    true_steps = np.linalg.norm(np.diff(sequence.poses[:, :2, 3], axis=0), axis=1)
    odo_steps = np.linalg.norm(np.diff(odo[:, :2, 3], axis=0), axis=1)
    assert np.allclose(odo_steps, 1.05 * true_steps)
    heading_error = rotation_angle_deg(sequence.poses[-1][:3, :3].T @ odo[-1][:3, :3])
    expected = math.degrees(0.01 * true_steps.sum()) % 360
    assert abs(heading_error - min(expected, 360 - expected)) < 1e-6
    noisy = drifting_odometry(sequence.poses, OdometryConfig(seed=3))
    assert np.array_equal(noisy, drifting_odometry(sequence.poses, OdometryConfig(seed=3)))
    assert not np.allclose(noisy, drifting_odometry(sequence.poses, OdometryConfig(seed=4)))
    assert np.allclose(planar_pose(1.0, 2.0, 0.5) @ planar_pose(0.0, 0.0, -0.5), planar_pose(1.0, 2.0, 0.0))
