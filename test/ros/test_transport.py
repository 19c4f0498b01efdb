"""Which Fast DDS transport a process gets (dinomix_ros.ros.transport): the robot's own settings are never
replaced, only the variable the distribution's Fast DDS reads is set, another middleware gets nothing; and what the
node and `transport_env` say about it. ROS-free: the rules run in the `ros2 launch` process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dinomix_ros.ros import transport

PROFILE = Path(__file__).resolve().parents[2] / "config" / transport.PROFILE_NAME


def _env(**extra: str) -> dict[str, str]:
    """An environment without any library path (the distribution is told by ROS_DISTRO or ``extra``)."""
    return {"PATH": "/usr/bin", "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp", **extra}


@pytest.mark.parametrize(("distro", "variable"), [
    ("humble", "FASTRTPS_DEFAULT_PROFILES_FILE"), ("jazzy", "FASTRTPS_DEFAULT_PROFILES_FILE"),
    ("kilted", "FASTDDS_DEFAULT_PROFILES_FILE")])
def test_only_the_variable_this_distributions_fast_dds_reads_is_set(tmp_path, distro: str, variable: str) -> None:
    """Fast DDS 3 warns on every start when FASTRTPS_* is set; Fast DDS 2 ignores FASTDDS_*."""
    choice = transport.choose(_env(ROS_DISTRO=distro), cwd=tmp_path, profile=PROFILE)
    assert choice.env == {variable: str(PROFILE)}, choice
    assert "large-image profile" in choice.summary and variable in choice.summary


def test_the_fast_dds_library_tells_the_version_without_ros_distro(tmp_path) -> None:
    """The PyPI wheels set no ROS_DISTRO: the library on the library path decides (libfastdds.so.3: Kilted)."""
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "libfastdds.so.3.2").write_bytes(b"")
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "libfastrtps.so.2.14").write_bytes(b"")
    assert transport.fastdds_major(_env(LD_LIBRARY_PATH=str(tmp_path / "v3"))) == 3
    assert transport.fastdds_major(_env(AMENT_PREFIX_PATH=str(tmp_path / "nowhere"),
                                        LD_LIBRARY_PATH=str(tmp_path / "v2"))) == 2
    assert transport.fastdds_major(_env(ROS_DISTRO="jazzy", LD_LIBRARY_PATH=str(tmp_path / "v3"))) == 2
    assert transport.fastdds_major() in (2, 3)  # this venv's wheels


def test_an_unknown_version_gets_both_variables(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(transport, "fastdds_major", lambda environ=None: None)
    choice = transport.choose(_env(), cwd=tmp_path, profile=PROFILE)
    assert set(choice.env) == set(transport.PROFILE_VARIABLES.values()) and "unknown" in choice.summary


@pytest.mark.parametrize("name", transport.ROBOT_SETTINGS)
def test_the_robots_own_settings_are_never_replaced(tmp_path, name: str) -> None:
    value = "/etc/robot/fastdds.xml" if name.endswith("FILE") else "1" if "QOS" in name else "LARGE_DATA"
    choice = transport.choose(_env(ROS_DISTRO="kilted", **{name: value}), cwd=tmp_path, profile=PROFILE)
    assert choice.env == {}, choice
    assert f"{name}={value}" in choice.summary or value in choice.summary, choice.summary
    assert "left as it is" in choice.summary


def test_a_default_profile_in_the_working_folder_is_the_robots_own(tmp_path) -> None:
    (tmp_path / "DEFAULT_FASTDDS_PROFILES.xml").write_text("<dds/>")
    choice = transport.choose(_env(ROS_DISTRO="kilted"), cwd=tmp_path, profile=PROFILE)
    assert choice.env == {} and "DEFAULT_FASTDDS_PROFILES.xml" in choice.summary
    skipped = transport.choose(_env(ROS_DISTRO="kilted", SKIP_DEFAULT_XML="1"), cwd=tmp_path, profile=PROFILE)
    assert skipped.env  # Fast DDS skips that file then: the profile applies


def test_another_middleware_or_the_profile_switched_off_gets_nothing(tmp_path) -> None:
    cyclone = transport.choose(_env(RMW_IMPLEMENTATION="rmw_cyclonedds_cpp"), cwd=tmp_path, profile=PROFILE)
    assert cyclone.env == {} and "rmw_cyclonedds_cpp" in cyclone.summary
    off = transport.choose(_env(ROS_DISTRO="jazzy"), enabled=False, cwd=tmp_path, profile=PROFILE)
    assert off.env == {} and "large_image_profile is off" in off.summary


def test_ros_defaults_make_a_process_without_profile(tmp_path) -> None:
    env = transport.ros_defaults(_env(ROS_DISTRO="kilted", FASTDDS_BUILTIN_TRANSPORTS="LARGE_DATA",
                                      FASTDDS_DEFAULT_PROFILES_FILE=str(PROFILE)))
    assert env["FASTDDS_DEFAULT_PROFILES_FILE"] == "" and "FASTDDS_BUILTIN_TRANSPORTS" not in env
    assert "FASTRTPS_DEFAULT_PROFILES_FILE" not in env  # Kilted would warn about it
    assert transport.choose(env, cwd=tmp_path, profile=PROFILE).env == {}  # an empty one is a choice too


def test_describe_says_whose_profile_the_node_uses(tmp_path) -> None:
    mine = transport.describe(_env(FASTDDS_DEFAULT_PROFILES_FILE=str(PROFILE)), cwd=tmp_path)
    assert mine.startswith("DDS transport: dinomix_ros' large-image profile") and str(PROFILE) in mine
    robot = tmp_path / "robot.xml"
    robot.write_text("<dds/>")
    theirs = transport.describe(_env(FASTRTPS_DEFAULT_PROFILES_FILE=str(robot)), cwd=tmp_path)
    assert "the robot's own Fast DDS profile" in theirs and "FASTRTPS_DEFAULT_PROFILES_FILE" in theirs
    missing = transport.describe(_env(FASTDDS_DEFAULT_PROFILES_FILE="/no/such.xml"), cwd=tmp_path)
    assert "NO SUCH FILE" in missing
    assert "default transports" in transport.describe(_env(), cwd=tmp_path)


def test_transport_env_prints_the_shell_lines(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in transport.ROBOT_SETTINGS}
    env["PYTHONPATH"] = str(PROFILE.parents[1])  # this source tree
    out = subprocess.run([sys.executable, "-m", "dinomix_ros.ros.transport"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    exports = [line for line in out.stdout.splitlines() if line.startswith("export ")]
    variable = transport.PROFILE_VARIABLES[transport.fastdds_major(env)]
    assert exports == [f"export {variable}={transport.profile_path()}"], out.stdout
    assert out.stdout.splitlines()[-1].startswith("# dinomix_ros' large-image profile")
