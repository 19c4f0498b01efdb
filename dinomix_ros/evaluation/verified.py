"""The same loop-closure queries with and without geometric verification, side by side.

:func:`compare_loop_closures` takes what :func:`~dinomix_ros.evaluation.loops.evaluate_loop_closures` takes (the
frame similarity matrix, the ground truth, ``exclude_recent``) plus each frame's local features, and does what the
live node does per query: the best ``verification.candidates`` past frames by similarity are verified
(:mod:`dinomix_ros.localization.verification`) and re-ranked. It reports, on the same queries:

* Recall@N before and after re-ranking;
* the accepted loop closures without verification (best candidate with similarity >= ``min_similarity``) and with
  it (re-ranked best, verified, similarity >= ``min_similarity``): how many, precision, recall;
* the precision/recall curve of the verified score (the re-ranked best's ``inliers x inlier ratio``);
* the verification time per query (p50/p95).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dinomix_ros.evaluation.curves import PRCurve, precision_recall_curve
from dinomix_ros.evaluation.inputs import EvaluationError, as_bool_matrix, as_similarity
from dinomix_ros.evaluation.loops import LOOP_NS, _ranked_candidates  # one ranking, shared with loops
from dinomix_ros.evaluation.retrieval import RecallResult, recall_at_n
from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.imaging.features import LocalFeatures
from dinomix_ros.localization.verification import VerificationConfig, verify_candidates, verify_pair

__all__ = ["VerifiedComparison", "compare_loop_closures"]

_logger = logging.getLogger(__name__)

_REPORTED_SETTINGS = ("candidates", "ratio", "mutual", "threshold_px", "min_inliers", "min_inlier_ratio", "rerank")


@dataclass(frozen=True, eq=False)
class VerifiedComparison:
    """Loop closure with and without verification on the same queries (see the module docstring).

    Attributes:
        recall_before: Recall@N by similarity.
        recall_after: Recall@N after re-ranking by verified score.
        without: accepted loop closures without verification: ``accepted``, ``correct``, ``precision``, ``recall``.
        with_verification: the same with verification.
        verified_curve: PR curve of the re-ranked best's verified score.
        min_similarity: the similarity threshold of both accept rules.
        verify_ms: (Q,) verification time per query in milliseconds.
        best_after: (N,) re-ranked best column per frame (-1: no candidate).
        verified: (N,) whether the re-ranked best passed verification.
        inliers: (N,) its inliers.
        config: the verification settings used.
    """

    recall_before: RecallResult
    recall_after: RecallResult
    without: dict[str, Any]
    with_verification: dict[str, Any]
    verified_curve: PRCurve
    min_similarity: float
    verify_ms: np.ndarray
    best_after: np.ndarray
    verified: np.ndarray
    inliers: np.ndarray
    config: VerificationConfig

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (``report.json``'s ``verification``)."""
        ms = self.verify_ms
        return {
            "settings": {k: getattr(self.config, k) for k in _REPORTED_SETTINGS},
            "min_similarity": self.min_similarity,
            "recall_before": self.recall_before.to_dict(),
            "recall_after": self.recall_after.to_dict(),
            "without_verification": self.without,
            "with_verification": self.with_verification,
            "verified_score_pr_curve": self.verified_curve.to_dict(),
            "verified_score_average_precision": self.verified_curve.average_precision,
            "verification_ms": {"p50": float(np.percentile(ms, 50)) if ms.size else math.nan,
                                "p95": float(np.percentile(ms, 95)) if ms.size else math.nan},
        }


def _accepted(accept: np.ndarray, correct: np.ndarray, reachable: np.ndarray) -> dict[str, Any]:
    n, good = int(accept.sum()), int((accept & correct).sum())
    return {"accepted": n, "correct": good, "precision": good / n if n else math.nan,
            "recall": good / int(reachable.sum()) if reachable.any() else math.nan}


def compare_loop_closures(similarity: np.ndarray, ground_truth: np.ndarray, features: Sequence[LocalFeatures],
                          *, exclude_recent: int = 10, config: VerificationConfig | None = None,
                          min_similarity: float = 0.5, cameras: Sequence[CameraModel | None] | None = None,
                          ns: Sequence[int] = LOOP_NS) -> VerifiedComparison:
    """Loop closure with and without verification (see the module docstring).

    Args:
        similarity: (N, N) frame similarity (unit descriptors' inner products).
        ground_truth: (N, N) bool loops (used symmetrically, like :func:`evaluate_loop_closures`).
        features: each frame's local features.
        exclude_recent: frames just before the query that are never candidates.
        config: verification settings (candidates verified, thresholds, re-ranking).
        min_similarity: similarity threshold of both accept rules.
        cameras: each frame's intrinsics (None: fundamental matrix).
        ns: the N of Recall@N.

    Raises:
        EvaluationError: mismatched sizes, or no frame with a candidate.
    """
    c = config or VerificationConfig()
    sim = as_similarity(similarity, square=True)
    n = sim.shape[0]
    gt = as_bool_matrix(ground_truth, "ground_truth", sim.shape)
    gt = gt | gt.T
    if len(features) != n or (cameras is not None and len(cameras) != n):
        raise EvaluationError(f"{len(features)} feature sets for {n} frames; expected one per frame")
    num_candidates = np.clip(np.arange(n) - exclude_recent, 0, None)
    is_query = num_candidates > 0
    if not is_query.any():
        raise EvaluationError(f"no frame has a candidate ({n} frames, exclude_recent {exclude_recent})")
    k = max(max(ns), c.candidates)
    ranked = _ranked_candidates(sim, num_candidates, k)
    reranked = ranked.copy()
    best_verified = np.zeros(n, bool)
    inliers = np.zeros(n, np.int64)
    score = np.zeros(n)
    times = []
    for i in np.flatnonzero(is_query):
        cands = [int(j) for j in ranked[i] if j >= 0]
        cam_i = cameras[i] if cameras is not None else None
        t0 = time.perf_counter()
        order, checks = verify_candidates(
            cands, lambda j: verify_pair(features[i], features[j], c, cam_i, cameras[j] if cameras else None), c)
        times.append((time.perf_counter() - t0) * 1e3)
        reranked[i, :len(order)] = order
        if checks and checks[0] is not None:
            best_verified[i], inliers[i], score[i] = checks[0].passed, checks[0].inliers, checks[0].score
    candidate_mask = np.arange(n)[None, :] < num_candidates[:, None]
    reachable = (gt & candidate_mask).any(axis=1) & is_query
    positives = [np.flatnonzero(r) for r in (gt & candidate_mask)[is_query]]
    recall_before = recall_at_n(ranked[is_query, :max(ns)], positives, ns)
    recall_after = recall_at_n(reranked[is_query, :max(ns)], positives, ns)
    rows = np.arange(n)
    best0, best1 = np.clip(ranked[:, 0], 0, None), np.clip(reranked[:, 0], 0, None)
    correct0 = is_query & gt[rows, best0]
    correct1 = is_query & gt[rows, best1]
    accept0 = is_query & (sim[rows, best0] >= min_similarity)
    accept1 = is_query & best_verified & (sim[rows, best1] >= min_similarity)
    curve = precision_recall_curve(np.where(best_verified, score, 0.0)[is_query], correct1[is_query],
                                   reachable[is_query])
    result = VerifiedComparison(recall_before, recall_after, _accepted(accept0, correct0, reachable),
                                _accepted(accept1, correct1, reachable), curve, float(min_similarity),
                                np.asarray(times), np.where(is_query, reranked[:, 0], -1), best_verified & is_query,
                                inliers, c)
    _logger.info("loop closure with verification: precision %.3f recall %.3f (without: precision %.3f recall %.3f); "
                 "%s after re-ranking (before: %s)", result.with_verification["precision"],
                 result.with_verification["recall"], result.without["precision"], result.without["recall"],
                 recall_after.summary(), recall_before.summary())
    return result
