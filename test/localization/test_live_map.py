"""The live map without ROS: recording, gating, geotags, time jumps, outputs, map and index in step, saving."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from dinomix_ros.localization.health import WARN, HealthMonitor
from dinomix_ros.localization.latest_frames import LatestFrames
from dinomix_ros.localization.live_map import LiveMap, OutputConfig, open_map
from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.maps.geotags import NO_POSE_FRAME
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.sources.geo import latlon_to_utm
from dinomix_ros.maps.sources.posemsg import PoseSample
from dinomix_ros.maps.sources.poses import KeyframeGateConfig
from dinomix_ros.maps.storage import save_map
from dinomix_ros.maps.loading import load_map

DIM = 64
NS = 1_000_000_000
T0 = 1_700_000_000 * NS
FINGERPRINT = {"id": "dmx-test", "architecture": "test", "weights_sha256": "0" * 64, "preprocessing": "p",
               "descriptor_dim": DIM}
UNKNOWN = np.full(4, np.nan)


def unit(seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return x / np.linalg.norm(x)


def pose(x: float, frame: str = "map", stamp: int = 0) -> PoseSample:
    return PoseSample(stamp, frame, np.array([x, 0.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0]))


def live(**kwargs) -> LiveMap:
    kwargs.setdefault("matcher", MatcherConfig(min_similarity=0.9))
    return LiveMap(KeyframeMap.empty(FINGERPRINT), **kwargs)


def test_recording_keeps_map_and_index_in_step_and_counts() -> None:
    lm = live(gate=KeyframeGateConfig(min_distance_m=1.0, min_rotation_deg=0.0), has_pose_source=True)
    lm.start_recording()
    recorded = [lm.process("cam", T0 + k * NS, unit(k), pose(0.4 * k)).recorded for k in range(10)]
    assert recorded == [True, False, False, True, False, False, True, False, False, True]  # every 1.2 m
    assert len(lm) == lm.index.ntotal == 4 and lm.unsaved == 4
    assert lm.process("cam", T0 + 20 * NS, unit(99), None).recorded is False  # a pose source, no pose: not kept
    stats = lm.stats()
    assert stats["keyframes_recorded"] == 4 and stats["frames_without_pose"] == 1 and stats["queries"] == 11
    np.testing.assert_allclose(lm.kmap.positions[:, 0], [0.0, 1.2, 2.4, 3.6])
    # a frame of a recorded place matches its keyframe (row 1) through the index
    outcome = lm.process("cam", T0 + 30 * NS, unit(3), None)
    assert outcome.result.best.row == 1 and outcome.result.accepted


def test_without_a_pose_source_keyframes_have_no_pose() -> None:
    lm = live(gate=KeyframeGateConfig(max_interval_s=1.0))
    lm.start_recording()
    for k in range(5):
        lm.process("cam", T0 + k * NS // 2, unit(k), None)
    assert len(lm) == 3 and set(lm.kmap.frame_ids) == {NO_POSE_FRAME}
    assert np.isnan(lm.kmap.positions).all()


def test_gnss_poses_geotag_keyframes() -> None:
    lm = live(has_pose_source=True)
    lm.start_recording()
    utm = latlon_to_utm(55.705, 13.19)
    fix = PoseSample(T0, "utm", np.array([utm.easting, utm.northing, 0.0]), UNKNOWN,
                     np.array([55.705, 13.19, np.nan]), utm.zone)
    assert lm.process("cam", T0, unit(0), fix).recorded
    kf = lm.kmap.keyframe(0)
    assert kf.frame_id == "utm" and kf.orientation is None and kf.utm_zone == 33 and kf.utm_band == "U"
    assert kf.gps[:2] == pytest.approx((55.705, 13.19)) and math.isnan(kf.gps[2])  # unknown altitude stays unknown
    assert kf.utm == pytest.approx((utm.easting, utm.northing), abs=1e-6)
    assert lm.utm_zone == 33


def test_time_jump_restarts_the_gate_and_the_prior_rate_limit() -> None:
    lm = live(gate=KeyframeGateConfig(min_distance_m=1.0, min_rotation_deg=0.0), has_pose_source=True,
              output=OutputConfig(pose_prior_min_period_s=100.0), matcher=MatcherConfig(min_similarity=-1.0))
    lm.start_recording()
    assert lm.process("cam", T0 + 10 * NS, unit(0), pose(0.0)).recorded
    assert lm.process("cam", T0 + 11 * NS, unit(1), pose(0.1)).time_jump_s is None
    # the bag starts over: without the reset the gate would refuse (older stamp) and the prior stay rate-limited
    outcome = lm.process("cam", T0, unit(0), pose(0.0))
    assert outcome.time_jump_s == pytest.approx(11.0) and outcome.recorded and outcome.publish_prior


def test_outputs_follow_the_rules() -> None:
    lm = live(output=OutputConfig(pose_prior_min_period_s=5.0, loop_closure_scope="session"),
              gate=KeyframeGateConfig(min_distance_m=0.0, min_rotation_deg=0.0, min_interval_s=0.0,
                                      max_interval_s=0.001), has_pose_source=True)
    lm.start_recording()
    lm.process("cam", T0, unit(0), pose(0.0))
    first = lm.process("cam", T0 + NS, unit(0), pose(0.0))
    assert first.result.accepted and first.publish_prior and first.publish_loop_closure
    assert not lm.process("cam", T0 + 2 * NS, unit(0), pose(0.0)).publish_prior  # within 5 s of the last prior
    assert lm.process("cam", T0 + 7 * NS, unit(0), pose(0.0)).publish_prior
    rejected = lm.process("cam", T0 + 8 * NS, unit(123), pose(9.0))
    assert not rejected.result.accepted and not rejected.publish_prior and not rejected.publish_loop_closure


def test_loop_closure_scope_session_ignores_keyframes_loaded_from_disk(tmp_path) -> None:
    kmap = KeyframeMap.empty(FINGERPRINT)
    kmap.add(unit(0)[None], stamps_ns=[T0], cameras="cam", frame_ids="map", positions=[[0.0, 0.0, 0.0]])
    path = save_map(kmap, tmp_path / "m.dinomap")
    for scope, expected in (("session", False), ("all", True)):
        lm = LiveMap(load_map(path), output=OutputConfig(loop_closure_scope=scope))
        outcome = lm.process("cam", T0 + 100 * NS, unit(0), None)
        assert outcome.result.accepted and outcome.publish_loop_closure is expected


def test_map_calibration_becomes_the_threshold(tmp_path) -> None:
    kmap = KeyframeMap.empty(FINGERPRINT, metadata={"calibration": {"min_similarity": 0.8125}})
    assert LiveMap(kmap).matcher_config.min_similarity == 0.8125
    assert LiveMap(kmap, matcher=MatcherConfig(use_map_calibration=False)).matcher_config.min_similarity == 0.5
    bad = KeyframeMap.empty(FINGERPRINT, metadata={"calibration": {"min_similarity": 7}})
    assert LiveMap(bad).matcher_config.min_similarity == 0.5


def test_failed_save_keeps_every_keyframe_and_a_later_save_writes_them(tmp_path) -> None:
    lm = live(gate=KeyframeGateConfig(max_interval_s=0.5))
    lm.start_recording()
    for k in range(3):
        lm.process("cam", T0 + k * NS, unit(k), None)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the map directory should go")
    with pytest.raises(Exception, match="not a directory"):
        lm.save(blocked)
    assert lm.unsaved == 3 and len(lm) == 3
    saved = lm.save(tmp_path / "ok.dinomap")
    assert saved.keyframes == 3 and lm.unsaved == 0
    assert len(load_map(tmp_path / "ok.dinomap")) == 3


def test_replace_map_refuses_to_drop_unsaved_keyframes(tmp_path) -> None:
    lm = live()
    lm.start_recording()
    lm.process("cam", T0, unit(0), None)
    with pytest.raises(ValueError, match="1 unsaved keyframes"):
        lm.replace_map(KeyframeMap.empty(FINGERPRINT))
    lm.save(tmp_path / "a.dinomap")
    lm.replace_map(load_map(tmp_path / "a.dinomap"))
    assert len(lm) == 1 and lm.unsaved == 0


def test_open_map(tmp_path) -> None:
    assert len(open_map("", FINGERPRINT)) == 0
    with pytest.raises(FileNotFoundError, match="map.create_if_missing"):
        open_map(str(tmp_path / "missing.dinomap"), FINGERPRINT)
    assert len(open_map(str(tmp_path / "missing.dinomap"), FINGERPRINT, create=True)) == 0
    assert not os.path.exists(tmp_path / "missing.dinomap")  # created only by the first save


def test_latest_frames_drop_instead_of_queueing() -> None:
    import threading

    frames = LatestFrames(["a", "b"])
    for k in range(3):
        frames.put("a", k)
    frames.put("b", "x")
    frames.put("unknown", 0)
    stop = threading.Event()
    got = [frames.get(stop)[:2], frames.get(stop)[:2]]
    assert sorted(got) == [("a", 2), ("b", "x")]  # only the newest of camera a
    counts = frames.counts()
    assert (counts.received, counts.dropped, counts.taken) == (4, 2, 2)
    stop.set()
    assert frames.get(stop) is None


def test_health_report_levels() -> None:
    health = HealthMonitor()
    health.record(0.2, 0.1)
    from dinomix_ros.localization.latest_frames import FrameCounts

    level, message, values = health.report(FrameCounts(10, 2, 8), 8, {"bad_images": 0}, {"map_keyframes": 0},
                                           {}, empty_map_warns=True)
    assert level == WARN and message == "map is empty"
    assert values["latency_p50_ms"] == pytest.approx(200.0) and values["frames_dropped"] == 2
    level, message, _ = health.report(FrameCounts(10, 2, 8), 8, {"bad_images": 3}, {"map_keyframes": 5}, {}, True)
    assert message == "3 bad images skipped"


def test_stamp_gaps_estimate_lost_frames() -> None:
    from dinomix_ros.localization.health import StampGaps

    rng = np.random.default_rng(0)
    period = NS // 30
    arrived = np.flatnonzero(rng.random(300) > 0.7)  # 70 % lost in transit, from the first frame on
    gaps = StampGaps()
    for k in arrived:
        gaps.add("cam", T0 + int(k) * period + int(rng.integers(-period // 20, period // 20)))  # 5 % jitter
    truly_lost = int(arrived[-1] - arrived[0] + 1 - arrived.size)
    assert gaps.received == arrived.size
    assert abs(gaps.lost - truly_lost) <= 0.05 * truly_lost, (gaps.lost, truly_lost)
    steady = StampGaps()
    for k in range(100):
        steady.add("cam", T0 + k * period)
    steady.add("cam", T0)  # a replay starting over: no loss
    assert steady.lost == 0 and steady.loss_fraction == 0.0


def test_health_report_has_stage_percentiles() -> None:
    from dinomix_ros.localization.health import STAGES
    from dinomix_ros.localization.latest_frames import FrameCounts

    health = HealthMonitor()
    _, _, values = health.report(FrameCounts(), 0, {}, {}, {}, False)
    assert math.isnan(values["stage_model_p50_ms"])  # nothing recorded yet
    for k in range(1, 5):
        health.record(0.5, 0.4, {"decode": 0.001 * k, "model": 0.1 * k, "search": 0.01})  # no verify step
    _, _, values = health.report(FrameCounts(4, 0, 4), 4, {}, {}, {}, False)
    assert [k for k in values if k.startswith("stage_")] == [f"stage_{s}_p{q}_ms" for s in STAGES for q in (50, 95)]
    assert values["stage_model_p50_ms"] == pytest.approx(250.0) and values["stage_decode_p95_ms"] == pytest.approx(3.85)
    assert values["stage_verify_p50_ms"] == 0.0 and values["stage_search_p95_ms"] == pytest.approx(10.0)
