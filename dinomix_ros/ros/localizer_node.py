"""The localization node: a thin ROS adapter over :class:`~dinomix_ros.localization.live_map.LiveMap`.

A frame's path: camera callback -> newest-frame slot of its camera -> worker thread -> decode -> describe
(:class:`~dinomix_ros.model.encoder.Encoder`; the waiting frames of several cameras in one forward pass) -> each
frame by itself, with its own stamp: local features (with the camera's newest aligned depth image, if any) -> the
pose at its stamp (:class:`~dinomix_ros.localization.pose_buffer.PoseBuffer`) -> ``LiveMap.process`` (search,
verify, match, record) -> publish what the outcome says. The ROS-free part of that path is
:class:`~dinomix_ros.localization.frame_pipeline.FramePipeline`; it times each stage (decode, preprocess, model,
search, verify, publish) and /diagnostics reports their percentiles. Each camera's ``camera_info`` (image_transport
naming) gives the live map its intrinsics; each image's ``header.frame_id`` its camera's extrinsic
(``cameras.extrinsics``, TF from ``cameras.base_frame`` where tf2_ros exists, else ``camera_mount.*``).

A managed (lifecycle) node; ``autostart`` (default true) configures and activates it at start-up.

* construction: /diagnostics (a plain publisher and timer: it reports every lifecycle state, a failed configure with
  its reason; what it checks: :mod:`~dinomix_ros.localization.input_watch`).
* configure: check every parameter, load the model and the map (refused if its model fingerprint differs), build
  the search index, create publishers and services (``~/relocalize`` among them). FAILURE (node unconfigured,
  reason logged and in /diagnostics) on any error.
* activate: subscribe to the cameras, the pose source and the relocalization inputs, start the worker. deactivate:
  the reverse (waiting relocalization requests fail). When a pose prior is published: ``output.pose_prior_mode``,
  decided by :class:`~dinomix_ros.localization.relocalization.Relocalizer`.
* cleanup / shutdown / error: save unsaved keyframes when ``map.autosave`` is set, then release everything.

With ``fleet.uri`` set, a :class:`~dinomix_ros.localization.fleet_sync.FleetSync` links the map to the fleet's:
configure pulls the region of ``fleet.pull_center`` (and pushes what earlier runs left), each successful save pushes
the new keyframes, ``~/pull_fleet_map`` and ``~/push_fleet_map`` do it on demand, and /diagnostics shows its state.
A stop does not push (it must be quick): what its autosave wrote is pushed by the next start.

Camera callbacks only store the newest message per camera and count the one they replace as dropped; the pose
callback parses and buffers. Topics, services and parameters: README and config/localize.yaml (generated from
:mod:`dinomix_ros.ros.parameters`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, State, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, PointCloud2
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from dinomix_ros.imaging.decode import ImageDecodeError
from dinomix_ros.imaging.features import FeatureConfig, FeatureExtractor
from dinomix_ros.localization.extrinsics import CameraExtrinsics
from dinomix_ros.localization.fleet_sync import FleetSync
from dinomix_ros.localization.frame_pipeline import FramePipeline
from dinomix_ros.localization.frame_loss import FrameLoss
from dinomix_ros.localization.health import ERROR, WARN, HealthMonitor
from dinomix_ros.localization.input_watch import EventWindow, InputHealthConfig, InputWatch
from dinomix_ros.localization import map_commands
from dinomix_ros.localization.latest_frames import LatestFrames
from dinomix_ros.localization.live_map import FrameOutcome, LiveMap, open_map
from dinomix_ros.localization.pose_buffer import PoseBuffer
from dinomix_ros.localization.relocalization import RelocalizationConfig, Relocalizer
from dinomix_ros.maps.fleet.region import Region, parse_center
from dinomix_ros.maps.sources.posemsg import POSE_KINDS, PoseMessageError, pose_from_msg
from dinomix_ros.model.encoder import Encoder
from dinomix_ros.ros import camera_qos
from dinomix_ros.ros import conversions as conv
from dinomix_ros.ros import parameters as params
from dinomix_ros.ros import transport
from dinomix_ros.ros.relocalization_inputs import RelocalizationInputs
from dinomix_ros.ros.runtime import exit_process, run_lifecycle_node
from dinomix_ros.ros.tf_extrinsics import tf_lookup
from dinomix_ros.util.stamps import header_stamp_ns

__all__ = ["LocalizerNode", "main"]


class LocalizerNode(LifecycleNode):
    """DINO-Mix place recognition as a managed node (see the module docstring)."""

    def __init__(self, node_name: str = "dinomix_localizer", **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        self.get_logger().info(transport.describe())  # which Fast DDS transport carries the camera frames
        self._startup_errors = []
        for name, entry in params.PARAMETERS.items():
            self._declare(name, entry)
        self.add_on_set_parameters_callback(self._guarded("parameter change", self._on_set_parameters,
                                                          lambda changes, exc: SetParametersResult(
                                                              successful=False, reason=f"refused: {exc}")))
        self._frames = LatestFrames()
        self._worker: threading.Thread | None = None
        self._worker_stop: threading.Event | None = None
        self.encoder: Encoder | None = None
        self.live: LiveMap | None = None
        self.poses = PoseBuffer()
        self._last_pose = None  # the newest pose sample: the centre of ~/pull_fleet_map
        self._fleet: FleetSync | None = None
        self._pose_sub = None
        self._loss = FrameLoss()
        self._outputs: dict = {}
        self._service_handles: list = []
        self._counters = {"bad_images": 0, "bad_poses": 0, "bad_camera_info": 0, "callback_errors": 0,
                          "qos_incompatible": 0, "processed": 0}
        self._events = EventWindow()
        self._watch = InputWatch()
        self._reloc = Relocalizer()
        self._lifecycle, self._configure_error = "unconfigured", ""
        self._empty_frame_logged = False
        self._pipeline: FramePipeline | None = None
        self._tf_listener = None
        self._bad_camera_info: set[str] = set()  # cameras whose bad camera_info was logged (once each)
        self._health = HealthMonitor()
        self._cb_sensors = MutuallyExclusiveCallbackGroup()
        self._cb_services = MutuallyExclusiveCallbackGroup()
        self._cb_timer = MutuallyExclusiveCallbackGroup()
        self._cb_relocalize = ReentrantCallbackGroup()  # a waiting ~/relocalize call blocks no other service
        self._reloc_inputs = RelocalizationInputs(self, self._reloc, self._cb_sensors, self._guarded)
        self._inputs = camera_qos.CameraSubscriptions(self, self._cb_sensors, self._on_image, self._on_incompatible_qos,
                                                      self._guarded, on_lost=lambda c, n: self._loss.lost(c, n))
        # /diagnostics exists in every lifecycle state (unconfigured, failed configure, inactive): a plain publisher
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE))
        self._diag_timer = self.create_timer(float(self._p("diagnostics.period_s")),
                                             self._guarded("diagnostics", self._publish_diagnostics),
                                             callback_group=self._cb_timer)

    # -------------------------------------------------------------------------------------------------------------
    # parameters

    def _declare(self, name: str, entry: params.Entry) -> None:
        """Declare one parameter; a bad start-up value is kept as the default and fails the next configure."""
        try:
            self.declare_parameter(name, entry.default, params.descriptor(entry))
        except Exception as exc:  # rclpy's InvalidParameterValueException / InvalidParameterTypeException
            self._startup_errors.append(f"{name}: {exc}")
            self.declare_parameter(name, entry.default, params.descriptor(entry), ignore_override=True)

    def _values(self, changed: dict | None = None) -> dict:
        values = {name: self.get_parameter(name).value for name in params.PARAMETERS}
        values.update(changed or {})
        return values

    def _p(self, name: str) -> object:
        return self.get_parameter(name).value

    def _guarded(self, what: str, callback: Callable, fallback: Callable | None = None) -> Callable:
        """``callback`` for rclpy: an exception is counted in /diagnostics, logged (throttled) and answered by
        ``fallback(*args, exc)`` (e.g. a service response with success false); it never reaches the executor."""
        def guarded(*args: object) -> object:
            try:
                return callback(*args)
            except Exception as exc:
                self._count("callback_errors")
                self.get_logger().error(f"{what} failed: {exc!r}", throttle_duration_sec=5.0)
                return fallback(*args, exc) if fallback is not None else None
        return guarded

    def _on_set_parameters(self, changes: list) -> SetParametersResult:
        """Validate a change (all or nothing, the same rules as at start); run-time settings apply at once."""
        changed = {p.name: p.value for p in changes}
        values = self._values(changed)
        reason = params.runtime_change_problem(changed, values)
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        params.apply_runtime(self.live, self.poses, values, changed)
        self._reloc.reconfigure(values["output.pose_prior_mode"], params.build(RelocalizationConfig, values))
        self._events.window_s = float(values["diagnostics.window_s"])
        return SetParametersResult(successful=True)

    def _count(self, name: str, n: int = 1) -> None:
        """An error or event: its total and its recent window (the status looks at the window)."""
        self._counters[name] += n
        self._events.add(name, time.monotonic(), n)

    # -------------------------------------------------------------------------------------------------------------
    # lifecycle

    def on_configure(self, state: State) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as exc:  # any failure leaves the node unconfigured, with the reason logged
            self.get_logger().error(f"configuration failed: {exc}")
            self.release(save=False)
            self._configure_error = str(exc) or type(exc).__name__
            return TransitionCallbackReturn.FAILURE
        self._lifecycle, self._configure_error = "inactive", ""
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        if self._startup_errors:
            raise ValueError("bad start-up parameters: " + "; ".join(self._startup_errors))
        s = params.NodeSettings.from_values(self._values())
        if s.model.random_weights:
            self.get_logger().warning("model.random_weights is set: RANDOM weights, similarity scores are meaningless")
        t0 = time.monotonic()
        self.get_logger().info(f"configuring: loading the model ({s.model.checkpoint or 'random weights'}) ...")
        self.encoder = Encoder(s.model.load(), s.encoder, s.image)
        self.encoder.warmup()
        self.get_logger().info(f"configuring: model ready in {time.monotonic() - t0:.1f} s; opening the map ...")
        fingerprint = self.encoder.fingerprint.to_dict()
        kmap = open_map(s.map.path, fingerprint, storage_dtype=s.storage.storage_dtype,
                        create=s.map.create_if_missing or s.node.mode == "self_map",
                        metadata={"name": Path(s.map.path).name if s.map.path else "live",
                                  "source": f"live:{self.get_fully_qualified_name()}"}, verify=s.map.verify)
        if len(kmap) == 0 and s.node.mode == "localize":
            self.get_logger().warning("starting with an EMPTY map: record one with ~/start_recording, or load one")
        lookup, self._tf_listener, why = tf_lookup(self, s.extrinsics.base_frame)
        if lookup is None:
            self.get_logger().info(f"camera extrinsics from cameras.extrinsics and camera_mount.* ({why}: TF not "
                                   "used)")
        self.live = LiveMap(kmap, index_config=s.index, matcher=s.matcher, gate=s.gate, output=s.output,
                            has_pose_source=bool(s.pose.topic), verification=s.verification, features=s.features,
                            mount=s.mount, prior=s.verified_prior,
                            extrinsics=CameraExtrinsics(s.mount.matrix(), s.extrinsics.parsed(), lookup))
        self.poses = PoseBuffer(s.pairing)
        self._reloc.reconfigure(s.output.pose_prior_mode, s.relocalization)
        self._events.window_s = s.input_health.window_s
        warn = functools.partial(self.get_logger().warning, throttle_duration_sec=5.0)
        self._pipeline = FramePipeline(self.encoder, self.poses, self._feature_extractor(s.features), warn)
        self._apply_calibration(self.live.matcher_config.min_similarity, s.matcher.min_similarity)
        if s.node.mode == "self_map" or s.recording.autostart:
            self.live.start_recording()
            self.get_logger().info(f"recording from the start: {self.live.recording_rule}")
        info = self.encoder.describe_info()
        runtime = info["backend"] + (f" ({', '.join(info['providers'])})" if info["providers"] else "")
        self.get_logger().info(
            f"configured: mode {s.node.mode}, {info['architecture']} on {info['device']} with {runtime} in "
            f"{info['dtype']} ({info['dtype_reason']}), preprocessing on the {info['preprocess']}, "
            f"fingerprint {info['fingerprint']['id']}, map {len(kmap)} keyframes, index {self.live.index.kind} "
            f"(map.index {s.index.index}), map check {self.live.stats()['map_check']}")
        self._create_interfaces()
        if s.fleet.enabled:
            self._start_fleet(s)

    def _start_fleet(self, s: params.NodeSettings) -> None:
        """Link the map to the fleet's: pull the configured region, push what earlier runs left (both queued: a
        fleet that cannot be reached never delays or fails configure)."""
        self._fleet = FleetSync(s.fleet, self.encoder.fingerprint.to_dict(), self._log)
        self._fleet.start()
        self.get_logger().info(f"fleet: robot {self._fleet.robot}, {self._fleet.store.where}")
        if s.fleet.pull_at_configure and (s.fleet.pull_center or s.fleet.pull_radius_m == 0):
            self._fleet.pull(self.live, parse_center(s.fleet.pull_center, s.fleet.pull_radius_m))
        elif s.fleet.pull_at_configure:
            self.get_logger().info("fleet: no pull at configure (fleet.pull_radius_m is set but fleet.pull_center "
                                   "is empty): call ~/pull_fleet_map once the robot has a pose")
        if s.fleet.push and s.map.path:
            self._fleet.push(self.live, s.map.path)

    def _feature_extractor(self, config: FeatureConfig) -> FeatureExtractor | None:
        """The extractor for the map's feature type (a map's stored type wins over features.type), None if off."""
        store = self.live.kmap.local_features
        if store is None and config.max_features == 0:
            return None
        if store is not None and (store.kind, store.slots) != (config.type, config.max_features):
            self.get_logger().info(f"the map stores {store.slots} {store.kind} features per keyframe: extracting "
                                   "those (not features.type / features.max_features)")
            config = FeatureConfig(type=store.kind, max_features=store.slots, max_image_side=config.max_image_side)
        self.get_logger().info(f"geometric verification {self.live.stats()['verification']}")
        return FeatureExtractor(config)

    def _apply_calibration(self, in_use: float, declared: float) -> None:
        """Show a map's calibrated threshold (applied by the live map) as the parameter's value."""
        if in_use != declared:
            self.get_logger().info(f"using the map's calibrated matching.min_similarity {in_use:.4f}")
            self.set_parameters([Parameter("matching.min_similarity", value=float(in_use))])

    def _create_interfaces(self) -> None:
        reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.VOLATILE)
        rare = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)  # each loop closure matters to SLAM
        publisher = self.create_lifecycle_publisher
        self._outputs = {
            "pose_prior": publisher(PoseWithCovarianceStamped, "~/pose_prior", reliable),
            "matches": publisher(PointCloud2, "~/matches", reliable),
            "loop_closure": publisher(Float64MultiArray, "~/loop_closure", rare),
            "loop_constraint": publisher(Float64MultiArray, "~/loop_constraint", rare),
            "markers": publisher(MarkerArray, "~/markers", reliable),
        }
        self._service_handles = [
            self.create_service(Trigger, f"~/{name}", self._guarded(
                f"~/{name}", getattr(self, f"_srv_{name}"),
                lambda request, response, exc, name=name: self._answer(response, False, f"~/{name} failed: {exc}")),
                callback_group=self._cb_services)
            for name in ("start_recording", "stop_recording", "save_map", "load_map", "pull_fleet_map",
                         "push_fleet_map")]
        self._service_handles.append(self.create_service(Trigger, "~/relocalize", self._guarded(
            "~/relocalize", self._srv_relocalize,
            lambda request, response, exc: self._answer(response, False, f"~/relocalize failed: {exc}")),
            callback_group=self._cb_relocalize))

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # publishers on before the worker can publish
        if result != TransitionCallbackReturn.SUCCESS:
            return result
        try:
            self._activate()
        except Exception as exc:  # logged here (Humble's rclpy would swallow it); the node stays inactive
            self.get_logger().error(f"activation failed: {exc}")
            self._stop_worker()
            super().on_deactivate(state)
            return TransitionCallbackReturn.FAILURE
        self._lifecycle = "active"
        return TransitionCallbackReturn.SUCCESS

    def _activate(self) -> None:
        resolved = [camera_qos.resolve(self, topic) for topic in self._p("cameras.topics")]
        self._frames = LatestFrames(resolved, min_period_s=lambda: self._p("cameras.min_period_s"),
                                    clock=self._period_clock)
        self._loss = FrameLoss()
        now = time.monotonic()
        self._watch = InputWatch(resolved, now, pose_source=bool(self._p("pose.topic")))
        self._reloc.start(now)
        self.poses.clear()
        self._pipeline.depth.clear()
        self._inputs.start(resolved, self._p("cameras.reliability"), int(self._p("cameras.depth")))
        self._inputs.add_extras(resolved, self._on_camera_info if self._p("cameras.use_camera_info") else None,
                                list(self._p("cameras.depth_topics")), self._pipeline.depth.__setitem__)
        if self._p("pose.topic"):
            # best effort connects to reliable and best-effort odometry/GNSS publishers alike
            self._pose_sub = self.create_subscription(
                conv.msg_class(POSE_KINDS[self._p("pose.type")]), self._p("pose.topic"),
                self._guarded("pose", self._on_pose), QoSProfile(depth=50, reliability=ReliabilityPolicy.BEST_EFFORT),
                callback_group=self._cb_sensors)
        self._reloc_inputs.start(*(self._p(name) for name in (
            "output.pose_prior_mode", "relocalization.consumer_topic", "relocalization.consumer_type",
            "relocalization.trigger_topic", "relocalization.trigger_type")))
        self._worker_stop = threading.Event()
        self._worker = threading.Thread(target=self._work, args=(self._worker_stop,), name="dinomix-worker",
                                        daemon=True)
        self._worker.start()
        pose = f", pose source {self._pose_sub.topic_name}" if self._pose_sub is not None else ""
        priors = self._reloc_inputs.describe(self._p("output.pose_prior_mode"))
        self.get_logger().info(f"active: cameras [{self._inputs.describe()}]{pose}; {priors}")

    def _period_clock(self) -> float:
        """Seconds by which cameras.min_period_s is measured: the node's clock when it is simulated (use_sim_time:
        /clock from a bag player), else the steady clock (a period must not jump with the wall clock)."""
        clock = self.get_clock()
        return clock.now().nanoseconds * 1e-9 if getattr(clock, "ros_time_is_active", False) else time.monotonic()

    def _on_incompatible_qos(self, topic: str, event: object) -> None:
        self._count("qos_incompatible")
        self.get_logger().warning(f"camera {topic}: a publisher offers QoS this subscription cannot connect to "
                                  f"(policy {event.last_policy_kind}); its frames are not received: set "
                                  "cameras.reliability to auto", throttle_duration_sec=5.0)

    def _on_image(self, topic: str, msg: object) -> None:
        self._frames.put(topic, msg)
        stamp = header_stamp_ns(msg)
        self._loss.received(topic, stamp)
        self._watch.frame(topic, stamp, time.monotonic())

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._stop_worker()
        self._lifecycle = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self.release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self.release()
        self._lifecycle = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self.get_logger().error(f"error in state {state.label}: releasing everything, back to unconfigured")
        self.release()
        self._configure_error = f"an error in state {state.label} released everything"
        return TransitionCallbackReturn.SUCCESS

    def _stop_worker(self) -> None:
        if self._worker_stop is not None:
            self._worker_stop.set()  # this worker's own event: a late-exiting worker can never be revived
        self._frames.wake()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
            if self._worker.is_alive():
                self.get_logger().error("the worker thread did not stop within 30 s; it will exit after its frame")
            self._worker = None
        self._inputs.stop()
        if self._pose_sub is not None:
            self.destroy_subscription(self._pose_sub)
            self._pose_sub = None
        self._reloc_inputs.stop()
        self._reloc.cancel_all()

    def release(self, save: bool = True) -> None:
        """Free everything configure/activate made (cleanup, shutdown, error and Ctrl-C come here)."""
        self._stop_worker()
        fleet, self._fleet = self._fleet, None
        if fleet is not None:  # no push now (a stop must be quick): the ledger keeps the backlog for the next start
            fleet.stop(timeout=1.0)
        if save:
            self._guarded("autosave", self._autosave)()
        for srv in self._service_handles:
            self.destroy_service(srv)
        self._service_handles = []
        for pub in self._outputs.values():
            self.destroy_lifecycle_publisher(pub)
        self._outputs = {}
        self.live = None
        self.encoder = None
        self._pipeline = None
        if self._tf_listener is not None:  # its /tf and /tf_static subscriptions (a reconfigure makes new ones)
            self._guarded("TF listener", self._tf_listener.unregister)()
            self._tf_listener = None
        if self._lifecycle != "finalized":
            self._lifecycle = "unconfigured"

    def _autosave(self) -> None:
        if self.live is None:
            return
        name = self.get_fully_qualified_name()
        for level, message in map_commands.autosave(self.live, self._p("map.path"), self._p("map.autosave"), name):
            self._log(level, message)

    def _log(self, level: str, message: str) -> None:
        """Log at "info", "warning" or "error" (one call site per severity: rclpy requires it)."""
        log = self.get_logger()
        if level == "info":
            log.info(message)
        elif level == "warning":
            log.warning(message)
        else:
            log.error(message)

    # -------------------------------------------------------------------------------------------------------------
    # pose callback (camera callbacks only store the newest frame: LatestFrames.put)

    def _on_pose(self, msg: object) -> None:
        live = self.live
        try:
            sample = pose_from_msg(msg, self._p("pose.type"), utm_zone=live.utm_zone if live is not None else None,
                                   fallback_stamp_ns=self.get_clock().now().nanoseconds)
        except PoseMessageError as exc:
            self._count("bad_poses")
            self.get_logger().warning(f"pose ignored: {exc}", throttle_duration_sec=5.0)
            return
        if not sample.frame_id:  # an empty header frame: the pose.frame_id fallback, else refused
            fallback = self._p("pose.frame_id")
            if not fallback:
                self._count("bad_poses")
                if not self._empty_frame_logged:
                    self._empty_frame_logged = True
                    self.get_logger().error(
                        f"pose source {self._p('pose.topic')} sends poses with an empty header.frame_id: they are "
                        "refused (their frame is unknown); set pose.frame_id to the frame they are in (counted in "
                        "/diagnostics as bad_poses; this is logged once)")
                return
            sample = dataclasses.replace(sample, frame_id=fallback)
        self._watch.pose(time.monotonic())
        self.poses.add(sample)
        self._last_pose = sample

    def _on_camera_info(self, camera: str, msg: CameraInfo) -> None:
        live = self.live
        if live is None:
            return
        try:
            model = conv.camera_from_info_msg(msg)
        except ValueError as exc:  # CameraModelError: uncalibrated (K = 0), unsupported or out-of-bounds values
            self._count("bad_camera_info")
            if camera not in self._bad_camera_info:  # once per camera (again after a good one)
                self._bad_camera_info.add(camera)
                self.get_logger().warning(f"{camera}: camera_info ignored (counted in /diagnostics bad_camera_info; "
                                          f"logged once): {exc}")
            return
        self._bad_camera_info.discard(camera)
        self._watch.camera_info(camera, time.monotonic())
        if live.camera_model(camera) != model:
            live.set_camera_model(camera, model)
            self.get_logger().info(f"{camera}: intrinsics {model.width}x{model.height} {model.distortion_model} "
                                   f"fx {model.K[0, 0]:.1f}")

    # -------------------------------------------------------------------------------------------------------------
    # worker

    def _work(self, stop: threading.Event) -> None:
        while batch := self._frames.get_ready(stop):
            try:
                self._process(batch)
            except Exception as exc:  # one bad batch must never stop the node
                self._count("bad_images", len(batch))
                self.get_logger().error(f"{', '.join(c for c, _, _ in batch)}: frames dropped after an unexpected "
                                        f"error: {exc!r}", throttle_duration_sec=5.0)

    def _process(self, batch: list[tuple[str, object, float]]) -> None:
        """The waiting frames of one or more cameras: decode each, describe all in one forward pass, then localize
        and publish each by itself."""
        started_at, pipeline, frames = time.monotonic(), self._pipeline, []
        for camera, msg, received_at in batch:
            try:
                frames.append(pipeline.decode(camera, msg, received_at, self.get_clock().now().nanoseconds))
            except ImageDecodeError as exc:
                self._count("bad_images")
                self.get_logger().warning(f"{camera}: bad image skipped: {exc}", throttle_duration_sec=5.0)
        for frame, descriptor in zip(frames, pipeline.describe(frames) if frames else []):
            live = self.live
            if live is None:
                return
            try:  # one bad frame must not cost the other cameras' frames of its batch
                outcome = pipeline.localize(frame, descriptor, live)
                t0 = time.perf_counter()
                self._publish(frame.camera, outcome)
                frame.stages["publish"] = time.perf_counter() - t0
            except Exception as exc:
                self._count("bad_images")
                self.get_logger().error(f"{frame.camera}: frame dropped after an unexpected error: {exc!r}",
                                        throttle_duration_sec=5.0)
                continue
            self._counters["processed"] += 1
            done = time.monotonic()
            self._health.record(done - frame.received_at, done - started_at, frame.stages)

    def _publish(self, camera: str, outcome: FrameOutcome) -> None:
        result = outcome.result
        self._outputs["matches"].publish(conv.matches_msg(result))
        if self._p("output.markers"):
            self._outputs["markers"].publish(conv.markers_msg(result))
        decision = self._reloc.offer(outcome, time.monotonic())
        if decision.publish:
            self._outputs["pose_prior"].publish(conv.pose_prior_msg(result.prior, result.stamp_ns))
            self._reloc.published(decision)
            if decision.reason:
                self.get_logger().info(f"pose prior published: {decision.reason}")
        for request, why in self._reloc.expire(time.monotonic()):
            self.get_logger().warning(f"relocalization request ({request.source}) failed: {why}")
        if outcome.publish_loop_closure:
            self._outputs["loop_closure"].publish(conv.loop_closure_msg(result.stamp_ns, result.best.stamp_ns))
            if outcome.relative is not None:  # verified with intrinsics: the constraint a pose graph adds
                self._outputs["loop_constraint"].publish(conv.loop_constraint_msg(
                    result.stamp_ns, result.best.stamp_ns, result.best.keyframe_id, outcome.relative))
        if outcome.time_jump_s is not None:
            self.get_logger().info(f"{camera}: image time jumped back by {outcome.time_jump_s:.1f} s: restarting "
                                   "its keyframe gate and match consistency", throttle_duration_sec=5.0)
        if outcome.record_error is not None:
            self.get_logger().error(f"{camera}: keyframe not recorded: {outcome.record_error}",
                                    throttle_duration_sec=5.0)

    # -------------------------------------------------------------------------------------------------------------
    # services: answer with counts, paths and errors

    def _answer(self, response: Trigger.Response, success: bool, message: str) -> Trigger.Response:
        """Fill a service response and log it (one logger call site per severity: rclpy requires it)."""
        response.success, response.message = success, message
        if success:
            self.get_logger().info(message)
        else:
            self.get_logger().error(message)
        return response

    def _srv_start_recording(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if self.live is None:
            return self._answer(response, False, "not configured")
        return self._answer(response, *map_commands.start_recording(self.live, list(self._p("cameras.topics")),
                                                                    self._p("pose.topic")))

    def _srv_stop_recording(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if self.live is None:
            return self._answer(response, False, "not configured")
        return self._answer(response, *map_commands.stop_recording(self.live))

    def _srv_save_map(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if self.live is None:
            return self._answer(response, False, "not configured")
        ok, message = map_commands.save_map(self.live, self._p("map.path"), self.get_fully_qualified_name())
        fleet = self._fleet
        if ok and fleet is not None and fleet.config.push:
            fleet.push(self.live, self._p("map.path"))  # in the background: the answer does not wait for it
            message += f"; pushing to the fleet ({fleet.store.where})"
        return self._answer(response, ok, message)

    def _srv_pull_fleet_map(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Pull the region around the robot's latest pose (else fleet.pull_center) into the local map."""
        live, fleet = self.live, self._fleet
        if live is None or fleet is None:
            return self._answer(response, False, "no fleet: set fleet.uri" if live is not None else "not configured")
        radius, pose = fleet.config.pull_radius_m, self._last_pose
        if radius > 0 and pose is not None:
            region = (Region("gps", (float(pose.gps[0]), float(pose.gps[1])), radius)
                      if pose.gps is not None and math.isfinite(pose.gps[0]) else
                      Region("position", (float(pose.position[0]), float(pose.position[1])), radius, pose.frame_id))
        elif radius > 0 and not fleet.config.pull_center:
            return self._answer(response, False, "no pose yet and fleet.pull_center is empty: nothing to pull "
                                                 "around (or set fleet.pull_radius_m to 0 for the whole map)")
        else:
            region = parse_center(fleet.config.pull_center, radius)
        return self._answer(response, *fleet.pull(live, region, announce=False).wait(self._fleet_wait_s()))

    def _srv_push_fleet_map(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Push the saved keyframes the fleet has not got (call ~/save_map first for the newest ones)."""
        live, fleet = self.live, self._fleet
        if live is None or fleet is None:
            return self._answer(response, False, "no fleet: set fleet.uri" if live is not None else "not configured")
        return self._answer(response, *fleet.push(live, self._p("map.path"), announce=False).wait(
            self._fleet_wait_s()))

    def _fleet_wait_s(self) -> float:
        """How long a fleet service waits for its job before answering that it goes on in the background."""
        return 3 * self._fleet.config.timeout_s

    def _srv_relocalize(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Publish the next verified prior once and answer with it (or, after the timeout, with why not)."""
        if self._lifecycle != "active":
            return self._answer(response, False, f"~/relocalize: the node is {self._lifecycle}, not active")
        ticket = self._reloc.request("~/relocalize", time.monotonic())
        return self._answer(response, *self._reloc.wait(ticket))

    def _srv_load_map(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        live = self.live
        if live is None or self.encoder is None:
            return self._answer(response, False, "not configured")
        ok, message = map_commands.load_map(live, self._p("map.path"), self.encoder.fingerprint.to_dict())
        if ok:  # the new map's feature type and calibrated threshold
            self._pipeline.extractor = self._feature_extractor(params.build(FeatureConfig, self._values()))
            self._apply_calibration(live.matcher_config.min_similarity, self._p("matching.min_similarity"))
        return self._answer(response, ok, message)

    # -------------------------------------------------------------------------------------------------------------
    # diagnostics

    def _publish_diagnostics(self) -> None:
        """The status in every lifecycle state: why the node is not running (unconfigured, a failed configure with
        its reason, inactive), else what is wrong with it and its inputs (see :mod:`.input_watch`)."""
        now = time.monotonic()
        pipeline, live = self._pipeline, self.live
        best_effort = {topic: p == ReliabilityPolicy.BEST_EFFORT
                       for topic, p in self._inputs.policies().items()}
        extra = {"mode": self._p("mode"), "lifecycle_state": self._lifecycle,
                 "frames_lost_estimate": self._loss.lost_estimate, "input_loss_estimate": self._loss.loss_fraction,
                 "frame_loss_warning": self._loss.warning(best_effort),
                 "last_best_score": live.last_best_similarity if live is not None else math.nan,
                 **self._reloc.stats(now), **(pipeline.diagnostics() if pipeline is not None else {})}
        counters = {k: v for k, v in self._counters.items() if k != "processed"}
        # a publisher with incompatible QoS stays so: that count is a state, never "recent"
        recent = {k: self._events.recent(k, now) for k in counters if k != "qos_incompatible"}
        findings: list[tuple[int, str]] = []
        if self._lifecycle == "active":
            needs_info = live is not None and live.verifying and bool(self._p("cameras.use_camera_info"))
            findings, watched = self._watch.findings(now, params.build(InputHealthConfig, self._values()),
                                                     float(self._p("cameras.min_period_s")), needs_info)
            extra.update(watched)
        fleet = self._fleet.state() if self._fleet is not None else {}
        if fleet.get("fleet_last_error"):
            findings.append((WARN, f"fleet: {fleet['fleet_backlog']} keyframes not pushed; "
                                   f"{fleet['fleet_last_error']}"))
        level, message, values = self._health.report(
            self._frames.counts(), self._counters["processed"], counters, live.stats() if live is not None else {},
            {**extra, **fleet}, empty_map_warns=self._p("mode") == "localize", recent=recent, findings=findings)
        if self._lifecycle != "active":
            level, message = {
                "unconfigured": (ERROR, f"configuration failed: {self._configure_error}") if self._configure_error
                else (WARN, "unconfigured: waiting for the configure transition"),
                "inactive": (WARN, "inactive: configured, waiting for the activate transition"),
            }.get(self._lifecycle, (WARN, f"{self._lifecycle}"))
        self._diagnostics.publish(conv.diagnostics_msg(
            self.get_clock().now().nanoseconds, f"{self.get_name()}: place recognition", extra.get("device", ""),
            level, message, values))


def main(args: list[str] | None = None) -> None:
    """Entry point of ``localize_node``: SIGINT/SIGTERM stop it cleanly (and autosave, see map.autosave)."""
    exit_process(run_lifecycle_node(LocalizerNode, args))


if __name__ == "__main__":
    main()
