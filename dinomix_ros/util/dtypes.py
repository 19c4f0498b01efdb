"""Floating-point precisions have one spelling everywhere: numpy's and torch's names (float32, float16, bfloat16)."""

from __future__ import annotations

from typing import Any

__all__ = ["FLOAT_DTYPES", "torch_dtype"]

#: Precisions of model inference and of the torch search backend.
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str) -> Any:
    """The torch dtype of a precision name (imports torch)."""
    import torch

    if name not in FLOAT_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(FLOAT_DTYPES)}, got {name!r}")
    return getattr(torch, name)
