#!/usr/bin/env python3
"""Benchmark the fleet map (dinomix_ros.maps.fleet) on a Milvus: push, re-push, search, region pull and whole pull.

Prints ONE JSON object on stdout (progress goes to stderr). The map has ``--rows`` keyframes with random 4096-d unit
descriptors (float16, as robots store them), positions on a 2-D grid (1 m apart) in frame map, GPS fixes, and
``--features`` ORB records each (random bytes, the size a real keyframe carries). Search is compared with a local exact
FAISS search of the same map (top-k agreement and speed).

Without ``--uri`` it runs Milvus Lite embedded (a .db folder in a temporary directory): **an embedded Python test
engine, whose numbers say nothing about a Milvus server or cluster** (Milvus Lite validates every vector element in
Python and searches by brute force). With ``--uri http://host:19530`` it measures that server (it creates and drops a
collection named ``--collection``).

Example::

    .venv/bin/python bench/bench_fleet.py --rows 1000 > runs/bench_fleet.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

try:
    from dinomix_ros.maps.fleet.config import FleetConfig
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dinomix_ros.maps.fleet.config import FleetConfig
from dinomix_ros.imaging.features import LocalFeatures
from dinomix_ros.maps.fleet.push import PushLedger, push_backlog
from dinomix_ros.maps.fleet.records import keyframe_key, map_uid
from dinomix_ros.maps.fleet.region import Region
from dinomix_ros.maps.fleet.store import FleetStore
from dinomix_ros.maps.geotags import geotag_columns
from dinomix_ros.maps.index import PlaceIndex
from dinomix_ros.maps.keyframes import KeyframeMap

LOG = logging.getLogger("bench_fleet")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--uri", default="", help="Milvus to measure; empty: Milvus Lite embedded in a temporary folder")
    p.add_argument("--collection", default="dinomix_bench_fleet", help="collection created (and dropped) on --uri")
    p.add_argument("--rows", type=int, default=1000, help="keyframes pushed")
    p.add_argument("--dim", type=int, default=4096, help="descriptor dimension")
    p.add_argument("--features", type=int, default=400, help="ORB feature records per keyframe (0: none)")
    p.add_argument("--batch-rows", type=int, default=64, help="keyframes per push/fetch request (fleet.batch_rows)")
    p.add_argument("--queries", type=int, default=20, help="search queries (one per request)")
    p.add_argument("--k", type=int, default=10, help="results per query")
    p.add_argument("--radius", type=float, default=10.0, help="radius of the region pulls, metres")
    p.add_argument("--seed", type=int, default=1338, help="seed of the map")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"), help="stderr log level")
    return p.parse_args(argv)


def make_map(args: argparse.Namespace, rng: np.random.Generator) -> KeyframeMap:
    fp = {"id": "dmx-bench0fleet0000", "architecture": "bench", "weights_sha256": "0" * 64, "preprocessing": "none",
          "descriptor_dim": args.dim}
    kmap = KeyframeMap.empty(fp)
    if args.features:
        kmap.enable_local_features("orb", args.features)
    side = int(np.ceil(np.sqrt(args.rows)))
    xy = np.array([(i % side, i // side) for i in range(args.rows)], dtype=np.float64)
    gps = np.column_stack([55.7 + xy[:, 1] / 111_195.0, 13.19 + xy[:, 0] / (111_195.0 * np.cos(np.radians(55.7))),
                           np.full(args.rows, 20.0)])
    for start in range(0, args.rows, 256):
        n = min(256, args.rows - start)
        desc = rng.standard_normal((n, args.dim)).astype(np.float32)
        desc /= np.linalg.norm(desc, axis=1, keepdims=True)
        feats = None
        if args.features:
            feats = [LocalFeatures(rng.uniform(0, 600, (args.features, 2)).astype(np.float32),
                                   rng.integers(0, 256, (args.features, 32), np.uint8),
                                   rng.uniform(0.5, 8, args.features).astype(np.float32), (640, 480), "orb")
                     for _ in range(n)]
        rows = slice(start, start + n)
        kmap.add(desc, stamps_ns=np.arange(start, start + n, dtype=np.int64) * 10**8, cameras="front",
                 frame_ids="map", positions=np.column_stack([xy[rows], np.zeros(n)]), sources="bench",
                 features=feats, **geotag_columns(gps[rows]))
    return kmap


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    kmap = make_map(args, rng)
    tmp = tempfile.TemporaryDirectory(prefix="bench_fleet_")
    embedded = not args.uri
    uri = args.uri or str(Path(tmp.name) / "fleet.db")
    config = FleetConfig(uri=uri, robot="bench", batch_rows=args.batch_rows, timeout_s=600.0,
                         collection="" if embedded else args.collection)
    store = FleetStore(config, kmap.fingerprint)
    out: dict[str, Any] = {"engine": "Milvus Lite (embedded, a Python test engine)" if embedded else args.uri,
                           "rows": args.rows, "dim": args.dim, "features_per_keyframe": args.features,
                           "batch_rows": args.batch_rows}
    t0 = time.perf_counter()
    store.connect()
    out["connect_and_create_s"] = round(time.perf_counter() - t0, 3)
    ledger = PushLedger(Path(tmp.name) / "ledger.json")
    LOG.info("pushing %d keyframes", args.rows)
    report = push_backlog(store, kmap, ledger, "bench")
    assert report.error is None and report.pushed == args.rows, report.summary()
    out["push"] = {"seconds": round(report.seconds, 3), "keyframes_per_s": round(args.rows / report.seconds, 2),
                   "ms_per_keyframe": round(report.seconds / args.rows * 1e3, 2),
                   "features_truncated": report.features_truncated}
    again = push_backlog(store, kmap, ledger, "bench")
    out["repush_nothing_new_s"] = round(again.seconds, 4)
    assert store.count() == args.rows

    LOG.info("searching %d queries", args.queries)
    picks = rng.choice(args.rows, args.queries, replace=False)
    queries = kmap.descriptors_f32()[picks] + 0.02 * rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = PlaceIndex(args.dim, "exact", "cpu")
    index.add(kmap.descriptors_f32())
    uid, server_s, local_s, agree = map_uid(kmap), [], [], 0
    for q in queries:
        t0 = time.perf_counter()
        hits = store.search(q[None], args.k)[0]
        server_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, I = index.search(q[None], args.k)
        local_s.append(time.perf_counter() - t0)
        agree += [h["key"] for h in hits] == [keyframe_key("bench", uid, kmap.ids[i]) for i in I[0]]
    out["search"] = {"server": percentiles(server_s), "local_faiss_exact": percentiles(local_s),
                     "top_k_identical": f"{agree}/{args.queries}", "k": args.k}

    side = int(np.ceil(np.sqrt(args.rows)))
    for name, region in (("position", Region("position", (side / 2, side / 2), args.radius, "map")),
                         ("gps", Region("gps", tuple(kmap.gps[kmap.ids.shape[0] // 2, :2]), args.radius)),
                         ("all", Region.everything())):
        t0 = time.perf_counter()
        keys, _ = store.region_keys(region, limit=args.rows)
        scan = time.perf_counter() - t0
        t0 = time.perf_counter()
        pulled = store.pull(region, args.rows, "other")
        total = time.perf_counter() - t0
        fresh = KeyframeMap.empty(kmap.fingerprint)
        t0 = time.perf_counter()
        pulled.add_to(fresh, enable_features=True)
        add = time.perf_counter() - t0
        out[f"pull_{name}"] = {"keyframes": len(keys), "scan_s": round(scan, 3), "pull_s": round(total, 3),
                               "ms_per_keyframe": round(total / max(len(keys), 1) * 1e3, 2),
                               "add_to_local_map_s": round(add, 3)}
    store.close()
    if not embedded:
        from pymilvus import MilvusClient

        MilvusClient(uri=args.uri, timeout=600.0).drop_collection(store.collection)
    if embedded:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)
    tmp.cleanup()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    result = {"benchmark": "bench_fleet", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_average": [round(v, 2) for v in os.getloadavg()],
                          "pymilvus": metadata.version("pymilvus"),
                          "milvus_lite": metadata.version("milvus-lite") if not args.uri else None},
              **run(args)}
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
