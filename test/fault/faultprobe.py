"""A probe of the fault suite and the per-class table (see test/fault/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Probe", "fault_table"]


@dataclass
class Probe:
    """What one hostile input did."""

    klass: str
    name: str
    crashed: bool = False
    hung: bool = False
    keyframes_lost: int = 0
    outside_touched: bool = False
    accepted: bool = False  # the hostile input got through: e.g. a verified match from a hostile keyframe


def fault_table(probes: list[Probe]) -> list[tuple[str, int, int, int, int, int, int]]:
    """Rows (class, probes, crashes, hangs, keyframes lost, outside files touched, hostile inputs accepted), one per
    class, first seen first."""
    rows: dict[str, list[int]] = {}
    for p in probes:
        row = rows.setdefault(p.klass, [0, 0, 0, 0, 0, 0])
        row[0] += 1
        row[1] += int(p.crashed)
        row[2] += int(p.hung)
        row[3] += p.keyframes_lost
        row[4] += int(p.outside_touched)
        row[5] += int(p.accepted)
    return [(k, *v) for k, v in rows.items()]
