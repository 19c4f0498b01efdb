"""The runtimes that execute the model: PyTorch (eager plus CUDA graphs) and ONNX Runtime (CPU, CUDA, TensorRT).

:class:`~dinomix_ros.model.encoder.Encoder` keeps its API whatever runs the model; it hands a backend uint8
(B, 224, 224, 3) RGB batches (:meth:`TorchBackend.forward`) and gets (B, D) float32 descriptors back. The setting
``model.backend`` picks one (:func:`make_backend`); the backend says what it runs on in :meth:`info` (logged, in
``describe_info`` and /diagnostics).

ONNX Runtime runs a file from ``dinomix model export`` (``model.onnx``), refused unless its metadata carries the
loaded model's fingerprint; with no file the loaded model is exported to a temporary file at start-up. Providers:
on a CUDA device TensorRT (float16 when the dtype is float16; engines cached beside the ONNX file), then CUDA, then
the CPU, as far as the installed ONNX Runtime has them (the PyPI ``onnxruntime`` wheel is CPU-only; JetPack and
``onnxruntime-gpu`` have the others); on the CPU the CPU provider.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinomix_ros.imaging.preprocess import normalization_constants, normalize
from dinomix_ros.model.checkpoint import LoadedModel
from dinomix_ros.model.cuda_graphs import GraphCache
from dinomix_ros.model.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxExportError,
    export_onnx,
    onnx_input_shape,
    read_onnx_metadata,
)

__all__ = ["BACKENDS", "TorchBackend", "OnnxRuntimeBackend", "make_backend"]

_logger = logging.getLogger(__name__)

#: ``model.backend`` values.
BACKENDS = ("torch", "onnxruntime")
#: Largest batch the torch backend replays as a CUDA graph: the cameras of a robot, not map-building batches
#: (bound by arithmetic, not launches; one graph per size would hold memory for every last partial batch).
GRAPH_MAX_BATCH = 8


class TorchBackend:
    """The PyTorch model on its device and dtype; CUDA graphs per batch size on CUDA when enabled.

    Args:
        loaded: the model; its module is moved to ``device`` and ``dtype`` (in place).
        device: where it runs.
        dtype: torch dtype of weights and activations.
        cuda_graphs: replay captured graphs (CUDA only).
    """

    name = "torch"

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype, cuda_graphs: bool) -> None:
        self.device = device
        self.dtype = dtype
        self.model = loaded.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self._norm = normalization_constants(device)  # made once: no host copies inside CUDA-graph capture
        graphs = device.type == "cuda" and cuda_graphs
        self.graphs = GraphCache(device, max_graphs=GRAPH_MAX_BATCH) if graphs else None  # one per batch size
        # On-device preprocessing, one per camera image shape (a folder of photos of many sizes runs the rest eagerly)
        self.preprocess_graphs = GraphCache(device, max_graphs=8) if graphs else None

    @property
    def input_device(self) -> torch.device:
        """Where :meth:`forward` wants its input (and where on-device preprocessing runs)."""
        return self.device

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def info(self) -> dict[str, Any]:
        count = len(self.graphs) + len(self.preprocess_graphs) if self.graphs is not None else 0
        return {"backend": self.name, "providers": [], "cuda_graphs": count}

    def forward(self, batch_u8: torch.Tensor) -> np.ndarray:
        """uint8 (B, 224, 224, 3) RGB (host or ``input_device``) -> (B, D) float32 descriptors."""
        out = None
        if self.graphs is not None and batch_u8.shape[0] <= GRAPH_MAX_BATCH:
            out = self.graphs.run(("model", batch_u8.shape[0]), self.forward_device, batch_u8)
        if out is None:
            if batch_u8.device != self.device:
                batch_u8 = batch_u8.to(self.device, non_blocking=True)
            out = self.forward_device(batch_u8)
        return out.cpu().numpy()

    def forward_device(self, batch_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 224, 224, 3) on the device -> float32 (B, D) on the device (capturable: no host copies)."""
        with self._precision_guard():
            return self.model(normalize(batch_u8, self.dtype, self._norm))

    def _precision_guard(self) -> contextlib.AbstractContextManager:
        # cuDNN may run float32 convolutions in TF32 by default; the float32 path must give float32 results.
        if self.device.type == "cuda" and self.dtype == torch.float32:
            return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
        return contextlib.nullcontext()


class OnnxRuntimeBackend:
    """An ONNX Runtime session on an exported file of the loaded model.

    Args:
        loaded: the model the file must have been exported from (fingerprint checked; exported when no file).
        device: CUDA: the GPU providers where installed; CPU: the CPU provider.
        dtype: float32, or float16 (TensorRT's float16 mode; other providers run the file's float32).
        onnx_path: the exported file; empty: export ``loaded`` to a temporary file now.
        max_batch: the largest batch TensorRT builds its engine for.

    Raises:
        ImportError: onnxruntime is not installed (the message says how to install it).
        FileNotFoundError: ``onnx_path`` does not exist.
        OnnxExportError: the file was made from other weights or has no dinomix metadata.
    """

    name = "onnxruntime"

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: str, onnx_path: str = "",
                 max_batch: int = 32) -> None:
        ort = _import_onnxruntime()
        self.device = device
        with tempfile.TemporaryDirectory(prefix="dinomix-onnx-") as tmp:
            if onnx_path:
                path = Path(onnx_path)
                if not path.is_file():
                    raise FileNotFoundError(f"model.onnx {path} does not exist; make it with `dinomix model export "
                                            "CHECKPOINT OUT.onnx` or leave model.onnx empty to export at start-up")
                cache = path.with_name(path.name + ".trt_cache")
            else:
                path = export_onnx(loaded, Path(tmp) / f"{loaded.spec.model_name}.onnx")
                cache = None
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Idle intra-op threads sleep instead of spinning: the node's other threads (DDS, callbacks, search)
            # share the cores; measured on the 2-core build machine under load, batch-1 ViT-S p50 598 -> 501 ms.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            providers = _providers(ort.get_available_providers(), device, dtype, cache, max_batch, path)
            # ONNX Runtime reads the whole file (weights included) here; the temporary export can go afterwards.
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        meta = read_onnx_metadata(self.session.get_modelmeta().custom_metadata_map, str(path))
        if meta["fingerprint"].get("id") != loaded.fingerprint.id:
            raise OnnxExportError(f"{path} was exported from model {meta['fingerprint'].get('id')} "
                                  f"({meta['architecture']}), but the loaded weights are {loaded.fingerprint.id} "
                                  f"({loaded.spec.model_name}): export it again from this checkpoint")
        self.layout = meta["input"]
        self.source = str(path) if onnx_path else "exported at start-up"
        self.providers = self.session.get_providers()
        trt = self.providers[0] == "TensorrtExecutionProvider"
        self.dtype_name = "float16" if dtype == "float16" and trt else "float32"
        if device.type == "cuda" and self.providers[0] == "CPUExecutionProvider":
            _logger.warning("onnxruntime %s has no CUDA or TensorRT provider (available: %s): the model runs on the "
                            "CPU. Install onnxruntime-gpu (or JetPack's onnxruntime) for the GPU", ort.__version__,
                            ", ".join(ort.get_available_providers()))
        if dtype != self.dtype_name:
            _logger.warning("onnxruntime runs the exported float32 graph with %s: %s asked for, %s used",
                            self.providers[0], dtype, self.dtype_name)
        self._norm = normalization_constants("cpu")
        _logger.info("onnxruntime %s: %s, providers %s, input %s", ort.__version__, self.source,
                     ", ".join(self.providers), self.layout)

    @property
    def input_device(self) -> torch.device:
        """ONNX Runtime takes host arrays (it copies them to its device itself)."""
        return torch.device("cpu")

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "providers": list(self.providers), "onnx": self.source, "cuda_graphs": 0}

    def forward(self, batch_u8: torch.Tensor) -> np.ndarray:
        """uint8 (B, 224, 224, 3) RGB host tensor -> (B, D) float32 descriptors."""
        batch_u8 = batch_u8.cpu()
        if self.layout == "uint8_nhwc":
            feed = np.ascontiguousarray(batch_u8.numpy())
        else:
            feed = normalize(batch_u8, torch.float32, self._norm).numpy()
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: feed})[0]


def _providers(available: list[str], device: torch.device, dtype: str, cache: Path | None, max_batch: int,
               path: Path) -> list[Any]:
    """ONNX Runtime providers (with options) for ``device``, best first, among those installed."""
    chosen: list[Any] = []
    if device.type == "cuda":
        index = device.index or 0
        if "TensorrtExecutionProvider" in available:
            trt: dict[str, Any] = {"device_id": index, "trt_fp16_enable": dtype == "float16"}
            layout = _peek_layout(path)
            if layout is not None:  # one engine for batches 1..max_batch instead of a rebuild per new batch size
                dims = "x".join(map(str, onnx_input_shape(layout, 1)[1:]))
                trt.update(trt_profile_min_shapes=f"{INPUT_NAME}:1x{dims}",
                           trt_profile_opt_shapes=f"{INPUT_NAME}:1x{dims}",
                           trt_profile_max_shapes=f"{INPUT_NAME}:{max_batch}x{dims}")
            if cache is not None:  # building an engine takes minutes on a Jetson: keep it beside the ONNX file
                trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache))
            chosen.append(("TensorrtExecutionProvider", trt))
        if "CUDAExecutionProvider" in available:
            chosen.append(("CUDAExecutionProvider", {"device_id": index}))
    chosen.append("CPUExecutionProvider")
    return chosen


def _peek_layout(path: Path) -> str | None:
    """The input layout in the file's metadata, when the onnx package is there to read it without a session."""
    try:
        import onnx
    except ImportError:
        return None
    custom = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return custom.get("dinomix.input")


def make_backend(name: str, loaded: LoadedModel, device: torch.device, dtype: str, *, cuda_graphs: bool = True,
                 onnx_path: str = "", max_batch: int = 32) -> TorchBackend | OnnxRuntimeBackend:
    """The backend ``name`` (one of :data:`BACKENDS`) for the loaded model.

    Raises:
        ValueError: an unknown backend name.
        ImportError, FileNotFoundError, OnnxExportError: see :class:`OnnxRuntimeBackend`.
    """
    if name == "torch":
        return TorchBackend(loaded, device, getattr(torch, dtype), cuda_graphs)
    if name == "onnxruntime":
        return OnnxRuntimeBackend(loaded, device, dtype, onnx_path, max_batch)
    raise ValueError(f"model.backend must be one of {', '.join(BACKENDS)}, got {name!r}")


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("model.backend onnxruntime needs the onnxruntime package: pip install onnxruntime (CPU; "
                          "onnxruntime-gpu or JetPack's wheel for CUDA/TensorRT)") from exc
    return onnxruntime
