"""The localization node: cameras in; place matches, pose priors, loop closures, markers and diagnostics out.

A managed (lifecycle) node. ``autostart`` (default true) configures and activates it at start-up; set it false to
drive the transitions from a lifecycle manager. Transitions:

* configure: check every parameter, load the model (a missing or wrong checkpoint fails here, with the reason in the
  log) and the map (refused if its model fingerprint differs), build the search index, create the publishers and
  services. Returns FAILURE (the node stays unconfigured) on any error.
* activate: subscribe to the cameras and the pose topic, start the worker thread. FAILURE (logged) on bad topics.
* deactivate: unsubscribe, stop the worker. cleanup / shutdown / error: save unsaved keyframes when ``map.autosave``
  is set, then release everything (one ``_release``).

Threading: camera callbacks only store the newest message per camera (O(1), never block) and count what they
replace as dropped; pose callbacks append to a short buffer; one worker thread decodes, describes (the encoder's
low-latency path), matches, records and publishes. The map, its index and the matcher are touched only under one
lock, which the map services take too. Topics, services and parameters: README and config/localize.yaml.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import threading
import time
from collections import deque
from dataclasses import fields
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, State, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image, PointCloud2
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from dinomix_ros.imaging.preprocess import ImageConfig
from dinomix_ros.model.encoder import Encoder, EncoderConfig
from dinomix_ros.util.dtypes import FLOAT_DTYPES
from dinomix_ros.maps.sources.geo import parse_utm_frame, utm_to_latlon
from dinomix_ros.imaging.decode import ImageDecodeError, decode_image_msg
from dinomix_ros.maps.build import NO_POSE_FRAME
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.localization.matching import Matcher, MatcherConfig, MatchResult
from dinomix_ros.model import load_model, random_model
from dinomix_ros.maps.sources.poses import KeyframeGate, KeyframeGateConfig, PoseTrack, PoseTrackError
from dinomix_ros.ros import conversions as conv
from dinomix_ros.ros.pose_sources import POSE_TYPES, pose_from_msg
from dinomix_ros.maps.index import KINDS, index_for_map, save_map

__all__ = ["LocalizerNode", "PARAMETERS", "main"]

# name -> (default, description). The one table of parameters: declared with these descriptions, documented in
# config/localize.yaml and the README (test_packaging checks the yaml against it).
PARAMETERS: dict[str, tuple[object, str]] = {
    "autostart": (True, "configure and activate at start-up; false: wait for lifecycle transitions"),
    "mode": ("localize", "localize: match against the loaded map; self_map: record a map of this run and match "
                         "each frame against the robot's own past (loop closure)"),
    # model
    "model.checkpoint": ("", "DINO-Mix .ckpt, DINOv2 *_pretrain.pth or .safetensors weights (required unless "
                             "model.random_weights)"),
    "model.random_weights": (False, "seeded random weights instead of a checkpoint: tests and demos only, scores "
                                    "are meaningless"),
    "model.variant": ("vits14", "backbone for model.random_weights: vits14, vitb14, vitl14 or vitg14"),
    "model.seed": (0, "seed for model.random_weights"),
    "model.device": ("auto", "auto (CUDA if available, else CPU), cpu or cuda[:N]"),
    "model.dtype": ("float32", "inference precision: float32, float16 or bfloat16 (descriptors are always float32)"),
    "model.cuda_graphs": (True, "replay a captured CUDA graph for each image (CUDA only; lower latency)"),
    # map
    "map.path": ("", "map directory loaded at configure and written by ~/save_map; empty: start with an empty map"),
    "map.create_if_missing": (False, "if map.path does not exist, start with an empty map (to be saved there) "
                                     "instead of failing configuration"),
    "map.autosave": (True, "save keyframes recorded since the last save to map.path when the node shuts down or "
                           "cleans up (so Ctrl-C does not lose a mapping run)"),
    "map.index": ("exact", "search index: exact, hnsw or ivfpq (approximate, for large maps)"),
    "map.search_device": ("auto", "where exact search runs: auto, cpu or cuda"),
    "map.storage_dtype": ("float16", "descriptor storage of new maps: float16 or float32"),
    # cameras
    "cameras.topics": (["/camera/image_raw"], "image topics; a topic ending in /compressed is read as "
                                              "sensor_msgs/CompressedImage, any other as sensor_msgs/Image"),
    "cameras.reliability": ("best_effort", "camera subscription QoS reliability: best_effort (matches camera "
                                           "drivers' sensor-data QoS and reliable publishers) or reliable"),
    "cameras.depth": (1, "camera subscription queue depth (the node keeps only the newest frame anyway)"),
    "cameras.min_period_s": (0.0, "process at most one frame per camera per this many seconds (0: as fast as "
                                  "the model runs)"),
    "cameras.range16": ("full", "how 16-bit images (mono16, bayer*16, rgb16) become 8-bit: full (0..65535) or "
                                "minmax (stretch each image; for 12-bit or thermal cameras)"),
    # pose source
    "pose.topic": ("", "pose source for recording keyframes and for gating; empty: none"),
    "pose.type": ("odometry", "message type of pose.topic: " + ", ".join(POSE_TYPES)),
    "pose.max_gap_s": (0.2, "an image is paired with the pose source only if a pose lies within this many seconds "
                            "of its stamp (raise it to ~1.0 for 1 Hz GNSS)"),
    "pose.buffer_s": (30.0, "how many seconds of poses to keep for pairing with image stamps"),
    # recording (map by service, self_map)
    "recording.autostart": (False, "start recording keyframes at activation (as ~/start_recording does)"),
    "recording.min_distance_m": (0.5, "a new keyframe after moving this far (0: rule off)"),
    "recording.min_rotation_deg": (15.0, "a new keyframe after turning this much (0: rule off)"),
    "recording.min_interval_s": (0.0, "at least this many seconds between keyframes of one camera (0: off)"),
    "recording.max_interval_s": (0.0, "a new keyframe after this many seconds even without motion (0: off)"),
    # matching
    "matching.top_k": (5, "candidates returned per query"),
    "matching.min_similarity": (0.5, "accept only if the best cosine similarity reaches this (-1: off; calibrate "
                                     "with `dinomix map eval`)"),
    "matching.use_map_calibration": (True, "when the map carries a calibrated threshold (`dinomix map eval "
                                           "--calibrate`), use it as matching.min_similarity"),
    "matching.min_margin": (0.0, "accept only if best minus best rival similarity reaches this (0: off)"),
    "matching.margin_neighbour_radius_m": (5.0, "candidates this close to the best are the same place, not rivals"),
    "matching.exclude_recent_s": (0.0, "ignore keyframes captured less than this many seconds from the query "
                                       "(loop closure against the robot's own past; 0: off)"),
    "matching.exclude_recent_count": (0, "ignore the newest N keyframes of the map (0: off)"),
    "matching.consistency_count": (1, "accept only after this many consecutive queries agree (1: off)"),
    "matching.consistency_radius_m": (5.0, "consecutive best matches agree when this close"),
    "matching.consistency_max_rows": (5, "without poses: consecutive best matches agree when this many map rows "
                                         "apart or fewer"),
    "matching.consistency_max_gap_s": (5.0, "a consistency streak breaks after this many seconds without a query"),
    "matching.gate_radius_m": (0.0, "only keyframes within this radius of the pose source's position, when it is "
                                    "in the keyframes' frame (0: off)"),
    "matching.sigma_position_m": (0.5, "pose-prior position std-dev at similarity 1"),
    "matching.sigma_yaw_rad": (0.15, "pose-prior rotation std-dev at similarity 1"),
    "matching.score_sigma_gain": (10.0, "std-devs grow by (1 + gain * (1 - similarity))"),
    # outputs
    "output.pose_prior_min_period_s": (0.0, "publish ~/pose_prior at most once per this many seconds (e.g. 10 "
                                            "when remapped to nav2's /initialpose; 0: every accepted match)"),
    "output.loop_closure_scope": ("session", "publish ~/loop_closure for matches to keyframes recorded in this run "
                                             "(session) or to any keyframe (all)"),
    "output.markers": (True, "publish ~/markers (RViz)"),
    "diagnostics.period_s": (1.0, "period of /diagnostics"),
}

# allowed values and ranges, checked at configure and when a parameter is set at run time
_CHOICES: dict[str, tuple] = {
    "mode": ("localize", "self_map"),
    "model.dtype": FLOAT_DTYPES,
    "map.index": KINDS,
    "map.search_device": ("auto", "cpu", "cuda"),
    "map.storage_dtype": ("float16", "float32"),
    "cameras.reliability": ("best_effort", "reliable"),
    "cameras.range16": ("full", "minmax"),
    "pose.type": tuple(POSE_TYPES),
    "output.loop_closure_scope": ("session", "all"),
}
_NON_NEGATIVE = ("cameras.min_period_s", "pose.max_gap_s", "recording.min_distance_m", "recording.min_rotation_deg",
                 "recording.min_interval_s", "recording.max_interval_s", "output.pose_prior_min_period_s")
_POSITIVE = ("cameras.depth", "pose.buffer_s", "diagnostics.period_s")
_MATCHER_FIELDS = {f.name for f in fields(MatcherConfig)}
_LATENCY_WINDOW = 200
_TIME_JUMP_NS = 1_000_000_000


def check_parameter(name: str, value: object) -> str | None:
    """Why ``value`` is not acceptable for parameter ``name`` (None when it is)."""
    if name in _CHOICES and value not in _CHOICES[name]:
        return f"{name} must be one of {', '.join(map(str, _CHOICES[name]))}, got {value!r}"
    if name in _NON_NEGATIVE and not value >= 0:
        return f"{name} must be >= 0 (0 switches it off), got {value!r}"
    if name in _POSITIVE and not value > 0:
        return f"{name} must be > 0, got {value!r}"
    if name in ("cameras.topics", "pose.topic"):
        from rclpy.validate_topic_name import validate_topic_name

        topics = value if name == "cameras.topics" else ([value] if value else [])
        if name == "cameras.topics" and not topics:
            return "cameras.topics is empty: give at least one image topic"
        for topic in topics:
            try:
                validate_topic_name(topic)
            except Exception as exc:  # noqa: BLE001 - rclpy's InvalidTopicNameException and friends
                return f"{name}: {topic!r} is not a valid topic name ({exc})"
    return None


class _CameraSlot:
    """The newest unprocessed frame of one camera and its counters."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.msg: object | None = None
        self.received_at = 0.0
        self.received = 0
        self.dropped = 0
        self.processed = 0
        self.last_processed_at = 0.0


class LocalizerNode(LifecycleNode):
    """DINO-Mix place recognition as a managed node (see the module docstring)."""

    def __init__(self, node_name: str = "dinomix_localizer", **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        for name, (default, description) in PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=description))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._map_lock = threading.Lock()  # guards kmap, matcher (and its index), gates and recording state
        self._frames = threading.Condition()  # guards the camera slots and the pose buffer
        self._worker: threading.Thread | None = None
        self._worker_stop: threading.Event | None = None
        self.encoder: Encoder | None = None
        self.kmap: KeyframeMap | None = None
        self.matcher: Matcher | None = None
        self._map_frames: set[str] = set()
        self._map_utm_zone: int | None = None
        self._saved_rows = 0
        self._slots: dict[str, _CameraSlot] = {}
        self._subscription_handles: list = []
        self._outputs: dict = {}
        self._service_handles: list = []
        self._diag_timer = None
        self._poses: deque = deque()
        self._pose_frame = ""
        self._gates: dict[str, KeyframeGate] = {}
        self._last_stamps: dict[str, int] = {}
        self._recording = False
        self._recorded_this_session = 0
        self._no_pose_this_session = 0
        self._session_start_row = 0
        self._counters = {"bad_images": 0, "no_pose": 0, "accepted": 0, "queries": 0, "record_errors": 0}
        self._latencies: deque = deque(maxlen=_LATENCY_WINDOW)
        self._last_best = math.nan
        self._last_prior_ns: int | None = None
        self._diag_prev = (time.monotonic(), 0, 0)
        self._cb_sensors = MutuallyExclusiveCallbackGroup()
        self._cb_services = MutuallyExclusiveCallbackGroup()
        self._cb_timer = MutuallyExclusiveCallbackGroup()

    # -------------------------------------------------------------------------------------------------------------
    # parameters

    def _p(self, name: str):  # noqa: ANN202 - the parameter's value
        return self.get_parameter(name).value

    def _matcher_config(self, overrides: dict | None = None) -> MatcherConfig:
        values = {f: self._p(f"matching.{f}") for f in _MATCHER_FIELDS}
        values.update(overrides or {})
        return MatcherConfig(**values)

    def _on_set_parameters(self, params: list) -> SetParametersResult:
        """Every change is validated (all or nothing); matching.*, output.* and cameras.min_period_s apply at once,
        the others at the next configure."""
        for p in params:
            reason = check_parameter(p.name, p.value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        overrides = {p.name.split(".", 1)[1]: p.value for p in params
                     if p.name.startswith("matching.") and p.name.split(".", 1)[1] in _MATCHER_FIELDS}
        if overrides:
            try:
                config = self._matcher_config(overrides)
            except (TypeError, ValueError) as exc:
                return SetParametersResult(successful=False, reason=str(exc))
            with self._map_lock:
                if self.matcher is not None:
                    self.matcher.config = config
        return SetParametersResult(successful=True)

    # -------------------------------------------------------------------------------------------------------------
    # lifecycle

    def on_configure(self, state: State) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as exc:  # noqa: BLE001 - any failure leaves the node unconfigured, with the reason logged
            self.get_logger().error(f"configuration failed: {exc}")
            self._release(save=False)
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        for name in PARAMETERS:
            reason = check_parameter(name, self._p(name))
            if reason:
                raise ValueError(reason)
        matcher_config = self._matcher_config()
        self._gate_config = KeyframeGateConfig(
            min_distance_m=self._p("recording.min_distance_m"),
            min_rotation_deg=self._p("recording.min_rotation_deg"),
            min_interval_s=self._p("recording.min_interval_s"),
            max_interval_s=self._p("recording.max_interval_s"),
        )
        # model: a checkpoint, or random weights only when asked for explicitly
        config = EncoderConfig(device=self._p("model.device"), dtype=self._p("model.dtype"),
                               cuda_graphs=self._p("model.cuda_graphs"))
        if self._p("model.random_weights"):
            self.get_logger().warning("model.random_weights is set: RANDOM weights, similarity scores are meaningless")
            loaded = random_model(self._p("model.variant"), self._p("model.seed"))
        else:
            checkpoint = self._p("model.checkpoint")
            if not checkpoint:
                raise ValueError("model.checkpoint is empty: set it to a DINO-Mix .ckpt (or set "
                                 "model.random_weights:=true for tests and demos)")
            loaded = load_model(checkpoint)
        self.encoder = Encoder(loaded, config, ImageConfig(range16=self._p("cameras.range16")))
        self.encoder.warmup()
        self._install_map(self._load_or_create_map(self._p("map.path")), matcher_config)
        self._recording = self._p("mode") == "self_map" or bool(self._p("recording.autostart"))
        info = self.encoder.describe_info()
        self.get_logger().info(
            f"configured: mode {self._p('mode')}, {info['architecture']} on {info['device']} ({info['dtype']}), "
            f"fingerprint {info['fingerprint']['id']}, map {len(self.kmap)} keyframes, index {self._p('map.index')}")
        self._create_interfaces()

    def _load_or_create_map(self, path_text: str) -> KeyframeMap:
        fingerprint = self.encoder.fingerprint.to_dict()
        if path_text and Path(path_text).exists():
            kmap = KeyframeMap.load(path_text, expected_fingerprint=fingerprint)
            self.get_logger().info(f"loaded map {path_text}: {len(kmap)} keyframes, frames {kmap.frames}")
            return kmap
        if path_text and not self._p("map.create_if_missing") and self._p("mode") == "localize":
            raise FileNotFoundError(f"map.path {path_text} does not exist; build one (`dinomix map build`, or the "
                                    "~/start_recording service) or set map.create_if_missing:=true")
        if self._p("mode") == "localize":
            self.get_logger().warning("starting with an EMPTY map: record one with ~/start_recording, or load one")
        return KeyframeMap.empty(fingerprint, storage_dtype=self._p("map.storage_dtype"),
                                 metadata={"name": Path(path_text).name if path_text else "live",
                                           "source": f"live:{self.get_fully_qualified_name()}"})

    def _install_map(self, kmap: KeyframeMap, config: MatcherConfig, index=None) -> None:  # noqa: ANN001
        """Make ``kmap`` the current map (index built here unless given); applies its calibration if asked."""
        index = index if index is not None else index_for_map(kmap, kind=self._p("map.index"),
                                                              device=self._p("map.search_device"))
        calibrated = (kmap.metadata.get("calibration") or {}).get("min_similarity")
        if self._p("matching.use_map_calibration") and isinstance(calibrated, (int, float)):
            self.get_logger().info(f"using the map's calibrated matching.min_similarity {calibrated:.4f}")
            self.set_parameters([Parameter("matching.min_similarity", value=float(calibrated))])
            config = self._matcher_config({"min_similarity": float(calibrated)})
        with self._map_lock:
            self.kmap = kmap
            self.matcher = Matcher(kmap, index, config)
            # rows before this are not "this session" (loop closures) and are on disk already
            self._session_start_row = self._saved_rows = len(kmap)
            self._map_frames = set(kmap.frames)
            zones = kmap.utm_zones[kmap.utm_zones > 0]
            self._map_utm_zone = int(zones[0]) if zones.size else None
            self._gates = {}
            self._last_stamps = {}
            self._last_prior_ns = None

    def _create_interfaces(self) -> None:
        reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.VOLATILE)
        rare = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self._outputs = {
            "pose_prior": self.create_lifecycle_publisher(PoseWithCovarianceStamped, "~/pose_prior", reliable),
            "matches": self.create_lifecycle_publisher(PointCloud2, "~/matches", reliable),
            # deep queue: loop closures are rare and each one matters to the SLAM back end
            "loop_closure": self.create_lifecycle_publisher(Float64MultiArray, "~/loop_closure", rare),
            "markers": self.create_lifecycle_publisher(MarkerArray, "~/markers", reliable),
            "diagnostics": self.create_lifecycle_publisher(DiagnosticArray, "/diagnostics", reliable),
        }
        group = self._cb_services
        self._service_handles = [
            self.create_service(Trigger, "~/start_recording", self._srv_start_recording, callback_group=group),
            self.create_service(Trigger, "~/stop_recording", self._srv_stop_recording, callback_group=group),
            self.create_service(Trigger, "~/save_map", self._srv_save_map, callback_group=group),
            self.create_service(Trigger, "~/load_map", self._srv_load_map, callback_group=group),
        ]

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # publishers on before the worker can publish
        if result != TransitionCallbackReturn.SUCCESS:
            return result
        try:
            self._activate()
        except Exception as exc:  # noqa: BLE001 - logged here (Humble's rclpy would swallow it), node stays inactive
            self.get_logger().error(f"activation failed: {exc}")
            self._stop_worker()
            super().on_deactivate(state)
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def _activate(self) -> None:
        best_effort = self._p("cameras.reliability") == "best_effort"
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(self._p("cameras.depth")),
                         reliability=ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE)
        with self._frames:
            self._slots = {topic: _CameraSlot(topic) for topic in self._p("cameras.topics")}
            self._poses.clear()
        subscribe = functools.partial(self.create_subscription, callback_group=self._cb_sensors)
        for topic in self._slots:
            msg_type = CompressedImage if topic.rstrip("/").endswith("/compressed") else Image
            self._subscription_handles.append(subscribe(msg_type, topic, functools.partial(self._on_image, topic), qos))
        if self._p("pose.topic"):
            # best effort: connects to reliable and best-effort odometry/GNSS publishers alike
            pose_qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.BEST_EFFORT)
            self._subscription_handles.append(
                subscribe(POSE_TYPES[self._p("pose.type")], self._p("pose.topic"), self._on_pose, pose_qos))
        self._worker_stop = threading.Event()
        self._worker = threading.Thread(target=self._work, args=(self._worker_stop,), name="dinomix-worker",
                                        daemon=True)
        self._worker.start()
        self._diag_timer = self.create_timer(float(self._p("diagnostics.period_s")), self._publish_diagnostics,
                                             callback_group=self._cb_timer)
        self.get_logger().info(f"active: cameras {list(self._slots)}"
                               + (f", pose source {self._p('pose.topic')}" if self._p("pose.topic") else ""))

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._stop_worker()
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self.get_logger().error(f"error in state {state.label}: releasing everything, back to unconfigured")
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _stop_worker(self) -> None:
        if self._worker_stop is not None:
            self._worker_stop.set()  # this worker's own event: a late-exiting worker can never be revived
        with self._frames:
            self._frames.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
            if self._worker.is_alive():
                self.get_logger().error("the worker thread did not stop within 30 s; it will exit after its frame")
            self._worker = None
        for sub in self._subscription_handles:
            self.destroy_subscription(sub)
        self._subscription_handles = []
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = None

    def _release(self, save: bool = True) -> None:
        """Free everything configure/activate made (cleanup, shutdown, error and Ctrl-C come here)."""
        self._stop_worker()
        if save:
            self._autosave()
        for srv in self._service_handles:
            self.destroy_service(srv)
        self._service_handles = []
        for pub in self._outputs.values():
            self.destroy_lifecycle_publisher(pub)
        self._outputs = {}
        with self._map_lock:
            self.matcher = None
            self.kmap = None
            self._recording = False
        self.encoder = None

    def _autosave(self) -> None:
        with self._map_lock:
            unsaved = len(self.kmap) - self._saved_rows if self.kmap is not None else 0
        if unsaved <= 0:
            return
        path = self._p("map.path")
        if not (path and self._p("map.autosave")):
            self.get_logger().warning(f"discarding {unsaved} unsaved keyframes (set map.path and map.autosave, or "
                                      "call ~/save_map before shutting down)")
            return
        ok, message = self._save(path)
        (self.get_logger().info if ok else self.get_logger().error)(f"autosave: {message}")

    # -------------------------------------------------------------------------------------------------------------
    # callbacks: never block

    def _on_image(self, topic: str, msg: object) -> None:
        with self._frames:
            slot = self._slots.get(topic)
            if slot is None:
                return
            if slot.msg is not None:
                slot.dropped += 1
            slot.msg = msg
            slot.received_at = time.monotonic()
            slot.received += 1
            self._frames.notify()

    def _on_pose(self, msg: object) -> None:
        pose_type = self._p("pose.type")
        try:
            # _map_utm_zone is an int read without the map lock on purpose: it only changes with the map
            zone = self._map_utm_zone if pose_type == "navsatfix" else None
            stamp_ns, frame, position, orientation = pose_from_msg(msg, pose_type, zone)
        except ValueError as exc:
            self.get_logger().warning(f"pose ignored: {exc}", throttle_duration_sec=5.0)
            return
        with self._frames:  # short critical section; the worker reads the buffer under the same lock
            self._poses.append((stamp_ns, position, orientation))
            self._pose_frame = frame or self._p("pose.topic")  # an empty header frame: name it after the topic
            horizon = stamp_ns - int(self._p("pose.buffer_s") * 1e9)
            while self._poses and self._poses[0][0] < horizon:
                self._poses.popleft()

    # -------------------------------------------------------------------------------------------------------------
    # worker

    def _next_frame(self, stop: threading.Event) -> tuple[_CameraSlot, object, float] | None:
        with self._frames:
            while not stop.is_set():
                now = time.monotonic()
                period = float(self._p("cameras.min_period_s"))
                ready = [s for s in self._slots.values()
                         if s.msg is not None and now - s.last_processed_at >= period]
                if ready:
                    slot = min(ready, key=lambda s: s.last_processed_at)  # round robin: longest waiting first
                    msg, received_at = slot.msg, slot.received_at
                    slot.msg = None
                    slot.last_processed_at = now
                    return slot, msg, received_at
                self._frames.wait(timeout=0.05 if period > 0 else 0.5)
        return None

    def _work(self, stop: threading.Event) -> None:
        while not stop.is_set():
            item = self._next_frame(stop)
            if item is None:
                return
            slot, msg, received_at = item
            try:
                self._process(slot, msg, received_at)
            except Exception as exc:  # noqa: BLE001 - one bad frame must never stop the node
                self._counters["bad_images"] += 1
                self.get_logger().error(f"{slot.topic}: frame dropped after an unexpected error: {exc!r}",
                                        throttle_duration_sec=5.0)

    def _process(self, slot: _CameraSlot, msg: object, received_at: float) -> None:
        started_at = time.monotonic()
        stamp_ns = conv.time_to_ns(msg.header.stamp) or self.get_clock().now().nanoseconds
        try:
            image, encoding = decode_image_msg(msg)
            descriptor = self.encoder.describe_one(image, encoding)
        except ImageDecodeError as exc:
            self._counters["bad_images"] += 1
            self.get_logger().warning(f"{slot.topic}: bad image skipped: {exc}", throttle_duration_sec=5.0)
            return
        needs_pose = self._recording or float(self._p("matching.gate_radius_m")) > 0
        pose = self._pose_at(stamp_ns) if needs_pose else None
        with self._map_lock:
            if self.matcher is None:
                return
            self._check_time_jump(slot.topic, stamp_ns)
            hint = (pose[0], pose[1]) if pose is not None and pose[0] in self._map_frames else None
            result = self.matcher.query(descriptor, stamp_ns, slot.topic, position_hint=hint)
            session_row = result.best is not None and result.best.row >= self._session_start_row
            if self._recording:
                try:  # recording problems never cost the frame its localization outputs
                    self._maybe_add_keyframe(slot.topic, stamp_ns, descriptor, pose)
                except Exception as exc:  # noqa: BLE001 - logged and counted
                    self._counters["record_errors"] += 1
                    self.get_logger().error(f"{slot.topic}: keyframe not recorded: {exc}", throttle_duration_sec=5.0)
        slot.processed += 1
        self._publish(result, session_row)
        done = time.monotonic()
        self._latencies.append((done - received_at, done - started_at))

    def _check_time_jump(self, camera: str, stamp_ns: int) -> None:
        """A camera's time going back by more than a second (a bag replayed again, a simulator reset) restarts its
        keyframe gate, the consistency streak and the pose-prior rate limit. Caller holds the map lock."""
        last = self._last_stamps.get(camera)
        self._last_stamps[camera] = stamp_ns if last is None else max(last, stamp_ns)
        if last is not None and stamp_ns < last - _TIME_JUMP_NS:
            self.get_logger().info(f"{camera}: image time jumped back by {(last - stamp_ns) / 1e9:.1f} s: resetting "
                                   "its keyframe gate and match consistency", throttle_duration_sec=5.0)
            self._last_stamps[camera] = stamp_ns
            self._gates.pop(camera, None)
            self.matcher.reset()
            self._last_prior_ns = None

    def _pose_at(self, stamp_ns: int) -> tuple[str, np.ndarray, np.ndarray] | None:
        """(frame, position, orientation) from the pose buffer at an image stamp, or None.

        Only the poses within a few gaps of the stamp are used (scanning back from the newest), so the cost does not
        grow with pose.buffer_s.
        """
        max_gap = float(self._p("pose.max_gap_s"))
        window_ns = int(2 * max_gap * 1e9) + 1
        near = []
        with self._frames:
            for pose in reversed(self._poses):
                if pose[0] < stamp_ns - window_ns:
                    break
                if pose[0] <= stamp_ns + window_ns:
                    near.append(pose)
            frame = self._pose_frame
        if not near:
            return None
        stamps, positions, orientations = zip(*near)
        try:
            track = PoseTrack(np.asarray(stamps, np.int64), np.asarray(positions), np.asarray(orientations), frame)
            got = track.interpolate(np.asarray([stamp_ns], np.int64), max_gap)
        except PoseTrackError as exc:
            self.get_logger().warning(f"poses near this image are unusable: {exc}", throttle_duration_sec=5.0)
            return None
        if not got.valid[0]:
            return None
        return frame, got.positions[0], got.orientations[0]

    def _maybe_add_keyframe(self, topic: str, stamp_ns: int, descriptor: np.ndarray,
                            pose: tuple[str, np.ndarray, np.ndarray] | None) -> None:
        """Record the frame as a keyframe if its camera's gate accepts it. Caller holds the map lock."""
        if self._p("pose.topic") and pose is None:
            self._counters["no_pose"] += 1
            self._no_pose_this_session += 1
            return
        gate = self._gates.setdefault(topic, KeyframeGate.from_config(self._gate_config))
        frame, position, orientation = pose if pose is not None else (NO_POSE_FRAME, None, None)
        if orientation is not None and not np.isfinite(orientation).all():
            orientation = None
        if not gate.accept(stamp_ns, position, orientation):
            return
        geotag: dict = {}
        utm_frame = parse_utm_frame(frame)
        if utm_frame is not None and position is not None:  # a NavSatFix pose source: geotag with lat/lon/UTM
            zone, band = utm_frame
            lat, lon = utm_to_latlon(float(position[0]), float(position[1]), zone, band >= "N")
            geotag = {"gps": np.array([[lat, lon, position[2]]]), "utm_zones": zone, "utm_bands": band,
                      "utm": position[None, :2]}
        self.kmap.add(descriptor[None], stamps_ns=np.array([stamp_ns], np.int64), cameras=topic, frame_ids=frame,
                      positions=None if position is None else position[None],
                      orientations=None if orientation is None else orientation[None], sources=f"live:{topic}",
                      **geotag)
        self.matcher.index.add(descriptor[None])
        self._map_frames.add(frame)
        if utm_frame is not None and self._map_utm_zone is None:
            self._map_utm_zone = utm_frame[0]
        self._recorded_this_session += 1

    def _publish(self, result: MatchResult, session_row: bool) -> None:
        self._counters["queries"] += 1
        self._last_best = result.best.similarity if result.best else math.nan
        self._outputs["matches"].publish(conv.matches_msg(result))
        if self._p("output.markers"):
            self._outputs["markers"].publish(conv.markers_msg(result))
        if not result.accepted:
            return
        self._counters["accepted"] += 1
        min_period_ns = int(float(self._p("output.pose_prior_min_period_s")) * 1e9)
        since_last = None if self._last_prior_ns is None else result.stamp_ns - self._last_prior_ns
        # rate limit only forward in time (after a reload or a replay, time may start over)
        if result.prior is not None and (since_last is None or not 0 <= since_last < min_period_ns):
            self._outputs["pose_prior"].publish(conv.pose_prior_msg(result.prior, result.stamp_ns))
            self._last_prior_ns = result.stamp_ns
        if session_row or self._p("output.loop_closure_scope") == "all":
            self._outputs["loop_closure"].publish(conv.loop_closure_msg(result.stamp_ns, result.best.stamp_ns))

    # -------------------------------------------------------------------------------------------------------------
    # services: answer with counts, paths and errors

    def _srv_start_recording(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._map_lock:
            if self.kmap is None:
                response.success, response.message = False, "not configured"
                return response
            self._gates = {}
            self._recording = True
            self._recorded_this_session = self._no_pose_this_session = 0
            n = len(self.kmap)
        source = self._p("pose.topic") or "no pose source (keyframes without poses, time gating only)"
        response.success = True
        response.message = f"recording keyframes from {list(self._p('cameras.topics'))} with {source}; map has {n}"
        self.get_logger().info(response.message)
        return response

    def _srv_stop_recording(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._map_lock:
            was = self._recording
            self._recording = False
            n = len(self.kmap) if self.kmap is not None else 0
            unsaved = n - self._saved_rows
        response.success = True
        response.message = (f"stopped recording: {self._recorded_this_session} keyframes added "
                            f"({self._no_pose_this_session} frames had no pose); map has {n}, {unsaved} unsaved"
                            if was else f"was not recording; map has {n}")
        self.get_logger().info(response.message)
        return response

    def _save(self, path: str) -> tuple[bool, str]:
        """Save the current map (and an approximate index) to ``path``; (success, message)."""
        t0 = time.monotonic()
        try:
            with self._map_lock:  # the map grows only under this lock: the save sees one consistent state
                save_map(self.kmap, path, self.matcher.index)
                n = len(self.kmap)
                self._saved_rows = n
        except Exception as exc:  # noqa: BLE001 - reported to the caller; the previous map on disk is intact
            return False, f"save to {path} failed: {exc}"
        return True, f"saved {n} keyframes to {path} in {time.monotonic() - t0:.2f} s"

    def _srv_save_map(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        path = self._p("map.path")
        if self.kmap is None:
            response.success, response.message = False, "not configured"
        elif not path:
            response.success = False
            response.message = "map.path is empty: set it (ros2 param set <node> map.path /path/to/map.dinomap)"
        else:
            response.success, response.message = self._save(path)
        (self.get_logger().info if response.success else self.get_logger().error)(response.message)
        return response

    def _srv_load_map(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        path = self._p("map.path")
        if self.encoder is None:
            response.success, response.message = False, "not configured"
            return response
        with self._map_lock:
            unsaved = len(self.kmap) - self._saved_rows if self.kmap is not None else 0
        if unsaved > 0:
            response.success = False
            response.message = f"the current map has {unsaved} unsaved keyframes: call ~/save_map first"
            return response
        if not path or not Path(path).exists():
            response.success, response.message = False, f"map.path {path!r} does not exist"
            return response
        try:  # load and index outside the lock: the camera pipeline keeps matching the old map meanwhile
            kmap = KeyframeMap.load(path, expected_fingerprint=self.encoder.fingerprint.to_dict())
            index = index_for_map(kmap, kind=self._p("map.index"), device=self._p("map.search_device"))
            with self._map_lock:
                config = self.matcher.config if self.matcher is not None else self._matcher_config()
            self._install_map(kmap, config, index)
        except Exception as exc:  # noqa: BLE001 - the old map stays in use
            response.success, response.message = False, f"load of {path} failed, keeping the current map: {exc}"
            self.get_logger().error(response.message)
            return response
        response.success = True
        response.message = f"loaded {len(kmap)} keyframes from {path} (fingerprint {kmap.fingerprint['id']})"
        self.get_logger().info(response.message)
        return response

    # -------------------------------------------------------------------------------------------------------------
    # diagnostics

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        with self._frames:
            received = sum(s.received for s in self._slots.values())
            processed = sum(s.processed for s in self._slots.values())
            dropped = sum(s.dropped for s in self._slots.values())
        t_prev, rec_prev, proc_prev = self._diag_prev
        dt = max(now - t_prev, 1e-6)
        self._diag_prev = (now, received, processed)
        lat_ms = np.asarray(self._latencies, dtype=float).reshape(-1, 2) * 1e3  # (receive->published, processing)
        info = self.encoder.describe_info() if self.encoder is not None else {}
        gpu_mib = math.nan
        if self.encoder is not None and self.encoder.device.type == "cuda":
            import torch

            gpu_mib = torch.cuda.memory_allocated(self.encoder.device) / 2**20
        with self._map_lock:
            n_map = len(self.kmap) if self.kmap is not None else 0
            unsaved = n_map - self._saved_rows
            threshold = self.matcher.config.min_similarity if self.matcher is not None else math.nan
        values = {
            "mode": self._p("mode"),
            "recording": self._recording,
            "input_rate_hz": (received - rec_prev) / dt,
            "processed_rate_hz": (processed - proc_prev) / dt,
            "frames_received": received,
            "frames_processed": processed,
            "frames_dropped": dropped,
            "bad_images": self._counters["bad_images"],
            "frames_without_pose": self._counters["no_pose"],
            "keyframes_not_recorded_errors": self._counters["record_errors"],
            "queries": self._counters["queries"],
            "accepted_matches": self._counters["accepted"],
            "latency_p50_ms": float(np.percentile(lat_ms[:, 0], 50)) if lat_ms.size else math.nan,
            "latency_p95_ms": float(np.percentile(lat_ms[:, 0], 95)) if lat_ms.size else math.nan,
            "processing_p50_ms": float(np.percentile(lat_ms[:, 1], 50)) if lat_ms.size else math.nan,
            "processing_p95_ms": float(np.percentile(lat_ms[:, 1], 95)) if lat_ms.size else math.nan,
            "map_keyframes": n_map,
            "keyframes_recorded": self._recorded_this_session,
            "keyframes_unsaved": unsaved,
            "min_similarity": threshold,
            "device": info.get("device", ""),
            "gpu_memory_mib": gpu_mib,
            "last_best_score": self._last_best,
            "model_fingerprint": info.get("fingerprint", {}).get("id", ""),
        }
        level, message = 0, "ok"
        if self._counters["bad_images"]:
            level, message = 1, f"{self._counters['bad_images']} bad images skipped"
        if self._counters["record_errors"]:
            level, message = 1, f"{self._counters['record_errors']} keyframes could not be recorded"
        if n_map == 0 and self._p("mode") == "localize" and not self._recording:
            level, message = 1, "map is empty"
        stamp = self.get_clock().now().nanoseconds
        self._outputs["diagnostics"].publish(conv.diagnostics_msg(
            stamp, f"{self.get_name()}: place recognition", info.get("device", ""), level, message, values))


class _RosLogHandler(logging.Handler):
    """Sends the core library's Python log records to the node's ROS logger (console, /rosout, log files)."""

    def __init__(self, node: LifecycleNode) -> None:
        super().__init__(level=logging.INFO)
        self._logger = node.get_logger()

    def emit(self, record: logging.LogRecord) -> None:
        text = f"[{record.name}] {record.getMessage()}"
        if record.levelno >= logging.ERROR:
            self._logger.error(text)
        elif record.levelno >= logging.WARNING:
            self._logger.warning(text)
        else:
            self._logger.info(text)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``localize_node``: Ctrl-C (SIGINT) shuts down cleanly (and autosaves, see map.autosave)."""
    rclpy.init(args=args)  # Humble's rclpy.init is not a context manager: init / try_shutdown by hand
    node = None
    try:
        node = LocalizerNode()
        core_logger = logging.getLogger("dinomix_ros")
        core_logger.addHandler(_RosLogHandler(node))
        core_logger.setLevel(logging.INFO)
        core_logger.propagate = False
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        if node.get_parameter("autostart").value:
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        # Ctrl-C under `ros2 launch` arrives twice (terminal + launch): let the second one not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if node is not None:
            node._release()
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
