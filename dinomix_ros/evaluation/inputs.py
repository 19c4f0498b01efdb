"""The error every evaluation function raises for bad input, and the input checks they share.

The metrics (:mod:`~dinomix_ros.evaluation.retrieval`, :mod:`~dinomix_ros.evaluation.curves`,
:mod:`~dinomix_ros.evaluation.loops`) and the plots (:mod:`~dinomix_ros.evaluation.plots`) take numpy arrays from
callers; these checks turn a wrong shape, dtype or value into an :class:`EvaluationError` that says what was found
and what was expected, before any arithmetic runs on it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Union

import numpy as np
import numpy.typing as npt

__all__ = [
    "PathLike",
    "EvaluationError",
    "finite_or_none",
    "as_int_ns",
    "as_bool_vector",
    "as_bool_matrix",
    "as_coordinates",
    "as_similarity",
]

PathLike = Union[str, os.PathLike]


class EvaluationError(ValueError):
    """Inputs to an evaluation function have the wrong shape, type or values."""


def finite_or_none(value: float) -> float | None:
    """JSON-safe float: NaN and infinities become None."""
    value = float(value)
    return value if math.isfinite(value) else None


def as_int_ns(ns: Sequence[int]) -> tuple[int, ...]:
    """The N values of Recall@N as sorted distinct ints >= 1.

    Raises:
        EvaluationError: not a non-empty sequence of integers >= 1.
    """
    try:
        values = [int(n) for n in ns]
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"ns={ns!r} is not a sequence of integers; expected e.g. (1, 5, 10, 20)") from exc
    if not values or any(n < 1 for n in values) or any(int(n) != n for n in ns):
        raise EvaluationError(f"ns={tuple(ns)!r}; expected a non-empty sequence of integers >= 1, e.g. (1, 5, 10)")
    return tuple(sorted(set(values)))


def as_bool_vector(values: npt.ArrayLike, name: str, length: int | None = None) -> np.ndarray:
    """``values`` as a 1-D bool array (0/1 integers accepted) of ``length`` entries when given.

    Raises:
        EvaluationError: another shape, dtype or length.
    """
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


def as_bool_matrix(values: npt.ArrayLike, name: str, shape: tuple[int, int]) -> np.ndarray:
    """``values`` as a bool matrix (0/1 integers accepted) of the similarity matrix's ``shape``.

    Raises:
        EvaluationError: another shape or dtype.
    """
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


def as_coordinates(values: npt.ArrayLike, name: str) -> np.ndarray:
    """``values`` as (N, 2) or (N, 3) float64 metric coordinates.

    Raises:
        EvaluationError: another shape.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise EvaluationError(
            f"{name} has shape {arr.shape}; expected (N, 2) or (N, 3) metric coordinates (e.g. UTM east, north); "
            "reshape a single point with .reshape(1, -1)"
        )
    return arr


def as_similarity(values: npt.ArrayLike, *, square: bool) -> np.ndarray:
    """``values`` as a finite float64 similarity matrix, (N, N) when ``square``.

    Raises:
        EvaluationError: a non-numeric dtype, another shape, or non-finite values.
    """
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
