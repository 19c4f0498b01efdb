"""The worker's path of camera frames, without ROS: decode -> describe -> local features -> pose -> LiveMap.

The node's worker thread takes the frames that wait (one per camera, :class:`~.latest_frames.LatestFrames`) and
hands them here as one batch:

1. :meth:`FramePipeline.decode` decodes each message (``sensor_msgs/Image`` or ``CompressedImage``, duck-typed) and
   stages it for the model (:meth:`~dinomix_ros.model.encoder.Encoder.stage`);
2. :meth:`FramePipeline.describe` describes all frames of the batch in one forward pass;
3. :meth:`FramePipeline.localize` goes on with each frame by itself, with its own stamp: its local features (with
   the camera's newest aligned depth image), the pose source's pose at its stamp, then
   :meth:`~.live_map.LiveMap.process` (search, verify, match, record) with the image's ``header.frame_id`` (its
   camera's extrinsic) and size (its camera_info is fitted to it).

Each frame carries the seconds of each stage (:data:`~.health.STAGES`) for /diagnostics; publishing (the last stage)
is the caller's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinomix_ros.imaging.decode import ImageDecodeError, decode_depth_msg, decode_image_msg
from dinomix_ros.imaging.features import FeatureExtractor, LocalFeatures, to_gray
from dinomix_ros.imaging.preprocess import StagedImage
from dinomix_ros.localization.live_map import FrameOutcome, LiveMap
from dinomix_ros.localization.pose_buffer import PoseBuffer
from dinomix_ros.model.encoder import Encoder
from dinomix_ros.util.stamps import header_stamp_ns

__all__ = ["DEPTH_MAX_GAP_NS", "DecodedFrame", "FramePipeline"]

DEPTH_MAX_GAP_NS = 100_000_000  # a depth image further than this from the color frame's stamp is not used


@dataclass
class DecodedFrame:
    """One camera frame on its way through the worker.

    Attributes:
        camera: its topic.
        stamp_ns: the image stamp (header; receive time when the header has none).
        image: the decoded image (H, W[, C]) as the message holds it, in ``encoding``.
        encoding: ROS encoding of ``image``.
        staged: ``image`` ready for the model (:meth:`~dinomix_ros.model.encoder.Encoder.stage`).
        received_at: monotonic time the camera callback stored the message.
        stages: seconds per stage (:data:`~.health.STAGES`) for /diagnostics.
        frame_id: the message's ``header.frame_id`` (the camera's optical frame), "" when it has none.
    """

    camera: str
    stamp_ns: int
    image: np.ndarray
    encoding: str
    staged: StagedImage
    received_at: float
    stages: dict[str, float] = field(default_factory=dict)
    frame_id: str = ""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image."""
        return int(self.image.shape[1]), int(self.image.shape[0])


class FramePipeline:
    """Camera messages -> :class:`~.live_map.FrameOutcome` (see the module docstring).

    Args:
        encoder: the model.
        poses: the pose source's buffer (read at each frame's stamp when the live map needs a pose).
        extractor: local features for verification and recording; None when the map has none and none are wanted.
        warn: called with one line for what costs a frame only its verification (a bad depth image, no features).
    """

    def __init__(self, encoder: Encoder, poses: PoseBuffer, extractor: FeatureExtractor | None,
                 warn: Callable[[str], None]) -> None:
        self.encoder = encoder
        self.poses = poses
        self.extractor = extractor
        self._warn = warn
        self.depth: dict[str, object] = {}  # camera -> newest aligned depth image message (a subscription sets it)
        self.max_batch = 0  # most frames described in one forward pass (diagnostics)

    def diagnostics(self) -> dict[str, Any]:
        """The model's runtime and the largest batch so far, for /diagnostics."""
        info = self.encoder.describe_info()
        return {"device": info["device"], "backend": info["backend"], "providers": ",".join(info["providers"]),
                "dtype": info["dtype"], "dtype_reason": info["dtype_reason"], "preprocess": info["preprocess"],
                "cuda_graph": info.get("cuda_graph", False), "max_batch": self.max_batch,
                "gpu_memory_mib": self.encoder.gpu_memory_mib(), "model_fingerprint": info["fingerprint"]["id"]}

    def decode(self, camera: str, msg: object, received_at: float, fallback_ns: int) -> DecodedFrame:
        """Decode and stage one message; a header without a stamp gets ``fallback_ns``.

        Raises:
            ImageDecodeError: a bad image (wrong size for its encoding, over the pixel limit, undecodable).
        """
        t0 = time.perf_counter()
        stamp_ns = header_stamp_ns(msg, fallback_ns=fallback_ns)
        image, encoding = decode_image_msg(msg, self.encoder.image.max_pixels)
        t1 = time.perf_counter()
        staged = self.encoder.stage(image, encoding)
        stages = {"decode": t1 - t0, "preprocess": time.perf_counter() - t1}
        header = getattr(msg, "header", None)
        frame_id = str(getattr(header, "frame_id", "") or "")[:256]
        return DecodedFrame(camera, stamp_ns, image, encoding, staged, received_at, stages, frame_id)

    def describe(self, frames: list[DecodedFrame]) -> np.ndarray:
        """(B, D) descriptors of decoded frames in one forward pass; each frame gets the batch's timings."""
        timing: dict[str, float] = {}
        descriptors = self.encoder.describe_staged([f.staged for f in frames], timing)
        self.max_batch = max(self.max_batch, len(frames))
        for frame in frames:
            frame.stages["preprocess"] += timing["preprocess_s"]  # the batch's on-device share
            frame.stages["model"] = timing["model_s"]
        return descriptors

    def localize(self, frame: DecodedFrame, descriptor: np.ndarray, live: LiveMap) -> FrameOutcome:
        """One described frame, as if it had come alone: local features, the pose at its stamp, ``live.process``."""
        t0 = time.perf_counter()
        features = self.features(frame, live)
        t1 = time.perf_counter()
        pose = self.poses.at(frame.stamp_ns) if live.needs_pose else None
        outcome = live.process(frame.camera, frame.stamp_ns, descriptor, pose, features=features,
                               frame_id=frame.frame_id, image_size=frame.size)
        searched = time.perf_counter() - t1
        extracted = t1 - t0 if features is not None else 0.0  # verify: 0 when nothing was extracted or verified
        frame.stages.update(verify=extracted + outcome.verify_s, search=searched - outcome.verify_s)
        return outcome

    def features(self, frame: DecodedFrame, live: LiveMap) -> LocalFeatures | None:
        """The frame's local features, with depths from the camera's newest aligned depth image (if its stamp is
        within :data:`DEPTH_MAX_GAP_NS`); None when nothing needs them or they cannot be computed (the frame then
        verifies nothing)."""
        if self.extractor is None or not (live.verifying or live.recording):
            return None  # nothing would use them (verification off and not recording)
        depth = None
        depth_msg = self.depth.get(frame.camera)
        if depth_msg is not None and abs(header_stamp_ns(depth_msg, fallback_ns=0) - frame.stamp_ns) \
                <= DEPTH_MAX_GAP_NS:
            try:
                depth = decode_depth_msg(depth_msg, self.encoder.image.max_pixels)
            except ImageDecodeError as exc:
                self._warn(f"{frame.camera}: depth image ignored: {exc}")
        try:
            return self.extractor.extract(to_gray(frame.image, frame.encoding), depth)
        except (ValueError, ImageDecodeError) as exc:  # an odd encoding or depth format: this frame goes unverified
            self._warn(f"{frame.camera}: no local features: {exc}")
            return None
