"""The GTSAM pose graph: the covariance of a loop closure means in the graph what it means in ROS (same perturbation,
reordered to [rot, trans]), nodes are found by stamp, bad constraints get clear errors, and the robust kernel keeps a
wrong closure from bending a trajectory that a plain Gaussian lets it ruin."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import gtsam
import numpy as np
import pytest

from dinomix_ros.evaluation.pose_graph import LoopClosure, PoseGraph, PoseGraphConfig, ros_to_gtsam_covariance
from dinomix_ros.evaluation.synthetic_sequence import planar_pose
from dinomix_ros.localization.live_map import LiveMap
from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.maps.keyframes import KeyframeMap

S = 1_000_000_000
REPO = Path(__file__).resolve().parents[2]


def _spd(rng: np.random.Generator) -> np.ndarray:
    """A strongly anisotropic, correlated 6x6 covariance (ROS order): metres^2 in the first block, rad^2 after."""
    A = rng.normal(size=(6, 6)) * np.array([0.2, 0.05, 0.01, 0.02, 0.005, 0.05])[:, None]
    return A @ A.T + np.diag([1e-4, 4e-4, 1e-5, 1e-6, 4e-6, 1e-5])


def _exp_right(T: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """T @ exp(delta), delta in ROS order (x, y, z, rot_x, rot_y, rot_z), to first order in the translation."""
    D = np.eye(4)
    D[:3, :3] = cv2.Rodrigues(delta[3:].reshape(3, 1))[0]
    D[:3, 3] = delta[:3]
    return T @ D


def test_the_covariance_is_reordered_to_rot_trans() -> None:
    cov = np.arange(36, dtype=float).reshape(6, 6)
    cov = cov + cov.T + 100 * np.eye(6)
    out = ros_to_gtsam_covariance(cov)
    # GTSAM index 0..2 = ROS rot_x..rot_z (3..5), 3..5 = ROS x..z (0..2); every entry moves with its pair
    ros_of = [3, 4, 5, 0, 1, 2]
    for i in range(6):
        for j in range(6):
            assert out[i, j] == cov[ros_of[i], ros_of[j]]


def test_a_closure_costs_the_mahalanobis_distance_of_its_ros_covariance(rng) -> None:
    """The graph's cost of a loop closure whose query lies at T @ exp(delta) is 0.5 delta' C^-1 delta with C the
    ROS-order covariance: the perturbation convention and the reordering are both right (a covariance passed in
    ROS order unconverted, or applied on the other side, costs something else)."""
    cov = _spd(rng)
    T = planar_pose(3.0, -1.0, 0.7) @ _exp_right(np.eye(4), np.array([0.1, 0.2, 0.3, 0.2, -0.1, 0.3]))
    kf = planar_pose(10.0, 5.0, -1.2)
    for _ in range(5):
        delta = rng.multivariate_normal(np.zeros(6), cov) * 0.05  # small: first-order agreement
        graph = PoseGraph(PoseGraphConfig(kernel="none"))
        graph.add_node(1 * S, kf)
        graph.add_node(9 * S, kf @ _exp_right(T, delta))
        graph.add_loop_closure(LoopClosure(1 * S, 9 * S, T, cov))
        cost = graph.graph.error(graph.initial)
        expected = 0.5 * delta @ np.linalg.solve(cov, delta)
        assert cost == pytest.approx(expected, rel=0.02)
        unconverted = gtsam.BetweenFactorPose3(graph.key_at(1 * S), graph.key_at(9 * S), gtsam.Pose3(T),
                                               gtsam.noiseModel.Gaussian.Covariance(cov))
        assert unconverted.error(graph.initial) != pytest.approx(expected, rel=0.2)
        left = graph.graph.at(0).error(_values(graph, kf, _exp_left(delta) @ kf @ T))  # perturbed on the left
        assert left != pytest.approx(0.5 * delta @ np.linalg.solve(cov, delta), rel=0.2)


def _exp_left(delta: np.ndarray) -> np.ndarray:
    return _exp_right(np.eye(4), delta)


def _values(graph: PoseGraph, T_kf: np.ndarray, T_q: np.ndarray) -> gtsam.Values:
    values = gtsam.Values()
    values.insert(graph.key_at(1 * S), gtsam.Pose3(T_kf))
    values.insert(graph.key_at(9 * S), gtsam.Pose3(T_q))
    return values


def test_nodes_are_found_by_stamp_within_the_tolerance() -> None:
    graph = PoseGraph(PoseGraphConfig(stamp_tolerance_s=0.05))
    keys = [graph.add_node(s, np.eye(4)) for s in (3 * S, 1 * S, 2 * S)]  # any order
    assert list(graph.stamps_ns) == [1 * S, 2 * S, 3 * S]
    assert graph.key_at(2 * S) == keys[2] and graph.key_at(2 * S + 40_000_000) == keys[2]
    assert graph.key_at(3 * S - 49_000_000) == keys[0] and graph.key_at(1 * S - 10) == keys[1]
    with pytest.raises(KeyError, match=r"no graph node within 0.05 s of stamp 2500000000 \(the nearest is 0.500 s"):
        graph.key_at(2 * S + S // 2)
    with pytest.raises(ValueError, match="a node at stamp 2000000000 already"):
        graph.add_node(2 * S, np.eye(4))
    with pytest.raises(KeyError, match="no nodes"):
        PoseGraph().key_at(0)


def test_bad_constraints_get_clear_errors() -> None:
    graph = PoseGraph()
    graph.add_node(1 * S, np.eye(4))
    graph.add_node(2 * S, np.eye(4))
    good = np.diag([0.01] * 6)
    with pytest.raises(ValueError, match="not positive definite"):
        graph.add_loop_closure(LoopClosure(1 * S, 2 * S, np.eye(4), np.diag([0.01] * 5 + [0.0])))
    with pytest.raises(ValueError, match="36 finite numbers"):
        graph.add_loop_closure(LoopClosure(1 * S, 2 * S, np.eye(4), np.full((6, 6), np.nan)))
    with pytest.raises(ValueError, match="not symmetric"):
        graph.add_loop_closure(LoopClosure(1 * S, 2 * S, np.eye(4), good + np.triu(np.full((6, 6), 1e-3), 1)))
    with pytest.raises(ValueError, match="not a rotation"):
        graph.add_loop_closure(LoopClosure(1 * S, 2 * S, np.diag([2.0, 1.0, 1.0, 1.0]), good))
    with pytest.raises(ValueError, match="two different nodes"):
        graph.add_loop_closure(LoopClosure(1 * S, 1 * S + 1000, np.eye(4), good))
    with pytest.raises(KeyError, match="no graph node within"):
        graph.add_loop_closure(LoopClosure(1 * S, 7 * S, np.eye(4), good))
    with pytest.raises(ValueError, match="finite 4x4"):
        graph.add_node(3 * S, np.eye(3))
    assert graph.graph.size() == 0 and len(graph) == 2  # nothing half-added
    with pytest.raises(ValueError, match="kernel 'tukey'"):
        PoseGraphConfig(kernel="tukey")
    with pytest.raises(ValueError, match="kernel_width"):
        PoseGraphConfig(kernel_width=0.0)


def test_no_closure_from_a_frame_without_a_verified_match() -> None:
    fingerprint = {"id": "t", "architecture": "t", "weights_sha256": "0" * 64, "preprocessing": "t",
                   "descriptor_dim": 8}
    live = LiveMap(KeyframeMap.empty(fingerprint), matcher=MatcherConfig(min_similarity=-1.0))
    outcome = live.process("cam", 5 * S, np.ones(8, np.float32) / math.sqrt(8))
    assert outcome.relative is None and LoopClosure.from_outcome(outcome, 5 * S) is None


def _square_loop(n_side: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth of a 4 x n_side-step square driven twice round, and drifting odometry of it."""
    poses, T = [], np.eye(4)
    for k in range(8 * n_side):
        poses.append(T)
        T = T @ (planar_pose(1.0, 0.0, math.pi / 2) if (k + 1) % n_side == 0 else planar_pose(1.0, 0.0, 0.0))
    truth = np.stack(poses)
    odo = [truth[0]]
    for i in range(1, len(truth)):
        step = np.linalg.inv(truth[i - 1]) @ truth[i]
        odo.append(odo[-1] @ step @ planar_pose(0.0, 0.0, 0.02))  # 0.02 rad of heading drift per step
    return truth, np.stack(odo)


def _solve(truth: np.ndarray, odo: np.ndarray, closures: list[LoopClosure], kernel: str) -> tuple[np.ndarray, float]:
    graph = PoseGraph(PoseGraphConfig(kernel=kernel))
    for i, T in enumerate(odo):
        graph.add_node(i * S, T)
    graph.add_prior(0, odo[0], np.diag([1e-6] * 6))
    step_cov = np.diag([1e-4, 1e-4, 1e-6, 1e-6, 1e-6, 0.02 ** 2])
    for i in range(1, len(odo)):
        graph.add_odometry((i - 1) * S, i * S, np.linalg.inv(odo[i - 1]) @ odo[i], step_cov)
    for c in closures:
        graph.add_loop_closure(c)
    poses = graph.optimize()
    rmse = float(np.sqrt(np.mean(np.sum((poses[:, :3, 3] - truth[:, :3, 3]) ** 2, axis=1))))
    return poses, rmse


def test_a_robust_kernel_ignores_a_wrong_closure_that_a_gaussian_follows() -> None:
    truth, odo = _square_loop()
    n = len(truth) // 2  # the second lap revisits the first
    tight = np.diag([0.05 ** 2] * 3 + [0.01 ** 2] * 3)
    closures = [LoopClosure(i * S, (i + n) * S, np.linalg.inv(truth[i]) @ truth[i + n], tight) for i in range(0, n, 4)]
    wrong = LoopClosure(5 * S, (n + 25) * S, np.eye(4), tight)  # 10 m apart, claimed to be one place
    _, drift = _solve(truth, odo, [], "none")
    results = {k: (_solve(truth, odo, closures, k)[1], _solve(truth, odo, closures + [wrong], k)[1])
               for k in ("cauchy", "huber", "none")}
    assert drift > 2.0
    for kernel, (good, attacked) in results.items():
        assert good < 0.1 * drift, (kernel, good, drift)  # the closures remove the drift whatever the kernel
    assert results["none"][1] > 5 * results["none"][0]  # a Gaussian follows the wrong closure
    assert results["cauchy"][1] < 1.5 * results["cauchy"][0] + 0.01  # Cauchy all but ignores it
    graph = PoseGraph()
    for i, T in enumerate(odo):
        graph.add_node(i * S, T)
    graph.add_prior(0, odo[0], np.diag([1e-6] * 6))
    for i in range(1, len(odo)):
        graph.add_odometry((i - 1) * S, i * S, np.linalg.inv(odo[i - 1]) @ odo[i],
                           np.diag([1e-4, 1e-4, 1e-6, 1e-6, 1e-6, 0.02 ** 2]))
    for c in closures + [wrong]:
        graph.add_loop_closure(c)
    assert np.allclose(graph.poses(), odo)  # before optimize(): the initial estimate
    graph.optimize()
    weights = graph.loop_closure_weights()
    assert weights[-1] < 0.01 and weights[:-1].min() > 0.5, weights


def test_importing_the_evaluation_modules_loads_neither_gtsam_nor_evo() -> None:
    """gtsam is a test requirement (imported when a graph is made) and evo (GPL-3.0) is never imported by the
    package: the tests and bench/bench_pose_graph.py compute the trajectory error with it."""
    code = ("import sys, dinomix_ros.evaluation.pose_graph, dinomix_ros.evaluation.runs_pose_graph, "
            "dinomix_ros.evaluation.synthetic_sequence; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'gtsam', 'evo', 'rclpy'}))")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    package = REPO / "dinomix_ros"
    assert not [p for p in package.rglob("*.py") if "import evo" in p.read_text() or "from evo" in p.read_text()]
