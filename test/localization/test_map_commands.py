"""The map services' work without ROS (dinomix_ros.localization.map_commands): counts in the messages, a failed save
keeps every keyframe, a refused or failed load keeps the map in use, and the shutdown autosave rescues keyframes
that cannot go to map.path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dinomix_ros.localization import map_commands
from dinomix_ros.localization.live_map import LiveMap
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.storage import save_map
from dinomix_ros.maps.loading import load_map

NS = 1_000_000_000
DIM = 16
FINGERPRINT = {"id": "dmx-test", "architecture": "test", "weights_sha256": "0" * 64, "preprocessing": "none",
               "descriptor_dim": DIM}
NODE = "/robot/dinomix_localizer"


def _recorded(n: int) -> LiveMap:
    """A live map that recorded ``n`` keyframes (no pose source: keyframes without poses), none saved."""
    live = LiveMap(KeyframeMap.empty(FINGERPRINT), has_pose_source=False)
    ok, message = map_commands.start_recording(live, ["/front/image_raw"], "")
    assert ok and message.startswith("recording keyframes from ['/front/image_raw'] with no pose source")
    rng = np.random.default_rng(0)
    for i in range(n):
        descriptor = rng.standard_normal(DIM).astype(np.float32)
        live.process("/front/image_raw", (i + 1) * 10 * NS, descriptor / np.linalg.norm(descriptor))
    return live


def test_recording_messages_count_what_was_added() -> None:
    live = _recorded(3)
    ok, message = map_commands.stop_recording(live)
    assert ok and message == "stopped recording: 3 keyframes added (0 frames had no pose); map has 3, 3 unsaved"
    assert map_commands.stop_recording(live) == (True, "was not recording; map has 3")


def test_a_failed_save_keeps_every_keyframe_and_says_how_to_go_on(tmp_path: Path) -> None:
    live = _recorded(4)
    assert map_commands.save_map(live, "", NODE)[0] is False  # map.path empty
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    ok, message = map_commands.save_map(live, str(blocker / "run.dinomap"), NODE)
    assert not ok and "The 4 unsaved keyframes are kept in memory" in message
    assert f"ros2 param set {NODE} map.path" in message and "\n" not in message
    assert live.unsaved == 4 and len(live) == 4
    ok, message = map_commands.save_map(live, str(tmp_path / "run.dinomap"), NODE)
    assert ok and message.startswith(f"saved 4 keyframes to {tmp_path / 'run.dinomap'} in ")
    assert live.unsaved == 0 and len(load_map(tmp_path / "run.dinomap")) == 4


def test_load_is_refused_with_unsaved_keyframes_and_a_failed_load_keeps_the_map(tmp_path: Path) -> None:
    other = KeyframeMap.empty(FINGERPRINT)
    other.add(np.eye(7, DIM, dtype=np.float32), stamps_ns=np.arange(7) * NS, cameras="c", frame_ids="map")
    save_map(other, tmp_path / "other.dinomap")
    live = _recorded(2)
    ok, message = map_commands.load_map(live, str(tmp_path / "other.dinomap"), FINGERPRINT)
    assert not ok and message == "the current map has 2 unsaved keyframes: call ~/save_map first"
    assert map_commands.save_map(live, str(tmp_path / "mine.dinomap"), NODE)[0]
    ok, message = map_commands.load_map(live, str(tmp_path / "missing.dinomap"), FINGERPRINT)
    assert not ok and "does not exist" in message
    ok, message = map_commands.load_map(live, str(tmp_path / "other.dinomap"), dict(FINGERPRINT, id="dmx-other"))
    assert not ok and message.startswith("load of ") and "keeping the current map" in message
    assert len(live) == 2  # still the recorded map
    ok, message = map_commands.load_map(live, str(tmp_path / "other.dinomap"), FINGERPRINT)
    assert ok and message == f"loaded 7 keyframes from {tmp_path / 'other.dinomap'} (fingerprint dmx-test)"
    assert len(live) == 7 and live.unsaved == 0


def test_autosave_rescues_keyframes_that_cannot_go_to_map_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROS_HOME", str(tmp_path / "ros_home"))
    assert map_commands.autosave(_recorded(0), str(tmp_path / "x.dinomap"), True, NODE) == []  # nothing to save
    live = _recorded(3)
    (level, message), = map_commands.autosave(live, str(tmp_path / "x.dinomap"), False, NODE)
    assert level == "warning" and message.startswith("discarding 3 unsaved keyframes")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # map.path and the place beside it are under a file: both saves fail
    steps = map_commands.autosave(live, str(blocker / "run.dinomap"), True, NODE)
    assert [level for level, _ in steps] == ["error", "error", "info"], steps
    assert steps[0][1].startswith("autosave: save to") and steps[2][1].startswith("autosave rescue: saved 3 keyframes")
    (rescued,) = (tmp_path / "ros_home" / "dinomix_rescued_maps").glob("run.dinomap.rescued-*")
    assert len(load_map(rescued)) == 3 and live.unsaved == 0
