"""The three evaluation setups of ``dinomix map eval``, as library calls.

* :func:`evaluate_folders` (a): two geotagged image folders, a database and queries; positives are database images
  within ``radius_m`` of the query (UTM or x/y metres). :func:`evaluate_folders_ground_truth` is the same setup on
  the standard VPR layout, with an index ground truth (:mod:`~dinomix_ros.evaluation.groundtruth`).
* :func:`evaluate_map_against_bag` (b): a map's keyframes as the database, a bag's images as queries; positives
  are keyframes within ``radius_m`` of the query's interpolated pose, in the same frame.
* :func:`evaluate_loop_closure` (c): causal loop closure over an image sequence against RTAB-Map ground truth.

Each returns a :class:`~dinomix_ros.evaluation.reports.RunResult`: the setup-specific part of the report (counts,
skipped inputs, per-query detail), the precision/recall curve of each query's best match and Recall@N.
:func:`save_run` turns a result into a run folder (``report.json`` and plots, see
:mod:`~dinomix_ros.evaluation.reports`) and optionally stores the calibrated
threshold in a map (:mod:`~dinomix_ros.evaluation.calibration`).

The ``check_*_inputs`` functions read only file listings, manifests and bag metadata, so a wrong path, topic or
ground-truth size fails before a model is loaded. The encoder is any object with the
:class:`~dinomix_ros.model.encoder.Encoder` interface (``describe``, ``prepare``, ``describe_prepared``,
``descriptor_dim``, ``fingerprint``, ``config.batch_size``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dinomix_ros.evaluation.calibration import CalibrationConfig
from dinomix_ros.evaluation.curves import PRCurve, precision_recall_curve
from dinomix_ros.evaluation.groundtruth import load_index_ground_truth
from dinomix_ros.evaluation.inputs import finite_or_none
from dinomix_ros.evaluation.loops import LOOP_NS, evaluate_loop_closures, load_loop_closure_ground_truth
from dinomix_ros.evaluation.reports import REPORT_FILE, RunResult, assemble_report, write_plots, write_report
from dinomix_ros.evaluation.retrieval import (
    DEFAULT_NS,
    DEFAULT_RADIUS_M,
    RecallResult,
    ns_within,
    positives_within,
    recall_at_n,
)

__all__ = [
    "SETUPS",
    "check_folder_inputs",
    "check_ground_truth_inputs",
    "check_bag_inputs",
    "check_loop_closure_inputs",
    "evaluate_folders",
    "evaluate_folders_ground_truth",
    "evaluate_map_against_bag",
    "evaluate_loop_closure",
    "save_run",
    "stored_index_kind",
]

if TYPE_CHECKING:  # imported where used: maps.build and maps.index import torch and faiss
    from dinomix_ros.evaluation.verified import VerifiedComparison
    from dinomix_ros.imaging.features import FeatureConfig
    from dinomix_ros.localization.verification import Verification, VerificationConfig
    from dinomix_ros.maps.build import BagMapConfig, BuildReport, PosedImageStream
    from dinomix_ros.maps.index import PlaceIndex
    from dinomix_ros.maps.keyframes import KeyframeMap
    from dinomix_ros.maps.sources.imagefolder import ImageGeotag

_logger = logging.getLogger(__name__)

SETUPS = ("folders", "bag", "loop_closure")
_DETAIL_TOP = 5  # candidates listed per query in report.json


# --------------------------------------------------------------------------------------------------- input checks


def check_folder_inputs(database: Path, queries: Path) -> None:
    """Both folders exist and hold images.

    Raises:
        FileNotFoundError / ValueError: a missing folder or one without images.
    """
    from dinomix_ros.maps.sources.imagefolder import list_images

    list_images(database)
    list_images(queries)


def check_bag_inputs(map_path: Path, bag: Path, config: BagMapConfig) -> None:
    """The map's manifest reads and the bag has the configured image and pose topics with usable types.

    Args:
        map_path: the map to evaluate.
        bag: the bag with the query images and their poses.
        config: its image and pose topics are checked.

    Raises:
        MapNotFoundError / MapFormatError: no readable map.
        FileNotFoundError / BagError: no bag, or a topic missing or of the wrong type.
    """
    from dinomix_ros.maps.build import check_bag_config
    from dinomix_ros.maps.manifest import read_manifest

    read_manifest(map_path)
    check_bag_config(bag, config)


def check_loop_closure_inputs(images: Path, loop_gt: Path) -> None:
    """The ground truth reads and has one row and column per image of the folder.

    Raises:
        FileNotFoundError / GroundTruthFormatError / ValueError: a missing or malformed file, or a size mismatch.
    """
    _sequence_and_ground_truth(images, loop_gt)


def _sequence_and_ground_truth(images: Path, loop_gt: Path) -> tuple[list[Path], np.ndarray]:
    from dinomix_ros.maps.sources.imagefolder import list_images

    paths = list_images(images)
    gt = load_loop_closure_ground_truth(loop_gt)
    if gt.shape[0] != len(paths):
        raise ValueError(f"{loop_gt} is {gt.shape[0]} x {gt.shape[0]} but {images} holds {len(paths)} images; "
                         "expected one ground-truth row and column per image, in natural file order")
    return paths, gt


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
            see :func:`evaluate_loop_closure`); features from the image files, no intrinsics.
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
    from dinomix_ros.maps.sources.geo import utm_frame_id

    first = next(t.utm for t in tags if t.utm is not None)
    return utm_frame_id(first.zone, first.band)


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
                                  search_device: str = "auto", progress: bool = False) -> RunResult:
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
    return RunResult("folders", report, curve, recall, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ (b) map and bag


def evaluate_map_against_bag(encoder: Any, map_path: Path, bag: Path, config: BagMapConfig, *,
                             gate_queries: bool = False,
                             radius_m: float = DEFAULT_RADIUS_M, search_device: str = "auto",
                             progress: bool = False, verification: VerificationConfig | None = None,
                             min_similarity: float = 0.5) -> RunResult:
    """Setup (b): the bag's images, paired with their interpolated poses, as queries against the map.

    Args:
        encoder: the model that built the map (another model's map is refused).
        map_path: the map.
        bag: the bag with the query images and their poses.
        config: image topics, pose topic, ``pairing.max_gap_s`` and the keyframe gate (used with ``gate_queries``).
        gate_queries: query only the frames the keyframe gate keeps, not every frame with a pose.
        radius_m: a keyframe within this distance of the query's position is a correct match.
        search_device: where an exact search runs (``map.search_device``); hnsw and ivfpq run on the CPU.
        progress: show a progress bar over the bag's images.
        verification: when given and enabled and the map has local features, the same queries verified
            geometrically as the node does (its features and intrinsics; the bag's camera_info for the queries):
            ``report["verification"]`` (see :func:`evaluate_loop_closure`).
        min_similarity: similarity threshold of the accept rules compared with and without verification.

    Returns:
        The result; keyframes in other frames than the pose topic's are never positives (counted as skipped).

    Raises:
        MapMismatchError: the map was built by another model.
        ValueError: an empty map, a map without keyframes in the pose topic's frame, or no query to evaluate.
        BagError: a missing topic or one of the wrong type.
    """
    from dinomix_ros.maps.build import BuildReport, PosedImageStream, check_bag_config
    from dinomix_ros.maps.index import index_for_map
    from dinomix_ros.maps.keyframes import KeyframeMap
    from dinomix_ros.maps.sources.bags import read_pose_track

    t0 = time.perf_counter()
    check_bag_config(bag, config)
    kmap = KeyframeMap.load(map_path, expected_fingerprint=encoder.fingerprint.to_dict())
    if len(kmap) == 0:
        raise ValueError(f"the map at {map_path} has no keyframes")
    track = read_pose_track(bag, config.pose_topic)
    in_frame, map_xy = _keyframes_in_frame(kmap, track.frame_id, config.pose_topic)
    kind = stored_index_kind(kmap)
    index = index_for_map(kmap, kind, search_device if kind == "exact" else "cpu")
    counts = BuildReport(source=f"bag:{bag}", frame_id=track.frame_id)
    stream = PosedImageStream(bag, config.image_topics, track, config.pairing.max_gap_s,
                              gate=config.gate if gate_queries else None, report=counts, progress=progress)
    verifying = verification is not None and verification.enabled and kmap.local_features is not None
    if verification is not None and verification.enabled and not verifying:
        _logger.warning("the map at %s has no local features (format 1): no verification", map_path)
    extractor = _map_extractor(kmap) if verifying else None
    D, I, q_xy, meta, q_features = _search_stream(encoder, index, stream, counts, max(DEFAULT_NS), extractor)
    positives = positives_within(map_xy, q_xy, radius_m)
    recall, curve, correct = _score_search(D, I, positives, len(kmap))
    detail = [{
        "topic": topic,
        "stamp_ns": stamp,
        "best_keyframe_id": None if I[j, 0] < 0 else int(kmap.ids[I[j, 0]]),
        "similarity": float(D[j, 0]),
        "correct": bool(correct[j]),
        "distance_m": None if I[j, 0] < 0 else float(np.linalg.norm(map_xy[I[j, 0]] - q_xy[j])),
        "num_positives": int(positives[j].size),
    } for j, (topic, stamp) in enumerate(meta)]
    report = {
        "map": str(map_path),
        "bag": str(bag),
        "image_topics": list(config.image_topics),
        "pose_topic": config.pose_topic,
        "frame": track.frame_id,
        "radius_m": radius_m,
        "gated": bool(gate_queries),
        "num_database": int(in_frame.sum()),
        "num_queries": len(meta),
        "skipped": {"images_seen": counts.images_seen, "no_pose": counts.no_pose,
                    "not_keyframes": counts.not_keyframes, "unreadable": counts.bad,
                    "map_keyframes_in_other_frames": int((~in_frame).sum())},
        "queries_detail": detail,
    }
    verified_curve = None
    if verifying:
        from dinomix_ros.localization.verification import verify_pair
        from dinomix_ros.maps.sources.bags import read_camera_info

        store = kmap.local_features
        cameras = {topic: read_camera_info(bag, topic) for topic in config.image_topics}

        def check(q: int, row: int) -> Verification:
            return verify_pair(q_features[q], store.row(row), verification, cameras.get(meta[q][0]),
                               store.intrinsics.get(str(kmap.cameras[row])))

        verified_curve = _verify_setup(report, D, I, positives, check, verification, min_similarity)
    return RunResult("bag", report, curve, recall, time.perf_counter() - t0, verified_curve=verified_curve)


def _keyframes_in_frame(kmap: KeyframeMap, frame: str, pose_topic: str) -> tuple[np.ndarray, np.ndarray]:
    """Which keyframes are in ``frame``, and their (N, 2) positions (NaN for the others: never a positive).

    Raises:
        ValueError: no keyframe is in ``frame`` (positions in different frames cannot be compared).
    """
    if frame not in kmap.frames:
        raise ValueError(f"the poses of {pose_topic} are in frame {frame!r} but the map's keyframes are in "
                         f"{kmap.frames}: positions in different frames cannot be compared. Use a pose topic in the "
                         "map's frame (e.g. the one the map was built with)")
    in_frame = kmap.frame_ids == frame
    return in_frame, np.where(in_frame[:, None], kmap.positions[:, :2], np.nan)


def _search_stream(encoder: Any, index: PlaceIndex, stream: PosedImageStream, counts: BuildReport,
                   k: int, extractor: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[str, int]],
                                                           list[Any]]:
    """Describe the stream's images in batches of ``encoder.config.batch_size`` and search each batch.

    An undecodable image is skipped with a warning and counted in ``counts.bad``.

    Returns:
        (Q, k) similarities, (Q, k) map rows (-1 padding), (Q, 2) query positions, (topic, stamp_ns) per query, and
        the queries' local features (with ``extractor``, a :class:`~dinomix_ros.imaging.features.FeatureExtractor`;
        else empty).
    """
    from dinomix_ros.imaging.features import to_gray

    from dinomix_ros.imaging.decode import ImageDecodeError

    Ds, Is, xy, meta, batch, local = [], [], [], [], [], []

    def flush() -> None:
        if batch:
            desc = encoder.describe_prepared(np.stack(batch))
            D, I = index.search(desc, k)
            Ds.append(D)
            Is.append(I)
            batch.clear()

    for posed in stream:
        try:
            decoded = posed.image.decode(encoder.image.max_pixels)
            prepared = encoder.prepare(*decoded)
            if extractor is not None:
                local.append(extractor.extract(to_gray(*decoded)))
        except ImageDecodeError as exc:
            counts.bad += 1
            _logger.warning("skipping undecodable query %s@%d: %s", posed.image.topic, posed.image.stamp_ns, exc)
            continue
        batch.append(prepared)
        xy.append(posed.position[:2])
        meta.append((posed.image.topic, posed.image.stamp_ns))
        if len(batch) >= encoder.config.batch_size:
            flush()
    flush()
    D = np.concatenate(Ds) if Ds else np.zeros((0, k), np.float32)
    I = np.concatenate(Is) if Is else np.zeros((0, k), np.int64)
    return D, I, np.array(xy, dtype=np.float64).reshape(-1, 2), meta, local


def stored_index_kind(kmap: KeyframeMap) -> str:
    """The :class:`~dinomix_ros.maps.index.PlaceIndex` kind of the index stored with ``kmap``; ``exact`` if none."""
    # Inverts maps.build.INDEX_KIND_NAMES (the manifest's label of each kind).
    from dinomix_ros.maps.index import INDEX_KIND_NAMES

    stored = {v: k for k, v in INDEX_KIND_NAMES.items()}.get(kmap.index_kind or "")
    return stored or "exact"


def _score_search(D: np.ndarray, I: np.ndarray, positives: list[np.ndarray],
                  num_database: int) -> tuple[RecallResult, PRCurve, np.ndarray]:
    """Recall@N (for the N below ``num_database``, the entries searched) and the best-match PR curve of (Q, K)
    search results (I indexes the database, -1 padding).

    Returns:
        Recall@N, the PR curve, and whether each query's best match is correct.

    Raises:
        ValueError: there is no query.
    """
    if I.shape[0] == 0:
        raise ValueError("no query could be evaluated (no query image with a position was readable)")
    recall = recall_at_n(I, positives, ns_within(num_database, DEFAULT_NS))
    has_positive = np.array([p.size > 0 for p in positives], dtype=bool)
    correct = np.array([I[q, 0] >= 0 and bool(np.isin(I[q, 0], positives[q])) for q in range(I.shape[0])], bool)
    curve = precision_recall_curve(D[:, 0].astype(np.float64), correct, has_positive)
    return recall, curve, correct


# ----------------------------------------------------------------------------------------------- (c) loop closure


def evaluate_loop_closure(encoder: Any, images: Path, loop_gt: Path, *, exclude_recent: int = 10,
                          target_precision: float = 0.95, progress: bool = False,
                          verification: VerificationConfig | None = None, features: FeatureConfig | None = None,
                          min_similarity: float = 0.5) -> RunResult:
    """Setup (c): causal loop closure over an image sequence (natural file order) against RTAB-Map ground truth.

    Args:
        encoder: describes the images (an unreadable image is an error: every frame has a ground-truth row).
        images: the sequence's folder.
        loop_gt: N x N ground-truth image (``rtabmap-console -gt`` format), N = number of images.
        exclude_recent: frames just before the query that are never loop candidates.
        target_precision: the first-pass false loops are counted at the threshold reaching this precision.
        progress: show a progress bar.
        verification: when given and enabled, the same queries are also verified geometrically (local features,
            ``features``) and re-ranked: ``report["verification"]`` compares both
            (:func:`~dinomix_ros.evaluation.verified.compare_loop_closures`) and the PR curve of the verified score
            is plotted.
        features: local features for verification (default: :class:`~dinomix_ros.imaging.features.FeatureConfig`).
        min_similarity: the similarity threshold of the accepted loop closures compared with and without
            verification.

    Returns:
        The result, with the frame similarity matrix and the ground truth for the similarity plot.

    Raises:
        ValueError: the ground truth's size is not the number of images.
        EvaluationError: e.g. no frame has a loop candidate (too few frames for ``exclude_recent``).
    """
    t0 = time.perf_counter()
    paths, gt = _sequence_and_ground_truth(images, loop_gt)
    desc = encoder.describe(paths, progress=progress, desc="sequence")
    sim = np.clip(desc @ desc.T, -1.0, 1.0)  # (N, N) cosine similarity of unit descriptors, rounding clamped
    # A frame's candidates are the frames before it, less the excluded recent ones: N below the most of them.
    ns = ns_within(len(paths) - 1 - exclude_recent, LOOP_NS)
    result = evaluate_loop_closures(sim, gt, exclude_recent=exclude_recent, ns=ns)
    threshold = result.pr_curve.threshold_for_precision(target_precision)
    if threshold is not None:  # again, for the loops this threshold accepts on the first pass
        result = evaluate_loop_closures(sim, gt, exclude_recent=exclude_recent, ns=ns, threshold=threshold)
    full = result.to_dict()
    report = {
        "images": str(images),
        "loop_gt": str(loop_gt),
        "exclude_recent": exclude_recent,
        "num_frames": result.num_frames,
        "num_queries": int(result.pr_curve.num_queries),
        "first_pass_end": result.first_pass_end,
        "false_loops_first_pass": result.false_loops_first_pass,
        "frames_detail": [
            {"image": p.name, "best": None if b is None else paths[b].name, "similarity": s, "correct": c}
            for p, b, s, c in zip(paths, full["best_match"], full["best_score"], full["correct"])
        ],
    }
    verified_curve = None
    if verification is not None and verification.enabled:
        comparison = _verified_comparison(paths, sim, gt, exclude_recent, verification, features, min_similarity)
        report["verification"] = comparison.to_dict()
        verified_curve = comparison.verified_curve
    return RunResult("loop_closure", report, result.pr_curve, result.recall, time.perf_counter() - t0,
                     similarity=sim, ground_truth=gt, verified_curve=verified_curve)


def _verify_setup(report: dict[str, Any], D: np.ndarray, I: np.ndarray, positives: list[np.ndarray],
                  check: Any, verification: VerificationConfig, min_similarity: float) -> PRCurve:
    """Verify the same queries, put the comparison into ``report["verification"]``; the verified-score PR curve."""
    from dinomix_ros.evaluation.verified import compare_search

    comparison = compare_search(D, I, positives, check, config=verification, min_similarity=min_similarity,
                                ns=tuple(n for n in DEFAULT_NS if n <= I.shape[1]))
    report["verification"] = comparison.to_dict()
    return comparison.verified_curve


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


def _map_extractor(kmap: KeyframeMap) -> Any:
    """The extractor of the features the map stores (its type and slot count)."""
    from dinomix_ros.imaging.features import FeatureConfig, FeatureExtractor

    store = kmap.local_features
    return FeatureExtractor(FeatureConfig(type=store.kind, max_features=store.slots))


def _verified_comparison(paths: list[Path], sim: np.ndarray, gt: np.ndarray, exclude_recent: int,
                         verification: VerificationConfig, features: FeatureConfig | None,
                         min_similarity: float) -> VerifiedComparison:
    """Local features of every frame (no intrinsics: fundamental matrix), then the comparison on the same queries."""
    from dinomix_ros.evaluation.verified import compare_loop_closures
    from dinomix_ros.imaging.decode import read_image_file
    from dinomix_ros.imaging.features import FeatureExtractor, to_gray

    extractor = FeatureExtractor(features)
    local = [extractor.extract(to_gray(*read_image_file(p))) for p in paths]
    return compare_loop_closures(sim, gt, local, exclude_recent=exclude_recent, config=verification,
                                 min_similarity=min_similarity)


# ------------------------------------------------------------------------------------------------------ run folder


def save_run(result: RunResult, out: Path, *, model: dict[str, Any], target_precision: float,
             random_weights: bool = False, calibrate: Path | None = None,
             calibration: CalibrationConfig | None = None) -> dict[str, Any]:
    """Write the run folder: plots, then (optionally) the map's calibration, then ``report.json``.

    Args:
        result: what a setup measured.
        out: the run folder (created when missing).
        model: the evaluated model's fingerprint (``encoder.fingerprint.to_dict()``).
        target_precision: the precision the calibrated ``min_similarity`` must reach, in (0, 1].
        random_weights: the model has seeded random weights (noted in the report, the plots and the calibration).
        calibrate: a map built by the same model, to store the calibrated threshold in; nothing is stored when no
            threshold reaches the target or too few correct matches support it (check with
            :func:`~dinomix_ros.evaluation.calibration.require_calibration`).
        calibration: the evidence a threshold needs (default: ``CalibrationConfig()``); below it the run warns, and
            ``calibration.warning`` in the report says why.

    Returns:
        The report as written; ``calibration.written_to`` names the map when one was calibrated.

    Raises:
        MapMismatchError: ``calibrate`` was built by another model.
    """
    from dinomix_ros.evaluation.calibration import store_calibration, weak_evidence

    calibration = calibration or CalibrationConfig()
    report = assemble_report(result, model=model, target_precision=target_precision, random_weights=random_weights)
    threshold = report["calibration"]["min_similarity"]
    report["calibration"]["min_positives"] = calibration.min_positives
    weak = weak_evidence(report, calibration)
    if weak is not None:
        report["calibration"]["warning"] = weak
        _logger.warning("%s", weak)
    report["plots"].update(write_plots(out, result, threshold, random_weights))
    report_path = out / REPORT_FILE
    if calibrate is not None and threshold is not None and weak is None:
        store_calibration(calibrate, model, report, report_path, calibration)
        report["calibration"]["written_to"] = str(calibrate)
    write_report(report_path, report)
    _logger.info("%s: %s; min_similarity %s at precision %s -> %s", result.setup, result.recall.summary(), threshold,
                 target_precision, out)
    return report
