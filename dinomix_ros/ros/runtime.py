"""Running a lifecycle node as a process: rclpy set-up, the core's log records in the ROS log, clean Ctrl-C."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn

__all__ = ["RosLogHandler", "run_lifecycle_node"]


class RosLogHandler(logging.Handler):
    """Sends the core library's Python log records to a node's ROS logger (console, /rosout, log files)."""

    def __init__(self, node: LifecycleNode) -> None:
        super().__init__(level=logging.INFO)
        self._logger = node.get_logger()

    def emit(self, record: logging.LogRecord) -> None:
        text = f"[{record.name}] {record.getMessage()}"
        if record.levelno >= logging.ERROR:  # one logger call per severity: rclpy requires a fixed one per site
            self._logger.error(text)
        elif record.levelno >= logging.WARNING:
            self._logger.warning(text)
        else:
            self._logger.info(text)


def run_lifecycle_node(make_node: Callable[[], LifecycleNode], args: list[str] | None = None,
                       threads: int = 4) -> None:
    """Create the node, configure and activate it when its ``autostart`` parameter says so, spin until Ctrl-C or
    shutdown, then ``release()`` it (which saves what must be saved) and shut rclpy down."""
    rclpy.init(args=args)  # Humble's rclpy.init is not a context manager: init / try_shutdown by hand
    node = None
    try:
        node = make_node()
        core_logger = logging.getLogger("dinomix_ros")
        core_logger.addHandler(RosLogHandler(node))
        core_logger.setLevel(logging.INFO)
        core_logger.propagate = False
        executor = MultiThreadedExecutor(num_threads=threads)
        executor.add_node(node)
        if node.get_parameter("autostart").value:
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        # Ctrl-C under `ros2 launch` arrives twice (terminal + launch): let the second one not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if node is not None:
            node.release()
            node.destroy_node()
        rclpy.try_shutdown()
