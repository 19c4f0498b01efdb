"""Start dinomix_ros' localize_node (a lifecycle node): cameras in; place matches, pose priors, loop closures out.

    ros2 launch dinomix_ros localize.launch.py checkpoint:=/path/dinov2_vitb14_mix.ckpt map_path:=/path/office.dinomap
    ros2 launch dinomix_ros localize.launch.py ... camera_topics:=/front/image_raw,/rear/image_raw/compressed \\
        pose_prior_topic:=/initialpose

Empty launch arguments leave the parameters file's value alone. camera_topics sets cameras.topics (a topic ending
in /compressed is read as sensor_msgs/CompressedImage); relative names follow `namespace`. With autostart:=false the
node waits for a lifecycle manager (`ros2 lifecycle set /dinomix_localizer configure`).

Camera frames between processes (dinomix_ros.ros.transport): unless the robot configures Fast DDS itself (a profile
or transport variable in the environment: then it is left alone), the node gets the large-image profile
(config/fastdds_large_images.xml: 32 MB shared memory, UDP on every interface; large_image_profile:=false turns it
off). The camera's side decides whether best-effort frames arrive: camera_launch:=<launch file> starts the camera
driver with the same transport (camera_launch_args:="name:=value ..." are its arguments); for a driver started
elsewhere, `eval "$(ros2 run dinomix_ros transport_env)"` in its shell.

Stopping: SIGINT (Ctrl-C) stops the node cleanly (it saves unsaved keyframes first, see map.autosave). `ros2 launch`
itself dies at once on SIGTERM (what docker stop and systemctl stop send) and orphans its nodes; with
graceful_sigterm (default true) this launch handles SIGTERM like Ctrl-C instead (README: Stopping).
"""

import importlib.util
import os
import signal
import sys

from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, GroupAction, IncludeLaunchDescription, LogInfo, OpaqueFunction,
                            SetEnvironmentVariable)
from launch.events import Shutdown
from launch.launch_description_sources import AnyLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.substitutions import FindPackageShare


def _load_transport():
    """dinomix_ros.ros.transport, loaded by path: importing the dinomix_ros.ros package would set its OpenMP
    variables in this launch process, and every process launched with it would inherit them."""
    name = "dinomix_ros_launch_transport"
    if name not in sys.modules:
        origin = importlib.util.find_spec("dinomix_ros").origin
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(origin), "ros",
                                                                         "transport.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


transport = _load_transport()

# launch argument -> node parameter, applied only when the argument is not empty
PARAMETER_ARGS = {
    "map_path": "map.path",
    "checkpoint": "model.checkpoint",
    "device": "model.device",
    "dtype": "model.dtype",
    "backend": "model.backend",
    "onnx": "model.onnx",
    "mode": "mode",
    "pose_topic": "pose.topic",
    "pose_type": "pose.type",
    "camera_reliability": "cameras.reliability",
}
BOOL_ARGS = {"random_weights": "model.random_weights", "autostart": "autostart",
             "create_if_missing": "map.create_if_missing", "record": "recording.autostart"}
FLOAT_ARGS = {"pose_max_gap_s": "pose.max_gap_s", "min_similarity": "matching.min_similarity"}
# launch argument -> the node's topic it remaps
REMAP_ARGS = {
    "pose_prior_topic": "~/pose_prior",
    "loop_closure_topic": "~/loop_closure",
}


def declare_arguments(default_params: str) -> list:
    arg = DeclareLaunchArgument
    return [
        arg("params_file", default_value=default_params, description="node parameters (YAML)"),
        arg("namespace", default_value="", description="namespace of the node and of its relative topics"),
        arg("node_name", default_value="dinomix_localizer", description="node name"),
        arg("use_sim_time", default_value="false",
            description="node clock from /clock (used only for images and poses with a zero header stamp)"),
        arg("log_level", default_value="info", description="debug, info, warn or error"),
        arg("large_image_profile", default_value="true",
            description="give the node (and camera_launch) the large-image Fast DDS profile (config/"
                        "fastdds_large_images.xml) unless the robot configures Fast DDS itself"),
        arg("camera_launch", default_value="",
            description="a camera driver's launch file (a path, or <package>/<file> in the package's launch "
                        "folder), started with the node's Fast DDS transport"),
        arg("camera_launch_args", default_value="", description="arguments of camera_launch: 'name:=value ...'"),
        arg("graceful_sigterm", default_value="true",
            description="SIGTERM (docker stop, systemctl stop) stops this launch like Ctrl-C: the node saves first"),
        arg("map_path", default_value="", description="map directory (map.path)"),
        arg("create_if_missing", default_value="", description="true: start an empty map at map_path if there is "
                                                               "none (map.create_if_missing)"),
        arg("checkpoint", default_value="", description="DINO-Mix weights (model.checkpoint)"),
        arg("device", default_value="", description="auto, cpu or cuda (model.device)"),
        arg("dtype", default_value="", description="auto, float32, float16 or bfloat16 (model.dtype)"),
        arg("backend", default_value="", description="torch or onnxruntime (model.backend)"),
        arg("onnx", default_value="", description="exported ONNX file (model.onnx)"),
        arg("mode", default_value="", description="localize or self_map (mode)"),
        arg("camera_topics", default_value="",
            description="comma-separated image topics (cameras.topics); ending in /compressed: CompressedImage"),
        arg("camera_reliability", default_value="",
            description="auto (match the publishers), best_effort or reliable (cameras.reliability)"),
        arg("pose_topic", default_value="", description="pose source topic (pose.topic)"),
        arg("pose_type", default_value="", description="odometry, pose_stamped, pose_cov or navsatfix (pose.type)"),
        arg("pose_max_gap_s", default_value="", description="pose pairing tolerance in seconds (pose.max_gap_s)"),
        arg("min_similarity", default_value="", description="acceptance threshold (matching.min_similarity)"),
        arg("record", default_value="", description="true: record keyframes from activation (recording.autostart)"),
        arg("random_weights", default_value="",
            description="true: random weights, for demos only (model.random_weights)"),
        arg("autostart", default_value="", description="configure+activate at start (autostart)"),
        arg("pose_prior_topic", default_value="", description="remap ~/pose_prior (e.g. /initialpose for nav2 AMCL)"),
        arg("loop_closure_topic", default_value="",
            description="remap ~/loop_closure (e.g. /lio_loop/loop_closure_detection for LIO-SAM)"),
    ]


def make_node(context, extra_parameters: dict | None = None) -> list:
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    overrides: dict = {param: arg(name) for name, param in PARAMETER_ARGS.items() if arg(name)}
    overrides.update({param: arg(name).lower() == "true" for name, param in BOOL_ARGS.items() if arg(name)})
    overrides.update({param: float(arg(name)) for name, param in FLOAT_ARGS.items() if arg(name)})
    if arg("camera_topics"):
        overrides["cameras.topics"] = [t.strip() for t in arg("camera_topics").split(",") if t.strip()]
    overrides.update(extra_parameters or {})
    overrides["use_sim_time"] = arg("use_sim_time").lower() == "true"
    remappings = [(topic, arg(name)) for name, topic in REMAP_ARGS.items() if arg(name)]
    profile = PathJoinSubstitution([FindPackageShare("dinomix_ros"), "config", transport.PROFILE_NAME])
    choice = transport.choose(os.environ, enabled=arg("large_image_profile").lower() == "true",
                              profile=profile.perform(context))
    env = choice.env  # only the variable this distribution's Fast DDS reads; nothing if the robot set its own
    actions = [LogInfo(msg=f"dinomix_ros: node transport: {choice.summary}")]
    if arg("camera_launch"):
        actions.append(camera_driver(arg("camera_launch"), arg("camera_launch_args"), env))
    return actions + [LifecycleNode(
        package="dinomix_ros",
        executable="localize_node",
        name=arg("node_name"),
        namespace=arg("namespace"),
        parameters=[arg("params_file"), overrides],
        remappings=remappings,
        additional_env=env,
        arguments=["--ros-args", "--log-level", arg("log_level")],
        output="screen",
        emulate_tty=True,
    )]


def camera_driver(launch_file: str, arguments: str, env: dict) -> GroupAction:
    """A camera driver's launch file, included with the node's transport variables set for its processes only."""
    if not os.path.isfile(launch_file) and not os.path.isabs(launch_file) and launch_file.count("/") == 1:
        from ament_index_python.packages import get_package_share_directory

        package, name = launch_file.split("/")
        launch_file = os.path.join(get_package_share_directory(package), "launch", name)
    pairs = [item.split(":=", 1) for item in arguments.split()]
    bad = [" ".join(p) for p in pairs if len(p) != 2 or not p[0]]
    if bad:
        raise ValueError(f"camera_launch_args: expected 'name:=value ...', got {bad}")
    return GroupAction([*(SetEnvironmentVariable(name, value) for name, value in env.items()),
                        IncludeLaunchDescription(AnyLaunchDescriptionSource(launch_file),
                                                 launch_arguments=[tuple(p) for p in pairs])], scoped=True)


def sigterm_as_sigint(context) -> list:
    """With graceful_sigterm: SIGTERM to `ros2 launch` shuts it down like Ctrl-C (SIGINT to its processes, which save
    and exit, then launch's own escalation after its sigterm_timeout), instead of launch dying at once.

    launch (Humble to Kilted) installs no Python handler for SIGTERM, so the default action ends the launch process
    and orphans its nodes (docker stop, systemctl stop with KillMode=mixed or process); as PID 1 of a container it
    ignores SIGTERM until docker's SIGKILL. Here the launch service's own signal manager (launch.utilities.
    signal_management, which receives signals through Python's wakeup fd) gets a SIGTERM handler that emits
    launch's Shutdown event, and a Python-level handler makes the signal reach it. If this launch version has no
    such manager, SIGTERM keeps its default and a warning says to send SIGINT.
    """
    if LaunchConfiguration("graceful_sigterm").perform(context).lower() != "true":
        return []
    try:
        from launch.utilities.signal_management import AsyncSafeSignalManager

        manager = getattr(AsyncSafeSignalManager, "_AsyncSafeSignalManager__current", None)
    except ImportError:
        manager = None
    if manager is None or not callable(getattr(manager, "handle", None)):
        return [LogInfo(msg="dinomix_ros: graceful_sigterm: this launch version's signal handling is not the known "
                            "one: SIGTERM ends launch at once; stop it with SIGINT (README: Stopping)")]
    stopping = []

    def on_sigterm(signum: int) -> None:
        if not stopping:
            stopping.append(signum)
            context.emit_event_sync(Shutdown(reason="SIGTERM (graceful_sigterm)", due_to_sigint=False))

    manager.handle(signal.SIGTERM, on_sigterm)
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the C handler then wakes launch's manager
    return []


def launch_entities(default_params, extra_parameters: dict | None = None) -> list:
    """Arguments, SIGTERM handling and the node (with its camera driver): what both launch files start."""
    return [*declare_arguments(default_params), OpaqueFunction(function=sigterm_as_sigint),
            OpaqueFunction(function=make_node, kwargs={"extra_parameters": extra_parameters})]


def generate_launch_description() -> LaunchDescription:
    default_params = PathJoinSubstitution([FindPackageShare("dinomix_ros"), "config", "localize.yaml"])
    return LaunchDescription(launch_entities(default_params))
