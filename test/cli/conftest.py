"""Fixtures of the command-line tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def corridor_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four corridor images (1, 9, 17, 25) in a folder of their own, shared by the tests of a module."""
    folder = tmp_path_factory.mktemp("corridor")
    for i in (1, 9, 17, 25):
        shutil.copy(DATA / "rtabmap_corridor" / "samples" / f"{i}.jpg", folder / f"{i}.jpg")
    return folder
