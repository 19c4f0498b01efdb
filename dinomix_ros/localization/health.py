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

__all__ = ["OK", "WARN", "ERROR", "STAGES", "HealthMonitor"]

OK, WARN, ERROR = 0, 1, 2
_LATENCY_WINDOW = 200  # frames the percentiles are taken over
#: The worker's stages, in order: decode the message, preprocess (host and device), model (forward pass of the
#: frame's batch), search (LiveMap.process: search, matching, recording), verify (geometric verification; 0 when
#: there is none), publish (message building and publishing).
STAGES = ("decode", "preprocess", "model", "search", "verify", "publish")


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
               extra: dict[str, Any], empty_map_warns: bool) -> tuple[int, str, dict[str, Any]]:
        """(level, message, values) for a diagnostics status.

        Args:
            frames: camera frames received/dropped so far.
            processed: frames processed so far.
            counters: the node's error counters (``bad_images``, ``bad_poses``...).
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
                  "frames_processed": processed, "frames_dropped": frames.dropped, **counters, **live,
                  "latency_p50_ms": pct(0, 50), "latency_p95_ms": pct(0, 95), "processing_p50_ms": pct(1, 50),
                  "processing_p95_ms": pct(1, 95), **stage_values, **extra}
        level, message = OK, "ok"
        if counters.get("bad_images"):
            level, message = WARN, f"{counters['bad_images']} bad images skipped"
        if live.get("keyframes_not_recorded_errors"):
            level, message = WARN, f"{live['keyframes_not_recorded_errors']} keyframes could not be recorded"
        if empty_map_warns and live.get("map_keyframes", 0) == 0 and not live.get("recording", False):
            level, message = WARN, "map is empty"
        return level, message, values
