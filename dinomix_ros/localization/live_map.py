"""The live map: what a robot does with each described camera frame, without ROS.

:class:`LiveMap` owns the keyframe map, its search index and the matcher, and keeps map and index in step (index row
``i`` is map row ``i``, always). For each frame (:meth:`LiveMap.process`) it

1. restarts the camera's keyframe gate, the match-consistency streak and the pose-prior rate limit when the camera's
   time jumps back by more than :data:`TIME_JUMP_S` (a bag replayed again, a simulator reset);
2. matches the descriptor against the map (gated by the robot's pose when ``matching.gate_radius_m`` is on) and,
   when the map has local features and ``verification.enabled``, verifies the best candidates geometrically with the
   frame's local features and re-ranks them (:mod:`.verification`): then only a verified best is accepted, and its
   pose prior is the current robot's pose (:mod:`.camera_pose`), not the keyframe's. The query camera's intrinsics
   (its camera_info) are fitted to the frame's image size (scaled for a resized image, else not used: one log line
   per camera), its extrinsic comes from the frame's ``header.frame_id`` (:mod:`.extrinsics`), and the keyframe's
   from the camera record it was recorded with (:class:`~dinomix_ros.maps.local_features.CameraRecord`);
3. records the frame as a keyframe while recording, if the camera's gate accepts it: with the pose source's pose
   and frame, geotagged when that frame is UTM (a NavSatFix source); without a pose source, with no pose; with its
   camera's record (frame, extrinsic, image size) and intrinsics, under a new version of the camera's name when
   those changed (:meth:`~dinomix_ros.maps.local_features.KeyframeFeatures.record_name`);
4. decides what to publish: the pose prior (rate-limited forward in time by ``output.pose_prior_min_period_s``)
   and the loop closure (only to keyframes of this run with ``output.loop_closure_scope: session``).

A map loaded with its content check in the background (``map.verify: background``, see
:mod:`dinomix_ros.maps.integrity`) is matched against at once; if the check finds a damaged chunk, the live map stops
matching against it from the next frame on (no candidates, so no pose prior and no loop closure: a damaged map makes
no claims), keeps recording, reports the refusal in :meth:`LiveMap.stats` (``map_check``), and saves only by
appending (the damaged chunk keeps its hashes, so restoring it from a backup repairs the map).

It counts what the node reports: keyframes recorded this session, frames without a pose, keyframes not yet saved.
:meth:`LiveMap.save` writes the map atomically; a failed save loses nothing (every keyframe stays in memory and the
next save writes it). Thread-safe: one lock around the map, the index, the matcher and the counters.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dinomix_ros.imaging.camera import CameraModel, fit_to_image
from dinomix_ros.imaging.features import FeatureConfig, LocalFeatures
from dinomix_ros.localization.camera_pose import (
    CameraMountConfig, RelativePose, VerifiedPriorConfig, relative_base_pose, verified_prior,
)
from dinomix_ros.localization.extrinsics import CameraExtrinsics
from dinomix_ros.localization.matching import Candidate, Matcher, MatcherConfig, MatchResult
from dinomix_ros.localization.relocalization import POSE_PRIOR_MODES
from dinomix_ros.localization.verification import VerificationConfig, verify_candidates, verify_pair
from dinomix_ros.maps.fleet.push import backlog_rows
from dinomix_ros.maps.fleet.records import AddResult, PulledKeyframes
from dinomix_ros.maps.geotags import NO_POSE_FRAME, geotag_columns
from dinomix_ros.maps.index import IndexConfig, PlaceIndex, index_for_map, save_map_with_index
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.local_features import CameraRecord
from dinomix_ros.maps.loading import load_map
from dinomix_ros.maps.sources.posemsg import PoseSample
from dinomix_ros.maps.sources.poses import KeyframeGate, KeyframeGateConfig
from dinomix_ros.settings import check, setting
from dinomix_ros.util.stamps import NS_PER_S, seconds_to_ns

__all__ = ["TIME_JUMP_S", "OutputConfig", "FrameOutcome", "SaveResult", "LiveMap", "open_map"]

_logger = logging.getLogger(__name__)

#: A camera whose stamps go back by more than this many seconds restarts its gate and the match state.
TIME_JUMP_S = 1.0


@dataclass(frozen=True)
class OutputConfig:
    """Which matches become pose priors and loop closures (node parameters ``output.*``; they apply at once)."""

    SETTINGS_GROUP: ClassVar[str] = "output"

    pose_prior_mode: str = setting("on_request", "when ~/pose_prior is published: on_request (the next verified "
                                                 "prior once per ~/relocalize call or relocalization.trigger_topic "
                                                 "message: AMCL, RTAB-Map, cuVSLAM), when_lost (while "
                                                 "relocalization.consumer_topic says the consumer is lost), "
                                                 "continuous (every accepted match: an EKF or a pose graph)",
                                   choices=POSE_PRIOR_MODES)
    pose_prior_min_period_s: float = setting(0.0, "continuous mode: publish ~/pose_prior at most once per this many "
                                                  "seconds (0: every accepted match)", min=0.0, max=86400.0)
    loop_closure_scope: str = setting("session", "publish ~/loop_closure for matches to keyframes recorded in this "
                                                 "run (session) or to any keyframe (all)", choices=("session", "all"))

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class FrameOutcome:
    """What one frame gave: the match result and what to publish.

    Attributes:
        result: candidates, accept/reject decision and pose prior.
        publish_prior: in continuous mode, publish ``result.prior`` (accepted, has a prior, outside the rate limit);
            the other modes of ``output.pose_prior_mode`` decide in :mod:`.relocalization`.
        publish_loop_closure: publish ``[t_query, t_match]`` (accepted and within the loop-closure scope).
        recorded: the frame was added to the map as a keyframe.
        time_jump_s: seconds the camera's time went back (the match state was restarted), else None.
        record_error: why the frame could not be recorded (it still got its match outputs), else None.
        prior_case: how ``result.prior`` was made: "keyframe" (the best keyframe's pose), "rotation" (verified:
            orientation corrected) or "metric" (verified with depth: 6-DoF); see :mod:`.camera_pose`.
        verify_s: seconds spent verifying candidates geometrically (part of :meth:`LiveMap.process`).
        relative: the verified motion from the best keyframe's robot to the robot now (a loop-closure constraint
            for a pose graph), None unless the best candidate was verified with intrinsics.
    """

    result: MatchResult
    publish_prior: bool = False
    publish_loop_closure: bool = False
    recorded: bool = False
    time_jump_s: float | None = None
    record_error: str | None = None
    prior_case: str = "keyframe"
    verify_s: float = 0.0
    relative: RelativePose | None = None


@dataclass(frozen=True)
class SaveResult:
    """A successful save: where, how many keyframes, how long."""

    path: Path
    keyframes: int
    seconds: float


def open_map(path: str, fingerprint: dict[str, Any], *, storage_dtype: str = "float16", create: bool = False,
             metadata: dict[str, Any] | None = None, verify: str = "background") -> KeyframeMap:
    """The map at ``path`` (built by the model with ``fingerprint``), or a new empty one.

    Args:
        path: map directory; "" starts an empty map that is not tied to a directory yet.
        fingerprint: the model in use: a map of another model is refused.
        storage_dtype: descriptor storage of a new map.
        create: start an empty map when ``path`` does not exist (else that is an error).
        metadata: metadata of a new map (name, source).
        verify: when the map's chunks are checked: "background" (started now, the map is usable at once) or
            "full" (before this returns).

    Raises:
        FileNotFoundError: ``path`` does not exist and ``create`` is false.
        MapError: the map cannot be loaded (damaged, newer format, another model).
    """
    if path and Path(path).exists():
        kmap = load_map(path, expected_fingerprint=fingerprint, verify=True if verify == "full" else verify)
        _logger.info("loaded map %s: %d keyframes, frames %s", path, len(kmap), kmap.frames)
        return kmap
    if path and not create:
        raise FileNotFoundError(f"map.path {path} does not exist; build one (`dinomix map build`, or the "
                                "~/start_recording service) or set map.create_if_missing:=true")
    return KeyframeMap.empty(fingerprint, storage_dtype=storage_dtype, metadata=metadata)


class LiveMap:
    """A keyframe map being matched against and recorded into while the robot runs (see the module docstring).

    Args:
        kmap: the map (loaded, or empty for a new one).
        index_config: the kind of search index and where it runs.
        matcher: matching rules (``use_map_calibration`` makes a map's calibrated threshold the min similarity).
        gate: keyframe gate thresholds, one gate per camera.
        output: pose-prior rate limit and loop-closure scope.
        has_pose_source: a pose source is configured: then frames without a pose near their stamp are not recorded
            (counted); without one, keyframes are recorded without a pose (frame ``none``).
        index: the index of ``kmap`` when the caller built it already (e.g. outside a lock); else built here.
        verification: geometric verification rules (on when the map has local features).
        features: the local features recorded with new keyframes: a new, empty map gets a feature store (None:
            it gets none and records no local features; verification stays off for it).
        mount: the camera-to-base extrinsic of cameras without another (``camera_mount.*``).
        prior: the covariance model of verified pose priors.
        extrinsics: the extrinsic of each image frame (None: ``mount`` for every camera).
    """

    def __init__(self, kmap: KeyframeMap, *, index_config: IndexConfig | None = None,
                 matcher: MatcherConfig | None = None, gate: KeyframeGateConfig | None = None,
                 output: OutputConfig | None = None, has_pose_source: bool = False,
                 index: PlaceIndex | None = None, verification: VerificationConfig | None = None,
                 features: FeatureConfig | None = None, mount: CameraMountConfig | None = None,
                 prior: VerifiedPriorConfig | None = None, extrinsics: CameraExtrinsics | None = None) -> None:
        self.verification = verification or VerificationConfig()
        self.features = features
        self.mount = mount or CameraMountConfig()
        self.extrinsics = extrinsics or CameraExtrinsics(self.mount.matrix())
        self.prior_config = prior or VerifiedPriorConfig()
        self._cameras: dict[str, CameraModel] = {}
        self._fits: dict[tuple[str, int, int], CameraModel | None] = {}  # (camera, width, height) -> fitted model
        self._unfit: set[str] = set()  # cameras whose camera_info does not fit their images
        self._no_record_logged: set[str] = set()
        self._verify_ms: deque[float] = deque(maxlen=200)
        self._verify_s = 0.0  # the current frame's verification time
        self.index_config = index_config or IndexConfig()
        self._matcher_config = matcher or MatcherConfig()
        self.gate_config = gate or KeyframeGateConfig()
        self.output = output or OutputConfig()
        self.has_pose_source = has_pose_source
        self._lock = threading.RLock()
        self.recording = False
        self._gates: dict[str, KeyframeGate] = {}
        self._last_stamps: dict[str, int] = {}
        self._last_prior_ns: int | None = None
        self.last_best_similarity = math.nan
        self.counters = {"keyframes_recorded": 0, "frames_without_pose": 0, "frames_without_pose_total": 0,
                         "record_errors": 0, "queries": 0, "accepted": 0, "verified": 0, "verification_rejected": 0,
                         "verification_degenerate": 0}
        self._install(kmap, index)

    # ------------------------------------------------------------------------------------------------ the map

    def _install(self, kmap: KeyframeMap, index: PlaceIndex | None) -> float | None:
        if index is None:
            index = index_for_map(kmap, kind=self.index_config.index, device=self.index_config.search_device)
        if index.ntotal != len(kmap):
            raise ValueError(f"the index holds {index.ntotal} rows but the map {len(kmap)}: build it from this map")
        calibrated = self.map_calibration(kmap)
        if len(kmap) == 0 and kmap.local_features is None and self.features is not None \
                and self.features.max_features > 0:
            kmap.enable_local_features(self.features.type, self.features.max_features)  # a new map: format 2
        if kmap.local_features is None and self.verification.enabled:
            _logger.warning("the map has no local features (map format 1, or built without them): geometric "
                            "verification is OFF for it, loop closures and pose priors come from appearance "
                            "alone; rebuild the map (`dinomix map build`) to verify matches")
        config = self._matcher_config
        if calibrated is not None and config.use_map_calibration:
            config = dataclasses.replace(config, min_similarity=calibrated)
        with self._lock:
            old = getattr(self, "kmap", None)
            if old is not None and old is not kmap and old.integrity is not None:
                old.integrity.close()  # the replaced map's background check stops
            self.kmap = kmap
            self.index = index
            self._matcher_config = config
            self.matcher = Matcher(kmap, index, config)
            self._saved_rows = self._session_start_row = len(kmap)  # rows before: on disk, not "this session"
            self._merged_rows: set[int] = set()  # rows added by merge_keyframes (recorded elsewhere)
            self._frames = set(kmap.frames)
            zones = kmap.utm_zones[kmap.utm_zones > 0]
            self._utm_zone = int(zones[0]) if zones.size else None
            self._gates = {}
            self._last_stamps = {}
            self._last_prior_ns = None
        return calibrated if config.use_map_calibration else None

    @staticmethod
    def map_calibration(kmap: KeyframeMap) -> float | None:
        """The calibrated min similarity a map carries (``dinomix map eval --calibrate``), if valid."""
        value = (kmap.metadata.get("calibration") or {}).get("min_similarity")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and -1.0 <= value <= 1.0:
            return float(value)
        if value is not None:
            _logger.warning("the map's calibration.min_similarity %r is not a similarity in [-1, 1]: ignored", value)
        return None

    def replace_map(self, kmap: KeyframeMap, index: PlaceIndex | None = None) -> float | None:
        """Make ``kmap`` the current map (after ``~/load_map``); returns the calibrated threshold now in use, if any.

        Raises:
            ValueError: unsaved keyframes would be lost (save first), or the index does not fit the map.
        """
        with self._lock:
            if self.unsaved > 0:
                raise ValueError(f"the current map has {self.unsaved} unsaved keyframes: save it first")
        return self._install(kmap, index)

    @property
    def verifying(self) -> bool:
        """Whether candidates are verified: ``verification.enabled`` and the map has local features."""
        return self.verification.enabled and self.kmap.local_features is not None

    def set_verification_config(self, config: VerificationConfig) -> None:
        with self._lock:
            self.verification = config

    def set_camera_model(self, camera: str, model: CameraModel) -> None:
        """The intrinsics of ``camera`` (from its camera_info), fitted to each frame's image size; stored in the map
        with the keyframes it records."""
        with self._lock:
            self._cameras[camera] = model
            self._fits = {k: v for k, v in self._fits.items() if k[0] != camera}
            self._unfit.discard(camera)

    def camera_model(self, camera: str) -> CameraModel | None:
        with self._lock:
            return self._cameras.get(camera)

    def set_mounts(self, mount: CameraMountConfig, fixed: dict[str, np.ndarray]) -> None:
        """New ``camera_mount.*`` and ``cameras.extrinsics`` (parsed), in force from the next frame."""
        with self._lock:
            self.mount = mount
            self.extrinsics.update(mount.matrix(), fixed)

    def _fitted(self, camera: str, size: tuple[int, int] | None) -> CameraModel | None:
        """The camera's intrinsics for a frame of ``size`` (see :func:`~dinomix_ros.imaging.camera.fit_to_image`);
        the log says once per camera and image size when they had to be scaled or do not fit."""
        model = self._cameras.get(camera)
        if model is None or size is None:
            return model
        key = (camera, int(size[0]), int(size[1]))
        if key not in self._fits:
            fitted, how = fit_to_image(model, *key[1:])
            if len(self._fits) > 256:  # bounded: image sizes come from the cameras
                self._fits.clear()
            self._fits[key] = fitted
            if how == "scaled":
                _logger.info("camera %s: camera_info is for %dx%d images, its images are %dx%d: intrinsics scaled "
                             "by %.4g", camera, model.width, model.height, key[1], key[2], key[1] / model.width)
            elif how == "mismatch":
                self._unfit.add(camera)
                _logger.warning("camera %s: camera_info is for %dx%d images but its images are %dx%d, another "
                                "aspect ratio (a crop or ROI the camera_info does not describe?): its frames verify "
                                "without intrinsics (fundamental matrix, keyframe pose priors)", camera, model.width,
                                model.height, key[1], key[2])
        return self._fits[key]

    @property
    def utm_zone(self) -> int | None:
        """The map's UTM zone (GNSS poses are projected into it), None when it has no UTM geotags yet."""
        return self._utm_zone

    @property
    def matcher_config(self) -> MatcherConfig:
        return self._matcher_config

    def set_matcher_config(self, config: MatcherConfig) -> None:
        """New matching rules, in force from the next frame (the consistency streak carries on)."""
        with self._lock:
            self._matcher_config = config
            self.matcher.config = config

    def set_output_config(self, config: OutputConfig) -> None:
        with self._lock:
            self.output = config

    def set_gate_config(self, config: KeyframeGateConfig) -> None:
        """New keyframe gate thresholds; the gates restart (the next frame of each camera is a keyframe)."""
        with self._lock:
            self.gate_config = config
            self._gates = {}

    @property
    def needs_pose(self) -> bool:
        """Whether :meth:`process` uses a pose: while recording, or when matching is gated by position."""
        return self.recording or self._matcher_config.gate_radius_m > 0

    # ------------------------------------------------------------------------------------------------ recording

    def start_recording(self) -> None:
        """Record keyframes from the next frame on (each camera's gate restarts; session counts reset)."""
        with self._lock:
            self._gates = {}
            self.recording = True
            self.counters["keyframes_recorded"] = self.counters["frames_without_pose"] = 0

    @property
    def recording_rule(self) -> str:
        """Which frames become keyframes, in words."""
        return self.gate_config.describe(with_poses=self.has_pose_source)

    def stop_recording(self) -> bool:
        """Stop recording; returns whether it was recording."""
        with self._lock:
            was, self.recording = self.recording, False
            return was

    @property
    def unsaved(self) -> int:
        """Keyframes recorded since the map was loaded or last saved."""
        with self._lock:
            return len(self.kmap) - self._saved_rows

    def __len__(self) -> int:
        with self._lock:
            return len(self.kmap)

    # ------------------------------------------------------------------------------------------------ frames

    def process(self, camera: str, stamp_ns: int, descriptor: np.ndarray,
                pose: PoseSample | None = None, features: LocalFeatures | None = None, *, frame_id: str = "",
                image_size: tuple[int, int] | None = None) -> FrameOutcome:
        """Match one described frame, record it when recording, and decide its outputs.

        Args:
            camera: the camera (its topic).
            stamp_ns: the image stamp.
            descriptor: (D,) unit descriptor.
            pose: the pose source's pose at ``stamp_ns`` (see :attr:`needs_pose`), None when there is none.
            features: the frame's local features (verification, and stored with a recorded keyframe); without
                them a verifying map accepts nothing for this frame.
            frame_id: the image's ``header.frame_id`` (the camera's optical frame: its extrinsic).
            image_size: (width, height) of the image (the camera_info is fitted to it); None: that of ``features``.
        """
        if image_size is None and features is not None and min(features.image_size) > 0:
            image_size = tuple(features.image_size)
        with self._lock:
            jump = self._check_time_jump(camera, stamp_ns)
            hint = (pose.frame_id, pose.position) if pose is not None and pose.frame_id in self._frames else None
            intrinsics = self._fitted(camera, image_size)
            verify = functools.partial(self._verify, intrinsics, features) if self.verifying else None
            self._verify_s = 0.0
            if self.map_damaged:  # no claims from a damaged map (the module docstring)
                result = MatchResult(stamp_ns, camera, [], accepted=False, rejected_by=["map_damaged"])
            else:
                result = self.matcher.query(descriptor, stamp_ns, camera, position_hint=hint, verify=verify)
            case, relative = "keyframe", None
            if result.best is not None and result.best.verified:
                mounts = self.keyframe_mount(result.best), self.query_mount(camera, frame_id)
                relative = relative_base_pose(result.best.verification, *mounts, self.prior_config)
                if result.prior is not None:
                    result.prior, case = verified_prior(result.prior, result.best.verification, *mounts,
                                                        self.prior_config)
            if verify is not None and result.best is not None:
                self.counters["verified" if result.best.verified else "verification_rejected"] += 1
                self.counters["verification_degenerate"] += sum(
                    1 for c in result.candidates if c.verification is not None and c.verification.degenerate)
            session_row = (result.best is not None and result.best.row >= self._session_start_row
                           and result.best.row not in self._merged_rows)
            recorded, error = False, None
            if self.recording:
                try:  # a recording problem never costs the frame its localization outputs
                    recorded = self._maybe_record(camera, stamp_ns, descriptor, pose, features,
                                                  (frame_id, image_size, intrinsics))
                except Exception as exc:  # reported in the outcome and counted; the map is unchanged
                    self.counters["record_errors"] += 1
                    error = f"{type(exc).__name__}: {exc}"
            self.counters["queries"] += 1
            self.last_best_similarity = result.best.similarity if result.best is not None else math.nan
            prior = loop = False
            if result.accepted:
                self.counters["accepted"] += 1
                prior = result.prior is not None and self._prior_due(stamp_ns)
                loop = session_row or self.output.loop_closure_scope == "all"
            return FrameOutcome(result, prior, loop, recorded, jump, error, case, self._verify_s, relative)

    @property
    def map_damaged(self) -> bool:
        """Whether the map's content check found a damaged chunk (matching against it stopped)."""
        integrity = self.kmap.integrity
        return integrity is not None and integrity.failed

    def query_mount(self, camera: str, frame_id: str = "") -> np.ndarray:
        """(4, 4) ``T_base_cam`` of the camera a query frame comes from, by its image's ``frame_id``
        (:class:`~.extrinsics.CameraExtrinsics`: ``cameras.extrinsics``, TF, else ``camera_mount.*``)."""
        return self.extrinsics.mount(frame_id).T

    def keyframe_mount(self, candidate: Candidate) -> np.ndarray:
        """(4, 4) ``T_base_cam`` of the camera that recorded a candidate keyframe: its camera record's; for a map
        written before records existed, ``camera_mount.*`` (logged once per camera)."""
        store = self.kmap.local_features
        record = store.cameras.get(candidate.camera) if store is not None else None
        if record is not None:
            return record.T_base_cam
        if candidate.camera not in self._no_record_logged:
            self._no_record_logged.add(candidate.camera)
            _logger.info("keyframes of camera %s have no camera record (a map written before maps stored them, or "
                         "without local features): their pose priors use camera_mount.*", candidate.camera)
        return self.extrinsics.default

    def _verify(self, query_camera: CameraModel | None, features: LocalFeatures | None,
                cands: list[Candidate]) -> list[Candidate]:
        """The candidates verified against ``features`` and re-ranked (ranks renumbered); timed for diagnostics."""
        t0 = time.perf_counter()
        store = self.kmap.local_features

        def one(cand: Candidate, motion: bool = False):
            if features is None or store is None:
                return None
            # a keyframe without features (a blank wall, or none recorded) verifies as 0 inliers, not as "unknown";
            # its image size (the inlier-spread checks) is its camera record's, when the map has one
            keyframe, record = store.row(cand.row), store.cameras.get(cand.camera)
            if record is not None:
                keyframe = dataclasses.replace(keyframe, image_size=(record.width, record.height))
            return verify_pair(features, keyframe, self.verification, query_camera,
                               store.intrinsics.get(cand.camera), motion=motion)

        # candidates are checked and ranked without their motion; the motion (model selection, refinement,
        # covariance) is estimated for the best one only
        ordered, checks = verify_candidates(cands, one, self.verification, functools.partial(one, motion=True))
        self._verify_s = time.perf_counter() - t0
        self._verify_ms.append(self._verify_s * 1e3)
        return [dataclasses.replace(c, rank=i, verification=v) for i, (c, v) in enumerate(zip(ordered, checks))]

    def _check_time_jump(self, camera: str, stamp_ns: int) -> float | None:
        last = self._last_stamps.get(camera)
        self._last_stamps[camera] = stamp_ns if last is None else max(last, stamp_ns)
        if last is None or stamp_ns >= last - seconds_to_ns(TIME_JUMP_S):
            return None
        self._last_stamps[camera] = stamp_ns
        self._gates.pop(camera, None)
        self.matcher.reset()
        self._last_prior_ns = None
        return (last - stamp_ns) / NS_PER_S

    def _prior_due(self, stamp_ns: int) -> bool:
        """Rate limit, forward in time only (after a reload or a replay, time may start over)."""
        min_period_ns = seconds_to_ns(self.output.pose_prior_min_period_s)
        last = self._last_prior_ns
        if last is not None and 0 <= stamp_ns - last < min_period_ns:
            return False
        self._last_prior_ns = stamp_ns
        return True

    def _maybe_record(self, camera: str, stamp_ns: int, descriptor: np.ndarray, pose: PoseSample | None,
                      features: LocalFeatures | None = None, image: tuple | None = None) -> bool:
        if self.has_pose_source and pose is None:
            self.counters["frames_without_pose"] += 1
            self.counters["frames_without_pose_total"] += 1
            return False
        gate = self._gates.get(camera)
        if gate is None:
            gate = self._gates[camera] = KeyframeGate.from_config(self.gate_config)
        position = orientation = None
        if pose is not None:
            position = pose.position
            orientation = pose.orientation if pose.has_orientation else None
        if not gate.accept(stamp_ns, position, orientation):
            return False
        self._add_keyframe(camera, stamp_ns, descriptor, pose, features, image)
        return True

    def _camera_name(self, camera: str, image: tuple | None) -> str:
        """The camera name a keyframe of ``camera`` is stored under (its record: frame, extrinsic, image size, and
        intrinsics registered in the map); ``camera`` itself for a map without local features or a frame whose image
        size is unknown."""
        store = self.kmap.local_features
        frame_id, size, intrinsics = image if image is not None else ("", None, None)
        if store is None or size is None:
            if store is not None and camera in self._cameras and camera not in store.intrinsics:
                store.intrinsics[camera] = self._cameras[camera]
            return camera
        record = CameraRecord(frame_id, self.extrinsics.mount(frame_id).T, int(size[0]), int(size[1]))
        return store.record_name(camera, record, intrinsics, lambda: set(self.kmap.camera_names))

    def _add_keyframe(self, camera: str, stamp_ns: int, descriptor: np.ndarray, pose: PoseSample | None,
                      features: LocalFeatures | None = None, image: tuple | None = None) -> None:
        """Append one keyframe to the map and its index, which stay in step (caller holds the lock).

        ``image`` is (frame_id, (width, height), fitted intrinsics) of the frame, for its camera record."""
        name = self._camera_name(camera, image)
        frame = pose.frame_id if pose is not None else NO_POSE_FRAME
        columns: dict[str, Any] = {}
        zone = pose.utm_zone if pose is not None and pose.gps is not None else 0
        if zone:
            columns = geotag_columns(pose.gps[None], zone=zone)
        self.kmap.add(descriptor[None], stamps_ns=np.array([stamp_ns], np.int64), cameras=name, frame_ids=frame,
                      positions=None if pose is None else pose.position[None],
                      orientations=None if pose is None or not pose.has_orientation else pose.orientation[None],
                      sources=f"live:{camera}", features=[features] if self.kmap.local_features is not None else None,
                      **columns)
        try:
            self.index.add(descriptor[None].astype(np.float32))
        except Exception as exc:  # the map took the row: rebuild the index from it, never diverge
            _logger.error("index add failed (%s): rebuilding the index from the map's %d rows", exc, len(self.kmap))
            self.index = index_for_map(self.kmap, kind=self.index_config.index,
                                       device=self.index_config.search_device)
            self.matcher.index = self.index
        self._frames.add(frame)
        if zone and self._utm_zone is None:
            self._utm_zone = zone
        self.counters["keyframes_recorded"] += 1

    # ------------------------------------------------------------------------------------------------ fleet

    def merge_keyframes(self, pulled: PulledKeyframes) -> AddResult:
        """Add keyframes recorded elsewhere (a fleet pull) to the map and its index; those it holds already are
        skipped. They are not this session's (no ``session`` loop closures to them) and are saved with the map."""
        with self._lock:
            first = len(self.kmap)
            result = pulled.add_to(self.kmap)
            if len(self.kmap) > first:
                try:
                    self.index.add(np.asarray(self.kmap.descriptors[first:], dtype=np.float32))
                except Exception as exc:  # the map took the rows: rebuild the index from it, never diverge
                    _logger.error("index add failed (%s): rebuilding the index from the map's %d rows", exc,
                                  len(self.kmap))
                    self.index = index_for_map(self.kmap, kind=self.index_config.index,
                                               device=self.index_config.search_device)
                    self.matcher.index = self.index
                self._merged_rows.update(range(first, len(self.kmap)))
                self._frames.update(self.kmap.frame_ids[first:].tolist())
                zones = self.kmap.utm_zones[self.kmap.utm_zones > 0]
                if self._utm_zone is None and zones.size:
                    self._utm_zone = int(zones[0])
            return result

    def fleet_backlog(self, entry: dict[str, Any], max_rows: int) -> tuple[KeyframeMap, int | None, int]:
        """What a fleet push still owes under ledger ``entry`` (see :func:`~dinomix_ros.maps.fleet.push.backlog_rows`):
        a copy of the first ``max_rows`` of those saved keyframes; the largest saved keyframe id (-1: none) when the
        copy holds them all, else None; and how many there are."""
        with self._lock:
            rows = backlog_rows(self.kmap, entry, self._saved_rows)
            through = int(self.kmap.ids[self._saved_rows - 1]) if self._saved_rows else -1
            return (self.kmap.subset(rows[:max_rows]), through if rows.shape[0] <= max_rows else None,
                    int(rows.shape[0]))

    # ------------------------------------------------------------------------------------------------ saving

    def save(self, path: str | Path) -> SaveResult:
        """Save the map atomically to ``path`` (with its approximate index, if any).

        On failure (disk full, permissions, another writer changed the map on disk) the exception propagates, the
        map on disk is the previous one, and every keyframe stays in memory: a later save writes it.
        """
        t0 = time.monotonic()
        with self._lock:  # the map grows only under this lock: the save sees one consistent state
            save_map_with_index(self.kmap, path, self.index)
            self._saved_rows = n = len(self.kmap)
        return SaveResult(Path(path), n, time.monotonic() - t0)

    def stats(self) -> dict[str, Any]:
        """Counts and state for diagnostics."""
        with self._lock:
            return {
                "recording": self.recording,
                "map_keyframes": len(self.kmap),
                "keyframes_unsaved": len(self.kmap) - self._saved_rows,
                "keyframes_recorded": self.counters["keyframes_recorded"],
                "frames_without_pose": self.counters["frames_without_pose_total"],
                "keyframes_not_recorded_errors": self.counters["record_errors"],
                "queries": self.counters["queries"],
                "accepted_matches": self.counters["accepted"],
                "min_similarity": self._matcher_config.min_similarity if self.matcher is not None else math.nan,
                "cameras_intrinsics_unfit": ",".join(sorted(self._unfit)),
                "map_check": "none" if self.kmap.integrity is None else self.kmap.integrity.describe(),
                "map_index": getattr(self.index, "kind", "?"),
                **self._verification_stats(),
            }

    def _verification_stats(self) -> dict[str, Any]:
        """Verification state, verified/rejected counts, candidates rejected for a degenerate configuration of their
        inliers (``verification_degenerate``, counted per candidate) and time per frame (p50/p95 over the last 200
        frames)."""
        ms = np.asarray(self._verify_ms, dtype=float)
        state = "on" if self.verifying else ("off: the map has no local features" if self.verification.enabled
                                             else "off")
        return {"verification": state, "verified_matches": self.counters["verified"],
                "verification_rejected": self.counters["verification_rejected"],
                "verification_degenerate": self.counters["verification_degenerate"],
                "verification_p50_ms": float(np.percentile(ms, 50)) if ms.size else math.nan,
                "verification_p95_ms": float(np.percentile(ms, 95)) if ms.size else math.nan}
