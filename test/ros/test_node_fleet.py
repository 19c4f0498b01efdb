"""The node with a fleet map (a Milvus Lite server process): it pulls a region at configure, pushes what it records
after a save, pulls around its pose on ~/pull_fleet_map, reports the link in /diagnostics; with the server down it
keeps working on its local map, says so, and the next start pushes the backlog."""

from __future__ import annotations

import numpy as np
import pytest
from bagfactory import Motion, photo_frames, write_camera_bag
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from fleetfactory import random_map
from liteserver import LiteServer
from rosutil import NodeProcess, RosClient, diagnostic_values, next_domain_id, replay_bag, stamp_ns
from sensor_msgs.msg import PointCloud2
from std_srvs.srv import Trigger

from dinomix_ros.maps.fleet.config import FleetConfig
from dinomix_ros.maps.fleet.push import PushLedger, push_backlog
from dinomix_ros.maps.fleet.store import FleetStore
from dinomix_ros.model.checkpoint import ModelSource
from dinomix_ros.maps.loading import load_map

NODE = "/dinomix_localizer"


@pytest.fixture(scope="module")
def fingerprint() -> dict:
    """The node's model (model.random_weights: seeded ViT-S/14)."""
    return ModelSource(random_weights=True).load().fingerprint.to_dict()


def _params(tmp_path, uri: str, **fleet) -> dict:
    return {"model.random_weights": True, "map.path": str(tmp_path / "maps" / "r1.dinomap"),
            "map.create_if_missing": True, "pose.topic": "/odom", "pose.type": "odometry",
            "recording.min_distance_m": 0.4, "recording.min_rotation_deg": 0.0, "verification.enabled": False,
            "diagnostics.period_s": 0.3, "fleet.uri": uri, "fleet.robot": "r1",
            **{f"fleet.{k}": v for k, v in fleet.items()}}


def _record(client: RosClient, bag) -> list:
    matches = client.collect(PointCloud2, f"{NODE}/matches")
    assert client.call(Trigger, f"{NODE}/start_recording").success
    sent = replay_bag(client, bag.path, after_image=lambda _t, s: lambda: any(stamp_ns(m) == s for _, m in matches))
    assert client.call(Trigger, f"{NODE}/stop_recording").success
    return sent


def _fleet_rows(uri: str, fp: dict, robot: str) -> list[dict]:
    from pymilvus import MilvusClient

    store = FleetStore(FleetConfig(uri=uri), fp)
    store.connect()
    client = MilvusClient(uri, dedicated=True)
    rows = client.query(store.collection, filter=f'robot == "{robot}"', output_fields=["keyframe_id", "source", "x"])
    client.close()
    store.close()
    return rows


def test_pull_at_configure_push_after_save_pull_around_the_pose(tmp_path, fingerprint) -> None:
    rng = np.random.default_rng(5)
    with LiteServer(tmp_path / "fleet.db") as server:
        theirs = random_map(rng, 30, fingerprint, camera="/front")  # robot r2: x = 0..29 m in frame map
        push_backlog(FleetStore(FleetConfig(uri=server.uri), fingerprint), theirs, PushLedger(tmp_path / "r2.json"),
                     "r2")
        # this robot drives x = 20 .. 21.5 in frame odom: 4 frames at 2 Hz, 0.5 m apart -> 4 keyframes
        bag = write_camera_bag(tmp_path / "run", frames=photo_frames(4, size=(96, 72)), image_rate_hz=2.0,
                               motion=Motion(origin=(20.0, 0.0, 0.0)), pose_frame_id="map")
        domain = next_domain_id()
        node = NodeProcess.localizer(tmp_path, domain, params=_params(tmp_path, server.uri, pull_center="5,0,map",
                                                                      pull_radius_m=2.2))
        client = RosClient(domain)
        try:
            assert node.wait_for_log("fleet pull of 2.2 m around (5, 0) in frame map: 5 keyframes added", 120), \
                node.log[-3000:]  # x = 3..7
            diagnostics = client.collect(DiagnosticArray, "/diagnostics")
            _record(client, bag)
            saved = client.call(Trigger, f"{NODE}/save_map")
            assert saved.success and "saved 9 keyframes" in saved.message and "pushing to the fleet" in saved.message
            assert node.wait_for_log("pushed 4 keyframes", 120), node.log[-3000:]  # its own 4, not the 5 pulled
            mine = _fleet_rows(server.uri, fingerprint, "r1")
            assert sorted(r["keyframe_id"] for r in mine) == [5, 6, 7, 8]
            assert all(r["source"].startswith("live:") for r in mine)
            pulled = client.call(Trigger, f"{NODE}/pull_fleet_map")  # around the robot's last pose, x ~ 21.6
            last_x = bag.expected_positions(bag.pose_stamps_ns[-1:])[0, 0]
            want = sum(abs(x - last_x) <= 2.2 for x in range(30))
            assert want == 4  # x = 20..23, whichever of the last poses the node saw last
            assert pulled.success and f"{want} keyframes added" in pulled.message, pulled.message
            pushed = client.call(Trigger, f"{NODE}/push_fleet_map")
            assert pushed.success and "nothing to push" in pushed.message, pushed.message
            assert client.spin_until(lambda: diagnostics and diagnostic_values(diagnostics[-1][1]).get(
                "fleet_pulled") == str(5 + want), 30)
            values = diagnostic_values(diagnostics[-1][1])
            assert (values["fleet_connected"], values["fleet_pushed"], values["fleet_backlog"],
                    values["fleet_last_error"]) == ("True", "4", "0", "")
            assert values["fleet_robot"] == "r1" and values["fleet_last_push"].endswith(": 4 keyframes")
        finally:
            client.close()
            assert node.stop() == 0, node.log[-3000:]
    local = load_map(tmp_path / "maps" / "r1.dinomap")  # both regions, saved for offline use (autosave)
    assert sum(s.startswith("fleet:") for s in local.sources) == 5 + 4
    assert set(local.cameras) == {"r2:/front", "/camera/image_raw"}


def test_server_down_the_robot_keeps_working_and_the_next_start_pushes(tmp_path, fingerprint) -> None:
    server = LiteServer(tmp_path / "fleet.db")  # its port is chosen; nothing listens there yet
    bag = write_camera_bag(tmp_path / "run", frames=photo_frames(4, size=(96, 72)), image_rate_hz=2.0)
    domain = next_domain_id()
    params = _params(tmp_path, server.uri, timeout_s=2.0, retry_period_s=60.0)
    node = NodeProcess.localizer(tmp_path, domain, params=params)
    client = RosClient(domain)
    try:
        assert node.wait_for_log("unreachable", 120) and node.wait_for_log("keeps working with its local map", 5), \
            node.log[-3000:]
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        sent = _record(client, bag)
        assert len(sent) == 4
        saved = client.call(Trigger, f"{NODE}/save_map")
        assert saved.success and "saved 4 keyframes" in saved.message
        pushed = client.call(Trigger, f"{NODE}/push_fleet_map")
        assert not pushed.success and "unreachable" in pushed.message and "4 still to push" in pushed.message
        assert client.spin_until(lambda: diagnostics and diagnostic_values(diagnostics[-1][1]).get(
            "fleet_backlog") == "4", 30)
        status = diagnostics[-1][1].status[0]
        assert status.level == DiagnosticStatus.WARN and "fleet: 4 keyframes not pushed" in status.message
        assert diagnostic_values(diagnostics[-1][1])["fleet_connected"] == "False"
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    assert node.log.count("unreachable") <= 3  # said at the outage and per service answer, not per retry

    with server:  # the server is back; the next start pushes what the last run saved
        domain = next_domain_id()
        node = NodeProcess.localizer(tmp_path / "second", domain, params=params)
        try:
            assert node.wait_for_log("pushed 4 keyframes", 120), node.log[-3000:]
            assert sorted(r["keyframe_id"] for r in _fleet_rows(server.uri, fingerprint, "r1")) == [0, 1, 2, 3]
        finally:
            assert node.stop() == 0, node.log[-3000:]
