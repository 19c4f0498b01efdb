"""The newest frame of each camera, handed to one worker: drop instead of queueing.

Cameras publish faster than a model on a robot describes; queued frames only add latency. :class:`LatestFrames`
keeps one slot per camera: :meth:`LatestFrames.put` (a subscription callback: O(1), never blocks) replaces the
waiting frame and counts the replaced one as dropped; :meth:`LatestFrames.get` (the worker) takes the frame of the
camera that has waited longest, at most one per camera per ``min_period_s``; :meth:`LatestFrames.get_ready` takes
the waiting frame of every camera that is due at once, so the worker can describe them in one forward pass.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["FrameCounts", "LatestFrames"]


@dataclass
class FrameCounts:
    """Frames of one camera: received, replaced before processing (dropped), taken by the worker."""

    received: int = 0
    dropped: int = 0
    taken: int = 0


class _Slot:
    def __init__(self) -> None:
        self.item: Any = None
        self.received_at = 0.0
        self.taken_at: float | None = None  # never served: due at once (monotonic time starts at boot, not long ago)
        self.counts = FrameCounts()


class LatestFrames:
    """One newest-frame slot per camera (thread-safe).

    Args:
        cameras: the camera names (e.g. topics); frames of other names are ignored.
        min_period_s: called by :meth:`get` for the current minimum period per camera (a run-time setting).
    """

    def __init__(self, cameras: Iterable[str] = (), min_period_s: Callable[[], float] = lambda: 0.0) -> None:
        self._cond = threading.Condition()
        self._slots = {name: _Slot() for name in cameras}
        self._min_period_s = min_period_s

    def put(self, camera: str, item: Any) -> None:
        """Make ``item`` the camera's waiting frame (the one it replaces counts as dropped)."""
        with self._cond:
            slot = self._slots.get(camera)
            if slot is None:
                return
            if slot.item is not None:
                slot.counts.dropped += 1
            slot.item, slot.received_at = item, time.monotonic()
            slot.counts.received += 1
            self._cond.notify()

    def get(self, stop: threading.Event) -> tuple[str, Any, float] | None:
        """Wait for a frame: (camera, item, monotonic receive time), or None once ``stop`` is set."""
        frames = self.get_ready(stop, limit=1)
        return frames[0] if frames else None

    def get_ready(self, stop: threading.Event, limit: int | None = None) -> list[tuple[str, Any, float]]:
        """Wait for frames: the waiting frame of every camera that is due, at most ``limit`` of them.

        Returns:
            (camera, item, monotonic receive time) per camera, the camera served longest ago first (round robin
            when ``limit`` cuts the list); empty once ``stop`` is set.
        """
        with self._cond:
            while not stop.is_set():
                now, period = time.monotonic(), float(self._min_period_s())
                ready = sorted((-math.inf if s.taken_at is None else s.taken_at, name)
                               for name, s in self._slots.items()
                               if s.item is not None and (s.taken_at is None or now - s.taken_at >= period))
                if ready:
                    return [self._take(name, now) for _, name in ready[:limit]]
                self._cond.wait(timeout=0.05 if period > 0 else 0.5)
        return []

    def _take(self, name: str, now: float) -> tuple[str, Any, float]:
        slot = self._slots[name]
        item, slot.item, slot.taken_at = slot.item, None, now
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
