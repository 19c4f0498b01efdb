"""``model.dtype: auto``: the precision per device, and on the CPU never one slower than float32."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from dinomix_ros.model import random_model
from dinomix_ros.model.encoder import Encoder, EncoderConfig
from dinomix_ros.model.precision import (
    BF16_MARGIN,
    choose_dtype,
    cpu_bfloat16_support,
    decide_cpu_dtype,
)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_model("vits14", seed=3).model


def test_bfloat16_only_when_clearly_faster() -> None:
    assert decide_cpu_dtype({"float32": 100.0, "bfloat16": 350.0}) == "float32"  # this project's AVX2 machine
    assert decide_cpu_dtype({"float32": 100.0, "bfloat16": 95.0}) == "float32"  # within noise: keep the exact one
    assert decide_cpu_dtype({"float32": 100.0, "bfloat16": 100.0 * BF16_MARGIN}) == "bfloat16"
    assert decide_cpu_dtype({"float32": 100.0, "bfloat16": 40.0}) == "bfloat16"  # AMX / avx512_bf16
    assert decide_cpu_dtype({"float32": 100.0}) == "float32"


def test_measured_cpu_choice_is_never_slower_than_float32_and_is_logged(model, caplog) -> None:
    """On the machine the test runs on: measure both, and the choice is the faster one by its own logged numbers."""
    with caplog.at_level(logging.INFO, logger="dinomix_ros.model.precision"):
        choice = choose_dtype("auto", torch.device("cpu"), model, measure=True)
    assert set(choice.timings_ms) == {"float32", "bfloat16"}
    line = next(r.getMessage() for r in caplog.records if "model.dtype auto ->" in r.getMessage())
    logged = dict(re.findall(r"(float32|bfloat16) ([0-9.]+) ms", line))
    assert {k: float(v) for k, v in logged.items()} == pytest.approx(choice.timings_ms, abs=0.051)
    assert line.startswith(f"model.dtype auto -> {choice.dtype}: CPU: {choice.dtype}, measured batch-1")
    if choice.dtype == "bfloat16":
        assert choice.timings_ms["bfloat16"] <= BF16_MARGIN * choice.timings_ms["float32"]
    else:
        assert choice.dtype == "float32"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # measured on copies


def test_auto_on_this_cpu_follows_its_capabilities(model, caplog) -> None:
    native, found = cpu_bfloat16_support()
    assert found
    if native:
        pytest.skip(f"this CPU has native bfloat16 ({found}): auto measures (see the test above)")
    with caplog.at_level(logging.INFO, logger="dinomix_ros.model.precision"):
        choice = choose_dtype("auto", torch.device("cpu"), model)
    assert choice.dtype == "float32" and choice.timings_ms == {} and "no native bfloat16" in choice.reason
    assert f"model.dtype auto -> float32: CPU: float32 ({found})" in caplog.text


def test_cuda_gets_float16_and_explicit_values_are_kept(model) -> None:
    assert choose_dtype("auto", torch.device("cuda"), model).dtype == "float16"  # a decision, no GPU needed
    for name in ("float32", "float16", "bfloat16"):
        choice = choose_dtype(name, torch.device("cpu"), model)
        assert choice.dtype == name and choice.reason == "set by model.dtype"
    with pytest.raises(ValueError, match="model.dtype must be auto or one of float32, float16, bfloat16"):
        choose_dtype("fp8", torch.device("cpu"), model)


def test_encoder_reports_the_choice() -> None:
    enc = Encoder(random_model("vits14", seed=3), EncoderConfig(device="cpu"))
    info = enc.describe_info()
    assert EncoderConfig().dtype == "auto" and info["dtype_requested"] == "auto"
    assert info["dtype"] == enc.dtype_choice.dtype and info["dtype_reason"] == enc.dtype_choice.reason
    fixed = Encoder(random_model("vits14", seed=3), EncoderConfig(device="cpu", dtype="float32")).describe_info()
    assert fixed["dtype"] == "float32" and fixed["dtype_reason"] == "set by model.dtype"
