#!/usr/bin/env python3
"""CPU precision numbers behind ``model.dtype: auto`` (prints ONE JSON object).

Per backbone (random weights; speed does not depend on the values): batch-1 forward time of float32 and bfloat16,
float32 with ``torch.set_flush_denormal(True)``, interleaved run by run so machine load hits all alike, then what
``auto`` decides on this CPU by its capabilities and by measuring (:mod:`dinomix_ros.model.precision`).

Example::

    PYTHONPATH=. .venv/bin/python bench/bench_cpu_dtypes.py --variants vits14,vitb14 --runs 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

# As the node does (dinomix_ros/ros/__init__.py): idle OpenMP threads sleep. With the default spinning, a loaded
# 2-core machine measured ViT-S batch-1 float32 at ~1.7 s instead of ~0.2 s, which swamps any dtype difference.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dinomix_ros.model import random_model  # noqa: E402
from dinomix_ros.model.precision import choose_dtype, cpu_bfloat16_support  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="vits14,vitb14", help="comma-separated backbones")
    p.add_argument("--runs", type=int, default=5, help="timed runs per setting (after one warm-up)")
    args = p.parse_args(argv)
    native, found = cpu_bfloat16_support()
    results = []
    x = torch.zeros((1, 3, 224, 224))
    for variant in args.variants.split(","):
        model = random_model(variant, seed=0).model
        settings = {"float32": (model, torch.float32, False), "float32+flush_denormal": (model, torch.float32, True),
                    "bfloat16": (copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16, False)}
        times: dict[str, list[float]] = {name: [] for name in settings}
        with torch.inference_mode():
            for name, (m, dtype, _) in settings.items():
                m(x.to(dtype))  # warm-up
            for _ in range(args.runs):
                for name, (m, dtype, flush) in settings.items():
                    torch.set_flush_denormal(flush)
                    xd = x.to(dtype)
                    t0 = time.perf_counter()
                    m(xd)
                    times[name].append(time.perf_counter() - t0)
        torch.set_flush_denormal(False)
        by_capability = choose_dtype("auto", torch.device("cpu"), model)
        measured = choose_dtype("auto", torch.device("cpu"), model, measure=True)
        results.append({
            "variant": variant,
            "batch1_ms": {name: {"min": round(min(v) * 1e3, 1), "median": round(float(np.median(v)) * 1e3, 1)}
                          for name, v in times.items()},
            "bfloat16_over_float32_median": round(float(np.median(times["bfloat16"]) / np.median(times["float32"])), 2),
            "flush_denormal_over_plain_median": round(float(np.median(times["float32+flush_denormal"]) /
                                                            np.median(times["float32"])), 3),
            "auto_by_capability": by_capability.to_dict(),
            "auto_measured": measured.to_dict(),
        })
    print(json.dumps({"benchmark": "CPU precision, batch-1 forward", "cpu": platform.processor() or platform.machine(),
                      "native_bfloat16": native, "cpu_found": found, "cpu_count": os.cpu_count(),
                      "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "runs": args.runs,
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average": os.getloadavg(),
                      "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
