"""Start dinomix_ros' localize_node (a lifecycle node): cameras in; place matches, pose priors, loop closures out.

    ros2 launch dinomix_ros localize.launch.py checkpoint:=/path/dinov2_vitb14_mix.ckpt map_path:=/path/office.dinomap
    ros2 launch dinomix_ros localize.launch.py ... camera_topics:=/front/image_raw,/rear/image_raw/compressed \\
        pose_prior_topic:=/initialpose

Empty launch arguments leave the parameters file's value alone. camera_topics sets cameras.topics (a topic ending
in /compressed is read as sensor_msgs/CompressedImage); relative names follow `namespace`. The node gets the
shared-memory Fast DDS profile for large images (config/fastdds_large_images.xml; large_image_profile:=false turns
it off): give the camera driver the same profile, or frames are lost between the two processes. With
autostart:=false the node waits for a lifecycle manager (`ros2 lifecycle set /dinomix_localizer configure`).
SIGINT (Ctrl-C) stops the node cleanly (it saves unsaved keyframes first, see map.autosave).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.substitutions import FindPackageShare

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
            description="use the shared-memory Fast DDS profile (config/fastdds_large_images.xml) for the node"),
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
    env = {}
    if arg("large_image_profile").lower() == "true":
        profile = PathJoinSubstitution(
            [FindPackageShare("dinomix_ros"), "config", "fastdds_large_images.xml"]).perform(context)
        # Fast DDS 3 (Kilted and later) reads the first variable, Fast DDS 2 (Humble, Jazzy) the second
        env.update(FASTDDS_DEFAULT_PROFILES_FILE=profile, FASTRTPS_DEFAULT_PROFILES_FILE=profile)
    return [LifecycleNode(
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


def generate_launch_description() -> LaunchDescription:
    default_params = PathJoinSubstitution([FindPackageShare("dinomix_ros"), "config", "localize.yaml"])
    return LaunchDescription([*declare_arguments(default_params), OpaqueFunction(function=make_node)])
