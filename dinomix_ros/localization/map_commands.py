"""What the node's map services do, without ROS: each command returns ``(success, message)``.

The message is what the caller (service response and log) shows: counts, paths, and on failure what was kept and
how to go on. A failed save keeps every unsaved keyframe in memory; a failed load keeps the current map in use;
:func:`autosave` at shutdown tries ``map.path``, then :func:`rescue_paths`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dinomix_ros.localization.live_map import LiveMap
from dinomix_ros.maps import loading
from dinomix_ros.maps.index import index_for_map

__all__ = ["autosave", "load_map", "rescue_paths", "save_map", "start_recording", "stop_recording"]


def start_recording(live: LiveMap, cameras: list[str], pose_topic: str) -> tuple[bool, str]:
    """Record keyframes from now on (``pose_topic`` empty: keyframes without poses)."""
    live.start_recording()
    source = pose_topic or "no pose source (keyframes without poses)"
    return True, f"recording keyframes from {cameras} with {source}: {live.recording_rule}; map has {len(live)}"


def stop_recording(live: LiveMap) -> tuple[bool, str]:
    """Stop recording; the message counts what this recording added."""
    was, s = live.stop_recording(), live.stats()
    if not was:
        return True, f"was not recording; map has {s['map_keyframes']}"
    without_pose = live.counters["frames_without_pose"]
    return True, (f"stopped recording: {s['keyframes_recorded']} keyframes added ({without_pose} frames had no "
                  f"pose); map has {s['map_keyframes']}, {s['keyframes_unsaved']} unsaved")


def save_map(live: LiveMap, path: str, node_name: str) -> tuple[bool, str]:
    """Save the map to ``path`` (atomic); a failure keeps every keyframe in memory and says how to save them."""
    if not path:
        return False, "map.path is empty: set it (ros2 param set <node> map.path /path/to/map.dinomap)"
    try:
        saved = live.save(path)
    except Exception as exc:  # reported to the caller; the previous map on disk is intact
        return False, (f"save to {path} failed: {exc}. The {live.unsaved} unsaved keyframes are kept in memory: "
                       "remove the cause and call ~/save_map again, or save them elsewhere (ros2 param set "
                       f"{node_name} map.path /new/path.dinomap, then ~/save_map)")
    return True, f"saved {saved.keyframes} keyframes to {path} in {saved.seconds:.2f} s"


def load_map(live: LiveMap, path: str, fingerprint: dict, verify: str = "full") -> tuple[bool, str]:
    """Replace the live map by the one at ``path`` (made by the model of ``fingerprint``); refused while the current
    map has unsaved keyframes. Loading and indexing happen outside the map lock: the camera pipeline keeps matching
    the old map meanwhile, and keeps it when the load fails. ``verify``: "full" (the default: the map's chunks are
    checked before it replaces the old one, so a damaged map is refused and the old one kept) or "background"."""
    if live.unsaved > 0:
        return False, f"the current map has {live.unsaved} unsaved keyframes: call ~/save_map first"
    if not path or not Path(path).exists():
        return False, f"map.path {path!r} does not exist"
    try:
        kmap = loading.load_map(path, expected_fingerprint=fingerprint, verify=True if verify == "full" else verify)
        live.replace_map(kmap, index_for_map(kmap, kind=live.index_config.index,
                                             device=live.index_config.search_device))
    except Exception as exc:  # the old map stays in use
        return False, f"load of {path} failed, keeping the current map: {exc}"
    return True, f"loaded {len(kmap)} keyframes from {path} (fingerprint {kmap.fingerprint['id']})"


def rescue_paths(path: str | Path) -> list[Path]:
    """Where to save a map that could not be saved to ``path`` at shutdown: beside it, then under ROS_HOME (another
    place, maybe another file system), each named after the map and the time."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    name = f"{path.name}.rescued-{stamp}"
    ros_home = Path(os.environ.get("ROS_HOME") or Path.home() / ".ros")
    return [path.parent / name, ros_home / "dinomix_rescued_maps" / name]


def autosave(live: LiveMap, path: str, enabled: bool, node_name: str) -> list[tuple[str, str]]:
    """Save unsaved keyframes at shutdown: to ``path`` when ``enabled``, else warn that they are discarded; when that
    save fails, to each of :func:`rescue_paths` until one works. ``(level, message)`` of each step, level "info",
    "warning" or "error"."""
    if live.unsaved <= 0:
        return []
    if not (path and enabled):
        return [("warning", f"discarding {live.unsaved} unsaved keyframes (set map.path and map.autosave, or call "
                            "~/save_map before shutting down)")]
    ok, message = save_map(live, path, node_name)
    steps = [("info" if ok else "error", f"autosave: {message}")]
    # shutting down: nowhere to keep them but disk, so try beside the map, then under ROS_HOME
    for rescue in [] if ok else rescue_paths(path):
        ok, message = save_map(live, str(rescue), node_name)
        steps.append(("info" if ok else "error", f"autosave rescue: {message}"))
        if ok:
            break
    return steps
