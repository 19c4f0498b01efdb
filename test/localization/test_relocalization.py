"""The pose-prior publication policy (output.pose_prior_mode) without ROS: requests, loss episodes, continuous."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from dinomix_ros.localization.live_map import FrameOutcome, OutputConfig
from dinomix_ros.localization.matching import Candidate, MatchResult, PosePrior
from dinomix_ros.localization.relocalization import (
    RelocalizationConfig, Relocalizer, consumer_sigmas, summarize_prior,
)
from dinomix_ros.localization.verification import Verification
from dinomix_ros.settings import SettingError

NS = 1_000_000_000


def _outcome(stamp_s: float = 1.0, *, accepted: bool = True, verified: bool = True, prior: bool = True,
             publish_prior: bool = True, rejected_by: tuple[str, ...] = (), similarity: float = 0.8) -> FrameOutcome:
    check = Verification(matches=100, inliers=60, model="essential", passed=True) if verified else None
    best = Candidate(0, similarity, 3, 17, 5 * NS, "/cam", "map", np.array([1.0, 2.0, 0.0]),
                     np.array([0.0, 0.0, math.sin(0.25), math.cos(0.25)]), np.full(3, np.nan), check)
    cov = np.diag([0.25, 0.25, 0.25, 0.01, 0.01, 0.04])
    result = MatchResult(int(stamp_s * NS), "/cam", [best], accepted, list(rejected_by),
                         prior=PosePrior("map", best.position, best.orientation, cov) if prior else None)
    return FrameOutcome(result, publish_prior=publish_prior and accepted and prior,
                        prior_case="rotation" if verified else "keyframe")


def _cov(sigma_m: float, sigma_rad: float) -> list[float]:
    c = np.zeros((6, 6))
    c[0, 0] = c[1, 1] = sigma_m ** 2
    c[5, 5] = sigma_rad ** 2
    return c.reshape(-1).tolist()


def test_the_mode_is_a_setting_with_on_request_by_default() -> None:
    assert OutputConfig().pose_prior_mode == "on_request"
    with pytest.raises(SettingError, match="output.pose_prior_mode must be one of on_request, when_lost, continuous"):
        OutputConfig(pose_prior_mode="always")
    with pytest.raises(ValueError, match="pose_prior_mode"):
        Relocalizer("always")


def test_continuous_publishes_what_the_live_map_decided() -> None:
    reloc = Relocalizer("continuous")
    assert reloc.offer(_outcome(), 0.0).publish
    assert not reloc.offer(_outcome(publish_prior=False), 0.0).publish  # rate-limited by the live map
    assert reloc.offer(_outcome(verified=False), 0.0).publish  # as before: verification off -> keyframe priors


def test_on_request_publishes_nothing_without_a_request_and_once_per_request() -> None:
    reloc = Relocalizer("on_request")
    reloc.start(0.0)
    assert not any(reloc.offer(_outcome(t), t).publish for t in (1.0, 2.0, 3.0))
    request = reloc.request("~/relocalize", 3.5)
    assert not reloc.offer(_outcome(4.0, verified=False), 4.0).publish  # unverified: not eligible
    assert not reloc.offer(_outcome(4.5, accepted=False, rejected_by=("min_similarity",)), 4.5).publish
    decision = reloc.offer(_outcome(5.0), 5.0)
    assert decision.publish and decision.requests == (request,)
    assert not request.done.is_set()  # answered once the prior is out
    reloc.published(decision)
    ok, message = reloc.wait(request, 0.0)
    assert ok and message.startswith("relocalized: frame=map x=1.000 y=2.000 z=0.000 yaw_deg=28.65")
    assert "sigma_xy_m=0.500" in message and "keyframe=17" in message and "case=rotation" in message
    assert "stamp=5.000000000" in message and "inliers=60" in message
    assert not reloc.offer(_outcome(6.0), 6.0).publish  # one prior per request
    assert reloc.pending == 0 and reloc.published_count == 1


def test_one_prior_answers_every_waiting_request_and_a_thread_waits_for_it() -> None:
    reloc = Relocalizer("on_request")
    first, second = reloc.request("~/relocalize", 0.0), reloc.request("trigger /visual_slam/trigger_hint", 0.0)
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(reloc.wait(first, 30.0)))
    waiter.start()
    decision = reloc.offer(_outcome(), 1.0)
    assert decision.publish and set(decision.requests) == {first, second}
    assert "trigger /visual_slam/trigger_hint" in decision.reason and "~/relocalize" in decision.reason
    reloc.published(decision)
    waiter.join(10.0)
    assert answers and answers[0][0]


def test_a_request_that_sees_no_verified_match_fails_with_the_reason() -> None:
    reloc = Relocalizer("on_request")
    request = reloc.request("~/relocalize", 0.0)
    ok, message = reloc.wait(request, 0.01)
    assert not ok and "no camera frame was processed" in message and "0.01 s" in message
    request = reloc.request("~/relocalize", 0.0)
    reloc.offer(_outcome(accepted=False, rejected_by=("min_similarity", "min_margin"), similarity=0.41), 0.1)
    reloc.offer(_outcome(accepted=False, rejected_by=("min_similarity",), similarity=0.3), 0.2)
    reloc.offer(_outcome(verified=False), 0.3)
    ok, message = reloc.wait(request, 0.01)
    assert not ok
    assert message == ("no verified match within 0.01 s: 3 frames processed, rejected by: min_similarity 2, "
                       "min_margin 1; 1 accepted without geometric verification (the map has no local features, or "
                       "verification is off: relocalization.require_verified false accepts them); best similarity "
                       "0.800")
    assert reloc.pending == 0


def test_unverified_priors_answer_requests_when_allowed() -> None:
    reloc = Relocalizer("on_request", RelocalizationConfig(require_verified=False))
    reloc.request("~/relocalize", 0.0)
    decision = reloc.offer(_outcome(verified=False), 1.0)
    assert decision.publish and decision.summary.case == "keyframe" and decision.summary.inliers == 0


def test_trigger_requests_expire_after_the_timeout() -> None:
    reloc = Relocalizer("on_request", RelocalizationConfig(request_timeout_s=2.0))
    reloc.request("trigger t", 10.0)
    assert reloc.expire(11.0) == []
    (request, why), = reloc.expire(12.5)
    assert request.source == "trigger t" and why.startswith("no verified match within 2 s")
    assert not reloc.offer(_outcome(), 13.0).publish


def test_requests_are_answered_in_every_mode_without_a_second_publication() -> None:
    reloc = Relocalizer("continuous")
    request = reloc.request("~/relocalize", 0.0)
    decision = reloc.offer(_outcome(), 1.0)
    assert decision.publish and decision.requests == (request,)
    reloc = Relocalizer("continuous")
    reloc.request("~/relocalize", 0.0)
    decision = reloc.offer(_outcome(publish_prior=False), 1.0)  # the rate limit would skip it: the request wins
    assert decision.publish


def test_deactivation_cancels_waiting_requests() -> None:
    reloc = Relocalizer("on_request")
    request = reloc.request("~/relocalize", 0.0)
    reloc.cancel_all()
    assert reloc.wait(request, 5.0) == (False, "the request was cancelled: the node was deactivated")


def test_when_lost_is_silent_while_the_consumer_is_confident_and_publishes_once_per_episode() -> None:
    reloc = Relocalizer("when_lost", RelocalizationConfig(lost_sigma_m=1.0, lost_sigma_rad=0.5))
    reloc.start(0.0)
    reloc.consumer_pose(_cov(0.2, 0.05), 0.5)
    assert not any(reloc.offer(_outcome(t), t).publish for t in (1.0, 2.0, 3.0))
    reloc.consumer_pose(_cov(3.0, 0.05), 4.0)  # diverged: position std-dev 3 m
    assert reloc.consumer_state(4.0) == (True, "its std-devs are 3.00 m / 0.05 rad, above 1 m / 0.5 rad")
    assert not reloc.offer(_outcome(4.5, verified=False), 4.5).publish  # unverified never resets it
    decision = reloc.offer(_outcome(5.0), 5.0)
    assert decision.publish and "loss episode 1" in decision.reason and "first prior" in decision.reason
    reloc.published(decision)
    reloc.consumer_pose(_cov(0.9, 0.05), 5.5)  # the reset consumer, not yet converged: same episode
    assert not any(reloc.offer(_outcome(t), t).publish for t in (6.0, 7.0))
    reloc.consumer_pose(_cov(0.6, 0.05), 7.5)  # below the threshold but above half of it: still the same episode
    reloc.consumer_pose(_cov(1.2, 0.05), 7.8)
    assert not reloc.offer(_outcome(8.0), 8.0).publish
    reloc.consumer_pose(_cov(0.3, 0.1), 9.0)  # recovered (below half the thresholds)
    assert reloc.consumer_state(9.0) == (False, "")
    assert not reloc.offer(_outcome(9.5), 9.5).publish
    reloc.consumer_pose(_cov(0.3, 0.9), 10.0)  # lost again: yaw std-dev 0.9 rad
    decision = reloc.offer(_outcome(11.0), 11.0)
    assert decision.publish and "loss episode 2" in decision.reason
    assert reloc.stats(11.0)["consumer_loss_episodes"] == 2


def test_when_lost_repeats_at_most_every_lost_repeat_s() -> None:
    reloc = Relocalizer("when_lost", RelocalizationConfig(lost_repeat_s=5.0))
    reloc.start(0.0)
    reloc.consumer_pose(_cov(9.0, 3.0), 0.1)
    published = [t for t in np.arange(1.0, 13.0, 1.0) if reloc.offer(_outcome(t), t).publish]
    assert published == [1.0, 6.0, 11.0]


def test_a_consumer_that_never_spoke_is_lost_after_lost_no_pose_s_and_stale_only_when_asked() -> None:
    reloc = Relocalizer("when_lost", RelocalizationConfig(lost_no_pose_s=10.0))
    reloc.start(100.0)  # monotonic time of activation: silence counts from here, not from 0
    assert not reloc.offer(_outcome(), 105.0).publish
    assert reloc.offer(_outcome(), 110.5).publish
    assert reloc.consumer_state(110.5)[1] == "no pose from it within 10 s of activation"
    reloc.consumer_pose(_cov(0.7, 0.1), 111.0)  # it speaks, between the thresholds: no longer lost
    assert reloc.consumer_state(111.0) == (False, "")
    assert not reloc.offer(_outcome(), 500.0).publish  # lost_stale_s 0: AMCL's silence while standing still is fine
    reloc.reconfigure("when_lost", RelocalizationConfig(lost_stale_s=30.0))
    assert reloc.consumer_state(200.0) == (True, "no pose from it for 89.0 s")


def test_consumer_sigmas_read_x_y_and_yaw_and_treat_nan_as_lost() -> None:
    assert consumer_sigmas(_cov(0.5, 0.1)) == pytest.approx((0.5, 0.1))
    c = _cov(0.5, 0.1)
    c[7] = 4.0
    assert consumer_sigmas(c) == pytest.approx((2.0, 0.1))
    c[0] = math.nan
    assert consumer_sigmas(c)[0] == math.inf
    with pytest.raises(ValueError, match="36 values"):
        consumer_sigmas([0.0] * 9)


def test_summary_of_a_prior() -> None:
    summary = summarize_prior(_outcome(12.5))
    assert summary.frame_id == "map" and summary.keyframe_id == 17 and summary.camera == "/cam"
    assert summary.sigma_xy_m == pytest.approx(0.5) and summary.sigma_yaw_rad == pytest.approx(0.2)
    assert summary.yaw_rad == pytest.approx(0.5) and summary.stamp_ns == 12_500_000_000


def test_a_request_taken_at_its_timeout_still_answers_with_the_prior_being_published() -> None:
    reloc = Relocalizer("on_request")
    request = reloc.request("~/relocalize", 0.0)
    decision = reloc.offer(_outcome(), 1.0)  # taken by this frame; the timeout strikes before the publication
    publisher = threading.Timer(0.3, reloc.published, args=(decision,))
    publisher.start()
    ok, message = reloc.wait(request, 0.01)
    publisher.join()
    assert ok, message
