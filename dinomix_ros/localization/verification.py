"""Geometric verification of place-match candidates: do the query and a keyframe see the same 3-D scene? (ROS-free)

For a query frame and a candidate keyframe, both with :class:`~dinomix_ros.imaging.features.LocalFeatures`:

1. descriptor matching (:func:`match_features`): nearest neighbours with Lowe's ratio test and a mutual check;
2. robust model fitting with OpenCV's USAC MAGSAC++ (:func:`verify_pair`): the essential matrix on undistorted
   normalized coordinates when both cameras' intrinsics are known, else the fundamental matrix on pixels. When a
   rotation alone explains the essential matrix's inliers (least squares on the rays, Kabsch), the rotation comes
   from that fit: a zero baseline leaves the essential matrix's translation, and so recoverPose, undetermined;
3. with intrinsics, the relative pose: rotation and translation direction (``cv2.recoverPose``); with keypoint
   depths on the keyframe side, a metric 6-DoF pose by PnP + RANSAC (``cv2.solvePnPRansac``, SQPNP refinement);
4. the verified score, ``inliers * inlier_ratio`` (many matches of which few fit one geometry is what unrelated
   places give), and the accept rules ``verification.min_inliers`` and ``verification.min_inlier_ratio``.

:func:`verify_candidates` verifies the top candidates of a query and re-ranks them: verified candidates first, by
verified score, then the rest in their similarity order. The relative pose convention: ``R``, ``t`` map keyframe
camera coordinates to query camera coordinates (``X_q = R X_k + t``).
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
from dinomix_ros.settings import check, setting

__all__ = ["VerificationConfig", "Verification", "match_features", "verify_pair", "verify_candidates",
           "rotation_angle_deg", "MIN_MATCHES"]

_logger = logging.getLogger(__name__)

#: Fewer putative matches than this cannot be verified (the fundamental matrix needs 7, PnP 4 + margin).
MIN_MATCHES = 8
_PURE_ROTATION_TOLERANCE = 0.03  # singular values of the normalized homography within 3 % of each other
_PNP_MIN_POINTS = 6
_PNP_REFINE_ROUNDS = 5  # PnP: refine, re-select inliers at a wider threshold, refine again (see _pnp)
_PNP_REFINE_FACTOR = 2.0


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
        inliers: matches that fit the fitted model.
        model: "essential", "fundamental", "rotation" (pure rotation from a homography), "pnp" or "" (not fitted).
        R: (3, 3) rotation keyframe camera -> query camera, None without intrinsics.
        t: (3,) translation (unit direction unless ``metric``; zero for a pure rotation), None without intrinsics.
        metric: ``t`` is in metres (PnP with keyframe depths).
        error: RMS residual of the inliers in normalized image units (~radians), NaN when unknown.
        median_depth_m: median keyframe depth of the PnP inliers, NaN when not metric.
        passed: the pair passes min_inliers and min_inlier_ratio.
        seconds: time the check took.
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

    @property
    def inlier_ratio(self) -> float:
        return self.inliers / self.matches if self.matches else 0.0

    @property
    def score(self) -> float:
        """The verified score: ``inliers * inlier_ratio`` (0 when nothing fits)."""
        return float(self.inliers * self.inlier_ratio)


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
                query_camera: CameraModel | None = None, keyframe_camera: CameraModel | None = None) -> Verification:
    """Check whether ``query`` and ``keyframe`` see the same scene and, with intrinsics, how the camera moved.

    Args:
        query: the current frame's features.
        keyframe: the candidate keyframe's features (its depths make the pose metric).
        config: thresholds and accept rules.
        query_camera: intrinsics of the query's camera (None: fundamental matrix, no pose).
        keyframe_camera: intrinsics of the keyframe's camera.

    Returns:
        The verification (``passed`` applies the accept rules).
    """
    c = config or VerificationConfig()
    t0 = time.perf_counter()
    iq, ik = match_features(query, keyframe, c.ratio, c.mutual)
    n = int(iq.size)
    result = Verification(matches=n)
    # a pair with fewer putative matches than min_inliers cannot pass: no model is fitted (most wrong candidates)
    if n >= max(MIN_MATCHES, c.min_inliers):
        pq, pk = query.keypoints[iq].astype(np.float64), keyframe.keypoints[ik].astype(np.float64)
        try:
            if query_camera is not None and keyframe_camera is not None:
                result = _fit_calibrated(pq, pk, keyframe.depths[ik], query_camera, keyframe_camera, c)
            else:
                result = _fit_fundamental(pq, pk, c)
        except cv2.error as exc:  # USAC asserts on degenerate samples (all matches on a line, duplicates)
            _logger.debug("model fitting failed on %d matches: %s", n, exc)
            result = Verification()
        result = dataclasses.replace(result, matches=n)
    passed = (result.inliers >= max(c.min_inliers, MIN_MATCHES if c.min_inliers else 0)
              and result.inlier_ratio >= c.min_inlier_ratio and result.inliers > 0)
    return dataclasses.replace(result, passed=passed, seconds=time.perf_counter() - t0)


def _fit_fundamental(pq: np.ndarray, pk: np.ndarray, c: VerificationConfig) -> Verification:
    F, mask = cv2.findFundamentalMat(pk, pq, cv2.USAC_MAGSAC, c.threshold_px, c.confidence, 10000)
    if F is None or mask is None:
        return Verification()
    return Verification(inliers=int(mask.sum()), model="fundamental")


def _fit_calibrated(pq: np.ndarray, pk: np.ndarray, depths_k: np.ndarray, cam_q: CameraModel, cam_k: CameraModel,
                    c: VerificationConfig) -> Verification:
    """Essential matrix (or pure rotation) on normalized coordinates; PnP when the keyframe has depths."""
    xq, xk = cam_q.normalized(pq), cam_k.normalized(pk)
    thr = c.threshold_px / (0.5 * (cam_q.focal + cam_k.focal))
    E, mask = cv2.findEssentialMat(xk, xq, np.eye(3), cv2.USAC_MAGSAC, c.confidence, thr)
    if E is None or mask is None or E.shape != (3, 3):
        return Verification()
    inl = mask.reshape(-1).astype(bool)
    rotation = _pure_rotation(xk, xq, inl, thr)
    if rotation is not None:
        R, inl = rotation
        err = _rotation_residual(R, xk[inl], xq[inl])
        out = Verification(inliers=int(inl.sum()), model="rotation", R=R, t=np.zeros(3), error=err)
    else:
        _, R, t, pose_mask = cv2.recoverPose(E, xk, xq, np.eye(3), mask=mask.copy())
        err = _sampson_rms(E, xk[inl], xq[inl])
        out = Verification(inliers=int(inl.sum()), model="essential", R=R, t=t.reshape(3), error=err)
    metric = _pnp(xq, xk, depths_k, thr, c)
    if metric is not None:
        R, t, n_inl, err, depth = metric
        out = dataclasses.replace(out, model="pnp", R=R, t=t, metric=True, error=err, median_depth_m=depth,
                                  inliers=max(out.inliers, n_inl))
    return out


def _pure_rotation(xk: np.ndarray, xq: np.ndarray, inl: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(R, inlier mask) when a rotation alone (``x_q ~ R x_k``) explains 90 % of the essential matrix's inliers."""
    if inl.sum() < MIN_MATCHES:
        return None
    R = _kabsch(xk[inl], xq[inl])
    p = np.c_[xk, np.ones(len(xk))] @ R.T
    residual = np.linalg.norm(p[:, :2] / np.where(np.abs(p[:, 2:3]) > 1e-12, p[:, 2:3], 1e-12) - xq, axis=1)
    fits = residual < thr
    if (fits & inl).sum() < 0.9 * inl.sum():
        return None
    return _kabsch(xk[fits], xq[fits]), fits


def _kabsch(xk: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """The rotation that best maps the rays of ``xk`` onto those of ``xq`` (least squares on unit rays)."""
    a, b = (np.c_[x, np.ones(len(x))] for x in (xk, xq))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    U, _, Vt = np.linalg.svd(b.T @ a)
    return U @ np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))]) @ Vt


def _rotation_residual(R: np.ndarray, xk: np.ndarray, xq: np.ndarray) -> float:
    if xk.shape[0] == 0:
        return math.nan
    p = (R @ np.c_[xk, np.ones(len(xk))].T).T
    return float(np.sqrt(np.mean(np.sum((p[:, :2] / p[:, 2:3] - xq) ** 2, axis=1))))


def _sampson_rms(E: np.ndarray, xk: np.ndarray, xq: np.ndarray) -> float:
    if xk.shape[0] == 0:
        return math.nan
    a, b = np.c_[xk, np.ones(len(xk))], np.c_[xq, np.ones(len(xq))]
    Ea, Etb = a @ E.T, b @ E
    num = np.sum(b * Ea, axis=1) ** 2
    den = Ea[:, 0] ** 2 + Ea[:, 1] ** 2 + Etb[:, 0] ** 2 + Etb[:, 1] ** 2
    return float(np.sqrt(np.mean(num / np.maximum(den, 1e-18))))


def _pnp(xq: np.ndarray, xk: np.ndarray, depths_k: np.ndarray, thr: float,
         c: VerificationConfig) -> tuple[np.ndarray, np.ndarray, int, float, float] | None:
    """Metric pose of the query camera from keyframe 3-D points (depth x ray) and query rays; None if too few."""
    has = np.isfinite(depths_k) & (depths_k > 0)
    if has.sum() < max(_PNP_MIN_POINTS, c.min_inliers // 2):
        return None
    X = np.c_[xk[has], np.ones(int(has.sum()))] * depths_k[has, None]
    ok, rvec, tvec, inl = cv2.solvePnPRansac(X, xq[has], np.eye(3), None, iterationsCount=1000,
                                             reprojectionError=thr, confidence=c.confidence,
                                             flags=cv2.SOLVEPNP_SQPNP)
    if not ok or inl is None or len(inl) < _PNP_MIN_POINTS:
        return None
    x = xq[has]
    idx = inl.reshape(-1)
    # Refine on the inliers, then re-select them under the refined pose (at a wider threshold) and refine again:
    # a plane seen by a narrow camera couples rotation and translation, and the first minimal-sample consensus
    # alone left 2-8 % translation errors on the warped-plane tests; this gives 0.5-2.5 %.
    for _ in range(_PNP_REFINE_ROUNDS):
        rvec, tvec = cv2.solvePnPRefineLM(X[idx], x[idx], np.eye(3), None, rvec, tvec)
        R, _ = cv2.Rodrigues(rvec)
        proj = (R @ X.T).T + tvec.reshape(3)
        with np.errstate(divide="ignore", invalid="ignore"):
            residual = np.linalg.norm(proj[:, :2] / proj[:, 2:3] - x, axis=1)
        wider = np.flatnonzero((residual < _PNP_REFINE_FACTOR * thr) & (proj[:, 2] > 0))
        if wider.size < _PNP_MIN_POINTS or np.array_equal(wider, idx):
            break
        idx = wider
    R, _ = cv2.Rodrigues(rvec)
    proj = (R @ X[idx].T).T + tvec.reshape(3)
    err = float(np.sqrt(np.mean(np.sum((proj[:, :2] / proj[:, 2:3] - x[idx]) ** 2, axis=1))))
    return R, tvec.reshape(3), int(idx.size), err, float(np.median(X[idx, 2]))


def rotation_angle_deg(R: np.ndarray) -> float:
    """The angle of rotation matrix ``R`` in degrees (0 for the identity)."""
    cos = (float(np.trace(R)) - 1.0) / 2.0
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def verify_candidates(candidates: list, check_one: Callable[[object], Verification | None],
                      config: VerificationConfig) -> tuple[list, list[Verification | None]]:
    """Verify the first ``config.candidates`` candidates and re-rank.

    Args:
        candidates: candidates best first by similarity (any objects; :class:`~dinomix_ros.localization.matching.
            Candidate` in the node).
        check_one: the verification of one candidate, None when it cannot be verified (no features stored).
        config: how many to verify, and whether to re-rank.

    Returns:
        (candidates, verifications) in the new order (verified and passed first by score, then the rest in their
        original order); verifications[i] belongs to candidates[i], None where not verified.
    """
    checks = [check_one(cand) if i < config.candidates else None for i, cand in enumerate(candidates)]
    order = list(range(len(candidates)))
    if config.rerank:
        def key(i: int) -> tuple:
            v = checks[i]
            return (0 if v is not None and v.passed else 1, -(v.score if v is not None else 0.0), i)
        order.sort(key=key)
    return [candidates[i] for i in order], [checks[i] for i in order]
