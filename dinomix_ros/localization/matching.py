"""From a query descriptor to place-match candidates, an accept/reject decision and a pose prior (ROS-free).

Rules, each of which can be switched off (0 or 1 disables it, see :class:`MatcherConfig`):

* exclusion of recent keyframes, by time (``exclude_recent_s``) and by count (``exclude_recent_count``), so a robot
  looking for loop closures against its own past does not match the frames it just saw;
* gating by a position hint (odometry or GPS, with its frame): only keyframes of that frame within ``gate_radius_m``;
* ``min_similarity`` on the best candidate (calibrate it with ``dinomix map eval``: the threshold for a target
  precision);
* ``min_margin`` between the best candidate and the best *rival*, a candidate farther than
  ``margin_neighbour_radius_m`` from it (neighbouring keyframes of the same place are not rivals); rivals are looked
  for among the best :data:`MARGIN_SEARCH_K` keyframes, not only the ``top_k`` reported, because a well-sampled map
  fills the top few with neighbours of the best;
* temporal consistency: accept only after ``consistency_count`` consecutive queries whose best matches lie within
  ``consistency_radius_m`` of each other (or within ``consistency_max_rows`` map rows when poses are unknown).

The pose prior is the best keyframe's pose with a covariance that grows as the score drops and as the accepted
candidates spread out; it is never zero (see :meth:`Matcher.pose_prior`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.sources.poses import quat_to_yaw, yaw_to_quat
from dinomix_ros.settings import check, setting
from dinomix_ros.maps.index import PlaceIndex
from dinomix_ros.maps.masks import combine_masks, mask_exclude_last, mask_exclude_recent, mask_within_radius

__all__ = ["MatcherConfig", "Candidate", "PosePrior", "MatchResult", "Matcher"]

_logger = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
MARGIN_SEARCH_K = 32  # candidates searched for a rival when min_margin is on
UNKNOWN_ROTATION_VARIANCE = math.pi**2  # orientation unknown (GPS-only maps): any heading


@dataclass(frozen=True)
class MatcherConfig:
    """Matching rules and the pose-prior uncertainty model (node parameters ``matching.*``; they apply at once when
    set at run time)."""

    SETTINGS_GROUP: ClassVar[str] = "matching"

    top_k: int = setting(5, "candidates returned per query", min=1, max=1000)
    min_similarity: float = setting(0.5, "accept only if the best cosine similarity reaches this (-1: off; calibrate "
                                         "with `dinomix map eval`)", min=-1.0, max=1.0)
    use_map_calibration: bool = setting(True, "when the map carries a calibrated threshold (`dinomix map eval "
                                              "--calibrate`), use it as matching.min_similarity")
    min_margin: float = setting(0.0, "accept only if best minus best rival similarity reaches this (0: off)",
                                min=0.0, max=2.0)
    margin_neighbour_radius_m: float = setting(5.0, "candidates this close to the best are the same place, not "
                                                    "rivals", min=0.0, max=1e4)
    exclude_recent_s: float = setting(0.0, "ignore keyframes captured less than this many seconds from the query "
                                           "(loop closure against the robot's own past; 0: off)", min=0.0, max=1e7)
    exclude_recent_count: int = setting(0, "ignore the newest N keyframes of the map (0: off)", min=0, max=10**7)
    consistency_count: int = setting(1, "accept only after this many consecutive queries agree (1: off)",
                                     min=1, max=100)
    consistency_radius_m: float = setting(5.0, "consecutive best matches agree when this close", min=0.0, max=1e4)
    consistency_max_rows: int = setting(5, "without poses: consecutive best matches agree when this many map rows "
                                           "apart or fewer", min=0, max=10**7)
    consistency_max_gap_s: float = setting(5.0, "a consistency streak breaks after this many seconds without a query",
                                           min=0.0, max=3600.0)
    gate_radius_m: float = setting(0.0, "only keyframes within this radius of the pose source's position, when it is "
                                        "in the keyframes' frame (0: off)", min=0.0, max=1e5)
    sigma_position_m: float = setting(0.5, "pose-prior position std-dev at similarity 1", positive=True, max=1e4)
    sigma_yaw_rad: float = setting(0.15, "pose-prior rotation std-dev at similarity 1", positive=True, max=10.0)
    score_sigma_gain: float = setting(10.0, "std-devs grow by (1 + gain * (1 - similarity))", min=0.0, max=1e4)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class Candidate:
    """One map keyframe returned for a query."""

    rank: int
    similarity: float
    row: int
    keyframe_id: int
    stamp_ns: int
    camera: str
    frame_id: str
    position: np.ndarray  # (3,), NaN when unknown
    orientation: np.ndarray  # (4,) x y z w, NaN when unknown
    gps: np.ndarray  # (3,) lat lon alt, NaN when unknown
    # geometric verification (dinomix_ros.localization.verification.Verification), None when not verified
    verification: Any = field(default=None, compare=False, repr=False)

    @property
    def has_position(self) -> bool:
        return bool(np.isfinite(self.position).all())

    @property
    def verified(self) -> bool:
        """Verified and passed the verification rules."""
        return self.verification is not None and bool(self.verification.passed)

    @property
    def inliers(self) -> int:
        return 0 if self.verification is None else int(self.verification.inliers)

    @property
    def verified_score(self) -> float:
        """The verified score (NaN when not verified)."""
        return math.nan if self.verification is None else float(self.verification.score)


@dataclass(frozen=True)
class PosePrior:
    """A pose in ``frame_id`` with a 6x6 covariance over (x, y, z, rot_x, rot_y, rot_z), row-major like ROS."""

    frame_id: str
    position: np.ndarray
    orientation: np.ndarray
    covariance: np.ndarray


@dataclass
class MatchResult:
    """Everything the node publishes about one query."""

    stamp_ns: int
    camera: str
    candidates: list[Candidate]
    accepted: bool
    rejected_by: list[str] = field(default_factory=list)
    margin: float = math.inf
    streak: int = 0
    prior: PosePrior | None = None

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


class Matcher:
    """Queries a keyframe map's index and applies the rules; keeps the temporal-consistency state.

    Not thread-safe by itself: the node calls it from one worker thread and holds its map lock while the map grows.
    """

    def __init__(self, kmap: KeyframeMap, index: PlaceIndex, config: MatcherConfig | None = None) -> None:
        self.map = kmap
        self.index = index
        self.config = config or MatcherConfig()
        self._last_best: Candidate | None = None
        self._last_stamp_ns: int | None = None
        self._streak = 0

    def reset(self) -> None:
        """Forget the consistency streak (after a map reload or a clock jump)."""
        self._last_best, self._last_stamp_ns, self._streak = None, None, 0

    def allowed_mask(self, stamp_ns: int, position_hint: tuple[str, np.ndarray] | None = None) -> np.ndarray | None:
        """Which map rows may match a query at ``stamp_ns`` (None: all).

        ``position_hint`` is (frame_id, position): with ``gate_radius_m`` > 0 only keyframes of that frame within the
        radius are allowed (positions in other frames cannot be compared).
        """
        c, n = self.config, len(self.map)
        masks = []
        if c.exclude_recent_s > 0:
            masks.append(mask_exclude_recent(self.map.stamps_ns, stamp_ns, c.exclude_recent_s))
        if c.exclude_recent_count > 0:
            masks.append(mask_exclude_last(n, c.exclude_recent_count))
        if c.gate_radius_m > 0 and position_hint is not None:
            frame, position = position_hint
            hint = np.asarray(position, dtype=np.float64)
            masks.append(mask_within_radius(self.map.positions[:, : hint.shape[0]], hint, c.gate_radius_m)
                         & (self.map.frame_ids == frame))
        return combine_masks(*masks)

    def candidates(self, descriptor: np.ndarray, stamp_ns: int, position_hint: tuple[str, np.ndarray] | None = None,
                   k: int | None = None) -> list[Candidate]:
        """The best ``k`` (default ``top_k``) allowed keyframes, best first."""
        if len(self.map) == 0 or self.index.ntotal == 0:
            return []
        D, I = self.index.search(descriptor[None], k or self.config.top_k,
                                 allowed=self.allowed_mask(stamp_ns, position_hint))
        m, out = self.map, []
        for rank, (score, row) in enumerate(zip(D[0].tolist(), I[0].tolist())):
            if row < 0:
                break
            out.append(Candidate(rank, score, row, int(m.ids[row]), int(m.stamps_ns[row]), str(m.cameras[row]),
                                 str(m.frame_ids[row]), m.positions[row].copy(), m.orientations[row].copy(),
                                 m.gps[row].copy()))
        return out

    def query(self, descriptor: np.ndarray, stamp_ns: int, camera: str = "",
              position_hint: tuple[str, np.ndarray] | None = None,
              verify: Callable[[list[Candidate]], list[Candidate]] | None = None) -> MatchResult:
        """Match one descriptor and decide whether to accept the best candidate.

        Args:
            descriptor: (D,) unit descriptor of the query image.
            stamp_ns: the query image's stamp (recency exclusion, consistency).
            camera: name reported in the result.
            position_hint: (frame_id, position) of the robot from its pose source, for gating.
            verify: geometric verification: takes the candidates best first and returns them verified and
                re-ranked (ranks renumbered); then the best must also be verified (rule "verification").
        """
        c = self.config
        searched = self.candidates(descriptor, stamp_ns, position_hint,
                                   k=max(c.top_k, MARGIN_SEARCH_K) if c.min_margin > 0 else c.top_k)
        cands = searched[: c.top_k]
        if verify is not None and cands:
            cands = verify(cands)
        result = MatchResult(stamp_ns, camera, cands, accepted=False)
        if not cands:
            result.rejected_by.append("no_candidates")
            self.reset()
            return result
        best = cands[0]
        result.margin = self._margin(searched)
        if best.similarity < c.min_similarity:
            result.rejected_by.append("min_similarity")
        if c.min_margin > 0 and result.margin < c.min_margin:
            result.rejected_by.append("margin")
        if verify is not None and not best.verified:
            result.rejected_by.append("verification")
        if result.rejected_by:
            self.reset()
        else:
            self._update_streak(best, stamp_ns)
            result.streak = self._streak
            if self._streak < c.consistency_count:
                result.rejected_by.append("consistency")
        result.accepted = not result.rejected_by
        if best.has_position:
            result.prior = self.pose_prior(cands)
        return result

    def _margin(self, cands: list[Candidate]) -> float:
        best = cands[0]
        for cand in cands[1:]:
            if best.has_position and cand.has_position and cand.frame_id == best.frame_id:
                if np.linalg.norm(cand.position - best.position) <= self.config.margin_neighbour_radius_m:
                    continue  # a neighbour of the same place, not a rival
            return best.similarity - cand.similarity
        return math.inf

    def _update_streak(self, best: Candidate, stamp_ns: int) -> None:
        c, last = self.config, self._last_best
        agrees = False
        if last is not None and self._last_stamp_ns is not None:
            recent = abs(stamp_ns - self._last_stamp_ns) <= c.consistency_max_gap_s * NS_PER_S
            if best.has_position and last.has_position and best.frame_id == last.frame_id:
                near = np.linalg.norm(best.position - last.position) <= c.consistency_radius_m
            else:
                near = abs(best.row - last.row) <= c.consistency_max_rows
            agrees = recent and near
        self._streak = self._streak + 1 if agrees else 1
        self._last_best, self._last_stamp_ns = best, stamp_ns

    def pose_prior(self, cands: list[Candidate]) -> PosePrior:
        """Best keyframe pose; covariance = score term + spread of the supporting candidates.

        score term: sigma = sigma_* x (1 + score_sigma_gain x (1 - similarity)), on x, y, z and on the rotations;
        spread: the similarity-weighted second moment, about the best keyframe, of the positions (and yaws) of the
        candidates in the best's frame that pass min_similarity. Unknown orientation (GPS maps) gives identity with a
        rotation variance of pi^2.
        """
        c, best = self.config, cands[0]
        inflate = 1.0 + c.score_sigma_gain * max(0.0, 1.0 - best.similarity)
        cov = np.zeros((6, 6))
        cov[:3, :3] = np.eye(3) * (c.sigma_position_m * inflate) ** 2
        support = [x for x in cands if x.has_position and x.frame_id == best.frame_id
                   and x.similarity >= c.min_similarity] or [best]
        # similarity weights of the supporting candidates; spreads are second moments about the PUBLISHED pose
        # (the best keyframe), so a best keyframe at the edge of the support is not reported as more certain
        w = np.array([x.similarity - c.min_similarity + 1e-3 for x in support])
        w /= w.sum()
        d = np.stack([x.position for x in support]) - best.position
        cov[:3, :3] += (w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)
        orientation = best.orientation
        if np.isfinite(orientation).all():
            rot_var = (c.sigma_yaw_rad * inflate) ** 2
            posed = [(wi, x) for wi, x in zip(w, support) if np.isfinite(x.orientation).all()]
            if len(posed) > 1:  # circular, weighted spread about the best yaw
                wy = np.array([wi for wi, _ in posed])
                dyaw = np.angle(np.exp(1j * (np.array([quat_to_yaw(x.orientation) for _, x in posed])
                                             - quat_to_yaw(orientation))))
                rot_var += float((wy * dyaw**2).sum() / wy.sum())
            cov[3:, 3:] = np.eye(3) * rot_var
        else:
            orientation = yaw_to_quat(0.0)
            cov[3:, 3:] = np.eye(3) * UNKNOWN_ROTATION_VARIANCE
        return PosePrior(best.frame_id, best.position.copy(), np.asarray(orientation, float), cov)
