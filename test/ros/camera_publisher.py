"""A camera driver stand-in, run as its own process (its Fast DDS transport is set by its environment): publishes
rgb8 frames of a given size at a fixed rate once a subscriber is there, then prints one JSON line.

    python test/ros/camera_publisher.py --size 640x480 --rate 2 --frames 20 --reliability best_effort

Used by the node transport tests and bench/bench_camera_qos.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import rclpy
from rclpy.duration import Duration
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

STAMP0_S = 100


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topic", default="/camera/image_raw")
    p.add_argument("--size", default="640x480", help="WIDTHxHEIGHT")
    p.add_argument("--rate", type=float, default=2.0, help="frames per second")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--reliability", choices=("best_effort", "reliable"), default="best_effort")
    p.add_argument("--depth", type=int, default=5, help="publisher history depth (keep last)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a subscriber")
    p.add_argument("--settle", type=float, default=1.0, help="seconds between the first match and the first frame")
    args = p.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    rclpy.init()
    node = rclpy.create_node("camera_publisher")
    policy = ReliabilityPolicy.RELIABLE if args.reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
    pub = node.create_publisher(Image, args.topic, QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=args.depth,
                                                              reliability=policy))
    deadline = time.monotonic() + args.timeout
    while pub.get_subscription_count() == 0:
        if time.monotonic() > deadline:
            print(json.dumps({"error": f"no subscriber on {args.topic} within {args.timeout} s"}), flush=True)
            return 2
        time.sleep(0.05)
    time.sleep(args.settle)
    data = np.random.default_rng(0).integers(0, 255, width * height * 3, dtype=np.uint8).tobytes()
    t0 = time.monotonic()
    for k in range(args.frames):
        time.sleep(max(0.0, t0 + k / args.rate - time.monotonic()))
        msg = Image(height=height, width=width, encoding="rgb8", is_bigendian=0, step=width * 3, data=data)
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(STAMP0_S * 10**9 + int(k * 1e9 / args.rate), 10**9)
        msg.header.frame_id = "camera"
        pub.publish(msg)
    if policy == ReliabilityPolicy.RELIABLE:
        pub.wait_for_all_acked(Duration(seconds=10.0))
    else:
        time.sleep(1.0)
    print(json.dumps({"published": args.frames, "subscribers": pub.get_subscription_count(),
                      "seconds": round(time.monotonic() - t0, 2)}), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
