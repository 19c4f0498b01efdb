#!/usr/bin/env python3
"""Pose accuracy of geometric verification on posed image pairs (prints ONE JSON object; optional plot).

Every pair of test/data/posed_pairs/pairs.csv (or ``--pairs FILE``) is verified as the node verifies a candidate:
local features of both images (``--features-*``), :func:`~dinomix_ros.localization.verification.verify_pair` with
both cameras' intrinsics and the keyframe's depths, and the relative pose a loop closure / pose prior publishes is
compared with the ground truth (:mod:`dinomix_ros.evaluation.posed_pairs`): rotation error, translation-direction
error, metric translation error (PnP), inliers, passed, NEES of the rotation and position blocks against the 3-dof
99 % chi-square bound (11.34) and the error in claimed standard deviations. The summary is over the pairs that pass
verification, for all kinds together and per kind; ``pairs`` lists every pair. ``--plot FILE.png`` draws rotation
and translation-direction error against inliers (matplotlib).

The T265 stereo pairs (kind ``stereo_nominal``) use the rig's nominal extrinsic (identity rotation, 64 mm): their
ground truth is not exact, so they are reported but left out of ``summary`` (``--kinds`` chooses).

Example::

    PYTHONPATH=. .venv/bin/python bench/bench_pose_accuracy.py --plot runs/pose_accuracy.png > runs/pose_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
try:
    import dinomix_ros  # noqa: F401
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(REPO))

from dinomix_ros.evaluation.posed_pairs import evaluate_pairs, load_posed_pairs, summarize  # noqa: E402
from dinomix_ros.imaging.features import FeatureConfig  # noqa: E402
from dinomix_ros.localization.camera_pose import VerifiedPriorConfig  # noqa: E402
from dinomix_ros.localization.verification import VerificationConfig  # noqa: E402
from dinomix_ros.settings import add_flags, from_flags  # noqa: E402

EXACT = "stereo,rotation_warp,plane_warp,depth_warp"


def plot(results: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    kinds = sorted({r.kind for r in results})
    for ax, key, label in ((axes[0], "rotation_error_deg", "rotation error (deg)"),
                           (axes[1], "translation_direction_error_deg", "translation direction error (deg)")):
        for kind in kinds:
            rows = [r for r in results if r.kind == kind and r.passed]
            ax.scatter([r.inliers for r in rows], [getattr(r, key) for r in rows], label=kind, s=18)
        ax.set_xlabel("inliers")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("verified relative pose against ground truth (pairs that pass)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=Path, default=REPO / "test" / "data" / "posed_pairs" / "pairs.csv")
    parser.add_argument("--kinds", default=EXACT, help="kinds in the summary (comma-separated)")
    parser.add_argument("--plot", type=Path, help="PNG of errors against inliers")
    add_flags(parser, FeatureConfig)
    add_flags(parser, VerificationConfig)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    pairs = load_posed_pairs(args.pairs)
    results = evaluate_pairs(pairs, from_flags(FeatureConfig, args), from_flags(VerificationConfig, args),
                             VerifiedPriorConfig())
    kinds = set(args.kinds.split(","))
    out = {"pairs_file": str(args.pairs), "machine": platform.processor() or platform.machine(),
           "opencv": cv2.__version__, "features": vars(from_flags(FeatureConfig, args)),
           "summary": summarize([r for r in results if r.kind in kinds]),
           "left_out_of_summary": summarize([r for r in results if r.kind not in kinds]),
           "pairs": [r.to_dict() for r in results], "loadavg": [round(x, 2) for x in os.getloadavg()]}
    if args.plot:
        plot(results, args.plot)
        out["plot"] = str(args.plot)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
