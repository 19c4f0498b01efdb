"""What /diagnostics says about the inputs, without ROS: camera silence, missing camera_info, a stale pose source,
error counts over a window, and how the health report ranks them."""

from __future__ import annotations

from dinomix_ros.localization.health import ERROR, OK, WARN, HealthMonitor
from dinomix_ros.localization.input_watch import EventWindow, InputHealthConfig, InputWatch
from dinomix_ros.localization.latest_frames import FrameCounts

CONFIG = InputHealthConfig(silence_warn_periods=5.0, silence_error_s=10.0, pose_stale_warn_s=2.0, window_s=10.0)
MS = 1_000_000


def _camera_at_10hz(watch: InputWatch, camera: str, t0: float, n: int) -> float:
    for i in range(n):
        watch.frame(camera, 1000 * MS + i * 100 * MS, t0 + 0.1 * i)
    return t0 + 0.1 * (n - 1)


def test_a_camera_is_a_warning_after_silence_warn_periods_of_its_own_period_and_an_error_later() -> None:
    watch = InputWatch(["/a", "/b"], started_at=100.0)
    last = _camera_at_10hz(watch, "/a", 100.0, 10)
    _camera_at_10hz(watch, "/b", 100.0, 10)
    problems, values = watch.findings(last + 0.3, CONFIG)
    assert problems == [] and abs(values["camera /a period_s"] - 0.1) < 1e-9
    problems, _ = watch.findings(last + 0.6, CONFIG)  # 6 periods of 0.1 s
    assert problems == [(WARN, "camera /a: no frame for 0.6 s (6 periods of 0.1 s)"),
                        (WARN, "camera /b: no frame for 0.6 s (6 periods of 0.1 s)")]
    problems, _ = watch.findings(last + 10.0, CONFIG)
    assert problems[0] == (ERROR, "camera /a: no frame for 10.0 s")


def test_a_camera_that_never_sent_a_frame_counts_from_activation_with_min_period_or_1_s() -> None:
    watch = InputWatch(["/a"], started_at=1000.0)  # monotonic time: activation is the origin, not 0
    assert watch.findings(1004.0, CONFIG)[0] == []
    assert watch.findings(1005.5, CONFIG)[0] == [(WARN, "camera /a: no frame from 5.5 s (6 periods of 1 s)")]
    assert watch.findings(1005.5, CONFIG, min_period_s=2.0)[0] == []  # cameras.min_period_s: 5 x 2 s
    assert watch.findings(1010.0, CONFIG)[0] == [(ERROR, "camera /a: no frame from 10.0 s")]


def test_camera_info_missing_with_verification_is_a_warning_then_an_error() -> None:
    watch = InputWatch(["/a"], started_at=0.0)
    _camera_at_10hz(watch, "/a", 50.0, 3)
    assert watch.findings(50.25, CONFIG)[0] == []  # verification off: camera_info is not needed
    (level, message), = watch.findings(50.25, CONFIG, needs_camera_info=True)[0]
    assert level == WARN and message.startswith("camera /a: no camera_info for 0.2 s with verification on")
    for i in range(120):  # the camera keeps sending frames for 12 s, without camera_info
        watch.frame("/a", 2000 * MS + i * 100 * MS, 50.3 + 0.1 * i)
    (level, message), = watch.findings(62.3, CONFIG, needs_camera_info=True)[0]
    assert level == ERROR and "no camera_info for 12.3 s" in message
    watch.camera_info("/a", 62.4)
    assert watch.findings(62.4, CONFIG, needs_camera_info=True)[0] == []


def test_pose_source_stale_warns_then_errors() -> None:
    watch = InputWatch([], started_at=10.0, pose_source=True)
    assert watch.findings(11.0, CONFIG)[0] == []
    assert watch.findings(12.5, CONFIG)[0] == [(WARN, "pose source: no pose for 2.5 s since activation")]
    watch.pose(13.0)
    assert watch.findings(14.0, CONFIG)[0] == []
    assert watch.findings(16.0, CONFIG)[0] == [(WARN, "pose source: newest pose is 3.0 s old")]
    problems, values = watch.findings(23.0, CONFIG)
    assert problems == [(ERROR, "pose source: newest pose is 10.0 s old")] and values["pose_age_s"] == 10.0
    assert InputWatch([], 0.0, pose_source=False).findings(100.0, CONFIG)[0] == []


def test_event_window_counts_recent_events_apart_from_the_total() -> None:
    window = EventWindow(window_s=10.0)
    window.add("bad_images", 100.0)
    window.add("bad_images", 105.0, 2)
    assert window.recent("bad_images", 106.0) == 3 and window.total("bad_images") == 3
    assert window.recent("bad_images", 112.0) == 2
    assert window.recent("bad_images", 115.5) == 0 and window.total("bad_images") == 3
    assert window.recent("never", 0.0) == 0


def test_the_report_ranks_errors_first_and_expires_bad_images_with_the_window() -> None:
    health = HealthMonitor()
    counters = {"bad_images": 5, "bad_poses": 0, "callback_errors": 0}
    level, message, values = health.report(FrameCounts(10, 0, 10), 10, counters, {"map_keyframes": 3}, {}, True,
                                           recent={"bad_images": 5, "bad_poses": 0, "callback_errors": 0})
    assert (level, message) == (WARN, "5 bad images skipped recently")
    assert values["bad_images"] == 5 and values["bad_images_recent"] == 5
    level, message, values = health.report(FrameCounts(10, 0, 10), 10, counters, {"map_keyframes": 3}, {}, True,
                                           recent={"bad_images": 0, "bad_poses": 0, "callback_errors": 0})
    assert (level, message) == (OK, "ok") and values["bad_images"] == 5 and values["bad_images_recent"] == 0
    level, message, _ = health.report(FrameCounts(10, 0, 10), 10, counters, {"map_keyframes": 3}, {}, True,
                                      recent={"bad_images": 1, "callback_errors": 2},
                                      findings=[(WARN, "camera /a: no frame for 0.6 s"),
                                                (ERROR, "camera /b: no frame for 12.0 s")])
    assert level == ERROR
    assert message == ("camera /b: no frame for 12.0 s (+2 more: 2 callback errors recently (see the log); "
                       "camera /a: no frame for 0.6 s)")
