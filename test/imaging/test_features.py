"""Local features of real images: counts, full-resolution keypoints, depths, any decoded encoding."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dinomix_ros.imaging.decode import read_image_file
from dinomix_ros.imaging.features import FeatureConfig, FeatureExtractor, depth_in_metres, to_gray
from dinomix_ros.settings import SettingError


@pytest.fixture
def lund(data_dir) -> np.ndarray:
    return cv2.imread(str(data_dir / "lund_gps" / "images" / "05.jpg"), cv2.IMREAD_GRAYSCALE)


def test_orb_features_of_a_real_photo(lund) -> None:
    f = FeatureExtractor().extract(lund)
    n = FeatureConfig().max_features  # a textured photo fills most of the budget
    assert 0.75 * n <= len(f) <= n and f.kind == "orb" and f.image_size == (1024, 768)
    assert f.descriptors.shape == (len(f), 32) and f.descriptors.dtype == np.uint8
    assert not f.has_depth
    # extracted at 640 px but reported in the 1024 px image: inside it, and spread over all of it
    assert f.keypoints.min() >= -0.5 and f.keypoints[:, 0].max() <= 1023.5 and f.keypoints[:, 1].max() <= 767.5
    assert f.keypoints[:, 0].max() > 800


def test_keypoints_are_in_full_resolution_pixels(lund) -> None:
    """Features of the 1024 px photo (extracted at 640) land where those of its 640 px copy land, x 1.6."""
    small = cv2.resize(lund, (640, 480), interpolation=cv2.INTER_AREA)
    ex = FeatureExtractor()
    full, direct = ex.extract(lund), ex.extract(small)
    np.testing.assert_array_equal(full.descriptors, direct.descriptors)
    np.testing.assert_allclose(full.keypoints, (direct.keypoints + 0.5) * 1.6 - 0.5, atol=1e-3)


def test_depths_from_an_aligned_depth_image(lund) -> None:
    h, w = lund.shape
    depth_mm = np.full((h // 2, w // 2), 2500, np.uint16)  # a lower-resolution registered depth image
    depth_mm[:, : w // 4] = 0  # no return on the left half
    f = FeatureExtractor().extract(lund, depth_mm)
    right = f.keypoints[:, 0] > w / 2 + 4
    left = f.keypoints[:, 0] < w / 2 - 4
    np.testing.assert_allclose(f.depths[right], 2.5)
    assert np.isnan(f.depths[left]).all() and f.has_depth
    np.testing.assert_allclose(depth_in_metres(np.array([[0.0, 1.5], [np.nan, -1.0]], np.float32)),
                               [[np.nan, 1.5], [np.nan, np.nan]])
    with pytest.raises(ValueError, match="16UC1"):
        depth_in_metres(np.zeros((2, 2), np.int8))


def test_sift_and_settings(lund) -> None:
    f = FeatureExtractor(FeatureConfig(type="sift", max_features=100)).extract(lund)
    assert 0 < len(f) <= 100 and f.descriptors.shape[1] == 128 and f.descriptors.dtype == np.uint8
    assert len(FeatureExtractor(FeatureConfig(max_features=0)).extract(lund)) == 0
    with pytest.raises(SettingError, match="features.type"):
        FeatureConfig(type="akaze")


def test_to_gray_accepts_decoded_frames(data_dir) -> None:
    image, encoding = read_image_file(data_dir / "rtabmap_corridor" / "samples" / "1.jpg")
    gray = to_gray(image, encoding)
    assert gray.shape == image.shape[:2] and gray.dtype == np.uint8
    mono = (gray.astype(np.uint16) * 257)
    np.testing.assert_array_equal(to_gray(mono, "mono16"), gray)
