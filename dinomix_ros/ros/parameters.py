"""The localizer node's parameters: one table, derived from the settings the core declares.

Each parameter is declared once, on a settings dataclass (:mod:`dinomix_ros.settings`): the core's
(:class:`~dinomix_ros.model.encoder.EncoderConfig`, :class:`~dinomix_ros.localization.matching.MatcherConfig`, ...)
and the node's own below (cameras, pose source, node behaviour). :data:`PARAMETERS` puts them in one table, from
which come the ROS parameter descriptors (:func:`descriptor`: description, ``FloatingPointRange``/``IntegerRange``,
``read_only`` for values read only at configure), the validation at start and at ``ros2 param set``
(:func:`validate`), ``config/localize.yaml`` and the README's table (:func:`yaml_text`, :func:`markdown_table`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType

from dinomix_ros.imaging.features import FeatureConfig
from dinomix_ros.imaging.preprocess import ImageConfig
from dinomix_ros.localization.camera_pose import CameraMountConfig, VerifiedPriorConfig
from dinomix_ros.localization.input_watch import InputHealthConfig
from dinomix_ros.localization.extrinsics import ExtrinsicsConfig
from dinomix_ros.localization.live_map import OutputConfig
from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.localization.relocalization import RelocalizationConfig
from dinomix_ros.localization.verification import VerificationConfig
from dinomix_ros.maps.fleet.config import FleetConfig
from dinomix_ros.maps.index import IndexConfig
from dinomix_ros.maps.keyframes import StorageConfig
from dinomix_ros.maps.sources.posemsg import POSE_KINDS
from dinomix_ros.maps.sources.poses import KeyframeGateConfig, PosePairingConfig
from dinomix_ros.model.checkpoint import ModelSource
from dinomix_ros.model.encoder import EncoderConfig
from dinomix_ros.ros.camera_qos import RELIABILITY_MODES
from dinomix_ros.settings import (
    Entry,
    SettingError,
    check,
    coerce,
    problem,
    render_markdown,
    render_yaml,
    setting,
    table,
)

__all__ = [
    "NodeConfig",
    "NodeMapConfig",
    "CameraConfig",
    "PoseSourceConfig",
    "RecordingConfig",
    "NodeOutputConfig",
    "DiagnosticsConfig",
    "RelocalizationConfig",
    "InputHealthConfig",
    "PARAMETERS",
    "Entry",
    "descriptor",
    "validate",
    "RUNTIME_CONFIGS",
    "runtime_change_problem",
    "apply_runtime",
    "build",
    "config_problem",
    "NodeSettings",
    "yaml_text",
    "markdown_table",
]


@dataclass(frozen=True)
class NodeConfig:
    """How the node runs."""

    autostart: bool = setting(True, "configure and activate at start-up; false: wait for lifecycle transitions",
                              reconfigure=True)
    mode: str = setting("localize", "localize: match against the loaded map; self_map: record a map of this run and "
                                    "match each frame against the robot's own past (loop closure)",
                        choices=("localize", "self_map"), reconfigure=True)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class NodeMapConfig:
    """Where the node's map lives."""

    SETTINGS_GROUP: ClassVar[str] = "map"

    path: str = setting("", "map directory loaded at configure and written by ~/save_map (and read by ~/load_map); "
                            "empty: start with an empty map")
    create_if_missing: bool = setting(False, "if map.path does not exist, start with an empty map (to be saved "
                                             "there) instead of failing configuration", reconfigure=True)
    autosave: bool = setting(True, "save keyframes recorded since the last save to map.path when the node shuts "
                                   "down or cleans up (so Ctrl-C does not lose a mapping run)")
    verify: str = setting("background", "when the content of the map's descriptor and feature chunks is checked at "
                                        "configure (sha256 per block, unit descriptors): background (the node is "
                                        "active at once; a failed check stops matching against the map, /diagnostics "
                                        "ERROR) or full (before configure completes: about a minute per million "
                                        "keyframes). ~/load_map always checks before switching maps",
                          choices=("background", "full"), reconfigure=True)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class CameraConfig:
    """The camera subscriptions."""

    SETTINGS_GROUP: ClassVar[str] = "cameras"

    topics: tuple[str, ...] = setting(("camera/image_raw",), "image topics (relative names follow the node's "
                                                             "namespace); a topic whose resolved name ends in "
                                                             "/compressed is read as sensor_msgs/CompressedImage, "
                                                             "any other as sensor_msgs/Image", nonempty=True,
                                      reconfigure=True)
    reliability: str = setting("auto", "camera subscription QoS reliability: auto (reliable when every publisher of "
                                       "the topic is, else best effort; re-checked when publishers change), or force "
                                       "best_effort or reliable", choices=RELIABILITY_MODES, reconfigure=True)
    depth: int = setting(1, "camera subscription queue depth (the node keeps only the newest frame anyway)",
                         min=1, max=1000, reconfigure=True)
    min_period_s: float = setting(0.0, "process at most one frame per camera per this many seconds of the node's "
                                       "clock (simulated time with use_sim_time, e.g. a bag replayed with /clock; "
                                       "0: as fast as the model runs)", min=0.0, max=3600.0)
    # default [""], not []: ROS cannot declare a parameter whose default is an empty (untyped) array
    depth_topics: tuple[str, ...] = setting(("",), "aligned depth image topic per camera, in the order of "
                                                   "cameras.topics (16UC1 mm or 32FC1 m, registered to the color "
                                                   "image); \"\" (or no entry) for a camera without. Makes verified "
                                                   "pose priors metric", reconfigure=True)
    use_camera_info: bool = setting(True, "subscribe to each camera's camera_info (the image topic's namespace + "
                                          "camera_info) for verification with intrinsics and pose priors",
                                    reconfigure=True)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class PoseSourceConfig:
    """The pose source used to record keyframes and to gate matches."""

    SETTINGS_GROUP: ClassVar[str] = "pose"

    topic: str = setting("", "pose source for recording keyframes and for gating; empty: none", reconfigure=True)
    type: str = setting("odometry", "message type of pose.topic: " + ", ".join(POSE_KINDS), choices=tuple(POSE_KINDS),
                        reconfigure=True)
    frame_id: str = setting("", "frame of pose-source messages whose header.frame_id is empty (e.g. odom); empty: "
                                "such poses are refused (counted in /diagnostics, logged once)")

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class RecordingConfig:
    """When recording starts."""

    SETTINGS_GROUP: ClassVar[str] = "recording"

    autostart: bool = setting(False, "start recording keyframes at activation (as ~/start_recording does)",
                              reconfigure=True)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class NodeOutputConfig:
    """Optional outputs."""

    SETTINGS_GROUP: ClassVar[str] = "output"

    markers: bool = setting(True, "publish ~/markers (RViz)")

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class DiagnosticsConfig:
    """The /diagnostics status."""

    SETTINGS_GROUP: ClassVar[str] = "diagnostics"

    period_s: float = setting(1.0, "period of /diagnostics", positive=True, max=3600.0, reconfigure=True)

    def __post_init__(self) -> None:
        check(self)


#: Every parameter of the node, in the order of config/localize.yaml: qualified name -> Entry.
PARAMETERS: dict[str, Entry] = table(
    NodeConfig,
    ModelSource,
    (EncoderConfig, ("device", "dtype", "backend", "onnx", "preprocess", "cuda_graphs")),
    NodeMapConfig,
    IndexConfig,
    StorageConfig,
    CameraConfig,
    ImageConfig,
    ExtrinsicsConfig,
    PoseSourceConfig,
    PosePairingConfig,
    RecordingConfig,
    KeyframeGateConfig,
    MatcherConfig,
    FeatureConfig,
    VerificationConfig,
    VerifiedPriorConfig,
    CameraMountConfig,
    OutputConfig,
    NodeOutputConfig,
    RelocalizationConfig,
    DiagnosticsConfig,
    InputHealthConfig,  # the same group as DiagnosticsConfig: one diagnostics block in config/localize.yaml
    FleetConfig,
)

_ROS_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
              float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
              tuple: ParameterType.PARAMETER_STRING_ARRAY}


def descriptor(entry: Entry) -> ParameterDescriptor:
    """The ROS descriptor of one parameter: type, description, limits, range, read-only."""
    spec = entry.spec
    limits = spec.limits_text()
    desc = ParameterDescriptor(name=entry.name, type=_ROS_TYPES[entry.type], description=spec.description,
                               additional_constraints=limits + ("; read at configure" if spec.reconfigure else ""),
                               read_only=spec.reconfigure)
    low = 0.0 if spec.positive else spec.min
    if entry.type is int and low is not None and spec.max is not None:
        desc.integer_range = [IntegerRange(from_value=int(low), to_value=int(spec.max), step=1)]
    elif entry.type is float and low is not None and spec.max is not None:
        desc.floating_point_range = [FloatingPointRange(from_value=float(low), to_value=float(spec.max), step=0.0)]
    return desc


def validate(values: dict[str, Any]) -> str | None:
    """Why these parameter values cannot be taken (the first reason), or None: the settings' own checks, per value
    and for the settings objects they build (e.g. checkpoint and random weights both set)."""
    for name, value in values.items():
        entry = PARAMETERS.get(name)
        if entry is None:
            continue
        value = coerce(value, entry.type)
        reason = problem(entry, value)
        if reason:
            return reason
        if name in _TOPIC_PARAMETERS:
            reason = _topic_problem(name, value)
            if reason:
                return reason
    return None


_TOPIC_PARAMETERS = ("cameras.topics", "pose.topic", "cameras.depth_topics", "relocalization.trigger_topic",
                     "relocalization.consumer_topic")


def _topic_problem(name: str, value: str | tuple[str, ...]) -> str | None:
    from rclpy.exceptions import InvalidTopicNameException
    from rclpy.validate_topic_name import validate_topic_name

    for topic in (value if isinstance(value, tuple) else (value,) if value else ()):
        if not topic:  # cameras.depth_topics: "" is a camera without depth (cameras.topics refuses empty entries)
            continue
        try:
            validate_topic_name(topic)
        except InvalidTopicNameException as exc:
            return f"{name}: {topic!r} is not a valid topic name ({exc})"
    return None


def build(cls: type, values: dict[str, Any]) -> Any:
    """The settings object ``cls`` from parameter values (qualified names); missing fields keep their defaults.

    Raises:
        SettingError: a refused value.
    """
    group = getattr(cls, "SETTINGS_GROUP", "")
    kwargs = {}
    for f in dataclasses.fields(cls):
        name = f"{group}.{f.name}" if group else f.name
        if name in values:
            kwargs[f.name] = coerce(values[name], PARAMETERS[name].type)
    return cls(**kwargs)


@dataclass(frozen=True)
class NodeSettings:
    """Every settings object of the node, built from its parameter values."""

    node: NodeConfig
    model: ModelSource
    encoder: EncoderConfig
    image: ImageConfig
    map: NodeMapConfig
    index: IndexConfig
    storage: StorageConfig
    cameras: CameraConfig
    extrinsics: ExtrinsicsConfig
    pose: PoseSourceConfig
    pairing: PosePairingConfig
    recording: RecordingConfig
    gate: KeyframeGateConfig
    matcher: MatcherConfig
    features: FeatureConfig
    verification: VerificationConfig
    verified_prior: VerifiedPriorConfig
    mount: CameraMountConfig
    output: OutputConfig
    node_output: NodeOutputConfig
    relocalization: RelocalizationConfig
    diagnostics: DiagnosticsConfig
    fleet: FleetConfig
    input_health: InputHealthConfig

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> NodeSettings:
        """Build and check everything (value by value, then each object's cross-field rules).

        Raises:
            SettingError: the first refused value, with a one-line reason.
        """
        reason = validate(values)
        if reason:
            raise SettingError("", reason)
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: build(hints[f.name], values) for f in dataclasses.fields(cls)})


def config_problem(values: dict[str, Any], classes: Iterable[type]) -> str | None:
    """Build each class from ``values`` and return the first refusal (cross-field rules included), or None."""
    for cls in classes:
        try:
            build(cls, values)
        except SettingError as exc:
            return str(exc)
    return None


#: The settings a running node applies at once (``ros2 param set``); the others are read at configure.
RUNTIME_CONFIGS = (MatcherConfig, OutputConfig, KeyframeGateConfig, PosePairingConfig, VerificationConfig,
                   VerifiedPriorConfig, CameraMountConfig, RelocalizationConfig, InputHealthConfig,
                   ExtrinsicsConfig)


def runtime_change_problem(changed: dict[str, Any], values: dict[str, Any]) -> str | None:
    """Why a parameter change is refused (all or nothing: the same rules as at start, cross-field rules of the
    run-time settings included), or None. ``values``: every parameter's value after the change."""
    return validate(changed) or config_problem(values, RUNTIME_CONFIGS)


def apply_runtime(live: Any, poses: Any, values: dict[str, Any], changed: dict[str, Any]) -> None:
    """Apply the run-time settings in ``values`` to a live map (None: not configured) and the pose buffer; the
    keyframe gates restart only when a ``recording.*`` parameter changed."""
    if live is not None:
        live.set_matcher_config(build(MatcherConfig, values))
        live.set_output_config(build(OutputConfig, values))
        live.set_verification_config(build(VerificationConfig, values))
        live.set_mounts(build(CameraMountConfig, values), build(ExtrinsicsConfig, values).parsed())
        live.prior_config = build(VerifiedPriorConfig, values)
        if any(name.startswith("recording.") for name in changed):
            live.set_gate_config(build(KeyframeGateConfig, values))
    poses.config = build(PosePairingConfig, values)


_YAML_HEADER = """\
Parameters of dinomix_ros' localize_node, every one with its default. Used by launch/localize.launch.py;
by hand: ros2 run dinomix_ros localize_node --ros-args --params-file config/localize.yaml
Names are the node's parameter names (nested keys join with '.'); `ros2 param describe` shows the same
descriptions and limits. Values are validated at start and when set; parameters marked "(read at configure)"
are read-only at run time, the others apply at once with `ros2 param set`.
Generated from dinomix_ros/ros/parameters.py (test_parameters checks that this file matches it)."""


def yaml_text() -> str:
    """config/localize.yaml as it must read."""
    return render_yaml(PARAMETERS, "/**", _YAML_HEADER)


def markdown_table() -> str:
    """The README's parameter table."""
    return render_markdown(PARAMETERS)
