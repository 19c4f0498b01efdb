"""Matching rules and the pose-prior covariance, on small hand-made maps with a real exact FAISS index."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.localization.matching import UNKNOWN_ROTATION_VARIANCE, Matcher, MatcherConfig
from dinomix_ros.maps.sources.poses import yaw_to_quat
from dinomix_ros.maps.index import PlaceIndex

DIM = 64
FINGERPRINT = {"id": "dmx-0000000000000001", "architecture": "test", "weights_sha256": "0" * 64,
               "preprocessing": "test", "descriptor_dim": DIM}
S = 1_000_000_000


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _matcher(desc: np.ndarray, positions: np.ndarray | None = None, stamps_s: np.ndarray | None = None,
             yaws: np.ndarray | None = None, frame: str = "map", **config) -> Matcher:
    n = len(desc)
    kmap = KeyframeMap.empty(FINGERPRINT, storage_dtype="float32")
    kmap.add(desc, stamps_ns=(np.arange(n) if stamps_s is None else stamps_s).astype(np.int64) * S, cameras="cam",
             frame_ids=frame, positions=positions, orientations=None if yaws is None else yaw_to_quat(yaws))
    index = PlaceIndex(DIM, "exact", "cpu")
    index.add(kmap.descriptors_f32())
    return Matcher(kmap, index, MatcherConfig(**config))


@pytest.fixture
def places(rng: np.random.Generator) -> np.ndarray:
    return _unit(rng.standard_normal((20, DIM)))


def _near(d: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    return _unit(d + noise * rng.standard_normal(d.shape))


def test_candidates_are_ranked_with_their_keyframe_data(places, rng) -> None:
    positions = np.c_[np.arange(20.0), np.zeros(20), np.zeros(20)]
    m = _matcher(places, positions, top_k=3)
    result = m.query(_near(places[7], rng, 0.05), 100 * S, camera="front")
    assert [c.row for c in result.candidates][:1] == [7] and len(result.candidates) == 3
    best = result.best
    assert best.rank == 0 and best.keyframe_id == 7 and best.stamp_ns == 7 * S and best.camera == "cam"
    np.testing.assert_array_equal(best.position, [7.0, 0.0, 0.0])
    sims = [c.similarity for c in result.candidates]
    assert sims == sorted(sims, reverse=True) and sims[0] > 0.9 > sims[1]
    assert result.accepted and result.rejected_by == [] and result.camera == "front"


def test_min_similarity_rejects_weak_matches(places, rng) -> None:
    m = _matcher(places, min_similarity=0.9)
    far = _unit(rng.standard_normal(DIM))  # unrelated: cosine ~0
    result = m.query(far, 0)
    assert not result.accepted and result.rejected_by == ["min_similarity"]
    assert _matcher(places, min_similarity=-1.0).query(far, 0).accepted  # -1 switches the rule off


def test_margin_finds_rivals_beyond_top_k(rng) -> None:
    """Place A is sampled every 0.5 m (its neighbours fill the top 5); place B, 100 m away, looks almost the same."""
    a = _unit(rng.standard_normal(DIM))
    neighbours = np.stack([_near(a, rng, 0.02) for _ in range(8)])
    rival = _near(a, rng, 0.03)[None]
    desc = np.concatenate([neighbours, rival])
    positions = np.r_[np.c_[np.arange(8) * 0.5, np.zeros(8), np.zeros(8)], [[100.0, 0.0, 0.0]]]
    query = _near(a, rng, 0.02)
    ambiguous = _matcher(desc, positions, top_k=5, min_margin=0.05, min_similarity=0.5).query(query, 0)
    assert len(ambiguous.candidates) == 5 and all(c.row < 8 for c in ambiguous.candidates)  # neighbours only
    assert ambiguous.margin < 0.05 and ambiguous.rejected_by == ["margin"]
    unique = _matcher(desc[:8], positions[:8], top_k=5, min_margin=0.05).query(query, 0)
    assert unique.margin == math.inf and unique.accepted  # no rival anywhere in the map
    off = _matcher(desc, positions, top_k=5, min_margin=0.0).query(query, 0)
    assert off.accepted


def test_recent_keyframes_are_excluded_by_time_and_count(places) -> None:
    m = _matcher(places, stamps_s=np.arange(20) * 1.0, exclude_recent_s=5.0, top_k=20)
    rows = {c.row for c in m.query(places[18], 19 * S).candidates}
    assert rows == set(range(15))  # stamps within 5 s of t=19 s (14 < t) are excluded
    m = _matcher(places, exclude_recent_count=4, top_k=20)
    assert {c.row for c in m.query(places[18], 0).candidates} == set(range(16))


def test_gating_by_position_and_frame(places) -> None:
    positions = np.c_[np.arange(20.0) * 10, np.zeros(20), np.zeros(20)]
    m = _matcher(places, positions, gate_radius_m=15.0, top_k=20)
    rows = {c.row for c in m.query(places[3], 0, position_hint=("map", np.array([50.0, 0.0, 0.0]))).candidates}
    assert rows == {4, 5, 6}
    assert m.query(places[3], 0, position_hint=("odom", np.array([50.0, 0.0, 0.0]))).rejected_by == \
        ["no_candidates"]  # a position in another frame cannot be compared: nothing passes the gate
    assert m.query(places[3], 0).best.row == 3  # no hint: no gating


def test_consistency_needs_agreeing_consecutive_queries(places, rng) -> None:
    positions = np.c_[np.arange(20.0), np.zeros(20), np.zeros(20)]
    m = _matcher(places, positions, consistency_count=3, consistency_radius_m=1.5, consistency_max_gap_s=2.0)
    first, second = m.query(places[5], 1 * S), m.query(places[6], 2 * S)
    third = m.query(places[7], 3 * S)
    assert first.rejected_by == ["consistency"] and second.rejected_by == ["consistency"]
    assert third.accepted and third.streak == 3
    jump = m.query(places[15], 4 * S)  # 8 m away from the last match: a new streak
    assert jump.streak == 1 and not jump.accepted
    m.query(places[16], 5 * S)
    late = m.query(places[17], 9 * S)  # 4 s later: the streak broke
    assert late.streak == 1
    no_pose = _matcher(places, consistency_count=2, consistency_max_rows=1)
    assert no_pose.query(places[2], 0).streak == 1 and no_pose.query(places[3], 1).accepted  # rows 2 -> 3


def test_pose_prior_covariance_grows_with_doubt_and_spread(places, rng) -> None:
    positions = np.c_[np.arange(20.0), np.zeros(20), np.zeros(20)]
    yaws = np.linspace(0.0, 0.5, 20)
    m = _matcher(places, positions, yaws=yaws, min_similarity=0.0, top_k=1)
    sure = m.query(places[4], 0).prior
    doubtful = m.query(_near(places[4], rng, 0.5), 0).prior
    assert sure.frame_id == "map"
    np.testing.assert_array_equal(sure.position, positions[4])
    np.testing.assert_allclose(sure.orientation, yaw_to_quat(yaws[4]))
    assert np.all(np.diag(sure.covariance) > 0) and np.allclose(sure.covariance, sure.covariance.T)
    assert doubtful.covariance[0, 0] > 5 * sure.covariance[0, 0]  # lower score -> wider prior
    assert sure.covariance[0, 0] == pytest.approx(0.5**2 * (1 + 10 * (1 - 1.0)) ** 2, rel=1e-3)
    # two equally good candidates 4 m apart: the spread about the published one adds about half of 4^2 in x
    two = _unit(np.stack([places[0], places[0] + 1e-3 * places[1]]))
    spread = _matcher(two, np.array([[0.0, 0, 0], [4.0, 0, 0]]), min_similarity=0.0, top_k=2).query(two[0], 0)
    assert spread.prior.covariance[0, 0] - spread.prior.covariance[1, 1] == pytest.approx(8.0, rel=0.01)


def test_pose_prior_without_orientation_allows_any_heading(places) -> None:
    m = _matcher(places, np.c_[np.arange(20.0), np.zeros(20), np.zeros(20)], frame="utm")
    prior = m.query(places[2], 0).prior
    np.testing.assert_array_equal(prior.orientation, [0, 0, 0, 1])
    assert prior.covariance[5, 5] == UNKNOWN_ROTATION_VARIANCE and prior.frame_id == "utm"
    assert _matcher(places).query(places[2], 0).prior is None  # no positions: no prior


def test_empty_map_and_bad_config() -> None:
    m = _matcher(np.zeros((0, DIM), np.float32))
    result = m.query(_unit(np.ones(DIM)), 0)
    assert result.candidates == [] and result.rejected_by == ["no_candidates"] and result.prior is None
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        MatcherConfig(top_k=0)
    with pytest.raises(ValueError, match="min_margin must be >= 0"):
        MatcherConfig(min_margin=-0.1)
    with pytest.raises(ValueError, match="sigma_position_m must be > 0"):
        MatcherConfig(sigma_position_m=0.0)
