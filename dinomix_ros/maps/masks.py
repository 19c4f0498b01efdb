"""Masks that filter a map search: which keyframes :meth:`PlaceIndex.search <dinomix_ros.maps.index.PlaceIndex.search>`
may return (its ``allowed=`` argument).

The ``mask_*`` functions build an (N,) bool mask over a map's rows from the map's arrays (stamps, row count,
positions); :func:`combine_masks` ANDs them, broadcasting (N,) masks with per-query (nq, N) ones;
:func:`normalize_allowed` checks a mask against a search and puts it in the form the search backends take.

numpy only: building masks loads neither torch nor faiss.
"""

from __future__ import annotations

import logging
import math
import numbers

import numpy as np

from dinomix_ros.maps.errors import MaskError

__all__ = ["mask_exclude_recent", "mask_exclude_last", "mask_within_radius", "combine_masks", "normalize_allowed"]

LOG = logging.getLogger(__name__)


def mask_exclude_recent(stamps_ns: np.ndarray, query_stamp_ns: int, window_s: float) -> np.ndarray:
    """Allow keyframes at least ``window_s`` away in time from the query (loop closure skips the recent trajectory).

    Keyframes stamped slightly *after* the query (another camera of the rig, a map recorded later in sim time) are
    as "recent" as those just before it, so the window is symmetric.

    Args:
        stamps_ns: (N,) integer keyframe stamps in nanoseconds.
        query_stamp_ns: Stamp of the query in nanoseconds.
        window_s: Seconds around the query during which keyframes are excluded (>= 0).

    Returns:
        (N,) bool: True where ``|stamp - query_stamp| >= window``.

    Raises:
        MaskError: For non-integer or non-1-D stamps, or a negative/non-finite window.
    """
    stamps = np.asarray(stamps_ns)
    if stamps.ndim != 1:
        raise MaskError(f"stamps_ns must be 1-D, found shape {stamps.shape}.")
    if not np.issubdtype(stamps.dtype, np.integer):
        raise MaskError(f"stamps_ns must hold integers, found dtype {stamps.dtype}. Convert with .astype(np.int64) "
                        "(nanosecond stamps do not fit float64 exactly).")
    if not (isinstance(window_s, numbers.Real) and math.isfinite(window_s) and window_s >= 0):
        raise MaskError(f"window_s must be a finite number >= 0, found {window_s!r}.")
    return np.abs(stamps.astype(np.int64) - int(query_stamp_ns)) >= int(round(window_s * 1e9))


def mask_exclude_last(n_total: int, count: int) -> np.ndarray:
    """Allow all but the last ``count`` of ``n_total`` keyframes (all False when count >= n_total).

    Args:
        n_total: Number of keyframes (>= 0).
        count: Number of newest keyframes to exclude (>= 0).

    Returns:
        (n_total,) bool mask.

    Raises:
        MaskError: For negative arguments.
    """
    if int(n_total) < 0 or int(count) < 0:
        raise MaskError(f"n_total and count must be >= 0, found n_total={n_total!r}, count={count!r}.")
    return np.arange(int(n_total)) < int(n_total) - int(count)


def mask_within_radius(positions: np.ndarray, center: np.ndarray, radius_m: float) -> np.ndarray:
    """Allow keyframes within ``radius_m`` (Euclidean, inclusive) of ``center``; NaN positions never are.

    Args:
        positions: (N, 3) or (N, 2) keyframe positions in metres (NaN where unknown).
        center: (3,) or (2,) position matching the columns of ``positions``.
        radius_m: Radius in metres (>= 0).

    Returns:
        (N,) bool mask.

    Raises:
        MaskError: For mismatched shapes, a non-finite center or a negative/non-finite radius.
    """
    p = np.asarray(positions, dtype=np.float64)
    c = np.asarray(center, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] not in (2, 3):
        raise MaskError(f"positions must have shape (N, 3) or (N, 2), found {p.shape}.")
    if c.shape != (p.shape[1],):
        raise MaskError(f"center has shape {c.shape}, expected ({p.shape[1]},) to match positions {p.shape}.")
    if not np.isfinite(c).all():
        raise MaskError(f"center must be finite, found {c.tolist()}.")
    if not (isinstance(radius_m, numbers.Real) and math.isfinite(radius_m) and radius_m >= 0):
        raise MaskError(f"radius_m must be a finite number >= 0, found {radius_m!r}.")
    d2 = ((p - c) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore"):
        return np.isfinite(d2) & (d2 <= float(radius_m) ** 2)


def combine_masks(*masks: np.ndarray | None) -> np.ndarray | None:
    """Logical AND of masks, ignoring None; None when all are None.

    (N,) and (nq, N) masks broadcast to (nq, N).

    Args:
        *masks: (N,) or (nq, N) bool masks over the same keyframes, or None.

    Returns:
        A new bool array (never one of the inputs), or None when every mask is None.

    Raises:
        MaskError: For a non-bool mask or shapes that do not broadcast.
    """
    out: np.ndarray | None = None
    for i, m in enumerate(masks):
        if m is None:
            continue
        a = np.asarray(m)
        if a.dtype != np.bool_ or a.ndim not in (1, 2):
            raise MaskError(f"mask {i} must be a 1-D or 2-D bool array, found dtype {a.dtype} shape {a.shape}.")
        if out is None:
            out = a.copy()
            continue
        if out.shape[-1] != a.shape[-1] or (out.ndim == 2 and a.ndim == 2 and out.shape[0] != a.shape[0]):
            raise MaskError(f"mask {i} has shape {a.shape}, which does not combine with {out.shape}: masks must "
                            "cover the same keyframes.")
        out = out & a
    return out


def normalize_allowed(allowed: np.ndarray | None, nq: int, ntotal: int) -> np.ndarray | None:
    """Check an ``allowed`` mask for a search of ``nq`` queries over ``ntotal`` rows, in the form backends take.

    Args:
        allowed: None, a (ntotal,) bool mask shared by all queries, or (nq, ntotal) one per query. A shorter last
            axis (a mask built before rows were appended) is padded with False: the newest rows are excluded.
        nq: Number of queries of the search.
        ntotal: Number of rows in the index.

    Returns:
        None when every row is allowed; a C-contiguous (ntotal,) mask when all queries share one; else (nq, ntotal).

    Raises:
        MaskError: For a non-bool mask, or a shape that does not match (nq, ntotal).
    """
    if allowed is None:
        return None
    a = np.asarray(allowed)
    if a.dtype != np.bool_:
        raise MaskError(f"allowed must be a bool mask, found dtype {a.dtype}. Build it with the mask_* functions or "
                        "a comparison (to select rows by number use np.isin(np.arange(ntotal), rows)).")
    if a.ndim not in (1, 2) or (a.ndim == 2 and a.shape[0] != nq) or a.shape[-1] > ntotal:
        raise MaskError(f"allowed has shape {a.shape}, expected ({ntotal},) or ({nq}, {ntotal}) for {nq} queries "
                        f"on an index of {ntotal} rows (shorter masks are allowed: missing rows count as excluded).")
    if a.shape[-1] < ntotal:
        LOG.debug("mask covers %d of %d rows: the newest %d rows are excluded", a.shape[-1], ntotal,
                  ntotal - a.shape[-1])
        pad = [(0, 0)] * (a.ndim - 1) + [(0, ntotal - a.shape[-1])]
        a = np.pad(a, pad, constant_values=False)
    if a.ndim == 2 and a.shape[0] > 0 and (a == a[0]).all():
        a = a[0]  # one mask for all queries: a single batched search
    if a.all():
        return None
    return np.ascontiguousarray(a)
