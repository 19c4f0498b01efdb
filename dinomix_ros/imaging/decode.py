"""Camera images to numpy arrays: raw ``sensor_msgs/Image`` buffers and compressed (JPEG/PNG) bytes.

ROS-free and duck-typed: :func:`decode_image_msg` takes any object with the fields of ``sensor_msgs/Image``
(``height, width, encoding, is_bigendian, step, data``) or ``sensor_msgs/CompressedImage`` (``format, data``), so
rclpy messages and rosbags messages go through the same tested code. This replaces cv_bridge, which cannot be
installed from the registries these machines use (the PyPI ``cv-bridge`` is a broken ROS 1 port).
Every failure is an :class:`ImageDecodeError` (a ValueError) that says what was wrong; nothing here mutates input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "ImageDecodeError",
    "UnsupportedEncodingError",
    "RAW_ENCODINGS",
    "image_from_buffer",
    "decode_compressed",
    "decode_image_msg",
    "read_image_file",
]


class ImageDecodeError(ValueError):
    """An image buffer that cannot be turned into an array (wrong size, truncated, corrupt)."""


class UnsupportedEncodingError(ImageDecodeError):
    """An image encoding this package does not convert."""


# encoding -> (channels, numpy dtype). Aliases of OpenCV generic types follow cv_bridge: 8UC3 is BGR.
RAW_ENCODINGS: dict[str, tuple[int, np.dtype]] = {
    "rgb8": (3, np.dtype(np.uint8)),
    "bgr8": (3, np.dtype(np.uint8)),
    "rgba8": (4, np.dtype(np.uint8)),
    "bgra8": (4, np.dtype(np.uint8)),
    "mono8": (1, np.dtype(np.uint8)),
    "mono16": (1, np.dtype(np.uint16)),
    "rgb16": (3, np.dtype(np.uint16)),
    "bgr16": (3, np.dtype(np.uint16)),
    "rgba16": (4, np.dtype(np.uint16)),
    "bgra16": (4, np.dtype(np.uint16)),
    "8UC1": (1, np.dtype(np.uint8)),
    "8UC3": (3, np.dtype(np.uint8)),
    "8UC4": (4, np.dtype(np.uint8)),
    "16UC1": (1, np.dtype(np.uint16)),
    # packed YUV 4:2:2, two bytes per pixel: UYVY (ROS "yuv422"/"uyvy") and YUYV ("yuv422_yuy2"/"yuyv")
    "yuv422": (2, np.dtype(np.uint8)),
    "uyvy": (2, np.dtype(np.uint8)),
    "yuv422_yuy2": (2, np.dtype(np.uint8)),
    "yuyv": (2, np.dtype(np.uint8)),
    **{f"bayer_{p}8": (1, np.dtype(np.uint8)) for p in ("rggb", "bggr", "gbrg", "grbg")},
    **{f"bayer_{p}16": (1, np.dtype(np.uint16)) for p in ("rggb", "bggr", "gbrg", "grbg")},
}

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_EOI_SEARCH_BYTES = 4096
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def image_from_buffer(
    data: bytes | bytearray | memoryview | np.ndarray,
    height: int,
    width: int,
    encoding: str,
    step: int,
    is_bigendian: bool = False,
) -> np.ndarray:
    """View a raw ``sensor_msgs/Image`` buffer as an (H, W) or (H, W, C) array, honouring ``step`` padding.

    Returns a read-only view when no conversion is needed (no copy on the camera path); 16-bit big-endian data
    is byte-swapped into a new native array.

    Raises:
        UnsupportedEncodingError: encoding not in :data:`RAW_ENCODINGS`.
        ImageDecodeError: non-positive size, step smaller than a row, or a buffer shorter than height * step.
    """
    if encoding not in RAW_ENCODINGS:
        raise UnsupportedEncodingError(
            f"unsupported image encoding {encoding!r}; supported: {', '.join(sorted(RAW_ENCODINGS))}"
        )
    channels, dtype = RAW_ENCODINGS[encoding]
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"image size {width}x{height} is empty")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ImageDecodeError(
            f"step {step} is smaller than one row of {width} px x {channels} ch x {dtype.itemsize} B = {row_bytes}"
        )
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    needed = (height - 1) * step + row_bytes
    if buf.size < needed:
        raise ImageDecodeError(
            f"image buffer holds {buf.size} bytes, {encoding} {width}x{height} with step {step} needs {needed}"
        )
    stored = dtype.newbyteorder(">" if is_bigendian else "<") if dtype.itemsize > 1 else dtype
    # A strided view straight into the buffer (rows `step` bytes apart): works on numpy 1.21 (Humble) too, where
    # viewing a non-contiguous uint8 array as uint16 is not allowed.
    pixels = np.ndarray(shape=(height, width * channels), dtype=stored, buffer=buf, strides=(step, dtype.itemsize))
    pixels.flags.writeable = False
    if not pixels.dtype.isnative:
        pixels = pixels.astype(dtype)  # swap into native byte order (a copy)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return pixels.reshape(shape)


def decode_compressed(data: bytes | bytearray | memoryview | np.ndarray) -> tuple[np.ndarray, str]:
    """Decode JPEG or PNG bytes with OpenCV, exactly as stored (no EXIF rotation, bit depth kept).

    Returns:
        (array, encoding) with encoding one of mono8, mono16, bgr8, bgra8, bgr16, bgra16.

    Raises:
        ImageDecodeError: empty, truncated or corrupt data, or an unknown container.
    """
    import cv2

    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    if buf.size == 0:
        raise ImageDecodeError("compressed image is empty (0 bytes)")
    head = buf[:8].tobytes()
    if head.startswith(_JPEG_SOI):
        # libjpeg may "decode" a truncated JPEG into a grey-filled image with only a warning: check the EOI marker
        # (near the end: MJPEG drivers may pad the buffer with zeros after it).
        if _JPEG_EOI not in buf[-_EOI_SEARCH_BYTES:].tobytes():
            raise ImageDecodeError(f"JPEG data of {buf.size} bytes has no end-of-image marker: truncated")
    elif not head.startswith(_PNG_MAGIC):
        raise ImageDecodeError(f"compressed image is neither JPEG nor PNG (first bytes {head[:4].hex()})")
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageDecodeError(f"could not decode the {buf.size}-byte compressed image: {exc}") from exc
    if image is None or image.size == 0:
        raise ImageDecodeError(f"could not decode the {buf.size}-byte compressed image: corrupt data")
    return image, _native_encoding(image)


def decode_image_msg(msg: object) -> tuple[np.ndarray, str]:
    """Array and encoding of a ``sensor_msgs/Image`` or ``sensor_msgs/CompressedImage`` (rclpy or rosbags).

    Raises:
        ImageDecodeError: any problem with the message content.
    """
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):  # CompressedImage
        return decode_compressed(_as_bytes(msg.data))  # type: ignore[attr-defined]
    try:
        height, width = msg.height, msg.width  # type: ignore[attr-defined]
        encoding, step = msg.encoding, msg.step  # type: ignore[attr-defined]
        bigendian = bool(msg.is_bigendian)  # type: ignore[attr-defined]
    except AttributeError as exc:
        raise ImageDecodeError(f"{type(msg).__name__} is neither a sensor_msgs/Image nor a CompressedImage") from exc
    image = image_from_buffer(_as_bytes(msg.data), height, width, encoding, step, bigendian)  # type: ignore
    return image, encoding


def read_image_file(path: str | Path) -> tuple[np.ndarray, str]:
    """Decode an image file (JPEG, PNG, or anything OpenCV reads) as stored; see :func:`decode_compressed`."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise FileNotFoundError(f"cannot read image {path}: {exc}") from exc
    try:
        return decode_compressed(data)
    except ImageDecodeError as exc:
        if "neither JPEG nor PNG" not in str(exc):
            raise ImageDecodeError(f"{path}: {exc}") from exc
    import cv2  # other containers (BMP, TIFF, WebP): let OpenCV sniff them

    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageDecodeError(f"{path} is not an image OpenCV can read")
    return image, _native_encoding(image)


def _native_encoding(image: np.ndarray) -> str:
    """Encoding name of an array as OpenCV decodes it (BGR channel order)."""
    channels = 1 if image.ndim == 2 else image.shape[2]
    base = {1: "mono", 3: "bgr", 4: "bgra"}.get(channels)
    if base is None or image.dtype not in (np.uint8, np.uint16):
        raise ImageDecodeError(f"decoded image has {channels} channels of {image.dtype}; "
                               "expected 1, 3 or 4 channels of uint8 or uint16")
    return f"{base}{16 if image.dtype == np.uint16 else 8}"


def _as_bytes(data: object) -> bytes | memoryview | np.ndarray:
    # rclpy gives array.array('B') (or bytes); rosbags gives a numpy uint8 array.
    if isinstance(data, (bytes, bytearray, memoryview, np.ndarray)):
        return data
    return memoryview(data)  # array.array and other buffer objects, zero-copy
