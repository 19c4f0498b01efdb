"""The rclpy layer: thin nodes over the ROS-free core (conversions, the localizer node, bag replay, the demo)."""

import os

# torch and faiss each bring an OpenMP runtime; with the default ACTIVE wait policy their idle threads spin and
# compete for the robot's cores (measured: batch-1 exact search 18 ms -> 32 ms on 2 cores). Set before either loads;
# an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
