"""Fault suite, hostile local features and cameras: feature chunks, intrinsics and camera records edited in a
corridor map with VALID checksums and seal (:mod:`hostile_features`), and hostile camera_info messages.

Each kind is refused at load (one line; ``dinomix map info/query`` exit 2 with one error line where they read what is
wrong) or loads and is rejected by geometric verification: the same query that the good map verifies is not accepted
against it. Through a real node: ``~/load_map`` answers success=false with the reason (or loads a map whose claims
are then not verified), hostile camera_info messages are counted in /diagnostics and logged once per camera, and
the node stays alive and keeps publishing /diagnostics. The probes go into the fault table ("hostile input
accepted" counts what got through: it must stay 0)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from hostile_features import CAMERA, ROWS, corridor_image, feature_kinds, make_feature_map
from hostile_maps import random_weights
from rosutil import NodeProcess, RosClient, diagnostic_values, next_domain_id
from sensor_msgs.msg import CameraInfo, CompressedImage, PointCloud2
from std_srvs.srv import Trigger
from test_fault_maps import load_with_timeout, one_line_error, run_all

from dinomix_ros.imaging.features import FeatureConfig, FeatureExtractor, to_gray
from dinomix_ros.localization.live_map import LiveMap
from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.localization.verification import VerificationConfig
from dinomix_ros.maps.errors import MapError
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.manifest import read_manifest
from dinomix_ros.ros.conversions import matches_to_array
from dinomix_ros.maps.loading import load_map

KLASS = "hostile feature chunk"
NODE = "/dinomix_localizer"
QUERY_KINDS = ("every keypoint at (100, 100)", "keypoints at (16383, 16383) outside the 512x384 image",
               "K = 1e308 with equidistant, D = 1e308", "extrinsic not a rotation",
               "random descriptors with empty slots")
QUERIES = (1, 5, 9)  # corridor photos that are keyframes 0, 4, 8 of the map: the good map verifies them


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_feature_map(tmp_path_factory.mktemp("pristine") / "good.dinomap",
                            random_weights().fingerprint.to_dict())


def _verified(kmap: KeyframeMap) -> int:
    """How many of the QUERIES are accepted (verified) against ``kmap``: every keyframe is a candidate."""
    live = LiveMap(kmap, matcher=MatcherConfig(min_similarity=-1.0, top_k=ROWS),
                   verification=VerificationConfig(candidates=ROWS), features=FeatureConfig())
    ex = FeatureExtractor()
    rng = np.random.default_rng(0)
    accepted = 0
    for k, i in enumerate(QUERIES):
        x = rng.standard_normal(kmap.descriptor_dim).astype(np.float32)
        outcome = live.process(CAMERA, (100 + k) * 10**9, x / np.linalg.norm(x),
                               features=ex.extract(to_gray(corridor_image(i), "rgb8")))
        accepted += outcome.result.accepted
    return accepted


def test_hostile_feature_chunks_are_refused_at_load_or_rejected_at_verification(
        pristine: Path, tmp_path: Path, fault_probe) -> None:
    assert _verified(load_map(pristine)) == len(QUERIES)  # the control: the good map verifies them
    query_image = tmp_path / "query.jpg"
    cv2.imwrite(str(query_image), cv2.cvtColor(corridor_image(1), cv2.COLOR_RGB2BGR))
    kinds = feature_kinds()
    assert len(kinds) >= 30
    failures, commands, probes = [], {}, {}
    for i, (name, damage, refusal) in enumerate(kinds):
        work = tmp_path / f"f{i:02d}" / "m.dinomap"
        shutil.copytree(pristine, work)
        damage(work)
        outcome, hung = load_with_timeout(work)
        problems, accepted = [], False
        if hung:
            problems.append("load hung")
        elif refusal is None:
            if not isinstance(outcome, KeyframeMap) or len(outcome) != ROWS:
                problems.append(f"expected to load, got {outcome!r}")
            else:
                accepted = _verified(outcome) > 0
                if accepted:
                    problems.append("a query was accepted against hostile keyframes")
        elif not isinstance(outcome, MapError):
            problems.append(f"expected a MapError, got {outcome!r}")
        elif not re.search(refusal, str(outcome)) or "\n" in str(outcome) or len(str(outcome)) > 1000:
            problems.append(f"message {str(outcome)[:400]!r} does not match {refusal!r} on one short line")
        try:
            read_manifest(work)
            info_fails = False
        except MapError:
            info_fails = True
        probes[name] = (problems, hung, accepted, info_fails, refusal)
        commands[f"info {name}"] = ["map", "info", str(work)]
        if name in QUERY_KINDS:
            commands[f"query {name}"] = ["map", "query", str(work), str(query_image), "--random-weights",
                                         "--device", "cpu", "--quiet"]
    results = run_all(commands)
    for name, (problems, hung, accepted, info_fails, refusal) in probes.items():
        info = results[f"info {name}"]
        hung = hung or info[0] is None
        why = one_line_error(info) if info_fails else (None if info[0] == 0 else f"exit {info[0]}: {info[2][-400:]}")
        if why:
            problems.append(f"map info: {why}")
        if f"query {name}" in results:
            query = results[f"query {name}"]
            hung = hung or query[0] is None
            why = one_line_error(query) if refusal else (None if query[0] == 0 else f"exit {query[0]}")
            if why:
                problems.append(f"map query: {why}")
        crashed = any(r[0] not in (0, 2, None) or "Traceback" in r[2] for k, r in results.items() if k.endswith(name))
        fault_probe(KLASS, name, crashed=crashed, hung=hung, accepted=accepted)
        failures += [f"{name}: {p}" for p in problems]
    assert not failures, "\n".join(failures)


def _jpeg(i: int, stamp_s: int) -> CompressedImage:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(corridor_image(i), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    msg = CompressedImage(format="jpeg", data=buf.tobytes())
    msg.header.stamp.sec = stamp_s
    msg.header.frame_id = "camera_optical_frame"
    return msg


def _info(**fields: object) -> CameraInfo:
    msg = CameraInfo(width=512, height=384, distortion_model="plumb_bob", d=[0.0] * 5,
                     k=[420.0, 0.0, 256.0, 0.0, 420.0, 192.0, 0.0, 0.0, 1.0])
    for key, value in fields.items():
        if key.startswith("roi_"):
            setattr(msg.roi, key[4:], value)
        else:
            setattr(msg, key, value)
    return msg


HOSTILE_CAMERA_INFO = {
    "K = 1e308 with equidistant, D = 1e308": dict(
        k=[1e308, 0.0, 256.0, 0.0, 1e308, 192.0, 0.0, 0.0, 1.0], distortion_model="equidistant", d=[1e308] * 4),
    "K all zero (uncalibrated)": dict(k=[0.0] * 9),
    "K NaN": dict(k=[float("nan")] + [0.0] * 8),
    "negative focal length": dict(k=[-420.0, 0.0, 256.0, 0.0, 420.0, 192.0, 0.0, 0.0, 1.0]),
    "principal point outside": dict(k=[420.0, 0.0, 90000.0, 0.0, 420.0, 192.0, 0.0, 0.0, 1.0]),
    "absurd distortion": dict(d=[1e9, 0.0, 0.0, 0.0, 0.0]),
    "unknown distortion model": dict(distortion_model="double_sphere", d=[0.1] * 6),
    "roi outside the sensor": dict(roi_x_offset=4000, roi_width=100, roi_height=100),
    "binning 1000000": dict(binning_x=1_000_000, binning_y=1_000_000),
    "image size 0": dict(width=0, height=0),
}


def test_a_running_node_refuses_hostile_feature_maps_and_camera_info(
        pristine: Path, tmp_path: Path, fault_probe) -> None:
    map_path = tmp_path / "node.dinomap"
    shutil.copytree(pristine, map_path)
    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(map_path), "cameras.topics": [CAMERA],
        "matching.min_similarity": -1.0, "matching.top_k": ROWS, "verification.candidates": ROWS,
        "output.loop_closure_scope": "all", "diagnostics.period_s": 0.2})
    client = RosClient(domain)
    stamp = [100]
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        image = client.publisher(CompressedImage, CAMERA)
        info = client.publisher(CameraInfo, "/camera/camera_info")
        assert node.wait_for_log("geometric verification on", timeout=90), node.log[-3000:]
        client.wait_for_subscribers(image)
        client.wait_for_subscribers(info)

        def query(i: int) -> bool:
            """Publish corridor photo i; whether its best match was accepted (verified)."""
            stamp[0] += 1
            s = stamp[0]
            image.publish(_jpeg(i, s))
            assert client.spin_until(lambda: any(m.header.stamp.sec == s for _, m in matches), 60.0), node.log[-3000:]
            cands = matches_to_array(next(m for _, m in matches if m.header.stamp.sec == s))
            return bool(len(cands) and cands[0]["accepted"])

        def load() -> Trigger.Response | None:
            try:
                return client.call(Trigger, f"{NODE}/load_map", timeout=60.0)
            except TimeoutError:
                return None

        assert query(1), "the control: the good map verifies a revisit through the node"
        good = map_path.with_name("node.good")
        for name, damage, refusal in feature_kinds():
            map_path.rename(good)
            shutil.copytree(good, map_path)
            damage(map_path)
            answer = load()
            accepted = False
            if answer is not None and refusal is None:
                assert answer.success, (name, answer.message)
                accepted = any(query(i) for i in QUERIES)
                assert not accepted, f"{name}: a hostile keyframe was verified"
            fault_probe(f"{KLASS} (node)", name, crashed=not node.alive(), hung=answer is None, accepted=accepted)
            assert answer is not None and node.alive(), f"{name}: {node.log[-3000:]}"
            if refusal is not None:
                assert not answer.success and "keeping the current map" in answer.message, (name, answer.message)
                assert re.search(refusal, answer.message), (name, answer.message)
            shutil.rmtree(map_path)
            good.rename(map_path)
            if refusal is None:
                assert load().success  # back to the good map
        assert query(5), "still verifying against the good map"

        def bad_count() -> int:
            return int(diagnostic_values(diagnostics[-1][1])["bad_camera_info"]) if diagnostics else -1

        for k, (name, fields) in enumerate(HOSTILE_CAMERA_INFO.items(), start=1):
            info.publish(_info(**fields))
            counted = client.spin_until(lambda n=k: bad_count() >= n, 30.0)
            fault_probe("hostile camera_info (node)", name, crashed=not node.alive(), hung=not counted)
            assert counted and node.alive(), f"{name}: {node.log[-3000:]}"
        assert query(9)  # frames still verified (the hostile camera_info changed nothing)
        since = len(diagnostics)
        assert client.spin_until(lambda: len(diagnostics) > since + 2, 10.0)  # /diagnostics keeps coming
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    assert node.log.count("camera_info ignored") == 1  # logged once per camera, counted every time
    assert bad_count() == len(HOSTILE_CAMERA_INFO)
