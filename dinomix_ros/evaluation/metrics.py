"""How good is a map, and which similarity threshold should the live node use.

Ground truth, metrics and plots for visual place recognition with DINO-Mix (4096-d unit descriptors, similarity =
inner product):

- geometric ground truth: :func:`positives_within` (database entries within ``radius_m`` metres of each query, the
  25 m protocol of gmberton/VPR-methods-evaluation);
- Recall@N (:func:`recall_at_n`): share of queries with at least one true positive among their top N predictions;
  queries without any positive in the database are left out of the denominator and counted separately;
- calibration of the node's ``min_similarity``: :func:`precision_recall_curve` over the best match's score;
- loop closure against RTAB-Map ground truth (:func:`load_loop_closure_ground_truth`, the ``rtabmap-console -gt``
  image format): :func:`evaluate_loop_closures` (causal: past frames only) and :func:`evaluate_relocalization`
  (queries against a map built beforehand);
- PNG plots (matplotlib, Agg canvas, imported lazily): :func:`plot_recall_at_n`, :func:`plot_pr_curve`,
  :func:`plot_similarity_matrix`.

Every result type has ``to_dict()`` returning plain ``int``/``float``/``list``/``None`` values for ``json.dump``
(non-finite floats become ``None``).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_RADIUS_M",
    "DEFAULT_NS",
    "EvaluationError",
    "GroundTruthFormatError",
    "RecallResult",
    "OperatingPoint",
    "PRCurve",
    "LoopClosureReport",
    "positives_within",
    "recall_at_n",
    "precision_recall_curve",
    "load_loop_closure_ground_truth",
    "evaluate_loop_closures",
    "evaluate_relocalization",
    "plot_recall_at_n",
    "plot_pr_curve",
    "plot_similarity_matrix",
]

_logger = logging.getLogger(__name__)

DEFAULT_RADIUS_M = 25.0  # VPR-methods-evaluation --positive_dist_threshold
DEFAULT_NS = (1, 5, 10, 20)  # the Recall@N values VPR papers report

PathLike = Union[str, os.PathLike]

# Grid cells are a hair larger than the radius so that two points within the radius can never fall two cells apart
# through rounding in floor(x / cell).
_CELL_MARGIN = 1.0 + 1e-6
_QUERY_CHUNK = 8192  # queries per block in positives_within: bounds the candidate-pair arrays
_ROW_BLOCK = 1024  # similarity rows ranked at once
_PRECISION_TOL = 1e-12  # precision 9/10 must count as reaching a target of 0.9


class EvaluationError(ValueError):
    """Inputs to an evaluation function have the wrong shape, type or values."""


class GroundTruthFormatError(EvaluationError):
    """A loop-closure ground-truth image is not a square, binary (0/255), 8-bit image."""


# --------------------------------------------------------------------------------------------------- result types


def _finite_or_none(value: float) -> float | None:
    """JSON-safe float: NaN and infinities become None."""
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class RecallResult:
    """Recall@N over the queries that have at least one positive.

    Attributes:
        recalls: N -> share of evaluated queries with a true positive in the top N, in [0, 1]; NaN when no query has
            a positive.
        num_queries: queries evaluated (those with at least one positive).
        num_without_positives: queries left out because the database holds no positive for them.
    """

    recalls: dict[int, float]
    num_queries: int
    num_without_positives: int

    def summary(self) -> str:
        """One line in the VPR-methods-evaluation style: ``R@1: 36.4, R@5: 81.8 (44 queries, 0 without positives)``."""
        parts = ", ".join(f"R@{n}: {100.0 * r:.1f}" for n, r in self.recalls.items())
        return f"{parts} ({self.num_queries} queries, {self.num_without_positives} without positives)"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; recall keys are strings (``"1"``, ``"5"``) as JSON object keys must be."""
        return {
            "recalls": {str(n): _finite_or_none(r) for n, r in self.recalls.items()},
            "num_queries": int(self.num_queries),
            "num_without_positives": int(self.num_without_positives),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecallResult:
        """Inverse of :meth:`to_dict` (accepts int or string N keys; None recalls become NaN)."""
        try:
            recalls = {int(n): (math.nan if r is None else float(r)) for n, r in data["recalls"].items()}
            return cls(recalls, int(data["num_queries"]), int(data["num_without_positives"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EvaluationError(
                f"cannot read a RecallResult from keys {sorted(data)}: {exc}; expected the output of "
                "RecallResult.to_dict() ('recalls', 'num_queries', 'num_without_positives')"
            ) from exc


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
            "threshold": _finite_or_none(self.threshold),
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
            "average_precision": _finite_or_none(self.average_precision),
            "max_f1": self.max_f1().to_dict(),
            "thresholds": [float(t) for t in self.thresholds],
            "precision": [float(p) for p in self.precision],
            "recall": [float(r) for r in self.recall],
            "accepted": [int(a) for a in self.accepted],
            "true_positives": [int(t) for t in self.true_positives],
        }


@dataclass(frozen=True, eq=False)
class LoopClosureReport:
    """Loop-closure or relocalization quality of one similarity matrix against ground truth.

    Attributes:
        recall: Recall@N over query frames with at least one true loop among their candidates.
        pr_curve: precision/recall of accepting each query frame's best candidate, over query frames that have at
            least one candidate.
        num_frames: rows of the similarity matrix.
        exclude_recent: frames skipped before the query (causal loop closure), None for relocalization.
        best_match: (num_frames,) column of the best candidate per row, -1 where a row has no candidate.
        best_score: (num_frames,) its similarity, NaN where a row has no candidate.
        correct: (num_frames,) whether the best candidate is a true loop.
        first_pass_end: rows before the first row with a ground-truth loop (the first pass through new territory:
            every loop accepted there is false); None for relocalization.
        operating_point: the PR curve at ``threshold``, if one was given.
        false_loops_first_pass: loops accepted at ``threshold`` in rows < ``first_pass_end``, if a threshold was
            given (loop closure only).
    """

    recall: RecallResult
    pr_curve: PRCurve
    num_frames: int
    exclude_recent: int | None
    best_match: np.ndarray
    best_score: np.ndarray
    correct: np.ndarray
    first_pass_end: int | None = None
    operating_point: OperatingPoint | None = None
    false_loops_first_pass: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (per-frame lists use None where a frame has no candidate)."""
        return {
            "num_frames": int(self.num_frames),
            "exclude_recent": self.exclude_recent,
            "recall": self.recall.to_dict(),
            "pr_curve": self.pr_curve.to_dict(),
            "first_pass_end": self.first_pass_end,
            "operating_point": None if self.operating_point is None else self.operating_point.to_dict(),
            "false_loops_first_pass": self.false_loops_first_pass,
            "best_match": [int(j) if j >= 0 else None for j in self.best_match],
            "best_score": [_finite_or_none(s) for s in self.best_score],
            "correct": [bool(c) for c in self.correct],
        }


# ------------------------------------------------------------------------------------------------ input checking


def _as_int_ns(ns: Sequence[int]) -> tuple[int, ...]:
    try:
        values = [int(n) for n in ns]
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"ns={ns!r} is not a sequence of integers; expected e.g. (1, 5, 10, 20)") from exc
    if not values or any(n < 1 for n in values) or any(int(n) != n for n in ns):
        raise EvaluationError(f"ns={tuple(ns)!r}; expected a non-empty sequence of integers >= 1, e.g. (1, 5, 10)")
    return tuple(sorted(set(values)))


def _as_bool_vector(values: npt.ArrayLike, name: str, length: int | None = None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise EvaluationError(f"{name} has shape {arr.shape}; expected a 1-D array")
    if arr.dtype != bool:
        if not (np.issubdtype(arr.dtype, np.integer) and np.isin(arr, (0, 1)).all()):
            raise EvaluationError(f"{name} has dtype {arr.dtype}; expected bool (or 0/1 integers)")
        arr = arr.astype(bool)
    if length is not None and arr.shape[0] != length:
        raise EvaluationError(f"{name} has {arr.shape[0]} entries; expected {length}, one per query")
    return arr


def _as_bool_matrix(values: npt.ArrayLike, name: str, shape: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != shape:
        raise EvaluationError(f"{name} has shape {arr.shape}; expected {shape} to match the similarity matrix")
    if arr.dtype != bool:
        if not (np.issubdtype(arr.dtype, np.integer) and np.isin(arr, (0, 1)).all()):
            raise EvaluationError(
                f"{name} has dtype {arr.dtype}; expected bool or 0/1 integers "
                "(read RTAB-Map images with load_loop_closure_ground_truth)"
            )
        arr = arr.astype(bool)
    return arr


def _as_coordinates(values: npt.ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise EvaluationError(
            f"{name} has shape {arr.shape}; expected (N, 2) or (N, 3) metric coordinates (e.g. UTM east, north); "
            "reshape a single point with .reshape(1, -1)"
        )
    return arr


def _as_similarity(values: npt.ArrayLike, *, square: bool) -> np.ndarray:
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise EvaluationError(f"similarity has dtype {arr.dtype}; expected a float matrix")
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim != 2 or (square and arr.shape[0] != arr.shape[1]):
        expected = "(N, N) frame-vs-frame" if square else "(Q, M) query-vs-map"
        raise EvaluationError(f"similarity has shape {arr.shape}; expected a {expected} matrix")
    if not np.isfinite(arr).all():
        raise EvaluationError(
            f"similarity holds {int((~np.isfinite(arr)).sum())} non-finite values; expected finite inner products "
            "(check the descriptors for NaN)"
        )
    return arr


# ------------------------------------------------------------------------------------------- geometric ground truth


def positives_within(
    db_xy: npt.ArrayLike, q_xy: npt.ArrayLike, radius_m: float = DEFAULT_RADIUS_M
) -> list[np.ndarray]:
    """Database entries within ``radius_m`` metres (Euclidean, inclusive) of each query.

    Exact in float64 on the coordinates as given, so UTM eastings/northings (~4e5 / ~6e6 m) keep millimetre
    precision. A uniform grid with cells of one radius limits the distance checks to the 3x3 (3x3x3) neighbouring
    cells, so 1e5 database entries against 1e4 queries take well under a second. Rows with a NaN or infinite
    coordinate never match.

    Args:
        db_xy: (N, 2) or (N, 3) database positions in metres.
        q_xy: (Q, same) query positions in metres.
        radius_m: positive radius in metres (25 m is the VPR protocol).

    Returns:
        Q int64 arrays of ascending database indices.

    Raises:
        EvaluationError: on bad shapes, mismatched dimensions or a non-positive radius.
    """
    db = _as_coordinates(db_xy, "db_xy")
    q = _as_coordinates(q_xy, "q_xy")
    if db.shape[1] != q.shape[1]:
        raise EvaluationError(
            f"db_xy has {db.shape[1]} coordinates per row and q_xy {q.shape[1]}; expected the same (both 2-D or 3-D)"
        )
    radius = float(radius_m)
    if not (math.isfinite(radius) and radius > 0.0):
        raise EvaluationError(f"radius_m={radius_m!r}; expected a positive distance in metres, e.g. 25.0")

    empty = np.zeros(0, dtype=np.int64)
    result = [empty] * q.shape[0]
    db_ids = np.flatnonzero(np.isfinite(db).all(axis=1))
    q_ids = np.flatnonzero(np.isfinite(q).all(axis=1))
    if db_ids.size == 0 or q_ids.size == 0:
        return result

    dim = db.shape[1]
    cell_size = radius * _CELL_MARGIN
    db_cells = np.floor(db[db_ids] / cell_size)
    lo = db_cells.min(axis=0) - 1.0
    span = db_cells.max(axis=0) - lo + 2.0  # room for the -1/+1 neighbours on both sides
    if float(np.prod(span)) >= 2.0**62:
        raise EvaluationError(
            f"the database spans {span.astype(np.int64).tolist()} cells of {radius} m: too many to index; "
            "use a larger radius_m or split the database into regions"
        )
    span_i = span.astype(np.int64)
    strides = np.ones(dim, dtype=np.int64)
    for axis in range(dim - 2, -1, -1):
        strides[axis] = strides[axis + 1] * span_i[axis + 1]

    db_keys = (db_cells - lo).astype(np.int64) @ strides
    order = np.argsort(db_keys, kind="stable")
    sorted_keys = db_keys[order]
    sorted_ids = db_ids[order]
    offsets = np.array(list(itertools.product((-1, 0, 1), repeat=dim)), dtype=np.int64)
    r2 = radius * radius

    for start in range(0, q_ids.size, _QUERY_CHUNK):
        chunk = q_ids[start:start + _QUERY_CHUNK]
        q_cells = np.floor(q[chunk] / cell_size) - lo  # relative cell of each query, float
        pair_q, pair_db = [], []
        for offset in offsets:
            cells = q_cells + offset
            inside = ((cells >= 0) & (cells < span)).all(axis=1)
            if not inside.any():
                continue
            rows = np.flatnonzero(inside)
            keys = cells[rows].astype(np.int64) @ strides
            first = np.searchsorted(sorted_keys, keys, side="left")
            counts = np.searchsorted(sorted_keys, keys, side="right") - first
            total = int(counts.sum())
            if total == 0:
                continue
            # Expand (row, [first, first + count)) ranges into one flat list of candidate pairs.
            run_starts = np.cumsum(counts) - counts
            within = np.arange(total) - np.repeat(run_starts, counts)
            pair_q.append(np.repeat(chunk[rows], counts))
            pair_db.append(sorted_ids[np.repeat(first, counts) + within])
        if not pair_q:
            continue
        pq = np.concatenate(pair_q)
        pdb = np.concatenate(pair_db)
        diff = db[pdb] - q[pq]
        keep = np.einsum("ij,ij->i", diff, diff) <= r2
        pq, pdb = pq[keep], pdb[keep]
        order_pairs = np.lexsort((pdb, pq))
        pq, pdb = pq[order_pairs], pdb[order_pairs]
        bounds = np.searchsorted(pq, chunk, side="left"), np.searchsorted(pq, chunk, side="right")
        for qi, b0, b1 in zip(chunk, *bounds):
            if b1 > b0:
                result[qi] = pdb[b0:b1].astype(np.int64)
    return result


# ----------------------------------------------------------------------------------------------------- Recall@N


def recall_at_n(
    predictions: npt.ArrayLike, positives: Sequence[npt.ArrayLike], ns: Sequence[int] = DEFAULT_NS
) -> RecallResult:
    """Recall@N: the share of queries with at least one true positive among their top N predictions.

    Queries whose ``positives`` entry is empty cannot be answered right and are left out of the denominator; they
    are counted in ``RecallResult.num_without_positives`` (and logged).

    Args:
        predictions: (Q, K) integer database indices, best first (faiss ``I``); -1 pads missing predictions.
        positives: Q arrays of database indices that are correct for each query (see :func:`positives_within`).
        ns: the N values; each must be <= K.

    Returns:
        The recalls in [0, 1] (NaN if no query has a positive) and the query counts.

    Raises:
        EvaluationError: on bad shapes or dtypes, indices below -1, or an N larger than K.
    """
    pred = np.asarray(predictions)
    if pred.ndim != 2:
        raise EvaluationError(f"predictions has shape {pred.shape}; expected (Q, K) database indices, best first")
    if not np.issubdtype(pred.dtype, np.integer):
        raise EvaluationError(f"predictions has dtype {pred.dtype}; expected integer indices (-1 for padding)")
    num_q, k = pred.shape
    if len(positives) != num_q:
        raise EvaluationError(f"positives has {len(positives)} entries; expected {num_q}, one per prediction row")
    ns_t = _as_int_ns(ns)
    if ns_t[-1] > k:
        raise EvaluationError(
            f"N={ns_t[-1]} is larger than the {k} predictions per query; retrieve at least {ns_t[-1]} "
            f"or drop it from ns={ns_t}"
        )
    pred = pred.astype(np.int64, copy=False)
    if num_q and pred.min(initial=0) < -1:
        raise EvaluationError(f"predictions holds {int(pred.min())}; expected indices >= 0, or -1 for padding")

    pos_arrays = []
    for i, p in enumerate(positives):
        arr = np.asarray(p).ravel()
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise EvaluationError(f"positives[{i}] has dtype {arr.dtype}; expected integer database indices")
        if arr.size and arr.min() < 0:
            raise EvaluationError(f"positives[{i}] holds {int(arr.min())}; expected database indices >= 0")
        pos_arrays.append(arr.astype(np.int64))
    has_pos = np.array([a.size > 0 for a in pos_arrays], dtype=bool)

    # One membership test for all queries: key = query * M + database index.
    sizes = np.array([a.size for a in pos_arrays], dtype=np.int64)
    pos_flat = np.concatenate(pos_arrays) if num_q else np.zeros(0, dtype=np.int64)
    m = int(max(pred.max(initial=-1), pos_flat.max(initial=-1))) + 1
    pos_keys = np.repeat(np.arange(num_q, dtype=np.int64), sizes) * m + pos_flat
    pred_keys = np.arange(num_q, dtype=np.int64)[:, None] * m + pred
    hits = np.isin(pred_keys, pos_keys) & (pred >= 0)  # (Q, K)
    found_by = np.logical_or.accumulate(hits, axis=1) if k else hits  # found_by[:, r]: a hit within the top r + 1

    evaluated = int(has_pos.sum())
    without = num_q - evaluated
    if without:
        _logger.info("%d of %d queries have no positive in the database and are left out of Recall@N", without, num_q)
    if evaluated == 0:
        _logger.warning("no query has a positive in the database: Recall@N is undefined (NaN)")
        recalls = {n: math.nan for n in ns_t}
    else:
        recalls = {n: float(found_by[has_pos, n - 1].mean()) for n in ns_t}
    return RecallResult(recalls, evaluated, without)


# ------------------------------------------------------------------------------------- precision / recall curve


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
    ok = _as_bool_vector(correct, "correct", s.size)
    pos = _as_bool_vector(has_positive, "has_positive", s.size)
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


# ------------------------------------------------------------------------------------ loop-closure ground truth


def load_loop_closure_ground_truth(path: PathLike) -> np.ndarray:
    """Read RTAB-Map loop-closure ground truth (``rtabmap-console -gt``) as a boolean matrix.

    The file is an N x N 8-bit image; pixel (row i, column j) = 255 means image i+1 closes a loop with image j+1,
    0 means it does not. RTAB-Map's own files (e.g. data/samples_GT.bmp) mark only j < i (lower triangle).

    Args:
        path: the image (BMP or PNG; 8-bit grayscale or 1-bit).

    Returns:
        (N, N) bool array, ``gt[i, j]`` True where frame i closes a loop with frame j (0-based).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        GroundTruthFormatError: if the image is not square, not grayscale, or holds values other than 0 and 255.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth image {path} does not exist; expected an rtabmap-console -gt image")
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode not in ("L", "1"):
                raise GroundTruthFormatError(
                    f"{path} has image mode {mode!r}; expected 8-bit grayscale ('L') with 0/255 pixels; "
                    "convert it, e.g. Image.open(p).convert('L').save(p)"
                )
            pixels = np.asarray(img.convert("L"))
    except UnidentifiedImageError as exc:
        raise GroundTruthFormatError(f"{path} is not a readable image: {exc}") from exc
    if pixels.shape[0] != pixels.shape[1]:
        raise GroundTruthFormatError(
            f"{path} is {pixels.shape[1]}x{pixels.shape[0]} (width x height); expected a square N x N image, "
            "one row and one column per image of the sequence"
        )
    values = np.unique(pixels)
    bad = values[(values != 0) & (values != 255)]
    if bad.size:
        raise GroundTruthFormatError(
            f"{path} holds pixel values {bad[:8].tolist()}; expected only 0 (no loop) and 255 (loop); "
            "save ground truth losslessly (BMP/PNG, not JPEG)"
        )
    gt = pixels == 255
    _logger.debug("%s: %d x %d frames, %d loop cells in %d rows", path, *gt.shape, int(gt.sum()), int(gt.any(1).sum()))
    return gt


# ----------------------------------------------------------------------------------------- loop-closure metrics


def _ranked_candidates(similarity: np.ndarray, num_candidates: np.ndarray, k: int) -> np.ndarray:
    """(R, k) top-k columns per row among its first ``num_candidates[r]`` columns, best first, -1 padded.

    Exact with ties, also at the k-th place: equal similarities rank the lower column first (a full stable sort
    would give the same ranking). Rows are processed in blocks to bound the temporary arrays.
    """
    rows, cols = similarity.shape
    k_eff = min(k, cols)
    out = np.full((rows, k), -1, dtype=np.int64)
    if rows == 0 or k_eff == 0:
        return out
    col_ids = np.arange(cols)
    for start in range(0, rows, _ROW_BLOCK):
        sim = similarity[start:start + _ROW_BLOCK]
        counts = num_candidates[start:start + _ROW_BLOCK]
        masked = np.where(col_ids[None, :] < counts[:, None], sim, -np.inf)  # (B, M)
        if k_eff < cols:
            # k-th largest value per row; keep everything above it and the lowest columns equal to it.
            kth = -np.partition(-masked, k_eff - 1, axis=1)[:, k_eff - 1:k_eff]  # (B, 1)
            above = masked > kth
            tied = masked == kth
            need = k_eff - above.sum(axis=1, keepdims=True)
            keep = above | (tied & (np.cumsum(tied, axis=1) <= need))
            top = np.nonzero(keep)[1].reshape(len(sim), k_eff)  # exactly k_eff per row, row-major order
        else:
            top = np.tile(col_ids, (len(sim), 1))
        top_sim = np.take_along_axis(masked, top, axis=1)
        order = np.lexsort((top, -top_sim), axis=1)  # by similarity descending, then column ascending
        ranked = np.take_along_axis(top, order, axis=1)
        ranked[np.arange(k_eff)[None, :] >= counts[:, None]] = -1
        out[start:start + len(sim), :k_eff] = ranked
    return out


def _evaluate_candidates(
    similarity: np.ndarray,
    ground_truth: np.ndarray,
    num_candidates: np.ndarray,
    ns: tuple[int, ...],
    threshold: float | None,
) -> tuple[RecallResult, PRCurve, np.ndarray, np.ndarray, np.ndarray, OperatingPoint | None]:
    """Shared core: row r may match columns [0, num_candidates[r])."""
    rows, cols = similarity.shape
    predictions = _ranked_candidates(similarity, num_candidates, ns[-1])
    candidate_mask = np.arange(cols)[None, :] < num_candidates[:, None]
    reachable = ground_truth & candidate_mask
    is_query = num_candidates > 0
    if not is_query.any():
        raise EvaluationError(
            f"no row has a candidate ({rows} rows, at most {int(num_candidates.max(initial=0))} candidates); "
            "use more frames or a smaller exclude_recent"
        )

    recall = recall_at_n(predictions[is_query], [np.flatnonzero(r) for r in reachable[is_query]], ns)

    best = predictions[:, 0]
    best_score = np.full(rows, np.nan)
    best_score[is_query] = similarity[is_query, best[is_query]]
    correct = np.zeros(rows, dtype=bool)
    correct[is_query] = ground_truth[is_query, best[is_query]]
    curve = precision_recall_curve(best_score[is_query], correct[is_query], reachable[is_query].any(axis=1))
    point = None if threshold is None else curve.operating_point(threshold)
    return recall, curve, best, best_score, correct, point


def evaluate_loop_closures(
    similarity: npt.ArrayLike,
    ground_truth: npt.ArrayLike,
    *,
    exclude_recent: int = 10,
    ns: Sequence[int] = (1, 5, 10),
    threshold: float | None = None,
) -> LoopClosureReport:
    """Causal loop-closure quality of a frame-vs-frame similarity matrix, as a live node would see it.

    Frame i may only close a loop with past frames j < i - ``exclude_recent`` (the robot's own recent frames are
    always similar and are not loops). Per frame its candidates are ranked by similarity; Recall@N counts frames
    with at least one true loop among their candidates, and the PR curve accepts each frame's best candidate when
    its score >= threshold (correct if ``ground_truth[i, best]``). Ground truth is used symmetrically (a loop
    between i and j counts whichever triangle marks it), so RTAB-Map's lower-triangular files work as they are.

    Args:
        similarity: (N, N) similarity of frame descriptors (inner products of unit descriptors, ``X @ X.T``).
        ground_truth: (N, N) bool loop closures (see :func:`load_loop_closure_ground_truth`).
        exclude_recent: frames just before the query that are never candidates (>= 0).
        ns: the N values for Recall@N.
        threshold: if given, also report the operating point at this ``min_similarity`` and the loops it accepts
            during the first pass (rows before the first ground-truth loop, where every accepted loop is false).

    Returns:
        The report (Recall@N, PR curve, per-frame best matches, optional operating point).

    Raises:
        EvaluationError: on mismatched shapes, non-finite similarities, or a negative ``exclude_recent``.
    """
    sim = _as_similarity(similarity, square=True)
    n = sim.shape[0]
    gt = _as_bool_matrix(ground_truth, "ground_truth", sim.shape)
    if isinstance(exclude_recent, bool) or int(exclude_recent) != exclude_recent or exclude_recent < 0:
        raise EvaluationError(f"exclude_recent={exclude_recent!r}; expected an integer >= 0 (frames skipped)")
    exclude_recent = int(exclude_recent)
    ns_t = _as_int_ns(ns)
    gt = gt | gt.T
    num_candidates = np.clip(np.arange(n) - exclude_recent, 0, None)
    recall, curve, best, best_score, correct, point = _evaluate_candidates(sim, gt, num_candidates, ns_t, threshold)

    loop_rows = np.flatnonzero(np.tril(gt, -1).any(axis=1))
    first_pass_end = int(loop_rows[0]) if loop_rows.size else n
    false_first = None
    if threshold is not None:
        early = best_score[:first_pass_end]
        false_first = int(np.count_nonzero(early[np.isfinite(early)] >= float(threshold)))
    _logger.info("loop closure over %d frames (exclude_recent=%d): %s", n, exclude_recent, recall.summary())
    return LoopClosureReport(
        recall=recall,
        pr_curve=curve,
        num_frames=n,
        exclude_recent=exclude_recent,
        best_match=best,
        best_score=best_score,
        correct=correct,
        first_pass_end=first_pass_end,
        operating_point=point,
        false_loops_first_pass=false_first,
    )


def evaluate_relocalization(
    similarity: npt.ArrayLike,
    ground_truth: npt.ArrayLike,
    *,
    ns: Sequence[int] = (1, 5, 10),
    threshold: float | None = None,
) -> LoopClosureReport:
    """Quality of queries against a map built beforehand: every map entry is a candidate for every query.

    For a sequence whose first ``m`` frames built the map: ``evaluate_relocalization(S[m:, :m], gt[m:, :m])`` with
    ``S`` and ``gt`` the full frame-vs-frame similarity and ground truth (use ``gt | gt.T`` for RTAB-Map's
    lower-triangular files if the map comes after the queries).

    Args:
        similarity: (Q, M) query-vs-map similarity.
        ground_truth: (Q, M) bool, True where the map entry shows the query's place.
        ns: the N values for Recall@N (an N above M is allowed: the missing ranks count as misses).
        threshold: if given, also report the operating point at this ``min_similarity``.

    Returns:
        The report; ``exclude_recent``, ``first_pass_end`` and ``false_loops_first_pass`` are None.

    Raises:
        EvaluationError: on mismatched shapes or non-finite similarities.
    """
    sim = _as_similarity(similarity, square=False)
    gt = _as_bool_matrix(ground_truth, "ground_truth", sim.shape)
    ns_t = _as_int_ns(ns)
    num_candidates = np.full(sim.shape[0], sim.shape[1], dtype=np.int64)
    recall, curve, best, best_score, correct, point = _evaluate_candidates(sim, gt, num_candidates, ns_t, threshold)
    _logger.info("relocalization of %d queries against %d map entries: %s", *sim.shape, recall.summary())
    return LoopClosureReport(
        recall=recall,
        pr_curve=curve,
        num_frames=sim.shape[0],
        exclude_recent=None,
        best_match=best,
        best_score=best_score,
        correct=correct,
        operating_point=point,
    )


# --------------------------------------------------------------------------------------------------------- plots


def _new_figure(width: float = 6.0, height: float = 4.5) -> Any:
    # The Agg canvas directly, not pyplot: no global backend switch and nothing to close.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Any, path: PathLike) -> Path:
    """Write the figure as PNG through a temporary file in the same folder, then os.replace (atomic)."""
    from dinomix_ros.util.files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _logger.debug("wrote %s", path)
    return path


def plot_recall_at_n(
    results: Mapping[str, RecallResult | Mapping[str, Any]], path: PathLike, *, title: str = "Recall@N"
) -> Path:
    """Recall@N curves, one line per method/map.

    Args:
        results: label -> :class:`RecallResult`, its ``to_dict()``, or a plain ``{N: recall}`` dict.
        path: PNG file to write (folders are created).
        title: figure title.

    Returns:
        ``path``.

    Raises:
        EvaluationError: if ``results`` is empty or an entry cannot be read.
    """
    if not results:
        raise EvaluationError("results is empty; expected label -> RecallResult")
    curves: dict[str, dict[int, float]] = {}
    for label, res in results.items():
        if isinstance(res, RecallResult):
            curves[label] = res.recalls
        elif isinstance(res, Mapping) and "recalls" in res:
            curves[label] = RecallResult.from_dict(res).recalls
        elif isinstance(res, Mapping):
            try:
                curves[label] = {int(n): math.nan if r is None else float(r) for n, r in res.items()}
            except (TypeError, ValueError) as exc:
                raise EvaluationError(f"results[{label!r}] is not an {{N: recall}} dict: {exc}") from exc
        else:
            raise EvaluationError(f"results[{label!r}] is a {type(res).__name__}; expected a RecallResult or dict")

    fig = _new_figure()
    ax = fig.add_subplot()
    all_ns = sorted({n for c in curves.values() for n in c})
    for label, rec in curves.items():
        xs = sorted(rec)
        ax.plot(xs, [100.0 * rec[n] for n in xs], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(all_ns)
    ax.set_xticklabels([str(n) for n in all_ns])
    ax.minorticks_off()
    ax.set_xlabel("N (top-N predictions)")
    ax.set_ylabel("Recall@N (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _save_png(fig, path)


def plot_pr_curve(
    curves: Mapping[str, PRCurve],
    path: PathLike,
    *,
    mark_threshold: float | None = None,
    title: str = "Precision / recall over the similarity threshold",
) -> Path:
    """Precision-recall curves, one per method/map, optionally marking one threshold on each.

    Args:
        curves: label -> :class:`PRCurve`.
        path: PNG file to write (folders are created).
        mark_threshold: a ``min_similarity`` to mark (with its precision and recall) on every curve.
        title: figure title.

    Returns:
        ``path``.

    Raises:
        EvaluationError: if ``curves`` is empty or holds something other than PRCurve.
    """
    if not curves:
        raise EvaluationError("curves is empty; expected label -> PRCurve")
    for label, curve in curves.items():
        if not isinstance(curve, PRCurve):
            raise EvaluationError(f"curves[{label!r}] is a {type(curve).__name__}; expected a PRCurve")

    fig = _new_figure()
    ax = fig.add_subplot()
    for label, curve in curves.items():
        ap = curve.average_precision
        ap_txt = "n/a" if math.isnan(ap) else f"{ap:.3f}"
        (line,) = ax.step(
            np.concatenate(([0.0], curve.recall)),
            np.concatenate(([1.0], curve.precision)),
            where="post",
            label=f"{label} (AP {ap_txt})",
        )
        if mark_threshold is not None:
            pt = curve.operating_point(mark_threshold)
            ax.plot([pt.recall], [pt.precision], marker="o", color=line.get_color())
            ax.annotate(
                f"t={mark_threshold:.3f}: P={pt.precision:.2f} R={pt.recall:.2f}",
                (pt.recall, pt.precision),
                textcoords="offset points",
                xytext=(5, -12),
                fontsize=8,
                color=line.get_color(),
            )
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower left")
    return _save_png(fig, path)


def plot_similarity_matrix(
    similarity: npt.ArrayLike,
    ground_truth: npt.ArrayLike | None,
    path: PathLike,
    *,
    title: str = "Frame similarity (circles: ground-truth loops)",
) -> Path:
    """Heat map of a similarity matrix with the ground-truth loop cells circled.

    Args:
        similarity: (N, M) similarity (frame-vs-frame or query-vs-map).
        ground_truth: (N, M) bool loops to overlay, or None.
        path: PNG file to write (folders are created).
        title: figure title.

    Returns:
        ``path``.

    Raises:
        EvaluationError: on a non-2-D or non-finite similarity, or a ground truth of another shape.
    """
    sim = _as_similarity(similarity, square=False)
    gt = None if ground_truth is None else _as_bool_matrix(ground_truth, "ground_truth", sim.shape)

    fig = _new_figure(6.5, 5.5)
    ax = fig.add_subplot()
    image = ax.imshow(sim, cmap="viridis", interpolation="nearest", origin="upper")
    fig.colorbar(image, ax=ax, label="similarity")
    if gt is not None and gt.any():
        rows, cols = np.nonzero(gt)
        size = float(np.clip(2000.0 / max(sim.shape), 1.0, 30.0))
        ax.scatter(cols, rows, s=size, facecolors="none", edgecolors="red", linewidths=0.6, label="GT loop")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("frame j (map)")
    ax.set_ylabel("frame i (query)")
    ax.set_title(title)
    return _save_png(fig, path)
