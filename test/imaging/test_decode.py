"""Raw and compressed camera images -> arrays (the cv_bridge replacement)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from dinomix_ros.imaging.decode import (
    RAW_ENCODINGS,
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedEncodingError,
    compressed_image_size,
    decode_compressed,
    decode_image_msg,
    image_from_buffer,
    max_file_bytes,
    read_image_file,
)


def _padded_buffer(image: np.ndarray, pad: int) -> tuple[bytes, int]:
    """Row-major bytes of ``image`` with ``pad`` junk bytes after every row, as drivers with aligned rows send."""
    rows = image.reshape(image.shape[0], -1).view(np.uint8)
    junk = np.full((image.shape[0], pad), 0xAB, np.uint8)
    return np.hstack([rows, junk]).tobytes(), rows.shape[1] + pad


@pytest.mark.parametrize("encoding", sorted(RAW_ENCODINGS))
def test_every_raw_encoding_with_row_padding(encoding: str, rng: np.random.Generator) -> None:
    channels, dtype = RAW_ENCODINGS[encoding]
    shape = (5, 7) if channels == 1 else (5, 7, channels)
    image = rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)
    data, step = _padded_buffer(image, pad=3)
    out = image_from_buffer(data, 5, 7, encoding, step)
    np.testing.assert_array_equal(out, image)
    assert out.dtype == dtype and not out.flags.writeable  # a view: no copy on the camera path


def test_big_endian_16_bit_is_swapped(rng: np.random.Generator) -> None:
    image = rng.integers(0, 65535, size=(4, 6), dtype=np.uint16)
    data = image.astype(">u2").tobytes()
    np.testing.assert_array_equal(image_from_buffer(data, 4, 6, "mono16", 12, is_bigendian=True), image)
    assert not np.array_equal(image_from_buffer(data, 4, 6, "mono16", 12, is_bigendian=False), image)


@pytest.mark.parametrize(
    "args, message",
    [
        ((b"\x00" * 59, 4, 5, "rgb8", 15), "holds 59 bytes, rgb8 5x4 with step 15 needs 60"),
        ((b"\x00" * 60, 4, 5, "rgb8", 14), "step 14 is smaller than one row"),
        ((b"", 0, 5, "mono8", 5), "is empty"),
    ],
)
def test_bad_raw_buffers(args, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        image_from_buffer(*args)


def test_unknown_encoding_lists_the_supported_ones() -> None:
    with pytest.raises(UnsupportedEncodingError, match=r"unsupported image encoding '32FC1'; supported: .*bgr8"):
        image_from_buffer(b"\x00" * 16, 2, 2, "32FC1", 8)


def test_jpeg_bytes_decode_exactly_like_pil(data_dir) -> None:
    path = data_dir / "rtabmap_corridor" / "samples" / "1.jpg"
    image, encoding = decode_compressed(path.read_bytes())
    assert encoding == "bgr8" and image.shape == (384, 512, 3)
    np.testing.assert_array_equal(image[:, :, ::-1], np.asarray(Image.open(path).convert("RGB")))
    same, _ = read_image_file(path)
    np.testing.assert_array_equal(same, image)


def test_png_keeps_bit_depth_and_alpha(rng: np.random.Generator) -> None:
    deep = rng.integers(0, 65535, size=(6, 8), dtype=np.uint16)
    ok, png = cv2.imencode(".png", deep)
    image, encoding = decode_compressed(png.tobytes())
    assert encoding == "mono16"
    np.testing.assert_array_equal(image, deep)
    bgra = rng.integers(0, 255, size=(6, 8, 4), dtype=np.uint8)
    ok, png = cv2.imencode(".png", bgra)
    image, encoding = decode_compressed(png.tobytes())
    assert encoding == "bgra8"
    np.testing.assert_array_equal(image, bgra)


def test_truncated_corrupt_and_foreign_bytes_are_refused(data_dir) -> None:
    jpeg = (data_dir / "rtabmap_corridor" / "samples" / "2.jpg").read_bytes()
    with pytest.raises(ImageDecodeError, match="no end-of-image marker: truncated"):
        decode_compressed(jpeg[: len(jpeg) // 2])
    corrupt = bytearray(jpeg)
    corrupt[2:400] = b"\x00" * 398  # wipe the headers, keep SOI and EOI
    with pytest.raises(ImageDecodeError, match="before its frame header: truncated or corrupt"):
        decode_compressed(bytes(corrupt))
    with pytest.raises(ImageDecodeError, match="neither JPEG nor PNG"):
        decode_compressed(b"GIF89a" + b"\x00" * 20)
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_compressed(b"")


def test_rclpy_messages_decode(data_dir, rng: np.random.Generator) -> None:
    from sensor_msgs.msg import CompressedImage, Image as ImageMsg

    image = rng.integers(0, 255, size=(3, 4, 3), dtype=np.uint8)
    msg = ImageMsg(height=3, width=4, encoding="bgr8", is_bigendian=0, step=12, data=image.tobytes())
    out, encoding = decode_image_msg(msg)
    assert encoding == "bgr8"
    np.testing.assert_array_equal(out, image)
    jpeg = (data_dir / "rtabmap_corridor" / "samples" / "3.jpg").read_bytes()
    out, encoding = decode_image_msg(CompressedImage(format="jpeg", data=jpeg))
    assert encoding == "bgr8" and out.shape == (384, 512, 3)
    with pytest.raises(ImageDecodeError, match="neither a sensor_msgs/Image nor a CompressedImage"):
        decode_image_msg(object())


def test_rosbags_messages_from_the_real_t265_bag_decode(data_dir) -> None:
    from rosbags.highlevel import AnyReader

    bag = data_dir / "t265_office_bag" / "ros2_mcap"
    with AnyReader([bag]) as reader:
        conns = [c for c in reader.connections if c.topic == "/camera/fisheye1/image_raw"]
        decoded = [reader.deserialize(raw, conn.msgtype) for conn, _, raw in reader.messages(connections=conns)]
    assert len(decoded) == 3
    image, encoding = decode_image_msg(decoded[0])
    assert encoding == "mono8" and image.shape == (800, 848) and image.dtype == np.uint8
    assert image.std() > 10  # a real picture, not a blank buffer


def test_jpeg_padded_with_zeros_after_the_end_marker_decodes(data_dir) -> None:
    """MJPEG drivers hand out fixed-size buffers: zeros after the end-of-image marker are not truncation."""
    jpeg = (data_dir / "rtabmap_corridor" / "samples" / "4.jpg").read_bytes()
    image, _ = decode_compressed(jpeg + bytes(2000))
    np.testing.assert_array_equal(image, decode_compressed(jpeg)[0])


# ---------------------------------------------------------------------- limits (issue 8: decoding is bounded)


def _png(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG that only declares its size (IHDR), with a few bytes of pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))
            + chunk(b"IEND", b""))


def test_header_sizes_match_what_the_decoder_makes(data_dir, rng: np.random.Generator) -> None:
    for path in sorted((data_dir / "rtabmap_corridor" / "samples").glob("*.jpg"))[:5]:
        data = path.read_bytes()
        image, _ = decode_compressed(data)
        assert compressed_image_size(data) == (image.shape[1], image.shape[0])
    for shape, dtype in (((37, 53), np.uint8), ((20, 31, 3), np.uint16), ((9, 8, 4), np.uint8)):
        image = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
        for ext in (".png", ".jpg") if dtype == np.uint8 else (".png",):
            ok, enc = cv2.imencode(ext, image)
            assert compressed_image_size(enc.tobytes()) == (shape[1], shape[0]), ext


def test_images_over_the_pixel_limit_are_refused_before_decoding(data_dir, tmp_path) -> None:
    from sensor_msgs.msg import CompressedImage, Image as ImageMsg

    bomb = _png(30000, 30000, bit_depth=16, color_type=6)  # 7.2 GB if decoded
    with pytest.raises(ImageTooLargeError, match=r"30000x30000 = 900.0 MP, more than the limit of 50 MP"):
        decode_compressed(bomb)
    jpeg = (data_dir / "rtabmap_corridor" / "samples" / "2.jpg").read_bytes()
    width, height = compressed_image_size(jpeg)
    assert decode_compressed(jpeg, max_pixels=width * height)[0].shape[:2] == (height, width)  # the limit is inclusive
    with pytest.raises(ImageTooLargeError, match="max_pixels = 1000"):
        decode_compressed(jpeg, max_pixels=1000)
    with pytest.raises(ImageTooLargeError):  # raw: from height * width, before the (short) buffer is even looked at
        image_from_buffer(b"\x00" * 16, 2**20, 2**20, "mono8", 2**20)
    msg = ImageMsg(height=40, width=50, encoding="mono8", step=50, data=bytes(2000))
    assert decode_image_msg(msg, max_pixels=2000)[0].shape == (40, 50)
    with pytest.raises(ImageTooLargeError):
        decode_image_msg(msg, max_pixels=1999)
    with pytest.raises(ImageTooLargeError):
        decode_image_msg(CompressedImage(format="png", data=bomb))
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        read_image_file(tmp_path / "bomb.png")
    big = tmp_path / "big.bin"  # larger than any image within the limit could be: refused without reading it
    with open(big, "wb") as f:
        f.truncate(max_file_bytes(100) + 1)
    with pytest.raises(ImageTooLargeError, match="more than any image"):
        read_image_file(big, max_pixels=100)


def test_other_containers_are_checked_by_their_header_or_their_byte_size(tmp_path, rng: np.random.Generator) -> None:
    image = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.bmp"), image)
    np.testing.assert_array_equal(read_image_file(tmp_path / "a.bmp", max_pixels=1200)[0], image)
    with pytest.raises(ImageTooLargeError, match="40x30"):  # Pillow read the BMP header
        read_image_file(tmp_path / "a.bmp", max_pixels=1199)
    cv2.imwrite(str(tmp_path / "a.hdr"), image.astype(np.float32) / 255)  # Radiance HDR: Pillow has no reader
    size = (tmp_path / "a.hdr").stat().st_size
    with pytest.raises(ImageDecodeError, match="channels of float32"):  # within the byte bound: OpenCV decodes it
        read_image_file(tmp_path / "a.hdr", max_pixels=size)
    with pytest.raises(ImageTooLargeError, match="size cannot be read before decoding"):
        read_image_file(tmp_path / "a.hdr", max_pixels=size - 1)


def test_a_truncated_jpeg_with_an_end_marker_is_refused(data_dir) -> None:
    jpeg = (data_dir / "rtabmap_corridor" / "samples" / "2.jpg").read_bytes()
    for cut in (0.3, 0.6, 0.95):
        with pytest.raises(ImageDecodeError, match="filled the missing part with grey"):
            decode_compressed(jpeg[: int(len(jpeg) * cut)] + b"\xff\xd9")
    grey = np.full((32, 48, 3), 128, np.uint8)  # a uniformly grey image is not mistaken for a fill
    ok, enc = cv2.imencode(".jpg", grey)
    np.testing.assert_array_equal(decode_compressed(enc.tobytes())[0], grey)


def test_16_bit_images_reduce_to_8_bit_without_widening(rng: np.random.Generator, monkeypatch) -> None:
    """Bit-identical to the integer formula, computed per row block (no uint32/float32 copy of the image)."""
    from dinomix_ros.imaging import preprocess

    image = rng.integers(0, 65535, (301, 7, 3), endpoint=True).astype(np.uint16)
    image[0, 0] = [0, 65535, 32896]
    monkeypatch.setattr(preprocess, "_BLOCK_ELEMENTS", 50)  # many blocks, one partial
    full = preprocess._to_8bit(image, "full")
    np.testing.assert_array_equal(full, ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    lo, hi = int(image.min()), int(image.max())
    minmax = np.rint((image.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1))).astype(np.uint8)
    np.testing.assert_array_equal(preprocess._to_8bit(image, "minmax"), minmax)
    assert full.dtype == np.uint8 and full.flags.c_contiguous


@pytest.mark.parametrize("bigendian", [False, True])
def test_depth_images_decode_as_millimetres_or_metres(bigendian: bool) -> None:
    from types import SimpleNamespace

    from dinomix_ros.imaging.decode import decode_depth_msg

    order = ">" if bigendian else "<"
    metres = np.array([[0.5, 1.25, np.nan], [2.0, 0.0, 7.5]], np.float32)
    mm = np.array([[500, 1250, 0], [2000, 0, 7500]], np.uint16)
    for pixels, encoding in ((metres, "32FC1"), (mm, "16UC1")):
        data = np.ascontiguousarray(pixels.astype(pixels.dtype.newbyteorder(order))).view(np.uint8).reshape(-1)
        msg = SimpleNamespace(height=2, width=3, encoding=encoding, step=3 * pixels.itemsize, is_bigendian=bigendian,
                              data=data.tobytes())
        depth = decode_depth_msg(msg)
        assert depth.dtype == pixels.dtype and depth.dtype.isnative
        np.testing.assert_array_equal(depth, pixels)
    colour = SimpleNamespace(height=2, width=3, encoding="rgb8", step=9, is_bigendian=False, data=bytes(18))
    with pytest.raises(UnsupportedEncodingError, match="supported: 16UC1, 32FC1"):
        decode_depth_msg(colour)
    with pytest.raises(ImageDecodeError, match="CompressedImage is not read as a depth image"):
        decode_depth_msg(SimpleNamespace(format="png", data=b""))
    float_camera = SimpleNamespace(height=2, width=3, encoding="32FC1", step=12, is_bigendian=False, data=bytes(24))
    with pytest.raises(UnsupportedEncodingError):
        decode_image_msg(float_camera)  # a camera image is never float depth
