"""Messages out: the loop constraint (its layout, exact stamps, the transform and covariance convention), LIO-SAM's
two-value loop closure left as it is, and camera_info with ROI and binning."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo
from std_msgs.msg import Float64MultiArray

from dinomix_ros.localization.camera_pose import RelativePose, rpy_to_matrix
from dinomix_ros.ros.conversions import (
    LOOP_CONSTRAINT_LABEL, LOOP_CONSTRAINT_SIZE, camera_from_info_msg, loop_constraint_from_msg,
    loop_constraint_msg, loop_closure_msg,
)

STAMP_Q = 1_700_000_123_987_654_321  # float64 seconds cannot hold these: the message carries sec and nanosec
STAMP_K = 1_700_000_000_000_000_001


def _relative(case: str = "metric") -> RelativePose:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = rpy_to_matrix(0.1, -0.2, 2.9), (1.5, -0.25, 0.02)
    A = np.random.default_rng(2).standard_normal((6, 6))
    return RelativePose(T, A @ A.T * 1e-3, case, 57)


def test_loop_constraint_round_trip_is_exact() -> None:
    rel = _relative()
    msg = loop_constraint_msg(STAMP_Q, STAMP_K, 4321, rel)
    assert isinstance(msg, Float64MultiArray) and len(msg.data) == LOOP_CONSTRAINT_SIZE == 50
    assert [d.label for d in msg.layout.dim] == [LOOP_CONSTRAINT_LABEL] and msg.layout.dim[0].size == 50
    c = loop_constraint_from_msg(msg)
    assert (c.query_stamp_ns, c.match_stamp_ns, c.keyframe_id, c.inliers, c.metric) == (STAMP_Q, STAMP_K, 4321, 57,
                                                                                        True)
    np.testing.assert_allclose(c.T, rel.T, atol=1e-12)
    np.testing.assert_array_equal(c.covariance, rel.covariance)
    assert not loop_constraint_from_msg(loop_constraint_msg(STAMP_Q, STAMP_K, 1, _relative("rotation"))).metric


def test_gtsam_order_puts_rotation_first() -> None:
    cov = np.diag([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    cov[0, 3] = cov[3, 0] = 0.5  # x with rot_x
    rel = RelativePose(np.eye(4), cov, "metric", 10)
    g = loop_constraint_from_msg(loop_constraint_msg(STAMP_Q, STAMP_K, 1, rel)).covariance_gtsam
    np.testing.assert_array_equal(np.diag(g), [4.0, 5.0, 6.0, 1.0, 2.0, 3.0])
    assert g[3, 0] == g[0, 3] == 0.5


@pytest.mark.parametrize("edit", [
    lambda m: m.layout.dim.pop(),
    lambda m: setattr(m.layout.dim[0], "label", "something else"),
    lambda m: setattr(m, "data", list(m.data)[:2]),
    lambda m: setattr(m, "data", [math.nan] * 50),
    lambda m: setattr(m, "data", list(m.data[:8]) + [0.0, 0.0, 0.0, 0.0] + list(m.data[12:])),
])
def test_other_arrays_are_not_read_as_loop_constraints(edit) -> None:
    msg = loop_constraint_msg(STAMP_Q, STAMP_K, 1, _relative())
    edit(msg)
    with pytest.raises(ValueError, match="loop constraint"):
        loop_constraint_from_msg(msg)


def test_lio_sam_loop_closure_is_still_two_values() -> None:
    # LIO-SAM's loopInfoHandler drops any Float64MultiArray whose data.size() != 2 (src/mapOptmization.cpp)
    msg = loop_closure_msg(STAMP_Q, STAMP_K)
    assert len(msg.data) == 2 and msg.layout.dim == []
    assert msg.data[0] == pytest.approx(STAMP_Q / 1e9) and msg.data[1] == pytest.approx(STAMP_K / 1e9)


def test_camera_info_message_with_binning_and_roi() -> None:
    msg = CameraInfo(width=1280, height=960, distortion_model="plumb_bob", d=[0.0] * 5,
                     k=[840.0, 0.0, 639.5, 0.0, 840.0, 479.5, 0.0, 0.0, 1.0], binning_x=2, binning_y=2)
    model = camera_from_info_msg(msg)
    assert (model.width, model.height) == (640, 480) and model.K[0, 0] == 420.0 and model.K[0, 2] == 319.5
    msg.roi.x_offset, msg.roi.y_offset, msg.roi.width, msg.roi.height = 2000, 0, 100, 100
    with pytest.raises(ValueError, match="roi"):
        camera_from_info_msg(msg)
