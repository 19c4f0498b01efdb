"""Build a map while the robot drives: localize_node recording keyframes paired with a pose topic.

    ros2 launch dinomix_ros build_map.launch.py checkpoint:=/path/model.ckpt map_path:=/path/office.dinomap \\
        camera_topics:=/front/image_raw pose_topic:=/amcl_pose pose_type:=pose_cov
    ros2 service call /dinomix_localizer/stop_recording std_srvs/srv/Trigger
    ros2 service call /dinomix_localizer/save_map std_srvs/srv/Trigger

Same launch arguments as localize.launch.py; in addition the map is created at map_path if it does not exist
(map.create_if_missing) and recording starts at activation (recording.autostart). The node keeps localizing
against the keyframes it already has while it records.
"""

import importlib.util
import os

from launch import LaunchDescription
from launch.substitutions import PathJoinSubstitution
from launch_ros.substitutions import FindPackageShare


def _localize_launch():
    """The sibling localize.launch.py (installed beside this file), for its arguments and node factory."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "localize.launch.py")
    spec = importlib.util.spec_from_file_location("dinomix_localize_launch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate_launch_description() -> LaunchDescription:
    localize = _localize_launch()
    default_params = PathJoinSubstitution([FindPackageShare("dinomix_ros"), "config", "localize.yaml"])
    return LaunchDescription(localize.launch_entities(
        default_params, extra_parameters={"map.create_if_missing": True, "recording.autostart": True}))
