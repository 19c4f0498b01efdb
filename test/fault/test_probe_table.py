"""The fault suite's own bookkeeping: probes are tallied per class."""

from __future__ import annotations

from faultprobe import Probe, fault_table


def test_fault_table_tallies_per_class() -> None:
    rows = fault_table([Probe("bad image", "a"), Probe("bad image", "b", crashed=True),
                        Probe("hostile map", "c", keyframes_lost=2, outside_touched=True),
                        Probe("hostile feature chunk", "d", accepted=True), Probe("hostile feature chunk", "e")])
    assert rows == [("bad image", 2, 1, 0, 0, 0, 0), ("hostile map", 1, 0, 0, 2, 1, 0),
                    ("hostile feature chunk", 2, 0, 0, 0, 0, 1)]
