"""Run inside a network namespace of its own (test_node_transport.py sets it up: loopback plus a veth pair, no way
out): the node with the launch files' transport and ROS's default discovery (SUBNET: multicast), what its DDS
participant announces, and what a plain process (Fast DDS defaults) sees of it. Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import rtps

from dinomix_ros.ros import transport
from dinomix_ros.ros.session import NodeProcess

LIST_TOPICS = """
import json, time, rclpy
rclpy.init()
node = rclpy.create_node("plain_lister")
deadline, names = time.monotonic() + 60, []
while time.monotonic() < deadline and "/dinomix_localizer/matches" not in names:
    rclpy.spin_once(node, timeout_sec=0.2)
    names = [name for name, _ in node.get_topic_names_and_types()]
print(json.dumps(sorted(names)), flush=True)
"""


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--domain", type=int, required=True)
    p.add_argument("--interface", required=True, help="IPv4 address of the namespace's non-loopback interface")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    node = NodeProcess.localizer(args.out, args.domain, {"model.random_weights": True}, discovery_range=None)
    seen: list = []
    listener = threading.Thread(target=lambda: seen.extend(rtps.listen(
        args.domain, args.interface, lambda a: a.pid16 == node.proc.pid & 0xFFFF, timeout=120.0)))
    listener.start()
    result = {"node_pid": node.proc.pid}
    try:
        result["active"] = node.wait_for_log("active: cameras", timeout=120)
        lister = NodeProcess(["-c", LIST_TOPICS], args.out, args.domain, name="lister",
                             env=transport.ros_defaults(), discovery_range=None)
        lister.proc.wait(timeout=90)
        result["topics"] = json.loads(lister.log.strip().splitlines()[-1]) if lister.log.strip() else []
        lister.stop()
        listener.join(timeout=120)
    finally:
        result["exit_code"] = node.stop()
    mine = [a for a in seen if a.pid16 == node.proc.pid & 0xFFFF]
    result["announced"] = sorted(mine[0].addresses) if mine else None
    result["node_log_transport"] = [line for line in node.log.splitlines() if "transport" in line][:2]
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
