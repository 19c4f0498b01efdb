"""Build keyframe maps offline from ROS 2 bags: images paired with a pose topic, gated into keyframes.

Bags (:func:`build_map_from_bag`):

* The pose track is read first (whole topic, :func:`~dinomix_ros.maps.sources.bags.read_pose_track`), then image
  messages are streamed in bag order. Each image's header stamp is paired with the pose interpolated at that stamp;
  an image with no pose within ``pairing.max_gap_s`` is refused and counted (``no_pose``). The pose topic and the
  GPS topic may come from a second bag (``pose_bag``) recorded at the same time apart from the images: pairing uses
  header stamps, which both bags share.
* One :class:`~dinomix_ros.maps.sources.poses.KeyframeGate` per camera decides the keyframes. Only keyframes are
  decoded (on the calling thread) and described, through the encoder's batch pipeline
  (:meth:`~dinomix_ros.model.encoder.Encoder.describe_stream`: resizing overlaps the model, at most two batches are
  in flight), so memory stays bounded whatever the bag size.
* An undecodable keyframe image is counted (``bad``), logged, and the gate is rolled back to its state before that
  frame, so the next good frame can take its place.
* Keyframes get the pose track's frame (``header.frame_id`` of the pose messages, ``utm`` for a NavSatFix pose
  topic, in the zone of its first fix), the camera name (default: the topic), source ``bag:<topic>@<stamp_ns>``,
  and GPS/UTM geotags interpolated from ``gps_topic`` when one is given (a NavSatFix pose topic is also used as the
  GPS topic by default).

What every builder shares (:class:`~dinomix_ros.maps.build.BuildReport`, :class:`~dinomix_ros.maps.build.MapBuildError`)
lives in :mod:`dinomix_ros.maps.build`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.imaging.decode import ImageDecodeError
from dinomix_ros.imaging.features import FeatureConfig
from dinomix_ros.maps.build import BuildReport, MapBuildError
from dinomix_ros.maps.build import _target_map  # one check of the map a build appends to, shared by the builders
from dinomix_ros.maps.geotags import GpsTrack
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.local_features import FeatureRecorder
from dinomix_ros.maps.sources.bags import (
    IMAGE_TYPES,
    NAVSATFIX_TYPE,
    POSE_TYPES,
    BagError,
    BagImage,
    bag_topics,
    count_messages,
    iter_images,
    read_gps_fixes,
    read_camera_info,
    read_pose_track,
)
from dinomix_ros.maps.sources.poses import KeyframeGate, KeyframeGateConfig, PosePairingConfig, PoseTrack
from dinomix_ros.settings import check, setting
from dinomix_ros.util.progress import progress_bar

if TYPE_CHECKING:  # localization imports maps: only for annotations
    from dinomix_ros.localization.extrinsics import CameraExtrinsics

__all__ = [
    "BagMapConfig",
    "PosedImage",
    "check_bag_config",
    "PosedImageStream",
    "build_map_from_bag",
]

logger = logging.getLogger(__name__)

_MAX_BAD_WARNINGS = 5  # undecodable images logged one by one; the rest only in the summary


# ---------------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class BagMapConfig:
    """How to turn a bag into keyframes.

    Attributes:
        image_topics: sensor_msgs/Image or CompressedImage topics, one per camera (a list is accepted).
        pose_topic: nav_msgs/Odometry, geometry_msgs/PoseStamped, PoseWithCovarianceStamped or sensor_msgs/NavSatFix
            topic giving the camera/robot position (NavSatFix: UTM, frame ``utm``, no orientation).
        gps_topic: optional NavSatFix topic used only to geotag keyframes (lat/lon/alt and UTM, interpolated at the
            image stamps). None with a NavSatFix ``pose_topic`` uses the pose topic; "" switches geotags off.
        pairing: ``pairing.max_gap_s``: an image is refused (counted as ``no_pose``) unless poses lie within this
            many seconds of its stamp (see :meth:`~dinomix_ros.maps.sources.poses.PoseTrack.interpolate`).
        max_gps_gap_s: a keyframe gets a GPS geotag only when fixes lie within this many seconds of its stamp (GNSS
            runs at 1-10 Hz, slower than odometry).
        gate: keyframe gate thresholds, applied per camera (defaults 0.5 m / 15 deg).
        camera_names: camera name per image topic, in the same order; empty = the topic names.

    Raises:
        MapBuildError: empty or duplicate topics, names not matching the topics, a wrong type of sub-config.
        SettingError: ``max_gps_gap_s`` out of range.
    """

    image_topics: tuple[str, ...]
    pose_topic: str
    gps_topic: str | None = None
    pairing: PosePairingConfig = field(default_factory=PosePairingConfig)
    max_gps_gap_s: float = setting(1.0, "a keyframe gets a GPS geotag only when fixes lie within this many seconds "
                                        "of its stamp", min=0.0, max=60.0)
    gate: KeyframeGateConfig = field(default_factory=KeyframeGateConfig)
    camera_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        topics = (self.image_topics,) if isinstance(self.image_topics, str) else tuple(self.image_topics)
        object.__setattr__(self, "image_topics", topics)
        object.__setattr__(self, "camera_names", tuple(self.camera_names))
        if not topics or not all(isinstance(t, str) and t for t in topics):
            raise MapBuildError(f"image_topics is {list(topics)!r}; expected one or more topic names "
                                "(list them with `dinomix map topics BAG`)")
        if len(set(topics)) != len(topics):
            raise MapBuildError(f"image_topics {list(topics)} name a topic twice; expected each camera once")
        if not isinstance(self.pose_topic, str) or not self.pose_topic:
            raise MapBuildError(f"pose_topic is {self.pose_topic!r}; expected an Odometry, PoseStamped, "
                                "PoseWithCovarianceStamped or NavSatFix topic")
        if self.camera_names and len(self.camera_names) != len(topics):
            raise MapBuildError(f"{len(self.camera_names)} camera names {list(self.camera_names)} for {len(topics)} "
                                f"image topics {list(topics)}; expected one name per topic, or none (topic names)")
        if self.camera_names and not all(isinstance(c, str) and c for c in self.camera_names):
            raise MapBuildError(f"camera_names {list(self.camera_names)} holds an empty name; expected non-empty text")
        if len(set(self.cameras)) != len(topics):
            raise MapBuildError(f"camera names {list(self.cameras)} are not unique; expected one name per camera")
        check(self)
        if not isinstance(self.gate, KeyframeGateConfig):
            raise MapBuildError(f"gate is a {type(self.gate).__name__}; expected a KeyframeGateConfig")
        if not isinstance(self.pairing, PosePairingConfig):
            raise MapBuildError(f"pairing is a {type(self.pairing).__name__}; expected a PosePairingConfig")

    @property
    def cameras(self) -> tuple[str, ...]:
        """Camera name of each image topic."""
        return self.camera_names or self.image_topics

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for logs and map metadata)."""
        return {
            "image_topics": list(self.image_topics),
            "cameras": list(self.cameras),
            "pose_topic": self.pose_topic,
            "gps_topic": self.gps_topic,
            "max_pose_gap_s": self.pairing.max_gap_s,
            "max_gps_gap_s": self.max_gps_gap_s,
            "gate": dataclasses.asdict(self.gate),
        }


def check_bag_config(bag: str | Path, config: BagMapConfig, *,
                     pose_bag: str | Path | None = None) -> dict[str, tuple[str, int]]:
    """Check that the bag(s) have the configured topics with usable types, before anything expensive runs.

    Args:
        bag: the bag with the image topics.
        config: the topics.
        pose_bag: the bag with the pose and GPS topics, when not ``bag``.

    Returns:
        The topics of the bag holding the pose topic (topic -> (type, count)).

    Raises:
        FileNotFoundError: no bag at ``bag`` or ``pose_bag``.
        BagError: a topic is missing or has the wrong type, or a bag cannot be read.
    """
    image_topics = bag_topics(bag)
    pose_topics = image_topics if pose_bag is None else bag_topics(pose_bag)

    def need(topics: dict[str, tuple[str, int]], where: str | Path, topic: str, allowed: Sequence[str],
             role: str) -> None:
        if topic not in topics:
            raise BagError(f"{role} topic {topic} is not in the bag {where}; it has: "
                           f"{', '.join(sorted(topics)) or 'no topics'} (see `dinomix map topics {where}`)")
        if topics[topic][0] not in allowed:
            raise BagError(f"{role} topic {topic} carries {topics[topic][0]}; expected one of {', '.join(allowed)}")

    for topic in config.image_topics:
        need(image_topics, bag, topic, IMAGE_TYPES, "image")
    need(pose_topics, pose_bag or bag, config.pose_topic, POSE_TYPES, "pose")
    if config.gps_topic:
        need(pose_topics, pose_bag or bag, config.gps_topic, (NAVSATFIX_TYPE,), "GPS")
    return pose_topics


@dataclass(frozen=True)
class PosedImage:
    """An image message with the pose interpolated at its stamp."""

    image: BagImage
    camera: str
    position: np.ndarray  # (3,) metres in the pose track's frame
    orientation: np.ndarray  # (4,) x y z w, NaN when the pose source has none


class PosedImageStream:
    """A bag's images with their interpolated poses, optionally through one keyframe gate per camera.

    Iterating streams the image messages in bag order. Images without a pose within ``max_pose_gap_s`` are skipped
    (counted in ``report.no_pose``), as are frames the gate rejects (``report.not_keyframes``). When the caller
    cannot use a yielded keyframe (e.g. it does not decode), :meth:`reject_last` rolls that camera's gate back to its
    state before the frame, so the next frame is judged against the last keyframe actually kept.

    Args:
        bag: the bag.
        image_topics: image topics.
        track: the pose track (e.g. :func:`~dinomix_ros.maps.sources.bags.read_pose_track`).
        max_pose_gap_s: see :meth:`PoseTrack.interpolate`.
        cameras: camera name per topic (default: the topic names).
        gate: keyframe gate thresholds; None yields every image that has a pose.
        report: counts are added to it (``images_seen``, ``no_pose``, ``not_keyframes``); default: a new one.
        progress: show a progress bar over the image messages.
    """

    def __init__(
        self,
        bag: str | Path,
        image_topics: Sequence[str],
        track: PoseTrack,
        max_pose_gap_s: float,
        *,
        cameras: Sequence[str] | None = None,
        gate: KeyframeGateConfig | None = None,
        report: BuildReport | None = None,
        progress: bool = False,
    ) -> None:
        self.bag = bag
        self.image_topics = tuple(image_topics)
        self.track = track
        self.max_pose_gap_s = max_pose_gap_s
        self.report = report if report is not None else BuildReport(source=f"bag:{bag}")
        self._names = dict(zip(self.image_topics, cameras or self.image_topics))
        self._gates = {t: KeyframeGate.from_config(gate) for t in self.image_topics} if gate is not None else {}
        self._before: tuple[str, KeyframeGate] | None = None
        self._progress = progress

    def __iter__(self) -> Iterator[PosedImage]:
        report = self.report
        total = count_messages(self.bag, self.image_topics) if self._progress else 0
        bar = progress_bar(total, "map build", self._progress)
        try:
            for img in iter_images(self.bag, self.image_topics):
                bar.update(1)
                report.images_seen += 1
                self._before = None
                pose = self.track.interpolate(np.array([img.stamp_ns], dtype=np.int64), self.max_pose_gap_s)
                if not pose.valid[0]:
                    report.no_pose += 1
                    logger.debug("%s@%d: no pose within %.3f s (nearest %.3f s away)", img.topic, img.stamp_ns,
                                 self.max_pose_gap_s, float(pose.gap_s[0]))
                    continue
                position, orientation = pose.positions[0], pose.orientations[0]
                if self._gates:
                    gate = self._gates[img.topic]
                    before = copy.copy(gate)  # only scalars and arrays that accept() replaces, never mutates
                    if not gate.accept(img.stamp_ns, position, orientation):
                        report.not_keyframes += 1
                        continue
                    self._before = (img.topic, before)
                yield PosedImage(img, self._names[img.topic], position, orientation)
        finally:
            bar.close()

    def reject_last(self) -> None:
        """Undo the gate decision of the image yielded last (no-op without a gate)."""
        if self._before is not None:
            topic, before = self._before
            self._gates[topic] = before
            self._before = None


# ---------------------------------------------------------------------------------------------------- bag builder


@dataclass
class _Row:
    stamp_ns: int
    camera: str
    position: np.ndarray
    orientation: np.ndarray
    source: str
    features: Any = None  # LocalFeatures of the keyframe, when the build records them


def _decoded_keyframes(stream: PosedImageStream, on_bad: Callable[[_Row, Exception], None], max_pixels: int,
                       recorder: FeatureRecorder | None = None) -> Iterator[tuple[np.ndarray, str, _Row]]:
    """The stream's keyframes as (image, encoding, row) items for :meth:`Encoder.describe_stream`.

    Images are decoded here, on the thread that pulls the items (the caller of describe_stream), not in a worker: an
    undecodable frame is reported to ``on_bad`` and gives its gate slot back before the next frame is judged.
    """
    for posed in stream:
        img = posed.image
        row = _Row(img.stamp_ns, posed.camera, posed.position, posed.orientation, f"bag:{img.topic}@{img.stamp_ns}")
        try:
            array, encoding = img.decode(max_pixels)
            if recorder is not None:
                row.features, row.camera = recorder.keyframe(array, encoding, posed.camera, img.frame_id)
        except ImageDecodeError as exc:
            on_bad(row, exc)
            stream.reject_last()
            continue
        yield array, encoding, row


def build_map_from_bag(
    bag: str | Path,
    encoder: Any,
    config: BagMapConfig,
    kmap: KeyframeMap | None = None,
    progress: bool = True,
    *,
    pose_bag: str | Path | None = None,
    features: FeatureConfig | None = None,
    intrinsics: dict[str, CameraModel] | None = None,
    extrinsics: CameraExtrinsics | None = None,
) -> tuple[KeyframeMap, BuildReport]:
    """Keyframes of a ROS 2 bag: gated by pose, described with ``encoder``, added to a map.

    Args:
        bag: bag directory (mcap or sqlite3 storage) with the image topics.
        encoder: a :class:`~dinomix_ros.model.encoder.Encoder`.
        config: topics, pose gap, gate and batching.
        kmap: a map to append to (it must have been built with the same model); None creates a float16 map.
        progress: show a progress bar over the image messages.
        pose_bag: the bag with the pose and GPS topics, when they were recorded apart from the images (same clock);
            None: ``bag``.
        features: local features stored per keyframe (None: none, the map has no verification).
        intrinsics: camera name -> intrinsics stored in the map; cameras left out take them from their
            camera_info topic in the bag, when it has one. Fitted to the images' size (scaled when only the
            resolution differs).
        extrinsics: the extrinsic of each image frame_id, stored with the keyframes' camera records (None:
            ``camera_mount.*``'s default for every camera).

    Returns:
        The map (``kmap`` itself when given) and the build report.

    Raises:
        FileNotFoundError: no bag.
        BagError: missing topics, wrong types, an unreadable bag or a pose topic without poses.
        MapMismatchError: ``kmap`` was built by another model (checked before anything is read).
    """
    t0 = time.perf_counter()
    kmap = _target_map(encoder, kmap)
    topics = check_bag_config(bag, config, pose_bag=pose_bag)
    poses_from = bag if pose_bag is None else pose_bag
    track = read_pose_track(poses_from, config.pose_topic)
    frame_id = track.frame_id
    if not frame_id:
        frame_id = config.pose_topic
        logger.warning("pose topic %s has an empty header.frame_id; keyframes use the frame id %r instead",
                       config.pose_topic, frame_id)
    pose_is_gps = topics[config.pose_topic][0] == NAVSATFIX_TYPE
    gps_topic = config.gps_topic
    if gps_topic is None and pose_is_gps:
        gps_topic = config.pose_topic  # a NavSatFix pose topic geotags the keyframes too
    gps = None
    if gps_topic:
        # With a NavSatFix pose topic the geotags use the zone of the poses (their first fix's), so positions and UTM
        # agree; read_gps_fixes keeps the fixes pose_from_msg accepts.
        zone = GpsTrack.from_fixes(read_gps_fixes(poses_from, config.pose_topic)).zone if pose_is_gps else None
        gps = GpsTrack.from_fixes(read_gps_fixes(poses_from, gps_topic), utm_zone=zone)
    logger.info("building from %s: %d poses in frame %r from %s in %s, %s; images %s (cameras %s)", bag, len(track),
                frame_id, config.pose_topic, poses_from, f"GPS geotags from {gps_topic} ({len(gps)} fixes)" if gps else
                "no GPS geotags", list(config.image_topics), list(config.cameras))
    report = BuildReport(source=f"bag:{bag}" + (f" poses:{pose_bag}" if pose_bag is not None else ""),
                         frame_id=frame_id)
    bad_logged = [0]

    # Over 80 lines on purpose: add() and on_bad() close over this build's map, report and GPS track.
    def add(desc: np.ndarray, rows: list[_Row]) -> None:
        stamps = np.array([r.stamp_ns for r in rows], dtype=np.int64)
        geo: dict[str, Any] = {}
        if gps is not None:
            tags = gps.geotag(stamps, config.max_gps_gap_s)
            report.no_geotag += int((~tags.pop("valid")).sum())
            geo = tags
        kmap.add(desc, stamps_ns=stamps, cameras=[r.camera for r in rows], frame_ids=frame_id,
                 positions=np.stack([r.position for r in rows]), orientations=np.stack([r.orientation for r in rows]),
                 sources=[r.source for r in rows], features=[r.features for r in rows] if recorder.active else None,
                 **geo)
        report.added += len(rows)
        for r in rows:
            report.per_camera[r.camera] = report.per_camera.get(r.camera, 0) + 1

    def on_bad(row: _Row, exc: Exception) -> None:
        report.bad += 1
        if bad_logged[0] < _MAX_BAD_WARNINGS:
            logger.warning("skipping undecodable image %s: %s", row.source, exc)
        bad_logged[0] += 1

    recorder = FeatureRecorder(kmap, features, _bag_intrinsics(bag, config, intrinsics), extrinsics)
    stream = PosedImageStream(bag, config.image_topics, track, config.pairing.max_gap_s, cameras=config.cameras,
                              gate=config.gate, report=report, progress=progress)
    items = _decoded_keyframes(stream, on_bad, encoder.image.max_pixels, recorder)
    with closing(items), closing(encoder.describe_stream(items)) as batches:
        for batch in batches:
            for row, exc in batch.failed:
                on_bad(row, exc)
            if batch.tags:
                add(batch.descriptors, batch.tags)
    report.seconds = time.perf_counter() - t0
    if report.bad > _MAX_BAD_WARNINGS:
        logger.warning("%d undecodable images were skipped in all (the first %d are logged above)", report.bad,
                       _MAX_BAD_WARNINGS)
    if report.images_seen and report.no_pose == report.images_seen:
        logger.warning("no image of %s had a pose within %.3f s: check that %s covers the images' time span and that "
                       "both use the same clock (header stamps)", bag, config.pairing.max_gap_s, config.pose_topic)
    logger.info("%s", report.summary())
    return kmap, report


def _bag_intrinsics(bag: str | Path, config: BagMapConfig, given: dict[str, CameraModel] | None
                    ) -> dict[str, CameraModel]:
    """Intrinsics per camera: those given, else the bag's camera_info of each image topic (when it has one)."""
    out = dict(given or {})
    for topic, camera in zip(config.image_topics, config.cameras):
        if camera not in out:
            found = read_camera_info(bag, topic)
            if found is not None:
                out[camera] = found
                logger.info("camera %s: intrinsics from the bag's camera_info (%dx%d %s)", camera, found.width,
                            found.height, found.distortion_model)
    return out
