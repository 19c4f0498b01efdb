"""The node process's executor thread (:func:`dinomix_ros.ros.runtime._spin`) with real rclpy: an entity destroyed
under the executor (rclpy's InvalidHandle) does not stop it, any other error still does (the process then exits 1)."""

from __future__ import annotations

import threading
import time

import rclpy
from rclpy.executors import MultiThreadedExecutor
from rosutil import next_domain_id
from std_msgs.msg import String

from dinomix_ros.ros.runtime import _spin


def _spinning(error_at_tick: int, raise_error) -> tuple[list[int], threading.Thread, MultiThreadedExecutor, object]:
    """A node whose 20 ms timer counts ticks and calls ``raise_error(node)`` at tick ``error_at_tick``, spun by
    ``_spin`` in a thread of its own."""
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=next_domain_id())
    node = rclpy.create_node("spin_probe", context=context)
    ticks: list[int] = []

    def tick() -> None:
        ticks.append(len(ticks) + 1)
        if len(ticks) == error_at_tick:
            raise_error(node)

    node.create_timer(0.02, tick)
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    executor.add_node(node)
    thread = threading.Thread(target=_spin, args=(executor, node), daemon=True)
    thread.start()
    return ticks, thread, executor, (node, context)


def _wait(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _close(executor: MultiThreadedExecutor, thread: threading.Thread, owned: tuple) -> None:
    node, context = owned
    executor.shutdown(timeout_sec=5.0)
    thread.join(timeout=10.0)
    node.destroy_node()
    rclpy.try_shutdown(context=context)


def _use_a_destroyed_subscription(node) -> None:
    """What rclpy's executor does when another thread destroyed a subscription it is reading: a real InvalidHandle."""
    sub = node.create_subscription(String, "probe", lambda _: None, 1)
    node.destroy_subscription(sub)
    with sub.handle:
        pass


def test_an_entity_destroyed_under_the_executor_does_not_stop_it() -> None:
    ticks, thread, executor, owned = _spinning(3, _use_a_destroyed_subscription)
    try:
        assert _wait(lambda: len(ticks) >= 10), f"the executor stopped after tick {len(ticks)}"
        assert thread.is_alive()
    finally:
        _close(executor, thread, owned)
    assert not thread.is_alive()  # shutdown still ends it


def test_any_other_error_still_stops_it() -> None:
    def fail(_node) -> None:
        raise RuntimeError("a bug")

    ticks, thread, executor, owned = _spinning(3, fail)
    try:
        assert _wait(lambda: not thread.is_alive()), "the executor went on after an unexpected error"
        stopped_at = len(ticks)  # the error surfaces at the executor's next turn: a tick more may have run
        time.sleep(0.3)
        assert len(ticks) == stopped_at
    finally:
        _close(executor, thread, owned)
