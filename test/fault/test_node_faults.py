"""Node-level faults: failing saves (disk full, read-only file system, another writer), shutdown under failure,
hammered services, image floods, hostile parameters and poses, SIGINT timing. The node must stay up (or exit
cleanly), answer every call, and lose no keyframe."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rosutil import NodeProcess, RosClient, diagnostic_values, next_domain_id, rss_mib
from sensor_msgs.msg import Image, PointCloud2
from std_srvs.srv import Trigger

from dinomix_ros.ros.parameters import PARAMETERS
from dinomix_ros.maps.storage import save_map
from dinomix_ros.maps.loading import load_map

NODE = "/dinomix_localizer"
RAW = "/camera/image_raw"
IS_ROOT = os.geteuid() == 0 and shutil.which("mount") is not None
# every frame a keyframe (no pose source; the time rule fires for every new stamp)
RECORD_ALL = {"model.random_weights": True, "recording.min_distance_m": 0.0, "recording.min_rotation_deg": 0.0,
              "recording.max_interval_s": 0.001, "diagnostics.period_s": 0.2}


def _image(stamp_s: int, h: int = 48, w: int = 64) -> Image:
    msg = Image(height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3)
    msg.data = np.random.default_rng(stamp_s).integers(0, 255, h * w * 3, dtype=np.uint8).tobytes()
    msg.header.stamp.sec = stamp_s
    return msg


class Session:
    """A running localizer and a client; ``record(n)`` feeds n new frames and waits for each one's matches."""

    def __init__(self, tmp_path: Path, params: dict) -> None:
        self.domain = next_domain_id()
        self.node = NodeProcess.localizer(tmp_path, self.domain, params=params)
        self.client = RosClient(self.domain)
        self.matches = self.client.collect(PointCloud2, f"{NODE}/matches")
        self.diagnostics = self.client.collect(DiagnosticArray, "/diagnostics")
        self.raw = self.client.publisher(Image, RAW)
        self.next_stamp = 100
        assert self.node.wait_for_log("active: cameras", timeout=90), self.node.log[-3000:]
        self.client.wait_for_subscribers(self.raw)

    def record(self, n: int) -> None:
        for _ in range(n):
            stamp = self.next_stamp
            self.next_stamp += 1
            self.raw.publish(_image(stamp))
            assert self.client.spin_until(lambda s=stamp: any(m.header.stamp.sec == s for _, m in self.matches),
                                          30.0), f"no matches for frame {stamp}"

    def call(self, service: str) -> Trigger.Response:
        return self.client.call(Trigger, f"{NODE}/{service}", timeout=60.0)

    def set(self, name: str, value: ParameterValue) -> object:
        request = SetParameters.Request(parameters=[Parameter(name=name, value=value)])
        return self.client.call(SetParameters, f"{NODE}/set_parameters", request).results[0]

    def values(self) -> dict[str, str]:
        since = time.monotonic()
        assert self.client.spin_until(lambda: any(t > since for t, _ in self.diagnostics), 10.0)
        return diagnostic_values(self.diagnostics[-1][1])

    def stop(self, close_client: bool = True) -> tuple[int, float]:
        """SIGINT; (exit code, seconds from the signal to the exit)."""
        if close_client:
            self.client.close()
        t0 = time.monotonic()
        code = self.node.stop()
        return code, time.monotonic() - t0


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


@pytest.mark.skipif(not IS_ROOT, reason="mounting a small tmpfs needs root")
def test_failed_saves_keep_every_keyframe_and_a_later_save_writes_them(tmp_path, fault_probe) -> None:
    """Disk full, then read-only, then fine: alternating outcomes (the logger-severity crash), nothing lost."""
    with tmpfs(tmp_path / "disk", "64k") as disk:
        map_path = disk / "run.dinomap"
        s = Session(tmp_path, {**RECORD_ALL, "map.path": str(map_path), "map.create_if_missing": True})
        try:
            assert s.call("start_recording").success
            s.record(12)  # 12 x 4096 float16 = 96 KiB of descriptors: more than the disk holds
            full = s.call("save_map")
            fault_probe("failing save", "disk full (ENOSPC)", crashed=not s.node.alive(),
                        keyframes_lost=0 if "12 unsaved keyframes are kept" in full.message else 12)
            assert not full.success and "No space left on device" in full.message, full.message
            assert "12 unsaved keyframes are kept in memory" in full.message
            _remount(disk, "ro,size=8m")
            read_only = s.call("save_map")
            fault_probe("failing save", "read-only file system (EROFS)", crashed=not s.node.alive())
            assert not read_only.success and "Read-only file system" in read_only.message, read_only.message
            s.record(3)
            _remount(disk, "rw,size=8m")
            ok = s.call("save_map")
            fault_probe("failing save", "save after the cause is gone", crashed=not s.node.alive(),
                        keyframes_lost=15 - (len(load_map(map_path)) if ok.success else 0))
            assert ok.success and "saved 15 keyframes" in ok.message, ok.message
            assert int(s.values()["keyframes_unsaved"]) == 0
        finally:
            code, _ = s.stop()
        assert code == 0, s.node.log[-3000:]
        assert len(load_map(map_path)) == 15


def _append_as_another_writer(map_path: Path, rows: int) -> None:
    """Another process loads the map, appends ``rows`` keyframes and saves it: the node's next save conflicts."""
    other = load_map(map_path)
    x = np.random.default_rng(9).standard_normal((rows, other.descriptor_dim)).astype(np.float32)
    other.add(x / np.linalg.norm(x, axis=1, keepdims=True), stamps_ns=list(range(1, rows + 1)), cameras="other",
              frame_ids="map")
    save_map(other, map_path)


def test_another_writer_conflict_says_what_happened_and_offers_a_way(tmp_path, fault_probe) -> None:
    map_path = tmp_path / "shared.dinomap"
    s = Session(tmp_path, {**RECORD_ALL, "map.path": str(map_path), "map.create_if_missing": True})
    try:
        assert s.call("start_recording").success
        s.record(3)
        assert s.call("save_map").success
        _append_as_another_writer(map_path, 2)  # another process appends to the map behind the node's back
        s.record(4)
        conflict = s.call("save_map")
        fault_probe("failing save", "another writer changed the map", crashed=not s.node.alive())
        assert not conflict.success and "changed on disk" in conflict.message, conflict.message
        assert "4 unsaved keyframes are kept in memory" in conflict.message and "map.path" in conflict.message
        elsewhere = tmp_path / "mine.dinomap"
        assert s.set("map.path", ParameterValue(type=ParameterType.PARAMETER_STRING,
                                                string_value=str(elsewhere))).successful
        saved = s.call("save_map")
        assert saved.success, saved.message
    finally:
        code, _ = s.stop()
    assert code == 0
    assert len(load_map(elsewhere)) == 7  # the node's 3 + 4: nothing lost
    assert len(load_map(map_path)) == 5  # the other writer's map untouched: 3 + its 2


def test_shutdown_with_a_failing_autosave_rescues_the_keyframes(tmp_path, fault_probe) -> None:
    map_path = tmp_path / "run.dinomap"
    ros_home = tmp_path / "ros_home"
    s = Session(tmp_path, {**RECORD_ALL, "map.path": str(map_path), "map.create_if_missing": True})
    try:
        assert s.call("start_recording").success
        s.record(2)
        assert s.call("save_map").success
        s.record(3)
        _append_as_another_writer(map_path, 1)  # a conflicting writer: the autosave to map.path must fail
    finally:
        code, seconds = s.stop()
    rescued = sorted(tmp_path.glob("run.dinomap.rescued-*"))
    fault_probe("shutdown", "autosave fails at SIGINT: rescued beside the map", crashed=code != 0,
                keyframes_lost=5 - (len(load_map(rescued[0])) if rescued else 0))
    assert code == 0, s.node.log[-3000:]
    assert "autosave: save to" in s.node.log and "autosave rescue: saved 5 keyframes" in s.node.log, s.node.log
    assert len(rescued) == 1 and len(load_map(rescued[0])) == 5
    assert not ros_home.exists()


def test_sigint_stops_quickly_saves_first_and_leaves_no_context_errors(tmp_path, fault_probe) -> None:
    map_path = tmp_path / "run.dinomap"
    s = Session(tmp_path, {**RECORD_ALL, "map.path": str(map_path), "map.create_if_missing": True,
                           "recording.autostart": True})
    s.record(4)
    for i in range(30):  # frames still arriving while the signal comes
        s.raw.publish(_image(900 + i))
    code, seconds = s.stop(close_client=False)
    s.client.close()
    fault_probe("shutdown", "SIGINT while frames arrive", crashed=code != 0, hung=seconds >= 2.0,
                keyframes_lost=4 - min(4, len(load_map(map_path))) if map_path.exists() else 4)
    assert code == 0 and seconds < 2.0, (code, seconds, s.node.log[-2000:])
    assert "autosave: saved" in s.node.log
    assert len(load_map(map_path)) >= 4
    assert "context is invalid" not in s.node.log and "Traceback" not in s.node.log, s.node.log[-3000:]


def test_services_hammered_from_several_clients_all_answer(tmp_path, fault_probe) -> None:
    map_path = tmp_path / "run.dinomap"
    s = Session(tmp_path, {**RECORD_ALL, "map.path": str(map_path), "map.create_if_missing": True})
    answers: list[bool] = []
    errors: list[BaseException] = []

    def hammer(seed: int) -> None:
        client = RosClient(s.domain, name=f"hammer_{seed}")
        try:
            rng = np.random.default_rng(seed)
            for _ in range(12):
                name = ["start_recording", "stop_recording", "save_map", "load_map"][rng.integers(4)]
                answers.append(client.call(Trigger, f"{NODE}/{name}", timeout=60.0) is not None)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)
        finally:
            client.close()

    try:
        assert s.call("start_recording").success
        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        s.record(6)  # frames keep coming while the services are hammered
        for t in threads:
            t.join(timeout=300)
        alive = s.node.alive()
        s.call("stop_recording")
        in_memory = int(s.values()["map_keyframes"])
        final = s.call("save_map")
    finally:
        code, _ = s.stop()
    saved = len(load_map(map_path)) if map_path.exists() else 0
    fault_probe("service hammering", "4 clients x 12 random calls while recording", crashed=not alive or code != 0,
                hung=any(t.is_alive() for t in threads), keyframes_lost=in_memory - saved)
    assert not errors and len(answers) == 48 and all(answers), errors
    assert final.success or "map.path" in final.message, final.message
    assert code == 0 and saved == in_memory  # every keyframe the node held is in the saved map


BAD_VALUES = [
    ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=float("nan")),
    ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=float("inf")),
    ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=-float("inf")),
    ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=1e300),
    ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=-1e300),
]


def test_hostile_parameters_are_refused_and_change_nothing(tmp_path, fault_probe) -> None:
    s = Session(tmp_path, {"model.random_weights": True, "diagnostics.period_s": 0.2})
    refused, accepted = 0, []
    try:
        for name, entry in PARAMETERS.items():
            if entry.type is not float or entry.spec.reconfigure:
                continue
            for value in BAD_VALUES:
                result = s.set(name, value)
                refused += not result.successful
                fault_probe("bad parameters", f"{name} = {value.double_value}", crashed=not s.node.alive())
                if result.successful:
                    accepted.append((name, value.double_value))
        wrong_type = s.set("matching.top_k", ParameterValue(type=ParameterType.PARAMETER_STRING, string_value="5"))
        s.record(2)  # still working, with the old values
        alive = s.node.alive()
    finally:
        code, _ = s.stop()
    fault_probe("bad parameters", "a string for an integer", crashed=not alive or code != 0)
    assert refused > 0 and not accepted, accepted
    assert not wrong_type.successful
    assert code == 0


def test_bad_start_up_parameters_fail_configure_without_a_crash(tmp_path, fault_probe) -> None:
    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, params={"model.random_weights": True, "matching.top_k": 0,
                                                           "pose.buffer_s": 1e9})
    try:
        configured = node.wait_for_log("configuration failed", timeout=60)
        alive = node.alive()
    finally:
        code = node.stop()
    fault_probe("bad parameters", "out-of-range values at start-up", crashed=not alive or code != 0)
    assert configured and alive and code == 0, node.log[-3000:]
    assert "matching.top_k" in node.log and "pose.buffer_s" in node.log


def test_image_flood_ten_times_the_processing_rate(tmp_path, fault_probe) -> None:
    s = Session(tmp_path, {"model.random_weights": True, "diagnostics.period_s": 0.5})
    try:
        s.record(1)
        baseline = rss_mib(s.node)
        frames = [_image(5000 + i, h=480, w=640) for i in range(10)]
        sent, t0, peak = 0, time.monotonic(), baseline
        while time.monotonic() - t0 < 6.0:
            msg = frames[sent % 10]
            msg.header.stamp.sec = 5000 + sent
            s.raw.publish(msg)
            sent += 1
            s.client.spin_for(0.005)
            if sent % 50 == 0:
                peak = max(peak, rss_mib(s.node))
        values = s.values()
        alive = s.node.alive()
    finally:
        code, _ = s.stop()
    processed = int(values["frames_processed"])
    fault_probe("image flood", f"{sent} frames of 640x480 in 6 s", crashed=not alive or code != 0)
    assert alive and code == 0
    assert sent >= 10 * max(processed - 1, 1), (sent, processed)  # it really was a flood
    assert peak - baseline < 1024, f"memory grew {peak - baseline:.0f} MiB under the flood"


def test_hostile_poses_are_dropped_and_counted(tmp_path, fault_probe) -> None:
    s = Session(tmp_path, {"model.random_weights": True, "pose.topic": "/odom", "pose.type": "odometry",
                           "diagnostics.period_s": 0.2})
    odom = s.client.publisher(Odometry, "/odom", depth=100)
    kinds = {"nan": float("nan"), "inf": float("inf"), "absurd": 1e300, "ok": 1.0}
    try:
        assert s.client.spin_until(lambda: odom.get_subscription_count() > 0, 30.0)
        s.client.spin_for(0.5)
        for k, x in enumerate(kinds.values()):
            msg = Odometry()
            msg.header.stamp.sec = 100 + k
            msg.header.frame_id = "map"
            msg.pose.pose.position.x = x
            odom.publish(msg)
        assert s.client.spin_until(lambda: bool(s.diagnostics) and int(diagnostic_values(
            s.diagnostics[-1][1]).get("bad_poses", 0)) >= 3, 20.0)
        s.record(1)
        alive = s.node.alive()
    finally:
        code, _ = s.stop()
    for name in ("nan", "inf", "absurd"):
        fault_probe("bad poses", f"odometry with a {name} position", crashed=not alive or code != 0)
    assert alive and code == 0
    assert "pose ignored" in s.node.log
