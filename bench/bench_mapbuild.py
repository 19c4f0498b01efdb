#!/usr/bin/env python3
"""Map-build throughput (prints ONE JSON object): a JPEG folder and a bag of the same images, with random weights.

Five numbers, all images per second on the chosen device:

* ``model_only``: ``Encoder.describe_prepared`` on already resized 224x224 images (the ceiling);
* ``decoded``: ``Encoder.describe_stream`` on the decoded full-size frames (arrays, as a camera or a bag reader
  gives them: resize, on the host or the device per ``--preprocess``, overlapped with the model; no map);
* ``pipeline``: ``Encoder.describe_stream`` on the JPEG files (decode and resize in worker threads, overlapped with
  the model; no map);
* ``folder``: :func:`dinomix_ros.maps.build_folder.build_map_from_folder` on the folder (JPEG decode, resize,
  describe, add);
* ``bag``: :func:`dinomix_ros.maps.build_bag.build_map_from_bag` on a temporary ROS 2 bag holding the same JPEGs as
  ``sensor_msgs/CompressedImage`` (the original bytes) plus ``nav_msgs/Odometry`` at 50 Hz along a line with
  0.6 m between frames, so the 0.5 m gate keeps every frame (bag reading, pose interpolation, gating, decode,
  resize, describe, add).

Random weights: speed does not depend on the weight values. A warm-up pass runs first. The temporary bag is
written with test/bagfactory.py. Progress and logs go to stderr.

Example::

    .venv/bin/python bench/bench_mapbuild.py > runs/bench_mapbuild.json          # CPU here: ViT-S
    python bench/bench_mapbuild.py --variant vitb14 --device cuda --batch-size 64  # a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "test"))  # bagfactory (the tests' bag writer)
try:
    import dinomix_ros  # noqa: F401
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(REPO))

from bagfactory import (  # noqa: E402
    COMPRESSED_IMAGE,
    ODOMETRY,
    TYPESTORE,
    BagMessage,
    Motion,
    header,
    odometry_msg,
    write_bag,
)

from dinomix_ros.model.encoder import Encoder, EncoderConfig  # noqa: E402
from dinomix_ros.maps.sources.imagefolder import list_images  # noqa: E402
from dinomix_ros.maps.build_bag import BagMapConfig, build_map_from_bag  # noqa: E402
from dinomix_ros.maps.build_folder import build_map_from_folder  # noqa: E402

LOG = logging.getLogger("bench_mapbuild")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=Path, default=REPO / "test" / "data" / "rtabmap_corridor" / "samples",
                   help="folder of JPEG images (all of them are used)")
    p.add_argument("--variant", default="vits14", help="backbone (vits14, vitb14, vitl14, vitg14)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="inference precision")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"], help="model runtime")
    p.add_argument("--preprocess", default="auto", choices=["auto", "host", "device"], help="where images are resized")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="decode/resize threads")
    p.add_argument("--storage", default="mcap", choices=["mcap", "sqlite3"], help="storage plugin of the bag")
    p.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING"), help="stderr log level")
    return p.parse_args(argv)


def write_jpeg_bag(path: Path, jpegs: list[Path], storage: str, step_m: float = 0.6, rate_hz: float = 10.0) -> Motion:
    """A bag of the JPEG files as CompressedImage (original bytes) plus 50 Hz odometry, ``step_m`` between frames."""
    motion = Motion(velocity=(step_m * rate_hz, 0.0, 0.0))
    stamps = motion.stamps(rate_hz, (len(jpegs) - 1) / rate_hz)
    messages = []
    for stamp, jpeg in zip(stamps, jpegs):
        data = np.frombuffer(jpeg.read_bytes(), dtype=np.uint8)
        msg = TYPESTORE.types[COMPRESSED_IMAGE](header=header(stamp, "camera"), format="jpeg", data=data)
        messages.append(BagMessage("/camera/image/compressed", COMPRESSED_IMAGE, int(stamp) + 2_000_000, msg))
    for stamp in motion.stamps(50.0, (len(jpegs) - 1) / rate_hz + 0.2, offset_s=-0.1):
        msg = odometry_msg(stamp, motion.position(stamp), motion.orientation(stamp))
        messages.append(BagMessage("/odom", ODOMETRY, int(stamp) + 1_000_000, msg))
    write_bag(path, messages, storage)
    return motion


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    jpegs = list_images(args.images)
    encoder = Encoder.from_random(args.variant, 0, EncoderConfig(
        device=args.device, dtype=args.dtype, backend=args.backend, preprocess=args.preprocess,
        batch_size=args.batch_size, workers=args.workers))
    # Warm-up: one full batch through the model (first-call allocations, kernel selection).
    prepared = np.stack([encoder.prepare(p) for p in jpegs])
    encoder.describe_prepared(prepared[:args.batch_size])

    t0 = time.perf_counter()
    for start in range(0, len(prepared), args.batch_size):
        encoder.describe_prepared(prepared[start:start + args.batch_size])
    model_s = time.perf_counter() - t0

    decoded = [cv2.imread(str(p)) for p in jpegs]
    t0 = time.perf_counter()
    from_arrays = sum(len(batch.tags) for batch in encoder.describe_stream((a, "bgr8", i) for i, a in
                                                                           enumerate(decoded)))
    decoded_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    described = sum(len(batch.tags) for batch in encoder.describe_stream((p, None, p) for p in jpegs))
    pipeline_s = time.perf_counter() - t0

    _, folder = build_map_from_folder(args.images, encoder, geotag_source="none", progress=False,
                                      batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="bench_mapbuild_") as tmp:
        t0 = time.perf_counter()
        write_jpeg_bag(Path(tmp) / "bag", jpegs, args.storage)
        write_s = time.perf_counter() - t0
        # batches of --batch-size: the encoder's config
        config = BagMapConfig(image_topics=("/camera/image/compressed",), pose_topic="/odom")
        _, bag = build_map_from_bag(Path(tmp) / "bag", encoder, config, progress=False)

    info = encoder.describe_info()
    result = {
        "benchmark": "map build throughput, random weights",
        "torch": torch.__version__,
        "device": info["device"],
        "device_name": info["device_name"],
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "variant": args.variant,
        "dtype": info["dtype"],
        "dtype_reason": info["dtype_reason"],
        "backend": info["backend"],
        "providers": info["providers"],
        "preprocess": info["preprocess"],
        "batch_size": args.batch_size,
        "workers": args.workers,
        "images": len(jpegs),
        "image_size": _size(jpegs[0]),
        "model_only": {"seconds": round(model_s, 3), "images_per_s": round(len(jpegs) / model_s, 2)},
        "decoded": {"seconds": round(decoded_s, 3), "images_per_s": round(len(jpegs) / decoded_s, 2),
                    "described": from_arrays},
        "pipeline": {"seconds": round(pipeline_s, 3), "images_per_s": round(len(jpegs) / pipeline_s, 2),
                     "described": described},
        "folder": {"seconds": round(folder.seconds, 3), "images_per_s": round(folder.images_per_s, 2),
                   "added": folder.added},
        "bag": {"storage": args.storage, "write_seconds": round(write_s, 3),
                "seconds": round(bag.seconds, 3), "images_per_s": round(bag.images_per_s, 2),
                "keyframes": bag.added, "keyframes_per_s": round(bag.keyframes_per_s, 2)},
    }
    print(json.dumps(result, indent=2))
    return 0


def _size(path: Path) -> list[int]:
    from PIL import Image

    with Image.open(path) as img:
        return [img.width, img.height]


if __name__ == "__main__":
    sys.exit(main())
