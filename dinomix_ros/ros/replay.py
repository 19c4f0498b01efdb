"""Replay a ROS 2 or ROS 1 bag into the live graph without rosbag2 (not installable from PyPI): ``bag_replay``.

Messages are published with the bag's timing scaled by ``--rate`` (0: no pauses, as fast as the tool can publish).
ROS 2 bags are published as their stored CDR bytes (``publisher.publish(raw_bytes)``; rosbags' CDR is byte-identical
to rclpy's). ROS 1 bags (``.bag`` files) are converted to ROS 2 CDR first: read with the bag's own ROS 1
definitions, written with the ROS 2 ones; a topic whose type ROS 2 does not have is refused. Publishers are reliable
with a deep queue, so best-effort and reliable subscribers both connect; before exiting the tool waits until every
subscriber has acknowledged everything (``wait_for_all_acked``). With ``--clock`` the bag's time is published on
``/clock`` (rosgraph_msgs/Clock): just before each message, and at the given rate while waiting between messages,
as ``ros2 bag play --clock`` does; nodes with ``use_sim_time`` then run on the bag's time at any ``--rate``. On a
machine with ROS 2 installed, ``ros2 bag play`` does the same job for ROS 2 bags.

Example:
    bag_replay test/data/t265_office_bag/ros2_mcap --topics /camera/fisheye1/image_raw --rate 1.0 \\
        --remap /camera/fisheye1/image_raw:=/camera/image_raw --wait-for-subscribers 1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rclpy
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.utilities import remove_ros_args
from rosbags.typesys import Stores, get_typestore
from rosgraph_msgs.msg import Clock

from dinomix_ros.maps.sources.bags import IMAGE_TYPES, open_reader
from dinomix_ros.ros.conversions import msg_class

__all__ = ["replay", "main"]


def replay(node: Node, bag: Path, topics: list[str] | None = None, rate: float = 1.0,
           remap: dict[str, str] | None = None, wait_for_subscribers: int = 0, timeout_s: float = 30.0,
           clock_hz: float = 0.0) -> int:
    """Publish the bag's messages; returns how many were published. ``clock_hz`` > 0: also the bag's time on
    /clock, before each message and at that rate (wall clock) in between."""
    remap = remap or {}
    # best effort, depth 1, like rclcpp's ClockQoS (what ros2 bag play and the nodes' time sources use)
    clock = node.create_publisher(Clock, "/clock", QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)) \
        if clock_hz > 0 else None
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
    with open_reader(bag) as reader:
        conns = [c for c in reader.connections if not topics or c.topic in topics]
        missing = set(topics or []) - {c.topic for c in conns}
        if missing:
            have = sorted({c.topic for c in reader.connections})
            raise ValueError(f"topics {sorted(missing)} are not in {bag}; it has {have}")
        pubs, unknown = {}, set()
        for conn in conns:
            try:
                msg_type = msg_class(conn.msgtype)
            except (ImportError, AttributeError, ValueError):
                unknown.add(f"{conn.topic} ({conn.msgtype})")
                continue
            if conn.topic not in pubs:
                pubs[conn.topic] = node.create_publisher(msg_type, remap.get(conn.topic, conn.topic), qos)
        if unknown:
            raise ValueError(f"{bag}: no ROS 2 message type for {sorted(unknown)}; replay the other topics with "
                             "--topics")
        to_cdr = _ros1_to_cdr(reader) if not reader.is2 else None
        if to_cdr is not None:
            node.get_logger().info(f"{bag} is a ROS 1 bag: messages are converted from ROS 1 to ROS 2 CDR")
        deadline = time.monotonic() + timeout_s
        if wait_for_subscribers:  # on the camera topics (all topics if the bag has none)
            waited = [pubs[c.topic] for c in conns if c.msgtype in IMAGE_TYPES] or list(pubs.values())
            while any(p.get_subscription_count() < wait_for_subscribers for p in waited):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"subscribers did not appear within {timeout_s} s on "
                                       f"{[p.topic_name for p in waited if p.get_subscription_count() == 0]}")
                time.sleep(0.05)
            time.sleep(0.5)  # discovery settles after the match is visible
        count, t0_bag, t0_wall = 0, None, time.monotonic()
        for conn, stamp_ns, raw in reader.messages(connections=conns):
            if rate > 0:
                t0_bag = stamp_ns if t0_bag is None else t0_bag
                while (delay := (stamp_ns - t0_bag) / 1e9 / rate - (time.monotonic() - t0_wall)) > 0:
                    if clock is None:
                        time.sleep(delay)
                        break
                    time.sleep(min(delay, 1.0 / clock_hz))
                    elapsed_ns = int((time.monotonic() - t0_wall) * rate * 1e9)
                    _publish_clock(clock, min(t0_bag + elapsed_ns, stamp_ns))
            if clock is not None:
                _publish_clock(clock, stamp_ns)
            pubs[conn.topic].publish(bytes(raw) if to_cdr is None else to_cdr(conn, raw))
            count += 1
    for pub in pubs.values():
        pub.wait_for_all_acked(Duration(seconds=max(1.0, deadline - time.monotonic())))
    return count


def _publish_clock(publisher: Any, stamp_ns: int) -> None:
    msg = Clock()
    msg.clock.sec, msg.clock.nanosec = divmod(int(stamp_ns), 1_000_000_000)
    publisher.publish(msg)


def _ros1_to_cdr(reader: Any) -> Callable[[Any, bytes], bytes]:
    """Message converter of a ROS 1 bag: deserialize with the bag's definitions, serialize as the ROS 2 type."""
    typestore = get_typestore(Stores.ROS2_KILTED)

    def convert(conn: Any, raw: bytes) -> bytes:
        return bytes(typestore.serialize_cdr(reader.deserialize(raw, conn.msgtype), conn.msgtype))

    return convert


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(prog="bag_replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bag", type=Path, help="ROS 2 bag directory (mcap or sqlite3) or ROS 1 .bag file")
    parser.add_argument("--topics", nargs="+", action="extend", default=None,
                        help="topics to replay (default: all); may be repeated, all are used")
    parser.add_argument("--rate", type=float, default=1.0, help="speed factor; 0: no pauses, as fast as possible")
    parser.add_argument("--remap", action="append", default=[], metavar="FROM:=TO",
                        help="rename a topic; may be repeated, all are used")
    parser.add_argument("--wait-for-subscribers", type=int, default=0, metavar="N",
                        help="wait until every camera topic (every topic, if none) has N subscribers")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for subscribers / acks")
    parser.add_argument("--clock", type=float, nargs="?", const=40.0, default=0.0, metavar="HZ",
                        help="publish the bag's time on /clock (for nodes with use_sim_time): before each message "
                             "and HZ times per second in between (default 40)")
    args = parser.parse_args(remove_ros_args(argv)[1:])
    remap = dict(item.split(":=", 1) for item in args.remap)
    rclpy.init(args=argv)
    try:
        node = Node("bag_replay")
        if args.clock < 0:
            raise ValueError(f"--clock must be >= 0, got {args.clock}")
        n = replay(node, args.bag, args.topics, args.rate, remap, args.wait_for_subscribers, args.timeout,
                   args.clock)
        node.get_logger().info(f"replayed {n} messages from {args.bag}")
        node.destroy_node()
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, TimeoutError) as exc:  # BagError is a ValueError, a missing bag an OSError
        print(f"bag_replay: {exc}", file=sys.stderr)
        return 2
    finally:
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
