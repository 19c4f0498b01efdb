"""Malformed and hostile camera messages for the fault suite: decompression bombs, lying headers, corrupt data.

Each kind is built from scratch (PNG chunks with valid CRCs, JPEG segments patched in a real encoder's output), so a
probe exercises the decoder's limits and not merely a broken container. :func:`hostile_messages` returns them as
duck-typed ``sensor_msgs`` messages (what :func:`~dinomix_ros.imaging.decode.decode_image_msg` takes); the node test
converts them into rclpy messages.
"""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = ["DECODABLE", "Compressed", "Raw", "good_jpeg", "hostile_messages", "largest_png", "png_bytes"]


@dataclass
class Compressed:
    """Fields of sensor_msgs/CompressedImage."""

    data: bytes
    format: str = "jpeg"


@dataclass
class Raw:
    """Fields of sensor_msgs/Image."""

    height: int
    width: int
    encoding: str
    step: int
    data: bytes = b""
    is_bigendian: int = 0
    extra: dict = field(default_factory=dict)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bytes(width: int, height: int, *, bit_depth: int = 8, color_type: int = 2, idat: bytes | None = None,
              extra: tuple[bytes, ...] = (), bad_crc: bool = False) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` (of any size: ``idat`` need not match it)."""
    if idat is None:
        idat = zlib.compress(b"\x00" * 64)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = _chunk(b"IDAT", idat)
    if bad_crc:
        body = body[:-4] + bytes(4)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(extra) + body + _chunk(b"IEND", b"")


def good_jpeg(h: int = 96, w: int = 128, seed: int = 0) -> bytes:
    """A textured baseline JPEG (smooth noise: no exactly mid-grey corner)."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.uint8), (9, 9), 3)
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return enc.tobytes()


def _sof_offset(jpeg: bytes) -> int:
    i = 2
    while True:
        marker, length = jpeg[i + 1], int.from_bytes(jpeg[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return i
        i += 2 + length


def _with_size(jpeg: bytes, width: int, height: int) -> bytes:
    i = _sof_offset(jpeg)
    out = bytearray(jpeg)
    out[i + 5:i + 7] = height.to_bytes(2, "big")
    out[i + 7:i + 9] = width.to_bytes(2, "big")
    return bytes(out)


@functools.lru_cache(maxsize=None)
def _zeros_zlib(nbytes: int) -> bytes:
    """A zlib stream of ``nbytes`` zero bytes, built in well under a second whatever its size: one 8 MiB block is
    compressed ending in a full flush (which resets the compressor, so every further block compresses to the same
    bytes), repeated, and the trailer's Adler-32 is computed for the whole length."""
    block_len = 8 << 20
    c = zlib.compressobj(9)
    first = c.compress(b"\x00" * min(block_len, nbytes)) + c.flush(zlib.Z_FULL_FLUSH)
    blocks, rest = divmod(nbytes, block_len)
    if blocks == 0:
        return zlib.compress(b"\x00" * nbytes)
    repeat = c.compress(b"\x00" * block_len) + c.flush(zlib.Z_FULL_FLUSH) if blocks > 1 else b""
    tail = c.compress(b"\x00" * rest) + c.flush()
    adler = 1
    zero_block = b"\x00" * block_len
    for _ in range(blocks):
        adler = zlib.adler32(zero_block, adler)
    adler = zlib.adler32(b"\x00" * rest, adler)
    return first + repeat * (blocks - 1) + tail[:-4] + struct.pack(">I", adler)


def _zlib_bomb(nbytes: int) -> bytes:
    return _zeros_zlib(nbytes)


def _zlib_rows(height: int, row_bytes: int) -> bytes:
    """zlib stream of ``height`` all-zero PNG rows (filter byte 0 + ``row_bytes`` zeros)."""
    return _zeros_zlib(height * (1 + row_bytes))


def largest_png(max_pixels: int) -> bytes:
    """A valid all-black 16-bit RGBA PNG (8 bytes a pixel, the most a decode allocates) just within ``max_pixels``."""
    side = int(max_pixels ** 0.5)
    return png_bytes(side, side, bit_depth=16, color_type=6, idat=_zlib_rows(side, side * 8))


def _ztxt_bomb(nbytes: int) -> bytes:
    """An ancillary zTXt chunk whose text inflates to ``nbytes`` (libpng's own limit must hold)."""
    return _chunk(b"zTXt", b"Comment\x00\x00" + _zlib_bomb(nbytes))


#: Kinds a decoder may accept (they are valid images with hostile extras); every other kind must be refused.
DECODABLE = ("png zlib bomb idat 1x1", "png ztxt bomb 256 MiB")


def hostile_messages() -> list[tuple[str, object]]:
    """(kind, message) for every malformed image kind; all but :data:`DECODABLE` must be refused as bad images."""
    jpeg = good_jpeg()
    half = jpeg[: len(jpeg) // 2]
    sos = jpeg.index(b"\xff\xda")
    app_flood = jpeg[:2] + b"".join(b"\xff\xe1\x00\x04ab" for _ in range(5000)) + jpeg[2:]
    wiped = bytearray(jpeg)
    wiped[2:sos] = b"\x00" * (sos - 2)
    rng = np.random.default_rng(7)
    return [
        # decompression bombs: tiny files declaring huge images (the OOM kill)
        ("png 30000x30000 rgba16", Compressed(png_bytes(30000, 30000, bit_depth=16, color_type=6), "png")),
        ("png 30000x30000 rgb8", Compressed(png_bytes(30000, 30000), "png")),
        ("png 30000x30000 grey8, all rows", Compressed(png_bytes(30000, 30000, color_type=0,
                                                                 idat=_zlib_rows(30000, 30000)), "png")),
        ("png 2^31-1 x 1 grey", Compressed(png_bytes(2**31 - 1, 1, color_type=0), "png")),
        ("jpeg sof 65535x65535", Compressed(_with_size(jpeg, 65535, 65535))),
        ("jpeg sof 9000x9000", Compressed(_with_size(jpeg, 9000, 9000))),
        # lying or broken headers
        ("jpeg sof height 0 (dnl)", Compressed(_with_size(jpeg, 128, 0))),
        ("png ihdr width 0", Compressed(png_bytes(0, 10), "png")),
        ("png no ihdr", Compressed(b"\x89PNG\r\n\x1a\n" + _chunk(b"IEND", b""), "png")),
        ("jpeg headers wiped", Compressed(bytes(wiped))),
        ("jpeg 5000 app segments", Compressed(app_flood)),
        ("jpeg header says 256x192, data 128x96", Compressed(_with_size(jpeg, 256, 192))),
        # corrupt data
        ("jpeg truncated", Compressed(half)),
        ("jpeg truncated + eoi appended", Compressed(half + b"\xff\xd9")),
        ("jpeg truncated at 90% + eoi", Compressed(jpeg[: int(len(jpeg) * 0.9)] + b"\xff\xd9")),
        ("png bad idat crc", Compressed(png_bytes(8, 8, bad_crc=True), "png")),
        ("png idat not zlib", Compressed(png_bytes(8, 8, idat=b"garbage!" * 8), "png")),
        ("png idat short", Compressed(png_bytes(64, 64, idat=zlib.compress(b"\x00" * 10)), "png")),
        ("png zlib bomb idat 1x1", Compressed(png_bytes(1, 1, idat=_zlib_bomb(256 << 20)), "png")),
        ("png ztxt bomb 256 MiB", Compressed(png_bytes(1, 1, idat=zlib.compress(b"\x00" * 4),
                                                       extra=(_ztxt_bomb(256 << 20),)), "png")),
        ("empty", Compressed(b"")),
        ("random bytes", Compressed(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())),
        ("gif container", Compressed(b"GIF89a" + bytes(64), "gif")),
        # raw messages: sizes from the message, checked before anything is allocated
        ("raw 2^31 x 2^31 rgb8, 16 bytes", Raw(2**31, 2**31, "rgb8", 3 * 2**31, bytes(16))),
        ("raw 20000x20000 mono16, 16 bytes", Raw(20000, 20000, "mono16", 40000, bytes(16))),
        ("raw step shorter than a row", Raw(48, 64, "rgb8", 64 * 3 - 1, bytes(64 * 3 * 48))),
        ("raw one row missing", Raw(48, 64, "rgb8", 64 * 3, bytes(64 * 3 * 47))),
        ("raw unknown encoding", Raw(48, 64, "32FC1", 64 * 4, bytes(64 * 4 * 48))),
        ("raw negative height", Raw(-5, 64, "rgb8", 64 * 3, bytes(64 * 3))),
        ("raw rgb16 big-endian, odd buffer", Raw(3, 3, "rgb16", 18, bytes(53), is_bigendian=1)),
        ("raw yuv422 odd width", Raw(4, 5, "yuv422", 10, bytes(40))),
    ]
