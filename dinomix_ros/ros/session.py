"""Drive the localizer from a Python script: start it in a private graph, publish to it, call its services.

The demo (``make demo``) and the node benchmark use this; so can a robot's own integration scripts and CI.

* :func:`ros_env` gives a child process a private, machine-local ROS graph: ``ROS_AUTOMATIC_DISCOVERY_RANGE=
  LOCALHOST`` (``ROS_LOCALHOST_ONLY`` is ignored by recent releases), its own ``ROS_DOMAIN_ID`` and log folder, and
  the Fast DDS transport the launch files give the node (:func:`dinomix_ros.ros.transport.choose`: the caller's own
  Fast DDS settings, else the large-image profile).
* :class:`NodeProcess` starts a program in a new session and stops it like ``ros2 launch`` does: SIGINT to the
  process group, SIGKILL only if it hangs (which is reported).
* :class:`RosClient` is an rclpy node in its own context and domain that the calling thread spins by hand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.publisher import Publisher
from rclpy.qos import QoSProfile, ReliabilityPolicy

from dinomix_ros.ros import transport

__all__ = ["ros_env", "NodeProcess", "RosClient"]

LOCALIZER_MODULE = "dinomix_ros.ros.localizer_node"
_REPO = Path(__file__).resolve().parents[2]


def ros_env(log_dir: Path, domain_id: int, base: dict[str, str] | None = None,
            discovery_range: str | None = "LOCALHOST") -> dict[str, str]:
    """Environment of a child ROS process on a private, machine-local graph, with the transport the launch files
    give the node (``base``'s own Fast DDS settings win; :func:`dinomix_ros.ros.transport.ros_defaults` makes a
    process with Fast DDS's defaults). ``discovery_range`` None: ROS's default (SUBNET), e.g. in a network
    namespace of its own."""
    env = dict(os.environ if base is None else base)
    env.update(ROS_DOMAIN_ID=str(domain_id), ROS_LOG_DIR=str(log_dir), PYTHONUNBUFFERED="1")
    if discovery_range is None:
        env.pop("ROS_AUTOMATIC_DISCOVERY_RANGE", None)
    else:
        env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = discovery_range
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    env.update(transport.choose(env).env)
    if (_REPO / "dinomix_ros").is_dir():  # running from the source tree: make the package importable
        env["PYTHONPATH"] = str(_REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class NodeProcess:
    """A Python program (``[-m module | script] args...``) in a subprocess, its output in ``log_path``."""

    def __init__(self, args: list[str], log_dir: Path, domain_id: int, name: str = "node",
                 env: dict[str, str] | None = None, discovery_range: str | None = "LOCALHOST") -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, *args], env=ros_env(log_dir / "ros_log", domain_id, env,
                                                                          discovery_range),
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @classmethod
    def localizer(cls, log_dir: Path, domain_id: int, params: dict[str, object] | None = None,
                  params_file: Path | None = None, extra_ros_args: list[str] | None = None,
                  **kwargs: object) -> NodeProcess:
        """``localize_node`` with a parameters file (default config/localize.yaml) and ``-p`` overrides (``kwargs``:
        ``env``, ``discovery_range`` of the process)."""
        args = ["-m", LOCALIZER_MODULE, "--ros-args"]
        params_file = params_file or _REPO / "config" / "localize.yaml"
        if params_file.is_file():
            args += ["--params-file", str(params_file)]
        for key, value in (params or {}).items():
            args += ["-p", f"{key}:={_ros_value(value)}"]
        return cls(args + list(extra_ros_args or []), log_dir, domain_id, name="localizer", **kwargs)

    @property
    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_log(self, text: str, timeout: float = 60.0) -> bool:
        """True once ``text`` appears in the output (False on timeout or exit without it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return True
            if not self.alive():
                return text in self.log
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 20.0) -> int:
        """SIGINT to the group and wait; returns the exit code. Hanging -> SIGKILL and AssertionError."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                self._log.close()
                raise AssertionError(f"process did not exit on SIGINT within {timeout} s; log:\n{self.log[-3000:]}")
        try:  # nothing of the group may survive it
            os.killpg(self.proc.pid, signal.SIGKILL)
            leftover = True
        except ProcessLookupError:
            leftover = False
        self._log.close()
        if leftover:
            raise AssertionError("processes of the node's group were still running after it exited")
        return self.proc.returncode


def _ros_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(f"'{v}'" if isinstance(v, str) else str(v) for v in value) + "]"
    return str(value)


class RosClient:
    """A script-side rclpy node in its own context and domain; the caller spins it with :meth:`spin_until`."""

    def __init__(self, domain_id: int, name: str = "dinomix_client") -> None:
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
        """Subscribe; returns the list that receives (monotonic time, message) pairs."""
        received: list = []
        qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)
        self.node.create_subscription(msg_type, topic, lambda m: received.append((time.monotonic(), m)), qos)
        return received

    def publisher(self, msg_type: type, topic: str, depth: int = 10) -> Publisher:
        qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)
        return self.node.create_publisher(msg_type, topic, qos)

    def spin_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            self.executor.spin_once(timeout_sec=0.01)
        return predicate()

    def spin_for(self, seconds: float) -> None:
        self.spin_until(lambda: False, seconds)

    def wait_for_subscribers(self, pub: Publisher, count: int = 1, timeout: float = 60.0) -> None:
        if not self.spin_until(lambda: pub.get_subscription_count() >= count, timeout):
            raise TimeoutError(f"no subscriber on {pub.topic_name} after {timeout} s")
        self.spin_for(0.5)  # discovery settles after the match is visible

    def call(self, srv_type: type, name: str, request: object | None = None, timeout: float = 60.0) -> Any:
        client = self.node.create_client(srv_type, name)
        try:
            if not self.spin_until(client.service_is_ready, timeout):
                raise TimeoutError(f"service {name} not available after {timeout} s")
            future = client.call_async(request if request is not None else srv_type.Request())
            if not self.spin_until(future.done, timeout):
                raise TimeoutError(f"service {name} did not answer within {timeout} s")
            return future.result()
        finally:
            self.node.destroy_client(client)
