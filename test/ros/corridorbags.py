"""The RTAB-Map corridor as node-test material: an offline map of its first pass (local features, intrinsics), and
its second pass (revisits) as bags of consecutive chunks, each frame with its camera_info, so that a node verifies
its candidates and makes verified pose priors. Built once per test module (:func:`corridor_map`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from bagfactory import STAMP0_NS, TYPESTORE, BagMessage, Motion, header, write_camera_bag

from dinomix_ros.imaging.features import FeatureConfig
from dinomix_ros.maps.build_bag import BagMapConfig, build_map_from_bag
from dinomix_ros.maps.sources.poses import KeyframeGateConfig
from dinomix_ros.model.encoder import Encoder, EncoderConfig
from dinomix_ros.maps.storage import save_map

CAMERA = "/camera/image_raw/compressed"
K = [420.0, 0.0, 256.0, 0.0, 420.0, 192.0, 0.0, 0.0, 1.0]  # assumed: the corridor's calibration is not published
NS = 1_000_000_000
DATA = Path(__file__).resolve().parents[1] / "data"


def corridor_frames(numbers: range) -> list[np.ndarray]:
    folder = DATA / "rtabmap_corridor" / "samples"
    return [cv2.cvtColor(cv2.imread(str(folder / f"{i}.jpg")), cv2.COLOR_BGR2RGB) for i in numbers]


def camera_infos(start_ns: int, n: int) -> list[BagMessage]:
    """One CameraInfo per frame at 5 Hz (a driver publishes one with every image)."""
    T = TYPESTORE.types
    out = []
    for i in range(n):
        stamp = start_ns + i * NS // 5
        msg = T["sensor_msgs/msg/CameraInfo"](
            header=header(stamp, "camera_optical_frame"), height=384, width=512, distortion_model="plumb_bob",
            d=np.zeros(5), k=np.array(K), r=np.eye(3).ravel(), p=np.zeros(12), binning_x=0, binning_y=0,
            roi=T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))
        out.append(BagMessage("/camera/camera_info", "sensor_msgs/msg/CameraInfo", stamp - 1_000_000, msg))
    return out


@dataclass(frozen=True)
class Corridor:
    """The first pass's map and the second pass in chunks (bag paths, in replay order)."""

    map_path: Path
    chunks: tuple[Path, ...]


def _build(folder: Path, chunk_sizes: tuple[int, ...], with_camera_info: bool) -> Corridor:
    first = write_camera_bag(folder / "first", frames=corridor_frames(range(1, 41)), image_rate_hz=5.0,
                             image_topics=(CAMERA,), image_format="jpeg", extra_messages=camera_infos(STAMP0_NS, 40))
    encoder = Encoder.from_random("vits14", 0, EncoderConfig(device="cpu", dtype="float32"))
    gate = KeyframeGateConfig(min_distance_m=0.1, min_rotation_deg=0.0)
    kmap, _ = build_map_from_bag(first.path, encoder, BagMapConfig(image_topics=(CAMERA,), pose_topic="/odom",
                                                                   gate=gate), progress=False,
                                 features=FeatureConfig())
    map_path = save_map(kmap, folder / "corridor.dinomap")
    chunks, number, start = [], 41, STAMP0_NS + 1000 * NS
    for i, size in enumerate(chunk_sizes):
        bag = write_camera_bag(folder / f"second{i}", frames=corridor_frames(range(number, number + size)),
                               image_rate_hz=5.0, image_topics=(CAMERA,), image_format="jpeg",
                               motion=Motion(start_ns=start), pose_kind=None,
                               extra_messages=camera_infos(start, size) if with_camera_info else ())
        chunks.append(bag.path)
        number, start = number + size, start + size * NS // 5 + NS
    return Corridor(map_path, tuple(chunks))


@pytest.fixture(scope="module")
def corridor_map(tmp_path_factory) -> Corridor:
    """The map of the first pass (40 keyframes with features) and the 40 revisits in chunks of 8, 12, 20."""
    return _build(tmp_path_factory.mktemp("corridor"), (8, 12, 20), with_camera_info=True)
