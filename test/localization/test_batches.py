"""Multi-camera batches: every due camera taken at once, described in one forward pass, each frame then localized
with its own stamp, exactly as one by one."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from dinomix_ros.localization.latest_frames import LatestFrames
from dinomix_ros.localization.live_map import LiveMap
from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.model.encoder import Encoder, EncoderConfig

NS = 1_000_000_000
T0 = 1_700_000_000 * NS


def test_get_ready_takes_every_due_camera_at_once() -> None:
    frames = LatestFrames(["a", "b", "c"])
    frames.put("b", "b0")
    frames.put("a", "a0")
    frames.put("a", "a1")
    stop = threading.Event()
    got = frames.get_ready(stop)
    assert [(camera, item) for camera, item, _ in got] == [("a", "a1"), ("b", "b0")]  # c has nothing waiting
    frames.put("a", "a2")
    frames.put("b", "b1")
    frames.put("c", "c0")
    assert [c for c, _, _ in frames.get_ready(stop, limit=1)] == ["c"]  # served longest ago (never) first
    assert [c for c, _, _ in frames.get_ready(stop)] == ["a", "b"]
    counts = frames.counts()
    assert (counts.received, counts.dropped, counts.taken) == (6, 1, 5)
    threading.Timer(0.2, lambda: (stop.set(), frames.wake())).start()
    assert frames.get_ready(stop) == []  # nothing waiting: returns once stopped


def test_min_period_holds_per_camera() -> None:
    # a period longer than any machine's uptime: a camera never served must still be due at once (monotonic time
    # counts from boot, so "served at 0" would hold every first frame back on a machine booted minutes ago)
    frames = LatestFrames(["a", "b"], min_period_s=lambda: 1e9)
    stop = threading.Event()
    guard = threading.Timer(30.0, lambda: (stop.set(), frames.wake()))  # a regression fails instead of hanging
    guard.daemon = True
    guard.start()
    frames.put("a", 1)
    assert [c for c, _, _ in frames.get_ready(stop)] == ["a"]
    frames.put("a", 2)  # a was served just now: not due for 31 years
    frames.put("b", 3)
    assert [(c, i) for c, i, _ in frames.get_ready(stop)] == [("b", 3)]
    guard.cancel()


class _Clock:
    """A clock the test moves (the node's simulated clock, fed by /clock)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _processed(frames: LatestFrames, clock: _Clock, stamps: list[float], tick: float) -> list[float]:
    """Frames arrive at the clock times ``stamps``; the worker looks every ``tick`` of that clock."""
    stop, taken = threading.Event(), []
    t, end = stamps[0], stamps[-1] + 3.0
    pending = list(stamps)
    while t <= end:
        clock.t = t
        while pending and pending[0] <= t + 1e-9:
            frames.put("cam", pending.pop(0))
        taken += [item for _, item, _ in frames.get_ready(stop, timeout_s=0)]
        t = round(t + tick, 6)
    return taken


def test_min_period_follows_the_given_clock_on_a_schedule_and_restarts_when_it_goes_back() -> None:
    """cameras.min_period_s by the node's clock: the frames processed depend on that clock only (a bag replayed at
    2x its speed, whose simulated clock the worker samples half as often per simulated second, gives the same
    frames), takes follow a schedule (no drift with the worker's timing), and replaying the bag again (the clock
    goes back) starts a new schedule."""
    clock = _Clock()
    frames = LatestFrames(["cam"], min_period_s=lambda: 2.4, clock=clock)
    stamps = [1000.0 + k for k in range(12)]  # a 1 Hz camera
    first = _processed(frames, clock, stamps, tick=0.05)
    # due at 1000 (first), then 1002.4, 1004.8, 1007.2, 1009.6, 1012.0: each time the newest frame waiting
    assert first == [1000.0, 1002.0, 1004.0, 1007.0, 1009.0, 1011.0]
    assert _processed(frames, clock, stamps, tick=0.1) == first  # replayed again, sampled half as often
    # a last frame waiting for a due instant its replay never reached is stale once the bag starts over
    clock.t = 1011.0
    frames.put("cam", 1011.0)
    clock.t = 999.5
    assert frames.get_ready(threading.Event(), timeout_s=0) == [] and frames.counts().dropped >= 1
    assert _processed(frames, clock, stamps, tick=0.1) == first


@pytest.fixture(scope="module")
def camera_frames() -> list[tuple[str, np.ndarray, str]]:
    """Three cameras of different sizes and encodings (real corridor images)."""
    folder = Path(__file__).resolve().parents[1] / "data" / "rtabmap_corridor" / "samples"
    front = cv2.imread(str(folder / "1.jpg"))
    wide = cv2.resize(cv2.imread(str(folder / "25.jpg")), (1280, 720))
    mono = cv2.imread(str(folder / "49.jpg"))[:, :, 1].copy()
    return [("/front/image", front, "bgr8"), ("/wide/image", wide, "bgr8"), ("/down/image", mono, "mono8")]


@pytest.mark.parametrize("preprocess", ["host", "device"])
def test_batch_results_equal_one_by_one(camera_frames, preprocess: str) -> None:
    encoder = Encoder.from_random("s", 5, EncoderConfig(device="cpu", dtype="float32", preprocess=preprocess))
    one_by_one = np.stack([encoder.describe_one(image, enc) for _, image, enc in camera_frames])
    timing: dict[str, float] = {}
    batched = encoder.describe_staged([encoder.stage(image, enc) for _, image, enc in camera_frames], timing)
    np.testing.assert_allclose(batched, one_by_one, rtol=0, atol=1e-6)
    assert set(timing) == {"preprocess_s", "model_s"}

    # The same frames through a live map: every frame with its own camera and stamp, outcomes identical.
    kmap = KeyframeMap.empty(encoder.fingerprint.to_dict())
    kmap.add(one_by_one, stamps_ns=np.arange(3) * NS, cameras="map", frame_ids="map",
             positions=np.eye(3) * 10.0)
    maps = [LiveMap(kmap, matcher=MatcherConfig(min_similarity=0.5))  # not recording: the map is only read
            for _ in range(2)]
    outcomes = []
    for lm, descriptors in zip(maps, (one_by_one, batched)):
        outcomes.append([lm.process(camera, T0 + i * NS // 10, d)
                         for i, ((camera, _, _), d) in enumerate(zip(camera_frames, descriptors))])
    for a, b in zip(*outcomes):
        assert a.result.stamp_ns == b.result.stamp_ns and a.result.camera == b.result.camera
        assert a.result.best.row == b.result.best.row and a.result.accepted == b.result.accepted
        assert a.result.best.similarity == pytest.approx(b.result.best.similarity, abs=1e-6)
        assert (a.publish_prior, a.publish_loop_closure) == (b.publish_prior, b.publish_loop_closure)
    assert [o.result.best.row for o in outcomes[1]] == [0, 1, 2]  # each camera found its own frame
