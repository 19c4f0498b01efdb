"""Tests for dinomix_ros.maps.sources.poses: quaternion helpers, PoseTrack interpolation, the keyframe gate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dinomix_ros.maps.sources.poses import (
    KeyframeGate,
    KeyframeGateConfig,
    PoseTrack,
    PoseTrackError,
    quat_angle,
    quat_normalize,
    quat_slerp,
    quat_to_matrix,
    quat_to_yaw,
    select_keyframes,
    yaw_to_quat,
)

T0 = 1_700_000_000_123_456_789  # a realistic ROS epoch stamp in ns (float64 resolves it only to 256 ns)
NS = 1_000_000_000


# --- independent rotation construction (axis-angle / Rodrigues, no quaternions) -----------------------------------


def _rodrigues(axis_angle: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(axis_angle)
    if angle < 1e-15:
        return np.eye(3)
    k = axis_angle / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def _log_so3(r: np.ndarray) -> np.ndarray:
    angle = math.acos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))
    if angle < 1e-12:
        return np.zeros(3)
    w = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2 * math.sin(angle))
    return w * angle


def _quat_from_axis_angle(axis_angle: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(axis_angle)
    axis = axis_angle / angle if angle > 0 else np.array([1.0, 0.0, 0.0])
    return np.concatenate([axis * math.sin(angle / 2), [math.cos(angle / 2)]])


def _random_quats(rng: np.random.Generator, n: int) -> np.ndarray:
    q = rng.normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


# --- quaternion helpers --------------------------------------------------------------------------------------------


def test_quat_to_matrix_matches_rodrigues(rng):
    for _ in range(20):
        aa = rng.normal(size=3)
        aa *= rng.uniform(0, math.pi) / np.linalg.norm(aa)
        np.testing.assert_allclose(quat_to_matrix(_quat_from_axis_angle(aa)), _rodrigues(aa), atol=1e-14)
    r = quat_to_matrix(_random_quats(rng, 50) * 3.0)  # not normalised on input
    np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(3), r.shape), atol=1e-14)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-13)


def test_slerp_matches_relative_axis_interpolation(rng):
    q0s, q1s = _random_quats(rng, 30), _random_quats(rng, 30)
    ts = np.array([0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
    for q0, q1 in zip(q0s, q1s):
        r0, r1 = quat_to_matrix(q0), quat_to_matrix(q1)
        w = _log_so3(r0.T @ r1)  # relative rotation about one axis, angle <= pi: the shortest path
        got = quat_to_matrix(quat_slerp(np.broadcast_to(q0, (6, 4)), np.broadcast_to(q1, (6, 4)), ts))
        expected = np.stack([r0 @ _rodrigues(t * w) for t in ts])
        np.testing.assert_allclose(got, expected, atol=1e-12)
        # q1 and -q1 are the same rotation: same interpolation
        np.testing.assert_allclose(quat_to_matrix(quat_slerp(q0, -q1, 0.3)), r0 @ _rodrigues(0.3 * w), atol=1e-12)


def test_slerp_endpoints_near_parallel_and_opposite_sign():
    q0 = yaw_to_quat(0.4)
    q1 = yaw_to_quat(1.4)
    np.testing.assert_allclose(quat_slerp(q0, q1, 0.0), q0, atol=1e-15)
    np.testing.assert_allclose(quat_slerp(q0, q1, 1.0), q1, atol=1e-15)
    np.testing.assert_allclose(quat_slerp(q0, q1, 0.25), yaw_to_quat(0.65), atol=1e-15)
    # near-parallel: nlerp fallback, still exact to double precision
    q2 = yaw_to_quat(0.4 + 1e-9)
    assert quat_to_yaw(quat_slerp(q0, q2, 0.5)) == pytest.approx(0.4 + 0.5e-9, abs=1e-15)
    np.testing.assert_allclose(quat_slerp(q0, q0, 0.7), q0, atol=1e-15)
    # q and -q: no 360-degree detour
    np.testing.assert_allclose(np.abs(quat_slerp(q0, -q0, 0.5)), np.abs(q0), atol=1e-15)
    # broadcasting one pair over many t
    out = quat_slerp(q0, q1, np.linspace(0, 1, 11))
    assert out.shape == (11, 4)
    np.testing.assert_allclose(quat_to_yaw(out), 0.4 + np.linspace(0, 1, 11), atol=1e-14)


def test_quat_angle(rng):
    assert quat_angle(yaw_to_quat(0.1), yaw_to_quat(0.4)) == pytest.approx(0.3, abs=1e-15)
    assert quat_angle(yaw_to_quat(0.1), -yaw_to_quat(0.1)) == pytest.approx(0.0, abs=1e-15)
    assert quat_angle(yaw_to_quat(-3.0), yaw_to_quat(3.0)) == pytest.approx(2 * math.pi - 6.0, abs=1e-14)
    assert quat_angle(np.array([0, 0, 0, 1.0]), np.array([1.0, 0, 0, 0])) == pytest.approx(math.pi, abs=1e-15)
    assert quat_angle(yaw_to_quat(0.0), yaw_to_quat(1e-9)) == pytest.approx(1e-9, rel=1e-9)  # arccos would give 0
    q0, q1 = _random_quats(rng, 100), _random_quats(rng, 100)
    r_rel = np.swapaxes(quat_to_matrix(q0), -1, -2) @ quat_to_matrix(q1)
    expected = np.arccos(np.clip((np.trace(r_rel, axis1=1, axis2=2) - 1) / 2, -1, 1))
    np.testing.assert_allclose(quat_angle(q0, q1), expected, atol=1e-7)  # arccos is the imprecise side here


def test_yaw_round_trip_and_tilted_yaw(rng):
    yaw = rng.uniform(-math.pi + 1e-9, math.pi, 1000)
    np.testing.assert_allclose(quat_to_yaw(yaw_to_quat(yaw)), yaw, atol=1e-14)
    assert quat_to_yaw(yaw_to_quat(math.pi)) == pytest.approx(math.pi, abs=1e-15)
    # with roll and pitch, yaw is the heading of the rotated x axis (ZYX convention)
    q = _random_quats(rng, 100)
    r = quat_to_matrix(q)
    np.testing.assert_allclose(quat_to_yaw(q), np.arctan2(r[:, 1, 0], r[:, 0, 0]), atol=1e-12)


def test_quat_normalize_nan_rows_and_errors():
    q = np.array([[0, 0, 0, 2.0], [np.nan, 0, 0, 1.0]])
    out = quat_normalize(q)
    np.testing.assert_array_equal(out[0], [0, 0, 0, 1.0])
    assert np.all(np.isnan(out[1]))
    with pytest.raises(ValueError, match=r"zero norm"):
        quat_normalize(np.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(3,\); expected \(\.\.\., 4\)"):
        quat_normalize(np.zeros(3))


# --- PoseTrack -----------------------------------------------------------------------------------------------------

RADIUS, OMEGA, CLIMB = 5.0, 0.5, 0.1  # m, rad/s, m/s


def _circle(t_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Analytic pose on a helix: position and heading (tangent direction)."""
    pos = np.stack([RADIUS * np.cos(OMEGA * t_s), RADIUS * np.sin(OMEGA * t_s), CLIMB * t_s], axis=1)
    return pos, OMEGA * t_s + math.pi / 2


def _circle_track(step_ns: int = 100_000_000, n: int = 101) -> PoseTrack:
    stamps = T0 + np.arange(n, dtype=np.int64) * step_ns
    pos, yaw = _circle((stamps - T0) / NS)
    return PoseTrack(stamps, pos, yaw_to_quat(yaw), frame_id="odom")


def test_interpolate_circle_knots_and_between(rng):
    track = _circle_track()
    assert len(track) == 101 and track.span == (T0, T0 + 10 * NS) and track.frame_id == "odom"
    res = track.interpolate(track.stamps_ns, max_gap_s=0.1)
    assert res.valid.all() and np.all(res.gap_s == 0.0) and len(res) == 101
    np.testing.assert_allclose(res.positions, track.positions, atol=1e-9)
    np.testing.assert_allclose(res.orientations, track.orientations, atol=1e-9)
    offsets = np.sort(rng.integers(0, 10 * NS, 500)).astype(np.int64)
    res = track.interpolate(T0 + offsets, max_gap_s=0.1)
    assert res.valid.all()
    pos, yaw = _circle(offsets / NS)
    # chord error of linear interpolation on a circle: r (1 - cos(w dt / 2)) <= r (w dt)^2 / 8
    chord = RADIUS * (OMEGA * 0.1) ** 2 / 8
    err = np.linalg.norm(res.positions - pos, axis=1)
    assert err.max() <= chord * 1.0001 and err.max() > chord * 0.5
    # constant-rate rotation about one axis: slerp is exact
    dyaw = (quat_to_yaw(res.orientations) - yaw + math.pi) % (2 * math.pi) - math.pi
    assert np.abs(dyaw).max() < 1e-9
    dt_ns = offsets % 100_000_000
    np.testing.assert_allclose(res.gap_s, np.minimum(dt_ns, 100_000_000 - dt_ns) / NS, atol=1e-12)


def test_interpolate_validity_at_holes_and_ends():
    stamps = T0 + np.arange(0, 50, dtype=np.int64) * 100_000_000  # 0 .. 4.9 s at 10 Hz
    keep = (stamps < T0 + 2 * NS) | (stamps >= T0 + 3 * NS)  # hole from 1.9 s to 3.0 s
    pos = np.column_stack([np.arange(50.0), np.zeros(50), np.zeros(50)])
    track = PoseTrack(stamps[keep], pos[keep])
    q = T0 + np.array([-200, -100, 0, 1850, 1950, 2500, 2950, 3000, 4900, 5000, 5100], dtype=np.int64) * 1_000_000
    res = track.interpolate(q, max_gap_s=0.15)
    expected_valid = [False, True, True, True, False, False, False, True, True, True, False]
    np.testing.assert_array_equal(res.valid, expected_valid)
    np.testing.assert_allclose(res.positions[res.valid, 0], [0, 0, 18.5, 30, 49, 49], atol=1e-12)
    assert np.all(np.isnan(res.positions[~res.valid]))
    np.testing.assert_allclose(res.gap_s, [0.2, 0.1, 0, 0.05, 0.05, 0.5, 0.05, 0, 0, 0.1, 0.2], atol=1e-12)
    # one pose after the end by 0.2 s: valid with a larger tolerance, and the end pose is used as is
    res = track.interpolate(np.array([T0 + 5100 * 1_000_000]), max_gap_s=0.2)
    assert res.valid[0] and res.positions[0, 0] == 49.0
    # unlimited gap: everything valid
    assert track.interpolate(q, max_gap_s=math.inf).valid.all()
    # position-only track (GPS): positions valid, orientation unknown
    assert np.all(np.isnan(res.orientations))


def test_int64_stamps_keep_nanosecond_precision():
    track = PoseTrack(np.array([T0, T0 + NS]), np.array([[0.0, 0, 0], [1.0, 0, 0]]))
    assert float(T0 + 1) == float(T0)  # why floats are not allowed
    q = np.array([T0 + 1, T0 + 500_000_001, T0 + NS - 1], dtype=np.int64)
    res = track.interpolate(q, max_gap_s=1.0)
    np.testing.assert_allclose(res.positions[:, 0], [1e-9, 0.500000001, 1 - 1e-9], rtol=0, atol=1e-15)
    assert track.stamps_ns.dtype == np.int64 and track.stamps_ns[0] == T0
    res = track.interpolate(np.array([T0 + NS + 1], dtype=np.uint64), max_gap_s=0.0)
    assert not res.valid[0] and res.gap_s[0] == pytest.approx(1e-9)


def test_track_sorts_dedups_and_accepts_nan_orientations():
    stamps = np.array([30, 10, 20, 20, 40], dtype=np.int64)
    pos = np.array([[3.0, 0], [1.0, 0], [2.0, 0], [2.5, 0], [4.0, 0]])  # (N, 2): z = 0
    ori = np.array([[0, 0, 0, 1.0], [0, 0, 0, 2.0], [np.nan] * 4, [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    track = PoseTrack(stamps, pos, ori, frame_id="map")
    np.testing.assert_array_equal(track.stamps_ns, [10, 20, 30, 40])
    np.testing.assert_array_equal(track.positions[:, 0], [1.0, 2.5, 3.0, 4.0])  # the last of the two 20s
    np.testing.assert_array_equal(track.positions[:, 2], 0.0)
    np.testing.assert_array_equal(track.orientations[0], [0, 0, 0, 1.0])  # normalised
    np.testing.assert_array_equal(track.has_orientation, [True, True, True, True])
    track = PoseTrack(stamps[:3], pos[:3], ori[[0, 2, 1]])
    np.testing.assert_array_equal(track.has_orientation, [False, True, True])
    res = track.interpolate(np.array([15, 25]), max_gap_s=1.0)
    assert res.valid.all() and np.all(np.isnan(res.orientations[0])) and not np.any(np.isnan(res.orientations[1]))
    with pytest.raises(ValueError, match=r"read-only"):
        track.positions[0, 0] = 5.0
    assert "3 poses" in repr(track)


def test_track_bad_inputs():
    with pytest.raises(PoseTrackError, match=r"empty; expected at least one pose"):
        PoseTrack(np.array([], dtype=np.int64), np.zeros((0, 3)))
    with pytest.raises(PoseTrackError, match=r"dtype float64; expected integer nanoseconds"):
        PoseTrack(np.array([1.5, 2.5]), np.zeros((2, 3)))
    with pytest.raises(PoseTrackError, match=r"shape \(2, 4\); expected \(2, 3\) or \(2, 2\)"):
        PoseTrack(np.array([1, 2]), np.zeros((2, 4)))
    with pytest.raises(PoseTrackError, match=r"1 position\(s\) are NaN/inf \(first at stamp 2 ns\)"):
        PoseTrack(np.array([1, 2]), np.array([[0, 0, 0], [np.nan, 0, 0]]))
    with pytest.raises(PoseTrackError, match=r"orientations have shape \(2, 3\)"):
        PoseTrack(np.array([1, 2]), np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(PoseTrackError, match=r"zero norm.*NaN rows"):
        PoseTrack(np.array([1, 2]), np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(PoseTrackError, match=r"infinite"):
        PoseTrack(np.array([1]), np.zeros((1, 3)), np.array([[0, 0, np.inf, 1]]))
    track = PoseTrack(np.array([1, 2]), np.zeros((2, 3)))
    with pytest.raises(PoseTrackError, match=r"max_gap_s is -1; expected seconds >= 0"):
        track.interpolate(np.array([1]), max_gap_s=-1)
    with pytest.raises(PoseTrackError, match=r"dtype float64"):
        track.interpolate(np.array([1.0]), max_gap_s=1.0)
    assert issubclass(PoseTrackError, ValueError)


# --- KeyframeGate --------------------------------------------------------------------------------------------------


def _run(gate: KeyframeGate, stamps, positions=None, orientations=None) -> list[int]:
    out = []
    for i, s in enumerate(stamps):
        p = None if positions is None else positions[i]
        o = None if orientations is None else orientations[i]
        if gate.accept(int(s), p, o):
            out.append(i)
    return out


STAMPS = T0 + np.arange(25, dtype=np.int64) * 100_000_000  # 10 Hz, 2.4 s
LINE = np.column_stack([np.arange(25) * 0.25, np.zeros(25), np.zeros(25)])  # 0.25 m per frame (exact binary)
STILL = np.zeros((25, 3))
TURN = yaw_to_quat(np.radians(np.arange(25) * 6.0))  # 6 degrees per frame


def test_gate_distance_rule_on_and_off():
    assert _run(KeyframeGate(0.5, 0.0), STAMPS, LINE) == list(range(0, 25, 2))
    assert _run(KeyframeGate(0.6, 0.0), STAMPS, LINE) == list(range(0, 25, 3))
    assert _run(KeyframeGate(0.0, 0.0), STAMPS, LINE) == list(range(25))  # every rule off: every frame
    with pytest.raises(ValueError, match=r"recording.min_distance_m must be >= 0, got -1.0"):
        KeyframeGate(-1.0, 0.0)


def test_gate_rotation_rule_on_and_off():
    assert _run(KeyframeGate(0.5, 15.0), STAMPS, STILL, TURN) == list(range(0, 25, 3))  # 18 degrees >= 15
    assert _run(KeyframeGate(0.5, 0.0), STAMPS, STILL, TURN) == [0]
    # moving and turning: either rule fires
    assert _run(KeyframeGate(1.0, 15.0), STAMPS, LINE, TURN) == list(range(0, 25, 3))
    assert _run(KeyframeGate(0.5, 15.0), STAMPS, LINE, TURN) == list(range(0, 25, 2))


def test_gate_time_rules():
    # min_interval rate-limits the distance rule: every frame moves >= 0.25 m, keyframes >= 0.25 s apart
    assert _run(KeyframeGate(0.25, 0.0, min_interval_s=0.25), STAMPS, LINE) == list(range(0, 25, 3))
    assert _run(KeyframeGate(0.25, 0.0, min_interval_s=0.0), STAMPS, LINE) == list(range(25))
    # max_interval fires without motion
    assert _run(KeyframeGate(0.5, 15.0, max_interval_s=1.0), STAMPS, STILL, TURN[:1].repeat(25, 0)) == [0, 10, 20]
    assert _run(KeyframeGate(0.5, 15.0, max_interval_s=0.0), STAMPS, STILL) == [0]
    # both: max_interval cannot beat min_interval
    assert _run(KeyframeGate(0.0, 0.0, min_interval_s=0.5, max_interval_s=0.3), STAMPS) == [0, 5, 10, 15, 20]


def test_gate_without_pose_uses_time_rules_only():
    gate = KeyframeGate(0.5, 15.0, max_interval_s=0.5)
    assert _run(gate, STAMPS) == [0, 5, 10, 15, 20]
    # a frame without position cannot fire the distance rule; motion is measured from the last known position
    gate = KeyframeGate(0.5, 0.0)
    assert gate.accept(T0, np.zeros(3))
    assert not gate.accept(T0 + 1, None)
    assert not gate.accept(T0 + 2, np.full(3, np.nan))  # non-finite: unknown
    assert not gate.accept(T0 + 3, np.array([0.3, 0.0, 0.0]))
    assert gate.accept(T0 + 4, np.array([0.5, 0.0, 0.0]))
    assert gate.num_accepted == 2 and gate.last_stamp_ns == T0 + 4
    # keyframe accepted by time without a position keeps the previous position as the reference
    gate = KeyframeGate(1.0, 0.0, max_interval_s=1.0)
    assert gate.accept(T0, np.zeros(2))
    assert gate.accept(T0 + NS, None)
    assert not gate.accept(T0 + NS + 1, np.array([0.9, 0.0]))
    assert gate.accept(T0 + NS + 2, np.array([1.0, 0.0]))


def test_gate_backwards_stamp_and_reset():
    gate = KeyframeGate(0.5, 15.0)
    assert gate.accept(T0 + NS, np.zeros(3))
    assert not gate.accept(T0, np.array([10.0, 0, 0]))  # older than the last keyframe (bag loop)
    gate.reset()
    assert gate.last_stamp_ns is None and gate.num_accepted == 0
    assert gate.accept(T0, np.array([10.0, 0, 0]))


def test_frames_without_a_pose_are_kept_by_time():
    gate = KeyframeGate(0.5, 15.0, no_pose_interval_s=1.0)  # the defaults of a robot without a pose source
    kept = [k for k in range(10) if gate.accept(T0 + k * NS // 4)]
    assert kept == [0, 4, 8]  # one per second, not only the first frame
    every = KeyframeGate(0.5, 15.0, no_pose_interval_s=0.0)
    assert all(every.accept(T0 + k * NS // 4) for k in range(10))
    assert "a keyframe every 1 s (no pose source)" in KeyframeGateConfig().describe(with_poses=False)
    assert KeyframeGateConfig().describe(with_poses=True).startswith("a keyframe every 0.5 m or 15 deg")
    assert KeyframeGateConfig(0.0, 0.0, 0.0, 0.0).describe(with_poses=True) == "every frame"


def test_gate_config_and_errors():
    assert KeyframeGate().config == KeyframeGateConfig()
    assert KeyframeGateConfig().min_distance_m == 0.5 and KeyframeGateConfig().min_rotation_deg == 15.0
    cfg = KeyframeGateConfig(1.0, 30.0, 0.1, 5.0)
    assert KeyframeGate.from_config(cfg).config == cfg
    with pytest.raises(ValueError, match=r"recording.min_distance_m must be a finite number, got nan"):
        KeyframeGate(min_distance_m=float("nan"))
    with pytest.raises(ValueError, match=r"recording.max_interval_s must be a number, got '1'"):
        KeyframeGate(max_interval_s="1")
    gate = KeyframeGate()
    with pytest.raises(ValueError, match=r"stamp_ns is 1.5 \(float\); expected integer nanoseconds"):
        gate.accept(1.5)
    with pytest.raises(ValueError, match=r"position has 4 values; expected 2 or 3"):
        gate.accept(1, np.zeros(4))
    with pytest.raises(ValueError, match=r"orientation has zero norm"):
        gate.accept(1, None, np.zeros(4))


def test_select_keyframes_matches_gate_and_handles_order(rng):
    mask = select_keyframes(STAMPS, LINE, TURN, min_distance_m=0.6, min_rotation_deg=100.0)
    np.testing.assert_array_equal(np.flatnonzero(mask), _run(KeyframeGate(0.6, 100.0), STAMPS, LINE, TURN))
    perm = rng.permutation(25)
    shuffled = select_keyframes(STAMPS[perm], LINE[perm], TURN[perm], min_distance_m=0.6, min_rotation_deg=100.0)
    np.testing.assert_array_equal(shuffled, mask[perm])  # processed in stamp order, returned in input order
    # NaN rows (e.g. invalid interpolations) are unknown poses
    pos = LINE.copy()
    pos[1:6] = np.nan
    np.testing.assert_array_equal(np.flatnonzero(select_keyframes(STAMPS, pos, min_distance_m=0.5))[:3], [0, 6, 8])
    assert select_keyframes(STAMPS, max_interval_s=1.0).sum() == 3
    with pytest.raises(PoseTrackError, match=r"positions have shape \(3, 3\); expected \(25, 3\)"):
        select_keyframes(STAMPS, np.zeros((3, 3)))
    with pytest.raises(PoseTrackError, match=r"orientations have shape \(25, 3\)"):
        select_keyframes(STAMPS, None, np.zeros((25, 3)))
