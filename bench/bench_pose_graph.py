#!/usr/bin/env python3
"""Loop closures from this package in a GTSAM pose graph: trajectory error (ATE, evo) with and without them, and with
a deliberately wrong closure; prints ONE JSON object and writes the plot of the trajectories.

The chain (dinomix_ros.evaluation.runs_pose_graph) on a rendered RGB-D sequence with exact ground truth
(dinomix_ros.evaluation.synthetic_sequence): one lap around a block of facades textured with the Lund street photos
(test/data/lund_gps, BSD-2-Clause) and a revisit of its start, 640x480, drifting odometry (heading bias, scale error,
noise). Frames are described by DINO-Mix (seeded random weights unless --checkpoint), verified with ORB + PnP on the
keyframes' depths inside LiveMap, and every accepted verified match becomes a BetweenFactorPose3 with its covariance
(reordered to GTSAM's [rot, trans]) inside a robust kernel. For each kernel (cauchy, huber, none) the graph is solved
three times: odometry only, with the closures, with the closures and one wrong closure (the last frame claimed to be
at the frame half a lap earlier, 0.05 m / 0.01 rad sigma).

ATE: evo's APE on the translation part, RMSE over all frames, after SE(3) alignment (``evo_ape --align``) and
without it (the graph's first pose is anchored at the true start). Each closure's error against the ground truth and
its NEES under its own covariance are reported too (6 on average when the covariance is right; a closure above
20.06, the 6-DoF "3 sigma", is overconfident).

evo (GPL-3.0) and gtsam (BSD) are test requirements (requirements-dev.txt): this script, not the package, imports evo.

Example (about a minute on 2 CPU cores)::

    PYTHONPATH=. .venv/bin/python bench/bench_pose_graph.py --out runs/pose_graph > runs/pose_graph/result.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
try:
    import dinomix_ros  # noqa: F401
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(REPO))

from dinomix_ros.evaluation.pose_graph import KERNELS, PoseGraphConfig  # noqa: E402
from dinomix_ros.evaluation.runs_pose_graph import (  # noqa: E402
    CHI2_6DOF_99_73, check_closures, detect_loop_closures, odometry_covariance, optimize_trajectory,
    wrong_loop_closure,
)
from dinomix_ros.evaluation.synthetic_sequence import (  # noqa: E402
    OdometryConfig, SequenceConfig, block_loop_sequence, distinct_photos, drifting_odometry, load_photos,
)
from dinomix_ros.localization.camera_pose import matrix_to_quat  # noqa: E402
from dinomix_ros.model.encoder import Encoder, EncoderConfig  # noqa: E402
from dinomix_ros.util.files import atomic_path  # noqa: E402

LOG = logging.getLogger("bench_pose_graph")
LUND = REPO / "test" / "data" / "lund_gps" / "images"


def ate(ground_truth: np.ndarray, estimate: np.ndarray, stamps_ns: np.ndarray, align: bool) -> float:
    """evo APE (translation part) RMSE in metres of (N, 4, 4) poses at the same stamps."""
    from evo.core import metrics, trajectory

    def traj(poses: np.ndarray) -> trajectory.PoseTrajectory3D:
        wxyz = np.array([matrix_to_quat(T[:3, :3]) for T in poses])[:, [3, 0, 1, 2]]
        return trajectory.PoseTrajectory3D(poses[:, :3, 3], wxyz, stamps_ns * 1e-9)

    ref, est = traj(ground_truth), traj(estimate)
    if align:
        est.align(ref)
    ape = metrics.APE(metrics.PoseRelation.translation_part)
    ape.process_data((ref, est))
    return float(ape.get_statistic(metrics.StatisticsType.rmse))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="folder for trajectories.png and result.json")
    p.add_argument("--photos", type=Path, default=LUND, help="folder of the photos that texture the block")
    p.add_argument("--checkpoint", default="", help="DINO-Mix weights (default: seeded random weights)")
    p.add_argument("--variant", default="vits14", help="model variant of the random weights")
    p.add_argument("--kernels", default=",".join(KERNELS), help="robust kernels to compare")
    p.add_argument("--seed", type=int, default=0, help="seed of the odometry noise, the pixel noise and the weights")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    load_start = os.getloadavg()

    t0 = time.perf_counter()
    sequence = block_loop_sequence(distinct_photos(load_photos(args.photos)), SequenceConfig(seed=args.seed))
    odo_config = OdometryConfig(seed=args.seed)
    odometry = drifting_odometry(sequence.poses, odo_config)
    config = EncoderConfig(device="cpu", dtype="float32", batch_size=8)  # float32: the same descriptors on every CPU
    encoder = (Encoder.from_checkpoint(args.checkpoint, config) if args.checkpoint
               else Encoder.from_random(args.variant, args.seed, config))
    t1 = time.perf_counter()
    detected = detect_loop_closures(sequence, encoder, odometry)
    t2 = time.perf_counter()
    checks = check_closures(sequence, detected)
    wrong, wrong_distance = wrong_loop_closure(sequence)
    step_cov = odometry_covariance(sequence, odo_config)
    stamps, truth = sequence.stamps_ns, sequence.poses
    closures = [d.closure for d in detected]
    results, weights, solved = {}, {}, {}
    for kernel in args.kernels.split(","):
        graph_config = PoseGraphConfig(kernel=kernel)
        ts = time.perf_counter()
        alone, _ = optimize_trajectory(sequence, odometry, step_cov, [], graph_config)
        closed, w_closed = optimize_trajectory(sequence, odometry, step_cov, closures, graph_config)
        attacked, w_attacked = optimize_trajectory(sequence, odometry, step_cov, closures + [wrong], graph_config)
        solve_s = (time.perf_counter() - ts) / 3
        row = {}
        for name, poses in (("odometry", odometry), ("graph_without_closures", alone), ("with_closures", closed),
                            ("with_closures_and_wrong", attacked)):
            row[name] = {"ate_aligned_m": round(ate(truth, poses, stamps, True), 4),
                         "ate_unaligned_m": round(ate(truth, poses, stamps, False), 4)}
        row["drop"] = round(row["with_closures"]["ate_aligned_m"] / row["odometry"]["ate_aligned_m"], 3)
        row["wrong_over_good"] = round(row["with_closures_and_wrong"]["ate_aligned_m"]
                                       / row["with_closures"]["ate_aligned_m"], 3)
        row["wrong_closure_weight"] = float(w_attacked[-1])
        row["closures_weight_below_0.1"] = int((w_closed < 0.1).sum())
        row["solve_s"] = round(solve_s, 3)
        results[kernel], weights[kernel], solved[kernel] = row, w_closed, (closed, attacked, w_attacked)

    nees = np.array([c.nees for c in checks])
    out = {
        "benchmark": "pose_graph",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg()},
        "model": encoder.fingerprint.id if args.checkpoint else f"random {args.variant} (seed {args.seed})",
        "sequence": {"frames": len(sequence), "lap_frames": sequence.lap_frames, "step_m": sequence.config.step_m,
                     "size": [sequence.camera.width, sequence.camera.height],
                     "facades": len(sequence.scene.facades)},
        "odometry": dataclasses.asdict(odo_config),
        "closures": {
            "count": len(detected),
            "cases": sorted({c.case for c in checks}),
            "nees_mean": round(float(nees.mean()), 2) if nees.size else None,
            "nees_median": round(float(np.median(nees)), 2) if nees.size else None,
            "nees_max": round(float(nees.max()), 1) if nees.size else None,
            "over_3_sigma": int((nees > CHI2_6DOF_99_73).sum()),
            "position_error_m_median": round(float(np.median([c.position_error_m for c in checks])), 4)
            if checks else None,
            "per_closure": [{"query": c.query, "keyframe": c.keyframe, "inliers": d.inliers, "case": c.case,
                             "nees": round(c.nees, 2), "position_error_m": round(c.position_error_m, 4),
                             "rotation_error_deg": round(c.rotation_error_deg, 3),
                             "sigma_position_m": round(c.sigma_position_m, 4),
                             "weights": {k: round(float(w[i]), 4) for k, w in weights.items()}}
                            for i, (c, d) in enumerate(zip(checks, detected))],
        },
        "wrong_closure": {"query": len(sequence) - 1, "true_distance_m": round(wrong_distance, 2)},
        "ate": results,
        "seconds": {"setup": round(t1 - t0, 2), "frames_to_closures": round(t2 - t1, 2),
                    "total": round(time.perf_counter() - t0, 2)},
    }
    if args.out is not None:
        from dinomix_ros.evaluation.plots import plot_trajectories

        args.out.mkdir(parents=True, exist_ok=True)
        kernel = "cauchy" if "cauchy" in solved else next(iter(solved))
        closed, attacked, w_attacked = solved[kernel]
        pairs = [(d.keyframe, d.query) for d in detected]
        wrong_pair = (len(sequence) - 1 - sequence.lap_frames // 2, len(sequence) - 1)
        row = results[kernel]
        plot_trajectories(
            {"ground truth": truth, f"odometry (ATE {row['odometry']['ate_aligned_m']:.2f} m)": odometry,
             f"pose graph, {kernel} (ATE {row['with_closures']['ate_aligned_m']:.2f} m)": closed,
             f"+ wrong closure (ATE {row['with_closures_and_wrong']['ate_aligned_m']:.2f} m)": attacked},
            args.out / "trajectories.png", edges=pairs, rejected=[wrong_pair] if w_attacked[-1] < 0.1 else [],
            title=f"{len(detected)} loop closures from dinomix_ros in a GTSAM pose graph ({kernel} kernel)")
        with atomic_path(args.out / "result.json") as tmp:
            tmp.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
