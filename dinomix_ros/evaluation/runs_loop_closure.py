"""Evaluation setup (c) of ``dinomix map eval``: causal loop closure over an image sequence, RTAB-Map ground truth.

:func:`check_loop_closure_inputs` reads only the folder listing and the ground truth, before a model loads. What the
setups share, and the run folder: :mod:`~dinomix_ros.evaluation.runs`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dinomix_ros.evaluation.loops import LOOP_NS, evaluate_loop_closures, load_loop_closure_ground_truth
from dinomix_ros.evaluation.reports import RunResult
from dinomix_ros.evaluation.retrieval import ns_within

__all__ = [
    "check_loop_closure_inputs",
    "evaluate_loop_closure",
]

if TYPE_CHECKING:
    from dinomix_ros.evaluation.verified import VerifiedComparison
    from dinomix_ros.imaging.features import FeatureConfig
    from dinomix_ros.localization.verification import VerificationConfig


# --------------------------------------------------------------------------------------------------- input checks


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
