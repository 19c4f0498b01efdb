"""Start dinomix_ros' localize_node: cameras in, place matches / pose priors / loop closures out.

    ros2 launch dinomix_ros localize.launch.py checkpoint:=/path/dinov2_vitb14_mix.ckpt map_path:=/path/office.dinomap
    ros2 launch dinomix_ros localize.launch.py ... camera_topic:=/front/image_raw pose_prior_topic:=/initialpose

Empty launch arguments leave the parameters file's value alone. SIGINT (Ctrl-C) stops the node cleanly.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
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
}
BOOL_ARGS = {"random_weights": "model.random_weights", "autostart": "autostart"}
# launch argument -> the topic it remaps (default topic names in config/localize.yaml and the node)
REMAP_ARGS = {
    "camera_topic": "/camera/image_raw",
    "pose_prior_topic": "~/pose_prior",
    "loop_closure_topic": "~/loop_closure",
}


def declare_arguments(default_params: str) -> list:
    return [
        DeclareLaunchArgument("params_file", default_value=default_params, description="node parameters (YAML)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node and its topics"),
        DeclareLaunchArgument("node_name", default_value="dinomix_localizer", description="node name"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="node clock from /clock (used only for images with a zero header stamp)"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn or error"),
        DeclareLaunchArgument("map_path", default_value="", description="map directory (map.path)"),
        DeclareLaunchArgument("checkpoint", default_value="", description="DINO-Mix weights (model.checkpoint)"),
        DeclareLaunchArgument("device", default_value="", description="auto, cpu or cuda (model.device)"),
        DeclareLaunchArgument("dtype", default_value="",
                              description="auto, float32, float16 or bfloat16 (model.dtype)"),
        DeclareLaunchArgument("backend", default_value="", description="torch or onnxruntime (model.backend)"),
        DeclareLaunchArgument("onnx", default_value="", description="exported ONNX file (model.onnx)"),
        DeclareLaunchArgument("mode", default_value="", description="localize or self_map (mode)"),
        DeclareLaunchArgument("pose_topic", default_value="", description="pose source topic (pose.topic)"),
        DeclareLaunchArgument("pose_type", default_value="",
                              description="odometry, pose_stamped, pose_cov or navsatfix (pose.type)"),
        DeclareLaunchArgument("random_weights", default_value="",
                              description="true: random weights, for demos only (model.random_weights)"),
        DeclareLaunchArgument("autostart", default_value="", description="configure+activate at start (autostart)"),
        DeclareLaunchArgument("camera_topic", default_value="",
                              description="remap the default camera topic /camera/image_raw to this topic"),
        DeclareLaunchArgument("pose_prior_topic", default_value="",
                              description="remap ~/pose_prior (e.g. /initialpose for nav2 AMCL)"),
        DeclareLaunchArgument("loop_closure_topic", default_value="",
                              description="remap ~/loop_closure (e.g. /lio_loop/loop_closure_detection for LIO-SAM)"),
    ]


def make_node(context, extra_parameters: dict | None = None) -> list:
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    overrides = {param: arg(name) for name, param in PARAMETER_ARGS.items() if arg(name)}
    overrides.update({param: arg(name).lower() == "true" for name, param in BOOL_ARGS.items() if arg(name)})
    overrides.update(extra_parameters or {})
    overrides["use_sim_time"] = arg("use_sim_time").lower() == "true"
    remappings = [(topic, arg(name)) for name, topic in REMAP_ARGS.items() if arg(name)]
    return [Node(
        package="dinomix_ros",
        executable="localize_node",
        name=arg("node_name"),
        namespace=arg("namespace"),
        parameters=[arg("params_file"), overrides],
        remappings=remappings,
        arguments=["--ros-args", "--log-level", arg("log_level")],
        output="screen",
        emulate_tty=True,
    )]


def generate_launch_description() -> LaunchDescription:
    default_params = PathJoinSubstitution([FindPackageShare("dinomix_ros"), "config", "localize.yaml"])
    return LaunchDescription([*declare_arguments(default_params), OpaqueFunction(function=make_node)])
