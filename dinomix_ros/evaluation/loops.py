"""Loop closure and relocalization against RTAB-Map ground truth.

- :func:`load_loop_closure_ground_truth` reads the ``rtabmap-console -gt`` image format (N x N, 255 = loop);
- :func:`evaluate_loop_closures`: causal loop closure over a frame-vs-frame similarity matrix (past frames only,
  the most recent ones excluded), as a live node would see it;
- :func:`evaluate_relocalization`: queries against a map built beforehand (every map entry is a candidate).

Both give a :class:`LoopClosureReport`: Recall@N over the frames that have a true loop among their candidates and
the precision/recall curve of accepting each frame's best candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dinomix_ros.evaluation.curves import OperatingPoint, PRCurve, precision_recall_curve
from dinomix_ros.evaluation.inputs import (
    EvaluationError,
    PathLike,
    as_bool_matrix,
    as_int_ns,
    as_similarity,
    finite_or_none,
)
from dinomix_ros.evaluation.retrieval import RecallResult, recall_at_n

__all__ = [
    "LOOP_NS",
    "GroundTruthFormatError",
    "LoopClosureReport",
    "load_loop_closure_ground_truth",
    "evaluate_loop_closures",
    "evaluate_relocalization",
]

_logger = logging.getLogger(__name__)

LOOP_NS = (1, 5, 10)  # the Recall@N values reported for loop closure and relocalization
_ROW_BLOCK = 1024  # similarity rows ranked at once


class GroundTruthFormatError(EvaluationError):
    """A loop-closure ground-truth image is not a square, binary (0/255), 8-bit image."""


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
            "best_score": [finite_or_none(s) for s in self.best_score],
            "correct": [bool(c) for c in self.correct],
        }

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
    ns: Sequence[int] = LOOP_NS,
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
    sim = as_similarity(similarity, square=True)
    n = sim.shape[0]
    gt = as_bool_matrix(ground_truth, "ground_truth", sim.shape)
    if isinstance(exclude_recent, bool) or int(exclude_recent) != exclude_recent or exclude_recent < 0:
        raise EvaluationError(f"exclude_recent={exclude_recent!r}; expected an integer >= 0 (frames skipped)")
    exclude_recent = int(exclude_recent)
    ns_t = as_int_ns(ns)
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
    ns: Sequence[int] = LOOP_NS,
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
    sim = as_similarity(similarity, square=False)
    gt = as_bool_matrix(ground_truth, "ground_truth", sim.shape)
    ns_t = as_int_ns(ns)
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
