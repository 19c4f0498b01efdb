"""Raw and compressed camera images -> arrays (the cv_bridge replacement)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from dinomix_ros.imaging.decode import (
    RAW_ENCODINGS,
    ImageDecodeError,
    UnsupportedEncodingError,
    decode_compressed,
    decode_image_msg,
    image_from_buffer,
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
    with pytest.raises(ImageDecodeError, match="corrupt data"):
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
