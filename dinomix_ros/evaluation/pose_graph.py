"""Loop closures in a GTSAM pose graph: what a GTSAM-based SLAM backend does with this package's loop constraints.

A verified match gives a loop closure (:class:`LoopClosure`): the robot's base frame at the query in its base frame
at the matched keyframe, ``T``, with a 6x6 covariance in ROS order (x, y z, rot_x, rot_y, rot_z) of a perturbation in
the query's base frame, ``T_true = T @ exp(delta)`` (:class:`~dinomix_ros.localization.camera_pose.RelativePose`).
A pose graph (:class:`PoseGraph`, GTSAM) adds it as it adds odometry, between the two graph nodes whose stamps are
the keyframe's and the query's (:meth:`PoseGraph.key_at`):

* ``BetweenFactorPose3(key_keyframe, key_query, T, noise)``: GTSAM's Pose3 error is also a perturbation on the right
  (``Local(T, T_kf^-1 T_q) = Log(T^-1 T_kf^-1 T_q)``, in the query's frame), so the covariance applies as it is,
  reordered to GTSAM's tangent order (rot_x, rot_y, rot_z, x, y, z) by :func:`ros_to_gtsam_covariance`;
* a robust kernel around it (``noiseModel.Robust``, :class:`PoseGraphConfig`): a wrong loop closure is the one
  failure a pose graph cannot average away (one confident wrong constraint bends the whole trajectory), and a
  verified match can still be wrong (a repeated facade). The default is Cauchy: its influence falls to zero for
  large residuals, so a closure that disagrees with odometry and the other closures by many sigma is all but
  ignored, while Huber's influence stays constant and a wrong closure keeps pulling (measured: README, "GTSAM").
  The kernel sees the Mahalanobis norm of the whole 6-D error (GTSAM's block reweighting), in sigma;
* Levenberg-Marquardt over all nodes (a batch solve; an online backend would update iSAM2 with the same factors).

gtsam (BSD) is a test requirement, not a runtime one: it is imported when a graph is made, and the error says how
to install it.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["GTSAM_ORDER", "LoopClosure", "PoseGraphConfig", "PoseGraph", "ros_to_gtsam_covariance", "import_gtsam"]

#: Index of each GTSAM tangent coordinate (rot_x, rot_y, rot_z, x, y, z) in ROS order (x, y, z, rot_x, rot_y, rot_z).
GTSAM_ORDER = (3, 4, 5, 0, 1, 2)
KERNELS = ("cauchy", "huber", "none")


def import_gtsam() -> Any:
    """The gtsam module (PyPI wheel ``gtsam``), or an ImportError that says how to install it."""
    try:
        import gtsam
    except ImportError as exc:
        raise ImportError("the pose graph needs GTSAM's Python package: pip install gtsam (requirements-dev.txt pins "
                          "the tested version)") from exc
    return gtsam


def ros_to_gtsam_covariance(covariance: np.ndarray) -> np.ndarray:
    """A 6x6 covariance in ROS order (x, y, z, rot_x, rot_y, rot_z) reordered to GTSAM's Pose3 tangent order
    (rot_x, rot_y, rot_z, x, y, z); both describe the same perturbation in the body frame.

    Raises:
        ValueError: not 36 finite numbers forming a symmetric positive-definite matrix.
    """
    cov = np.asarray(covariance, dtype=np.float64)
    if cov.size != 36 or not np.isfinite(cov).all():
        raise ValueError(f"a pose covariance is 36 finite numbers (6x6, ROS order), got shape {cov.shape}")
    cov = cov.reshape(6, 6)
    if not np.allclose(cov, cov.T, rtol=1e-6, atol=1e-12):
        raise ValueError("the pose covariance is not symmetric")
    try:
        np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise ValueError("the pose covariance is not positive definite (a zero or negative variance claims "
                         "certainty no measurement has)") from None
    order = list(GTSAM_ORDER)
    return cov[np.ix_(order, order)]


@dataclass(frozen=True, eq=False)
class LoopClosure:
    """A loop-closure constraint between two stamps.

    Attributes:
        keyframe_stamp_ns: stamp of the matched keyframe (the earlier visit).
        query_stamp_ns: stamp of the query frame (now).
        T: (4, 4) the query's base frame in the keyframe's base frame.
        covariance: (6, 6) ROS order (x, y, z, rot_x, rot_y, rot_z), a perturbation in the query's base frame.
        case: how ``T`` was measured ("metric": 6-DoF with depth; "rotation": position = the keyframe's).
    """

    keyframe_stamp_ns: int
    query_stamp_ns: int
    T: np.ndarray
    covariance: np.ndarray
    case: str = "metric"

    @classmethod
    def from_outcome(cls, outcome: Any, stamp_ns: int) -> LoopClosure | None:
        """The loop closure of a :class:`~dinomix_ros.localization.live_map.FrameOutcome` for the frame at
        ``stamp_ns``: None unless its match was accepted and verified with intrinsics (``outcome.relative``)."""
        best = outcome.result.best
        if outcome.relative is None or not outcome.result.accepted or best is None:
            return None
        rel = outcome.relative
        return cls(int(best.stamp_ns), int(stamp_ns), np.array(rel.T, dtype=np.float64),
                   np.array(rel.covariance, dtype=np.float64), rel.case)


@dataclass(frozen=True)
class PoseGraphConfig:
    """The robust kernel of loop closures and the solver.

    Attributes:
        kernel: "cauchy" (default), "huber" or "none" (plain Gaussian).
        kernel_width: the kernel's k, in sigma of the closure's Mahalanobis norm: Cauchy halves a closure's weight
            at k sigma; Huber weighs it fully up to k. The default is the 95 % quantile of a 6-D Gaussian's
            Mahalanobis norm (sqrt(chi2_6(0.95)) = 3.55): a closure as good as its covariance says keeps most weight.
        stamp_tolerance_s: a stamp finds the graph node nearest to it within this many seconds.
        max_iterations: Levenberg-Marquardt iterations.
    """

    kernel: str = "cauchy"
    kernel_width: float = 3.55
    stamp_tolerance_s: float = 0.05
    max_iterations: int = 100

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel {self.kernel!r}: expected one of {KERNELS}")
        if not (self.kernel_width > 0 and math.isfinite(self.kernel_width)):
            raise ValueError(f"kernel_width must be a positive number of sigma, got {self.kernel_width}")
        if not self.stamp_tolerance_s >= 0 or self.max_iterations < 1:
            raise ValueError("stamp_tolerance_s must be >= 0 and max_iterations >= 1")


def _pose3(gtsam: Any, T: np.ndarray) -> Any:
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.isfinite(T).all():
        raise ValueError(f"a pose is a finite 4x4 matrix, got shape {T.shape}")
    R = T[:3, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-6) or np.linalg.det(R) <= 0:
        raise ValueError("the pose's 3x3 block is not a rotation")
    return gtsam.Pose3(gtsam.Rot3(R), T[:3, 3])


class PoseGraph:
    """A Pose3 graph with one node per stamp: odometry and priors (Gaussian), loop closures (robust).

    Args:
        config: robust kernel, stamp tolerance, solver.
    """

    def __init__(self, config: PoseGraphConfig | None = None) -> None:
        self.gtsam = import_gtsam()
        self.config = config or PoseGraphConfig()
        self.graph = self.gtsam.NonlinearFactorGraph()
        self.initial = self.gtsam.Values()
        self.estimate = None  # Values after optimize()
        self._stamps: list[int] = []  # sorted
        self._keys: dict[int, int] = {}  # stamp -> key
        self._closure_factors: list[int] = []  # graph indices of loop-closure factors

    def __len__(self) -> int:
        return len(self._stamps)

    @property
    def stamps_ns(self) -> np.ndarray:
        """(N,) the nodes' stamps, ascending (the order :meth:`optimize` returns poses in)."""
        return np.asarray(self._stamps, dtype=np.int64)

    def add_node(self, stamp_ns: int, T_guess: np.ndarray) -> int:
        """A node at ``stamp_ns`` with its initial estimate (e.g. the odometry pose); returns its key.

        Raises:
            ValueError: a node with this stamp exists, or the pose is not a rigid transform.
        """
        stamp_ns = int(stamp_ns)
        if stamp_ns in self._keys:
            raise ValueError(f"the graph has a node at stamp {stamp_ns} already")
        key = self.gtsam.symbol("x", len(self._keys))
        self.initial.insert(key, _pose3(self.gtsam, T_guess))
        self._keys[stamp_ns] = key
        bisect.insort(self._stamps, stamp_ns)
        return key

    def key_at(self, stamp_ns: int) -> int:
        """The key of the node nearest to ``stamp_ns``.

        Raises:
            KeyError: no node within ``stamp_tolerance_s`` (the message says how far the nearest one is).
        """
        if not self._stamps:
            raise KeyError("the pose graph has no nodes")
        i = bisect.bisect_left(self._stamps, int(stamp_ns))
        near = min(self._stamps[max(i - 1, 0):i + 1], key=lambda s: abs(s - int(stamp_ns)))
        gap_s = abs(near - int(stamp_ns)) / 1e9
        if gap_s > self.config.stamp_tolerance_s:
            raise KeyError(f"no graph node within {self.config.stamp_tolerance_s} s of stamp {int(stamp_ns)} (the "
                           f"nearest is {gap_s:.3f} s away)")
        return self._keys[near]

    def _gaussian(self, covariance: np.ndarray) -> Any:
        return self.gtsam.noiseModel.Gaussian.Covariance(ros_to_gtsam_covariance(covariance))

    def add_prior(self, stamp_ns: int, T: np.ndarray, covariance: np.ndarray) -> None:
        """Anchor the node at ``stamp_ns`` at pose ``T`` (covariance in ROS order, a perturbation in its frame)."""
        self.graph.add(self.gtsam.PriorFactorPose3(self.key_at(stamp_ns), _pose3(self.gtsam, T),
                                                   self._gaussian(covariance)))

    def add_odometry(self, stamp_from: int, stamp_to: int, T_from_to: np.ndarray, covariance: np.ndarray) -> None:
        """The measured motion from node ``stamp_from`` to node ``stamp_to`` (Gaussian: odometry is trusted)."""
        self.graph.add(self.gtsam.BetweenFactorPose3(self.key_at(stamp_from), self.key_at(stamp_to),
                                                     _pose3(self.gtsam, T_from_to), self._gaussian(covariance)))

    def add_loop_closure(self, closure: LoopClosure) -> int:
        """A loop closure between the nodes at its two stamps, with the robust kernel; returns its index among the
        closures (:meth:`loop_closure_weights`).

        Raises:
            KeyError: a stamp has no node (see :meth:`key_at`).
            ValueError: both stamps are the same node, or the pose / covariance are not valid.
        """
        k_kf, k_q = self.key_at(closure.keyframe_stamp_ns), self.key_at(closure.query_stamp_ns)
        if k_kf == k_q:
            raise ValueError("a loop closure needs two different nodes (both stamps map to the same one)")
        noise = self._gaussian(closure.covariance)
        if self.config.kernel != "none":
            estimator = self.gtsam.noiseModel.mEstimator
            kernel = (estimator.Cauchy if self.config.kernel == "cauchy" else estimator.Huber).Create(
                self.config.kernel_width)
            noise = self.gtsam.noiseModel.Robust.Create(kernel, noise)
        self.graph.add(self.gtsam.BetweenFactorPose3(k_kf, k_q, _pose3(self.gtsam, closure.T), noise))
        self._closure_factors.append(self.graph.size() - 1)
        return len(self._closure_factors) - 1

    def optimize(self) -> np.ndarray:
        """Levenberg-Marquardt from the initial estimates; returns (N, 4, 4) poses in stamp order."""
        params = self.gtsam.LevenbergMarquardtParams()
        params.setMaxIterations(self.config.max_iterations)
        self.estimate = self.gtsam.LevenbergMarquardtOptimizer(self.graph, self.initial, params).optimize()
        return self.poses()

    def poses(self) -> np.ndarray:
        """(N, 4, 4) the current estimate (the initial one before :meth:`optimize`) in stamp order."""
        values = self.estimate if self.estimate is not None else self.initial
        return np.stack([values.atPose3(self._keys[s]).matrix() for s in self._stamps])

    def loop_closure_weights(self) -> np.ndarray:
        """(M,) each loop closure's robust weight at the current estimate: 1 fully trusted, near 0 ignored."""
        values = self.estimate if self.estimate is not None else self.initial
        out = np.ones(len(self._closure_factors))
        for i, index in enumerate(self._closure_factors):
            factor = self.graph.at(index)
            model = factor.noiseModel()
            if isinstance(model, self.gtsam.noiseModel.Robust):
                residual = float(np.linalg.norm(model.noise().whiten(factor.unwhitenedError(values))))
                out[i] = float(model.robust().weight(residual))
        return out
