"""Map by service: record a first pass from a replayed bag, save, reload, replay again and relocalize."""

from __future__ import annotations

import numpy as np
import pytest
from bagfactory import photo_frames, write_camera_bag
from geometry_msgs.msg import PoseWithCovarianceStamped
from rosutil import NodeProcess, RosClient, next_domain_id, replay_bag, stamp_ns
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger

from dinomix_ros.maps.manifest import read_manifest
from dinomix_ros.ros.conversions import matches_to_array
from dinomix_ros.maps.loading import load_map

NODE = "/dinomix_localizer"


def _pairs_of_frames(n_places: int) -> list[np.ndarray]:
    """Each place twice: a photo, then the same view with sensor noise (the robot moved 0.2 m, too little for a
    keyframe), so every second frame must relocalize to the keyframe just before it."""
    rng = np.random.default_rng(4)
    frames = []
    for base in photo_frames(n_places, size=(96, 72), step=3):
        frames += [base, np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)]
    return frames


@pytest.fixture
def first_pass_bag(tmp_path):
    # 1 m/s, images at 5 Hz (0.2 m apart), odometry at 50 Hz; a keyframe every 0.4 m -> the even frames
    return write_camera_bag(tmp_path / "first_pass", storage="mcap", frames=_pairs_of_frames(6), image_rate_hz=5.0,
                            image_format="rgb8", pose_kind="odometry", pose_topic="/odom")


@pytest.mark.parametrize("index", ["exact", "hnsw"])
def test_record_save_reload_relocalize(tmp_path, first_pass_bag, index: str) -> None:
    domain = next_domain_id()
    map_path = tmp_path / "maps" / "corridor.dinomap"
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(map_path), "map.create_if_missing": True, "map.index": index,
        "pose.topic": "/odom", "pose.type": "odometry", "recording.min_distance_m": 0.3,
        "recording.min_rotation_deg": 0.0, "matching.min_similarity": 0.9, "output.loop_closure_scope": "all",
        "output.pose_prior_mode": "continuous",
        # 96x72 frames with sensor noise: too small for local features; this test is about recording and reloading
        # by appearance (verification: test_node_verification.py)
        "verification.enabled": False})
    client = RosClient(domain)
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        priors = client.collect(PoseWithCovarianceStamped, f"{NODE}/pose_prior")
        loops = client.collect(Float64MultiArray, f"{NODE}/loop_closure")

        def answered(_topic: str, stamp: int):
            return lambda: any(stamp_ns(m) == stamp for _, m in matches)

        started = client.call(Trigger, f"{NODE}/start_recording")
        assert started.success, started.message
        assert "map has 0" in started.message
        first = replay_bag(client, first_pass_bag.path, after_image=answered)
        assert len(first) == 12
        stopped = client.call(Trigger, f"{NODE}/stop_recording")
        assert stopped.success and "6 keyframes added" in stopped.message, stopped.message
        saved = client.call(Trigger, f"{NODE}/save_map")
        assert saved.success and f"saved 6 keyframes to {map_path}" in saved.message, saved.message
        assert read_manifest(map_path)["count"] == 6

        stored = load_map(map_path)
        kf_stamps = stored.stamps_ns
        np.testing.assert_array_equal(kf_stamps, first_pass_bag.image_stamps_ns[0::2])  # the even frames
        assert set(stored.frame_ids) == {"odom"}
        np.testing.assert_allclose(stored.positions, first_pass_bag.expected_positions(kf_stamps), atol=0.03)

        reloaded = client.call(Trigger, f"{NODE}/load_map")
        assert reloaded.success and "loaded 6 keyframes" in reloaded.message, reloaded.message
        if index == "hnsw":  # the approximate index was saved with the map and is reused, not rebuilt
            assert node.wait_for_log("using the stored faiss_hnsw_ip index of the map (6 rows)", timeout=5), node.log
        for received in (matches, priors, loops):
            received.clear()
        second = replay_bag(client, first_pass_bag.path, after_image=answered)
        client.spin_until(lambda: len(priors) >= 12 and len(loops) >= 12, 10.0)
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]

    by_stamp = {stamp_ns(m): matches_to_array(m) for _, m in matches}
    for i, (_, stamp) in enumerate(second):
        cands = by_stamp[stamp]
        best = cands[0]
        best_stamp = int(best["stamp_sec"]) * 1_000_000_000 + int(best["stamp_nanosec"])
        expected = first_pass_bag.image_stamps_ns[i - i % 2]  # itself, or the keyframe 0.2 m before it
        assert best_stamp == expected, f"frame {i} matched keyframe @ {best_stamp}, expected @ {expected}"
        assert best["similarity"] > (0.999 if i % 2 == 0 else 0.95), (i, best["similarity"])
        assert best["accepted"] == 1 and list(cands["rank"]) == list(range(len(cands)))
    # pose priors: one per accepted match, stamped with the image, in the odometry frame, never zero covariance
    assert sorted(stamp_ns(m) for _, m in priors) == sorted(s for _, s in second)
    truth = {s: first_pass_bag.expected_positions(np.array([s]))[0] for _, s in second}
    for _, prior in priors:
        assert prior.header.frame_id == "odom"
        p = prior.pose.pose.position
        assert np.linalg.norm(np.array([p.x, p.y, p.z]) - truth[stamp_ns(prior)]) < 0.25
        cov = np.array(prior.pose.covariance).reshape(6, 6)
        assert np.all(np.diag(cov) > 0) and np.allclose(cov, cov.T)
    # loop closures: [t_query, t_match] in seconds, as LIO-SAM reads them
    pairs = {round(m.data[0], 6): m.data[1] for _, m in loops}
    for i, (_, stamp) in enumerate(second):
        expected = first_pass_bag.image_stamps_ns[i - i % 2] / 1e9
        assert pairs[round(stamp / 1e9, 6)] == pytest.approx(expected, abs=1e-6)


def test_self_map_mode_reports_loop_closures_on_the_second_lap(tmp_path) -> None:
    """self_map: the node records its own run and matches each frame against its past (recent frames excluded)."""
    rng = np.random.default_rng(9)
    lap = photo_frames(5, size=(96, 72), step=5)
    second = [np.clip(f + rng.normal(0, 4, f.shape), 0, 255).astype(np.uint8) for f in lap]
    bag = write_camera_bag(tmp_path / "two_laps", storage="sqlite3", frames=lap + second, image_rate_hz=1.0,
                           image_format="jpeg", image_topics=("/camera/image_raw/compressed",), pose_kind=None)
    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "mode": "self_map", "cameras.topics": ["/camera/image_raw/compressed"],
        "recording.max_interval_s": 0.5, "matching.exclude_recent_s": 3.0, "matching.min_similarity": 0.9,
        "verification.enabled": False})  # loops by appearance here; verified loops: test_node_verification.py
    client = RosClient(domain)
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        loops = client.collect(Float64MultiArray, f"{NODE}/loop_closure")
        sent = replay_bag(client, bag.path,
                          after_image=lambda _t, s: lambda: any(stamp_ns(m) == s for _, m in matches))
        client.spin_until(lambda: len(loops) >= 5, 10.0)
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    stamps = [s for _, s in sent]
    # first lap: nothing older than 3 s is similar enough; second lap: each frame closes a loop with its first visit
    expected = {round(stamps[5 + i] / 1e9, 6): stamps[i] / 1e9 for i in range(5)}
    got = {round(m.data[0], 6): m.data[1] for _, m in loops}
    assert got.keys() == expected.keys(), f"loop closures at {sorted(got)}, expected {sorted(expected)}"
    for t_query, t_match in got.items():
        assert t_match == pytest.approx(expected[t_query], abs=1e-6)
