"""The worker's frame path without ROS (dinomix_ros.localization.frame_pipeline): camera messages of several cameras
decoded, described in one forward pass and localized each with its own stamp, exactly as one by one; every stage
timed; bad images refused by decode; local features with an aligned depth image, and a bad depth image costs only
the frame's depth."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from bagfactory import compressed_msg, image_msg
from dinomix_ros.imaging.decode import ImageDecodeError
from dinomix_ros.imaging.features import FeatureConfig, FeatureExtractor
from dinomix_ros.localization.frame_pipeline import FramePipeline
from dinomix_ros.localization.health import STAGES
from dinomix_ros.localization.live_map import LiveMap
from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.localization.pose_buffer import PoseBuffer
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.model.encoder import Encoder, EncoderConfig

DATA = Path(__file__).resolve().parents[1] / "data" / "rtabmap_corridor" / "samples"
NS = 1_000_000_000
T0 = 1_700_000_000 * NS


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.from_random("s", 3, EncoderConfig(device="cpu", dtype="float32"))


def _rgb(i: int) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(DATA / f"{i}.jpg")), cv2.COLOR_BGR2RGB)


def test_a_batch_of_cameras_is_localized_as_each_frame_alone(encoder: Encoder) -> None:
    warnings: list[str] = []
    pipeline = FramePipeline(encoder, PoseBuffer(), None, warnings.append)
    messages = [("/front/image_raw", image_msg(_rgb(1), T0, encoding="bgr8")),
                ("/rear/image_raw/compressed", compressed_msg(_rgb(25), T0 + NS // 10)),
                ("/down/image_raw", image_msg(_rgb(49), 0, encoding="mono8"))]  # no stamp: receive time
    frames = [pipeline.decode(camera, msg, 5.0, fallback_ns=T0 + NS) for camera, msg in messages]
    assert [f.stamp_ns for f in frames] == [T0, T0 + NS // 10, T0 + NS]
    descriptors = pipeline.describe(frames)
    alone = np.stack([encoder.describe_one(f.image, f.encoding) for f in frames])
    np.testing.assert_allclose(descriptors, alone, rtol=0, atol=1e-6)
    assert pipeline.max_batch == 3

    kmap = KeyframeMap.empty(encoder.fingerprint.to_dict())
    kmap.add(alone, stamps_ns=np.arange(3) * NS, cameras="map", frame_ids="map", positions=np.eye(3) * 10.0)
    live = LiveMap(kmap, matcher=MatcherConfig(min_similarity=0.5))
    for row, (frame, descriptor) in enumerate(zip(frames, descriptors)):
        outcome = pipeline.localize(frame, descriptor, live)
        assert (outcome.result.camera, outcome.result.stamp_ns) == (frame.camera, frame.stamp_ns)
        assert outcome.result.best.row == row and outcome.result.accepted
        assert set(frame.stages) == set(STAGES) - {"publish"}  # publishing is the caller's
        assert all(seconds >= 0.0 for seconds in frame.stages.values())
        assert frame.stages["verify"] == 0.0  # no extractor, no verification
    assert warnings == []
    values = pipeline.diagnostics()
    assert values["device"] == "cpu" and values["max_batch"] == 3
    assert values["model_fingerprint"] == encoder.fingerprint.to_dict()["id"]


def test_bad_images_are_refused_by_decode(encoder: Encoder) -> None:
    pipeline = FramePipeline(encoder, PoseBuffer(), None, lambda line: None)
    with pytest.raises(ImageDecodeError):
        pipeline.decode("/cam", image_msg(_rgb(1), T0, truncate=True), 0.0, fallback_ns=T0)
    with pytest.raises(ImageDecodeError):
        pipeline.decode("/cam", compressed_msg(_rgb(1), T0, truncate=True), 0.0, fallback_ns=T0)


def test_local_features_use_an_aligned_depth_image_and_survive_a_bad_one(encoder: Encoder) -> None:
    warnings: list[str] = []
    pipeline = FramePipeline(encoder, PoseBuffer(), FeatureExtractor(FeatureConfig()), warnings.append)
    live = LiveMap(KeyframeMap.empty(encoder.fingerprint.to_dict()), features=FeatureConfig())
    live.start_recording()  # recording with features: the frame's features are wanted
    frame = pipeline.decode("/cam", image_msg(_rgb(1), T0, encoding="bgr8"), 0.0, fallback_ns=T0)
    plain = pipeline.features(frame, live)
    assert plain is not None and len(plain) > 50 and not np.isfinite(plain.depths).any()

    depth_m = np.full(frame.image.shape[:2], 2.5, np.float32)
    depth = image_msg(np.zeros((*depth_m.shape, 3), np.uint8), T0 + 10_000_000, encoding="rgb8")
    depth.encoding, depth.step = "32FC1", depth_m.shape[1] * 4
    depth.data = np.ascontiguousarray(depth_m).view(np.uint8).reshape(-1)
    pipeline.depth["/cam"] = depth  # 10 ms from the frame: aligned
    with_depth = pipeline.features(frame, live)
    assert np.allclose(with_depth.depths[np.isfinite(with_depth.depths)], 2.5)
    assert np.isfinite(with_depth.depths).sum() == len(with_depth) and warnings == []

    far = image_msg(np.zeros((8, 8, 3), np.uint8), T0 + 2 * NS, encoding="rgb8")
    pipeline.depth["/cam"] = far  # two seconds away: not used, not decoded
    assert not np.isfinite(pipeline.features(frame, live).depths).any() and warnings == []

    bad = image_msg(_rgb(1), T0, encoding="rgb8", truncate=True)
    pipeline.depth["/cam"] = bad  # aligned but undecodable: the frame keeps its features, without depth
    kept = pipeline.features(frame, live)
    assert kept is not None and len(kept) == len(plain) and not np.isfinite(kept.depths).any()
    assert len(warnings) == 1 and warnings[0].startswith("/cam: depth image ignored: ")

    live.stop_recording()
    assert live.verifying and pipeline.features(frame, live) is not None  # the map has features: verification
    plain_map = LiveMap(KeyframeMap.empty(encoder.fingerprint.to_dict()))  # no feature store, not recording
    assert pipeline.features(frame, plain_map) is None  # nothing wants them: not even computed
