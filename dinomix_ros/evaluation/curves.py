"""Precision/recall of "accept the best match when its similarity reaches a threshold", and which threshold to use.

:func:`precision_recall_curve` gives a :class:`PRCurve` over every distinct best-match score; the curve answers
the calibration question of the live node's ``min_similarity``: :meth:`PRCurve.threshold_for_precision` (the lowest
threshold reaching a target precision, i.e. the most recall at that precision), :meth:`PRCurve.operating_point`
(what one threshold does) and :meth:`PRCurve.max_f1`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dinomix_ros.evaluation.inputs import EvaluationError, as_bool_vector, finite_or_none

__all__ = ["OperatingPoint", "PRCurve", "precision_recall_curve"]

_PRECISION_TOL = 1e-12  # precision 9/10 must count as reaching a target of 0.9


@dataclass(frozen=True)
class OperatingPoint:
    """What a similarity threshold does: queries with best score >= ``threshold`` are accepted as matches.

    Attributes:
        threshold: the similarity threshold.
        precision: correct accepted / accepted (1.0 when nothing is accepted: no false match).
        recall: correct accepted / queries that have a positive.
        f1: harmonic mean of precision and recall (0 when both are 0).
        accepted: queries accepted.
        true_positives: accepted queries whose best match is correct.
    """

    threshold: float
    precision: float
    recall: float
    f1: float
    accepted: int
    true_positives: int

    @property
    def false_positives(self) -> int:
        """Accepted queries whose best match is wrong (false loops)."""
        return self.accepted - self.true_positives

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {
            "threshold": finite_or_none(self.threshold),
            "precision": float(self.precision),
            "recall": float(self.recall),
            "f1": float(self.f1),
            "accepted": int(self.accepted),
            "true_positives": int(self.true_positives),
            "false_positives": int(self.false_positives),
        }


def _f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    denom = precision + recall
    return np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)


@dataclass(frozen=True, eq=False)
class PRCurve:
    """Precision and recall of "accept the best match if its score >= threshold", for every distinct score.

    Build it with :func:`precision_recall_curve`. Point ``k`` accepts every query whose score is >= ``thresholds[k]``
    (ties are accepted together); thresholds descend, so recall never decreases along the curve.

    Attributes:
        thresholds: (K,) distinct scores, descending.
        accepted: (K,) queries accepted at each threshold.
        true_positives: (K,) accepted queries whose best match is correct.
        num_queries: queries on the curve.
        num_positives: queries that have at least one true match (the recall denominator).
    """

    thresholds: np.ndarray
    accepted: np.ndarray
    true_positives: np.ndarray
    num_queries: int
    num_positives: int

    @property
    def precision(self) -> np.ndarray:
        """(K,) correct accepted / accepted."""
        return self.true_positives / self.accepted

    @property
    def recall(self) -> np.ndarray:
        """(K,) correct accepted / queries with a positive (all zeros when no query has one)."""
        return self.true_positives / max(self.num_positives, 1)

    @property
    def average_precision(self) -> float:
        """Step-wise area under the curve, sum_k (R_k - R_{k-1}) P_k with R_0 = 0; NaN when no query has a positive.

        A perfect ranking (every correct query scored above every wrong one, and every query with a positive
        correct) gives 1.0.
        """
        if self.num_positives == 0:
            return math.nan
        recall = self.recall
        return float(np.sum(np.diff(recall, prepend=0.0) * self.precision))

    def operating_point(self, threshold: float) -> OperatingPoint:
        """Precision, recall and counts when accepting every query with score >= ``threshold``."""
        threshold = float(threshold)
        if math.isnan(threshold):
            raise EvaluationError("threshold is NaN; expected a similarity value such as 0.5")
        # Number of curve thresholds >= threshold; the lowest of them accepts the same queries as `threshold`.
        k = int(np.count_nonzero(self.thresholds >= threshold))
        if k == 0:
            return OperatingPoint(threshold, 1.0, 0.0, 0.0, 0, 0)
        return self._point(k - 1, threshold)

    def _point(self, k: int, threshold: float | None = None) -> OperatingPoint:
        precision = float(self.precision[k])
        recall = float(self.recall[k])
        f1 = float(_f1(np.array([precision]), np.array([recall]))[0])
        return OperatingPoint(
            float(self.thresholds[k]) if threshold is None else threshold,
            precision,
            recall,
            f1,
            int(self.accepted[k]),
            int(self.true_positives[k]),
        )

    def _reaching(self, target: float) -> np.ndarray:
        target = float(target)
        if not 0.0 <= target <= 1.0:
            raise EvaluationError(f"target precision {target} is outside [0, 1]; pass e.g. 0.99 for 99 %")
        return np.flatnonzero(self.precision >= target - _PRECISION_TOL)

    def threshold_for_precision(self, target: float) -> float | None:
        """Lowest threshold whose precision is >= ``target``, i.e. the most recall at that precision.

        Args:
            target: required precision in [0, 1] (e.g. 1.0 for "no false loop on this data").

        Returns:
            The threshold, or None if no threshold reaches ``target``.
        """
        idx = self._reaching(target)
        return float(self.thresholds[idx[-1]]) if idx.size else None

    def recall_at_precision(self, target: float) -> float:
        """Highest recall among thresholds with precision >= ``target``; 0.0 if none reaches it."""
        idx = self._reaching(target)
        return float(self.recall[idx[-1]]) if idx.size else 0.0

    def max_f1(self) -> OperatingPoint:
        """The point with the highest F1 (the highest threshold among ties)."""
        return self._point(int(np.argmax(_f1(self.precision, self.recall))))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: the curve as lists plus AP and the max-F1 point."""
        return {
            "num_queries": int(self.num_queries),
            "num_positives": int(self.num_positives),
            "average_precision": finite_or_none(self.average_precision),
            "max_f1": self.max_f1().to_dict(),
            "thresholds": [float(t) for t in self.thresholds],
            "precision": [float(p) for p in self.precision],
            "recall": [float(r) for r in self.recall],
            "accepted": [int(a) for a in self.accepted],
            "true_positives": [int(t) for t in self.true_positives],
        }


def precision_recall_curve(
    scores: npt.ArrayLike, correct: npt.ArrayLike, has_positive: npt.ArrayLike
) -> PRCurve:
    """Precision and recall of accepting each query's best match when its score >= threshold, for every threshold.

    Args:
        scores: (Q,) finite similarity of each query's best match.
        correct: (Q,) whether that best match is a true match.
        has_positive: (Q,) whether the query has any true match at all (the recall denominator counts these).

    Returns:
        The curve over the distinct scores, descending; tied scores are accepted together.

    Raises:
        EvaluationError: on empty or mismatched inputs, non-finite scores, or a query that is ``correct`` without
            ``has_positive``.
    """
    s = np.asarray(scores)
    if s.ndim != 1 or not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise EvaluationError(f"scores has shape {s.shape} and dtype {s.dtype}; expected a 1-D float array")
    if s.size == 0:
        raise EvaluationError("scores is empty; expected one best-match score per query")
    s = s.astype(np.float64, copy=False)
    if not np.isfinite(s).all():
        raise EvaluationError(
            f"scores holds {int((~np.isfinite(s)).sum())} non-finite values; expected finite similarities "
            "(leave out queries that have no candidate at all)"
        )
    ok = as_bool_vector(correct, "correct", s.size)
    pos = as_bool_vector(has_positive, "has_positive", s.size)
    impossible = np.flatnonzero(ok & ~pos)
    if impossible.size:
        raise EvaluationError(
            f"queries {impossible[:5].tolist()} are marked correct but have no positive; expected correct to "
            "imply has_positive"
        )

    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    tp_cum = np.cumsum(ok[order], dtype=np.int64)
    # Last position of each run of equal scores: a threshold accepts every query tied with it.
    last = np.append(np.flatnonzero(np.diff(s_sorted) != 0), s.size - 1)
    return PRCurve(
        thresholds=s_sorted[last],
        accepted=(last + 1).astype(np.int64),
        true_positives=tp_cum[last],
        num_queries=int(s.size),
        num_positives=int(pos.sum()),
    )
