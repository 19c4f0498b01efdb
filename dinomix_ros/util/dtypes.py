"""Floating-point precisions have one spelling everywhere: numpy's and torch's names (float32, float16, bfloat16).

``auto`` (model inference only) means: let :func:`dinomix_ros.model.precision.choose_dtype` pick one of them for the
device (float16 on CUDA; on the CPU the faster of float32 and bfloat16).
"""

from __future__ import annotations

from typing import Any

__all__ = ["FLOAT_DTYPES", "AUTO_DTYPE", "MODEL_DTYPES", "torch_dtype"]

#: Precisions of model inference and of the torch search backend.
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
#: The model precision chosen per device at start-up.
AUTO_DTYPE = "auto"
#: What ``model.dtype`` accepts.
MODEL_DTYPES = (AUTO_DTYPE, *FLOAT_DTYPES)


def torch_dtype(name: str) -> Any:
    """The torch dtype of a precision name (imports torch)."""
    import torch

    if name not in FLOAT_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(FLOAT_DTYPES)}, got {name!r}")
    return getattr(torch, name)
