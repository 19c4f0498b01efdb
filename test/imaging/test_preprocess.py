"""Preprocessing: every encoding to the exact 224x224 RGB input DINO-Mix was trained with."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from dinomix_ros.imaging.decode import ImageDecodeError, UnsupportedEncodingError
from dinomix_ros.imaging.preprocess import (
    MEAN,
    STD,
    normalize,
    pixels_tensor,
    preprocess,
    resize_on_device,
    resize_to_input,
    stage_for_device,
    to_rgb8,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def rgb(data_dir) -> np.ndarray:
    return np.asarray(Image.open(data_dir / "lund_gps" / "images" / "01.jpg").convert("RGB"))  # 1024x768


def test_resize_matches_pil_bilinear_antialias_within_one_level(rgb: np.ndarray) -> None:
    ours = resize_to_input(rgb, "rgb8").astype(int)
    pil = np.asarray(Image.fromarray(rgb).resize((224, 224), Image.BILINEAR)).astype(int)
    assert ours.shape == (224, 224, 3)
    assert np.abs(ours - pil).max() <= 1
    assert (ours != pil).mean() < 0.01


def test_full_pipeline_matches_torchvision_official_transform(rgb: np.ndarray) -> None:
    tv = pytest.importorskip("torchvision.transforms", reason="torchvision gives the official eval transform")
    official = tv.Compose([tv.Resize((224, 224), interpolation=tv.InterpolationMode.BILINEAR), tv.ToTensor(),
                           tv.Normalize(MEAN, STD)])
    expected = official(Image.fromarray(rgb))[None]
    ours = preprocess([rgb], "rgb8")
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    # one grey level / std on the few pixels where PIL's fixed-point rounding differs
    assert (ours - expected).abs().max().item() <= 1 / 255 / min(STD) + 1e-6
    # with identical 224x224 input the normalisation is exactly ToTensor + Normalize
    pil_224 = np.asarray(Image.fromarray(rgb).resize((224, 224), Image.BILINEAR))
    torch.testing.assert_close(normalize(torch.from_numpy(pil_224[None])), expected, rtol=0, atol=1e-6)


def test_bgr_mono_and_alpha_orders_are_equivalent(rgb: np.ndarray) -> None:
    ref = resize_to_input(rgb, "rgb8")
    np.testing.assert_array_equal(resize_to_input(np.ascontiguousarray(rgb[:, :, ::-1]), "bgr8"), ref)
    np.testing.assert_array_equal(resize_to_input(rgb[:, :, ::-1], "8UC3"), ref)  # non-contiguous view too
    alpha = np.full(rgb.shape[:2] + (1,), 7, np.uint8)
    np.testing.assert_array_equal(resize_to_input(np.concatenate([rgb, alpha], axis=2), "rgba8"), ref)
    np.testing.assert_array_equal(resize_to_input(np.concatenate([rgb[:, :, ::-1], alpha], axis=2), "bgra8"), ref)
    gray = rgb[:, :, 1].copy()
    mono = resize_to_input(gray, "mono8")
    np.testing.assert_array_equal(mono, resize_to_input(np.repeat(gray[:, :, None], 3, axis=2), "rgb8"))
    np.testing.assert_array_equal(mono[:, :, 0], mono[:, :, 2])


def test_16_bit_encodings_scale_to_8_bit(rgb: np.ndarray) -> None:
    deep = rgb.astype(np.uint16) * 257  # 255 -> 65535 exactly
    np.testing.assert_array_equal(resize_to_input(deep, "rgb16"), resize_to_input(rgb, "rgb8"))
    np.testing.assert_array_equal(resize_to_input(deep[:, :, 0], "mono16"), resize_to_input(rgb[:, :, 0], "mono8"))
    np.testing.assert_array_equal(resize_to_input(deep[:, :, ::-1], "bgr16"), resize_to_input(rgb, "rgb8"))
    # a 12-bit thermal image in a 16-bit container: "minmax" stretches it to the full 8-bit range
    thermal = (rgb[:, :, 0].astype(np.uint16) * 4 + 20000)
    stretched = to_rgb8(thermal, "mono16", range16="minmax")
    assert stretched.min() == 0 and stretched.max() == 255
    assert to_rgb8(thermal, "mono16").max() < 90  # full range leaves it dark


def _mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """Sample an RGB image into a Bayer mosaic; pattern letters give the 2x2 cell row by row."""
    index = {"r": 0, "g": 1, "b": 2}
    out = np.empty(rgb.shape[:2], rgb.dtype)
    for k, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        out[dy::2, dx::2] = rgb[dy::2, dx::2, index[pattern[k]]]
    return out


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer_patterns_demosaic_to_the_right_colours(rgb: np.ndarray, pattern: str) -> None:
    crop = rgb[:384, :512]
    full = to_rgb8(_mosaic(crop, pattern), f"bayer_{pattern}8")
    assert full.shape == crop.shape
    err = np.abs(full.astype(int) - crop.astype(int))
    assert err.mean() < 6, f"demosaiced {pattern} differs by {err.mean():.1f} on average"
    np.testing.assert_allclose(full.reshape(-1, 3).mean(0), crop.reshape(-1, 3).mean(0), atol=2)
    deep = to_rgb8(_mosaic(crop.astype(np.uint16) * 257, pattern), f"bayer_{pattern}16")
    assert np.abs(deep.astype(int) - full.astype(int)).mean() < 1
    assert resize_to_input(_mosaic(crop, pattern), f"bayer_{pattern}8").shape == (224, 224, 3)


def test_packed_yuv422_grey_and_colour() -> None:
    # UYVY with U = V = 128 is pure grey; OpenCV (like cv_bridge) reads it as BT.601 video range: 1.164 (Y - 16)
    y = np.arange(16, 16 + 8 * 6, dtype=np.uint8).reshape(6, 8)
    uyvy = np.empty((6, 8, 2), np.uint8)
    uyvy[:, :, 0] = 128
    uyvy[:, :, 1] = y
    out = to_rgb8(uyvy, "yuv422")
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])
    assert np.abs(out[:, :, 1].astype(int) - np.rint(1.164 * (y.astype(int) - 16))).max() <= 1
    yuyv = uyvy[:, :, ::-1].copy()
    np.testing.assert_array_equal(to_rgb8(yuyv, "yuv422_yuy2"), out)
    red_uyvy = uyvy.copy()
    red_uyvy[:, 1::2, 0] = 240  # V high -> red
    red = to_rgb8(red_uyvy, "uyvy")
    assert (red[:, :, 0] > red[:, :, 2]).all()


def test_jpeg_bytes_equal_the_decoded_array(data_dir) -> None:
    path = data_dir / "rtabmap_corridor" / "samples" / "5.jpg"
    decoded = np.asarray(Image.open(path).convert("RGB"))
    from_bytes = preprocess([path.read_bytes()])
    torch.testing.assert_close(from_bytes, preprocess([decoded], "rgb8"), rtol=0, atol=0)
    torch.testing.assert_close(preprocess([path]), from_bytes, rtol=0, atol=0)
    ok, png = cv2.imencode(".png", np.ascontiguousarray(decoded[:, :, ::-1]))
    torch.testing.assert_close(preprocess([png.tobytes()]), from_bytes, rtol=0, atol=0)


def test_already_224_images_are_not_resampled(rng: np.random.Generator) -> None:
    image = rng.integers(0, 255, size=(224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_to_input(image, "rgb8"), image)


@pytest.mark.parametrize(
    "image, encoding, error, message",
    [
        (np.zeros((4, 4, 3), np.uint8), "rgb9", UnsupportedEncodingError, "unsupported image encoding 'rgb9'"),
        (np.zeros((4, 4), np.uint8), "rgb8", ImageDecodeError, r"rgb8 needs a \(H, W, 3\) uint8 array, got \(4, 4\)"),
        (np.zeros((4, 4, 3), np.uint16), "rgb8", ImageDecodeError, "got \\(4, 4, 3\\) uint16"),
        (np.zeros((4, 4, 3), np.float32), "rgb8", ImageDecodeError, "float32"),
        (np.zeros((0, 4), np.uint8), "mono8", ImageDecodeError, "is empty"),
    ],
)
def test_arrays_that_do_not_fit_their_encoding(image, encoding, error, message) -> None:
    with pytest.raises(error, match=message):
        resize_to_input(image, encoding)


def test_other_inputs_are_refused_clearly() -> None:
    with pytest.raises(ImageDecodeError, match="cannot use a list as an image"):
        preprocess([[1, 2, 3]])
    with pytest.raises(ValueError, match="got no images"):
        preprocess([])
    with pytest.raises(ValueError, match=r"normalize expects \(B, 224, 224, 3\) uint8"):
        normalize(torch.zeros(1, 224, 224, 3))


def test_odd_width_packed_yuv_is_a_clear_error() -> None:
    with pytest.raises(ImageDecodeError, match="width must be even, got 7"):
        to_rgb8(np.zeros((4, 7, 2), np.uint8), "yuv422")


# ---------------------------------------------------------------------------------------------------------------------
# the on-device path (torch ops; the same code on the CPU here and on CUDA on a GPU)


def _device_path(image: np.ndarray, encoding: str, range16: str = "full", device: str = "cpu") -> np.ndarray:
    staged = stage_for_device(image, encoding, range16=range16)
    pixels = pixels_tensor(staged.pixels).to(device)  # 16-bit as int16 bits, as the encoder uploads it
    return resize_on_device(pixels, staged.order, range16=range16).cpu().numpy()


def _device_cases(rgb: np.ndarray) -> list[tuple[np.ndarray, str]]:
    rng = np.random.default_rng(7)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    deep = rgb.astype(np.uint16) * 257 + rng.integers(0, 257, rgb.shape).astype(np.uint16)
    mosaic = rgb[:, :, 1].copy()
    mosaic[0::2, 0::2], mosaic[1::2, 1::2] = rgb[0::2, 0::2, 0], rgb[1::2, 1::2, 2]  # RGGB
    return [
        (rgb, "rgb8"), (bgr, "bgr8"), (rgb[:, ::-1], "rgb8"), (cv2.resize(bgr, (1280, 720)), "bgr8"),
        (rgb[:, :, 1].copy(), "mono8"),
        (np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)]), "rgba8"), (deep, "rgb16"), (deep[:, :, 0], "mono16"),
        ((deep[:, :, 0] >> 4), "mono16"), (mosaic, "bayer_rggb8"),
        (rng.integers(0, 256, (100, 50, 3), np.uint8), "rgb8"),
        (rgb[:224, :300].copy(), "rgb8"), (rgb[:300, :224].copy(), "rgb8"),
    ]


@pytest.mark.parametrize("range16", ["full", "minmax"])
def test_device_path_matches_the_host_path_within_one_grey_level(rgb: np.ndarray, range16: str) -> None:
    """What CUDA runs, run on the CPU: the same recipe as the exact host path, one grey level at most, rarely."""
    for image, encoding in _device_cases(rgb):
        host = resize_to_input(image, encoding, range16=range16).astype(int)
        device = _device_path(image, encoding, range16)
        assert device.shape == (224, 224, 3) and device.dtype == np.uint8
        diff = np.abs(device.astype(int) - host)
        assert diff.max() <= 1, (encoding, image.shape, diff.max())
        assert (diff > 0).mean() < 0.03, (encoding, image.shape, (diff > 0).mean())


def test_device_path_is_exact_where_nothing_is_resampled(rgb: np.ndarray) -> None:
    crop = np.ascontiguousarray(rgb[:224, :224])
    np.testing.assert_array_equal(_device_path(crop, "rgb8"), crop)
    np.testing.assert_array_equal(_device_path(np.ascontiguousarray(crop[:, :, ::-1]), "bgr8"), crop)
    np.testing.assert_array_equal(_device_path(crop[:, :, 0].copy(), "mono8")[:, :, 2], crop[:, :, 0])


def test_device_path_descriptors_match_the_host_path(data_dir) -> None:
    from dinomix_ros.model.encoder import Encoder, EncoderConfig

    paths = [data_dir / "rtabmap_corridor" / "samples" / f"{i}.jpg" for i in (1, 9, 17)]
    host = Encoder.from_random("s", 3, EncoderConfig(device="cpu", dtype="float32", preprocess="host"))
    device = Encoder.from_random("s", 3, EncoderConfig(device="cpu", dtype="float32", preprocess="device"))
    assert host.describe_info()["preprocess"] == "host" and device.describe_info()["preprocess"] == "device"
    cpu = EncoderConfig(device="cpu", dtype="float32")
    assert Encoder.from_random("s", 3, cpu).preprocess_on == "host"  # auto: exact on the CPU
    a, b = host.describe(paths), device.describe(paths)
    assert (a * b).sum(1).min() > 0.9999
    frame = cv2.imread(str(paths[0]))
    assert float(host.describe_one(frame, "bgr8") @ device.describe_one(frame, "bgr8")) > 0.9999


def test_device_path_refuses_what_the_host_path_refuses() -> None:
    with pytest.raises(UnsupportedEncodingError, match="unsupported image encoding 'jpeg'"):
        stage_for_device(np.zeros((4, 4, 3), np.uint8), "jpeg")
    with pytest.raises(ImageDecodeError, match=r"rgb8 needs a \(H, W, 3\) uint8 array"):
        stage_for_device(np.zeros((4, 4), np.uint8), "rgb8")
    with pytest.raises(ValueError, match="range16 must be one of"):
        resize_on_device(torch.zeros((4, 4), dtype=torch.int16), "mono", range16="log")
    deep = np.array([[0, 255, 256, 65535]], np.uint16)  # the uint16 value comes back from its int16 bits
    as_uint16 = resize_on_device(torch.from_numpy(deep.astype(np.int32)).to(torch.uint16), "mono")
    np.testing.assert_array_equal(resize_on_device(pixels_tensor(deep), "mono"), as_uint16)


@cuda
def test_device_path_on_cuda_matches_the_host_path(rgb: np.ndarray) -> None:
    for image, encoding in _device_cases(rgb):
        host = resize_to_input(image, encoding).astype(int)
        diff = np.abs(_device_path(image, encoding, device="cuda").astype(int) - host)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.03, (encoding, image.shape)
