"""ONNX export of a DINO-Mix model, for ONNX Runtime (CPU, CUDA, TensorRT) and TensorRT's ``trtexec``.

The exported graph takes **uint8 (B, 224, 224, 3) RGB** by default (``input="uint8_nhwc"``): the input of
:meth:`~dinomix_ros.model.encoder.Encoder.describe_prepared`, i.e. the whole-image antialiased resize already done.
Scaling, ImageNet mean/std and the NHWC -> NCHW transpose are inside the graph, so

* the file implements the recipe its metadata names (``dinomix.preprocessing``), and no runtime that loads it has to
  re-implement mean/std;
* a camera frame crosses to the accelerator as 150 KB of bytes instead of 600 KB of float32.

``input="float32_nchw"`` exports the bare model on ImageNet-normalised (B, 3, 224, 224) float32 instead, for runtimes
that refuse uint8 network inputs (older TensorRT releases).

The batch dimension is dynamic (``batch``); the output is ``descriptors``, (B, 4096) float32, L2-normalised. The
model fingerprint, the preprocessing id and the input layout are stored in the ONNX metadata (``dinomix.*`` keys),
so a backend can refuse a file made from other weights (:func:`read_onnx_metadata`).

The exporter is PyTorch's TorchScript-based one (``dynamo=False``): the dynamo exporter needs the ``onnxscript``
package, which this project does not install. Opset 18: LayerNormalization is a single op (>= 17) and attention is
exported as MatMul/Softmax, which ONNX Runtime and TensorRT fuse back.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinomix_ros.imaging.preprocess import INPUT_SIZE, PREPROCESSING_ID, normalization_constants
from dinomix_ros.model.checkpoint import LoadedModel

__all__ = [
    "INPUT_LAYOUTS",
    "ONNX_OPSET",
    "OnnxExportError",
    "export_onnx",
    "read_onnx_metadata",
    "onnx_input_shape",
]

_logger = logging.getLogger(__name__)

#: Accepted input layouts of an exported file (see the module docstring).
INPUT_LAYOUTS = ("uint8_nhwc", "float32_nchw")
ONNX_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "descriptors"
_META_PREFIX = "dinomix."


class OnnxExportError(ValueError):
    """An export that cannot be made or an ONNX file that does not fit the model it is used with."""


class _Uint8Model(nn.Module):
    """uint8 (B, 224, 224, 3) RGB -> descriptors: the preprocessing's normalisation plus the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        mean, std = normalization_constants("cpu")
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div(255.0)  # (B, H, W, 3) uint8 -> (B, 3, H, W) in [0, 1]
        return self.model((x - self.mean) / self.std)


def onnx_input_shape(layout: str, batch: int) -> tuple[int, ...]:
    """The input shape of an exported file of ``layout`` for ``batch`` images."""
    if layout == "uint8_nhwc":
        return (batch, INPUT_SIZE, INPUT_SIZE, 3)
    if layout == "float32_nchw":
        return (batch, 3, INPUT_SIZE, INPUT_SIZE)
    raise OnnxExportError(f"input layout must be one of {', '.join(INPUT_LAYOUTS)}, got {layout!r}")


def export_onnx(loaded: LoadedModel, path: str | Path, *, input: str = "uint8_nhwc",
                opset: int = ONNX_OPSET) -> Path:
    """Write ``loaded`` as an ONNX file (float32 weights, dynamic batch) with its fingerprint in the metadata.

    Args:
        loaded: the model (from :func:`~dinomix_ros.model.load_model` or :func:`~dinomix_ros.model.random_model`).
        path: the ``.onnx`` file to write (atomically).
        input: ``uint8_nhwc`` (default) or ``float32_nchw`` (see the module docstring).
        opset: ONNX opset (>= 17 for LayerNormalization as one op).

    Returns:
        ``path``.

    Raises:
        OnnxExportError: an unknown layout or an opset below 17.
        ImportError: the ``onnx`` package is missing (the message says how to install it).
    """
    onnx = _import_onnx()
    shape = onnx_input_shape(input, 2)
    if opset < 17:
        raise OnnxExportError(f"opset {opset} is too old: LayerNormalization needs >= 17; use {ONNX_OPSET}")
    from dinomix_ros.util.files import atomic_path

    path = Path(path)
    weights_dtypes = {p.dtype for p in loaded.model.parameters()}
    if weights_dtypes != {torch.float32}:
        raise OnnxExportError(f"the model's weights are {sorted(map(str, weights_dtypes))}, not float32 (an Encoder "
                              "converted them): export from a freshly loaded model")
    # A CPU copy: the caller's model may live on a GPU, and must stay where it is.
    model = copy.deepcopy(loaded.model).cpu().eval().requires_grad_(False)
    wrapped = _Uint8Model(model) if input == "uint8_nhwc" else model
    example = (torch.zeros(shape, dtype=torch.uint8) if input == "uint8_nhwc" else torch.zeros(shape)).contiguous()
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated and that tracing turns shape checks into constants
        # (they are: the model takes 224x224 only, and the batch axis stays dynamic through dynamic_axes).
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, example, str(tmp), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        proto = onnx.load(str(tmp))
        # Tracing leaves the descriptor width symbolic (it comes out of a reshape): state it for the runtimes.
        proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = loaded.model.descriptor_dim
        metadata = _metadata(loaded, input)
        del proto.metadata_props[:]
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.doc_string = f"DINO-Mix {loaded.spec.model_name} exported by dinomix_ros (input {input})"
        onnx.save(proto, str(tmp))
    _logger.info("exported %s (fingerprint %s, input %s, opset %d) to %s", loaded.spec.model_name,
                 loaded.fingerprint.id, input, opset, path)
    return path


def _metadata(loaded: LoadedModel, layout: str) -> dict[str, str]:
    return {
        f"{_META_PREFIX}fingerprint": json.dumps(loaded.fingerprint.to_dict(), sort_keys=True),
        f"{_META_PREFIX}fingerprint_id": loaded.fingerprint.id,
        f"{_META_PREFIX}preprocessing": PREPROCESSING_ID,
        f"{_META_PREFIX}input": layout,
        f"{_META_PREFIX}architecture": loaded.spec.model_name,
        f"{_META_PREFIX}descriptor_dim": str(loaded.model.descriptor_dim),
    }


def read_onnx_metadata(custom: dict[str, str], source: str) -> dict[str, Any]:
    """The ``dinomix.*`` metadata of an exported file (as ONNX Runtime's ``custom_metadata_map`` gives it).

    Returns:
        {"fingerprint": dict, "preprocessing": str, "input": str, "architecture": str, "descriptor_dim": int}

    Raises:
        OnnxExportError: the file was not exported by :func:`export_onnx` (keys missing or malformed).
    """
    try:
        meta = {
            "fingerprint": json.loads(custom[f"{_META_PREFIX}fingerprint"]),
            "preprocessing": custom[f"{_META_PREFIX}preprocessing"],
            "input": custom[f"{_META_PREFIX}input"],
            "architecture": custom[f"{_META_PREFIX}architecture"],
            "descriptor_dim": int(custom[f"{_META_PREFIX}descriptor_dim"]),
        }
    except (KeyError, ValueError) as exc:
        raise OnnxExportError(f"{source} has no dinomix metadata ({exc}): it was not made by `dinomix model "
                              "export`; export it again from the checkpoint") from exc
    if meta["input"] not in INPUT_LAYOUTS:
        raise OnnxExportError(f"{source}: unknown input layout {meta['input']!r}; expected one of "
                              f"{', '.join(INPUT_LAYOUTS)}")
    return meta


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("ONNX export needs the onnx package: pip install onnx (pinned in requirements.txt)") from exc
    return onnx
