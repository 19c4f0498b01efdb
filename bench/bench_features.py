#!/usr/bin/env python3
"""Local feature type and count, chosen by pose accuracy as well as recognition (prints ONE JSON object).

For each variant (``TYPE:MAX_FEATURES``, e.g. ``orb:400``), on this repository's real data:

* ``posed_pairs``: pose accuracy of verification on test/data/posed_pairs (the pairs whose ground truth is exact:
  rectified stereo and real images moved by a known motion; the T265 pairs with their nominal rig are left out):
  median / p90 rotation error and translation-direction error over the pairs that pass, median inliers, pairs
  passed (:mod:`dinomix_ros.evaluation.posed_pairs`);
* ``corridor``: recognition on test/data/rtabmap_corridor: the 228 true loop pairs of its ground truth and 300 random
  unrelated pairs (at least 10 frames apart, and not within 5 frames of a true loop partner; seeded), verified
  without intrinsics (fundamental matrix, as in the demo) with the accept rules off so that every pair gets a model:
  ``true_above_p99_unrelated`` is the share of true pairs with more inliers than 99 % of the unrelated ones; with the
  default rules, how many true and unrelated pairs are accepted;
* ``corridor_all_pairs``: every corridor pair at least 10 frames apart (2,775: the 228 true loops and 2,547 others,
  near misses included), fitted once, then accepted or not at each ``--min-inliers-grid`` value (and the default
  inlier ratio): how many true and how many false pairs each ``verification.min_inliers`` accepts with this feature
  count (more features give unrelated pairs more inliers too);
* ``lund_far_accepted``: Lund photo pairs more than 40 m apart (different places) accepted at the default rules;
* ``bytes_per_keyframe``: what a map stores per keyframe (:mod:`dinomix_ros.maps.local_features`);
* ``timing``: the node's per-frame CPU cost at 640x480: features of the frame plus the verification of 5 candidates
  (the 29 Lund photos resized to 640x480 with INTER_AREA; candidates: the two neighbours along the walk and three
  photos far along it; intrinsics f = 0.8 x width, so the essential-matrix path), ``--rounds`` times per photo,
  OpenCV and faiss on the calling thread; wall time and the thread's CPU time, p50/p95 in milliseconds. The machine
  may be shared: the load average at start and end is reported, and wall time includes waiting for a core.

Example::

    PYTHONPATH=. .venv/bin/python bench/bench_features.py --variants orb:400,orb:1000,sift:400 > runs/features.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
from pathlib import Path
from time import perf_counter, thread_time

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
try:
    import dinomix_ros  # noqa: F401
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(REPO))

from dinomix_ros.evaluation.loops import load_loop_closure_ground_truth  # noqa: E402
from dinomix_ros.evaluation.posed_pairs import evaluate_pairs, load_posed_pairs, summarize  # noqa: E402
from dinomix_ros.imaging.camera import CameraModel  # noqa: E402
from dinomix_ros.imaging.features import FeatureConfig, FeatureExtractor  # noqa: E402
from dinomix_ros.localization.verification import VerificationConfig, verify_pair  # noqa: E402
from dinomix_ros.maps.local_features import slot_dtype  # noqa: E402

DATA = REPO / "test" / "data"
EXACT_GROUND_TRUTH = ("stereo", "rotation_warp", "plane_warp", "depth_warp")
DEFAULT_VARIANTS = "orb:400,orb:800,orb:1000,orb:1500,orb:2000,sift:110,sift:400,sift:1000"
SIZE = (640, 480)
UNRELATED_PAIRS = 300


def _gray(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def _pct(values: list[float], scale: float = 1e3) -> dict[str, float]:
    arr = np.asarray(values) * scale
    return {"p50": round(float(np.percentile(arr, 50)), 2), "p95": round(float(np.percentile(arr, 95)), 2)}


def corridor_pairs(seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(true loop pairs, unrelated pairs) of the corridor, as 0-based frame indices (query, keyframe)."""
    gt = load_loop_closure_ground_truth(DATA / "rtabmap_corridor" / "samples_GT.bmp")
    true = [(int(i), int(j)) for i, j in zip(*np.nonzero(gt))]
    near = gt | gt.T
    n = gt.shape[0]
    partner_zone = np.zeros_like(near)
    for i in range(n):
        for j in np.flatnonzero(near[i]):
            partner_zone[i, max(0, j - 5): j + 6] = True
    rng = np.random.default_rng(seed)
    unrelated: set[tuple[int, int]] = set()
    while len(unrelated) < UNRELATED_PAIRS:
        i, j = (int(x) for x in rng.integers(0, n, 2))
        if abs(i - j) >= 10 and not partner_zone[i, j] and not partner_zone[j, i]:
            unrelated.add((i, j))
    return true, sorted(unrelated)


def corridor_frames(config: FeatureConfig) -> list:
    extractor = FeatureExtractor(config)
    return [extractor.extract(_gray(DATA / "rtabmap_corridor" / "samples" / f"{i}.jpg")) for i in range(1, 85)]


def corridor_all_pairs(frames: list, grid: list[int]) -> dict:
    gt = load_loop_closure_ground_truth(DATA / "rtabmap_corridor" / "samples_GT.bmp")
    gt = gt | gt.T
    fit_all = VerificationConfig(min_inliers=0, min_inlier_ratio=0.0)
    ratio = VerificationConfig().min_inlier_ratio
    fits = [(bool(gt[i, j]), verify_pair(frames[i], frames[j], fit_all)) for i in range(len(frames))
            for j in range(i - 9)]
    out = {"pairs": len(fits), "true_pairs": sum(t for t, _ in fits)}
    for m in grid:
        ok = [t for t, v in fits if v.inliers >= m and v.inlier_ratio >= ratio]
        out[f"min_inliers_{m}"] = {"true_accepted": sum(ok), "false_accepted": len(ok) - sum(ok)}
    return out


def corridor(frames: list, true: list, unrelated: list) -> dict:
    fit_all = VerificationConfig(min_inliers=0, min_inlier_ratio=0.0)
    defaults = VerificationConfig()
    t_in = np.array([verify_pair(frames[i], frames[j], fit_all).inliers for i, j in true])
    u_in = np.array([verify_pair(frames[i], frames[j], fit_all).inliers for i, j in unrelated])
    p99 = float(np.percentile(u_in, 99))
    return {"true_pairs": len(true), "unrelated_pairs": len(unrelated),
            "unrelated_inliers_p99": round(p99, 1), "unrelated_inliers_max": int(u_in.max()),
            "true_inliers_median": float(np.median(t_in)),
            "true_above_p99_unrelated": round(float(np.mean(t_in > p99)), 4),
            "accepted_true_at_defaults": int(sum(verify_pair(frames[i], frames[j], defaults).passed
                                                 for i, j in true)),
            "accepted_unrelated_at_defaults": int(sum(verify_pair(frames[i], frames[j], defaults).passed
                                                      for i, j in unrelated))}


def lund_far_accepted(config: FeatureConfig) -> dict:
    extractor = FeatureExtractor(config)
    frames = [extractor.extract(_gray(DATA / "lund_gps" / "images" / f"{i:02d}.jpg")) for i in range(1, 30)]
    with open(DATA / "lund_gps" / "gps_from_exif.csv") as f:
        xy = np.array([[float(r["utm_east"]), float(r["utm_north"])] for r in csv.DictReader(f)])
    far = [(i, j) for i in range(29) for j in range(i) if np.linalg.norm(xy[i] - xy[j]) > 40.0]
    return {"pairs": len(far), "accepted": int(sum(verify_pair(frames[i], frames[j]).passed for i, j in far))}


def posed_pairs(config: FeatureConfig, pairs: list) -> dict:
    s = summarize(evaluate_pairs(pairs, config))
    keep = ("pairs", "passed", "inliers", "rotation_error_deg", "translation_direction_error_deg",
            "translation_error_rel", "rotation_within_3_sigma")
    return {k: s[k] for k in keep}


def timing(config: FeatureConfig, rounds: int) -> dict:
    frames = [cv2.resize(_gray(p), SIZE, interpolation=cv2.INTER_AREA)
              for p in sorted((DATA / "lund_gps" / "images").glob("*.jpg"))]
    n = len(frames)
    extractor = FeatureExtractor(config)
    stored = [extractor.extract(f) for f in frames]
    f = 0.8 * SIZE[0]
    cam = CameraModel(SIZE[0], SIZE[1], np.array([[f, 0, SIZE[0] / 2], [0, f, SIZE[1] / 2], [0, 0, 1]]))
    v = VerificationConfig()
    extractor.extract(frames[0])  # warm-up
    wall, cpu, extract = [], [], []
    for i in range(n):
        cands = [(i - 1) % n, (i + 1) % n, (i + n // 3) % n, (i + n // 2) % n, (i + 2 * n // 3) % n]
        for _ in range(rounds):
            c0, t0 = thread_time(), perf_counter()
            query = extractor.extract(frames[i])
            t1 = perf_counter()
            for j in cands:
                verify_pair(query, stored[j], v, cam, cam)
            wall.append(perf_counter() - t0)
            cpu.append(thread_time() - c0)
            extract.append(t1 - t0)
    return {"extract_wall_ms": _pct(extract), "total_wall_ms": _pct(wall), "total_thread_cpu_ms": _pct(cpu),
            "samples": len(wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated TYPE:MAX_FEATURES")
    parser.add_argument("--max-image-side", type=int, default=FeatureConfig().max_image_side)
    parser.add_argument("--rounds", type=int, default=3, help="timed repetitions per photo (0: no timing)")
    parser.add_argument("--only", choices=("all", "accuracy", "timing"), default="all")
    parser.add_argument("--min-inliers-grid", default="30,35,40,45,50,60",
                        help="verification.min_inliers values for corridor_all_pairs (comma-separated; empty: skip)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    load_start = os.getloadavg()
    pairs = load_posed_pairs(DATA / "posed_pairs" / "pairs.csv", kinds=EXACT_GROUND_TRUTH)
    true, unrelated = corridor_pairs()
    out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "opencv": cv2.__version__,
           "max_image_side": args.max_image_side, "variants": []}
    for spec in args.variants.split(","):
        kind, count = spec.split(":")
        config = FeatureConfig(type=kind, max_features=int(count), max_image_side=args.max_image_side)
        row = {"type": kind, "max_features": int(count),
               "bytes_per_keyframe": int(count) * slot_dtype(kind).itemsize}
        if args.only in ("all", "accuracy"):
            row["posed_pairs"] = posed_pairs(config, pairs)
            frames = corridor_frames(config)
            row["corridor"] = corridor(frames, true, unrelated)
            if args.min_inliers_grid:
                row["corridor_all_pairs"] = corridor_all_pairs(frames, [int(x) for x in
                                                                        args.min_inliers_grid.split(",")])
            row["lund_far_accepted"] = lund_far_accepted(config)
        if args.only in ("all", "timing") and args.rounds > 0:
            row["timing"] = timing(config, args.rounds)
        out["variants"].append(row)
        print(f"{spec} done", file=sys.stderr)
    out["loadavg_start"] = [round(x, 2) for x in load_start]
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
