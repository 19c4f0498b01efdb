"""A robot's fleet link without ROS: a pull becomes part of the live map (matched, saved, never pushed back, never a
session loop closure), saves are pushed, and while the server is down the robot keeps its map, says so once, and
its backlog goes out when the server is back (a Milvus Lite server process, stopped and started)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fleetfactory import fleet_fingerprint, random_map
from liteserver import LiteServer

from dinomix_ros.localization import fleet_sync
from dinomix_ros.localization.fleet_sync import FleetSync
from dinomix_ros.localization.live_map import LiveMap, OutputConfig
from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.maps.fleet.config import FleetConfig
from dinomix_ros.maps.fleet.push import PushLedger, push_backlog
from dinomix_ros.maps.fleet.region import Region
from dinomix_ros.maps.fleet.store import FleetStore
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.sources.posemsg import PoseSample
from dinomix_ros.maps.sources.poses import KeyframeGateConfig
from dinomix_ros.maps.loading import load_map

NS = 1_000_000_000


class Log:
    """The log lines a FleetSync writes, by level."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, level: str, message: str) -> None:
        with self._lock:
            self.lines.append((level, message))

    def count(self, level: str, text: str) -> int:
        with self._lock:
            return sum(1 for lv, m in self.lines if lv == level and text in m)


def _live(fp: dict) -> LiveMap:
    return LiveMap(KeyframeMap.empty(fp), matcher=MatcherConfig(min_similarity=0.9), has_pose_source=True,
                   gate=KeyframeGateConfig(min_distance_m=1.0, min_rotation_deg=0.0),
                   output=OutputConfig(loop_closure_scope="session"))


def _wait(predicate, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_pull_joins_the_live_map_and_saves_are_pushed(tmp_path, rng, monkeypatch) -> None:
    monkeypatch.setattr(fleet_sync, "_SLICE_ROWS", 1)  # a push copies the backlog out in slices: one row each here
    fp = fleet_fingerprint()
    with LiteServer(tmp_path / "fleet.db") as server:
        theirs = random_map(rng, 30, fp)  # another robot's keyframes along x = 0..29 in frame map
        push_backlog(FleetStore(FleetConfig(uri=server.uri), fp), theirs, PushLedger(tmp_path / "r2.json"), "r2")
        live = _live(fp)
        log = Log()
        sync = FleetSync(FleetConfig(uri=server.uri, robot="r1"), fp, log)
        sync.start()
        try:
            ok, message = sync.pull(live, Region("position", (10.0, 0.0), 4.5, "map")).wait(60)
            assert ok and "9 keyframes added" in message, message  # x = 6..14
            assert len(live) == live.index.ntotal == 9 and live.unsaved == 9
            # a pulled keyframe is matched, but it is not this session's: no session loop closure
            outcome = live.process("cam", 100 * NS, theirs.descriptors_f32()[10], None)
            best = outcome.result.best
            assert outcome.result.accepted and best.position[0] == 10.0 and best.camera == "r2:front"
            assert not outcome.publish_loop_closure
            assert sync.pull(live, Region("position", (10.0, 0.0), 4.5, "map")).wait(60)[0]
            assert len(live) == 9  # pulled twice, held once

            live.start_recording()  # this robot records two keyframes of its own, saves, and the save is pushed
            for k, x in enumerate((50.0, 52.0)):
                pose = PoseSample(k * NS, "map", np.array([x, 0.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0]))
                assert live.process("cam", (200 + k) * NS, random_map(rng, 1, fp).descriptors_f32()[0], pose).recorded
            path = tmp_path / "r1.dinomap"
            live.save(path)
            ok, message = sync.push(live, str(path)).wait(60)
            assert ok and "pushed 2 keyframes" in message, message  # the 9 pulled ones are not pushed back
            assert sync.push(live, str(path)).wait(60) == (True, f"fleet push: nothing to push to {sync.store.where}")
            state = sync.state()
            assert (state["fleet_connected"], state["fleet_pushed"], state["fleet_pulled"], state["fleet_backlog"]) == (
                True, 2, 9, 0)
            assert FleetStore(FleetConfig(uri=server.uri), fp).count() == 32
            saved = load_map(path)
            assert sum(s.startswith("fleet:") for s in saved.sources) == 9  # the region is kept for offline use
        finally:
            sync.stop()


def test_a_server_down_keeps_the_backlog_until_it_returns(tmp_path, rng, monkeypatch) -> None:
    monkeypatch.setattr(fleet_sync, "_SLICE_ROWS", 3)  # the backlog (4) is more than one slice
    fp = fleet_fingerprint()
    server = LiteServer(tmp_path / "fleet.db")  # its port is chosen, nothing listens on it yet
    live = _live(fp)
    live.start_recording()
    for k in range(4):
        pose = PoseSample(k * NS, "map", np.array([2.0 * k, 0.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0]))
        live.process("cam", k * NS, random_map(rng, 1, fp).descriptors_f32()[0], pose)
    path = tmp_path / "r1.dinomap"
    live.save(path)
    log = Log()
    sync = FleetSync(FleetConfig(uri=server.uri, robot="r1", retry_period_s=0.5, timeout_s=2.0), fp, log)
    sync.start()
    try:
        ok, message = sync.push(live, str(path)).wait(60)
        assert not ok and "unreachable" in message and "the local map keeps them" in message, message
        ok, message = sync.pull(live, Region.everything()).wait(60)
        assert not ok and "unreachable" in message
        assert len(live) == 4  # the robot keeps its map
        state = sync.state()
        assert (state["fleet_connected"], state["fleet_backlog"]) == (False, 4) and state["fleet_last_error"]
        time.sleep(2.0)  # several retries: the failure is said once per reason, not once per retry
        assert log.count("warning", "unreachable") <= 2, log.lines
        server.start()
        try:
            assert _wait(lambda: sync.state()["fleet_pushed"] == 4), sync.state()
            assert FleetStore(FleetConfig(uri=server.uri), fp).count() == 4
            assert _wait(lambda: sync.state()["fleet_last_error"] == "")
            assert log.count("info", "reachable again") == 1
        finally:
            server.stop()
    finally:
        sync.stop()


@pytest.mark.parametrize("uri", ["http://127.0.0.1:9"])
def test_a_stopped_link_answers_at_once(uri: str) -> None:
    sync = FleetSync(FleetConfig(uri=uri), fleet_fingerprint())
    job = sync.push(_live(fleet_fingerprint()), "/nowhere.dinomap")
    assert job.wait(1.0) == (False, "the fleet link is stopped")
