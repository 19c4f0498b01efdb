"""The thumbnail descriptor of the evaluation tests, importable by name (a conftest module is not: pytest keeps
only one module called ``conftest`` importable at a time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def thumbnail(path: Path) -> np.ndarray:
    """The thumbnail descriptor of one image: the recipe of :func:`corridor_thumbnails`, as float32."""
    with Image.open(path) as img:
        thumb = img.convert("L").resize((32, 24), Image.BILINEAR)
    x = np.asarray(thumb, dtype=np.float64).ravel()
    x -= x.mean()
    return (x / np.linalg.norm(x)).astype(np.float32)
