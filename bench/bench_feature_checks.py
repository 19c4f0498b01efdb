#!/usr/bin/env python3
"""Benchmark the load-time checks of stored local features (:func:`dinomix_ros.maps.local_features.
check_feature_rows`: keypoints inside their camera's image, not all on one point or line), which ``KeyframeMap.load``
runs with ``verify=True`` on every feature chunk.

Prints ONE JSON object on stdout: seconds per run and microseconds per keyframe for each size (median of
``--runs``), with the machine's load average (timings on a shared machine are noisy). The records are seeded random
keypoints inside a 640x480 image, every slot used (the worst case: every keypoint is checked).

Example::

    PYTHONPATH=. .venv/bin/python bench/bench_feature_checks.py --rows 10000,100000 > runs/bench_feature_checks.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    from dinomix_ros.maps.local_features import KEYPOINT_SCALE, check_feature_rows, slot_dtype
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dinomix_ros.maps.local_features import KEYPOINT_SCALE, check_feature_rows, slot_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rows", default="10000,100000", help="keyframe counts, comma-separated")
    parser.add_argument("--slots", type=int, default=400, help="feature slots per keyframe")
    parser.add_argument("--runs", type=int, default=3, help="runs per size (the median is reported)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        records = np.zeros((rows, args.slots), slot_dtype("orb"))
        records["x"] = rng.integers(0, 640 * KEYPOINT_SCALE, records.shape)
        records["y"] = rng.integers(0, 480 * KEYPOINT_SCALE, records.shape)
        bounds = np.tile([640.0, 480.0], (rows, 1))
        seconds = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            check_feature_rows(records, bounds, str)
            seconds.append(time.perf_counter() - t0)
        median = statistics.median(seconds)
        results.append({"rows": rows, "slots": args.slots, "seconds": [round(s, 4) for s in seconds],
                        "median_s": round(median, 4), "us_per_keyframe": round(1e6 * median / rows, 2)})
        print(f"{rows} rows: {median:.3f} s", file=sys.stderr)
    print(json.dumps({"benchmark": "feature_checks", "machine": platform.processor() or platform.machine(),
                      "cpus": os.cpu_count(), "load_average": os.getloadavg(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
