"""Per-camera frame loss and its /diagnostics warning (dinomix_ros.localization.frame_loss), without a node."""

from __future__ import annotations

from dinomix_ros.localization.frame_loss import FIX_BEST_EFFORT, WINDOW_S, FrameLoss

CAM, OTHER = "/front/image_raw", "/rear/image_raw"
PERIOD_NS = 100_000_000  # a 10 Hz camera


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _frames(loss: FrameLoss, clock: Clock, camera: str, stamps: range, arrives=lambda k: True) -> None:
    """Frames of ``camera`` with stamps k * PERIOD_NS, 0.1 s apart; those for which ``arrives(k)`` is received."""
    for k in stamps:
        clock.t += 0.1
        if arrives(k):
            loss.received(camera, k * PERIOD_NS)


def test_middleware_reported_loss_warns_with_the_camera_the_numbers_and_the_fix() -> None:
    clock = Clock()
    loss = FrameLoss(clock)
    _frames(loss, clock, OTHER, range(20))  # a healthy camera beside it
    loss.received(CAM, 5 * PERIOD_NS)
    loss.lost(CAM, 18)  # e.g. 640x480 best effort over Fast DDS's default transports: 18 of 20 lost, 2 arrived
    loss.received(CAM, 24 * PERIOD_NS)
    text = loss.warning({CAM: True, OTHER: True})
    assert text.startswith(f"camera {CAM}: 18 of 20 frames (90 %) in the last {WINDOW_S:.0f} s were lost"), text
    assert FIX_BEST_EFFORT in text and "transport_env" in text and "camera_launch" in text
    assert loss.recent()[OTHER] == (20, 0)
    assert loss.lost_estimate == 18 and abs(loss.loss_fraction - 18 / 40) < 1e-9


def test_no_frame_arriving_at_all_still_warns() -> None:
    """Fast DDS reports lost samples of a best-effort publisher even when none of its frames gets through."""
    clock = Clock()
    loss = FrameLoss(clock)
    for _ in range(6):
        clock.t += 0.5
        loss.lost(CAM, 1)
    assert "6 of 6 frames (100 %)" in loss.warning({CAM: True})


def test_stamp_gaps_count_when_the_middleware_reports_nothing() -> None:
    clock = Clock()
    loss = FrameLoss(clock)
    # pairs of frames arrive, the next two are lost (the period is the smallest gap: with evenly spaced losses
    # alone the stamps cannot tell, the middleware's count can); the last two are not known to be lost yet
    _frames(loss, clock, CAM, range(0, 60), arrives=lambda k: k % 4 in (0, 1))
    assert loss.recent()[CAM] == (30, 28)
    assert "missing from its stamps although the subscription is reliable" in loss.warning({CAM: False})
    assert "were lost before reaching the node (best effort)" in loss.warning({CAM: True})


def test_small_or_old_loss_does_not_warn() -> None:
    clock = Clock()
    loss = FrameLoss(clock)
    _frames(loss, clock, CAM, range(100))
    loss.lost(CAM, 1)  # one frame: below MIN_LOST
    assert loss.warning({CAM: True}) == ""
    loss.lost(CAM, 3)  # 4 of 104 frames: under 5 %
    assert loss.warning({CAM: True}) == ""
    loss.lost(CAM, 30)
    assert loss.warning({CAM: True}) != ""
    _frames(loss, clock, CAM, range(100, 100 + int(10 * WINDOW_S) + 20))  # the loss stopped: a window later, quiet
    assert loss.warning({CAM: True}) == ""
    assert loss.lost_estimate == 34  # the totals keep it
