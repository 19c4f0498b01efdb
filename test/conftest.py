"""Shared fixtures: seeded data, the real third-party data folder, and a per-test ROS environment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture
def data_dir() -> Path:
    """Real third-party data copied from shared/data (see test/data/README.md and each folder's licence)."""
    return DATA


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1338)
