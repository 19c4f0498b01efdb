"""The newest frame of each camera, handed to one worker: drop instead of queueing.

Cameras publish faster than a model on a robot describes; queued frames only add latency. :class:`LatestFrames`
keeps one slot per camera: :meth:`LatestFrames.put` (a subscription callback: O(1), never blocks) replaces the
waiting frame and counts the replaced one as dropped; :meth:`LatestFrames.get` (the worker) takes the frame of the
camera that has waited longest, at most one per camera per ``min_period_s``; :meth:`LatestFrames.get_ready` takes
the waiting frame of every camera that is due at once, so the worker can describe them in one forward pass.

``min_period_s`` is measured by a clock the caller gives: the node's, which is simulated time (``/clock``) when
``use_sim_time`` is on, so a bag replayed at twice its speed has the same frames processed. Takes follow a schedule
(the next is due ``min_period_s`` after the previous one was due, or after its frame arrived if that was later), so
the period does not drift with the worker's timing; when the clock goes back (a bag replayed again), the camera is
due at once.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["FrameCounts", "LatestFrames", "STALE_AFTER_JUMP_S"]

#: A waiting frame that arrived more than this many seconds after the clock's present (the clock went back since)
#: is dropped.
STALE_AFTER_JUMP_S = 1.0


@dataclass
class FrameCounts:
    """Frames of one camera: received, replaced before processing (dropped), taken by the worker."""

    received: int = 0
    dropped: int = 0
    taken: int = 0


class _Slot:
    def __init__(self) -> None:
        self.item: Any = None
        self.received_at = 0.0  # monotonic: latencies
        self.arrived = 0.0  # by the period clock
        self.taken_at: float | None = None  # monotonic, for round robin; never served: first
        self.due_from: float | None = None  # period clock; never served: due at once (no "long ago" at boot)
        self.counts = FrameCounts()


class LatestFrames:
    """One newest-frame slot per camera (thread-safe).

    Args:
        cameras: the camera names (e.g. topics); frames of other names are ignored.
        min_period_s: called by :meth:`get` for the current minimum period per camera (a run-time setting).
        clock: seconds by which ``min_period_s`` is measured (the node's clock; default: monotonic).
    """

    def __init__(self, cameras: Iterable[str] = (), min_period_s: Callable[[], float] = lambda: 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cond = threading.Condition()
        self._slots = {name: _Slot() for name in cameras}
        self._min_period_s = min_period_s
        self._clock = clock

    def put(self, camera: str, item: Any) -> None:
        """Make ``item`` the camera's waiting frame (the one it replaces counts as dropped)."""
        with self._cond:
            slot = self._slots.get(camera)
            if slot is None:
                return
            if slot.item is not None:
                slot.counts.dropped += 1
            slot.item, slot.received_at, slot.arrived = item, time.monotonic(), self._clock()
            slot.counts.received += 1
            self._cond.notify()

    def get(self, stop: threading.Event) -> tuple[str, Any, float] | None:
        """Wait for a frame: (camera, item, monotonic receive time), or None once ``stop`` is set."""
        frames = self.get_ready(stop, limit=1)
        return frames[0] if frames else None

    def get_ready(self, stop: threading.Event, limit: int | None = None,
                  timeout_s: float | None = None) -> list[tuple[str, Any, float]]:
        """Wait for frames: the waiting frame of every camera that is due, at most ``limit`` of them.

        Returns:
            (camera, item, monotonic receive time) per camera, the camera served longest ago first (round robin
            when ``limit`` cuts the list); empty once ``stop`` is set, or after ``timeout_s`` (0: do not wait).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while not stop.is_set():
                now, period = self._clock(), float(self._min_period_s())
                self._drop_stale(now)
                ready = sorted((-math.inf if s.taken_at is None else s.taken_at, name)
                               for name, s in self._slots.items() if s.item is not None and _due(s, now, period))
                if ready:
                    return [self._take(name, period) for _, name in ready[:limit]]
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self._cond.wait(timeout=0.05 if period > 0 else 0.5)
        return []

    def _drop_stale(self, now: float) -> None:
        """A frame waiting since before the clock went back (a bag replayed again) belongs to the old timeline:
        dropped, so the new one starts with its own first frame."""
        for slot in self._slots.values():
            if slot.item is not None and slot.arrived - now > STALE_AFTER_JUMP_S:
                slot.item = None
                slot.counts.dropped += 1

    def _take(self, name: str, period: float) -> tuple[str, Any, float]:
        slot = self._slots[name]
        item, slot.item, slot.taken_at = slot.item, None, time.monotonic()
        if slot.due_from is None or _went_back(slot, slot.arrived, period) or period <= 0:
            slot.due_from = slot.arrived + period  # first frame, or the clock went back: a new schedule
        else:  # the next take is due a period after this one was, or after this frame arrived if that was later
            slot.due_from = max(slot.due_from, slot.arrived) + period
        slot.counts.taken += 1
        return name, item, slot.received_at

    def wake(self) -> None:
        """Wake a waiting :meth:`get` (e.g. after setting its stop event)."""
        with self._cond:
            self._cond.notify_all()

    def counts(self) -> FrameCounts:
        """Totals over all cameras."""
        with self._cond:
            total = FrameCounts()
            for slot in self._slots.values():
                total.received += slot.counts.received
                total.dropped += slot.counts.dropped
                total.taken += slot.counts.taken
            return total


def _due(slot: _Slot, now: float, period: float) -> bool:
    """Never served, the period passed, or the clock went back."""
    return slot.due_from is None or now >= slot.due_from or _went_back(slot, now, period)


def _went_back(slot: _Slot, t: float, period: float) -> bool:
    """``t`` lies before the camera's last take (which was at least ``due_from - period``), with a period's margin
    for a simulated clock's jitter."""
    return t < slot.due_from - 2 * max(period, 0.0)
