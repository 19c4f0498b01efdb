"""Pushing a map's keyframes to the fleet, and the ledger that records what was pushed.

The local map is the source of truth; the fleet gets copies. What a map has pushed to a fleet is recorded in a
ledger beside the map directory (``<map>.fleet.json``, :class:`PushLedger`), per fleet (URI and collection), robot and
map (:func:`~dinomix_ros.maps.fleet.records.map_uid`): a watermark (every keyframe id up to it was pushed, or was
pulled from the fleet and is never pushed back) and the keyframes the server refused (retried on every push, never
dropped). The backlog is every other keyframe (:func:`backlog_rows`): after a restart it is still there, and
:func:`push_backlog` sends it in keyframe order, writing the ledger after each acknowledged batch.

A crash between the server's acknowledgement and the ledger write re-sends at most one batch; keys are
deterministic and rows are upserted, so that re-send replaces the same rows instead of duplicating them. A lost or
unreadable ledger therefore costs a re-send of the map, never a duplicate.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinomix_ros.maps.fleet.config import display_uri
from dinomix_ros.maps.fleet.records import is_pulled, map_uid, to_records
from dinomix_ros.maps.fleet.store import FleetError, FleetStore, FleetUnavailableError
from dinomix_ros.util.files import atomic_path

__all__ = ["LEDGER_SUFFIX", "PushLedger", "PushReport", "backlog_rows", "push_backlog", "scope_of"]

_logger = logging.getLogger(__name__)

LEDGER_SUFFIX = ".fleet.json"
_FORMAT = "dinomix_fleet_ledger"
_MAX_REFUSED = 10000  # refused keyframes remembered per entry (beyond that the oldest reasons are dropped, not ids)


class PushLedger:
    """What a map pushed to which fleet (see the module docstring); a small JSON file, written atomically."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_map(cls, map_path: str | Path) -> PushLedger:
        """The ledger of the map directory ``map_path``: ``<map_path>.fleet.json`` beside it."""
        return cls(Path(str(map_path).rstrip("/") + LEDGER_SUFFIX))

    def _read(self) -> list[dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            _logger.warning("fleet ledger %s unreadable (%s): pushing as if nothing had been pushed (keys are "
                            "deterministic: the server replaces, never duplicates)", self.path, exc)
            return []
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("entries"), list):
            _logger.warning("fleet ledger %s is not a dinomix fleet ledger: ignored", self.path)
            return []
        return [e for e in data["entries"] if isinstance(e, dict)]

    def entry(self, scope: dict[str, str]) -> dict[str, Any]:
        """The entry of ``scope`` (uri, collection, robot, map_uid): ``pushed_through`` (-1: nothing), ``pushed``,
        ``refused`` ({keyframe id: reason}), ``updated``."""
        for e in self._read():
            if all(e.get(k) == v for k, v in scope.items()):
                refused = e.get("refused") if isinstance(e.get("refused"), dict) else {}
                through = e.get("pushed_through")
                pushed = e.get("pushed")
                return {**scope, "pushed_through": through if type(through) is int else -1,
                        "pushed": pushed if type(pushed) is int else 0,
                        "refused": {str(k): str(v) for k, v in refused.items() if str(k).isdigit()},
                        "updated": e.get("updated")}
        return {**scope, "pushed_through": -1, "pushed": 0, "refused": {}, "updated": None}

    def write(self, entry: dict[str, Any]) -> None:
        """Store ``entry`` (replacing the one of its scope)."""
        scope = ("uri", "collection", "robot", "map_uid")
        entries = [e for e in self._read() if any(e.get(k) != entry[k] for k in scope)]
        refused = dict(list(entry["refused"].items())[-_MAX_REFUSED:])
        entries.append({**entry, "refused": refused, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"format": _FORMAT, "version": 1, "entries": entries}, indent=1))


@dataclass
class PushReport:
    """What a push did: keyframes pushed, refused by the server, still waiting, and the error that stopped it."""

    pushed: int = 0
    refused: int = 0
    pending: int = 0
    features_truncated: int = 0
    seconds: float = 0.0
    error: str | None = None
    refused_reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"pushed {self.pushed} keyframes in {self.seconds:.2f} s"
        if self.refused:
            text += f", {self.refused} refused by the server ({'; '.join(self.refused_reasons[:2])})"
        if self.pending:
            text += f", {self.pending} still to push"
        return text + (f": {self.error}" if self.error else "")

    def to_dict(self) -> dict[str, Any]:
        return {"pushed": self.pushed, "refused": self.refused, "pending": self.pending,
                "features_truncated": self.features_truncated, "seconds": round(self.seconds, 3),
                "error": self.error}


def scope_of(store: FleetStore, robot: str, kmap: Any) -> dict[str, str]:
    """The ledger scope of pushing ``kmap`` as ``robot`` to ``store``."""
    return {"uri": display_uri(store.config.uri), "collection": store.collection, "robot": robot,
            "map_uid": map_uid(kmap)}


def backlog_rows(kmap: Any, entry: dict[str, Any], saved_rows: int | None = None) -> np.ndarray:
    """Rows of ``kmap`` (its first ``saved_rows``, default all) still to push under ledger ``entry``: not pulled from
    the fleet, and above the watermark or refused before."""
    n = len(kmap) if saved_rows is None else min(saved_rows, len(kmap))
    ids = kmap.ids[:n]
    retry = np.array([int(k) for k in entry["refused"]], dtype=np.int64)
    wanted = (ids > entry["pushed_through"]) | np.isin(ids, retry)
    rows = np.flatnonzero(wanted)
    sources = kmap.sources
    return np.array([r for r in rows if not is_pulled(sources[r])], dtype=np.int64)


def push_backlog(store: FleetStore, kmap: Any, ledger: PushLedger, robot: str, *, through_id: int | None = None,
                 deadline: float | None = None, on_batch: Callable[[PushReport], None] | None = None) -> PushReport:
    """Push every keyframe of ``kmap`` in the backlog of ``ledger`` (see the module docstring).

    Args:
        store: the fleet (connected on first use).
        kmap: the map, or a subset of it holding at least its backlog (same creation time and model).
        ledger: where the progress is recorded (after each acknowledged batch).
        robot: this robot's id.
        through_id: the largest id of the saved map (default: ``kmap``'s); once everything up to it is pushed it
            becomes the watermark, so keyframes pulled from the fleet are not looked at again.
        deadline: ``time.monotonic()`` after which no new batch starts (the rest stays in the backlog).
        on_batch: called with the running report after each batch.

    Returns:
        The report; ``error`` is set when the server became unreachable (the rest waits for the next push). Never
        raises for the server's sake.
    """
    t0 = time.perf_counter()
    report = PushReport()
    entry = ledger.entry(scope_of(store, robot, kmap))
    rows = backlog_rows(kmap, entry)
    if through_id is None:
        through_id = int(kmap.ids[-1]) if len(kmap) else -1
    uid, ids, batch_rows = map_uid(kmap), kmap.ids, store.config.batch_rows
    done = 0
    try:  # a collection-level refusal (another model, authentication) raises here, before any row is sent
        if rows.shape[0]:
            store.connect()
    except FleetUnavailableError as exc:
        report.error = str(exc)
    for start in range(0, rows.shape[0] if report.error is None else 0, batch_rows):
        if deadline is not None and time.monotonic() > deadline:
            report.error = "stopped at the deadline"
            break
        batch = rows[start:start + batch_rows]
        records, truncated = to_records(kmap, batch, robot, uid, store.vector, store.marker)
        report.features_truncated += truncated
        before = report.pushed
        acked, unavailable = _push_batch(store, records, [int(ids[r]) for r in batch], entry, report)
        entry["pushed"] += report.pushed - before
        if acked:
            entry["pushed_through"] = max(entry["pushed_through"], int(ids[batch[acked - 1]]))
            ledger.write(entry)
        done = start + acked
        if unavailable is not None:
            report.error = str(unavailable)
            break
        if on_batch is not None:
            on_batch(report)
    if done == rows.shape[0] and report.error is None:
        entry["pushed_through"] = max(entry["pushed_through"], through_id)
        ledger.write(entry)
    left = {int(i) for i in ids[rows[done:]]} | {int(k) for k in entry["refused"]}
    report.pending = len(left)
    report.refused = len(entry["refused"])
    report.seconds = time.perf_counter() - t0
    return report


def _push_batch(store: FleetStore, records: list[dict], batch_ids: list[int], entry: dict[str, Any],
                report: PushReport) -> tuple[int, FleetUnavailableError | None]:
    """Upsert one batch; when the server refuses it, row by row, so that one bad keyframe costs only itself (it is
    recorded as refused and retried by the next push). Returns how many rows, from the batch's start, were
    acknowledged or refused, and the error when the server became unreachable."""
    try:
        store.upsert(records)
    except FleetUnavailableError as exc:
        return 0, exc
    except FleetError:
        if not store.connected:  # not this batch's fault: the collection itself was refused
            raise
        for i, (record, kf_id) in enumerate(zip(records, batch_ids)):
            try:
                store.upsert([record])
            except FleetUnavailableError as exc:
                return i, exc
            except FleetError as exc:
                entry["refused"][str(kf_id)] = str(exc)
                report.refused_reasons.append(f"keyframe {kf_id}: {exc}")
                continue
            entry["refused"].pop(str(kf_id), None)
            report.pushed += 1
        return len(records), None
    for kf_id in batch_ids:
        entry["refused"].pop(str(kf_id), None)
    report.pushed += len(records)
    return len(records), None
