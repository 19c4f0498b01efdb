"""Frames received by the node per camera QoS combination, as JSON: publisher reliability x node setting x
Fast DDS profile (shared memory on/off), images published at a fixed rate from another process.

    .venv/bin/python bench/bench_camera_qos.py                       # 640x480 rgb8 at 2 Hz, 20 frames each
    .venv/bin/python bench/bench_camera_qos.py --size 1280x720 --rate 30 --frames 90
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the rgb8 images")
    p.add_argument("--rate", type=float, default=2.0, help="images per second")
    p.add_argument("--frames", type=int, default=20, help="images per combination")
    p.add_argument("--one", metavar="PUBLISHER,NODE,PROFILE", help=argparse.SUPPRESS)  # one run, in a fresh process
    return p.parse_args()


def run_one(publisher: str, node_setting: str, profile: bool, args: argparse.Namespace) -> dict:
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from dinomix_ros.ros.conversions import diagnostic_values
    from dinomix_ros.ros.session import NodeProcess, RosClient

    width, height = (int(v) for v in args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="dinomix_bench_qos_"))
    domain = random.Random().randrange(150, 230)
    node = NodeProcess.localizer(work, domain, {"model.random_weights": True, "cameras.reliability": node_setting,
                                                "diagnostics.period_s": 0.5})
    client = RosClient(domain, name="bench_camera_qos")
    try:
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        policy = ReliabilityPolicy.RELIABLE if publisher == "reliable" else ReliabilityPolicy.BEST_EFFORT
        camera = client.node.create_publisher(Image, "/camera/image_raw", QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=5, reliability=policy))
        if not node.wait_for_log("active: cameras", timeout=120):
            raise RuntimeError(node.log[-2000:])
        client.spin_for(3.0)
        rng = np.random.default_rng(0)
        data = rng.integers(0, 255, width * height * 3, dtype=np.uint8).tobytes()
        t0 = time.monotonic()
        for k in range(args.frames):
            client.spin_until(lambda: False, max(0.0, t0 + k / args.rate - time.monotonic()))
            msg = Image(height=height, width=width, encoding="rgb8", is_bigendian=0, step=width * 3, data=data)
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(10**9 * 100 + int(k * 1e9 / args.rate), 10**9)
            camera.publish(msg)
        client.spin_for(3.0)
        since = time.monotonic()
        client.spin_until(lambda: any(t > since for t, _ in diagnostics), 10.0)
        values = diagnostic_values(diagnostics[-1][1]) if diagnostics else {}
    finally:
        client.close()
        node.stop()
    return {"publisher": publisher, "node": node_setting, "shm_profile": profile, "sent": args.frames,
            "received": int(values.get("frames_received", -1)),
            "lost_estimate": int(values.get("frames_lost_estimate", -1)),
            "qos_incompatible": int(values.get("qos_incompatible", -1)), "status": diagnostics[-1][1].status[0].message
            if diagnostics else ""}


def main() -> int:
    from dinomix_ros.ros.session import PROFILE_VARIABLES  # no participant yet: the profile is read at the first

    args = parse_args()
    if args.one:
        if not os.environ.get(PROFILE_VARIABLES[0]):  # empty: this process uses the default transports
            for name in PROFILE_VARIABLES:
                os.environ.pop(name, None)
        publisher, node_setting, profile = args.one.split(",")
        print(json.dumps(run_one(publisher, node_setting, profile == "on", args)))
        return 0
    rows = []
    for profile in ("on", "off"):
        # Fast DDS reads its profile once per process: each combination runs in a fresh one, the node too; an
        # empty variable means the default transports (dinomix_ros.ros.session.ros_env)
        env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", RMW_IMPLEMENTATION="rmw_fastrtps_cpp",
                   **{name: str(REPO / "config" / "fastdds_large_images.xml") if profile == "on" else ""
                      for name in PROFILE_VARIABLES})
        for publisher in ("reliable", "best_effort"):
            for node_setting in ("auto", "best_effort", "reliable"):
                out = subprocess.run([sys.executable, __file__, "--size", args.size, "--rate", str(args.rate),
                                      "--frames", str(args.frames), "--one", f"{publisher},{node_setting},{profile}"],
                                     env=env, capture_output=True, text=True, timeout=600)
                if out.returncode != 0:
                    raise RuntimeError(out.stderr[-3000:])
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"size": args.size, "rate_hz": args.rate, "frames": args.frames, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
