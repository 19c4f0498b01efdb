"""Images as cameras and files give them -> the (B, 3, 224, 224) tensors DINO-Mix takes.

The recipe (spec: shared/spec/model.md, "Preprocessing and numerics"): convert to 8-bit RGB, resize the WHOLE
image to 224x224 (aspect ratio squashed, no crop) with bilinear interpolation WITH antialias, scale to [0, 1], then
ImageNet mean/std. DINO-Mix was trained with PIL's resize; the uint8 antialiased bilinear resize of PyTorch used
here matches it to within one grey level on a few pixels per thousand (test_preprocess checks this against PIL).

Resizing happens before channel reordering or grey-to-RGB expansion where the two commute (they are per-pixel
permutations), so a 720p BGR frame costs one 224x224 resize and no full-size copy.

Two implementations of the same recipe:

* host (:func:`resize_to_input`): PyTorch's uint8 CPU resize kernel, numpy and OpenCV. The exact path: the
  default on the CPU, what maps are built with there, and the reference of every test.
* device (:func:`stage_for_device` on the host, then :func:`resize_on_device` as torch ops on the model's device):
  the raw frame is uploaded once and 16-bit scaling, alpha, channel order, grey expansion and the resize run where
  the model runs (captured in a CUDA graph per camera image shape). The resize computes in float32 and rounds to
  uint8, so it can differ from the host path by one grey level on some pixels (test_preprocess bounds it); Bayer
  and packed YUV are still demosaiced by OpenCV on the host (its demosaic is not cheap to reproduce exactly).
  The default on CUDA (``model.preprocess``); the same code runs on the CPU, where CI tests it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Union

import numpy as np
import torch
import torch.nn.functional as F

from dinomix_ros.imaging.decode import (
    DEFAULT_MAX_PIXELS, RAW_ENCODINGS, ImageDecodeError, UnsupportedEncodingError, check_pixels, decode_compressed,
    read_image_file,
)
from dinomix_ros.settings import check, setting

__all__ = [
    "INPUT_SIZE",
    "MEAN",
    "STD",
    "PREPROCESSING_ID",
    "ImageInput",
    "load_input",
    "to_rgb8",
    "resize_to_input",
    "normalize",
    "normalization_constants",
    "preprocess",
    "ImageConfig",
    "RANGE16_MODES",
    "PREPROCESS_PLACES",
    "StagedImage",
    "stage_for_device",
    "resize_on_device",
    "pixels_tensor",
]

INPUT_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Recorded in the model fingerprint: descriptors made with another recipe are not comparable.
PREPROCESSING_ID = (
    f"rgb8;resize={INPUT_SIZE}x{INPUT_SIZE},bilinear,antialias,uint8;scale=1/255;"
    f"mean={','.join(map(str, MEAN))};std={','.join(map(str, STD))}"
)

RANGE16_MODES = ("full", "minmax")
#: ``model.preprocess``: auto (device on CUDA with the torch backend, else host), host or device.
PREPROCESS_PLACES = ("auto", "host", "device")


@dataclass(frozen=True)
class ImageConfig:
    """How camera images become model input (node parameters ``cameras.*``, CLI flags ``--range16``,
    ``--max-pixels``)."""

    SETTINGS_GROUP: ClassVar[str] = "cameras"

    range16: str = setting("full", "how 16-bit images (mono16, bayer*16, rgb16) become 8-bit: full (0..65535) or "
                                   "minmax (stretch each image; for 12-bit or thermal cameras)", choices=RANGE16_MODES,
                           reconfigure=True)
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "largest image accepted, in pixels (width x height), checked "
                                                  "before decoding (JPEG/PNG headers, raw height x width); larger "
                                                  "images are skipped as bad", min=1, max=2**31 - 1,
                              reconfigure=True)

    def __post_init__(self) -> None:
        check(self)


ImageInput = Union[np.ndarray, bytes, bytearray, memoryview, str, Path]

# ROS Bayer pattern -> OpenCV conversion code name. OpenCV names the pattern by the second row (RGGB is "BG");
# test_preprocess mosaics a known image in each pattern and checks the colours come back.
_BAYER_CODES = {"rggb": "COLOR_BayerBG2RGB", "bggr": "COLOR_BayerRG2RGB", "gbrg": "COLOR_BayerGR2RGB",
                "grbg": "COLOR_BayerGB2RGB"}
_YUV_CODES = {"yuv422": "COLOR_YUV2RGB_UYVY", "uyvy": "COLOR_YUV2RGB_UYVY",
              "yuv422_yuy2": "COLOR_YUV2RGB_YUY2", "yuyv": "COLOR_YUV2RGB_YUY2"}
_GENERIC = {"8UC1": "mono8", "8UC3": "bgr8", "8UC4": "bgra8", "16UC1": "mono16"}

# Camera buffers arrive as read-only views (no copy per frame); torch only reads them here, so its warning about
# non-writable arrays is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def load_input(item: ImageInput, encoding: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """Normalise one input to (array, encoding).

    Args:
        item: an array (H, W) / (H, W, C), JPEG/PNG bytes, or an image file path.
        encoding: the array's encoding; for arrays, None means mono8/mono16 for one channel, rgb8 for three and
            rgba8 for four (pass "bgr8" for OpenCV arrays). Ignored for bytes and files (decoded as stored).
        max_pixels: refuse larger images (bytes and files before decoding them).

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels.
        ImageDecodeError: undecodable bytes/file or an array that does not fit its encoding.
        FileNotFoundError: a missing file.
    """
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_compressed(item, max_pixels)
    if isinstance(item, (str, Path)):
        return read_image_file(item, max_pixels)
    if not isinstance(item, np.ndarray):
        raise ImageDecodeError(f"cannot use a {type(item).__name__} as an image; pass an array, bytes or a path")
    if item.ndim >= 2:  # the conversions allocate per pixel too
        check_pixels(item.shape[1], item.shape[0], max_pixels, f"the {item.shape} image array")
    if encoding is None:
        channels = 1 if item.ndim == 2 else item.shape[-1]
        deep = item.dtype == np.uint16
        encoding = {1: "mono16" if deep else "mono8", 3: "rgb16" if deep else "rgb8",
                    4: "rgba16" if deep else "rgba8"}.get(channels, "")
    return item, encoding


def _check_array(image: np.ndarray, encoding: str) -> np.ndarray:
    if encoding not in RAW_ENCODINGS:
        raise UnsupportedEncodingError(
            f"unsupported image encoding {encoding!r}; supported: {', '.join(sorted(RAW_ENCODINGS))}"
        )
    channels, dtype = RAW_ENCODINGS[encoding]
    if image.ndim == 3 and image.shape[2] == 1 and channels == 1:
        image = image[:, :, 0]
    expected_ndim = 2 if channels == 1 else 3
    if image.ndim != expected_ndim or (channels > 1 and image.shape[2] != channels) or image.dtype != dtype:
        raise ImageDecodeError(
            f"{encoding} needs a {'(H, W)' if channels == 1 else f'(H, W, {channels})'} {dtype} array, "
            f"got {tuple(image.shape)} {image.dtype}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageDecodeError(f"image of shape {tuple(image.shape)} is empty")
    if channels == 2 and image.shape[1] % 2:
        raise ImageDecodeError(f"{encoding} packs pixel pairs: the width must be even, got {image.shape[1]}")
    return image


# 16-bit -> 8-bit "full": round(x * 255 / 65535), one table entry per 16-bit value (the same integer formula as
# before, so results are bit-identical).
_FULL_RANGE_LUT = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
_BLOCK_ELEMENTS = 1 << 20  # 16-bit values converted per block: the index temporary stays at 8 MiB


def _to_8bit(image: np.ndarray, range16: str) -> np.ndarray:
    """8-bit copy of a 16-bit image (the input itself if already 8-bit), by a 65536-entry table applied in row
    blocks: no widened full-size temporary (a uint32 or float32 copy of a 50 MP image would be 200-600 MB)."""
    if image.dtype == np.uint8:
        return image
    if range16 == "full":
        lut = _FULL_RANGE_LUT
    elif range16 == "minmax":  # stretch this image's range (thermal / 12-bit cameras in 16-bit containers)
        lo, hi = int(image.min()), int(image.max())
        scaled = (np.arange(65536, dtype=np.float32) - lo) * (255.0 / max(hi - lo, 1))  # float32, as per pixel
        lut = np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)
    else:
        raise ValueError(f"range16 must be one of {', '.join(RANGE16_MODES)}, got {range16!r}")
    out = np.empty(image.shape, dtype=np.uint8)
    rows = max(1, _BLOCK_ELEMENTS // max(1, image[:1].size))
    for r in range(0, image.shape[0], rows):
        np.take(lut, image[r:r + rows], out=out[r:r + rows])
    return out


def _canonical(image: np.ndarray, encoding: str, range16: str) -> tuple[np.ndarray, str]:
    """8-bit array in one of rgb/bgr/mono order (alpha dropped, Bayer and YUV converted to RGB)."""
    import cv2

    encoding = _GENERIC.get(encoding, encoding)
    image = _check_array(image, encoding)
    try:
        if encoding.startswith("bayer_"):  # demosaic at full resolution, 16-bit kept for accuracy
            code = getattr(cv2, _BAYER_CODES[encoding[6:10]])
            return _to_8bit(cv2.cvtColor(np.ascontiguousarray(image), code), range16), "rgb"
        if encoding in _YUV_CODES:
            return cv2.cvtColor(np.ascontiguousarray(image), getattr(cv2, _YUV_CODES[encoding])), "rgb"
    except cv2.error as exc:  # e.g. a Bayer image too small to demosaic
        raise ImageDecodeError(f"OpenCV could not convert the {encoding} image {tuple(image.shape)}: {exc}") from exc
    if encoding.startswith("mono"):
        return _to_8bit(image, range16), "mono"
    # rgb / bgr; drops alpha as PIL's convert("RGB") does, before converting (no 16-bit alpha copied)
    return _to_8bit(image[:, :, :3], range16), encoding[:3]


def to_rgb8(image: np.ndarray, encoding: str, *, range16: str = "full") -> np.ndarray:
    """Full-resolution (H, W, 3) uint8 RGB of any supported encoding (for plots, checks and exports)."""
    image, order = _canonical(image, encoding, range16)
    if order == "mono":
        return np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, ::-1] if order == "bgr" else image)


def resize_to_input(image: np.ndarray, encoding: str, *, range16: str = "full") -> np.ndarray:
    """(224, 224, 3) uint8 RGB: whole-image bilinear antialiased resize of any supported encoding.

    Raises:
        UnsupportedEncodingError: unknown encoding.
        ImageDecodeError: array shape/dtype does not fit the encoding.
    """
    image, order = _canonical(image, encoding, range16)
    if image.shape[:2] != (INPUT_SIZE, INPUT_SIZE):
        t = torch.from_numpy(np.ascontiguousarray(image))
        t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]  # (1, C, H, W), channels-last memory
        t = F.interpolate(t, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        image = t[0].permute(1, 2, 0).numpy()
        if order == "mono":
            image = image[:, :, 0]
    if order == "mono":
        return np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, ::-1] if order == "bgr" else image)


@dataclass(frozen=True, eq=False)  # holds an array
class StagedImage:
    """One image ready for :func:`resize_on_device` (or already resized by the host path).

    Attributes:
        pixels: (H, W) or (H, W, C) uint8 or uint16 array, C = 3 or 4 (a 4th channel is alpha and is dropped).
        order: channel order of ``pixels``: ``rgb``, ``bgr`` or ``mono``.
        resized: ``pixels`` is already the (224, 224, 3) uint8 RGB model input (host path).
    """

    pixels: np.ndarray
    order: str
    resized: bool = False


def stage_for_device(image: np.ndarray, encoding: str, *, range16: str = "full") -> StagedImage:
    """The host's share of on-device preprocessing: check the array; demosaic Bayer and unpack YUV (OpenCV).

    Raises:
        UnsupportedEncodingError: unknown encoding.
        ImageDecodeError: array shape/dtype does not fit the encoding.
    """
    encoding = _GENERIC.get(encoding, encoding)
    image = _check_array(image, encoding)
    if encoding.startswith("bayer_") or encoding in _YUV_CODES:
        return StagedImage(*_canonical(image, encoding, range16))
    if any(stride < 0 for stride in image.strides):  # a flipped view: torch takes positive strides only
        image = np.ascontiguousarray(image)
    return StagedImage(image, "mono" if encoding.startswith("mono") else encoding[:3])


def pixels_tensor(pixels: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``pixels`` (uint16 as int16 bits: older PyTorch has no uint16; see resize_on_device)."""
    return torch.from_numpy(pixels.view(np.int16) if pixels.dtype == np.uint16 else pixels)


def resize_on_device(pixels: torch.Tensor, order: str, *, range16: str = "full") -> torch.Tensor:
    """(H, W[, C]) uint8 or 16-bit tensor on any device -> (224, 224, 3) uint8 RGB on the same device.

    The torch twin of :func:`resize_to_input` (same steps, same rounding of 16-bit values; the resize in float32,
    rounded). 16-bit pixels come as uint16 or as int16 holding their bits (:func:`pixels_tensor`). No host
    synchronisation: it can be captured in a CUDA graph.
    """
    x = pixels if pixels.ndim == 3 else pixels[:, :, None]
    x = x[:, :, :3]  # drop alpha as PIL's convert("RGB") does
    if x.dtype == torch.uint8:
        x = x.float()
    elif range16 not in RANGE16_MODES:
        raise ValueError(f"range16 must be one of {', '.join(RANGE16_MODES)}, got {range16!r}")
    else:
        wide = x.to(torch.int32)
        if x.dtype == torch.int16:
            wide = wide & 0xFFFF  # the uint16 value of the bits
        if range16 == "full":  # 0..65535 -> 0..255, rounded: integer arithmetic as in _to_8bit
            x = torch.div(wide * 255 + 32767, 65535, rounding_mode="floor").float()
        else:  # minmax
            lo, hi = wide.amin().float(), wide.amax().float()
            x = torch.round((wide.float() - lo) * (255.0 / torch.clamp(hi - lo, min=1.0)))
    # PIL (and PyTorch's uint8 kernel, which copies it) resizes horizontally, rounds to 8 bits, then vertically;
    # doing the same in float32 brings the share of pixels one grey level off from ~9% to ~1%.
    t = x.permute(2, 0, 1)[None]  # (H, W, C) -> (1, C, H, W)
    if t.shape[3] != INPUT_SIZE:
        t = _round_u8(F.interpolate(t, size=(t.shape[2], INPUT_SIZE), mode="bilinear", align_corners=False,
                                    antialias=True))
    if t.shape[2] != INPUT_SIZE:
        t = _round_u8(F.interpolate(t, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                                    antialias=True))
    x = t[0].permute(1, 2, 0).to(torch.uint8)
    if order == "mono":
        x = x.expand(INPUT_SIZE, INPUT_SIZE, 3)
    elif order == "bgr":
        x = x.flip(2)
    return x.contiguous()


def _round_u8(x: torch.Tensor) -> torch.Tensor:
    """Round half up and clip to 0..255 (still float), as the fixed-point uint8 kernels do."""
    return x.add(0.5).floor_().clamp_(0, 255)


def normalization_constants(device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (1, 3, 1, 1) float32 tensors on ``device``."""
    mean = torch.tensor(MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def normalize(batch: torch.Tensor, dtype: torch.dtype = torch.float32,
              constants: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, 224, 224, 3) uint8 RGB on any device -> (B, 3, 224, 224) ImageNet-normalised ``dtype``.

    Computed in float32 (ToTensor then Normalize, as torchvision does) and cast at the end. Pass ``constants``
    (from :func:`normalization_constants`, on the batch's device) where no host-to-device copy may happen, e.g.
    inside CUDA-graph capture.
    """
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
        raise ValueError(f"normalize expects (B, {INPUT_SIZE}, {INPUT_SIZE}, 3) uint8, got {tuple(batch.shape)} "
                         f"{batch.dtype}")
    x = batch.permute(0, 3, 1, 2).float().div(255.0)
    mean, std = constants if constants is not None else normalization_constants(x.device)
    return ((x - mean) / std).to(dtype).contiguous()


def preprocess(images: Sequence[ImageInput], encoding: str | None = None, *, range16: str = "full") -> torch.Tensor:
    """Any images -> (B, 3, 224, 224) float32 CPU tensor ready for :class:`~dinomix_ros.model.DinoMix`."""
    resized = [resize_to_input(*load_input(item, encoding), range16=range16) for item in images]
    if not resized:
        raise ValueError("preprocess got no images")
    return normalize(torch.from_numpy(np.stack(resized)))
