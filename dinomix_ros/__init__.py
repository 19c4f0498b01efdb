"""DINO-Mix visual place recognition for ROS 2.

Everything outside :mod:`dinomix_ros.ros` is ROS-free and never imports rclpy: the model, preprocessing, the
inference engine, the keyframe map, search, matching and evaluation can be used from plain Python and the
``dinomix`` command line.
"""

__version__ = "0.1.0"
