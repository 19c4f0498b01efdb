#!/usr/bin/env python3
"""Benchmark dinomix_ros.maps.index.PlaceIndex: build time, batch-1 latency, batched throughput and recall@1.

Prints ONE JSON object on stdout (progress goes to stderr). Data are random unit vectors; the queries are noisy copies
of random database rows (``q = normalize(x + noise * g / sqrt(dim))``, g ~ N(0, I)), so every query has one clear true
neighbour and recall@1 of the approximate indexes against the exact one is meaningful.

The database is generated in seeded chunks and added chunk by chunk, so one size never needs two float32 copies in
memory. Sizes whose estimated index memory exceeds ``--mem-fraction`` of the available memory (host RAM, or GPU memory
for the torch CUDA backend) are skipped and listed under "skipped".

Example (the default run takes a few minutes on 2 CPU cores)::

    .venv/bin/python bench/bench_search.py --sizes 1000,10000,100000 --dim 4096 > runs/bench_search.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import faiss
import numpy as np
import torch

try:
    from dinomix_ros.maps.index import PlaceIndex
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dinomix_ros.maps.index import PlaceIndex

LOG = logging.getLogger("bench_search")

CONFIGS = ("exact-faiss", "exact-torch", "hnsw", "ivfpq")
LARGE_SIZE = 1_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000",
                   help="comma-separated map sizes (rows) for the exact backends")
    p.add_argument("--large", action="store_true",
                   help=f"also run {LARGE_SIZE} rows (16 GB as float32 at dim 4096; skipped where it does not fit)")
    p.add_argument("--approx-sizes", default="1000,10000",
                   help="comma-separated sizes for hnsw/ivfpq (their builds take minutes per 100k rows on 2 cores); "
                        "only sizes also in --sizes (or the --large size) run")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated subset of {', '.join(CONFIGS)}; exact-torch runs on CUDA when available "
                        "(float16), on CPU only with --torch-cpu")
    p.add_argument("--torch-cpu", action="store_true", help="run exact-torch on CPU (float32) when CUDA is absent")
    p.add_argument("--dim", type=int, default=4096, help="descriptor dimension")
    p.add_argument("--k", type=int, default=10, help="results per query")
    p.add_argument("--batch", type=int, default=256, help="queries in the batched-throughput search")
    p.add_argument("--latency-queries", type=int, default=200, help="batch-1 queries timed per index")
    p.add_argument("--latency-budget-s", type=float, default=10.0,
                   help="stop timing batch-1 queries for one index after this many seconds")
    p.add_argument("--noise", type=float, default=0.6,
                   help="query noise norm relative to the unit database row (0.6 gives cosine ~0.86 to its source)")
    p.add_argument("--seed", type=int, default=1338, help="seed of the database and query generators")
    p.add_argument("--chunk", type=int, default=131072, help="rows generated and added per add() call")
    p.add_argument("--mem-fraction", type=float, default=0.8,
                   help="skip a size when its estimated memory exceeds this fraction of the available memory")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW M")
    p.add_argument("--hnsw-ef-construction", type=int, default=200, help="HNSW efConstruction")
    p.add_argument("--hnsw-ef-search", type=int, default=128, help="HNSW efSearch")
    p.add_argument("--pq-m", type=int, default=64, help="IVF-PQ sub-quantizers (bytes per vector)")
    p.add_argument("--ivf-nprobe", type=int, default=32, help="IVF lists probed per query")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"), help="stderr log level")
    args = p.parse_args(argv)
    args.sizes = _int_list(p, "--sizes", args.sizes)
    args.approx_sizes = _int_list(p, "--approx-sizes", args.approx_sizes)
    if args.large and LARGE_SIZE not in args.sizes:
        args.sizes.append(LARGE_SIZE)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        p.error(f"--configs: unknown {unknown}, expected a subset of {list(CONFIGS)}")
    for name in ("dim", "k", "batch", "latency_queries", "chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, found {getattr(args, name)}")
    return args


def _int_list(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag}: expected comma-separated integers, found {text!r}")
    if any(v < 1 for v in values):
        p.error(f"{flag}: sizes must be >= 1, found {values}")
    return values


# ---------------------------------------------------------------------- data


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def database_chunks(seed: int, n: int, dim: int, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first row, unit rows) for rows [0, n); chunk c always comes from the same seeded generator."""
    for c, i0 in enumerate(range(0, n, chunk)):
        rng = np.random.default_rng([seed, c])
        yield i0, unit(rng.standard_normal((min(chunk, n - i0), dim), dtype=np.float32))


def make_queries(args: argparse.Namespace, n: int, nq: int) -> tuple[np.ndarray, np.ndarray]:
    """nq noisy copies of random rows of the size-n database, and the source rows."""
    rng = np.random.default_rng([args.seed, n, 7])
    src = rng.choice(n, size=nq, replace=nq > n)
    rows = np.empty((len(src), args.dim), dtype=np.float32)
    for i0, xb in database_chunks(args.seed, n, args.dim, args.chunk):
        hit = (src >= i0) & (src < i0 + len(xb))
        rows[hit] = xb[src[hit] - i0]
    g = rng.standard_normal(rows.shape, dtype=np.float32)
    return unit(rows + args.noise * g / np.sqrt(args.dim)), src


# ---------------------------------------------------------------------- environment


def mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "faiss_compile_options": faiss.get_compile_options(),
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_name": cpu_name(),
        "mem_available_gb": round(mem_available_bytes() / 2**30, 2),
        "cuda": torch.cuda.is_available(),
        # faiss-cpu and torch each bundle a libgomp; their spinning thread pools contend on small CPUs
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    if torch.cuda.is_available():
        env["gpu_name"] = torch.cuda.get_device_name(0)
        env["gpu_mem_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
    return env


# ---------------------------------------------------------------------- one index


def index_kwargs(args: argparse.Namespace, config: str) -> dict[str, Any]:
    if config == "exact-faiss":
        return {"kind": "exact", "device": "cpu", "backend": "faiss"}
    if config == "exact-torch":
        return {"kind": "exact", "device": "cuda" if torch.cuda.is_available() else "cpu", "backend": "torch"}
    if config == "hnsw":
        return {"kind": "hnsw", "device": "cpu", "hnsw_m": args.hnsw_m,
                "hnsw_ef_construction": args.hnsw_ef_construction, "hnsw_ef_search": args.hnsw_ef_search}
    return {"kind": "ivfpq", "device": "cpu", "pq_m": args.pq_m, "ivf_nprobe": args.ivf_nprobe}


def estimate_bytes(args: argparse.Namespace, config: str, n: int) -> tuple[int, str]:
    """Estimated peak memory of building one index of n rows, and where it lives ("host" or "gpu")."""
    d = args.dim
    chunk = min(args.chunk, n) * d * 4 * 2  # one generated chunk and its normalised copy
    if config == "exact-torch" and torch.cuda.is_available():
        return n * d * 2, "gpu"  # float16 storage; up to 1.5x while growing, but adds here are few and large
    if config in ("exact-faiss", "exact-torch"):
        return n * d * 4 + chunk, "host"
    if config == "hnsw":
        return n * (d * 4 + 2 * args.hnsw_m * 4 + 64) + chunk, "host"
    # ivfpq: refine storage (float32) + codes, plus the first add's training copy
    return n * (d * 4 + args.pq_m + 16) + min(args.chunk, n) * d * 4 * 2 + chunk, "host"


def build(args: argparse.Namespace, config: str, n: int) -> tuple[PlaceIndex, float]:
    index = PlaceIndex(args.dim, **index_kwargs(args, config))
    t_add = 0.0
    for _, xb in database_chunks(args.seed, n, args.dim, args.chunk):
        t0 = time.perf_counter()
        index.add(xb)
        t_add += time.perf_counter() - t0
    return index, t_add


def time_index(args: argparse.Namespace, index: PlaceIndex, xq: np.ndarray) -> dict[str, Any]:
    k = args.k
    index.search(xq[:1], k)  # warm-up (allocations, CUDA kernels)
    xb_q = xq[: args.batch]
    t0 = time.perf_counter()
    D, I = index.search(xb_q, k)  # noqa: E741
    t_batch = time.perf_counter() - t0
    lat = []
    t_start = time.perf_counter()
    for i in range(min(args.latency_queries, len(xq))):
        t0 = time.perf_counter()
        index.search(xq[i], k)
        lat.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > args.latency_budget_s:
            break
    lat_ms = np.array(lat) * 1e3
    return {
        "I": I,
        "batch": {"nq": len(xb_q), "seconds": round(t_batch, 4), "qps": round(len(xb_q) / t_batch, 1),
                  "ms_per_query": round(t_batch * 1e3 / len(xb_q), 4)},
        "latency_ms": {"n": len(lat), "p50": round(float(np.percentile(lat_ms, 50)), 3),
                       "p95": round(float(np.percentile(lat_ms, 95)), 3), "mean": round(float(lat_ms.mean()), 3)},
    }


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    LOG.info("argv: %s", " ".join(sys.argv))
    t_total = time.perf_counter()
    env = environment()
    cuda = env["cuda"]
    out: dict[str, Any] = {"bench": "dinomix_ros.maps.index.PlaceIndex", "args": vars(args).copy(), "env": env,
                           "results": [], "skipped": [], "notes": []}
    configs = list(args.configs)
    if "exact-torch" in configs and not cuda and not args.torch_cpu:
        configs.remove("exact-torch")
        out["notes"].append("exact-torch skipped: no CUDA (pass --torch-cpu to run it on CPU in float32)")
    if not os.environ.get("OMP_WAIT_POLICY"):
        out["notes"].append("OMP_WAIT_POLICY unset: faiss-cpu and torch each bundle a libgomp whose threads spin "
                            "after parallel regions; batch-1 latency on few cores is steadier with "
                            "OMP_WAIT_POLICY=PASSIVE")
    out["notes"].append(f"queries: noisy copies of database rows, noise={args.noise}; recall_at_1_vs_exact compares "
                        "each index's top-1 with exact-faiss (or exact-torch) on the same batch of queries")

    nq = max(args.batch, args.latency_queries)
    for n in args.sizes:
        runnable = []
        for config in configs:
            if config in ("hnsw", "ivfpq") and n not in args.approx_sizes:
                continue
            need, where = estimate_bytes(args, config, n)
            free = torch.cuda.mem_get_info()[0] if where == "gpu" else mem_available_bytes()
            if need > args.mem_fraction * free:
                out["skipped"].append({"config": config, "n": n, "reason": f"needs ~{need / 2**30:.1f} GiB of {where} "
                                       f"memory, {free / 2**30:.1f} GiB available (x{args.mem_fraction})"})
                LOG.warning("skip %s n=%d: does not fit", config, n)
            else:
                runnable.append(config)
        if not runnable:
            continue
        xq, src = make_queries(args, n, nq)
        exact_top1: np.ndarray | None = None
        for config in runnable:
            LOG.info("build %s n=%d dim=%d", config, n, args.dim)
            index, t_build = build(args, config, n)
            LOG.info("built %s n=%d in %.1fs; timing", config, n, t_build)
            timing = time_index(args, index, xq)
            top1 = timing.pop("I")[:, 0]
            if config.startswith("exact") and exact_top1 is None:
                exact_top1 = top1
            desc = index.describe()
            row = {"config": config, "n": n, "dim": args.dim, "k": args.k, "backend": desc["backend"],
                   "device": desc["device"], "storage": desc["storage"], "trained": desc["trained"],
                   "params": desc["params"], "build_s": round(t_build, 3), **timing,
                   "top1_is_source": round(float((top1 == src[: len(top1)]).mean()), 4),
                   "recall_at_1_vs_exact": None if exact_top1 is None else round(float((top1 == exact_top1).mean()), 4)}
            if not desc["trained"]:
                row["note"] = (f"ivfpq below its training threshold ({desc['train_threshold']} vectors): "
                               "searched exactly")
            out["results"].append(row)
            LOG.info("%s n=%d: batch %.1f qps, p50 %.2f ms, recall@1 vs exact %s", config, n, row["batch"]["qps"],
                     row["latency_ms"]["p50"], row["recall_at_1_vs_exact"])
            del index
            if cuda:
                torch.cuda.empty_cache()
    out["total_s"] = round(time.perf_counter() - t_total, 1)
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
