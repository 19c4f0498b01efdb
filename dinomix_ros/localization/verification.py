"""Geometric verification of place-match candidates: do the query and a keyframe see the same 3-D scene, and how
did the camera move? (ROS-free)

For a query frame and a candidate keyframe, both with :class:`~dinomix_ros.imaging.features.LocalFeatures`:

1. descriptor matching (:func:`match_features`): nearest neighbours with Lowe's ratio test and a mutual check;
2. robust model fitting (:func:`verify_pair`): with both cameras' intrinsics, the relative motion on undistorted
   normalized coordinates (:mod:`.relative_pose`: essential matrix or homography chosen as ORB-SLAM does, a pure
   rotation, a plane's decompositions, refinement and covariance; with keyframe depths a metric 6-DoF motion by PnP);
   without intrinsics the fundamental matrix on pixels (USAC MAGSAC++), which verifies but gives no motion;
3. configuration checks on the chosen model's inliers in both images (:mod:`.inlier_spread`): a model fitted to
   matches on one point, a line or a tiny patch explains them all and proves nothing: the pair is rejected with the
   reason (``degenerate``);
4. the verified score, ``inliers * inlier_ratio`` (many matches of which few fit one geometry is what unrelated
   places give), and the accept rules ``verification.min_inliers`` and ``verification.min_inlier_ratio``.

:func:`verify_candidates` verifies the top candidates of a query and re-ranks them: verified candidates first, by
verified score, then the rest in their similarity order. The relative pose convention: ``R``, ``t`` map keyframe
camera coordinates to query camera coordinates (``X_q = R X_k + t``); covariances are over the right perturbation
of the query camera's pose in the keyframe camera's frame (:mod:`.relative_pose`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, ClassVar

import cv2
import numpy as np

from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.imaging.features import DESCRIPTOR_BYTES, LocalFeatures
from dinomix_ros.localization.inlier_spread import spread_problem
from dinomix_ros.localization.pose_models import Observations
from dinomix_ros.localization.relative_pose import MotionEstimate, fit_pnp, fit_two_view
from dinomix_ros.settings import check, setting

__all__ = ["VerificationConfig", "Verification", "match_features", "verify_pair", "verify_candidates",
           "rotation_angle_deg", "MIN_MATCHES"]

_logger = logging.getLogger(__name__)

#: Fewer putative matches than this cannot be verified (the fundamental matrix needs 7, PnP 4 + margin).
MIN_MATCHES = 8


@dataclass(frozen=True)
class VerificationConfig:
    """Geometric verification of candidates and its accept rules (node parameters ``verification.*``)."""

    SETTINGS_GROUP: ClassVar[str] = "verification"
    FLAG_PREFIX: ClassVar[str] = "verification-"  # CLI flags: --verification-<field>

    enabled: bool = setting(True, "verify the best candidates geometrically (local features) and publish loop "
                                  "closures and pose priors only from verified matches; applies when the map has "
                                  "local features (format 2), else verification is off and the log says so")
    candidates: int = setting(5, "how many of the best candidates (by similarity) are verified per query",
                              min=1, max=100)
    ratio: float = setting(0.8, "Lowe's ratio test: nearest / second-nearest descriptor distance below this "
                                "(1: off)", positive=True, max=1.0)
    mutual: bool = setting(True, "keep only mutual nearest-neighbour matches")
    threshold_px: float = setting(2.0, "MAGSAC++ inlier threshold in pixels (essential matrix: divided by the "
                                       "focal length)", positive=True, max=100.0)
    confidence: float = setting(0.999, "RANSAC confidence", positive=True, max=0.999999)
    min_inliers: int = setting(30, "accept a candidate only with at least this many inliers (0: off)",
                               min=0, max=100000)
    min_inlier_ratio: float = setting(0.25, "accept a candidate only if inliers / putative matches reaches this "
                                            "(0: off)", min=0.0, max=1.0)
    rerank: bool = setting(True, "re-rank the verified candidates by verified score (false: keep the similarity "
                                 "order, verify only)")

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class Verification:
    """The geometric check of one (query, keyframe) pair.

    Attributes:
        matches: putative descriptor matches after the ratio and mutual tests.
        inliers: matches that fit the TWO-VIEW model that verified the pair (``two_view_model``); the accept rules
            and the score use them.
        model: the model ``R`` and ``t`` come from: "pnp" (metric, keyframe depths), "essential", "homography" (a
            plane), "rotation" (a pure rotation), "fundamental" (no intrinsics: no motion) or "" (nothing fitted).
        R: (3, 3) rotation keyframe camera -> query camera, None without intrinsics (an ``ambiguous`` pair: the mean
            of its solutions, which is no claim: see ``alternatives``).
        t: (3,) translation: metres when ``metric``, else the unit direction when determined and zeros when not (a
            pure rotation, an ambiguous plane, no parallax to tell its sign); None without intrinsics.
        metric: ``t`` is in metres (PnP with keyframe depths and at least ``relative_pose.MIN_PNP_INLIERS`` PnP
            inliers of its own).
        error: noise of the chosen model's residuals in normalized image units (pixels / focal, ~radians), NaN
            when unknown.
        median_depth_m: median keyframe depth of the PnP inliers, NaN when not metric.
        passed: the pair passes min_inliers and min_inlier_ratio and its inliers are not degenerate.
        seconds: time the check took.
        two_view_model: "essential", "homography", "rotation" or "fundamental": the model that verified the pair.
        pnp_inliers: PnP's own inliers (0 without PnP); the metric motion's count.
        rotation_covariance: (3, 3) covariance of the rotation (right perturbation of the query camera's orientation
            in the keyframe camera's frame), from the fit; None without a rotation.
        covariance: (6, 6) over (x, y, z, rot_x, rot_y, rot_z) of the same perturbation of the query camera's pose,
            when ``metric``; else None.
        alternatives: the rotations of every motion that explains the matches (two for an ambiguous plane).
        ambiguous: two motions whose rotations disagree explain the matches (a plane seen without depth): no
            rotation is determined.
        degenerate: why the inliers are a degenerate configuration (the pair is then rejected), "" when they are
            not.
        pnp_degenerate: why PnP's inliers were not used for a metric motion (degenerate), "" otherwise.
        homography_ratio: ORB-SLAM's R_H = S_H / (S_H + S_E) of the pair (NaN without intrinsics).
        parallax_deg: median parallax of the essential matrix's inliers (degrees), NaN for other models.
        noise_px: the inliers' noise (pixels) estimated from the fit, NaN when unknown.
    """

    matches: int = 0
    inliers: int = 0
    model: str = ""
    R: np.ndarray | None = None
    t: np.ndarray | None = None
    metric: bool = False
    error: float = math.nan
    median_depth_m: float = math.nan
    passed: bool = False
    seconds: float = 0.0
    two_view_model: str = ""
    pnp_inliers: int = 0
    rotation_covariance: np.ndarray | None = None
    covariance: np.ndarray | None = None
    alternatives: tuple = ()
    ambiguous: bool = False
    degenerate: str = ""
    pnp_degenerate: str = ""
    homography_ratio: float = math.nan
    parallax_deg: float = math.nan
    noise_px: float = math.nan

    @property
    def inlier_ratio(self) -> float:
        return self.inliers / self.matches if self.matches else 0.0

    @property
    def score(self) -> float:
        """The verified score: ``inliers * inlier_ratio`` (0 when nothing fits)."""
        return float(self.inliers * self.inlier_ratio)

    @property
    def pose_inliers(self) -> int:
        """The inliers of the model the motion comes from (PnP's when metric)."""
        return self.pnp_inliers if self.metric else self.inliers


def _norm(kind: str) -> int:
    return cv2.NORM_HAMMING if kind == "orb" else cv2.NORM_L2


def _knn(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest descriptors of ``xb`` for each of ``xq``: (distances, indices) sorted; Hamming for binary
    descriptors (ORB), L2 otherwise.

    Binary descriptors go through faiss' flat binary index on ONE OpenMP thread (the calling thread's setting,
    restored after): 0.33 ms for 400 x 400 against OpenCV's 1.6 ms (thread CPU time, measured here); with more
    threads its OpenMP workers spin and stall for hundreds of ms on a busy 2-core machine.
    """
    if xq.dtype == np.uint8 and xq.shape[1] == DESCRIPTOR_BYTES["orb"]:
        import faiss  # the search library the maps use (imported on use, as in maps.index)

        previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            index = faiss.IndexBinaryFlat(8 * xq.shape[1])
            index.add(np.ascontiguousarray(xb))
            D, I = index.search(np.ascontiguousarray(xq), k)
        finally:
            faiss.omp_set_num_threads(previous)
        return D.astype(np.float32), I.astype(np.int64)
    return cv2.batchDistance(xq.astype(np.float32), xb.astype(np.float32), cv2.CV_32F, normType=cv2.NORM_L2, K=k)


def match_features(query: LocalFeatures, keyframe: LocalFeatures, ratio: float = 0.8,
                   mutual: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Putative matches: (iq, ik) index arrays into ``query`` and ``keyframe``.

    Args:
        query: the query's features.
        keyframe: the keyframe's features (same feature type).
        ratio: Lowe's ratio test threshold (1 disables it).
        mutual: keep a match only when it is also the keyframe feature's nearest query feature.

    Raises:
        ValueError: the two feature sets are of different types.
    """
    if query.kind != keyframe.kind:
        raise ValueError(f"cannot match {query.kind} features against {keyframe.kind} features: the map stores "
                         f"{keyframe.kind}; set features.type:={keyframe.kind}")
    empty = np.zeros(0, np.int64)
    if len(query) < 2 or len(keyframe) < 2:
        return empty, empty
    d2, i2 = _knn(query.descriptors, keyframe.descriptors, 2)  # the two nearest, sorted
    rows = np.arange(len(query))
    ik = i2[:, 0].astype(np.int64)
    keep = (ik >= 0) if ratio >= 1.0 else (ik >= 0) & (d2[:, 0] < ratio * d2[:, 1])
    if mutual and keep.any():  # reverse nearest neighbours of the matched keyframe features only
        used = np.unique(ik[keep])
        best_q = np.full(len(keyframe), -1, np.int64)
        best_q[used] = _knn(keyframe.descriptors[used], query.descriptors, 1)[1][:, 0]
        keep &= best_q[np.clip(ik, 0, None)] == rows
    return rows[keep].astype(np.int64), ik[keep].astype(np.int64)


def verify_pair(query: LocalFeatures, keyframe: LocalFeatures, config: VerificationConfig | None = None,
                query_camera: CameraModel | None = None, keyframe_camera: CameraModel | None = None,
                motion: bool = True) -> Verification:
    """Check whether ``query`` and ``keyframe`` see the same scene and, with intrinsics, how the camera moved.

    Args:
        query: the current frame's features.
        keyframe: the candidate keyframe's features (its depths make the pose metric).
        config: thresholds and accept rules.
        query_camera: intrinsics of the query's camera (None: fundamental matrix, no pose).
        keyframe_camera: intrinsics of the keyframe's camera.
        motion: with intrinsics, also estimate the motion (model selection, refinement, covariance, PnP); False
            checks the pair with RANSAC's essential matrix alone (its inliers, their spread): what ranking
            candidates needs (:func:`verify_candidates` estimates the motion of the best one only).

    Returns:
        The verification (``passed`` applies the accept rules and the configuration checks).
    """
    c = config or VerificationConfig()
    t0 = time.perf_counter()
    iq, ik = match_features(query, keyframe, c.ratio, c.mutual)
    n = int(iq.size)
    result = Verification(matches=n)
    # a pair with fewer putative matches than min_inliers cannot pass: no model is fitted (most wrong candidates)
    if n >= max(MIN_MATCHES, c.min_inliers):
        pq, pk = query.keypoints[iq].astype(np.float64), keyframe.keypoints[ik].astype(np.float64)
        sizes = _image_sizes(query, keyframe, query_camera, keyframe_camera)

        def spread(mask: np.ndarray) -> str:
            return _spread(pq, pk, mask, sizes)

        def degenerate(mask: np.ndarray) -> str:
            """The inliers' configuration where their count would pass (it is then the reason); where it fails, the
            matches' configuration (degenerate matches explain why nothing fits: a hostile keyframe)."""
            if _count_passes(int(mask.sum()), n, c):
                return spread(mask)
            return _spread(pq, pk, np.ones(n, bool), sizes, "matches")

        calibrated = query_camera is not None and keyframe_camera is not None
        try:
            if calibrated and motion:
                result = _fit_calibrated(pq, pk, keyframe.depths[ik], query_camera, keyframe_camera, c, degenerate,
                                         spread)
            elif calibrated:
                result = _fit_essential(pq, pk, query_camera, keyframe_camera, c, degenerate)
            else:
                result = _fit_fundamental(pq, pk, c, degenerate)
        except (cv2.error, np.linalg.LinAlgError) as exc:  # USAC asserts on degenerate samples (duplicates, a line)
            _logger.debug("model fitting failed on %d matches: %s", n, exc)
            result = Verification(degenerate=degenerate(np.ones(n, bool)))
        result = dataclasses.replace(result, matches=n)
    passed = _count_passes(result.inliers, n, c) and not result.degenerate
    return dataclasses.replace(result, passed=passed, seconds=time.perf_counter() - t0)


def _count_passes(inliers: int, matches: int, c: VerificationConfig) -> bool:
    """The accept rules on the counts: ``min_inliers`` and ``min_inlier_ratio``."""
    return (inliers >= max(c.min_inliers, MIN_MATCHES if c.min_inliers else 0) and inliers > 0
            and inliers >= c.min_inlier_ratio * matches)


def _image_sizes(query: LocalFeatures, keyframe: LocalFeatures, cam_q: CameraModel | None,
                 cam_k: CameraModel | None) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(query image size, keyframe image size or None when unknown): stored sizes first, else the intrinsics'."""
    q = tuple(query.image_size)
    if not (q[0] > 0 and q[1] > 0) and cam_q is not None:
        q = (cam_q.width, cam_q.height)
    k = tuple(keyframe.image_size)
    if not (k[0] > 0 and k[1] > 0):
        k = (cam_k.width, cam_k.height) if cam_k is not None else None
    return q, k


def _spread(pq: np.ndarray, pk: np.ndarray, mask: np.ndarray, sizes: tuple, what: str = "inliers") -> str:
    """Why the masked matches are a degenerate configuration in either image ("" when they are not)."""
    size_q, size_k = sizes
    return (spread_problem(pk[mask], size_k, size_q, "keyframe", what)
            or spread_problem(pq[mask], size_q, size_q, "query", what))


def _fit_fundamental(pq: np.ndarray, pk: np.ndarray, c: VerificationConfig,
                     degenerate: Callable[[np.ndarray], str]) -> Verification:
    F, mask = cv2.findFundamentalMat(pk, pq, cv2.USAC_MAGSAC, c.threshold_px, c.confidence, 10000)
    if F is None or mask is None:
        return Verification(degenerate=degenerate(np.ones(len(pq), bool)))
    inl = mask.reshape(-1).astype(bool)
    return Verification(inliers=int(inl.sum()), model="fundamental", two_view_model="fundamental",
                        degenerate=degenerate(inl))


def _fit_essential(pq: np.ndarray, pk: np.ndarray, cam_q: CameraModel, cam_k: CameraModel, c: VerificationConfig,
                   degenerate: Callable[[np.ndarray], str]) -> Verification:
    """RANSAC's essential matrix on normalized coordinates: its inliers and their spread (no motion)."""
    xq, xk = cam_q.normalized(pq), cam_k.normalized(pk)
    thr = c.threshold_px / (0.5 * (cam_q.focal + cam_k.focal))
    E, mask = cv2.findEssentialMat(xk, xq, np.eye(3), cv2.USAC_MAGSAC, c.confidence, thr)
    if E is None or mask is None or E.shape != (3, 3):
        return Verification(degenerate=degenerate(np.ones(len(pq), bool)))
    inl = mask.reshape(-1).astype(bool)
    return Verification(inliers=int(inl.sum()), model="essential", two_view_model="essential",
                        degenerate=degenerate(inl))


def _fit_calibrated(pq: np.ndarray, pk: np.ndarray, depths_k: np.ndarray, cam_q: CameraModel, cam_k: CameraModel,
                    c: VerificationConfig, degenerate: Callable[[np.ndarray], str],
                    spread: Callable[[np.ndarray], str]) -> Verification:
    """The two-view motion (and with keyframe depths the metric one), each checked for a degenerate configuration:
    degenerate two-view inliers reject the pair, degenerate PnP inliers only the metric motion (``pnp_degenerate``:
    the depths cover too little of the scene, the two-view motion stands)."""
    obs = Observations.from_pixels(pk, pq, cam_k, cam_q)
    estimate, info = fit_two_view(obs, c.threshold_px, c.confidence)
    if estimate is None:
        return Verification(degenerate=degenerate(np.ones(len(pq), bool)), homography_ratio=info.homography_ratio)
    out = Verification(inliers=estimate.count, model=estimate.model, two_view_model=estimate.model,
                       R=estimate.R, t=estimate.t, error=estimate.sigma_px / obs.focal,
                       rotation_covariance=estimate.rotation_covariance, alternatives=estimate.alternatives,
                       ambiguous=estimate.ambiguous, degenerate=degenerate(estimate.inliers),
                       homography_ratio=info.homography_ratio, parallax_deg=info.parallax_deg,
                       noise_px=estimate.sigma_px)
    if out.degenerate:
        return out
    metric = fit_pnp(obs, depths_k, c.threshold_px, c.confidence)
    if metric is None:
        return out
    problem = spread(metric.inliers)
    if problem:
        return dataclasses.replace(out, pnp_inliers=metric.count, pnp_degenerate=problem)
    return _with_metric(out, metric, depths_k, obs.focal)


def _with_metric(out: Verification, metric: MotionEstimate, depths_k: np.ndarray, focal: float) -> Verification:
    return dataclasses.replace(out, model="pnp", R=metric.R, t=metric.t, metric=True,
                               error=metric.sigma_px / focal, median_depth_m=float(np.median(depths_k[metric.inliers])),
                               pnp_inliers=metric.count, rotation_covariance=metric.rotation_covariance,
                               covariance=metric.covariance, alternatives=(metric.R,), ambiguous=False,
                               noise_px=metric.sigma_px)


def rotation_angle_deg(R: np.ndarray) -> float:
    """The angle of rotation matrix ``R`` in degrees (0 for the identity)."""
    cos = (float(np.trace(R)) - 1.0) / 2.0
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def verify_candidates(candidates: list, check_one: Callable[[object], Verification | None],
                      config: VerificationConfig, estimate_motion: Callable[[object], Verification | None] | None = None
                      ) -> tuple[list, list[Verification | None]]:
    """Verify the first ``config.candidates`` candidates and re-rank.

    Args:
        candidates: candidates best first by similarity (any objects; :class:`~dinomix_ros.localization.matching.
            Candidate` in the node).
        check_one: the verification of one candidate, None when it cannot be verified (no features stored).
        config: how many to verify, and whether to re-rank.
        estimate_motion: the full verification of one candidate, with its motion (``verify_pair(...,
            motion=True)``), when ``check_one`` checks without it: it is run for the best passed candidate (and
            for the next ones while it fails), so one motion is estimated per query, not one per candidate.

    Returns:
        (candidates, verifications) in the new order (verified and passed first by score, then the rest in their
        original order); verifications[i] belongs to candidates[i], None where not verified.
    """
    checks = [check_one(cand) if i < config.candidates else None for i, cand in enumerate(candidates)]

    def ranked() -> list[int]:
        order = list(range(len(candidates)))
        if config.rerank:
            def key(i: int) -> tuple:
                v = checks[i]
                return (0 if v is not None and v.passed else 1, -(v.score if v is not None else 0.0), i)
            order.sort(key=key)
        return order

    order = ranked()
    if estimate_motion is not None:
        for i in order:
            if checks[i] is None or not checks[i].passed:
                break
            checks[i] = estimate_motion(candidates[i]) or checks[i]
            if checks[i].passed:
                break
        order = ranked()
    return [candidates[i] for i in order], [checks[i] for i in order]
