"""Camera images to numpy arrays: raw ``sensor_msgs/Image`` buffers and compressed (JPEG/PNG) bytes.

ROS-free and duck-typed: :func:`decode_image_msg` takes any object with the fields of ``sensor_msgs/Image``
(``height, width, encoding, is_bigendian, step, data``) or ``sensor_msgs/CompressedImage`` (``format, data``), so
rclpy messages and rosbags messages go through the same tested code. This replaces cv_bridge, which cannot be
installed from the registries these machines use (the PyPI ``cv-bridge`` is a broken ROS 1 port).
Every failure is an :class:`ImageDecodeError` (a ValueError) that says what was wrong; nothing here mutates input.

Images are untrusted input, so decoding has limits, all applied before anything image-sized is allocated:

* pixel count: every function takes ``max_pixels`` (:data:`DEFAULT_MAX_PIXELS`; the node's ``cameras.max_pixels``,
  the CLI's ``--max-pixels``) and refuses larger images with :class:`ImageTooLargeError`. Raw messages are checked
  from ``height * width``; JPEG and PNG from their headers (the SOF segment, the IHDR chunk), parsed here before the
  decoder runs; other image files (BMP, TIFF, WebP... read with :func:`read_image_file`) from the header Pillow
  reads, and where Pillow knows no header, by a byte-size bound (the file may be at most ``max_pixels`` bytes). A
  file is never read whole when it is larger than the largest image it could hold (:func:`max_file_bytes`).
* corrupt-but-decodable JPEG: libjpeg "decodes" a JPEG whose entropy-coded data ends early (e.g. a truncated file
  with an end-of-image marker appended) with only a warning on stderr, filling every missing block with mid-grey.
  OpenCV exposes no warning count, so the fill is recognised instead: a JPEG whose last 8x8 pixels (always inside the
  last, missing, block row) are exactly 128 in every channel while the image is not uniformly 128 is refused as a
  bad image (:class:`ImageDecodeError`), not counted as a warning: its descriptor would describe grey, not the place.
  A photo whose bottom-right corner is exactly mid-grey would be refused too (rare outside synthetic images); other
  libjpeg warnings that leave the picture whole (e.g. extraneous bytes before a marker) and truncated progressive
  JPEGs (blurred, not grey-filled) pass.

Memory: decoding a compressed image allocates its pixels once, at most ``max_pixels`` x channels x 2 bytes (16-bit
PNG). 16-bit images stay 16-bit until :mod:`dinomix_ros.imaging.preprocess` maps them to 8 bits in row blocks.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "ImageTooLargeError",
    "UnsupportedEncodingError",
    "RAW_ENCODINGS",
    "DEPTH_ENCODINGS",
    "decode_depth_msg",
    "check_pixels",
    "compressed_image_size",
    "image_from_buffer",
    "decode_compressed",
    "decode_image_msg",
    "max_file_bytes",
    "read_image_file",
]

#: Default pixel limit of every decode (``ImageConfig.max_pixels``): 50 MP, above any robot camera (a 4K frame is
#: 8.3 MP, a 20 MP machine-vision sensor 20 MP), small enough that one image stays far below 1 GiB (at most 400 MB for
#: a 16-bit RGBA PNG).
DEFAULT_MAX_PIXELS = 50_000_000


class ImageDecodeError(ValueError):
    """An image buffer that cannot be turned into an array (wrong size, truncated, corrupt)."""


class UnsupportedEncodingError(ImageDecodeError):
    """An image encoding this package does not convert."""


class ImageTooLargeError(ImageDecodeError):
    """An image with more pixels than the configured limit (refused before it is decoded)."""


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
# Depth images (REP 118), read by decode_depth_msg only: 16UC1 millimetres, 32FC1 metres.
DEPTH_ENCODINGS: dict[str, tuple[int, np.dtype]] = {
    "16UC1": (1, np.dtype(np.uint16)),
    "32FC1": (1, np.dtype(np.float32)),
}

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_EOI_SEARCH_BYTES = 4096
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC). Their segment holds the image size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and RST0-7 (SOI/EOI end the walk before they matter).
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])
# Segments allowed before the frame header: real files have fewer than 20 (APPn, DQT, DHT, DRI, COM).
_JPEG_MAX_SEGMENTS = 1024
_FILL_VALUE = 128  # what libjpeg fills missing blocks with
_FILL_CORNER = 8


def check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    """Refuse an image of ``width`` x ``height`` pixels over ``max_pixels`` (``what`` names it in the message).

    Raises:
        ImageTooLargeError: too many pixels.
    """
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} = {width * height / 1e6:.1f} MP, more than the limit of "
            f"{max_pixels / 1e6:g} MP (max_pixels = {max_pixels}; node parameter cameras.max_pixels, CLI flag "
            "--max-pixels): refused before decoding. Raise the limit if the camera really makes such images"
        )


def max_file_bytes(max_pixels: int) -> int:
    """Largest image file worth reading under ``max_pixels``: 8 bytes a pixel (16-bit RGBA, uncompressed) + 16 MiB
    of metadata. A larger file cannot hold an image within the limit, so it is refused unread."""
    return max_pixels * 8 + (16 << 20)


def image_from_buffer(
    data: bytes | bytearray | memoryview | np.ndarray,
    height: int,
    width: int,
    encoding: str,
    step: int,
    is_bigendian: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    encodings: dict[str, tuple[int, np.dtype]] = RAW_ENCODINGS,
) -> np.ndarray:
    """View a raw ``sensor_msgs/Image`` buffer as an (H, W) or (H, W, C) array, honouring ``step`` padding.

    Returns a read-only view when no conversion is needed (no copy on the camera path); 16-bit big-endian data
    is byte-swapped into a new native array.

    Raises:
        UnsupportedEncodingError: encoding not in ``encodings`` (:data:`RAW_ENCODINGS`, or :data:`DEPTH_ENCODINGS`).
        ImageTooLargeError: more than ``max_pixels`` pixels (checked before anything is allocated).
        ImageDecodeError: non-positive size, step smaller than a row, or a buffer shorter than height * step.
    """
    if encoding not in encodings:
        raise UnsupportedEncodingError(
            f"unsupported image encoding {encoding!r}; supported: {', '.join(sorted(encodings))}"
        )
    channels, dtype = encodings[encoding]
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"image size {width}x{height} is empty")
    check_pixels(width, height, max_pixels, f"the {encoding} image")
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


def compressed_image_size(data: bytes | bytearray | memoryview | np.ndarray) -> tuple[int, int]:
    """(width, height) that a JPEG or PNG declares in its header, read without decoding it.

    Raises:
        ImageDecodeError: not JPEG or PNG, or a header that is truncated or corrupt.
    """
    buf = memoryview(_as_uint8(data))
    head = bytes(buf[:8])
    if head.startswith(_JPEG_SOI):
        return _jpeg_size(buf)
    if head.startswith(_PNG_MAGIC):
        if len(buf) < 24 or bytes(buf[12:16]) != b"IHDR":
            raise ImageDecodeError(f"PNG data of {len(buf)} bytes has no IHDR header chunk: truncated or corrupt")
        width, height = int.from_bytes(buf[16:20], "big"), int.from_bytes(buf[20:24], "big")
        if not (0 < width < 2**31 and 0 < height < 2**31):  # the PNG specification's range
            raise ImageDecodeError(f"PNG header declares an invalid size {width}x{height}: corrupt")
        return width, height
    raise ImageDecodeError(f"compressed image is neither JPEG nor PNG (first bytes {head[:4].hex()})")


def _jpeg_size(buf: memoryview) -> tuple[int, int]:
    """(width, height) from the first start-of-frame segment, walking the segments after SOI."""
    n, i = len(buf), 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        if i >= n or buf[i] != 0xFF:
            raise ImageDecodeError(f"JPEG data of {n} bytes ends or breaks at byte {i} before its frame header: "
                                   "truncated or corrupt")
        while i < n and buf[i] == 0xFF:  # a marker may be preceded by fill bytes
            i += 1
        if i + 2 >= n:
            break
        marker = buf[i]
        i += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # SOI, EOI or a scan before any frame header
            raise ImageDecodeError(f"JPEG data has marker 0x{marker:02x} before its frame header: corrupt")
        length = (buf[i] << 8) | buf[i + 1]
        if length < 2 or i + length > n:
            break
        if marker in _JPEG_SOF:
            if length < 8:
                break
            height, width = (buf[i + 3] << 8) | buf[i + 4], (buf[i + 5] << 8) | buf[i + 6]
            if height == 0 or width == 0:  # height 0 = "given later by a DNL marker", which libjpeg cannot decode
                raise ImageDecodeError(f"JPEG frame header declares size {width}x{height}: not decodable")
            return width, height
        i += length
    else:
        raise ImageDecodeError(f"JPEG data has more than {_JPEG_MAX_SEGMENTS} segments before its frame header: "
                               "corrupt or hostile")
    raise ImageDecodeError(f"JPEG data of {n} bytes ends inside a header segment: truncated or corrupt")


def decode_compressed(data: bytes | bytearray | memoryview | np.ndarray,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """Decode JPEG or PNG bytes with OpenCV, exactly as stored (no EXIF rotation, bit depth kept).

    The header is read first: an image of more than ``max_pixels`` pixels is refused before the decoder allocates
    anything. A JPEG that libjpeg had to fill with grey is refused (see the module docstring).

    Returns:
        (array, encoding) with encoding one of mono8, mono16, bgr8, bgra8, bgr16, bgra16.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels.
        ImageDecodeError: empty, truncated or corrupt data, or an unknown container.
    """
    import cv2

    buf = _as_uint8(data)
    if buf.size == 0:
        raise ImageDecodeError("compressed image is empty (0 bytes)")
    width, height = compressed_image_size(buf)
    jpeg = buf[:2].tobytes() == _JPEG_SOI
    check_pixels(width, height, max_pixels, f"the {'JPEG' if jpeg else 'PNG'} image")
    if jpeg:
        # libjpeg may "decode" a truncated JPEG into a grey-filled image with only a warning: check the EOI marker
        # (near the end: MJPEG drivers may pad the buffer with zeros after it).
        if _JPEG_EOI not in buf[-_EOI_SEARCH_BYTES:].tobytes():
            raise ImageDecodeError(f"JPEG data of {buf.size} bytes has no end-of-image marker: truncated")
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageDecodeError(f"could not decode the {buf.size}-byte compressed image: {exc}") from exc
    if image is None or image.size == 0:
        raise ImageDecodeError(f"could not decode the {buf.size}-byte compressed image: corrupt data")
    if image.shape[:2] != (height, width):  # the header read here and the decoder's disagree: hostile or corrupt
        raise ImageDecodeError(f"the compressed image decoded to {image.shape[1]}x{image.shape[0]} but its header "
                               f"declares {width}x{height}: corrupt")
    if jpeg and _grey_filled(image):
        raise ImageDecodeError(f"JPEG data of {buf.size} bytes ends early: libjpeg filled the missing part with grey "
                               "(a truncated image with an end marker appended?)")
    return image, _native_encoding(image)


def _grey_filled(image: np.ndarray) -> bool:
    """Whether a decoded JPEG shows libjpeg's fill for missing data: its last block exactly mid-grey, the rest not."""
    if image.dtype != np.uint8 or image.shape[0] < _FILL_CORNER or image.shape[1] < _FILL_CORNER:
        return False
    corner = image[-_FILL_CORNER:, -_FILL_CORNER:]
    return bool((corner == _FILL_VALUE).all()) and not bool((image == _FILL_VALUE).all())


def decode_image_msg(msg: object, max_pixels: int = DEFAULT_MAX_PIXELS,
                     encodings: dict[str, tuple[int, np.dtype]] = RAW_ENCODINGS) -> tuple[np.ndarray, str]:
    """Array and encoding of a ``sensor_msgs/Image`` or ``sensor_msgs/CompressedImage`` (rclpy or rosbags).

    Args:
        msg: the message.
        max_pixels: refuse larger images (from ``height * width``, or the compressed header) before decoding.
        encodings: the raw encodings accepted (camera images; :func:`decode_depth_msg` passes the depth ones).

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels.
        ImageDecodeError: any other problem with the message content.
    """
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):  # CompressedImage
        return decode_compressed(_as_bytes(msg.data), max_pixels)  # type: ignore[attr-defined]
    try:
        height, width = msg.height, msg.width  # type: ignore[attr-defined]
        encoding, step = msg.encoding, msg.step  # type: ignore[attr-defined]
        bigendian = bool(msg.is_bigendian)  # type: ignore[attr-defined]
    except AttributeError as exc:
        raise ImageDecodeError(f"{type(msg).__name__} is neither a sensor_msgs/Image nor a CompressedImage") from exc
    try:
        height, width, step = int(height), int(width), int(step)
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError(f"image size fields are not integers: {exc}") from exc
    image = image_from_buffer(_as_bytes(msg.data), height, width, encoding, step, bigendian,  # type: ignore
                              max_pixels, encodings)
    return image, encoding


def decode_depth_msg(msg: object, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A depth ``sensor_msgs/Image`` as (H, W): uint16 millimetres (16UC1) or float32 metres (32FC1).

    Raises:
        ImageDecodeError: not a raw depth image of those encodings (a ``CompressedImage`` included), or a bad one.
    """
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        raise ImageDecodeError("a CompressedImage is not read as a depth image: use the raw depth topic (16UC1 or "
                               "32FC1)")
    return decode_image_msg(msg, max_pixels, DEPTH_ENCODINGS)[0]


def read_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """Decode an image file (JPEG, PNG, or anything OpenCV reads) as stored; see :func:`decode_compressed`.

    The pixel limit is checked before decoding: from the JPEG/PNG header, else from the header Pillow reads, else
    (a container Pillow does not know) the file may hold at most ``max_pixels`` bytes. A file larger than
    :func:`max_file_bytes` is refused without reading it.

    Raises:
        FileNotFoundError: the file cannot be read.
        ImageTooLargeError: more than ``max_pixels`` pixels.
        ImageDecodeError: not an image, or a corrupt one.
    """
    path = Path(path)
    try:
        size = os.stat(path).st_size
        if size > max_file_bytes(max_pixels):
            raise ImageTooLargeError(f"{path} is {size} bytes, more than any image within the limit of "
                                     f"{max_pixels / 1e6:g} MP can take (max_pixels = {max_pixels})")
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise FileNotFoundError(f"cannot read image {path}: {exc}") from exc
    try:
        return decode_compressed(data, max_pixels)
    except ImageDecodeError as exc:
        if "neither JPEG nor PNG" not in str(exc):
            raise type(exc)(f"{path}: {exc}") from exc
    import cv2  # other containers (BMP, TIFF, WebP): let OpenCV sniff them, after checking their size

    _check_other_container(path, data.size, max_pixels)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageDecodeError(f"{path} is not an image OpenCV can read")
    check_pixels(image.shape[1], image.shape[0], max_pixels, str(path))  # in case the decoder saw another size
    return image, _native_encoding(image)


def _check_other_container(path: Path, size: int, max_pixels: int) -> None:
    """Check the pixel count a non-JPEG/PNG file declares (Pillow reads only its header), else its byte size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(path) as im:
                width, height = im.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        if isinstance(exc, Image.DecompressionBombError):
            raise ImageTooLargeError(f"{path}: {exc}") from None
        if size > max_pixels:
            raise ImageTooLargeError(f"{path} is a {size}-byte image whose size cannot be read before decoding; "
                                     f"such files may hold at most max_pixels = {max_pixels} bytes") from None
        return
    check_pixels(width, height, max_pixels, str(path))


def _native_encoding(image: np.ndarray) -> str:
    """Encoding name of an array as OpenCV decodes it (BGR channel order)."""
    channels = 1 if image.ndim == 2 else image.shape[2]
    base = {1: "mono", 3: "bgr", 4: "bgra"}.get(channels)
    if base is None or image.dtype not in (np.uint8, np.uint16):
        raise ImageDecodeError(f"decoded image has {channels} channels of {image.dtype}; "
                               "expected 1, 3 or 4 channels of uint8 or uint16")
    return f"{base}{16 if image.dtype == np.uint16 else 8}"


def _as_uint8(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """A flat uint8 view of compressed bytes (no copy)."""
    return np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)


def _as_bytes(data: object) -> bytes | memoryview | np.ndarray:
    # rclpy gives array.array('B') (or bytes); rosbags gives a numpy uint8 array.
    if isinstance(data, (bytes, bytearray, memoryview, np.ndarray)):
        return data
    return memoryview(data)  # array.array and other buffer objects, zero-copy
