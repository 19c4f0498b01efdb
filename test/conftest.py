"""Shared fixtures: seeded data, the real third-party data folder, and the ROS environment of this process."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from dinomix_ros.ros import transport  # no rclpy: nothing reads the environment before the lines below

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]

# Before anything creates a DDS participant: no discovery traffic leaves this machine (ROS_LOCALHOST_ONLY is
# ignored by this ROS 2 release), rclpy logs go to a temporary folder, and large images use shared memory.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"  # the only RMW of the wheels, whatever the shell says
if "ROS_LOG_DIR" not in os.environ:  # a folder of this run's own, removed when it ends
    os.environ["ROS_LOG_DIR"] = tempfile.mkdtemp(prefix="dinomix_test_roslog_")
    atexit.register(shutil.rmtree, os.environ["ROS_LOG_DIR"], ignore_errors=True)
# The transport the launch files give the node: the shell's own Fast DDS settings, else the large-image profile
# through the one variable this distribution's Fast DDS reads (dinomix_ros.ros.transport, imported without rclpy).
os.environ.update(transport.choose().env)
# Idle OpenMP threads sleep, as in the node and the CLI (dinomix_ros.util.openmp): tests that import the maps
# modules alone would otherwise spin faiss's and torch's idle threads, several times slower on a loaded 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def data_dir() -> Path:
    """Real third-party data copied from shared/data (see test/data/README.md and each folder's licence)."""
    return DATA


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1338)
