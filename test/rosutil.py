"""Helpers for node tests: a per-test ROS environment, nodes in subprocesses, and an in-process test client.

Pattern (shared/spec/ros2-on-these-machines.md): every process gets ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, its
own ROS_DOMAIN_ID and ROS_LOG_DIR, and the shared-memory Fast DDS profile (large images); nodes start in a new
session and are stopped with SIGINT to their process group, then SIGKILL if they hang (which fails the test).
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy

REPO = Path(__file__).resolve().parents[1]
FASTDDS_PROFILE = REPO / "config" / "fastdds_large_images.xml"
NODE_MODULE = "dinomix_ros.ros.localizer_node"
_domains = itertools.count(random.Random(os.getpid()).randrange(1, 60))


def next_domain_id() -> int:
    """A domain id per test (1..100), so a leftover node never answers another test."""
    return 1 + (next(_domains) % 100)


def ros_env(log_dir: Path, domain_id: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        ROS_DOMAIN_ID=str(domain_id),
        ROS_LOG_DIR=str(log_dir),
        RMW_IMPLEMENTATION="rmw_fastrtps_cpp",
        FASTDDS_DEFAULT_PROFILES_FILE=str(FASTDDS_PROFILE),
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
    )
    return env


class NodeProcess:
    """A node (or any ROS program) in a subprocess; ``stop()`` sends SIGINT to its group and checks it exits."""

    def __init__(self, args: list[str], tmp_path: Path, domain_id: int, name: str = "node") -> None:
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, *args], env=ros_env(tmp_path / "ros_log", domain_id),
                                     cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @classmethod
    def localizer(cls, tmp_path: Path, domain_id: int, params: dict[str, object] | None = None,
                  params_file: Path | None = None, extra_ros_args: list[str] | None = None) -> NodeProcess:
        args = ["-m", NODE_MODULE, "--ros-args", "--params-file", str(params_file or REPO / "config" / "localize.yaml")]
        for key, value in (params or {}).items():
            args += ["-p", f"{key}:={_ros_value(value)}"]
        return cls(args + list(extra_ros_args or []), tmp_path, domain_id, name="localizer")

    @property
    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_log(self, text: str, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return True
            if not self.alive():
                return text in self.log
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 20.0) -> int:
        """SIGINT the group; returns the exit code (SIGKILL after ``timeout`` s raises AssertionError)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                self._log.close()
                raise AssertionError(f"process did not exit on SIGINT within {timeout} s; log:\n{self.log[-3000:]}")
        try:  # nothing of the group may survive
            os.killpg(self.proc.pid, 0)
            os.killpg(self.proc.pid, signal.SIGKILL)
            leftover = True
        except ProcessLookupError:
            leftover = False
        self._log.close()
        assert not leftover, "processes of the node's group were still running after it exited"
        return self.proc.returncode

    def rss_mib(self) -> float:
        """Resident memory of the node process (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


def _ros_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(f"'{v}'" if isinstance(v, str) else str(v) for v in value) + "]"
    return str(value)


class RosClient:
    """A test-side rclpy node in its own context and domain, spun by hand."""

    def __init__(self, domain_id: int, name: str = "test_client") -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    def collect(self, msg_type: type, topic: str, reliable: bool = True, depth: int = 100) -> list:
        """Subscribe and return the list that received messages are appended to (as (monotonic time, msg))."""
        received: list = []
        qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)
        self.node.create_subscription(msg_type, topic, lambda m: received.append((time.monotonic(), m)), qos)
        return received

    def publisher(self, msg_type: type, topic: str, depth: int = 10):  # noqa: ANN201
        return self.node.create_publisher(msg_type, topic, QoSProfile(depth=depth,
                                                                      reliability=ReliabilityPolicy.RELIABLE))

    def spin_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            self.executor.spin_once(timeout_sec=0.02)
        return predicate()

    def spin_for(self, seconds: float) -> None:
        self.spin_until(lambda: False, seconds)

    def wait_for_subscribers(self, pub, count: int = 1, timeout: float = 60.0) -> None:  # noqa: ANN001
        if not self.spin_until(lambda: pub.get_subscription_count() >= count, timeout):
            raise TimeoutError(f"no subscriber on {pub.topic_name} after {timeout} s")
        self.spin_for(0.5)  # discovery settles after the match is visible

    def call(self, srv_type: type, name: str, request: object | None = None, timeout: float = 60.0):  # noqa: ANN201
        client = self.node.create_client(srv_type, name)
        if not self.spin_until(client.service_is_ready, timeout):
            raise TimeoutError(f"service {name} not available after {timeout} s")
        future = client.call_async(request if request is not None else srv_type.Request())
        if not self.spin_until(future.done, timeout):
            raise TimeoutError(f"service {name} did not answer within {timeout} s")
        self.node.destroy_client(client)
        return future.result()


def msg_class(msgtype: str) -> type:
    """rclpy message class of a type name like ``sensor_msgs/msg/Image``."""
    import importlib

    package, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


def replay_bag(client: RosClient, bag: Path, *, after_image: Callable[[str, int], Callable[[], bool]] | None = None,
               timeout: float = 60.0, remap: dict[str, str] | None = None) -> list[tuple[str, int]]:
    """Publish a bag's messages (their raw CDR bytes) in bag order, like ``ros2 bag play`` but paced.

    After each image message, ``after_image(topic, header_stamp_ns)`` gives a predicate the client spins on (e.g.
    "the node published matches for this stamp"), so no frame is dropped by a busy node. Returns the images
    published as (topic, stamp_ns).
    """
    from dinomix_ros.bagio import IMAGE_TYPES, open_reader

    remap = remap or {}
    sent: list[tuple[str, int]] = []
    with open_reader(bag) as reader:
        pubs = {c.topic: client.publisher(msg_class(c.msgtype), remap.get(c.topic, c.topic), depth=100)
                for c in reader.connections}
        for conn in reader.connections:
            if conn.msgtype in IMAGE_TYPES:
                client.wait_for_subscribers(pubs[conn.topic])
        for conn, _, raw in reader.messages():
            pubs[conn.topic].publish(bytes(raw))
            if conn.msgtype in IMAGE_TYPES:
                msg = reader.deserialize(raw, conn.msgtype)
                stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
                sent.append((conn.topic, stamp))
                if after_image is not None and not client.spin_until(after_image(conn.topic, stamp), timeout):
                    raise TimeoutError(f"no answer to the image {conn.topic} @ {stamp} within {timeout} s")
            else:
                client.executor.spin_once(timeout_sec=0)
    return sent


def stamp_ns(msg: object) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


def diagnostic_values(msg: object) -> dict[str, str]:
    """Key/values of the first status of a DiagnosticArray."""
    return {kv.key: kv.value for kv in msg.status[0].values}
