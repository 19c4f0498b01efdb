"""Evaluation setup (a) of ``dinomix map eval``: every query image of a folder against a database folder.

* :func:`evaluate_folders`: two geotagged image folders, a database and queries; positives are database images
  within ``radius_m`` of the query (UTM or x/y metres).
* :func:`evaluate_folders_ground_truth`: the same setup on the standard VPR layout, with an index ground truth
  (:mod:`~dinomix_ros.evaluation.groundtruth`).

The input checks (:func:`check_folder_inputs`, :func:`check_ground_truth_inputs`) read only file listings and the
ground truth, before a model loads. What the setups share, and the run folder: :mod:`~dinomix_ros.evaluation.runs`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dinomix_ros.evaluation.groundtruth import load_index_ground_truth
from dinomix_ros.evaluation.inputs import finite_or_none
from dinomix_ros.evaluation.reports import RunResult
from dinomix_ros.evaluation.retrieval import DEFAULT_NS, DEFAULT_RADIUS_M, positives_within
from dinomix_ros.evaluation.runs import _DETAIL_TOP, _score_search, _verify_setup  # shared by setups (a) and (b)

__all__ = [
    "check_folder_inputs",
    "check_ground_truth_inputs",
    "evaluate_folders",
    "evaluate_folders_ground_truth",
]

if TYPE_CHECKING:  # imported where used: maps.index imports faiss
    from dinomix_ros.imaging.features import FeatureConfig
    from dinomix_ros.localization.verification import Verification, VerificationConfig
    from dinomix_ros.maps.sources.imagefolder import ImageGeotag

_logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------- input checks


def check_folder_inputs(database: Path, queries: Path) -> None:
    """Both folders exist and hold images.

    Raises:
        FileNotFoundError / ValueError: a missing folder or one without images.
    """
    from dinomix_ros.maps.sources.imagefolder import list_images

    list_images(database)
    list_images(queries)

# ------------------------------------------------------------------------------------------ (a) geotagged folders


def evaluate_folders(encoder: Any, database: Path, queries: Path, *, geotags: str = "auto",
                     database_csv: Path | None = None, queries_csv: Path | None = None,
                     radius_m: float = DEFAULT_RADIUS_M, search_device: str = "auto",
                     progress: bool = False, verification: VerificationConfig | None = None,
                     features: FeatureConfig | None = None, min_similarity: float = 0.5) -> RunResult:
    """Setup (a): every query image against an exact index of the database images.

    Unreadable images and images without a position are skipped and counted (``report["skipped"]``); an unreadable
    database image is never a positive.

    Args:
        encoder: describes the images.
        database: geotagged database folder.
        queries: geotagged query folder.
        geotags: geotag source of both folders (:data:`~dinomix_ros.maps.sources.imagefolder.GEOTAG_SOURCES`).
        database_csv: geotag CSV of the database folder (geotags ``csv``/``auto``).
        queries_csv: geotag CSV of the query folder.
        radius_m: a database image within this distance of the query is a correct match.
        search_device: where the exact search runs (``map.search_device``: auto, cpu or cuda).
        progress: show progress bars.
        verification: when given and enabled, the same queries verified geometrically (``report["verification"]``,
            see :func:`~dinomix_ros.evaluation.runs_loop_closure.evaluate_loop_closure`); features from the image
            files, no intrinsics.
        features: local features for verification.
        min_similarity: similarity threshold of the accept rules compared with and without verification.

    Returns:
        The result; ``report["frame"]`` is ``map`` for x/y positions, else the UTM zone's frame.

    Raises:
        ValueError: no metric positions, different kinds of positions in the two folders, no readable database
            image, or no query to evaluate.
    """
    from dinomix_ros.maps.sources.imagefolder import geotag_images

    t0 = time.perf_counter()
    db_tags = geotag_images(database, geotags, database_csv)
    zones = Counter(t.utm.zone for t in db_tags if t.utm is not None)
    zone = zones.most_common(1)[0][0] if zones else None
    q_tags = geotag_images(queries, geotags, queries_csv, utm_zone=zone)
    db_xy, db_kind = _metric_positions(db_tags, "database", database)
    q_xy, q_kind = _metric_positions(q_tags, "query", queries)
    if db_kind != q_kind:
        raise ValueError(f"the database positions are {db_kind} but the query positions are {q_kind}; both "
                         "folders need the same kind of geotag (UTM/GPS, or x/y in one map frame)")
    frame = "map" if db_kind == "x/y" else _utm_frame(db_tags)
    q_has_xy = np.isfinite(q_xy).all(axis=1)
    db_ok, q_ok, q_rows, D, I = _search_folders(encoder, [t.path for t in db_tags], [t.path for t in q_tags],
                                                q_has_xy, database, search_device, progress)
    db_xy = np.where(db_ok[:, None], db_xy, np.nan)  # an unreadable database image is never a positive
    positives = positives_within(db_xy, q_xy[q_rows], radius_m)
    recall, curve, correct = _score_search(D, I, positives, int(db_ok.sum()))
    detail = [_folder_query_detail(q_tags[q], db_tags, D[j], I[j], bool(correct[j]), db_xy, q_xy[q], positives[j])
              for j, q in enumerate(q_rows)]
    report = {
        "database": str(database),
        "queries": str(queries),
        "frame": frame,
        "radius_m": radius_m,
        "num_database": len(db_tags),
        "num_queries": int(q_rows.size),
        "skipped": {"database_unreadable": int((~db_ok).sum()), "database_without_position":
                    int((~np.isfinite(db_xy).all(axis=1) & db_ok).sum()),
                    "queries_unreadable": int((~q_ok).sum()), "queries_without_position": int((~q_has_xy).sum())},
        "queries_detail": detail,
    }
    verified_curve = None
    if verification is not None and verification.enabled:
        db_features = _LazyFeatures([t.path for t in db_tags], features)
        q_features = _LazyFeatures([q_tags[q].path for q in q_rows], features)
        verified_curve = _verify_setup(report, D, I, positives, lambda q, row: _check_files(
            q_features, q, db_features, row, verification), verification, min_similarity)
    return RunResult("folders", report, curve, recall, time.perf_counter() - t0, verified_curve=verified_curve)


def _search_folders(encoder: Any, db_paths: list[Path], q_paths: list[Path], q_usable: np.ndarray, database: Path,
                    search_device: str, progress: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Describe both folders and search the usable, readable queries in an exact index of the readable database.

    Returns:
        Readable database images (R,) and queries (Q,), the searched query rows, and their (n, K) similarities and
        database rows (-1 padding), K = the largest N of Recall@N.

    Raises:
        ValueError: no database image could be read.
    """
    from dinomix_ros.maps.index import PlaceIndex

    db_desc = encoder.describe(db_paths, progress=progress, skip_errors=True, desc="database")
    q_desc = encoder.describe(q_paths, progress=progress, skip_errors=True, desc="queries")
    db_ok = np.isfinite(db_desc).all(axis=1)
    if not db_ok.any():
        raise ValueError(f"no database image in {database} could be read")
    db_rows = np.flatnonzero(db_ok)
    index = PlaceIndex(encoder.descriptor_dim, "exact", search_device)
    index.add(db_desc[db_ok])
    q_ok = np.isfinite(q_desc).all(axis=1)
    q_rows = np.flatnonzero(q_ok & q_usable)
    k = max(DEFAULT_NS)
    D, I = index.search(q_desc[q_rows], k) if q_rows.size else (np.zeros((0, k), np.float32),
                                                                np.zeros((0, k), np.int64))
    I = np.where(I >= 0, db_rows[np.clip(I, 0, None)], -1)  # index rows -> database rows
    return db_ok, q_ok, q_rows, D, I


def _folder_query_detail(tag: ImageGeotag, db_tags: list[ImageGeotag], scores: np.ndarray, rows: np.ndarray,
                         correct: bool, db_xy: np.ndarray, q_xy: np.ndarray, positives: np.ndarray) -> dict[str, Any]:
    """One query's line in ``queries_detail``: its best database image, score, distance and top names."""
    top = [int(i) for i in rows[:_DETAIL_TOP] if i >= 0]
    best = top[0] if top else None
    return {
        "image": str(tag.path),
        "best": None if best is None else str(db_tags[best].path),
        "similarity": float(scores[0]),
        "correct": correct,
        "distance_m": None if best is None else float(np.linalg.norm(db_xy[best] - q_xy)),
        "num_positives": int(positives.size),
        "top": [str(db_tags[i].path.name) for i in top],
    }


def _metric_positions(tags: list[ImageGeotag], what: str, folder: Path) -> tuple[np.ndarray, str]:
    """(N, 2) metric positions (x/y if any image has them, else UTM), NaN where unknown, and their kind."""
    use_xy = any(t.x is not None and t.y is not None for t in tags)
    xy = np.full((len(tags), 2), np.nan)
    for i, t in enumerate(tags):
        if use_xy and t.x is not None and t.y is not None:
            xy[i] = (t.x, t.y)
        elif not use_xy and t.utm is not None:
            xy[i] = (t.utm.easting, t.utm.northing)
    if not np.isfinite(xy).all(axis=1).any():
        raise ValueError(f"no {what} image in {folder} has a metric position (UTM or x/y); geotag the images "
                         "('@UTM@' file names, a CSV, or EXIF GPS) or choose --geotags")
    return xy, "x/y" if use_xy else "UTM"


def _utm_frame(tags: list[ImageGeotag]) -> str:
    from dinomix_ros.maps.sources.geo import UTM_FRAME

    return UTM_FRAME


# ------------------------------------------------------------------- (a) the VPR layout: index ground truth


def check_ground_truth_inputs(database: Path, queries: Path, ground_truth: Path) -> None:
    """Both folders hold images and the index ground truth fits them (read before a model loads).

    Raises:
        FileNotFoundError / GroundTruthError / ValueError: a missing folder or file, or a ground truth whose counts
            or indices do not fit the folders.
    """
    _ground_truth_inputs(database, queries, ground_truth, warn=False)


def _ground_truth_inputs(database: Path, queries: Path, ground_truth: Path, *,
                         warn: bool = True) -> tuple[list[Path], list[Path], list[np.ndarray]]:
    """The images of both folders and the positives; ``warn``: say when natural and sorted order differ."""
    from dinomix_ros.maps.sources.imagefolder import list_images

    db_paths, q_paths = list_images(database), list_images(queries)
    positives = load_index_ground_truth(ground_truth, len(q_paths), len(db_paths))
    folders = {database: db_paths, queries: q_paths} if warn else {}  # one warning per folder
    for folder, paths in folders.items():
        names = [str(p.relative_to(folder)) for p in paths]
        if names != sorted(names):  # e.g. 2.jpg, 10.jpg: natural order, which plain sorting would swap
            _logger.warning("%s: images are numbered in natural order (%s before %s), not in plain sorted order; "
                            "%s must use the same order", folder, *_first_disorder(names), ground_truth)
    return db_paths, q_paths, positives


def _first_disorder(names: list[str]) -> tuple[str, str]:
    return next((a, b) for a, b in zip(names, names[1:]) if a > b)


def evaluate_folders_ground_truth(encoder: Any, database: Path, queries: Path, ground_truth: Path, *,
                                  search_device: str = "auto", progress: bool = False,
                                  verification: VerificationConfig | None = None,
                                  features: FeatureConfig | None = None, min_similarity: float = 0.5) -> RunResult:
    """Setup (a) on the standard VPR layout: positives come from an index ground truth, not from positions.

    Recall@N is the VPR literature's: the share of queries with a correct database image among their N best (N
    below the database size). Queries without a positive are left out of it and counted, as in the other setups;
    ``report["recall_all_queries"]`` counts them as misses, as VPR-methods-evaluation divides by every query.
    An unreadable database image can never be found (it stays a positive of its queries); an unreadable query is
    skipped and counted.

    Args:
        encoder: describes the images.
        database: the database folder (images numbered from 0 in natural order).
        queries: the query folder (likewise).
        ground_truth: ``.json``/``.csv`` lists of database indices per query, or a ``.npy`` Q x R matrix
            (:func:`~dinomix_ros.evaluation.groundtruth.load_index_ground_truth`).
        search_device: where the exact search runs (``map.search_device``: auto, cpu or cuda).
        progress: show progress bars.
        verification: when given and enabled, the same queries verified geometrically (``report["verification"]``,
            as in :func:`evaluate_folders`); features from the image files, no intrinsics.
        features: local features for verification.
        min_similarity: similarity threshold of the accept rules compared with and without verification.

    Returns:
        The result; ``report["queries_detail"]`` gives each query's index, best database index and positives.

    Raises:
        GroundTruthError: a ground truth that does not fit the folders.
        ValueError: no readable database image, or no query to evaluate.
    """
    t0 = time.perf_counter()
    db_paths, q_paths, all_positives = _ground_truth_inputs(database, queries, ground_truth)
    db_ok, q_ok, q_rows, D, I = _search_folders(encoder, db_paths, q_paths, np.ones(len(q_paths), bool), database,
                                                search_device, progress)
    positives = [all_positives[q] for q in q_rows]
    recall, curve, correct = _score_search(D, I, positives, int(db_ok.sum()))
    detail = [{
        "image": str(q_paths[q]),
        "query_index": int(q),
        "best": None if I[j, 0] < 0 else str(db_paths[I[j, 0]]),
        "best_index": None if I[j, 0] < 0 else int(I[j, 0]),
        "similarity": float(D[j, 0]),
        "correct": bool(correct[j]),
        "num_positives": int(positives[j].size),
        "top": [int(i) for i in I[j, :_DETAIL_TOP] if i >= 0],
    } for j, q in enumerate(q_rows)]
    evaluated = recall.num_queries + recall.num_without_positives
    report = {
        "database": str(database),
        "queries": str(queries),
        "ground_truth": str(ground_truth),
        "num_database": len(db_paths),
        "num_queries": int(q_rows.size),
        "recall_all_queries": {str(n): finite_or_none(r * recall.num_queries / max(evaluated, 1))
                               for n, r in recall.recalls.items()},
        "skipped": {"database_unreadable": int((~db_ok).sum()), "queries_unreadable": int((~q_ok).sum())},
        "queries_detail": detail,
    }
    verified_curve = None
    if verification is not None and verification.enabled:
        db_features = _LazyFeatures(db_paths, features)
        q_features = _LazyFeatures([q_paths[q] for q in q_rows], features)
        verified_curve = _verify_setup(report, D, I, positives, lambda q, row: _check_files(
            q_features, q, db_features, row, verification), verification, min_similarity)
    return RunResult("folders", report, curve, recall, time.perf_counter() - t0, verified_curve=verified_curve)


class _LazyFeatures:
    """Local features of image files, extracted on first use (only the candidates that get verified)."""

    def __init__(self, paths: list[Path], config: FeatureConfig | None) -> None:
        from dinomix_ros.imaging.features import FeatureExtractor

        self._paths, self._cache = paths, {}
        self._extractor = FeatureExtractor(config)

    def __getitem__(self, i: int) -> Any:
        from dinomix_ros.imaging.decode import read_image_file
        from dinomix_ros.imaging.features import to_gray

        if i not in self._cache:
            self._cache[i] = self._extractor.extract(to_gray(*read_image_file(self._paths[i])))
        return self._cache[i]


def _check_files(queries: _LazyFeatures, q: int, database: _LazyFeatures, row: int,
                 verification: VerificationConfig) -> Verification | None:
    """One (query image, database image) verification; None when an image cannot be read."""
    from dinomix_ros.imaging.decode import ImageDecodeError
    from dinomix_ros.localization.verification import verify_pair

    try:
        return verify_pair(queries[q], database[row], verification)
    except (ImageDecodeError, OSError):
        return None
