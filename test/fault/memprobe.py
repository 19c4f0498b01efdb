"""Peak memory of one hostile input, measured in-process (Linux ``/proc``), for the fault suite's memory rule.

The rule (issue 8): memory under any single bad input stays < 1 GiB above the steady state. :func:`peak_above` resets
the kernel's peak-RSS mark of a process (``/proc/<pid>/clear_refs``, value 5, Linux >= 4.0), runs the probe, and
reads the new peak (``VmHWM``) against the resident size just before (``VmRSS``). Where the mark cannot be reset, the
lifetime peak (``ru_maxrss``) is used: it only ever grows, so the result is then an upper bound of nothing smaller
than the probe's own growth above the previous peak, and ``exact`` says so.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GIB", "PeakMemory", "peak_above", "reset_peak", "status_kib"]

GIB = 1 << 30


@dataclass(frozen=True)
class PeakMemory:
    """Peak resident memory above the resident size before a probe, in bytes."""

    above: int
    exact: bool  # the peak mark was reset before the probe (else: growth of the lifetime peak)

    @property
    def mib(self) -> float:
        return self.above / 2**20


def status_kib(field: str, pid: int | str = "self") -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (e.g. ``VmRSS``, ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int | str = "self") -> bool:
    """Reset the peak-RSS mark (``VmHWM``) of ``pid`` to its current RSS; False where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_above(probe: Callable[[], Any]) -> tuple[PeakMemory, Any]:
    """Run ``probe`` in this process; return (its peak memory above the RSS before it, what it returned or raised).

    An exception the probe raises is returned (not raised), so a refused input is measured like an accepted one.
    """
    exact = reset_peak()
    before_rss = status_kib("VmRSS") * 1024
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        outcome: Any = probe()
    except Exception as exc:  # measured like any other outcome; the caller asserts on it
        outcome = exc
    if exact:
        peak = status_kib("VmHWM") * 1024 - before_rss
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before_max
    return PeakMemory(max(0, peak), exact), outcome
