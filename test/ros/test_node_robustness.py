"""Bad inputs never kill the node; bad configuration fails the configure transition with a clear reason;
overload drops frames instead of queueing them."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.srv import GetState
from rosutil import NodeProcess, RosClient, diagnostic_values, next_domain_id, rss_mib, stamp_ns
from sensor_msgs.msg import CompressedImage, Image, PointCloud2

from dinomix_ros.model.encoder import Encoder, EncoderConfig
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.storage import save_map
from dinomix_ros.maps.loading import load_map

NODE = "/dinomix_localizer"
RAW, COMPRESSED = "/camera/image_raw", "/camera/image_raw/compressed"


def _small_map(path, seed: int = 0, n: int = 3):
    encoder = Encoder.from_random("vits14", seed, EncoderConfig(device="cpu", dtype="float32"))
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(n)]
    kmap = KeyframeMap.empty(encoder.fingerprint.to_dict())
    kmap.add(encoder.describe(images, "rgb8"), stamps_ns=np.arange(1, n + 1, dtype=np.int64) * 10**9,
             cameras="cam", frame_ids="map", positions=np.c_[np.arange(n), np.zeros(n), np.zeros(n)].astype(float))
    return save_map(kmap, path)


def _image(stamp_s: int, h: int = 48, w: int = 64, encoding: str = "rgb8", step: int | None = None,
           data: bytes | None = None) -> Image:
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=0, step=w * 3 if step is None else step)
    if data is None:
        data = np.random.default_rng(stamp_s).integers(0, 255, h * w * 3, dtype=np.uint8).tobytes()
    msg.data = data
    msg.header.stamp.sec = stamp_s
    msg.header.frame_id = "camera"
    return msg


def _compressed(stamp_s: int, data: bytes) -> CompressedImage:
    msg = CompressedImage(format="jpeg", data=data)
    msg.header.stamp.sec = stamp_s
    return msg


def test_bad_images_are_skipped_counted_and_the_node_keeps_running(tmp_path) -> None:
    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(_small_map(tmp_path / "m.dinomap")),
        "cameras.topics": [RAW, COMPRESSED], "diagnostics.period_s": 0.2,
        # this test is about bad images: cameras silent between them are no problem here (test_node_health.py)
        "diagnostics.silence_warn_periods": 1e5, "diagnostics.silence_error_s": 3600.0})
    client = RosClient(domain)
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        raw, compressed = client.publisher(Image, RAW), client.publisher(CompressedImage, COMPRESSED)
        client.wait_for_subscribers(raw)
        client.wait_for_subscribers(compressed)
        good = _image(100)
        ok, jpeg = cv2.imencode(".jpg", np.zeros((48, 64, 3), np.uint8))
        bad = [
            (raw, _image(101, step=64 * 3 - 1)),  # step shorter than a row
            (raw, _image(102, data=bytes(64 * 3 * 47))),  # truncated: one row missing
            (raw, _image(103, encoding="32FC1", step=64 * 4)),  # unknown encoding
            (compressed, _compressed(104, jpeg.tobytes()[: len(jpeg) // 2])),  # corrupt (truncated) JPEG
            (compressed, _compressed(105, b"")),  # empty
        ]

        def bad_count() -> int:
            return int(diagnostic_values(diagnostics[-1][1])["bad_images"]) if diagnostics else -1

        for i, (pub, msg) in enumerate(bad, start=1):
            pub.publish(msg)
            assert client.spin_until(lambda i=i: bad_count() >= i, 20.0), f"bad image {i} not counted"
        raw.publish(good)
        assert client.spin_until(lambda: any(stamp_ns(m) == 100 * 10**9 for _, m in matches), 20.0)
        client.spin_for(0.5)
        status = diagnostics[-1][1].status[0]
        assert node.alive()
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    assert bad_count() == 5 and len(matches) == 1
    assert status.level == b"\x01" and status.message == "5 bad images skipped recently"
    assert "bad image skipped" in node.log and "step 191 is smaller than one row" in node.log


def test_empty_map_gives_empty_matches_and_a_warning(tmp_path) -> None:
    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, params={"model.random_weights": True, "diagnostics.period_s": 0.2})
    client = RosClient(domain)
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        raw = client.publisher(Image, RAW)
        client.wait_for_subscribers(raw)
        raw.publish(_image(7))
        assert client.spin_until(lambda: len(matches) == 1 and len(diagnostics) > 0, 20.0)
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    assert matches[0][1].width == 0 and stamp_ns(matches[0][1]) == 7 * 10**9
    assert diagnostics[-1][1].status[0].message.startswith("map is empty")  # (+ a camera silent since)
    assert "starting with an EMPTY map" in node.log


@pytest.mark.parametrize(
    "params, reason",
    [
        ({"model.checkpoint": "/nonexistent/dinov2_vitb14_mix.ckpt"},
         "weights file /nonexistent/dinov2_vitb14_mix.ckpt does not exist"),
        ({}, "model.checkpoint is empty: set it to a DINO-Mix .ckpt"),
        ({"model.random_weights": True, "map.path": "/nonexistent/office.dinomap"},
         "map.path /nonexistent/office.dinomap does not exist"),
        ({"model.random_weights": True, "map.path": "WRONG_MAP"}, "fingerprint"),
        ({"model.random_weights": True, "model.dtype": "fp8"}, "dtype must be one of"),
    ],
)
def test_bad_configuration_fails_configure_with_the_reason(tmp_path, params: dict, reason: str) -> None:
    if params.get("map.path") == "WRONG_MAP":  # a map made by another model (seed 1 vs the node's seed 0)
        params = dict(params, **{"map.path": str(_small_map(tmp_path / "other.dinomap", seed=1))})
    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, params=params)
    client = RosClient(domain)
    try:
        assert node.wait_for_log("configuration failed", timeout=60), node.log
        state = client.call(GetState, f"{NODE}/get_state")
        assert node.alive()
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    assert state.current_state.label == "unconfigured"
    assert reason in node.log, node.log[-2000:]


def test_overload_drops_frames_keeps_memory_flat_and_latency_bounded(tmp_path) -> None:
    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(_small_map(tmp_path / "m.dinomap")),
        "diagnostics.period_s": 0.5})
    client = RosClient(domain)
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        raw = client.publisher(Image, RAW)
        client.wait_for_subscribers(raw)
        frames = [_image(1000 + i, h=480, w=640) for i in range(20)]
        sent, rss, t0 = 0, [], time.monotonic()
        while time.monotonic() - t0 < 8.0:  # ~60 Hz of 640x480 rgb8, several times what the CPU node processes
            frames[sent % 20].header.stamp.sec = 1000 + sent
            raw.publish(frames[sent % 20])
            sent += 1
            client.spin_for(1 / 60)
            if sent % 60 == 0:
                rss.append(rss_mib(node))
        last = 1000 + sent - 1
        assert client.spin_until(lambda: any(m.header.stamp.sec == last for _, m in matches), 10.0), \
            "the newest frame was not processed soon after the burst: frames are queueing"
        client.spin_for(1.0)
        values = diagnostic_values(diagnostics[-1][1])
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    processed, dropped = int(values["frames_processed"]), int(values["frames_dropped"])
    received = int(values["frames_received"])
    # best-effort transport may lose frames before the node sees them; what arrives is dropped, not queued
    assert processed + dropped <= received <= min(sent, processed + dropped + 1), values
    assert processed < sent / 2 and dropped > 0, values
    # receive -> published is at most one frame's wait for the worker plus its own processing: no queue
    assert float(values["latency_p95_ms"]) < 3 * float(values["processing_p95_ms"]), values
    assert max(rss[2:]) - rss[1] < 50, f"memory grew under load: {rss} MiB"


def test_bad_poses_are_dropped_and_ctrl_c_autosaves_the_recording(tmp_path) -> None:
    """A position-only pose source (zero quaternions) and a NaN position must not stop recording; SIGINT saves."""
    from nav_msgs.msg import Odometry

    domain = next_domain_id()
    map_path = tmp_path / "run.dinomap"
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(map_path), "map.create_if_missing": True,
        "recording.autostart": True, "recording.min_distance_m": 0.5, "recording.min_rotation_deg": 0.0,
        "pose.topic": "/odom", "pose.type": "odometry", "pose.max_gap_s": 0.5})
    client = RosClient(domain)
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        raw, odom = client.publisher(Image, RAW), client.publisher(Odometry, "/odom", depth=100)
        client.wait_for_subscribers(raw)
        for i in range(5):  # 1 m apart; poses without orientation, and one with a NaN position in between
            for t, x in ((i * 1.0 - 0.05, i - 0.05), (i * 1.0 - 0.02, float("nan")), (i * 1.0 + 0.05, i + 0.05)):
                msg = Odometry()
                msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int((100 + t) * 1e9), 10**9)
                msg.header.frame_id = "map"
                msg.pose.pose.position.x = x
                msg.pose.pose.orientation.w = 0.0  # all-zero quaternion: a position-only source, "unknown"
                odom.publish(msg)
            client.spin_for(0.2)
            raw.publish(_image(100 + i))
            assert client.spin_until(lambda i=i: any(m.header.stamp.sec == 100 + i for _, m in matches), 20.0)
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    assert "pose ignored: pose with a non-finite position" in node.log
    assert "autosave: saved 5 keyframes" in node.log, node.log[-2000:]
    kmap = load_map(map_path)
    np.testing.assert_allclose(kmap.positions[:, 0], np.arange(5), atol=0.06)
    assert np.isnan(kmap.orientations).all() and set(kmap.frame_ids) == {"map"}


def _segments_mapped_by(pid: int) -> set[str]:
    """Fast DDS shared-memory data segments (Fast DDS 3: /dev/shm/fastdds_<id>, Fast DDS 2: fastrtps_<id>) that the
    process ``pid`` has mapped: its own participant's, attributed by the process, so another ROS 2 graph on this
    machine (other tests, a launch beside them) cannot count."""
    import re
    from pathlib import Path

    names = {line.split()[-1].rsplit("/", 1)[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
             if " /dev/shm/" in line}
    return {name for name in names if re.fullmatch(r"fast(dds|rtps)_[0-9a-f]{16}", name)}


@pytest.mark.skipif(not __import__("os").path.isdir("/dev/shm"), reason="needs Linux /dev/shm")
def test_a_stopped_node_leaves_no_shared_memory_behind(tmp_path) -> None:
    """Each Fast DDS participant maps segments in /dev/shm (RAM, 35 MB each with the large-image profile); rclpy's
    LifecycleNode kept its participant alive, so every run of the node left them behind until reboot."""
    from pathlib import Path

    node = NodeProcess.localizer(tmp_path, next_domain_id(), params={"model.random_weights": True})
    assert node.wait_for_log("active: cameras", timeout=120), node.log[-3000:]
    during = _segments_mapped_by(node.proc.pid)
    assert during, "the node maps no shared-memory segment: is the large-image profile in its environment?"
    assert node.stop() == 0, node.log[-3000:]
    left = {name for name in during if (Path("/dev/shm") / name).exists()}
    assert not left, f"{len(left)} of the node's {len(during)} segments are still in /dev/shm: {sorted(left)}"
