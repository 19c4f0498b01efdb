"""The node's health report: rates, latency percentiles (end to end and per stage), counters and one status line
(what /diagnostics shows).

ROS-free: the node feeds it latencies and counts and publishes :meth:`HealthMonitor.report` as a
``diagnostic_msgs/DiagnosticStatus`` (level 0 OK, 1 WARN, 2 ERROR).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from dinomix_ros.localization.latest_frames import FrameCounts

__all__ = ["OK", "WARN", "ERROR", "STAGES", "HealthMonitor", "StampGaps"]

OK, WARN, ERROR = 0, 1, 2
_LATENCY_WINDOW = 200  # frames the percentiles are taken over
#: The worker's stages, in order: decode the message, preprocess (host and device), model (forward pass of the
#: frame's batch), search (LiveMap.process: search, matching, recording), verify (geometric verification; 0 when
#: there is none), publish (message building and publishing).
STAGES = ("decode", "preprocess", "model", "search", "verify", "publish")
_MIN_PERIODS = 3  # gaps seen before a camera's period is trusted
_PERIOD_WINDOW = 50  # gaps of a camera its period is taken over
LOSS_WARN_FRACTION = 0.05  # estimated input loss above which /diagnostics warns


class StampGaps:
    """Camera frames that never reached the node, estimated from gaps in their header stamps.

    A camera publishes at a steady rate, so its period is about the smallest gap between consecutive stamps that
    arrive (the median would not do: with half the frames lost, the typical gap is two periods). Each gap then hides
    ``round(gap / period) - 1`` lost frames (lost by the transport, or by an overflowing subscription queue). The
    period is taken over the last gaps of each camera and gaps are judged once they leave that window, so the
    estimate is also right for the first frames. Stamps going back (a replay starting over) restart the camera.
    Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, int] = {}
        self._gaps: dict[str, deque[int]] = {}
        self._judged = 0  # lost frames of gaps that left the window
        self.received = 0

    def add(self, camera: str, stamp_ns: int) -> None:
        with self._lock:
            self.received += 1
            last = self._last.get(camera)
            self._last[camera] = stamp_ns
            if last is None or stamp_ns == last:
                return
            if stamp_ns < last:
                self._judged += self._lost_in(self._gaps.pop(camera, deque()))
                return
            gaps = self._gaps.setdefault(camera, deque())
            gaps.append(stamp_ns - last)
            if len(gaps) > _PERIOD_WINDOW:
                period = min(gaps)
                self._judged += max(int(round(gaps.popleft() / period)) - 1, 0)

    @staticmethod
    def _lost_in(gaps: deque[int]) -> int:
        if len(gaps) < _MIN_PERIODS:
            return 0  # too few gaps to know the period
        period = min(gaps)
        return sum(max(int(round(g / period)) - 1, 0) for g in gaps)

    @property
    def lost(self) -> int:
        """Estimated frames lost so far."""
        with self._lock:
            return self._judged + sum(self._lost_in(g) for g in self._gaps.values())

    @property
    def loss_fraction(self) -> float:
        """Estimated share of the cameras' frames that never arrived."""
        lost = self.lost
        with self._lock:
            total = self.received + lost
        return lost / total if total else 0.0


class HealthMonitor:
    """Latencies of the last frames and input/processing rates between two reports (thread-safe)."""

    def __init__(self, window: int = _LATENCY_WINDOW) -> None:
        self._lock = threading.Lock()
        self._latencies: deque[tuple[float, float]] = deque(maxlen=window)
        self._stages: deque[tuple[float, ...]] = deque(maxlen=window)
        self._previous = (time.monotonic(), 0, 0)

    def record(self, receive_to_publish_s: float, processing_s: float,
               stages: dict[str, float] | None = None) -> None:
        """One processed frame: from the callback receiving it to its outputs published, the processing alone, and
        the seconds of each of :data:`STAGES` (missing ones count as 0)."""
        with self._lock:
            self._latencies.append((receive_to_publish_s, processing_s))
            if stages is not None:
                self._stages.append(tuple(float(stages.get(name, 0.0)) for name in STAGES))

    def report(self, frames: FrameCounts, processed: int, counters: dict[str, int], live: dict[str, Any],
               extra: dict[str, Any], empty_map_warns: bool, recent: dict[str, int] | None = None,
               findings: list[tuple[int, str]] = ()) -> tuple[int, str, dict[str, Any]]:
        """(level, message, values) for a diagnostics status.

        Args:
            frames: camera frames received/dropped so far.
            processed: frames processed so far.
            counters: the node's error counters (``bad_images``, ``bad_poses``...), totals.
            recent: the same counters over the recent window (:class:`~.input_watch.EventWindow`): they set the
                status (default: the totals) and are reported as ``<name>_recent``.
            findings: more problems as (level, message) (:class:`~.input_watch.InputWatch`); an ERROR outranks
                every WARN, and the status lists how many more problems there are.
            live: :meth:`~dinomix_ros.localization.live_map.LiveMap.stats` (empty when unconfigured).
            extra: more values to show (device, model fingerprint...).
            empty_map_warns: an empty map is a warning (localize mode, not recording).
        """
        now = time.monotonic()
        with self._lock:
            t_prev, received_prev, processed_prev = self._previous
            self._previous = (now, frames.received, processed)
            lat_ms = np.asarray(self._latencies, dtype=float).reshape(-1, 2) * 1e3
            stage_ms = np.asarray(self._stages, dtype=float).reshape(-1, len(STAGES)) * 1e3
        dt = max(now - t_prev, 1e-6)
        stage_values = {}
        for i, name in enumerate(STAGES):
            for q in (50, 95):
                stage_values[f"stage_{name}_p{q}_ms"] = float(np.percentile(stage_ms[:, i], q)) if stage_ms.size \
                    else math.nan

        def pct(column: int, q: float) -> float:
            return float(np.percentile(lat_ms[:, column], q)) if lat_ms.size else math.nan

        values = {"input_rate_hz": (frames.received - received_prev) / dt,
                  "processed_rate_hz": (processed - processed_prev) / dt, "frames_received": frames.received,
                  "frames_processed": processed, "frames_dropped": frames.dropped, **counters,
                  **{f"{k}_recent": v for k, v in (recent or {}).items()}, **live,
                  "latency_p50_ms": pct(0, 50), "latency_p95_ms": pct(0, 95), "processing_p50_ms": pct(1, 50),
                  "processing_p95_ms": pct(1, 95), **stage_values, **extra}
        counters = counters if recent is None else {**counters, **recent}
        level, message = OK, "ok"
        # lowest priority first: the status line names the most serious problem
        if empty_map_warns and live.get("map_keyframes", 0) == 0 and not live.get("recording", False):
            level, message = WARN, "map is empty"
        lately = "" if recent is None else " recently"
        if counters.get("bad_poses"):
            level, message = WARN, f"{counters['bad_poses']} pose-source messages refused{lately}"
        if counters.get("bad_camera_info"):
            level, message = WARN, f"{counters['bad_camera_info']} camera_info messages refused{lately}"
        if counters.get("bad_images"):
            level, message = WARN, f"{counters['bad_images']} bad images skipped{lately}"
        if counters.get("callback_errors"):
            level, message = WARN, f"{counters['callback_errors']} callback errors{lately} (see the log)"
        if live.get("keyframes_not_recorded_errors"):
            level, message = WARN, f"{live['keyframes_not_recorded_errors']} keyframes could not be recorded"
        if extra.get("frame_loss_warning"):  # a camera losing frames: which, how many, the fix (frame_loss.py)
            level, message = WARN, extra["frame_loss_warning"]
        if counters.get("qos_incompatible"):
            level, message = WARN, (f"{counters['qos_incompatible']} camera publishers with incompatible QoS: their "
                                    "frames are not received (set cameras.reliability to auto)")
        if str(live.get("map_check", "")).startswith("FAILED"):
            level, message = ERROR, (f"map damaged, not matching against it: {live['map_check'][len('FAILED: '):]}; "
                                     "restore the map directory from a backup and call ~/load_map")
        problems = ([(level, message)] if level > OK else []) + [p for p in findings if p[0] > OK]
        if not problems:
            return OK, "ok", values
        problems.sort(key=lambda p: -p[0])  # stable: an ERROR first, else the most serious warning above
        level, message = problems[0]
        if len(problems) > 1:
            message += f" (+{len(problems) - 1} more: " + "; ".join(m for _, m in problems[1:]) + ")"
        return level, message, values
