"""Inference engine: images in, (N, 4096) float32 DINO-Mix descriptors out, on CUDA or CPU.

* ``device="auto"`` picks CUDA when PyTorch sees a GPU, else the CPU, and says which in the log.
* ``dtype`` auto (default; :mod:`~dinomix_ros.model.precision`: float16 on CUDA, on the CPU the faster of float32 and
  bfloat16) or float32 / float16 / bfloat16 sets the weights and activations; the final L2 normalisation is always
  float32.
* ``backend`` torch or onnxruntime runs the model (:mod:`~dinomix_ros.model.backends`); the API is the same.
* ``preprocess``: where the resize runs. host: the exact path of :func:`~dinomix_ros.imaging.preprocess.
  resize_to_input` (default on the CPU); device: the raw frame goes to the model's device once and is resized there
  (default on CUDA with the torch backend; one grey level from the host path on ~1% of pixels).
* :meth:`Encoder.describe_stream` is the one batch pipeline (map building): worker threads decode and stage the
  batch being filled while one model thread describes the previous batch; at most two batches are in flight, so
  memory stays bounded whatever the number of images; batches come back in input order. :meth:`Encoder.describe`
  runs a list of images through it.
* :meth:`Encoder.describe_staged` describes the frames of several cameras in one forward pass (the live node);
  :meth:`Encoder.describe_one` is its one-image form. On CUDA the model replays a CUDA graph captured per batch
  size (up to 8) and the on-device preprocessing one per camera image shape, which removes the kernel-launch
  overhead that bounds small batches; if a capture fails it logs why and that step stays eager.
* One lock serialises the model, so a node may call the encoder from a worker thread while a service thread builds
  maps with it.
"""

from __future__ import annotations

import contextlib
import functools
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
from dinomix_ros.imaging.preprocess import (
    INPUT_SIZE,
    PREPROCESS_PLACES,
    ImageConfig,
    ImageInput,
    StagedImage,
    load_input,
    pixels_tensor,
    resize_on_device,
    resize_to_input,
    stage_for_device,
)
from dinomix_ros.model.backends import BACKENDS, TorchBackend, make_backend
from dinomix_ros.model.checkpoint import LoadedModel, ModelFingerprint, load_model, random_model
from dinomix_ros.model.precision import DtypeChoice, choose_dtype
from dinomix_ros.settings import SettingError, check, setting
from dinomix_ros.util.dtypes import MODEL_DTYPES, torch_dtype
from dinomix_ros.util.progress import progress_bar

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
    dtype: str = setting("auto", "inference precision of weights and activations (descriptors are always float32); "
                                 "auto: float16 on CUDA, on the CPU the faster of float32 and bfloat16 (logged)",
                         choices=MODEL_DTYPES, reconfigure=True)
    cuda_graphs: bool = setting(True, "replay captured CUDA graphs (model per batch size, preprocessing per camera "
                                      "image shape; CUDA with the torch backend only; lower latency)",
                                reconfigure=True)
    backend: str = setting("torch", "what runs the model: torch, or onnxruntime (TensorRT/CUDA providers where "
                                    "installed, else CPU)", choices=BACKENDS, reconfigure=True)
    onnx: str = setting("", "ONNX file from `dinomix model export` for backend onnxruntime (checked against the "
                            "weights' fingerprint); empty: export the loaded weights at start-up", reconfigure=True)
    preprocess: str = setting("auto", "where images are resized and normalised: host (exact), device (the model's "
                                      "device, one grey level from host on ~1% of pixels) or auto (device on CUDA "
                                      "with the torch backend, else host)", choices=PREPROCESS_PLACES,
                              reconfigure=True)
    batch_size: int = setting(32, "images per forward pass when describing many images", min=1, max=4096)
    workers: int = setting(2, "threads that decode (and resize, on the host) images for batched describing", min=1,
                           max=64)

    def __post_init__(self) -> None:
        check(self)
        if not _DEVICE_RE.match(self.device):
            raise SettingError("model.device", f"model.device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.backend == "onnxruntime" and self.dtype == "bfloat16":
            raise SettingError("model.dtype", "model.dtype bfloat16 does not apply to backend onnxruntime (it runs the "
                                              "exported float32 graph; float16 through TensorRT): use auto, float32 "
                                              "or float16")


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
        config: device, dtype, backend, batching.
        image: how images become model input (16-bit range).

    Raises:
        ValueError: a device that is not there.
        ImportError, FileNotFoundError, OnnxExportError: backend onnxruntime without the package or with a bad file.
    """

    def __init__(self, loaded: LoadedModel, config: EncoderConfig | None = None,
                 image: ImageConfig | None = None) -> None:
        self.config = config or EncoderConfig()
        self.image = image or ImageConfig()
        self.loaded = loaded
        self.device = resolve_device(self.config.device)
        if self.config.backend == "onnxruntime" and self.config.dtype == "auto":  # what ONNX Runtime can run
            on_cuda = self.device.type == "cuda"
            self.dtype_choice = DtypeChoice("float16" if on_cuda else "float32", "auto",
                                            "onnxruntime on CUDA: float16 (TensorRT's mode)" if on_cuda else
                                            "onnxruntime on the CPU: the exported float32 graph")
        else:
            self.dtype_choice = choose_dtype(self.config.dtype, self.device, loaded.model)
        if self.device.type == "cpu" and self.dtype_choice.dtype == "float16":
            _logger.warning("float16 on the CPU is slow and no more accurate than bfloat16; prefer float32 on the CPU")
        self.backend = make_backend(self.config.backend, loaded, self.device, self.dtype_choice.dtype,
                                    cuda_graphs=self.config.cuda_graphs, onnx_path=self.config.onnx,
                                    max_batch=self.config.batch_size)
        self.dtype = torch_dtype(self.backend.dtype_name)  # ONNX Runtime may run another precision than asked
        self.model = loaded.model
        place = self.config.preprocess
        if place == "auto":
            place = "device" if self.device.type == "cuda" and isinstance(self.backend, TorchBackend) else "host"
        self.preprocess_on = place
        self._staging: dict[tuple, torch.Tensor] = {}  # pinned host buffers per frame shape (CUDA uploads)
        self._lock = threading.Lock()
        _logger.info("encoder: %s on %s with %s in %s, preprocessing on the %s (fingerprint %s)",
                     loaded.spec.model_name, self.device, self.backend.name, self.dtype_name, self.preprocess_on,
                     loaded.fingerprint.id)

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

    @property
    def dtype_name(self) -> str:
        """The precision the model runs in (float32, float16 or bfloat16)."""
        return str(self.dtype).removeprefix("torch.")

    def gpu_memory_mib(self) -> float:
        """GPU memory allocated by torch on the encoder's device in MiB (NaN on the CPU)."""
        if self.device.type != "cuda":
            return float("nan")
        return torch.cuda.memory_allocated(self.device) / 2**20

    def describe_info(self) -> dict:
        """JSON-able summary (for logs, diagnostics and benchmark output)."""
        info = self.loaded.describe()
        backend = self.backend.info()
        info.update(device=str(self.device), dtype=self.dtype_name, dtype_requested=self.config.dtype,
                    dtype_reason=self.dtype_choice.reason, backend=backend.pop("backend"),
                    providers=backend.pop("providers"), preprocess=self.preprocess_on,
                    cuda_graph=backend.pop("cuda_graphs") > 0,
                    device_name=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                    **backend)
        return info

    # ---------------------------------------------------------------------------------------------------------------
    def prepare(self, image: ImageInput, encoding: str | None = None) -> np.ndarray:
        """Decode (bytes, paths) and resize one image to (224, 224, 3) uint8 RGB on the host (the exact path);
        thread-safe, model-free."""
        return resize_to_input(*load_input(image, encoding, self.image.max_pixels), range16=self.image.range16)

    def stage(self, image: ImageInput, encoding: str | None = None) -> StagedImage:
        """The host's share of preprocessing one image (thread-safe, model-free): decode and check it, then resize
        it here (``preprocess`` host) or leave the resize to :meth:`describe_staged` on the model's device.

        Raises:
            ImageDecodeError / FileNotFoundError: an undecodable or missing image, or an array that does not fit
                its encoding.
        """
        if self.preprocess_on == "host":
            return StagedImage(self.prepare(image, encoding), "rgb", resized=True)
        return stage_for_device(*load_input(image, encoding, self.image.max_pixels), range16=self.image.range16)

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
            return self.backend.forward(self._upload(batch_t))

    @torch.inference_mode()
    def describe_staged(self, frames: Sequence[StagedImage], timing: dict[str, float] | None = None) -> np.ndarray:
        """(B, D) float32 descriptors of staged images (:meth:`stage`), in one forward pass.

        The frames may differ in size and encoding (several cameras): each is resized on its own (on the model's
        device unless already resized), then all go through the model together. Row i describes ``frames[i]`` and
        equals what :meth:`describe_one` gives for that image.

        Args:
            frames: staged images (at least one).
            timing: if given, receives ``preprocess_s`` (the on-device resizes) and ``model_s`` (the forward pass
                and the copy back) in seconds; on CUDA the split is where the host waited, the sum is exact.
        """
        if not frames:
            raise ValueError("describe_staged got no frames")
        with self._lock:
            t0 = time.perf_counter()
            if all(f.resized for f in frames):
                batch = self._upload(torch.from_numpy(np.stack([f.pixels for f in frames])))
            else:
                batch = torch.empty((len(frames), INPUT_SIZE, INPUT_SIZE, 3), dtype=torch.uint8,
                                    device=self.backend.input_device)
                for i, frame in enumerate(frames):
                    batch[i].copy_(self._resize_staged(frame, slot=i))
            t1 = time.perf_counter()
            out = self.backend.forward(batch)
            if timing is not None:
                timing.update(preprocess_s=t1 - t0, model_s=time.perf_counter() - t1)
            return out

    def describe_one(self, image: ImageInput, encoding: str | None = None) -> np.ndarray:
        """Low-latency descriptor (D,) float32 of one image (CUDA-graph replay on CUDA when enabled)."""
        return self.describe_staged([self.stage(image, encoding)])[0]

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
        threads decode and stage (:meth:`stage`: resize on the host, or only check for the device) the items of the
        batch being filled while one model thread describes the previous batch. At most two batches are in flight
        (one in the model, one being filled), so memory stays bounded by about two batches whatever the length of
        ``items``: items are pulled lazily, on the caller's thread, as the returned iterator advances (a generator
        may decode, log or count there). An item that cannot be decoded or resized (ImageDecodeError,
        FileNotFoundError) is reported in its batch's ``failed`` and the batch goes on without it.

        Stopping early: close the iterator (``contextlib.closing``) or drop it; closing cancels the work queued and
        waits for the batch in the model. After an error the batches not yet handed over are dropped.

        Args:
            items: (image, encoding, tag) triples: an array, encoded bytes or a file path; the encoding of an array
                (see :func:`~dinomix_ros.imaging.preprocess.load_input`; None otherwise); any tag, returned with
                the item's descriptor or failure.
            batch_size: items per forward pass (default: config.batch_size).

        Returns:
            An iterator of :class:`DescribedBatch`, one per batch, in input order. Descriptors equal
            :meth:`describe_staged` of the good items of the batch (with host preprocessing:
            :meth:`describe_prepared` of their stacked :meth:`prepare` results).

        Raises:
            ValueError: ``batch_size`` < 1 (raised at the call, not at the first batch).
            Exception: any other error of ``items``, :meth:`stage` or the model propagates from the iterator, at
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
                filling.append((prep.submit(self.stage, image, encoding), tag))
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
        """Model thread: wait for a batch's staged images and describe the good ones in one forward pass."""
        staged, tags, failed = [], [], []
        for fut, tag in batch:
            try:
                staged.append(fut.result())
                tags.append(tag)
            except _ITEM_ERRORS as exc:
                failed.append((tag, exc))
        if staged:
            descriptors = self.describe_staged(staged)
        else:
            descriptors = np.empty((0, self.descriptor_dim), dtype=np.float32)
        return DescribedBatch(descriptors, tags, failed)

    def warmup(self) -> None:
        """Run the model once (and capture the batch-1 CUDA graph) so the first real image is not slow."""
        self.describe_one(np.zeros((INPUT_SIZE, INPUT_SIZE, 3), np.uint8), "rgb8")

    # ---------------------------------------------------------------------------------------------------------------
    def _upload(self, host: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """A host tensor on its way to the backend's input device: through a pinned buffer (asynchronous copy) on
        CUDA, as it is otherwise. Caller holds the lock: a buffer is reused per shape and ``slot`` (the frame's
        place in its batch, so two frames of one batch never share one while its copy may be in flight), and every
        call ends with a synchronising copy of the descriptors to the host."""
        if self.backend.input_device.type != "cuda":
            return host
        key = (tuple(host.shape), host.dtype, slot)
        pinned = self._staging.get(key)
        if pinned is None:
            if len(self._staging) >= 2 * self.config.batch_size + 16:  # sizes come and go: bound the pinned memory
                self._staging.clear()
            pinned = self._staging[key] = torch.empty(host.shape, dtype=host.dtype).pin_memory()
        pinned.copy_(host)
        return pinned

    def _resize_staged(self, frame: StagedImage, slot: int) -> torch.Tensor:
        """(224, 224, 3) uint8 of one staged frame on the backend's input device; caller holds the lock."""
        host = self._upload(pixels_tensor(frame.pixels), slot)
        if frame.resized:
            return host.to(self.backend.input_device, non_blocking=True)
        graphs = getattr(self.backend, "preprocess_graphs", None)
        if graphs is not None:
            key = ("preprocess", tuple(host.shape), host.dtype, frame.order, self.image.range16)
            out = graphs.run(key, functools.partial(resize_on_device, order=frame.order,
                                                    range16=self.image.range16), host)
            if out is not None:
                return out  # copied into the batch before the next replay of this graph
        return resize_on_device(host.to(self.backend.input_device, non_blocking=True), frame.order,
                                range16=self.image.range16)


def _name(item: object) -> str:
    if isinstance(item, (str, Path)):
        return str(item)
    if isinstance(item, np.ndarray):
        return f"array {tuple(item.shape)} {item.dtype}"
    return type(item).__name__
