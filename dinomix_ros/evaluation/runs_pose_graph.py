"""The whole chain on a rendered sequence: frames -> DINO-Mix + ORB -> LiveMap loop closures -> GTSAM pose graph.

What a SLAM stack with this package does, without ROS, on a :class:`~.synthetic_sequence.SyntheticSequence` whose
ground truth is exact:

1. :func:`detect_loop_closures`: every frame is described by the encoder (a batch at a time), gets ORB features with
   its depth image, and goes through :meth:`LiveMap.process <dinomix_ros.localization.live_map.LiveMap.process>` with
   the odometry pose at its stamp while recording (the node's ``self_map`` mode: every frame a keyframe, recent ones
   excluded by ``matching.exclude_recent_s``); each accepted, verified match is a :class:`~.pose_graph.LoopClosure`
   between the keyframe's stamp and the frame's, as a backend receives it;
2. :func:`optimize_trajectory`: a :class:`~.pose_graph.PoseGraph` with one node per frame (initial estimate: the
   odometry), a prior on the first, odometry between consecutive frames, and the loop closures (robust kernel);
3. :func:`check_closures`: each closure against the ground truth (its error, and its NEES under its covariance);
4. :func:`wrong_loop_closure`: a deliberately wrong closure (far-apart frames claimed to be one place, with a tight
   covariance) to show the robust kernel keeps it from bending the trajectory.

Trajectory error (ATE) is the caller's: bench/bench_pose_graph.py and the tests compute it with evo.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from dinomix_ros.evaluation.pose_graph import LoopClosure, PoseGraph, PoseGraphConfig
from dinomix_ros.evaluation.synthetic_sequence import OdometryConfig, SyntheticSequence
from dinomix_ros.imaging.features import FeatureConfig, FeatureExtractor
from dinomix_ros.localization.camera_pose import matrix_to_quat
from dinomix_ros.localization.live_map import LiveMap
from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.localization.verification import VerificationConfig
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.sources.posemsg import PoseSample
from dinomix_ros.maps.sources.poses import KeyframeGateConfig
from dinomix_ros.model.encoder import Encoder

__all__ = ["CAMERA", "CHI2_6DOF_99_73", "DetectedClosure", "ClosureCheck", "odometry_covariance",
           "detect_loop_closures", "optimize_trajectory", "check_closures", "wrong_loop_closure", "relative_error"]

_logger = logging.getLogger(__name__)

CAMERA = "/camera/color/image_raw"
#: The chi-square 6-DoF quantile of "within 3 sigma" (99.73 %): a closure whose NEES exceeds it is overconfident.
CHI2_6DOF_99_73 = 20.06
_PLANAR_SIGMA = 1e-3  # odometry of a ground robot: z, roll and pitch barely change


@dataclass(frozen=True, eq=False)
class DetectedClosure:
    """A loop closure the pipeline published for frame ``query`` against the keyframe of frame ``keyframe``."""

    query: int
    keyframe: int
    closure: LoopClosure
    similarity: float
    inliers: int


@dataclass(frozen=True)
class ClosureCheck:
    """One closure against the ground truth: error in ROS order (x, y, z, rot_x, rot_y, rot_z), its NEES, sizes."""

    query: int
    keyframe: int
    error: np.ndarray = field(repr=False)
    nees: float
    position_error_m: float
    rotation_error_deg: float
    sigma_position_m: float  # sqrt of the largest position variance
    case: str


def _pose_sample(stamp_ns: int, T: np.ndarray, frame: str = "odom") -> PoseSample:
    return PoseSample(int(stamp_ns), frame, T[:3, 3].copy(), matrix_to_quat(T[:3, :3]))


def detect_loop_closures(sequence: SyntheticSequence, encoder: Encoder, odometry: np.ndarray, *,
                         matcher: MatcherConfig | None = None, verification: VerificationConfig | None = None,
                         features: FeatureConfig | None = None, batch: int = 8) -> list[DetectedClosure]:
    """Run every frame through the live map as the node would (see the module docstring).

    Args:
        sequence: the rendered frames, their stamps and the camera.
        encoder: the model (seeded random weights are enough: verification decides what is accepted).
        odometry: (N, 4, 4) the pose source's pose of each frame (recorded with each keyframe).
        matcher: matching rules; default: no similarity threshold, 10 candidates, the last 20 s excluded.
        verification: geometric verification (default rules, 10 candidates).
        features: local features (default ORB 400).
        batch: frames described per forward pass.

    Returns:
        The closures in frame order.
    """
    matcher = matcher or MatcherConfig(min_similarity=-1.0, top_k=10, exclude_recent_s=20.0)
    verification = verification or VerificationConfig(candidates=10)
    extractor = FeatureExtractor(features or FeatureConfig())
    live = LiveMap(KeyframeMap.empty(encoder.fingerprint.to_dict()), matcher=matcher, verification=verification,
                   gate=KeyframeGateConfig(min_distance_m=0.0, min_rotation_deg=0.0, no_pose_interval_s=0.0),
                   has_pose_source=True, features=features or FeatureConfig(), mount=sequence.mount)
    live.set_camera_model(CAMERA, sequence.camera)
    live.start_recording()
    frame_of_stamp = {int(s): i for i, s in enumerate(sequence.stamps_ns)}
    found: list[DetectedClosure] = []
    t0 = time.perf_counter()
    for start in range(0, len(sequence), batch):
        frames = [sequence.frame(i) for i in range(start, min(start + batch, len(sequence)))]
        descriptors = encoder.describe([rgb for rgb, _ in frames], "rgb8")
        for j, ((rgb, depth), descriptor) in enumerate(zip(frames, descriptors)):
            i = start + j
            stamp = int(sequence.stamps_ns[i])
            local = extractor.extract(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), depth)
            outcome = live.process(CAMERA, stamp, descriptor, _pose_sample(stamp, odometry[i]), features=local)
            closure = LoopClosure.from_outcome(outcome, stamp)
            if closure is not None and outcome.publish_loop_closure:
                best = outcome.result.best
                found.append(DetectedClosure(i, frame_of_stamp[closure.keyframe_stamp_ns], closure,
                                             float(best.similarity), int(best.inliers)))
    _logger.info("%d frames, %d loop closures in %.1f s", len(sequence), len(found), time.perf_counter() - t0)
    return found


def odometry_covariance(sequence: SyntheticSequence, config: OdometryConfig) -> np.ndarray:
    """(6, 6) ROS-order covariance of one odometry step that covers the drift model: noise, and the bias and scale
    error of one step counted as noise (a backend does not know them either)."""
    step = sequence.config.step_m
    sigma_xy = math.hypot(config.sigma_xy_m, config.scale_error * step)
    sigma_yaw = math.hypot(config.sigma_yaw_rad, config.yaw_bias_rad_per_m * step)
    return np.diag([sigma_xy ** 2, sigma_xy ** 2, _PLANAR_SIGMA ** 2, _PLANAR_SIGMA ** 2, _PLANAR_SIGMA ** 2,
                    sigma_yaw ** 2])


def optimize_trajectory(sequence: SyntheticSequence, odometry: np.ndarray, step_covariance: np.ndarray,
                        closures: list[LoopClosure], config: PoseGraphConfig | None = None,
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The pose graph's trajectory: one node per frame, a tight prior on the first, odometry, ``closures``.

    Returns:
        (poses, weights): (N, 4, 4) optimized poses in frame order, (M,) each closure's robust weight after.
    """
    graph = PoseGraph(config)
    stamps = sequence.stamps_ns
    for stamp, T in zip(stamps, odometry):
        graph.add_node(int(stamp), T)
    graph.add_prior(int(stamps[0]), odometry[0], np.diag([1e-4] * 3 + [1e-6] * 3))
    for i in range(1, len(stamps)):
        graph.add_odometry(int(stamps[i - 1]), int(stamps[i]), np.linalg.inv(odometry[i - 1]) @ odometry[i],
                           step_covariance)
    for closure in closures:
        graph.add_loop_closure(closure)
    poses = graph.optimize()
    return poses, graph.loop_closure_weights()


def relative_error(T_estimate: np.ndarray, T_true: np.ndarray) -> np.ndarray:
    """(6,) ``delta`` with ``T_true = T_estimate @ exp(delta)``, ROS order (x, y, z, rot_x, rot_y, rot_z): the
    rotation vector of the residual rotation and its translation (first order in the translation)."""
    D = np.linalg.inv(T_estimate) @ T_true
    rotvec, _ = cv2.Rodrigues(D[:3, :3])
    return np.concatenate([D[:3, 3], rotvec.ravel()])


def check_closures(sequence: SyntheticSequence, detected: list[DetectedClosure]) -> list[ClosureCheck]:
    """Each closure's error against the ground truth and its NEES (``delta^T covariance^-1 delta``: 6 on average
    for a covariance that is right, above :data:`CHI2_6DOF_99_73` for fewer than 0.27 % of closures)."""
    out = []
    for d in detected:
        truth = np.linalg.inv(sequence.poses[d.keyframe]) @ sequence.poses[d.query]
        delta = relative_error(d.closure.T, truth)
        cov = d.closure.covariance
        nees = float(delta @ np.linalg.solve(cov, delta))
        out.append(ClosureCheck(d.query, d.keyframe, delta, nees, float(np.linalg.norm(delta[:3])),
                                float(np.degrees(np.linalg.norm(delta[3:]))),
                                float(math.sqrt(np.linalg.eigvalsh(cov[:3, :3]).max())), d.closure.case))
    return out


def wrong_loop_closure(sequence: SyntheticSequence, query: int | None = None, keyframe: int | None = None,
                       sigma_m: float = 0.05, sigma_rad: float = 0.01) -> tuple[LoopClosure, float]:
    """A deliberately wrong closure: the last frame claimed to be where the frame half a lap earlier was (the far
    side of the block), ``T`` = identity with a tight covariance, as a repeated facade could make a verifier claim.

    Returns:
        (closure, distance): the closure and how far apart the two frames truly are (metres).
    """
    query = len(sequence) - 1 if query is None else query
    keyframe = (query - sequence.lap_frames // 2) if keyframe is None else keyframe
    cov = np.diag([sigma_m ** 2] * 3 + [sigma_rad ** 2] * 3)
    closure = LoopClosure(int(sequence.stamps_ns[keyframe]), int(sequence.stamps_ns[query]), np.eye(4), cov)
    distance = float(np.linalg.norm(sequence.poses[query][:3, 3] - sequence.poses[keyframe][:3, 3]))
    return closure, distance
