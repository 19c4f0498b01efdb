"""Retrieval against geometric ground truth: which database entries are right for a query, and Recall@N.

- :func:`positives_within`: database entries within ``radius_m`` metres of each query (the 25 m protocol of
  gmberton/VPR-methods-evaluation);
- :func:`recall_at_n`: share of queries with at least one true positive among their top N predictions; queries
  without any positive in the database are left out of the denominator and counted separately;
- :func:`ns_within`: the N worth reporting for a search over so many candidates (R@N with N >= the number of
  candidates is 1.0 for every query that has a positive, whatever the ranking: it says nothing).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dinomix_ros.evaluation.inputs import EvaluationError, as_coordinates, as_int_ns, finite_or_none

__all__ = ["DEFAULT_RADIUS_M", "DEFAULT_NS", "RecallResult", "positives_within", "recall_at_n", "ns_within"]

_logger = logging.getLogger(__name__)

DEFAULT_RADIUS_M = 25.0  # VPR-methods-evaluation --positive_dist_threshold
DEFAULT_NS = (1, 5, 10, 20)  # the Recall@N values VPR papers report

# Grid cells are a hair larger than the radius so that two points within the radius can never fall two cells apart
# through rounding in floor(x / cell).
_CELL_MARGIN = 1.0 + 1e-6
_QUERY_CHUNK = 8192  # queries per block in positives_within: bounds the candidate-pair arrays


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
            "recalls": {str(n): finite_or_none(r) for n, r in self.recalls.items()},
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


# ------------------------------------------------------------------------------------------- geometric ground truth


@dataclass(frozen=True)
class _CellGrid:
    """Database rows sorted by the flat key of their grid cell, for the neighbour-cell lookups of a query.

    Attributes:
        cell_size: cell edge in metres (the radius, plus the margin).
        lo: cell coordinates of the grid's first cell (one below the lowest database cell on every axis).
        span: cells per axis, as floats (room for the -1/+1 neighbours on both sides).
        strides: int64 strides that turn relative cell coordinates into one flat key.
        sorted_keys: flat cell key of each finite database row, ascending.
        sorted_ids: the database row of each key.
    """

    cell_size: float
    lo: np.ndarray
    span: np.ndarray
    strides: np.ndarray
    sorted_keys: np.ndarray
    sorted_ids: np.ndarray


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
    db = as_coordinates(db_xy, "db_xy")
    q = as_coordinates(q_xy, "q_xy")
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

    grid = _cell_grid(db, db_ids, radius)
    r2 = radius * radius
    for start in range(0, q_ids.size, _QUERY_CHUNK):
        chunk = q_ids[start:start + _QUERY_CHUNK]
        pq, pdb = _candidate_pairs(grid, q, chunk)
        if pq.size == 0:
            continue
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


def _cell_grid(db: np.ndarray, db_ids: np.ndarray, radius: float) -> _CellGrid:
    """The grid over the finite database rows ``db_ids``, with cells of one radius (plus the margin)."""
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
    return _CellGrid(cell_size, lo, span, strides, db_keys[order], db_ids[order])


def _candidate_pairs(grid: _CellGrid, q: np.ndarray, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, database rows) of every database row in the 3x3 (3x3x3) cells around each query of ``chunk``."""
    dim = q.shape[1]
    offsets = np.array(list(itertools.product((-1, 0, 1), repeat=dim)), dtype=np.int64)
    q_cells = np.floor(q[chunk] / grid.cell_size) - grid.lo  # relative cell of each query, float
    pair_q, pair_db = [], []
    for offset in offsets:
        cells = q_cells + offset
        inside = ((cells >= 0) & (cells < grid.span)).all(axis=1)
        if not inside.any():
            continue
        rows = np.flatnonzero(inside)
        keys = cells[rows].astype(np.int64) @ grid.strides
        first = np.searchsorted(grid.sorted_keys, keys, side="left")
        counts = np.searchsorted(grid.sorted_keys, keys, side="right") - first
        total = int(counts.sum())
        if total == 0:
            continue
        # Expand (row, [first, first + count)) ranges into one flat list of candidate pairs.
        run_starts = np.cumsum(counts) - counts
        within = np.arange(total) - np.repeat(run_starts, counts)
        pair_q.append(np.repeat(chunk[rows], counts))
        pair_db.append(grid.sorted_ids[np.repeat(first, counts) + within])
    if not pair_q:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(pair_q), np.concatenate(pair_db)


# ----------------------------------------------------------------------------------------------------- Recall@N


def ns_within(num_candidates: int, ns: Sequence[int] = DEFAULT_NS) -> tuple[int, ...]:
    """The N of ``ns`` that are meaningful for a search over ``num_candidates`` entries: those below it.

    R@N for N >= the number of candidates counts every query with a positive as found, whatever the ranking, so a
    15-image database reports R@1, R@5 and R@10, not R@20. R@1 is always kept.

    Args:
        num_candidates: database entries (or loop-closure candidates) a query is ranked against.
        ns: the N values to choose from.

    Returns:
        The kept N values, ascending; at least ``(1,)``.
    """
    kept = tuple(n for n in as_int_ns(ns) if n < num_candidates)
    return kept or (1,)


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
    ns_t = as_int_ns(ns)
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
