"""The fault suite: hostile inputs against the node, the map store and the decoders; a table of what happened.

Each probe is one hostile input (a bad image, a damaged map, a failing disk, a signal at the wrong moment). A test
records every probe it runs with the ``fault_probe`` fixture (class, name, and what was observed: the process
crashed, hung, lost keyframes, touched a file outside the map, let the hostile input through, e.g. a verified match
from a hostile keyframe) and then asserts the good outcome itself. At the end of the run pytest prints the table
(probe class, probes, crashes, hangs, keyframes lost, outside files touched, hostile inputs accepted); ``make
faults`` runs only this suite. With ``DINOMIX_FAULT_REPORT=path.json`` the rows are also written as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict

import pytest
from faultprobe import Probe, fault_table


_PROBES: list[Probe] = []


@pytest.fixture
def fault_probe() -> Callable[..., Probe]:
    """``fault_probe(klass, name, crashed=..., hung=..., keyframes_lost=..., outside_touched=..., accepted=...)``
    records a probe."""

    def record(klass: str, name: str, **observed: object) -> Probe:
        probe = Probe(klass, name, **observed)  # type: ignore[arg-type]
        _PROBES.append(probe)
        return probe

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    if not _PROBES:
        return
    header = ("probe class", "probes", "node crashes", "hangs", "keyframes lost", "outside files touched",
              "hostile input accepted")
    rows = [header] + [tuple(str(v) for v in row) for row in fault_table(_PROBES)]
    totals = [sum(int(r[i]) for r in rows[1:]) for i in range(1, len(header))]
    rows.append(("total", *map(str, totals)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    terminalreporter.section("fault suite")
    for r in rows:
        terminalreporter.write_line("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                              enumerate(zip(r, widths))))
    path = os.environ.get("DINOMIX_FAULT_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"table": [dict(zip(header, r)) for r in rows[1:]], "probes": [asdict(p) for p in _PROBES]},
                      f, indent=2)
