"""The rclpy layer: thin nodes over the ROS-free core (conversions, the localizer node, bag replay, the demo)."""

from dinomix_ros.util.openmp import sleep_idle_threads

sleep_idle_threads()  # before torch and faiss load
