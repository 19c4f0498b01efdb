"""Index ground truth of the standard VPR layout: which database images are correct for each query image.

The layout: a database folder, a query folder, and a file saying, per query, which database images show the same
place. Images are numbered from 0 in the order :func:`~dinomix_ros.maps.sources.imagefolder.list_images` lists
their folder (natural order: ``2.jpg`` before ``10.jpg``; the same as plain sorting for zero-padded names). Formats:

* ``.json``: a list with one list of database indices per query, e.g. ``[[0, 3], [], [7]]`` (an empty list: the
  query has no positive);
* ``.csv``: one line per query holding its database indices separated by commas (an empty line: no positive); a
  first line that holds anything but indices is a header and skipped;
* ``.npy``: a numeric Q x R matrix (bool, or numbers where nonzero means positive), read with
  ``allow_pickle=False``: a pickled object array is refused, never unpickled.

:func:`load_index_ground_truth` checks the counts against the folders (Q queries, R database images) and every
index against R, and returns one sorted index array per query, as
:func:`~dinomix_ros.evaluation.retrieval.positives_within` does for positions.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from dinomix_ros.evaluation.inputs import EvaluationError, PathLike

__all__ = ["GROUND_TRUTH_SUFFIXES", "GroundTruthError", "load_index_ground_truth"]

_logger = logging.getLogger(__name__)

#: The file kinds :func:`load_index_ground_truth` reads.
GROUND_TRUTH_SUFFIXES = (".json", ".csv", ".npy")


class GroundTruthError(EvaluationError):
    """An index ground-truth file that cannot be read, or that does not fit the folders."""


def load_index_ground_truth(path: PathLike, num_queries: int, num_database: int) -> list[np.ndarray]:
    """The database indices that are correct for each query, from a ``.json``, ``.csv`` or ``.npy`` file.

    Args:
        path: the ground-truth file (format from its extension, see the module docstring).
        num_queries: Q, the number of query images (rows expected).
        num_database: R, the number of database images (indices must be below it).

    Returns:
        Q int64 arrays of sorted, distinct database indices (empty for a query without a positive).

    Raises:
        FileNotFoundError: no such file.
        GroundTruthError: another extension, malformed content, a pickled array, a count that does not match the
            folders, or an index outside [0, R).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground truth {path} does not exist"
                                + (" as a file (it is a directory)" if path.is_dir() else ""))
    suffix = path.suffix.lower()
    if suffix == ".npy":
        rows = _rows_from_matrix(path, num_queries, num_database)
    elif suffix == ".json":
        rows = _rows_from_json(path)
    elif suffix == ".csv":
        rows = _rows_from_csv(path)
    else:
        raise GroundTruthError(f"ground truth {path} has the extension {suffix or '(none)'!r}; expected one of "
                               f"{', '.join(GROUND_TRUTH_SUFFIXES)} (see `dinomix map eval --help`)")
    if len(rows) != num_queries:
        raise GroundTruthError(f"ground truth {path} has {len(rows)} query rows but the query folder holds "
                               f"{num_queries} images; expected one row per query image, in natural file order")
    positives = []
    for q, row in enumerate(rows):
        arr = np.unique(np.asarray(row, dtype=np.int64))
        if arr.size and (arr[0] < 0 or arr[-1] >= num_database):
            bad = int(arr[0] if arr[0] < 0 else arr[-1])
            raise GroundTruthError(f"ground truth {path}: query {q} lists database index {bad}, but the database "
                                   f"folder holds {num_database} images (indices 0..{num_database - 1})")
        positives.append(arr)
    without = sum(p.size == 0 for p in positives)
    if without:
        _logger.info("ground truth %s: %d of %d queries have no positive", path, without, num_queries)
    return positives


def _rows_from_matrix(path: Path, num_queries: int, num_database: int) -> list[np.ndarray]:
    try:
        matrix = np.load(path, allow_pickle=False)
    except ValueError as exc:  # an object array needs unpickling, which is refused
        raise GroundTruthError(f"ground truth {path} is not a numeric array ({exc}); expected a Q x R bool or "
                               "number matrix saved with np.save (never a pickle)") from None
    except (OSError, EOFError) as exc:
        raise GroundTruthError(f"ground truth {path} is not a readable .npy file ({exc})") from None
    if not isinstance(matrix, np.ndarray) or matrix.ndim != 2:
        raise GroundTruthError(f"ground truth {path} has shape {getattr(matrix, 'shape', '?')}; expected a 2-D "
                               f"Q x R matrix ({num_queries} x {num_database})")
    if matrix.dtype != bool and not (np.issubdtype(matrix.dtype, np.integer)
                                     or np.issubdtype(matrix.dtype, np.floating)):
        raise GroundTruthError(f"ground truth {path} has dtype {matrix.dtype}; expected bool or numbers")
    if matrix.shape != (num_queries, num_database):
        raise GroundTruthError(f"ground truth {path} is {matrix.shape[0]} x {matrix.shape[1]} but the folders hold "
                               f"{num_queries} queries and {num_database} database images; expected "
                               f"{num_queries} x {num_database} (queries x database, natural file order)")
    if np.issubdtype(matrix.dtype, np.floating) and not np.isfinite(matrix).all():
        raise GroundTruthError(f"ground truth {path} holds NaN or infinite values; expected 0/1 or bool")
    return [np.flatnonzero(row) for row in matrix]


def _index(value: Any, path: Path, q: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GroundTruthError(f"ground truth {path}: query {q} lists {value!r}; expected database indices "
                               "(integers from 0)")
    return value


def _rows_from_json(path: Path) -> list[list[int]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GroundTruthError(f"ground truth {path} is not valid JSON ({exc}); expected a list of lists of "
                               "database indices, e.g. [[0, 3], [], [7]]") from None
    if not isinstance(data, list) or not all(isinstance(row, list) for row in data):
        raise GroundTruthError(f"ground truth {path} holds a {type(data).__name__} of other things; expected a "
                               "list with one list of database indices per query, e.g. [[0, 3], [], [7]]")
    return [[_index(v, path, q) for v in row] for q, row in enumerate(data)]


def _rows_from_csv(path: Path) -> list[list[int]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise GroundTruthError(f"ground truth {path} is not a readable CSV file ({exc})") from None
    rows: list[list[int]] = []
    for number, cells in enumerate(lines, start=1):
        values = [c.strip() for c in cells if c.strip()]
        try:
            rows.append([int(v) for v in values])
        except ValueError:
            if number == 1:  # a header line
                continue
            raise GroundTruthError(f"ground truth {path}, line {number}: {','.join(cells)!r} is not a list of "
                                   "database indices; expected one line per query, e.g. '0,3' (empty: no "
                                   "positive)") from None
    return rows
