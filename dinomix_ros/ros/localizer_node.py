"""The localization node: a thin ROS adapter over :class:`~dinomix_ros.localization.live_map.LiveMap`.

A frame's path: camera callback -> newest-frame slot of its camera -> worker thread -> decode -> describe
(:class:`~dinomix_ros.model.encoder.Encoder`) -> the pose at its stamp (:class:`~dinomix_ros.localization.
pose_buffer.PoseBuffer`) -> ``LiveMap.process`` (search, match, record) -> publish what the outcome says.
When frames of several cameras wait, the worker takes them all and describes them in one forward pass; each
frame then goes on by itself, with its own stamp (:meth:`LocalizerNode._localize_frame`). The worker times each
stage (decode, preprocess, model, search, verify, publish); /diagnostics reports their percentiles.

A managed (lifecycle) node; ``autostart`` (default true) configures and activates it at start-up.

* configure: check every parameter, load the model and the map (refused if its model fingerprint differs), build
  the search index, create publishers and services. FAILURE (node unconfigured, reason logged) on any error.
* activate: subscribe to the cameras and the pose source, start the worker. deactivate: the reverse.
* cleanup / shutdown / error: save unsaved keyframes when ``map.autosave`` is set, then release everything.

Camera callbacks only store the newest message per camera and count the one they replace as dropped; the pose
callback parses and buffers. Topics, services and parameters: README and config/localize.yaml (generated from
:mod:`dinomix_ros.ros.parameters`).
"""

from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.lifecycle import LifecycleNode, State, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image, PointCloud2
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from dinomix_ros.imaging.decode import ImageDecodeError, decode_image_msg
from dinomix_ros.imaging.preprocess import StagedImage
from dinomix_ros.localization.health import HealthMonitor
from dinomix_ros.localization.latest_frames import LatestFrames
from dinomix_ros.localization.live_map import FrameOutcome, LiveMap, OutputConfig, open_map
from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.localization.pose_buffer import PoseBuffer
from dinomix_ros.maps.index import index_for_map
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.sources.posemsg import POSE_KINDS, PoseMessageError, pose_from_msg
from dinomix_ros.maps.sources.poses import KeyframeGateConfig, PosePairingConfig
from dinomix_ros.model.encoder import Encoder
from dinomix_ros.ros import conversions as conv
from dinomix_ros.ros import parameters as params
from dinomix_ros.ros.runtime import run_lifecycle_node
from dinomix_ros.util.stamps import header_stamp_ns

__all__ = ["LocalizerNode", "main"]

_RUNTIME_CONFIGS = (MatcherConfig, OutputConfig, KeyframeGateConfig, PosePairingConfig)


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
        stages: seconds per stage (decode, preprocess, model, search, verify, publish) for /diagnostics.
    """

    camera: str
    stamp_ns: int
    image: np.ndarray
    encoding: str
    staged: StagedImage
    received_at: float
    stages: dict[str, float] = field(default_factory=dict)


class LocalizerNode(LifecycleNode):
    """DINO-Mix place recognition as a managed node (see the module docstring)."""

    def __init__(self, node_name: str = "dinomix_localizer", **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        self._startup_errors = []
        for name, entry in params.PARAMETERS.items():
            self._declare(name, entry)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._frames = LatestFrames()
        self._worker: threading.Thread | None = None
        self._worker_stop: threading.Event | None = None
        self.encoder: Encoder | None = None
        self.live: LiveMap | None = None
        self.poses = PoseBuffer()
        self._subs: list = []
        self._outputs: dict = {}
        self._service_handles: list = []
        self._diag_timer = None
        self._counters = {"bad_images": 0, "bad_poses": 0, "processed": 0}
        self._max_batch = 0  # most frames described in one forward pass (diagnostics)
        self._health = HealthMonitor()
        self._cb_sensors = MutuallyExclusiveCallbackGroup()
        self._cb_services = MutuallyExclusiveCallbackGroup()
        self._cb_timer = MutuallyExclusiveCallbackGroup()

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

    def _on_set_parameters(self, changes: list) -> SetParametersResult:
        """Validate a change (all or nothing, the same rules as at start); run-time settings apply at once."""
        changed = {p.name: p.value for p in changes}
        reason = params.validate(changed)
        values = self._values(changed)
        reason = reason or params.config_problem(values, _RUNTIME_CONFIGS)
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        live = self.live
        if live is not None:
            live.set_matcher_config(params.build(MatcherConfig, values))
            live.set_output_config(params.build(OutputConfig, values))
            if any(name.startswith("recording.") for name in changed):
                live.set_gate_config(params.build(KeyframeGateConfig, values))
        self.poses.config = params.build(PosePairingConfig, values)
        return SetParametersResult(successful=True)

    # -------------------------------------------------------------------------------------------------------------
    # lifecycle

    def on_configure(self, state: State) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as exc:  # any failure leaves the node unconfigured, with the reason logged
            self.get_logger().error(f"configuration failed: {exc}")
            self.release(save=False)
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        if self._startup_errors:
            raise ValueError("bad start-up parameters: " + "; ".join(self._startup_errors))
        s = params.NodeSettings.from_values(self._values())
        if s.model.random_weights:
            self.get_logger().warning("model.random_weights is set: RANDOM weights, similarity scores are meaningless")
        self.encoder = Encoder(s.model.load(), s.encoder, s.image)
        self.encoder.warmup()
        fingerprint = self.encoder.fingerprint.to_dict()
        kmap = open_map(s.map.path, fingerprint, storage_dtype=s.storage.storage_dtype,
                        create=s.map.create_if_missing or s.node.mode == "self_map",
                        metadata={"name": Path(s.map.path).name if s.map.path else "live",
                                  "source": f"live:{self.get_fully_qualified_name()}"})
        if len(kmap) == 0 and s.node.mode == "localize":
            self.get_logger().warning("starting with an EMPTY map: record one with ~/start_recording, or load one")
        self.live = LiveMap(kmap, index_config=s.index, matcher=s.matcher, gate=s.gate, output=s.output,
                            has_pose_source=bool(s.pose.topic))
        self._apply_calibration(self.live.matcher_config.min_similarity, s.matcher.min_similarity)
        self.poses = PoseBuffer(s.pairing)
        if s.node.mode == "self_map" or s.recording.autostart:
            self.live.start_recording()
        info = self.encoder.describe_info()
        runtime = info["backend"] + (f" ({', '.join(info['providers'])})" if info["providers"] else "")
        self.get_logger().info(
            f"configured: mode {s.node.mode}, {info['architecture']} on {info['device']} with {runtime} in "
            f"{info['dtype']} ({info['dtype_reason']}), preprocessing on the {info['preprocess']}, "
            f"fingerprint {info['fingerprint']['id']}, map {len(kmap)} keyframes, index {s.index.index}")
        self._create_interfaces()

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
            "markers": publisher(MarkerArray, "~/markers", reliable),
            "diagnostics": publisher(DiagnosticArray, "/diagnostics", reliable),
        }
        service = functools.partial(self.create_service, Trigger, callback_group=self._cb_services)
        self._service_handles = [service(f"~/{name}", getattr(self, f"_srv_{name}"))
                                 for name in ("start_recording", "stop_recording", "save_map", "load_map")]

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
        return TransitionCallbackReturn.SUCCESS

    def _activate(self) -> None:
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(self._p("cameras.depth")),
                         reliability=ReliabilityPolicy.BEST_EFFORT if self._p("cameras.reliability") == "best_effort"
                         else ReliabilityPolicy.RELIABLE)
        topics = list(self._p("cameras.topics"))
        self._frames = LatestFrames(topics, min_period_s=lambda: self._p("cameras.min_period_s"))
        self.poses.clear()
        subscribe = functools.partial(self.create_subscription, callback_group=self._cb_sensors)
        for topic in topics:
            msg_type = CompressedImage if topic.rstrip("/").endswith("/compressed") else Image
            self._subs.append(subscribe(msg_type, topic, functools.partial(self._frames.put, topic), qos))
        resolved = [sub.topic_name for sub in self._subs]
        if self._p("pose.topic"):
            # best effort connects to reliable and best-effort odometry/GNSS publishers alike
            pose_type = conv.msg_class(POSE_KINDS[self._p("pose.type")])
            self._subs.append(subscribe(pose_type, self._p("pose.topic"), self._on_pose,
                                        QoSProfile(depth=50, reliability=ReliabilityPolicy.BEST_EFFORT)))
        self._worker_stop = threading.Event()
        self._worker = threading.Thread(target=self._work, args=(self._worker_stop,), name="dinomix-worker",
                                        daemon=True)
        self._worker.start()
        self._diag_timer = self.create_timer(float(self._p("diagnostics.period_s")), self._publish_diagnostics,
                                             callback_group=self._cb_timer)
        pose = f", pose source {self._subs[-1].topic_name}" if self._p("pose.topic") else ""
        self.get_logger().info(f"active: cameras {resolved}{pose}")

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._stop_worker()
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self.release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self.release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self.get_logger().error(f"error in state {state.label}: releasing everything, back to unconfigured")
        self.release()
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
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = None

    def release(self, save: bool = True) -> None:
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
        self.live = None
        self.encoder = None

    def _autosave(self) -> None:
        unsaved = self.live.unsaved if self.live is not None else 0
        if unsaved <= 0:
            return
        path = self._p("map.path")
        if not (path and self._p("map.autosave")):
            self.get_logger().warning(f"discarding {unsaved} unsaved keyframes (set map.path and map.autosave, or "
                                      "call ~/save_map before shutting down)")
            return
        ok, message = self._save(path)
        self._answer(Trigger.Response(), ok, f"autosave: {message}")

    # -------------------------------------------------------------------------------------------------------------
    # pose callback (camera callbacks only store the newest frame: LatestFrames.put)

    def _on_pose(self, msg: object) -> None:
        live = self.live
        try:
            sample = pose_from_msg(msg, self._p("pose.type"), utm_zone=live.utm_zone if live is not None else None,
                                   fallback_stamp_ns=self.get_clock().now().nanoseconds)
        except PoseMessageError as exc:
            self._counters["bad_poses"] += 1
            self.get_logger().warning(f"pose ignored: {exc}", throttle_duration_sec=5.0)
            return
        if not sample.frame_id:  # an empty header frame: name it after the topic
            sample = type(sample)(sample.stamp_ns, self._p("pose.topic"), sample.position, sample.orientation,
                                  sample.gps)
        self.poses.add(sample)

    # -------------------------------------------------------------------------------------------------------------
    # worker

    def _work(self, stop: threading.Event) -> None:
        frames = self._frames
        while batch := frames.get_ready(stop):
            try:
                self._process(batch)
            except Exception as exc:  # one bad batch must never stop the node
                self._counters["bad_images"] += len(batch)
                self.get_logger().error(f"{', '.join(c for c, _, _ in batch)}: frames dropped after an unexpected "
                                        f"error: {exc!r}", throttle_duration_sec=5.0)

    def _process(self, batch: list[tuple[str, object, float]]) -> None:
        """The waiting frames of one or more cameras: decode each, describe all in one forward pass, then localize
        each by itself."""
        started_at = time.monotonic()
        frames = [f for f in (self._decode(*item) for item in batch) if f is not None]
        if not frames:
            return
        timing: dict[str, float] = {}
        descriptors = self.encoder.describe_staged([f.staged for f in frames], timing)
        self._max_batch = max(self._max_batch, len(frames))
        for frame, descriptor in zip(frames, descriptors):
            frame.stages["preprocess"] += timing["preprocess_s"]  # the batch's on-device share
            frame.stages["model"] = timing["model_s"]
            try:
                self._localize_frame(frame, descriptor)
            except Exception as exc:  # one bad frame must not cost the other cameras' frames of its batch
                self._counters["bad_images"] += 1
                self.get_logger().error(f"{frame.camera}: frame dropped after an unexpected error: {exc!r}",
                                        throttle_duration_sec=5.0)
                continue
            done = time.monotonic()
            self._health.record(done - frame.received_at, done - started_at, frame.stages)

    def _decode(self, camera: str, msg: object, received_at: float) -> DecodedFrame | None:
        """Decode and stage one message (None for a bad image: logged and counted)."""
        t0 = time.perf_counter()
        stamp_ns = header_stamp_ns(msg, fallback_ns=self.get_clock().now().nanoseconds)
        try:
            image, encoding = decode_image_msg(msg)
            t1 = time.perf_counter()
            staged = self.encoder.stage(image, encoding)
        except ImageDecodeError as exc:
            self._counters["bad_images"] += 1
            self.get_logger().warning(f"{camera}: bad image skipped: {exc}", throttle_duration_sec=5.0)
            return None
        stages = {"decode": t1 - t0, "preprocess": time.perf_counter() - t1}
        return DecodedFrame(camera, stamp_ns, image, encoding, staged, received_at, stages)

    def _localize_frame(self, frame: DecodedFrame, descriptor: np.ndarray) -> None:
        """One described frame, as if it had come alone: pose at its stamp -> ``LiveMap.process`` -> publish."""
        live = self.live
        if live is None:
            return
        t0 = time.perf_counter()
        stamp_ns, camera = frame.stamp_ns, frame.camera
        outcome = live.process(camera, stamp_ns, descriptor, self.poses.at(stamp_ns) if live.needs_pose else None)
        t1 = time.perf_counter()
        frame.stages.setdefault("verify", 0.0)  # no geometric verification (yet)
        self._counters["processed"] += 1
        self._publish(outcome)
        frame.stages.update(search=t1 - t0, publish=time.perf_counter() - t1)
        if outcome.time_jump_s is not None:
            self.get_logger().info(f"{camera}: image time jumped back by {outcome.time_jump_s:.1f} s: restarting "
                                   "its keyframe gate and match consistency", throttle_duration_sec=5.0)
        if outcome.record_error is not None:
            self.get_logger().error(f"{camera}: keyframe not recorded: {outcome.record_error}",
                                    throttle_duration_sec=5.0)

    def _publish(self, outcome: FrameOutcome) -> None:
        result = outcome.result
        self._outputs["matches"].publish(conv.matches_msg(result))
        if self._p("output.markers"):
            self._outputs["markers"].publish(conv.markers_msg(result))
        if outcome.publish_prior:
            self._outputs["pose_prior"].publish(conv.pose_prior_msg(result.prior, result.stamp_ns))
        if outcome.publish_loop_closure:
            self._outputs["loop_closure"].publish(conv.loop_closure_msg(result.stamp_ns, result.best.stamp_ns))

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
        self.live.start_recording()
        source = self._p("pose.topic") or "no pose source (keyframes without poses, time gating only)"
        return self._answer(response, True, f"recording keyframes from {list(self._p('cameras.topics'))} with "
                                            f"{source}; map has {len(self.live)}")

    def _srv_stop_recording(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if self.live is None:
            return self._answer(response, False, "not configured")
        was, s = self.live.stop_recording(), self.live.stats()
        return self._answer(response, True, f"stopped recording: {s['keyframes_recorded']} keyframes added "
                                            f"({self.live.counters['frames_without_pose']} frames had no pose); map "
                                            f"has {s['map_keyframes']}, {s['keyframes_unsaved']} unsaved" if was else
                            f"was not recording; map has {s['map_keyframes']}")

    def _save(self, path: str) -> tuple[bool, str]:
        """Save the map to ``path``; (success, message). A failure keeps every keyframe in memory."""
        try:
            saved = self.live.save(path)
        except Exception as exc:  # reported to the caller; the previous map on disk is intact
            return False, f"save to {path} failed: {exc}"
        return True, f"saved {saved.keyframes} keyframes to {path} in {saved.seconds:.2f} s"

    def _srv_save_map(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        path = self._p("map.path")
        if self.live is None:
            return self._answer(response, False, "not configured")
        if not path:
            return self._answer(response, False, "map.path is empty: set it (ros2 param set <node> map.path "
                                                 "/path/to/map.dinomap)")
        return self._answer(response, *self._save(path))

    def _srv_load_map(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        path, live = self._p("map.path"), self.live
        if live is None or self.encoder is None:
            return self._answer(response, False, "not configured")
        if live.unsaved > 0:
            return self._answer(response, False, f"the current map has {live.unsaved} unsaved keyframes: call "
                                                 "~/save_map first")
        if not path or not Path(path).exists():
            return self._answer(response, False, f"map.path {path!r} does not exist")
        try:  # load and index outside the map lock: the camera pipeline keeps matching the old map meanwhile
            kmap = KeyframeMap.load(path, expected_fingerprint=self.encoder.fingerprint.to_dict())
            live.replace_map(kmap, index_for_map(kmap, kind=live.index_config.index,
                                                 device=live.index_config.search_device))
            self._apply_calibration(live.matcher_config.min_similarity, self._p("matching.min_similarity"))
        except Exception as exc:  # the old map stays in use
            return self._answer(response, False, f"load of {path} failed, keeping the current map: {exc}")
        return self._answer(response, True, f"loaded {len(kmap)} keyframes from {path} (fingerprint "
                                            f"{kmap.fingerprint['id']})")

    # -------------------------------------------------------------------------------------------------------------
    # diagnostics

    def _publish_diagnostics(self) -> None:
        encoder, live = self.encoder, self.live
        info = encoder.describe_info() if encoder is not None else {}
        extra = {"mode": self._p("mode"), "device": info.get("device", ""), "backend": info.get("backend", ""),
                 "providers": ",".join(info.get("providers", [])), "dtype": info.get("dtype", ""),
                 "dtype_reason": info.get("dtype_reason", ""), "preprocess": info.get("preprocess", ""),
                 "cuda_graph": info.get("cuda_graph", False), "max_batch": self._max_batch,
                 "gpu_memory_mib": encoder.gpu_memory_mib() if encoder is not None else math.nan,
                 "last_best_score": live.last_best_similarity if live is not None else math.nan,
                 "model_fingerprint": info.get("fingerprint", {}).get("id", "")}
        counters = {k: v for k, v in self._counters.items() if k != "processed"}
        level, message, values = self._health.report(
            self._frames.counts(), self._counters["processed"], counters, live.stats() if live is not None else {},
            extra, empty_map_warns=self._p("mode") == "localize")
        self._outputs["diagnostics"].publish(conv.diagnostics_msg(
            self.get_clock().now().nanoseconds, f"{self.get_name()}: place recognition", info.get("device", ""),
            level, message, values))


def main(args: list[str] | None = None) -> None:
    """Entry point of ``localize_node``: Ctrl-C (SIGINT) shuts down cleanly (and autosaves, see map.autosave)."""
    run_lifecycle_node(LocalizerNode, args)


if __name__ == "__main__":
    main()
