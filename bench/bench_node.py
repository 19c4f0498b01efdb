#!/usr/bin/env python3
"""End-to-end latency of the running node (prints one JSON object): image published -> pose prior received.

A synthetic map of --map-size keyframes (random unit descriptors, random poses) is saved, ``localize_node`` is
started on it in a subprocess with ``matching.min_similarity = -1`` (every query is accepted, so every image yields a
pose prior), and --images camera frames of --resolution are published one at a time (bgr8 sensor_msgs/Image, shared
memory transport). The latency includes DDS transport both ways, decoding, resize, the model, search, matching and
message building. The node's own view comes from its last /diagnostics: receive -> publish percentiles and the
per-stage split (decode, preprocess, model, search, verify, publish; over its last 200 frames, warm-up included).

Settings left out (--dtype, --backend torch) are not passed, so the script also measures older versions of the
node for a baseline: ``PYTHONPATH=/path/to/other/checkout python bench/bench_node.py ...``.

Examples:
    .venv/bin/python bench/bench_node.py                                  # CPU here: ViT-S, 10k keyframes
    .venv/bin/python bench/bench_node.py --backend onnxruntime --variant vitb14
    python bench/bench_node.py --variant vitb14 --map-size 100000 --device cuda   # a GPU robot (dtype auto)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="vits14", help="backbone (random weights)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"],
                        help="model precision (default: the node's)")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"], help="model runtime")
    parser.add_argument("--onnx", default="", help="exported ONNX file (backend onnxruntime; default: exported at "
                                                   "start-up)")
    parser.add_argument("--map-size", type=int, default=10000, help="keyframes in the synthetic map")
    parser.add_argument("--map", type=Path, help="an existing map (made by --variant's random weights, seed 0, e.g. "
                                                 "bench/bench_scale.py's) instead of a synthetic one")
    parser.add_argument("--index", default="exact", choices=["auto", "exact", "hnsw", "ivfpq", "ivfpq_mmap"],
                        help="search index (map.index)")
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before starting the node "
                                                                   "(root)")
    parser.add_argument("--images", type=int, default=50, help="timed images (after 5 warm-up images)")
    parser.add_argument("--resolution", default="1280x720", help="camera resolution WxH")
    parser.add_argument("--domain", type=int, help="ROS domain id of the private graph (default: random 150-229)")
    args = parser.parse_args(argv)

    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from sensor_msgs.msg import Image, PointCloud2

    import dinomix_ros
    from dinomix_ros.model.benchmark import percentiles
    from dinomix_ros.maps.keyframes import KeyframeMap
    from dinomix_ros.maps.manifest import read_manifest
    from dinomix_ros.maps.storage import save_map
    from dinomix_ros.model import random_model
    from dinomix_ros.ros.conversions import diagnostic_values, time_to_ns
    from dinomix_ros.ros.session import NodeProcess, RosClient

    width, height = (int(v) for v in args.resolution.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="dinomix_bench_node_"))
    rng = np.random.default_rng(0)
    if args.map is not None:
        map_path = args.map
        args.map_size = read_manifest(map_path)["count"]
    else:
        fingerprint = random_model(args.variant, seed=0).fingerprint.to_dict()
        kmap = KeyframeMap.empty(fingerprint)
        for start in range(0, args.map_size, 20000):
            n = min(20000, args.map_size - start)
            desc = rng.standard_normal((n, 4096)).astype(np.float32)
            desc /= np.linalg.norm(desc, axis=1, keepdims=True)
            kmap.add(desc, stamps_ns=np.arange(start, start + n, dtype=np.int64) * 10**8, cameras="cam",
                     frame_ids="map", positions=rng.uniform(-100, 100, (n, 3)))
        map_path = save_map(kmap, work / "synthetic.dinomap")
    dropped = _drop_caches() if args.drop_caches else False

    domain = args.domain if args.domain is not None else random.Random().randrange(150, 230)
    params = {"model.random_weights": True, "model.variant": args.variant, "model.device": args.device,
              "map.path": str(map_path), "map.index": args.index, "matching.min_similarity": -1.0,
              "cameras.reliability": "reliable", "diagnostics.period_s": 0.5, "output.pose_prior_mode": "continuous"}
    if args.dtype:
        params["model.dtype"] = args.dtype
    if args.backend != "torch":
        params["model.backend"] = args.backend
    if args.onnx:
        params["model.onnx"] = args.onnx
    t_start = time.monotonic()
    node = NodeProcess.localizer(work, domain, params)
    rss = _RssOfProcess(node.proc.pid)
    client = RosClient(domain, name="bench_node")
    try:
        priors = client.collect(PoseWithCovarianceStamped, "/dinomix_localizer/pose_prior")
        matches = client.collect(PointCloud2, "/dinomix_localizer/matches")
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        camera = client.publisher(Image, "/camera/image_raw")
        if not node.wait_for_log("active: cameras", timeout=600):
            raise SystemExit(f"node did not start:\n{node.log[-3000:]}")
        time_to_active = time.monotonic() - t_start
        client.wait_for_subscribers(camera)
        frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        to_prior, to_matches = [], []
        for i in range(5 + args.images):
            msg = Image(height=height, width=width, encoding="bgr8", is_bigendian=0, step=width * 3,
                        data=frame.tobytes())
            stamp = 10**18 + i * 10**8
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 10**9)
            t0 = time.monotonic()
            camera.publish(msg)
            if not client.spin_until(lambda: any(time_to_ns(m.header.stamp) == stamp for _, m in priors)
                                     and any(time_to_ns(m.header.stamp) == stamp for _, m in matches), 60):
                raise SystemExit(f"no pose prior for image {i}:\n{node.log[-3000:]}")
            if i >= 5:
                to_prior.append(next(t for t, m in priors if time_to_ns(m.header.stamp) == stamp) - t0)
                to_matches.append(next(t for t, m in matches if time_to_ns(m.header.stamp) == stamp) - t0)
        client.spin_for(1.0)
        internal = diagnostic_values(diagnostics[-1][1]) if diagnostics else {}
        configured = next((line for line in node.log.splitlines() if "configured:" in line), "")
        map_check = next((line for line in reversed(node.log.splitlines()) if "verified in" in line), "")
    finally:
        peak = rss.stop()
        client.close()
        node.stop()
        shutil.rmtree(work, ignore_errors=True)  # the synthetic map: 80 MB per 10k keyframes
    import torch

    stages = {name: {"p50_ms": _number(internal.get(f"stage_{name}_p50_ms")),
                     "p95_ms": _number(internal.get(f"stage_{name}_p95_ms"))} for name in STAGE_NAMES}
    print(json.dumps({
        "benchmark": "dinomix_ros node end-to-end latency",
        "package": str(Path(dinomix_ros.__file__).resolve().parent),
        "variant": args.variant, "device": internal.get("device"), "backend": internal.get("backend", "torch"),
        "providers": internal.get("providers"), "dtype": internal.get("dtype", args.dtype),
        "dtype_reason": internal.get("dtype_reason"), "preprocess": internal.get("preprocess"),
        "map_size": args.map_size, "index": args.index, "resolution": f"{width}x{height}", "images": args.images,
        "publish_to_pose_prior": percentiles(to_prior), "publish_to_matches": percentiles(to_matches),
        "node_internal_latency_ms": {"p50": _number(internal.get("latency_p50_ms")),
                                     "p95": _number(internal.get("latency_p95_ms"))},
        "node_stages_ms": stages if any(v["p50_ms"] is not None for v in stages.values()) else None,
        "node_configured": configured.split("configured:", 1)[-1].strip(),
        "map": str(map_path) if args.map is not None else "synthetic", "page_cache_dropped": dropped,
        "time_to_active_s": round(time_to_active, 2), "node_peak_memory_gb": peak,
        "map_check_log": map_check.strip()[-200:], "map_check_diagnostics": internal.get("map_check"),
        "map_index_in_use": internal.get("map_index"),
        "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
    }, indent=2))
    return 0


STAGE_NAMES = ("decode", "preprocess", "model", "search", "verify", "publish")


class _RssOfProcess:
    """Peak RssAnon (memory beyond the page cache), RssFile and VmHWM of another process, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.peak = pid, {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    key = line.split(":")[0]
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)
            except (OSError, ValueError, IndexError):
                pass
            self._stop.wait(0.05)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {f"peak_{k}": round(v / 1e9, 3) for k, v in self.peak.items()}


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def _number(value: str | None) -> float | None:
    """A diagnostics value as a number (None when the node did not report it, e.g. an older version)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
