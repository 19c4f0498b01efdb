"""Fixtures of the evaluation tests: the RTAB-Map corridor ground truth, its thumbnail baseline, and a thumbnail
encoder (the Encoder interface without a model) for running the evaluation setups fast and deterministically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinomix_ros.evaluation.loops import load_loop_closure_ground_truth
from thumbnails import thumbnail

CORRIDOR_FRAMES = 84


@pytest.fixture
def corridor_thumbnails(data_dir: Path) -> np.ndarray:
    """The thumbnail baseline of test/data/rtabmap_corridor/SOURCE.md, recipe pinned by test_thumbnail_baseline.

    Recipe: PIL ``convert("L").resize((32, 24), Image.BILINEAR)`` (explicit: Pillow's default filter is bicubic),
    flatten to 768 values in float64, subtract each thumbnail's own mean, L2-normalise; similarity = X @ X.T.
    """
    frames = []
    for i in range(1, CORRIDOR_FRAMES + 1):
        with Image.open(data_dir / "rtabmap_corridor" / "samples" / f"{i}.jpg") as img:
            thumb = img.convert("L").resize((32, 24), Image.BILINEAR)
        frames.append(np.asarray(thumb, dtype=np.float64).ravel())
    x = np.stack(frames)
    x -= x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


@pytest.fixture
def corridor_gt(data_dir: Path) -> np.ndarray:
    return load_loop_closure_ground_truth(data_dir / "rtabmap_corridor" / "samples_GT.bmp")


class _Fingerprint:
    def __init__(self, model_id: str) -> None:
        self.id = model_id

    def to_dict(self) -> dict:
        return {"id": self.id, "architecture": "thumbnail_32x24", "weights_sha256": "cd" * 32,
                "preprocessing": "gray 32x24 bilinear, mean-subtracted", "descriptor_dim": 768}


class ThumbnailEncoder:
    """What the evaluation setups use of an Encoder, with 768-d thumbnails as descriptors (identical images: 1.0)."""

    descriptor_dim = 768

    def __init__(self, model_id: str = "dmx-0123456789abcdef") -> None:
        self.fingerprint = _Fingerprint(model_id)
        self.calls: list[dict] = []

    def describe(self, paths: list[Path], progress: bool = False, skip_errors: bool = False,
                 desc: str | None = None) -> np.ndarray:
        self.calls.append({"n": len(paths), "progress": progress, "skip_errors": skip_errors, "desc": desc})
        rows = []
        for path in paths:
            try:
                rows.append(thumbnail(path))
            except OSError:
                if not skip_errors:
                    raise
                rows.append(np.full(self.descriptor_dim, np.nan, np.float32))
        return np.stack(rows) if rows else np.zeros((0, self.descriptor_dim), np.float32)


@pytest.fixture
def thumbnail_encoder() -> ThumbnailEncoder:
    return ThumbnailEncoder()
