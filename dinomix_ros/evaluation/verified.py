"""The same queries with and without geometric verification, side by side (every ``dinomix map eval`` setup).

:func:`compare_search` takes a search's results (similarities and database rows per query, best first), the correct
rows of each query and a verification of (query, database row), and does what the live node does per query: the
best ``verification.candidates`` candidates by similarity are verified (:mod:`dinomix_ros.localization.
verification`) and re-ranked. :func:`compare_loop_closures` is the loop-closure setup on top of it (what
:func:`~dinomix_ros.evaluation.loops.evaluate_loop_closures` takes, plus each frame's local features). Reported, on
the same queries:

* Recall@N before and after re-ranking;
* the accepted matches without verification (best candidate with similarity >= ``min_similarity``) and with it
  (re-ranked best, verified, similarity >= ``min_similarity``): how many, precision, recall;
* the precision/recall curve of the verified score (the re-ranked best's ``inliers x inlier ratio``);
* the verification time per query (p50/p95).
"""

from __future__ import annotations

import functools

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from dinomix_ros.evaluation.curves import PRCurve, precision_recall_curve
from dinomix_ros.evaluation.inputs import EvaluationError, as_bool_matrix, as_similarity
from dinomix_ros.evaluation.loops import LOOP_NS, _ranked_candidates  # one ranking, shared with loops
from dinomix_ros.evaluation.retrieval import RecallResult, recall_at_n
from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.imaging.features import LocalFeatures
from dinomix_ros.localization.verification import Verification, VerificationConfig, verify_candidates, verify_pair

__all__ = ["VerifiedComparison", "compare_loop_closures", "compare_search"]

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
        best_after: (Q,) re-ranked best database row per query (-1: no candidate).
        verified: (Q,) whether the re-ranked best passed verification.
        inliers: (Q,) its inliers.
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
    queries = np.flatnonzero(num_candidates > 0)
    if not queries.size:
        raise EvaluationError(f"no frame has a candidate ({n} frames, exclude_recent {exclude_recent})")
    ranked = _ranked_candidates(sim, num_candidates, max(max(ns), c.candidates))[queries]
    scores = np.take_along_axis(sim[queries], np.clip(ranked, 0, None), axis=1)
    candidate_mask = np.arange(n)[None, :] < num_candidates[queries, None]
    positives = [np.flatnonzero(r) for r in gt[queries] & candidate_mask]

    def check(q: int, row: int, motion: bool = False) -> Verification:
        i = int(queries[q])
        return verify_pair(features[i], features[row], c, cameras[i] if cameras is not None else None,
                           cameras[row] if cameras is not None else None, motion=motion)

    return compare_search(scores, ranked, positives, check, config=c, min_similarity=min_similarity, ns=ns,
                          estimate=functools.partial(check, motion=True))


def compare_search(D: np.ndarray, I: np.ndarray, positives: Sequence[np.ndarray],
                   check: Callable[[int, int], Verification | None], *, config: VerificationConfig | None = None,
                   min_similarity: float = 0.5, ns: Sequence[int] = LOOP_NS,
                   estimate: Callable[[int, int], Verification | None] | None = None) -> VerifiedComparison:
    """Search results with and without verification: the core of every evaluation setup.

    Args:
        D: (Q, K) similarities of each query's candidates, best first.
        I: (Q, K) their database rows (-1 padding).
        positives: per query, the database rows that are correct matches.
        check: ``check(q, row)``: the verification of query ``q`` against database row ``row`` (None: cannot).
        config: how many candidates are verified, thresholds, re-ranking.
        min_similarity: similarity threshold of both accept rules.
        ns: the N of Recall@N (at most K).
        estimate: ``estimate(q, row)``: the verification with the motion estimated, when ``check`` checks without
            it (``verify_pair(..., motion=False)``): run for the best passed candidate only, as the node does
            (:func:`~dinomix_ros.localization.verification.verify_candidates`).

    Raises:
        EvaluationError: no query.
    """
    c = config or VerificationConfig()
    nq = I.shape[0]
    if nq == 0:
        raise EvaluationError("no query to evaluate")
    reranked = I.copy()
    resorted = D.copy()
    verified = np.zeros(nq, bool)
    inliers = np.zeros(nq, np.int64)
    score = np.zeros(nq)
    times = []
    for q in range(nq):
        cands = [k for k in range(I.shape[1]) if I[q, k] >= 0]
        t0 = time.perf_counter()
        order, checks = verify_candidates(cands, lambda k: check(q, int(I[q, k])), c,
                                          None if estimate is None else lambda k: estimate(q, int(I[q, k])))
        times.append((time.perf_counter() - t0) * 1e3)
        reranked[q, :len(order)] = I[q, order]
        resorted[q, :len(order)] = D[q, order]
        if checks and checks[0] is not None:
            verified[q], inliers[q], score[q] = checks[0].passed, checks[0].inliers, checks[0].score
    k = max(ns)
    reachable = np.array([p.size > 0 for p in positives], bool)
    correct0 = np.array([I[q, 0] >= 0 and bool(np.isin(I[q, 0], positives[q])) for q in range(nq)], bool)
    correct1 = np.array([reranked[q, 0] >= 0 and bool(np.isin(reranked[q, 0], positives[q])) for q in range(nq)],
                        bool)
    accept0 = (I[:, 0] >= 0) & (D[:, 0] >= min_similarity)
    accept1 = verified & (reranked[:, 0] >= 0) & (resorted[:, 0] >= min_similarity)
    result = VerifiedComparison(recall_at_n(I[:, :k], list(positives), ns), recall_at_n(reranked[:, :k],
                                                                                        list(positives), ns),
                                _accepted(accept0, correct0, reachable), _accepted(accept1, correct1, reachable),
                                precision_recall_curve(np.where(verified, score, 0.0), correct1, reachable),
                                float(min_similarity), np.asarray(times), reranked[:, 0], verified, inliers, c)
    _logger.info("with verification: precision %.3f recall %.3f (without: precision %.3f recall %.3f); %s after "
                 "re-ranking (before: %s)", result.with_verification["precision"], result.with_verification["recall"],
                 result.without["precision"], result.without["recall"], result.recall_after.summary(),
                 result.recall_before.summary())
    return result
