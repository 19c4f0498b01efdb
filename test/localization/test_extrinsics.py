"""Camera extrinsics per image frame: parsing cameras.extrinsics, checking transforms, and the registry's order
(parameters, then TF, then camera_mount.*), TF caching and refresh, and what the log says."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from dinomix_ros.localization.camera_pose import CameraMountConfig, rpy_to_matrix
from dinomix_ros.localization.extrinsics import (
    TF_REFRESH_S, CameraExtrinsics, ExtrinsicsConfig, ExtrinsicsError, check_mount, parse_extrinsic,
    parse_extrinsics,
)
from dinomix_ros.settings import SettingError

DEFAULT = CameraMountConfig().matrix()


def _T(x: float, y: float, z: float, roll: float, pitch: float, yaw: float) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = rpy_to_matrix(roll, pitch, yaw), (x, y, z)
    return T


def test_parses_rpy_and_quaternion_entries_like_static_transform_publisher() -> None:
    frame, T = parse_extrinsic("rear_camera_optical: -0.5 0.0 1.2 -1.5707963 0 1.5707963")
    assert frame == "rear_camera_optical"
    np.testing.assert_allclose(T, _T(-0.5, 0, 1.2, -1.5707963, 0, 1.5707963))
    np.testing.assert_allclose(T[:3, 2], [-1, 0, 0], atol=1e-6)  # optical z looks backwards
    half = math.sqrt(0.5)
    frame, Tq = parse_extrinsic("robot1/left_optical:0.1 0.2 0.3  0 0 " + f"{half} {half}")  # yaw 90 deg
    assert frame == "robot1/left_optical"
    np.testing.assert_allclose(Tq, _T(0.1, 0.2, 0.3, 0, 0, math.pi / 2), atol=1e-12)
    assert parse_extrinsics(["", "a: 0 0 0 0 0 0", " "]).keys() == {"a"}


@pytest.mark.parametrize("text, message", [
    ("front 0 0 0 0 0 0", "expected"),
    (": 0 0 0 0 0 0", "expected"),
    ("front: 0 0 0 0 0", "expected"),
    ("front: 0 0 0 0 0 0 0 0", "expected"),
    ("front: 0 0 zero 0 0 0", "expected"),
    ("front: nan 0 0 0 0 0", "finite"),
    ("front: 0 0 0 0 0 1e300", "within"),
    ("front: 0 0 0 0 0 0 2", "norm 2"),
    ("front: 0 0 0 0 0 0 0", "norm 0"),
    ("front: 500 0 0 0 0 0", "more than 100 m"),
    ("two words: 0 0 0 0 0 0", "one word"),
])
def test_malformed_entries_are_refused_with_one_line(text, message) -> None:
    with pytest.raises(ExtrinsicsError, match=message) as info:
        parse_extrinsic(text)
    assert "\n" not in str(info.value)


def test_a_frame_given_twice_and_a_bad_parameter_are_refused() -> None:
    with pytest.raises(ExtrinsicsError, match="given twice"):
        parse_extrinsics(["a: 0 0 0 0 0 0", "a: 1 0 0 0 0 0"])
    with pytest.raises(SettingError, match="^cameras.extrinsics: camera extrinsic 'a 1 2'"):
        ExtrinsicsConfig(extrinsics=("a 1 2",))
    assert ExtrinsicsConfig(extrinsics=("a: 1 2 3 0 0 0",)).parsed()["a"][0, 3] == 1.0


@pytest.mark.parametrize("edit, message", [
    (lambda T: T.__setitem__((0, 0), np.nan), "NaN"),
    (lambda T: T.__setitem__((3, 0), 1.0), "bottom row"),
    (lambda T: T.__setitem__((0, 1), 0.5), "not a rotation"),
    (lambda T: T.__setitem__((0, 0), -1.0), "not a rotation"),  # a reflection: det -1
    (lambda T: T.__imul__(2.0), "bottom row"),
])
def test_check_mount_refuses_what_is_not_a_rigid_transform(edit, message) -> None:
    T = np.eye(4)
    edit(T)
    with pytest.raises(ExtrinsicsError, match=message):
        check_mount(T)
    with pytest.raises(ExtrinsicsError, match="16 numbers"):
        check_mount(np.eye(3))


def test_parameters_win_over_tf_which_wins_over_camera_mount(caplog) -> None:
    tf = {"side_optical": _T(0, 0.3, 0.5, -math.pi / 2, 0, 0), "front_optical": _T(9, 9, 9, 0, 0, 0)}
    calls = []

    def lookup(frame: str):
        calls.append(frame)
        return tf.get(frame)

    reg = CameraExtrinsics(DEFAULT, {"front_optical": _T(1, 0, 0.5, -math.pi / 2, 0, -math.pi / 2)}, lookup)
    with caplog.at_level(logging.INFO, logger="dinomix_ros.localization.extrinsics"):
        front, side, other, empty = (reg.mount(f) for f in ("front_optical", "side_optical", "elsewhere", ""))
        reg.mount("side_optical")
    sources = (front.source, side.source, other.source, empty.source)
    assert sources == ("parameter", "tf", "camera_mount", "camera_mount")
    assert front.T[0, 3] == 1.0 and side.T[1, 3] == 0.3
    np.testing.assert_array_equal(other.T, DEFAULT)
    assert "front_optical" not in calls and "" not in calls  # parameters are not looked up in TF
    assert calls.count("side_optical") == 1  # cached
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 4 and "from cameras.extrinsics" in logged[0] and "from TF" in logged[1]
    assert "not in TF" in logged[2]


def test_tf_is_looked_up_again_after_the_refresh_and_a_change_is_logged(caplog) -> None:
    now = [100.0]  # monotonic time need not start anywhere in particular
    value = [_T(0, 0, 1, 0, 0, 0)]
    calls = []

    def lookup(frame: str):
        calls.append(frame)
        return value[0]

    reg = CameraExtrinsics(DEFAULT, {}, lookup, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="dinomix_ros.localization.extrinsics"):
        assert reg.mount("cam").T[2, 3] == 1.0
        value[0] = _T(0, 0, 2, 0, 0, 0)  # re-published on /tf_static
        now[0] += TF_REFRESH_S / 2
        assert reg.mount("cam").T[2, 3] == 1.0 and len(calls) == 1
        now[0] += TF_REFRESH_S
        assert reg.mount("cam").T[2, 3] == 2.0 and len(calls) == 2
        value[0] = None  # TF lost the frame for a moment: the last good transform stays
        now[0] += 2 * TF_REFRESH_S
        assert reg.mount("cam").source == "tf" and reg.mount("cam").T[2, 3] == 2.0
        value[0] = np.full((4, 4), np.nan)  # a broken transform is refused (logged), not used
        now[0] += 2 * TF_REFRESH_S
        assert reg.mount("cam").T[2, 3] == 2.0
    text = caplog.text
    assert "extrinsic changed, now from TF" in text and "holds NaN or inf" in text


def test_update_replaces_parameters_and_default() -> None:
    reg = CameraExtrinsics(DEFAULT, {"a": _T(1, 0, 0, 0, 0, 0)})
    reg.update(_T(0, 0, 2, 0, 0, 0), {"b": _T(3, 0, 0, 0, 0, 0)})
    assert reg.mount("a").source == "camera_mount" and reg.mount("a").T[2, 3] == 2.0
    assert reg.mount("b").T[0, 3] == 3.0
    with pytest.raises(ExtrinsicsError):
        reg.update(np.zeros((4, 4)), {})
    assert not reg.uses_tf


def test_the_log_of_extrinsic_sources_is_bounded(caplog) -> None:
    reg = CameraExtrinsics(DEFAULT)
    with caplog.at_level(logging.INFO, logger="dinomix_ros.localization.extrinsics"):
        for i in range(500):  # frame ids come from the images: a hostile publisher can send any
            reg.mount(f"frame_{i}")
    assert len(caplog.records) == 65 and "more than 64 camera frames" in caplog.records[-1].getMessage()
