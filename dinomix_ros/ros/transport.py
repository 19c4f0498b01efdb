"""Which Fast DDS transport a process gets for camera images: the robot's own settings, or dinomix_ros' profile.

Large best-effort frames between two processes are lost with Fast DDS's default transports (measured: 0 of 20
640x480 frames at 2 Hz), and **the publisher's (camera's) side decides**: its shared-memory segment must hold a
frame. ``config/fastdds_large_images.xml`` gives a 32 MB segment and UDP on every interface (the node stays
visible to other machines). Rules, in one place for the launch files, ``transport_env``, scripts and tests:

* the robot's own Fast DDS settings always win: when any of :data:`ROBOT_SETTINGS` is set (even empty) or a
  ``DEFAULT_FAST*_PROFILES.xml`` lies in the working folder, nothing is added, and the logs say what is in use;
* otherwise the profile is selected with the one variable this distribution's Fast DDS reads (Fast DDS 3, ROS 2
  Kilted and later: ``FASTDDS_DEFAULT_PROFILES_FILE``; Fast DDS 2, Humble and Jazzy:
  ``FASTRTPS_DEFAULT_PROFILES_FILE``): Fast DDS 3 warns on every start when the old one is set, and Fast DDS 2
  ignores the new one;
* another middleware (``RMW_IMPLEMENTATION`` not Fast DDS) gets nothing.

No rclpy here: the launch files import this module in the ``ros2 launch`` process.

    eval "$(ros2 run dinomix_ros transport_env)"   # in a camera driver's shell: the same transport as the node
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PROFILE_NAME", "PROFILE_VARIABLES", "ROBOT_SETTINGS", "DEFAULT_XML_FILES", "Transport",
           "profile_path", "fastdds_major", "robot_settings", "choose", "describe", "ros_defaults", "main"]

PROFILE_NAME = "fastdds_large_images.xml"
#: The profile variable each Fast DDS major version reads.
PROFILE_VARIABLES = {3: "FASTDDS_DEFAULT_PROFILES_FILE", 2: "FASTRTPS_DEFAULT_PROFILES_FILE"}
#: Environment variables by which a robot configures Fast DDS itself: when one is set, it is left alone.
ROBOT_SETTINGS = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE", "RMW_FASTRTPS_USE_QOS_FROM_XML",
                  "FASTDDS_BUILTIN_TRANSPORTS", "FASTDDS_ENVIRONMENT_FILE")
#: Profiles Fast DDS loads from the working folder by itself (Fast DDS 3, Fast DDS 2).
DEFAULT_XML_FILES = ("DEFAULT_FASTDDS_PROFILES.xml", "DEFAULT_FASTRTPS_PROFILES.xml")
#: ROS 2 distributions and the Fast DDS major version they ship.
_DISTRO_FASTDDS = {"humble": 2, "iron": 2, "jazzy": 2, "kilted": 3, "lyrical": 3, "rolling": 3}
_REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Transport:
    """The decision for one process: variables to add to its environment (none: it keeps what it has) and one line
    that says what it uses."""

    env: dict[str, str] = field(default_factory=dict)
    summary: str = ""


def profile_path() -> Path | None:
    """config/fastdds_large_images.xml from the source tree or the installed package share, if found."""
    candidates = [_REPO / "config" / PROFILE_NAME]
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("dinomix_ros")) / "config" / PROFILE_NAME)
    except Exception:  # not installed through ament: the source tree copy is all there is
        pass
    return next((p for p in candidates if p.is_file()), None)


def fastdds_major(environ: Mapping[str, str] | None = None) -> int | None:
    """The Fast DDS major version of this ROS 2 installation (2 or 3), None if it cannot be told.

    ``ROS_DISTRO`` first (set by every ROS 2 setup script), then the Fast DDS library on the library path or in the
    ROS prefixes (``libfastdds.so.3`` / ``libfastrtps.so.2``; also how the PyPI wheels of ROS 2 are laid out).
    """
    env = os.environ if environ is None else environ
    distro = env.get("ROS_DISTRO", "").strip().lower()
    if distro in _DISTRO_FASTDDS:
        return _DISTRO_FASTDDS[distro]
    folders = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    folders += [os.path.join(p, "lib") for p in env.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    folders.append(os.path.join(sys.prefix, "lib"))
    for folder in folders:
        if glob.glob(os.path.join(glob.escape(folder), "libfastdds.so.3*")):
            return 3
        if glob.glob(os.path.join(glob.escape(folder), "libfastrtps.so.2*")):
            return 2
    return None


def robot_settings(environ: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> dict[str, str]:
    """The robot's own Fast DDS settings: the variables of :data:`ROBOT_SETTINGS` that are set (even empty), and a
    default profile file in the working folder (key: its path)."""
    env = os.environ if environ is None else environ
    found = {name: env[name] for name in ROBOT_SETTINGS if name in env}
    if env.get("SKIP_DEFAULT_XML") != "1":
        folder = Path.cwd() if cwd is None else Path(cwd)
        found.update({str(folder / name): "(loaded from the working folder)" for name in DEFAULT_XML_FILES
                      if (folder / name).is_file()})
    return found


def _uses_fastdds(env: Mapping[str, str]) -> bool:
    rmw = env.get("RMW_IMPLEMENTATION", "")
    return not rmw or rmw.startswith("rmw_fastrtps")


def choose(environ: Mapping[str, str] | None = None, enabled: bool = True, cwd: str | Path | None = None,
           profile: Path | None = None) -> Transport:
    """What a process started from ``environ`` should add to its environment for large camera frames.

    Args:
        environ: the environment it would inherit (default: this process's).
        enabled: False: add nothing (``large_image_profile:=false``), only describe.
        cwd: its working folder (default: this process's), where Fast DDS looks for a default profile.
        profile: the profile file (default: :func:`profile_path`).
    """
    env = os.environ if environ is None else environ
    if not _uses_fastdds(env):
        return Transport(summary=f"middleware {env['RMW_IMPLEMENTATION']}: no Fast DDS profile added (large "
                                 "best-effort frames depend on that middleware's own settings)")
    if robot_settings(env, cwd):
        return Transport(summary=describe(env, cwd) + " (set before launch: left as it is)")
    if not enabled:
        return Transport(summary="Fast DDS default transports (large_image_profile is off): best-effort frames "
                                 "larger than about 0.5 MB from other processes are mostly lost")
    profile = profile or profile_path()
    if profile is None:
        return Transport(summary=f"{PROFILE_NAME} not found: Fast DDS default transports")
    major = fastdds_major(env)
    names = [PROFILE_VARIABLES[major]] if major is not None else list(PROFILE_VARIABLES.values())
    which = f"Fast DDS {major}" if major is not None else "Fast DDS version unknown: both variables"
    return Transport(env={name: str(profile) for name in names},
                     summary=f"dinomix_ros' large-image profile {profile} (32 MB shared memory, UDP on every "
                             f"interface) via {' and '.join(names)} ({which})")


def describe(environ: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> str:
    """One line on the transport this process uses (the node logs it at start-up)."""
    env = os.environ if environ is None else environ
    if not _uses_fastdds(env):
        return choose(env, cwd=cwd).summary
    own = robot_settings(env, cwd)
    profiles = [(name, env[name]) for name in PROFILE_VARIABLES.values() if env.get(name)]
    others = {k: v for k, v in own.items() if k not in PROFILE_VARIABLES.values()}
    parts = []
    for name, value in profiles:
        path = Path(value)
        mine = path.name == PROFILE_NAME and path.is_file()
        what = "dinomix_ros' large-image profile" if mine else "the robot's own Fast DDS profile"
        parts.append(f"{what} {value} ({name}{'' if path.is_file() else ': NO SUCH FILE'})")
    parts += [f"{k}={v}" if not k.endswith(".xml") else f"{k} {v}" for k, v in others.items()]
    if not parts:
        return ("Fast DDS default transports (no profile): best-effort camera frames larger than about 0.5 MB are "
                "mostly lost between processes; see the README, Large images between processes")
    return "DDS transport: " + "; ".join(parts)


def ros_defaults(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` as a process with Fast DDS's default transports gets it: no robot settings, and this
    distribution's profile variable set empty, which :func:`choose` leaves alone (for measurements and tests of
    a camera driver started without the profile)."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if k not in ROBOT_SETTINGS}
    major = fastdds_major(env)
    env.update({name: "" for name in ([PROFILE_VARIABLES[major]] if major else PROFILE_VARIABLES.values())})
    return env


def main(argv: list[str] | None = None) -> int:
    """``transport_env``: print the shell lines that give a process (a camera driver) the node's transport."""
    parser = argparse.ArgumentParser(
        prog="transport_env", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print `export` lines giving this shell the Fast DDS transport the launch files give the node "
                    "(nothing when the robot already configures Fast DDS itself). Usage: eval \"$(ros2 run "
                    "dinomix_ros transport_env)\", then start the camera driver from that shell.")
    parser.parse_args(argv)
    choice = choose()
    for name, value in choice.env.items():
        print(f"export {name}={shlex.quote(value)}")
    print(f"# {choice.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
