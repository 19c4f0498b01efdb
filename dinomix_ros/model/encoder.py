"""Inference engine: images in, (N, 4096) float32 DINO-Mix descriptors out, on CUDA or CPU.

* ``device="auto"`` picks CUDA when PyTorch sees a GPU, else the CPU, and says which in the log.
* ``dtype`` float32 / float16 / bfloat16 sets the weights and activations; the final L2 normalisation is always float32.
* :meth:`Encoder.describe_stream` is the one batch pipeline (map building): worker threads decode and resize the
  batch being filled while one model thread describes the previous batch; at most two batches are in flight, so memory
  stays bounded whatever the number of images; batches come back in input order. :meth:`Encoder.describe` runs a list
  of images through it.
* :meth:`Encoder.describe_one` is the low-latency path of the live node. On CUDA it replays a CUDA graph captured
  once for batch 1 (normalisation included), which removes the kernel-launch overhead that bounds eager batch-1
  inference; if capture fails it logs why and stays eager.
* One lock serialises the model, so a node may call the encoder from a worker thread while a service thread builds
  maps with it.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

import numpy as np
import torch

from dinomix_ros.imaging.decode import ImageDecodeError
from dinomix_ros.model.checkpoint import LoadedModel, ModelFingerprint, load_model, random_model
from dinomix_ros.settings import SettingError, check, setting
from dinomix_ros.util.dtypes import FLOAT_DTYPES, torch_dtype
from dinomix_ros.util.progress import progress_bar
from dinomix_ros.imaging.preprocess import (
    INPUT_SIZE,
    ImageConfig,
    ImageInput,
    load_input,
    normalization_constants,
    normalize,
    resize_to_input,
)

__all__ = ["EncoderConfig", "Encoder", "DescribedBatch", "resolve_device"]

_logger = logging.getLogger(__name__)

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")
# A bad input, not a bug: describe_stream reports these per item (the batch goes on); anything else propagates.
_ITEM_ERRORS = (ImageDecodeError, FileNotFoundError)

T = TypeVar("T")


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA if available else CPU; "cuda" without a GPU is an error that says so."""
    if device == "auto":
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        where = torch.cuda.get_device_name(chosen) if chosen.type == "cuda" else "no CUDA device visible"
        _logger.info("device auto -> %s (%s)", chosen, where)
        return chosen
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU "
                         f"(torch {torch.__version__}); use device 'auto' or 'cpu'")
    if chosen.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return chosen


@dataclass(frozen=True)
class EncoderConfig:
    """How to run the model (node parameters ``model.*``, CLI flags ``--device``, ``--dtype``, ...)."""

    SETTINGS_GROUP: ClassVar[str] = "model"

    device: str = setting("auto", "auto (CUDA if available, else CPU), cpu or cuda[:N]", nonempty=True,
                          reconfigure=True)
    dtype: str = setting("float32", "inference precision of weights and activations (descriptors are always "
                                    "float32)", choices=FLOAT_DTYPES, reconfigure=True)
    cuda_graphs: bool = setting(True, "replay a captured CUDA graph for each image (CUDA only; lower latency)",
                                reconfigure=True)
    batch_size: int = setting(32, "images per forward pass when describing many images", min=1, max=4096)
    workers: int = setting(2, "threads that decode and resize images for batched describing", min=1, max=64)

    def __post_init__(self) -> None:
        check(self)
        if not _DEVICE_RE.match(self.device):
            raise SettingError("model.device", f"model.device must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass(frozen=True, eq=False)  # holds an array: compare its fields explicitly
class DescribedBatch(Generic[T]):
    """One batch of :meth:`Encoder.describe_stream`: consecutive input items, in input order.

    Attributes:
        descriptors: (B, D) float32 descriptors of the items of the batch that could be read, in input order.
        tags: the tag of each row of ``descriptors``.
        failed: (tag, exception) of each item that could not be decoded or resized (ImageDecodeError,
            FileNotFoundError), in input order.
    """

    descriptors: np.ndarray
    tags: list[T]
    failed: list[tuple[T, Exception]]

    def __len__(self) -> int:
        """Input items in this batch, described or failed."""
        return len(self.tags) + len(self.failed)


class Encoder:
    """DINO-Mix descriptors for images.

    Args:
        loaded: a model from :func:`~dinomix_ros.model.load_model` or :func:`~dinomix_ros.model.random_model`.
        config: device, dtype, batching.
        image: how images become model input (16-bit range).
    """

    def __init__(self, loaded: LoadedModel, config: EncoderConfig | None = None,
                 image: ImageConfig | None = None) -> None:
        self.config = config or EncoderConfig()
        self.image = image or ImageConfig()
        self.loaded = loaded
        self.device = resolve_device(self.config.device)
        self.dtype = torch_dtype(self.config.dtype)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            _logger.warning("float16 on the CPU is slow and no more accurate than bfloat16; prefer float32 on the CPU")
        self.model = loaded.model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self._norm = normalization_constants(self.device)  # made once: no host copies inside CUDA-graph capture
        self._lock = threading.Lock()
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_in: torch.Tensor | None = None
        self._graph_out: torch.Tensor | None = None
        self._graph_host: torch.Tensor | None = None
        self._graph_failed = False
        _logger.info("encoder: %s on %s in %s (fingerprint %s)", loaded.spec.model_name, self.device,
                     self.config.dtype, loaded.fingerprint.id)

    # ---------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, config: EncoderConfig | None = None,
                        image: ImageConfig | None = None) -> Encoder:
        return cls(load_model(path), config, image)

    @classmethod
    def from_random(cls, variant: str = "vits14", seed: int = 0, config: EncoderConfig | None = None,
                    image: ImageConfig | None = None) -> Encoder:
        """Seeded random weights (tests, demos): descriptors carry no place information."""
        return cls(random_model(variant, seed), config, image)

    @property
    def fingerprint(self) -> ModelFingerprint:
        return self.loaded.fingerprint

    @property
    def descriptor_dim(self) -> int:
        return self.model.descriptor_dim

    def gpu_memory_mib(self) -> float:
        """GPU memory allocated by torch on the encoder's device in MiB (NaN on the CPU)."""
        if self.device.type != "cuda":
            return float("nan")
        return torch.cuda.memory_allocated(self.device) / 2**20

    def describe_info(self) -> dict:
        """JSON-able summary (for logs, diagnostics and benchmark output)."""
        info = self.loaded.describe()
        info.update(device=str(self.device), dtype=self.config.dtype, cuda_graph=self._graph is not None,
                    device_name=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu")
        return info

    # ---------------------------------------------------------------------------------------------------------------
    def prepare(self, image: ImageInput, encoding: str | None = None) -> np.ndarray:
        """Decode (bytes, paths) and resize one image to (224, 224, 3) uint8 RGB; thread-safe, model-free."""
        return resize_to_input(*load_input(image, encoding, self.image.max_pixels), range16=self.image.range16)

    @torch.inference_mode()
    def describe_prepared(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, 224, 224, 3) uint8 RGB -> (B, D) float32 descriptors, in one forward pass."""
        batch_t = torch.as_tensor(batch)
        if batch_t.ndim == 3:
            batch_t = batch_t[None]
        if batch_t.dtype != torch.uint8 or batch_t.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"describe_prepared takes (B, {INPUT_SIZE}, {INPUT_SIZE}, 3) uint8 RGB, got "
                             f"{tuple(batch_t.shape)} {batch_t.dtype}; use prepare() first")
        with self._lock:
            if self.device.type == "cuda":
                batch_t = batch_t.pin_memory().to(self.device, non_blocking=True)
            out = self._forward_u8(batch_t)
            return out.cpu().numpy()

    def describe_one(self, image: ImageInput, encoding: str | None = None) -> np.ndarray:
        """Low-latency descriptor (D,) float32 of one image (CUDA-graph replay on CUDA when enabled)."""
        prepared = self.prepare(image, encoding)
        if self.device.type == "cuda" and self.config.cuda_graphs and not self._graph_failed:
            # the graph belongs to self.device: make it current (cuda:1 on a multi-GPU robot)
            with self._lock, torch.inference_mode(), torch.cuda.device(self.device):
                if self._graph is None:
                    self._capture_graph()
                if self._graph is not None:
                    self._graph_host.copy_(torch.from_numpy(prepared))
                    self._graph_in.copy_(self._graph_host, non_blocking=True)
                    self._graph.replay()
                    return self._graph_out.cpu().numpy()[0]
        return self.describe_prepared(prepared)[0]

    def describe(
        self,
        images: Sequence[ImageInput],
        encoding: str | None = None,
        *,
        batch_size: int | None = None,
        progress: bool = False,
        skip_errors: bool = False,
        desc: str = "describe",
    ) -> np.ndarray:
        """(N, D) float32 descriptors of many images, in input order (through :meth:`describe_stream`).

        Args:
            images: arrays, encoded bytes or file paths.
            encoding: encoding of array inputs (see :func:`~dinomix_ros.imaging.preprocess.load_input`).
            batch_size: images per forward pass (default: config.batch_size).
            progress: show a progress bar.
            skip_errors: on an undecodable image log a warning and return a NaN row instead of raising.
            desc: progress-bar label.

        Returns:
            (N, D) float32 descriptors; row i describes ``images[i]`` (NaN when it was skipped).

        Raises:
            ImageDecodeError / FileNotFoundError: a bad input (message names its index), unless skip_errors.
        """
        n = len(images)
        out = np.full((n, self.descriptor_dim), np.nan, dtype=np.float32)
        items = ((images[i], encoding, i) for i in range(n))
        bar = progress_bar(n, desc, progress)
        try:
            with contextlib.closing(self.describe_stream(items, batch_size=batch_size or None)) as batches:
                for batch in batches:
                    for i, exc in batch.failed:
                        if not skip_errors:
                            raise type(exc)(f"image {i} ({_name(images[i])}): {exc}") from exc
                        _logger.warning("skipping image %d (%s): %s", i, _name(images[i]), exc)
                    if batch.tags:
                        out[batch.tags] = batch.descriptors
                    bar.update(len(batch))
        finally:
            bar.close()
        return out

    def describe_stream(
        self,
        items: Iterable[tuple[ImageInput, str | None, T]],
        *,
        batch_size: int | None = None,
    ) -> Iterator[DescribedBatch[T]]:
        """Describe a stream of images batch by batch, decoding and resizing them while the model runs.

        Each run of ``batch_size`` consecutive items is one batch (the last may be shorter). ``config.workers``
        threads decode and resize (:meth:`prepare`) the items of the batch being filled while one model thread
        describes the previous batch. At most two batches are in flight (one in the model, one being filled), so
        memory stays bounded by about two batches whatever the length of ``items``: items are pulled lazily, on the
        caller's thread, as the returned iterator advances (a generator may decode, log or count there). An item
        that cannot be decoded or resized (ImageDecodeError, FileNotFoundError) is reported in its batch's
        ``failed`` and the batch goes on without it.

        Stopping early: close the iterator (``contextlib.closing``) or drop it; closing cancels the work queued and
        waits for the batch in the model. After an error the batches not yet handed over are dropped.

        Args:
            items: (image, encoding, tag) triples: an array, encoded bytes or a file path; the encoding of an array
                (see :func:`~dinomix_ros.imaging.preprocess.load_input`; None otherwise); any tag, returned with
                the item's descriptor or failure.
            batch_size: items per forward pass (default: config.batch_size).

        Returns:
            An iterator of :class:`DescribedBatch`, one per batch, in input order. Descriptors equal
            :meth:`describe_prepared` of the stacked good items of the batch.

        Raises:
            ValueError: ``batch_size`` < 1 (raised at the call, not at the first batch).
            Exception: any other error of ``items``, :meth:`prepare` or the model propagates from the iterator, at
                the batch where it happened.
        """
        bs = self.config.batch_size if batch_size is None else batch_size
        if isinstance(bs, bool) or not isinstance(bs, numbers.Integral) or bs < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {bs!r}; pass None for config.batch_size "
                             f"({self.config.batch_size})")
        return self._stream(items, int(bs))

    def _stream(self, items: Iterable[tuple[ImageInput, str | None, T]], bs: int) -> Iterator[DescribedBatch[T]]:
        prep = ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="dinomix-prep")
        model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinomix-model")
        filling: list[tuple[Future, T]] = []
        in_model: deque[Future] = deque()
        try:
            for image, encoding, tag in items:
                filling.append((prep.submit(self.prepare, image, encoding), tag))
                if len(filling) == bs:
                    in_model.append(model.submit(self._describe_batch, filling))
                    filling = []
                    if len(in_model) > 1:  # the next batch is queued: hand the previous one over before filling more
                        yield in_model.popleft().result()
            if filling:
                in_model.append(model.submit(self._describe_batch, filling))
                filling = []
            while in_model:
                yield in_model.popleft().result()
        finally:
            # Early exit (an error, a closed iterator): drop queued work, then wait for the threads.
            prep.shutdown(wait=False, cancel_futures=True)
            model.shutdown(wait=True, cancel_futures=True)
            prep.shutdown(wait=True)

    def _describe_batch(self, batch: list[tuple[Future, T]]) -> DescribedBatch[T]:
        """Model thread: wait for a batch's prepared images and describe the good ones in one forward pass."""
        arrays, tags, failed = [], [], []
        for fut, tag in batch:
            try:
                arrays.append(fut.result())
                tags.append(tag)
            except _ITEM_ERRORS as exc:
                failed.append((tag, exc))
        if arrays:
            descriptors = self.describe_prepared(np.stack(arrays))
        else:
            descriptors = np.empty((0, self.descriptor_dim), dtype=np.float32)
        return DescribedBatch(descriptors, tags, failed)

    def warmup(self) -> None:
        """Run the model once (and capture the CUDA graph) so the first real image is not slow."""
        self.describe_one(np.zeros((INPUT_SIZE, INPUT_SIZE, 3), np.uint8), "rgb8")

    # ---------------------------------------------------------------------------------------------------------------
    def _forward_u8(self, batch_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 224, 224, 3) on the model's device -> float32 (B, D); caller holds the lock."""
        with self._precision_guard():
            return self.model(normalize(batch_u8, self.dtype, self._norm))

    def _precision_guard(self) -> contextlib.AbstractContextManager:
        # cuDNN may run float32 convolutions in TF32 by default; the fp32 path must give fp32 results.
        if self.device.type == "cuda" and self.dtype == torch.float32:
            return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _capture_graph(self) -> None:
        try:
            t0 = time.perf_counter()
            static_in = torch.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), dtype=torch.uint8, device=self.device)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm up kernels and allocator outside the graph
                    self._forward_u8(static_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._forward_u8(static_in)
            self._graph, self._graph_in, self._graph_out = graph, static_in, static_out
            self._graph_host = torch.empty_like(static_in, device="cpu").pin_memory()
            _logger.info("captured the batch-1 CUDA graph in %.2f s", time.perf_counter() - t0)
        except Exception as exc:  # any capture failure means: run eager
            self._graph_failed = True
            self._graph = None
            _logger.warning("CUDA graph capture failed, running eager: %s", exc)


def _name(item: object) -> str:
    if isinstance(item, (str, Path)):
        return str(item)
    if isinstance(item, np.ndarray):
        return f"array {tuple(item.shape)} {item.dtype}"
    return type(item).__name__
