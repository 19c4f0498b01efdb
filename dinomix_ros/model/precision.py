"""``model.dtype: auto``: the inference precision for a device, chosen once at start-up and logged.

* CUDA: float16. The spec's numbers: float16 descriptors have cosine >= 0.99999 to float32, bfloat16 >= 0.9999, at
  the same speed on tensor-core GPUs; float16 also runs on GPUs without bfloat16 (Jetson Xavier, Turing).
* CPU: bfloat16 is fast only where the CPU computes it natively (x86 ``avx512_bf16`` / ``amx_bf16``, Arm ``bf16``);
  elsewhere PyTorch emulates it, and on this project's AVX2 build machine it measured 3-7x SLOWER than float32. A
  CPU without native bfloat16 gets float32 without measuring; one with it gets a short measurement of both (batch 1,
  best of a few runs) and bfloat16 only when it is clearly faster (:data:`BF16_MARGIN`).

``torch.set_flush_denormal(True)`` is deliberately not set: measured with both backbones on this CPU it changed
nothing beyond noise (see README "Speed"); the model's activations are not denormal.
"""

from __future__ import annotations

import copy
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dinomix_ros.util.dtypes import AUTO_DTYPE, FLOAT_DTYPES

__all__ = ["BF16_MARGIN", "DtypeChoice", "choose_dtype", "cpu_bfloat16_support", "measure_cpu_dtypes",
           "decide_cpu_dtype"]

_logger = logging.getLogger(__name__)

#: bfloat16 is chosen on the CPU only when it takes at most this share of float32's time (measurement noise).
BF16_MARGIN = 0.9
_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


@dataclass(frozen=True)
class DtypeChoice:
    """The precision the engine runs in and why.

    Attributes:
        dtype: float32, float16 or bfloat16.
        requested: the setting (``auto`` or one of the above).
        reason: one line for logs and diagnostics.
        timings_ms: measured batch-1 forward times per dtype (empty when nothing was measured).
    """

    dtype: str
    requested: str
    reason: str
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "requested": self.requested, "reason": self.reason,
                "timings_ms": dict(self.timings_ms)}


def cpu_bfloat16_support() -> tuple[bool, str]:
    """(native bfloat16 arithmetic?, a description of what was found) for this machine's CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: x86 "flags", Arm "Features"
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    found = sorted(flags & _CPU_FLAGS)
    where = f"{platform.machine()}, torch CPU capability {capability}"
    if found:
        return True, f"{where}, native {'/'.join(found)}"
    return False, f"{where}, no native bfloat16 ({'/'.join(sorted(_CPU_FLAGS))} absent)"


def measure_cpu_dtypes(model: nn.Module, runs: int = 3) -> dict[str, float]:
    """Best-of-``runs`` batch-1 forward time in ms of float32 and bfloat16 copies of ``model`` on the CPU."""
    from dinomix_ros.imaging.preprocess import INPUT_SIZE

    timings = {}
    x = torch.zeros((1, 3, INPUT_SIZE, INPUT_SIZE))
    for name in ("float32", "bfloat16"):
        dtype = getattr(torch, name)
        trial = copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()
        xd = x.to(dtype)
        with torch.inference_mode():
            trial(xd)  # warm-up: first-call allocations and kernel selection
            best = float("inf")
            for _ in range(runs):
                t0 = time.perf_counter()
                trial(xd)
                best = min(best, time.perf_counter() - t0)
        timings[name] = round(best * 1e3, 2)
        del trial
    return timings


def decide_cpu_dtype(timings_ms: dict[str, float]) -> str:
    """float32 unless bfloat16 took at most :data:`BF16_MARGIN` of float32's time."""
    if timings_ms.get("bfloat16", float("inf")) <= BF16_MARGIN * timings_ms["float32"]:
        return "bfloat16"
    return "float32"


def choose_dtype(requested: str, device: torch.device, model: nn.Module, *, measure: bool | None = None) -> DtypeChoice:
    """The inference precision for ``device`` (see the module docstring); logs the decision.

    Args:
        requested: ``auto`` or a precision name (returned as it is).
        device: where the model runs.
        model: the float32 model (measured on copies; left unchanged).
        measure: CPU only: measure float32 against bfloat16 (None: only when the CPU has native bfloat16).

    Raises:
        ValueError: an unknown precision name.
    """
    if requested != AUTO_DTYPE:
        if requested not in FLOAT_DTYPES:
            raise ValueError(f"model.dtype must be auto or one of {', '.join(FLOAT_DTYPES)}, got {requested!r}")
        return DtypeChoice(requested, requested, "set by model.dtype")
    if device.type == "cuda":
        choice = DtypeChoice("float16", requested, "CUDA: float16 (cosine >= 0.99999 to float32)")
    else:
        native, found = cpu_bfloat16_support()
        if not (native if measure is None else measure):
            choice = DtypeChoice("float32", requested, f"CPU: float32 ({found})")
        else:
            timings = measure_cpu_dtypes(model)
            dtype = decide_cpu_dtype(timings)
            choice = DtypeChoice(dtype, requested, f"CPU: {dtype}, measured batch-1 float32 {timings['float32']:.1f} "
                                                   f"ms, bfloat16 {timings['bfloat16']:.1f} ms ({found})", timings)
    _logger.info("model.dtype auto -> %s: %s", choice.dtype, choice.reason)
    return choice
