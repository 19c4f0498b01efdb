"""Camera frames that reach the node, per Fast DDS transport of the camera and of the node, as JSON: a camera in a
process of its own (test/ros/camera_publisher.py) publishes rgb8 frames at a fixed rate, best effort or reliable;
the node (cameras.reliability auto) counts what arrives and estimates what was lost (the middleware's lost-sample
count and stamp gaps, as /diagnostics reports them).

    .venv/bin/python bench/bench_camera_qos.py                      # 640x480 and 1280x720, 2 and 10 Hz
    .venv/bin/python bench/bench_camera_qos.py --sizes 640x480 --rates 2 --cameras defaults profile

Transports: ``profile`` = what the launch files give the node and ``transport_env`` prints (config/
fastdds_large_images.xml: 32 MB shared memory, UDP on every interface); ``defaults`` = Fast DDS's defaults (no
profile); ``large_data`` = defaults with FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA. Every process runs with
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST (no packet leaves the machine); note that with it rmw_fastrtps adds a
default shared-memory and a UDP transport of its own to every participant, and ignores FASTDDS_BUILTIN_TRANSPORTS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAMERA = REPO / "test" / "ros" / "camera_publisher.py"
TRANSPORTS = ("defaults", "profile", "large_data")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["640x480", "1280x720"], help="WIDTHxHEIGHT of the rgb8 frames")
    p.add_argument("--rates", nargs="+", type=float, default=[2.0, 10.0], help="frames per second")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds each camera publishes (at least 20 frames)")
    p.add_argument("--cameras", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS), help="camera transports")
    p.add_argument("--nodes", nargs="+", choices=("profile", "defaults"), default=["profile", "defaults"],
                   help="node transports")
    p.add_argument("--reliabilities", nargs="+", choices=("best_effort", "reliable"),
                   default=["best_effort", "reliable"])
    p.add_argument("--domain", type=int, default=None, help="ROS_DOMAIN_ID (default: random in 150..229)")
    return p.parse_args()


def transport_env(name: str) -> dict[str, str] | None:
    from dinomix_ros.ros import transport

    if name == "profile":
        return None  # session.ros_env applies what the launch files apply
    env = transport.ros_defaults()
    if name == "large_data":
        env["FASTDDS_BUILTIN_TRANSPORTS"] = "LARGE_DATA"
    return env


def latest(diagnostics: list, since: float) -> dict:
    from dinomix_ros.ros.conversions import diagnostic_values

    values = [diagnostic_values(m) for t, m in diagnostics if t > since]
    return values[-1] if values else {}


def run_node(node_transport: str, args: argparse.Namespace) -> list[dict]:
    from diagnostic_msgs.msg import DiagnosticArray

    from dinomix_ros.ros.session import NodeProcess, RosClient

    work = Path(tempfile.mkdtemp(prefix="dinomix_bench_qos_"))
    domain = args.domain if args.domain is not None else random.Random().randrange(150, 230)
    node = NodeProcess.localizer(work, domain, {"model.random_weights": True, "diagnostics.period_s": 0.5},
                                 env=transport_env(node_transport))
    client = RosClient(domain, name="bench_camera_qos")
    rows = []
    try:
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        if not node.wait_for_log("active: cameras", timeout=180):
            raise RuntimeError(node.log[-3000:])
        for size in args.sizes:
            for rate in args.rates:
                frames = max(20, int(round(args.seconds * rate)))
                for camera_transport in args.cameras:
                    for reliability in args.reliabilities:
                        t0 = time.monotonic()
                        client.spin_until(lambda: any(t > t0 for t, _ in diagnostics), 10.0)
                        before = latest(diagnostics, t0 - 1.0)
                        camera = NodeProcess([str(CAMERA), "--size", size, "--rate", str(rate), "--frames",
                                              str(frames), "--reliability", reliability], work, domain,
                                             name="camera", env=transport_env(camera_transport))
                        client.spin_until(lambda: not camera.alive(), 300.0)
                        camera.stop()
                        client.spin_for(1.5)
                        t1 = time.monotonic()
                        client.spin_until(lambda: any(t > t1 for t, _ in diagnostics), 10.0)
                        after = latest(diagnostics, t1)
                        rows.append({
                            "size": size, "rate_hz": rate, "publisher": reliability, "camera": camera_transport,
                            "node": node_transport, "sent": frames,
                            "received": int(after.get("frames_received", 0)) - int(before.get("frames_received", 0)),
                            "lost_estimate": int(after.get("frames_lost_estimate", 0))
                            - int(before.get("frames_lost_estimate", 0))})
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        client.close()
        node.stop()
    return rows


def main() -> int:
    args = parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
    sys.path.insert(0, str(REPO))
    from dinomix_ros.ros import transport

    os.environ.update(transport.choose().env)  # this process only reads /diagnostics: small messages
    rows = [row for node_transport in args.nodes for row in run_node(node_transport, args)]
    print(json.dumps({"load_average": os.getloadavg(), "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
