"""Tests of dinomix_ros.maps.masks: the mask builders, combining them, and checking a mask against a search."""

from __future__ import annotations

import numpy as np
import pytest

from dinomix_ros.maps.errors import MaskError
from dinomix_ros.maps.masks import (
    combine_masks,
    mask_exclude_last,
    mask_exclude_recent,
    mask_within_radius,
    normalize_allowed,
)


def test_mask_exclude_recent():
    stamps = np.array([0, 5, 10, 15, 20], dtype=np.int64) * 10**9
    np.testing.assert_array_equal(mask_exclude_recent(stamps, 20 * 10**9, 10.0), [True, True, True, False, False])
    np.testing.assert_array_equal(mask_exclude_recent(stamps, 20 * 10**9, 0.0), [True] * 5)
    # symmetric: keyframes just after the query (another camera, sim time) are recent too
    np.testing.assert_array_equal(mask_exclude_recent(stamps, 12 * 10**9, 5.0), [True, True, False, False, True])
    big = np.array([1_700_000_000_000_000_001, 1_700_000_000_000_000_002], dtype=np.int64)  # ns precision kept
    np.testing.assert_array_equal(mask_exclude_recent(big, 1_700_000_000_000_000_002, 1e-9), [True, False])
    with pytest.raises(MaskError, match="must hold integers, found dtype float64"):
        mask_exclude_recent(stamps.astype(np.float64), 0, 1.0)
    with pytest.raises(MaskError, match="window_s must be a finite number >= 0"):
        mask_exclude_recent(stamps, 0, -1.0)


def test_mask_exclude_last():
    np.testing.assert_array_equal(mask_exclude_last(5, 2), [True, True, True, False, False])
    assert not mask_exclude_last(3, 10).any() and mask_exclude_last(3, 0).all()
    assert mask_exclude_last(0, 4).shape == (0,)
    with pytest.raises(MaskError, match="must be >= 0"):
        mask_exclude_last(5, -1)


def test_mask_within_radius():
    pos = np.array([[0, 0, 0], [3, 4, 0], [3, 4, 0.1], [np.nan, 0, 0], [10, 0, 0]], dtype=np.float64)
    np.testing.assert_array_equal(mask_within_radius(pos, np.zeros(3), 5.0), [True, True, False, False, False])
    np.testing.assert_array_equal(mask_within_radius(pos[:, :2], [3.0, 4.0], 0.0), [False, True, True, False, False])
    with pytest.raises(MaskError, match=r"center has shape \(2,\), expected \(3,\)"):
        mask_within_radius(pos, [0.0, 0.0], 1.0)
    with pytest.raises(MaskError, match=r"positions must have shape \(N, 3\) or \(N, 2\)"):
        mask_within_radius(np.zeros((4, 4)), np.zeros(4), 1.0)
    with pytest.raises(MaskError, match="radius_m must be a finite number >= 0"):
        mask_within_radius(pos, np.zeros(3), float("nan"))


def test_combine_masks(rng):
    a = rng.random(50) < 0.5
    b = rng.random(50) < 0.5
    per_query = rng.random((3, 50)) < 0.5
    assert combine_masks() is None and combine_masks(None, None) is None
    np.testing.assert_array_equal(combine_masks(a, None, b), a & b)
    np.testing.assert_array_equal(combine_masks(a, per_query), a & per_query)
    out = combine_masks(a)
    out[:] = False
    assert a.any(), "combine_masks must not alias its input"
    with pytest.raises(MaskError, match="does not combine"):
        combine_masks(a, np.ones(49, dtype=bool))
    with pytest.raises(MaskError, match="bool array, found dtype int64"):
        combine_masks(a, np.ones(50, dtype=np.int64))


def test_normalize_allowed_pads_collapses_and_drops_trivial_masks(rng):
    assert normalize_allowed(None, 3, 10) is None
    assert normalize_allowed(np.ones(10, dtype=bool), 3, 10) is None  # allows everything: no filtering at all
    shared = rng.random(10) < 0.5
    same = normalize_allowed(np.tile(shared, (3, 1)), 3, 10)  # identical rows: one shared mask, one batched search
    assert same.shape == (10,) and same.flags.c_contiguous
    np.testing.assert_array_equal(same, shared)
    per_query = rng.random((3, 10)) < 0.5
    per_query[0] = ~per_query[1]
    np.testing.assert_array_equal(normalize_allowed(per_query, 3, 10), per_query)
    short = normalize_allowed(np.ones(7, dtype=bool), 3, 10)  # built before 3 rows were appended: they are excluded
    np.testing.assert_array_equal(short, np.arange(10) < 7)
    short2 = normalize_allowed(np.ones((3, 8), dtype=bool), 3, 10)
    assert short2.shape == (10,) and not short2[8:].any() and short2[:8].all()
    with pytest.raises(MaskError, match="allowed must be a bool mask, found dtype int64"):
        normalize_allowed(np.ones(10, dtype=np.int64), 3, 10)
    with pytest.raises(MaskError, match=r"allowed has shape \(11,\), expected \(10,\) or \(3, 10\)"):
        normalize_allowed(np.ones(11, dtype=bool), 3, 10)
    with pytest.raises(MaskError, match=r"allowed has shape \(2, 10\)"):
        normalize_allowed(np.ones((2, 10), dtype=bool), 3, 10)
    with pytest.raises(MaskError, match=r"allowed has shape \(3, 10, 1\)"):
        normalize_allowed(np.ones((3, 10, 1), dtype=bool), 3, 10)
