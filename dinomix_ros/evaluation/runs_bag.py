"""Evaluation setup (b) of ``dinomix map eval``: a bag's images, with their interpolated poses, against a map.

:func:`evaluate_map_against_bag`: the map's keyframes are the database; positives are keyframes within
``radius_m`` of the query's interpolated pose, in the same frame. :func:`check_bag_inputs` reads only the manifest
and the bag's metadata, before a model loads. What the setups share, and the run folder:
:mod:`~dinomix_ros.evaluation.runs`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dinomix_ros.evaluation.reports import RunResult
from dinomix_ros.evaluation.retrieval import DEFAULT_NS, DEFAULT_RADIUS_M, positives_within
from dinomix_ros.evaluation.runs import _score_search, _verify_setup  # shared by setups (a) and (b)

__all__ = [
    "check_bag_inputs",
    "evaluate_map_against_bag",
    "stored_index_kind",
]

if TYPE_CHECKING:  # imported where used: maps.build_bag and maps.index import torch and faiss
    from dinomix_ros.localization.verification import Verification, VerificationConfig
    from dinomix_ros.maps.build import BuildReport
    from dinomix_ros.maps.build_bag import BagMapConfig, PosedImageStream
    from dinomix_ros.maps.index import PlaceIndex
    from dinomix_ros.maps.keyframes import KeyframeMap

_logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------- input checks


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
    from dinomix_ros.maps.build_bag import check_bag_config
    from dinomix_ros.maps.manifest import read_manifest

    read_manifest(map_path)
    check_bag_config(bag, config)

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
            ``report["verification"]`` (see
            :func:`~dinomix_ros.evaluation.runs_loop_closure.evaluate_loop_closure`).
        min_similarity: similarity threshold of the accept rules compared with and without verification.

    Returns:
        The result; keyframes in other frames than the pose topic's are never positives (counted as skipped).

    Raises:
        MapMismatchError: the map was built by another model.
        ValueError: an empty map, a map without keyframes in the pose topic's frame, or no query to evaluate.
        BagError: a missing topic or one of the wrong type.
    """
    from dinomix_ros.maps.build import BuildReport
    from dinomix_ros.maps.build_bag import PosedImageStream, check_bag_config
    from dinomix_ros.maps.index import index_for_map
    from dinomix_ros.maps.loading import load_map
    from dinomix_ros.maps.sources.bags import read_pose_track

    # Over 80 lines on purpose: one pass over the setup (load, stream, score, report, verify); most of it is the
    # report's literal fields.
    t0 = time.perf_counter()
    check_bag_config(bag, config)
    kmap = load_map(map_path, expected_fingerprint=encoder.fingerprint.to_dict())
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

        def check(q: int, row: int, motion: bool = False) -> Verification:
            return verify_pair(q_features[q], store.row(row), verification, cameras.get(meta[q][0]),
                               store.intrinsics.get(str(kmap.cameras[row])), motion=motion)

        # candidates checked without their motion, the best one's estimated, as the node's LiveMap does
        verified_curve = _verify_setup(report, D, I, positives, check, verification, min_similarity,
                                       lambda q, row: check(q, row, motion=True))
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
    # Inverts maps.index.INDEX_KIND_NAMES (the manifest's label of each kind).
    from dinomix_ros.maps.index import INDEX_KIND_NAMES

    stored = {v: k for k, v in INDEX_KIND_NAMES.items()}.get(kmap.index_kind or "")
    return stored or "exact"


def _map_extractor(kmap: KeyframeMap) -> Any:
    """The extractor of the features the map stores (its type and slot count)."""
    from dinomix_ros.imaging.features import FeatureConfig, FeatureExtractor

    store = kmap.local_features
    return FeatureExtractor(FeatureConfig(type=store.kind, max_features=store.slots))
