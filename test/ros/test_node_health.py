"""/diagnostics says what is wrong, through real nodes: a camera that never sends a frame (WARN, then ERROR), frames
without camera_info while verification is on, a stale pose source, a bad image that stops counting once its window
has passed (back to OK), and the status of an unconfigured node and of one whose configure failed."""

from __future__ import annotations

import time

import cv2
import numpy as np
from corridorbags import CAMERA, corridor_frames, corridor_map  # noqa: F401 (a fixture)
from diagnostic_msgs.msg import DiagnosticArray
from nav_msgs.msg import Odometry
from rosutil import NodeProcess, RosClient, next_domain_id, stamp_ns
from sensor_msgs.msg import CompressedImage, Image, PointCloud2

from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.model.encoder import Encoder, EncoderConfig
from dinomix_ros.maps.storage import save_map

OK, WARN, ERROR = b"\x00", b"\x01", b"\x02"


def _status(diagnostics: list, name: str):
    """The newest status of the node ``name``, else None."""
    for _, msg in reversed(diagnostics):
        for status in msg.status:
            if status.name.startswith(f"{name}:"):
                return status
    return None


def _wait_status(client: RosClient, diagnostics: list, name: str, predicate, timeout: float = 60.0):
    """Spin until a status of ``name`` published from now on satisfies ``predicate``; returns it."""
    since, found = len(diagnostics), []

    def check() -> bool:
        for _, msg in diagnostics[since:]:
            found.extend(s for s in msg.status if s.name.startswith(f"{name}:") and predicate(s))
        return bool(found)

    assert client.spin_until(check, timeout), _status(diagnostics, name)
    return found[0]


def test_status_while_unconfigured_and_after_a_failed_configure(tmp_path) -> None:
    domain = next_domain_id()
    waiting = NodeProcess.localizer(tmp_path / "a", domain, params={"autostart": False, "diagnostics.period_s": 0.3},
                                    extra_ros_args=["-r", "__node:=waiting"])
    failing = NodeProcess.localizer(tmp_path / "b", domain, params={
        "model.random_weights": True, "map.path": str(tmp_path / "missing.dinomap"), "diagnostics.period_s": 0.3},
        extra_ros_args=["-r", "__node:=failing"])
    client = RosClient(domain)
    try:
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        status = _wait_status(client, diagnostics, "waiting", lambda s: True)
        assert (status.level, status.message) == (WARN, "unconfigured: waiting for the configure transition")
        assert diagnostic_values_of(status)["lifecycle_state"] == "unconfigured"
        assert failing.wait_for_log("configuration failed", timeout=120), failing.log[-3000:]
        status = _wait_status(client, diagnostics, "failing", lambda s: s.level == ERROR)
        assert status.message.startswith(f"configuration failed: map.path {tmp_path / 'missing.dinomap'} does not "
                                         "exist"), status.message
    finally:
        client.close()
        assert waiting.stop() == 0, waiting.log[-3000:]
        assert failing.stop() == 0, failing.log[-3000:]


def diagnostic_values_of(status) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


def _jpeg(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def test_silent_camera_missing_camera_info_and_stale_pose(tmp_path, corridor_map) -> None:  # noqa: F811
    """The corridor map verifies (it has local features): its camera sends frames without camera_info; a second
    camera never sends one; the pose source sends one pose and falls silent."""
    domain = next_domain_id()
    silent = "/cam2/image_raw"
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(corridor_map.map_path), "cameras.topics": [CAMERA, silent],
        "pose.topic": "/odom", "diagnostics.period_s": 0.3, "diagnostics.silence_warn_periods": 3.0,
        "diagnostics.silence_error_s": 8.0, "diagnostics.pose_stale_warn_s": 1.0})
    client = RosClient(domain)
    try:
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        matches = client.collect(PointCloud2, "/dinomix_localizer/matches")
        camera, odom = client.publisher(CompressedImage, CAMERA), client.publisher(Odometry, "/odom")
        assert node.wait_for_log("geometric verification on", timeout=90), node.log[-3000:]
        client.wait_for_subscribers(camera)
        client.wait_for_subscribers(odom)
        pose = Odometry()
        pose.header.frame_id = "odom"
        pose.header.stamp = client.node.get_clock().now().to_msg()
        odom.publish(pose)
        for i, frame in enumerate(corridor_frames(range(41, 45))):
            msg = CompressedImage(format="jpeg", data=_jpeg(frame))
            msg.header.stamp.sec, msg.header.stamp.nanosec = 2000, i * 200_000_000
            camera.publish(msg)
            assert client.spin_until(lambda i=i: any(stamp_ns(m) == 2000 * 10**9 + i * 200_000_000
                                                     for _, m in matches), 30.0)
        warned = _wait_status(client, diagnostics, "dinomix_localizer", lambda s: "no camera_info" in s.message)
        assert warned.level in (WARN, ERROR)
        assert f"camera {CAMERA}: no camera_info for" in warned.message
        problems = (f"camera {silent}: no frame from", "with verification on", "pose source: newest pose is")
        status = _wait_status(client, diagnostics, "dinomix_localizer", lambda s: s.level == ERROR and all(
            p in s.message for p in problems) and float(diagnostic_values_of(s)["pose_age_s"]) >= 8.0, 60.0)
        values = diagnostic_values_of(status)
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    assert status.message.count("(+") == 1  # one status line: the most serious problem, then the others
    assert float(values[f"camera {CAMERA} period_s"]) == 0.2  # from its stamps
    assert values[f"camera {silent} last_frame_age_s"] == "nan"
    assert float(values["pose_age_s"]) >= 8.0


def _small_map(path):
    encoder = Encoder.from_random("vits14", 0, EncoderConfig(device="cpu", dtype="float32"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    kmap = KeyframeMap.empty(encoder.fingerprint.to_dict())
    kmap.add(encoder.describe(images, "rgb8"), stamps_ns=np.arange(1, 4, dtype=np.int64) * 10**9, cameras="cam",
             frame_ids="map", positions=np.zeros((3, 3)))
    return save_map(kmap, path)


def test_a_bad_image_warns_for_the_window_then_the_status_is_ok_again(tmp_path) -> None:
    domain = next_domain_id()
    raw = "/camera/image_raw"
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(_small_map(tmp_path / "m.dinomap")), "cameras.topics": [raw],
        "diagnostics.period_s": 0.3, "diagnostics.window_s": 3.0,
        # a loaded machine may pause this test's publisher for a few seconds: not what this test is about
        "diagnostics.silence_warn_periods": 100.0, "diagnostics.silence_error_s": 120.0})
    client = RosClient(domain)
    try:
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        camera = client.publisher(Image, raw)
        client.wait_for_subscribers(camera)
        rng = np.random.default_rng(1)
        stamp = [100]

        def frame(step: int | None = None) -> Image:
            stamp[0] += 1
            msg = Image(height=48, width=64, encoding="rgb8", is_bigendian=0, step=192 if step is None else step)
            msg.data = rng.integers(0, 255, 48 * 64 * 3, dtype=np.uint8).tobytes()
            msg.header.stamp.sec = stamp[0]
            return msg

        def publish_while(predicate, timeout: float) -> bool:  # a camera at about 5 Hz
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                camera.publish(frame())
                if client.spin_until(predicate, 0.2):
                    return True
            return False

        assert publish_while(lambda: (s := _status(diagnostics, "dinomix_localizer")) is not None and s.level == OK,
                             60.0), _status(diagnostics, "dinomix_localizer")
        camera.publish(frame(step=100))  # step shorter than a row: a bad image (the next frame would replace it)
        warned = _wait_status(client, diagnostics, "dinomix_localizer", lambda s: s.level != OK, 30.0)
        assert (warned.level, warned.message) == (WARN, "1 bad images skipped recently")
        assert publish_while(lambda: _status(diagnostics, "dinomix_localizer").level == OK, 30.0)
        values = diagnostic_values_of(_status(diagnostics, "dinomix_localizer"))
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    assert values["bad_images"] == "1" and values["bad_images_recent"] == "0"
