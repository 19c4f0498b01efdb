"""Which stop path saves the map: `ros2 launch dinomix_ros build_map.launch.py` (recording) stopped the ways
containers and service managers stop it, as JSON (one object per method: saved, seconds, orphans).

Needs a ROS 2 installation with `ros2 launch` and this package installed (colcon build, source install/setup.bash);
the container methods need `unshare` (PID namespaces: root or user namespaces) and `tini` for the tini ones.

    bench/bench_stop.py                               # every method
    bench/bench_stop.py --methods launch_sigterm container_sigint

Methods (what each emulates):
    launch_sigint            Ctrl-C / kill -INT to ros2 launch
    launch_sigterm           kill -TERM to ros2 launch (graceful_sigterm:=true, the default)
    launch_sigterm_default   the same with graceful_sigterm:=false: launch's own SIGTERM handling
    container_sigterm        docker stop: ros2 launch is PID 1 of its PID namespace, SIGTERM, SIGKILL after 10 s
    container_sigterm_default  the same with graceful_sigterm:=false
    container_sigint         docker stop with STOPSIGNAL SIGINT (compose: stop_signal: SIGINT)
    tini_sigterm             docker run --init (tini forwards SIGTERM to its child, ros2 launch)
    tini_sigterm_default     the same with graceful_sigterm:=false
    tini_group_sigterm_default  tini -g (SIGTERM to the child's process group), graceful_sigterm:=false
    systemd_sigterm_default  systemd's default stop (KillMode=control-group: SIGTERM to every process of the unit,
                             SIGKILL after TimeoutStopSec), graceful_sigterm:=false
    systemd_mixed_sigterm    KillMode=mixed: SIGTERM to ros2 launch, SIGKILL to the rest once it exited
    systemd_mixed_sigterm_default  the same with graceful_sigterm:=false
    systemd_mixed_sigint     KillMode=mixed with KillSignal=SIGINT
    node_container_sigterm   the node without launch as PID 1 (docker run ... localize_node), SIGTERM
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAMERA = REPO / "test" / "ros" / "camera_publisher.py"
METHODS = ("launch_sigint", "launch_sigterm", "launch_sigterm_default", "container_sigterm",
           "container_sigterm_default", "container_sigint", "tini_sigterm", "tini_sigterm_default",
           "tini_group_sigterm_default", "systemd_sigterm_default", "systemd_mixed_sigterm",
           "systemd_mixed_sigterm_default", "systemd_mixed_sigint", "node_container_sigterm")
DOCKER_STOP_TIMEOUT_S = 10.0
SYSTEMD_TIMEOUT_S = 30.0
KEYFRAMES = 4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--domain", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", "0") or 0) or 151)
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the node to become active")
    return p.parse_args()


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += children
            todo += children
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))


def command(method: str, map_path: Path) -> list[str]:
    graceful = "false" if method.endswith("_default") else "true"
    launch = ["ros2", "launch", "dinomix_ros", "build_map.launch.py", "random_weights:=true",
              f"map_path:={map_path}", f"graceful_sigterm:={graceful}"]
    if method == "node_container_sigterm":
        prefix = subprocess.run(["ros2", "pkg", "prefix", "dinomix_ros"], capture_output=True, text=True,
                                check=True).stdout.strip()
        launch = [f"{prefix}/lib/dinomix_ros/localize_node", "--ros-args", "-p", "model.random_weights:=true",
                  "-p", f"map.path:={map_path}", "-p", "map.create_if_missing:=true", "-p",
                  "recording.autostart:=true"]
    if method.startswith("tini_group"):
        launch = ["tini", "-g", "--", *launch]
    elif method.startswith("tini"):
        launch = ["tini", "--", *launch]
    if method.startswith(("container", "tini", "node_container")):
        return ["unshare", "--pid", "--fork", "--mount-proc", *launch]
    return launch


def _default_signals() -> None:
    """Default signal dispositions, as docker and systemd start their processes (a shell's background job, like
    this benchmark run with `&`, ignores SIGINT, and Python then keeps ignoring it)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def _saved(map_path: Path) -> int:
    """Keyframes in the saved map (0: none saved)."""
    from dinomix_ros.maps.loading import load_map

    try:
        return len(load_map(map_path))
    except Exception:  # nothing saved: no map directory
        return 0


def run_one(method: str, args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"dinomix_stop_{method}_"))
    map_path = work / "map.dinomap"
    env = dict(os.environ, ROS_DOMAIN_ID=str(args.domain), ROS_LOG_DIR=str(work / "ros_log"), PYTHONUNBUFFERED="1")
    log = open(work / "launch.log", "wb")
    proc = subprocess.Popen(command(method, map_path), stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, preexec_fn=_default_signals)
    result = {"method": method}
    try:
        deadline = time.monotonic() + args.timeout
        while "active: cameras" not in (work / "launch.log").read_text(errors="replace"):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{method}: the node did not become active:\n"
                                   + (work / "launch.log").read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        camera = subprocess.run([sys.executable, str(CAMERA), "--size", "160x120", "--rate", "1", "--frames",
                                 str(KEYFRAMES), "--reliability", "reliable"], env=env, capture_output=True,
                                text=True, timeout=120)
        if camera.returncode != 0:
            raise RuntimeError(camera.stdout + camera.stderr)
        time.sleep(3.0)  # recorded (a keyframe per second without a pose source)
        main = proc.pid
        if method.startswith(("container", "tini", "node_container")):  # unshare's child is PID 1 inside
            main = next(iter(descendants(proc.pid)), proc.pid)
        tree = [main] + descendants(main)
        sig = signal.SIGINT if method.endswith("sigint") else signal.SIGTERM
        t0 = time.monotonic()
        if method.startswith("systemd_sigterm"):
            for pid in tree:
                os.kill(pid, sig)
        else:
            os.kill(main, sig)
        limit = DOCKER_STOP_TIMEOUT_S if method.startswith(("container", "tini", "node_container")) \
            else SYSTEMD_TIMEOUT_S
        main_gone = None
        while any(alive(p) for p in tree) and time.monotonic() - t0 < limit:
            if not alive(main):
                main_gone = main_gone or time.monotonic()
                if method.startswith("systemd_mixed"):  # KillMode=mixed: SIGKILL to what is left
                    for pid in tree:
                        if alive(pid):
                            os.kill(pid, signal.SIGKILL)
                if method.startswith("launch") and time.monotonic() - main_gone > 3.0:
                    break  # launch is gone; what is left is orphaned
            time.sleep(0.05)
        result["seconds_to_exit"] = round(time.monotonic() - t0, 2)
        left = [p for p in tree if alive(p)]
        if left and not method.startswith("launch"):
            result["killed_after_timeout_s"] = limit  # docker's SIGKILL, systemd's TimeoutStopSec
            os.kill(main, signal.SIGKILL)
            for pid in left:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
        result["orphans_left"] = len(left) if method.startswith("launch") else 0
        result["keyframes_saved"] = _saved(map_path)
        result["autosave_logged"] = "autosave: saved" in (work / "launch.log").read_text(errors="replace")
        result["saved"] = result["keyframes_saved"] >= KEYFRAMES
        for pid in left:  # orphans: stop them (SIGINT: they still save, too late for a container)
            if alive(pid):
                os.kill(pid, signal.SIGINT)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> int:
    args = parse_args()
    missing = [tool for tool in ("ros2", "unshare", "tini") if shutil.which(tool) is None]
    if "ros2" in missing:
        print("bench_stop: needs `ros2 launch` and this package installed (source install/setup.bash)",
              file=sys.stderr)
        return 2
    rows = []
    for method in args.methods:
        if ("tini" in method and "tini" in missing) or ("container" in method and "unshare" in missing):
            rows.append({"method": method, "skipped": f"needs {'tini' if 'tini' in method else 'unshare'}"})
            continue
        rows.append(run_one(method, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"keyframes_recorded": KEYFRAMES, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
