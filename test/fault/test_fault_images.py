"""Fault suite, malformed images: every hostile camera message is refused as a bad image (or decoded, for the valid
ones with hostile extras) with bounded memory, through the node's own decode-and-describe path, in-process.

Each probe runs ``Encoder.describe_one(*decode_image_msg(msg, max_pixels))``, what the node's worker does per frame,
and measures the peak memory above the resident size before it (:mod:`memprobe`). The rule: < 1 GiB for any single
input, including the largest image the default limit accepts (a 16-bit RGBA PNG, 8 bytes a pixel). A handful of the
same messages go through a real node in test_fault_node_inputs.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from hostile_images import DECODABLE, Compressed, hostile_messages, largest_png
from hostile_maps import random_weights
from memprobe import GIB, peak_above

from dinomix_ros.imaging.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image_msg
from dinomix_ros.model.encoder import Encoder, EncoderConfig

KLASS = "malformed image"
HANG_S = 120.0  # a probe this slow counts as a hang (none takes a tenth of it)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(random_weights(), EncoderConfig(device="cpu", dtype="float32"))


def _describe(encoder: Encoder, msg: object) -> np.ndarray:
    return encoder.describe_one(*decode_image_msg(msg, encoder.image.max_pixels))


def test_malformed_images_are_refused_with_bounded_memory(encoder: Encoder, fault_probe) -> None:
    _describe(encoder, Compressed(largest_png(64 * 64), "png"))  # warm up the model outside the measurements
    kinds = hostile_messages()
    assert len(kinds) >= 15
    report = []
    for kind, msg in kinds:
        t0 = time.monotonic()
        memory, outcome = peak_above(lambda msg=msg: _describe(encoder, msg))
        elapsed = time.monotonic() - t0
        expected_ok = kind in DECODABLE
        crashed = not isinstance(outcome, (ImageDecodeError, np.ndarray))  # anything else escapes the contract
        fault_probe(KLASS, kind, crashed=crashed, hung=elapsed > HANG_S)
        report.append((kind, memory.mib, type(outcome).__name__))
        assert not crashed, f"{kind}: {outcome!r}"
        assert isinstance(outcome, np.ndarray) == expected_ok, f"{kind}: {outcome!r}"
        if expected_ok:
            assert outcome.shape == (encoder.descriptor_dim,) and np.isfinite(outcome).all()
        assert memory.above < GIB, f"{kind}: {memory.mib:.0f} MiB above the steady state"
    print("\n".join(f"{k:42s} {m:8.1f} MiB  {o}" for k, m, o in report))


def test_largest_accepted_image_stays_under_a_gibibyte(encoder: Encoder, fault_probe) -> None:
    """The worst case the limit lets through: a 16-bit RGBA PNG of max_pixels (decoded 16-bit, reduced per block)."""
    png = largest_png(DEFAULT_MAX_PIXELS)
    memory, outcome = peak_above(lambda: _describe(encoder, Compressed(png, "png")))
    fault_probe(KLASS, "largest accepted: 16-bit rgba png of max_pixels", crashed=not isinstance(outcome, np.ndarray))
    print(f"\n16-bit RGBA PNG of {DEFAULT_MAX_PIXELS / 1e6:g} MP ({len(png)} bytes compressed): peak "
          f"{memory.mib:.0f} MiB above the steady state ({'VmHWM' if memory.exact else 'ru_maxrss'})")
    assert isinstance(outcome, np.ndarray), outcome
    assert memory.above < GIB, f"{memory.mib:.0f} MiB above the steady state"
    one_more = largest_png(DEFAULT_MAX_PIXELS + 2 * int(DEFAULT_MAX_PIXELS ** 0.5) + 1)  # side + 1
    with pytest.raises(ImageDecodeError, match="more than the limit of 50 MP"):
        _describe(encoder, Compressed(one_more, "png"))
