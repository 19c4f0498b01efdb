"""A robot's link to the fleet map, without ROS: pulls into the live map and pushes what it saved, in the background.

:class:`FleetSync` runs one worker thread. Jobs are queued (:meth:`FleetSync.pull`, :meth:`FleetSync.push`) and run
in order; a caller may wait for one (a service answer) or not (after a save). The local map stays the source of
truth: a pull adds the region's keyframes to the live map (:meth:`LiveMap.merge_keyframes`), a push sends the saved
keyframes the map's ledger still owes (:mod:`dinomix_ros.maps.fleet.push`). When the server cannot be reached the
robot keeps its map, the failure is logged once as one line (again only when the reason changes), the backlog stays
in the ledger, and the worker retries every ``fleet.retry_period_s`` until it is empty. :meth:`FleetSync.state` is
what /diagnostics shows.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dinomix_ros.localization.live_map import LiveMap
from dinomix_ros.maps.fleet.config import FleetConfig, robot_id
from dinomix_ros.maps.fleet.push import PushLedger, PushReport, push_backlog, scope_of
from dinomix_ros.maps.fleet.records import map_uid
from dinomix_ros.maps.fleet.region import Region
from dinomix_ros.maps.fleet.store import FleetError, FleetStore, FleetUnavailableError

__all__ = ["FleetJob", "FleetSync"]

_logger = logging.getLogger(__name__)

#: ``log(level, message)``: level "info", "warning" or "error".
Log = Callable[[str, str], None]
#: Keyframes copied out of the live map per push slice (about 40 kB each with 4096-d float16 descriptors and 400
#: ORB features: 80 MB).
_SLICE_ROWS = 2048


@dataclass
class FleetJob:
    """A queued pull or push; ``done`` is set when it ran, with ``ok`` and a one-line ``message``. ``announce``: the
    link logs the outcome (off while a caller waits to say it itself, e.g. a service answer)."""

    kind: str
    run: Callable[[], str]
    announce: bool = True
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    message: str = "queued"

    def wait(self, timeout: float) -> tuple[bool, str]:
        """``(ok, message)`` once the job ran, or ``(False, why)`` after ``timeout`` (it still runs, and its outcome
        is logged then)."""
        if not self.done.wait(timeout):
            self.announce = True
            return False, f"the fleet {self.kind} did not finish within {timeout:g} s; it goes on in the background"
        return self.ok, self.message


class FleetSync:
    """The fleet link of one node (see the module docstring).

    Args:
        config: the fleet settings (``uri`` set).
        fingerprint: the model in use.
        log: where one-line outcomes go (the node's logger).
    """

    def __init__(self, config: FleetConfig, fingerprint: dict[str, Any], log: Log | None = None) -> None:
        self.config = config
        self.robot = robot_id(config)
        self.store = FleetStore(config, fingerprint)
        self._log = log or (lambda level, message: getattr(_logger, level)(message))
        self._jobs: queue.Queue[FleetJob | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._retries: dict[str, Callable[[], FleetJob]] = {}  # "pull"/"push" to run again (server unreachable)
        self._last_failure = ""
        self._state: dict[str, Any] = {"fleet_uri": self.store.where, "fleet_robot": self.robot,
                                       "fleet_connected": False, "fleet_backlog": 0, "fleet_pushed": 0,
                                       "fleet_pulled": 0, "fleet_refused": 0, "fleet_last_push": "never",
                                       "fleet_last_pull": "never", "fleet_last_error": ""}
        self._state_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ thread

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="dinomix-fleet", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Drop the queued jobs and stop after the running one, waiting for it at most ``timeout`` seconds (then it is
        left to end by itself: a request is atomic on the server and the ledger is written atomically)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        while True:  # drop what is queued: the backlog is in the ledger, the next start pushes it
            try:
                dropped = self._jobs.get_nowait()
            except queue.Empty:
                break
            if dropped is not None:
                dropped.message = "the fleet link stopped before this ran"
                dropped.done.set()
        self._jobs.put(None)
        thread.join(timeout)
        if thread.is_alive():
            self._log("warning", f"fleet: the running request did not end within {timeout:g} s; left behind")
        else:
            self.store.close()

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.config.retry_period_s if self._retries else None)
            except queue.Empty:  # the server was unreachable: try what failed again
                for make in list(self._retries.values()):
                    self._jobs.put(make())
                continue
            if job is None:
                return
            try:
                job.message = job.run()
                job.ok = True
                self._succeeded(job.message, job.announce)
            except FleetError as exc:
                job.message = str(exc)
                self._failed(str(exc), isinstance(exc, FleetUnavailableError), job.announce)
            except Exception as exc:  # never ends the worker; reported like a refusal
                job.message = f"fleet {job.kind} failed: {exc!r}"
                self._failed(job.message, False, job.announce)
            finally:
                job.done.set()

    def _queue(self, job: FleetJob) -> FleetJob:
        if self._thread is None:
            job.message = "the fleet link is stopped"
            job.done.set()
        else:
            self._jobs.put(job)
        return job

    # ------------------------------------------------------------------------------------------------ jobs

    def pull(self, live: LiveMap, region: Region, announce: bool = True) -> FleetJob:
        """Queue a pull of ``region`` into ``live`` (keyframes it holds, and its own recorded ones, are skipped);
        while the server is unreachable it is retried every ``fleet.retry_period_s`` (the latest pull asked for)."""
        job = self._pull_job(live, region)
        job.announce = announce
        return self._queue(job)

    def _pull_job(self, live: LiveMap, region: Region) -> FleetJob:
        def run() -> str:
            t0 = time.perf_counter()
            mine = (self.robot, map_uid(live.kmap))  # this map's own keyframes are local already
            try:
                pulled = self.store.pull(region, self.config.pull_max_keyframes, self.robot, exclude=mine)
            except FleetUnavailableError:
                self._retries["pull"] = lambda: self._pull_job(live, region)
                raise
            self._retries.pop("pull", None)
            self._set(fleet_connected=True)
            added = live.merge_keyframes(pulled)
            message = (f"fleet pull of {region.describe()}: {len(added.ids)} keyframes added to the local map "
                       f"({added.present} held already) from {self.store.where} in "
                       f"{time.perf_counter() - t0:.2f} s")
            if added.refused:
                message += f"; {len(added.refused)} refused: {added.refused[0]}"
            with self._state_lock:
                self._state["fleet_pulled"] += len(added.ids)
                self._state["fleet_last_pull"] = f"{_now()}: {len(added.ids)} keyframes"
            return message
        return FleetJob("pull", run)

    def push(self, live: LiveMap, map_path: str, announce: bool = True) -> FleetJob:
        """Queue a push of the saved keyframes of ``live`` (saved at ``map_path``) that the fleet has not got."""
        job = self._push_job(live, map_path)
        job.announce = announce
        return self._queue(job)

    def _push_job(self, live: LiveMap, map_path: str) -> FleetJob:
        def run() -> str:
            if not map_path:
                return "map.path is empty: pushes follow local saves, and nothing was saved"
            ledger = PushLedger.for_map(map_path)
            scope = scope_of(self.store, self.robot, live.kmap)
            total = PushReport()
            while True:  # a large backlog goes in slices: a copy of the whole of it could be gigabytes
                entry = ledger.entry(scope)
                backlog, through, _ = live.fleet_backlog(entry, _SLICE_ROWS)
                if len(backlog) == 0 and (through is None or through <= entry["pushed_through"]):
                    break
                report = push_backlog(self.store, backlog, ledger, self.robot, through_id=through)
                total.pushed += report.pushed
                total.seconds += report.seconds
                total.refused, total.error = report.refused, report.error
                total.refused_reasons += report.refused_reasons
                stuck = ledger.entry(scope)["pushed_through"] == entry["pushed_through"]  # a slice of refused ones
                if report.error is not None or through is not None or stuck:
                    break
            total.pending = live.fleet_backlog(ledger.entry(scope), 0)[2]
            with self._state_lock:
                self._state.update(fleet_backlog=total.pending, fleet_refused=total.refused)
                self._state["fleet_pushed"] += total.pushed
                if total.pushed:
                    self._state["fleet_last_push"] = f"{_now()}: {total.pushed} keyframes"
            if total.pushed == 0 and total.error is None and not total.refused:
                self._retries.pop("push", None)
                return f"fleet push: nothing to push to {self.store.where}"
            message = f"fleet push to {self.store.where}: {total.summary()}"
            if total.error is not None:
                self._retries["push"] = lambda: self._push_job(live, map_path)
                raise FleetUnavailableError(message + "; the local map keeps them, retried every "
                                                      f"{self.config.retry_period_s:g} s")
            self._retries.pop("push", None)
            return message
        return FleetJob("push", run)

    # ------------------------------------------------------------------------------------------------ state

    def _set(self, **values: Any) -> None:
        with self._state_lock:
            self._state.update(values)

    def _succeeded(self, message: str, announce: bool) -> None:
        with self._state_lock:
            back = self._last_failure == "unreachable"
            self._state.update(fleet_connected=True, fleet_last_error="")
        self._last_failure = ""
        if back:
            self._log("info", f"fleet {self.store.where} reachable again")
        if announce:
            self._log("info", message)

    def _failed(self, message: str, unreachable: bool, announce: bool) -> None:
        with self._state_lock:
            self._state.update(fleet_last_error=message)
            if unreachable:
                self._state["fleet_connected"] = False
        reason = "unreachable" if unreachable else message
        if announce and reason != self._last_failure:  # once per outage or reason, not once per retry
            self._log("warning", message if not unreachable else f"{message} (the robot keeps working with its "
                                                                 "local map)")
        self._last_failure = reason

    def state(self) -> dict[str, Any]:
        """What /diagnostics shows: URI, robot, connected, backlog, counts, last push/pull, last error."""
        with self._state_lock:
            return dict(self._state)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
