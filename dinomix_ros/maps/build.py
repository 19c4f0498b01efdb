"""Build keyframe maps offline: what the builders share (their error, their report, the map they add to).

The builders: :mod:`dinomix_ros.maps.build_bag` (ROS 2 bags: images + a pose topic) and
:mod:`dinomix_ros.maps.build_folder` (geotagged image folders); each one's docstring says how its source becomes
keyframes.

The live node (:mod:`dinomix_ros.ros.localizer_node`) reuses :data:`~dinomix_ros.maps.geotags.NO_POSE_FRAME` and the
keyframe gate of :mod:`dinomix_ros.maps.sources.poses`. The search index of a map
(:func:`~dinomix_ros.maps.index.index_for_map`, :func:`~dinomix_ros.maps.index.save_map_with_index`) lives in
:mod:`dinomix_ros.maps.index`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dinomix_ros.maps.keyframes import KeyframeMap, MapError

__all__ = [
    "MapBuildError",
    "BuildReport",
    "new_map",
]

_NS_PER_S = 1_000_000_000


class MapBuildError(ValueError):
    """A build that cannot run as configured (bad config, nothing usable in the source)."""


@dataclass
class BuildReport:
    """What a build did. Every image seen ends in exactly one of ``no_pose``, ``not_keyframes``, ``bad``, ``added``.

    Attributes:
        source: what was read, e.g. ``bag:/data/run1`` or ``images:/data/lund``.
        images_seen: image messages (bag) or files (folder) read.
        no_pose: images refused because no pose lay within ``pairing.max_gap_s`` of their stamp (bags only).
        not_keyframes: images the keyframe gate rejected (bags only).
        bad: images that could not be decoded (skipped with a warning).
        added: keyframes added to the map.
        no_geotag: added keyframes without a GPS geotag (bag with a GPS topic) or without any position (folder).
        per_camera: keyframes added per camera name.
        frame_id: frame of the keyframes' poses: the pose track's (bag), or the folder images' frames,
            comma-separated when there are several.
        seconds: wall time of the build.
    """

    source: str
    images_seen: int = 0
    no_pose: int = 0
    not_keyframes: int = 0
    bad: int = 0
    added: int = 0
    no_geotag: int = 0
    per_camera: dict[str, int] = field(default_factory=dict)
    frame_id: str = ""
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Images seen per second of build time."""
        return self.images_seen / self.seconds if self.seconds > 0 else 0.0

    @property
    def keyframes_per_s(self) -> float:
        """Keyframes added per second of build time."""
        return self.added / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One log line."""
        return (f"{self.source}: {self.images_seen} images -> {self.added} keyframes ({self.no_pose} without pose, "
                f"{self.not_keyframes} not keyframes, {self.bad} bad, {self.no_geotag} without geotag) in "
                f"{self.seconds:.1f} s, {self.images_per_s:.1f} images/s")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, with the rates."""
        return {
            "source": self.source,
            "images_seen": self.images_seen,
            "no_pose": self.no_pose,
            "not_keyframes": self.not_keyframes,
            "bad": self.bad,
            "added": self.added,
            "no_geotag": self.no_geotag,
            "per_camera": dict(self.per_camera),
            "frame_id": self.frame_id,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 3),
            "keyframes_per_s": round(self.keyframes_per_s, 3),
        }


# ---------------------------------------------------------------------------------------------------- helpers


def new_map(encoder: Any, storage_dtype: str = "float16", metadata: dict[str, Any] | None = None) -> KeyframeMap:
    """An empty map for ``encoder``'s descriptors (its fingerprint and dimension).

    Args:
        encoder: a :class:`~dinomix_ros.model.encoder.Encoder`.
        storage_dtype: "float16" or "float32".
        metadata: free-form JSON-able metadata (name, notes).
    """
    return KeyframeMap.empty(encoder.fingerprint.to_dict(), storage_dtype=storage_dtype, metadata=metadata)


def _target_map(encoder: Any, kmap: KeyframeMap | None) -> KeyframeMap:
    if kmap is None:
        return new_map(encoder)
    # A MapMismatchError here names both models: appending descriptors of another model would corrupt the map.
    kmap.check_compatible(encoder.fingerprint.to_dict())
    if kmap.descriptor_dim != encoder.descriptor_dim:
        raise MapError(f"the map holds {kmap.descriptor_dim}-d descriptors but the encoder makes "
                       f"{encoder.descriptor_dim}-d ones; use the model that built the map")
    return kmap
