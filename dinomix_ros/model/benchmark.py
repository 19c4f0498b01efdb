"""Model benchmark: batch-1 latency and batched throughput per backbone, dtype and backend, as a JSON-able dict.

Timing is wall-clock around complete calls that return numpy arrays (so GPU work is synchronised), after warm-up
iterations. Random weights: speed does not depend on the weight values.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from dinomix_ros.model.encoder import Encoder, EncoderConfig
from dinomix_ros.model import random_model

__all__ = ["bench_model", "percentiles"]

_logger = logging.getLogger(__name__)


def percentiles(samples_s: list[float]) -> dict:
    """p50/p95/mean/min of durations given in seconds, reported in milliseconds."""
    ms = np.asarray(samples_s) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "mean_ms": round(float(ms.mean()), 3), "min_ms": round(float(ms.min()), 3), "n": int(ms.size)}


def _time(fn: Callable[[], object], iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def bench_model(
    variants: list[str],
    dtypes: list[str],
    device: str = "auto",
    batch: int = 32,
    iters: int = 20,
    warmup: int = 3,
    throughput_iters: int | None = None,
    cuda_graphs: bool = True,
    backends: list[str] | tuple[str, ...] = ("torch",),
) -> dict:
    """Measure each (variant, dtype, backend); bfloat16 is skipped for onnxruntime (it has no such mode).

    Returns:
        {"environment": {...}, "results": [{"variant", "dtype", "backend", "latency_224": {p50_ms...},
        "latency_720p_bgr8": {...}, "throughput": {"batch", "images_per_s"}, "cosine_to_float32": {min, mean}}]}
        (cosine to the torch float32 descriptors of the same variant, when float32 is among ``dtypes``).
    """
    rng = np.random.default_rng(0)
    frame_224 = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    frame_720p = rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    batch_u8 = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    check_u8 = batch_u8[:8]
    throughput_iters = throughput_iters or max(2, iters // 4)
    results = []
    env: dict = {}
    dtypes = sorted(dtypes, key=lambda d: d != "float32")  # float32 first: the reference for cosine_to_float32
    runs = [(b, d) for b in sorted(backends, key=lambda b: b != "torch") for d in dtypes
            if not (b == "onnxruntime" and d == "bfloat16")]
    for variant in variants:
        reference = None
        for backend, dtype in runs:
            encoder = Encoder(random_model(variant, seed=0), EncoderConfig(device=device, dtype=dtype,
                                                                           cuda_graphs=cuda_graphs, backend=backend,
                                                                           batch_size=max(batch, 8)))
            env = env or _environment(encoder)
            _logger.info("bench %s %s %s on %s", variant, backend, dtype, encoder.device)
            lat = _time(lambda: encoder.describe_one(frame_224, "rgb8"), iters, warmup)
            lat_720 = _time(lambda: encoder.describe_one(frame_720p, "bgr8"), iters, warmup)
            thr = _time(lambda: encoder.describe_prepared(batch_u8), throughput_iters, 1)
            desc = encoder.describe_prepared(check_u8)
            if dtype == "float32" and backend == "torch":
                reference = desc
            info = encoder.describe_info()
            entry = {
                "variant": encoder.loaded.spec.name,
                "dtype": info["dtype"],
                "dtype_requested": dtype,
                "backend": backend,
                "providers": info["providers"],
                "preprocess": info["preprocess"],
                "device": str(encoder.device),
                "cuda_graph": info["cuda_graph"],
                "latency_224": percentiles(lat),
                "latency_720p_bgr8": percentiles(lat_720),
                "throughput": {"batch": batch, "images_per_s": round(batch / float(np.median(thr)), 1),
                               "batch_ms_p50": round(float(np.median(thr)) * 1e3, 2)},
            }
            if reference is not None and (dtype, backend) != ("float32", "torch"):
                cos = (reference * desc).sum(1)
                entry["cosine_to_float32"] = {"min": float(cos.min()), "mean": float(cos.mean())}
            if encoder.device.type == "cuda":
                entry["gpu_max_memory_mib"] = round(torch.cuda.max_memory_allocated(encoder.device) / 2**20, 1)
            results.append(entry)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return {"benchmark": "dinomix model", "environment": env, "results": results}


def _environment(encoder: Encoder) -> dict:
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(encoder.device),
        "device_name": (torch.cuda.get_device_name(encoder.device) if encoder.device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
