"""Loading, verifying and saving DINO-Mix weights; the model fingerprint that maps record.

Three file kinds load (spec: shared/spec/model.md, "Weight files that must load"):

* an official DINO-Mix checkpoint (``.ckpt``): a PyTorch Lightning dict with ``state_dict``, or a bare state dict,
  keys ``backbone.dino_model.*`` and ``aggregator.*``; loaded whole and strictly;
* an official DINOv2 backbone file (``dinov2_vit?14_pretrain.pth``): backbone keys without prefix plus ``norm.*``
  (ignored); the aggregator is then untrained, which is logged loudly: descriptors are not DINO-Mix descriptors;
* this project's own format (``.safetensors`` written by :func:`save_model`), which carries its fingerprint.

Checkpoints are untrusted input: pickle files are read with ``torch.load(weights_only=True, map_location="cpu")``
and an explicit allow-list of the harmless globals Lightning writes; there is no unsafe fallback.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from dinomix_ros.model.dinomix import VARIANTS, BackboneSpec, DinoMix, build_model, init_random_weights
from dinomix_ros.imaging.preprocess import PREPROCESSING_ID
from dinomix_ros.settings import SettingError, check, setting

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "UnsafeCheckpointError",
    "CheckpointMismatchError",
    "ModelFingerprint",
    "LoadedModel",
    "ModelSource",
    "load_model",
    "random_model",
    "save_model",
    "read_weights_file",
    "infer_variant",
    "compute_fingerprint",
]

_logger = logging.getLogger(__name__)

DINOMIX_PREFIX = "backbone.dino_model."
OWN_FORMAT = "dinomix_ros.model"
OWN_FORMAT_VERSION = 1
# Seed of the (untrained) aggregator built next to a bare DINOv2 backbone: fixed so that the same backbone file
# always gives the same model, the same fingerprint and maps that stay loadable.
UNTRAINED_AGGREGATOR_SEED = 0


class CheckpointError(ValueError):
    """A weights file that cannot be used as DINO-Mix weights."""


class CheckpointNotFoundError(FileNotFoundError):
    """The weights file does not exist."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint needs globals outside the allow-list; loading it could run arbitrary code."""


class CheckpointMismatchError(CheckpointError):
    """Keys or shapes in the file do not fit any DINO-Mix model."""


@dataclass(frozen=True)
class ModelFingerprint:
    """What made a descriptor: architecture, exact weights and preprocessing.

    Two models give interchangeable descriptors iff their fingerprint ids are equal. The runtime dtype (float32/
    float16/bfloat16) is deliberately not part of it: it changes descriptors only at the 1e-4 cosine level.
    """

    architecture: str
    weights_sha256: str
    preprocessing: str
    descriptor_dim: int

    @property
    def id(self) -> str:
        text = f"{self.architecture}|{self.weights_sha256}|{self.preprocessing}|{self.descriptor_dim}"
        return "dmx-" + hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "architecture": self.architecture,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing,
            "descriptor_dim": self.descriptor_dim,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ModelFingerprint:
        try:
            fp = cls(
                architecture=str(data["architecture"]),
                weights_sha256=str(data["weights_sha256"]),
                preprocessing=str(data["preprocessing"]),
                descriptor_dim=int(data["descriptor_dim"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"malformed fingerprint {data!r}: {exc}") from exc
        if "id" in data and data["id"] != fp.id:
            raise CheckpointError(f"fingerprint id {data['id']} does not match its fields (expected {fp.id})")
        return fp


@dataclass
class LoadedModel:
    """A ready model plus where it came from."""

    model: DinoMix
    fingerprint: ModelFingerprint
    source_format: str  # "dinomix-lightning", "dinomix-state-dict", "dinov2-pretrain", OWN_FORMAT or "random"
    source: Path | None
    aggregator_trained: bool

    @property
    def spec(self) -> BackboneSpec:
        return self.model.spec

    def describe(self) -> dict:
        """JSON-able summary for logs, ``dinomix model info`` and diagnostics."""
        return {
            "architecture": self.spec.model_name,
            "backbone": self.spec.name,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "descriptor_dim": self.model.descriptor_dim,
            "source": str(self.source) if self.source else None,
            "source_format": self.source_format,
            "aggregator_trained": self.aggregator_trained,
            "fingerprint": self.fingerprint.to_dict(),
        }


# --------------------------------------------------------------------------------------------------------------------
# Reading files


def _allowed_globals() -> list:
    """Globals that Lightning checkpoints pickle besides tensors; all are plain data containers."""
    allowed: list = [argparse.Namespace, collections.Counter]
    # Lightning's AttributeDict (hyper_parameters) is a plain dict subclass; the weights-only unpickler fills only
    # dict-like classes it knows, so it is rebuilt as an OrderedDict (Lightning need not be installed).
    for name in (
        "lightning.fabric.utilities.data.AttributeDict",
        "lightning_fabric.utilities.data.AttributeDict",
        "pytorch_lightning.utilities.parsing.AttributeDict",
    ):
        allowed.append((collections.OrderedDict, name))
    try:  # numpy scalars and dtypes appear in callback and scheduler states
        import numpy as np

        allowed += [np.dtype, type(np.dtype("float64")), type(np.dtype("float32")), type(np.dtype("int64"))]
        core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core
        scalar = getattr(core.multiarray, "scalar", None)
        if scalar is not None:  # under its own name, and under numpy 1's / numpy 2's for files from either
            allowed += [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    except (ImportError, AttributeError):  # pragma: no cover - numpy is a hard dependency of torch here
        pass
    return allowed


#: Leading bytes of files that are often passed by mistake, and what they are (for the error message).
_KNOWN_MAGIC = (
    (b"version https://git-lfs", "a Git LFS pointer, not the weights themselves (run `git lfs pull`)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x89HDF", "an HDF5 file (Keras/TensorFlow weights?)"),
)
_ZIP_MAGIC = b"PK\x03\x04"
_BLOCKED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_LIGHTNING_ATTRIBUTE_DICT = "AttributeDict"


def _what_is(head: bytes) -> str:
    """What a file that is no weights file looks like, from its first bytes: a known format, text or binary."""
    for magic, what in _KNOWN_MAGIC:
        if head.startswith(magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        page = " (an HTML page: a failed download?)" if text.lstrip()[:15].lower().startswith(("<!doctype", "<html")) \
            else ""
        return f"a text file{page} starting {first!r}"
    return "binary data starting " + head[:8].hex(" ")


def _is_pickle(head: bytes) -> bool:
    # Protocol 2+ pickles start with PROTO (0x80) and the protocol number; legacy torch.save files are such pickles.
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _check_zip(path: Path, size: int) -> None:
    """A zip-format torch checkpoint must be a complete zip archive holding ``<name>/data.pkl``."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path} is a truncated or damaged zip archive ({size} bytes; {exc}); torch.save "
                              "writes complete zip archives: copy or download the file again") from None
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl; it holds "
                              f"{_few(names, 3)}); expected a file written by torch.save")


def _sniff(path: Path) -> str:
    """The kind of a weights file from its first bytes: ``safetensors``, ``zip`` or ``pickle``.

    Raises:
        CheckpointNotFoundError: no such path.
        CheckpointError: a directory, an empty file, a damaged zip, or a file of another kind (named).
    """
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; expected a weights file (.ckpt, .pth or .safetensors)")
    if not path.exists():
        raise CheckpointNotFoundError(f"weights file {path} does not exist")
    if not path.is_file():  # never opened: a FIFO would block, a device never end
        raise CheckpointError(f"{path} is not a regular file (a FIFO or device?); pass the weights file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish; fetch it again")
    with open(path, "rb") as f:
        head = f.read(64)
    if _looks_like_safetensors(head):
        return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        _check_zip(path, size)
        return "zip"
    if _is_pickle(head):
        return "pickle"
    raise CheckpointError(f"{path} is not a weights file: it is {_what_is(head)}; expected a PyTorch checkpoint "
                          "(.ckpt/.pth written by torch.save) or a .safetensors file. Check the path")


def _torch_load(path: Path, kind: str) -> object:
    """``torch.load`` with ``weights_only=True`` and the allow-list; never falls back to full unpickling.

    torch's own warnings (pickle protocol notes, advice to pass ``weights_only=False``) are logged at debug level:
    they are not for users, and the advice is the opposite of this module's policy.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return _torch_load_allowed(path)
        except pickle.UnpicklingError as exc:
            raise _unpickling_error(path, kind, exc) from None
        except EOFError:
            raise CheckpointError(f"{path} ends too early: the file is truncated; copy or download it again") \
                from None
        except Exception as exc:  # the unpickler fails in many ways (KeyError, IndexError...) on damaged data
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path} is a damaged PyTorch {'archive' if kind == 'zip' else 'pickle'} "
                                  f"({type(exc).__name__}: {reason}): copy or download it again") from None
        finally:
            for w in caught:
                _logger.debug("torch warned while loading %s: %s", path, w.message)


def _torch_load_allowed(path: Path) -> object:
    kwargs: dict = {"map_location": "cpu", "weights_only": True}
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if safe_globals is None:
        # torch 2.4 has only the process-wide add_safe_globals, without renamed stand-ins (Lightning's
        # AttributeDict stays refused: convert such files once with `dinomix model convert` on torch >= 2.5);
        # older torch has no allow-list, and weights_only alone still refuses every non-tensor global.
        add = getattr(torch.serialization, "add_safe_globals", None)
        if add is not None:
            add([g for g in _allowed_globals() if not isinstance(g, tuple)])
        return torch.load(path, **kwargs)
    with safe_globals(_allowed_globals()):
        try:
            return torch.load(path, mmap=True, **kwargs)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, **kwargs)


def _unpickling_error(path: Path, kind: str, exc: Exception) -> CheckpointError:
    """An unsafe pickle (naming the globals it needs, with advice that works on this torch), or a pickle that is
    not a checkpoint."""
    blocked = _blocked_globals(path) or sorted(set(_BLOCKED_GLOBAL.findall(str(exc))))
    if blocked:
        return UnsafeCheckpointError(
            f"{path} pickles Python objects that safe loading does not allow ({', '.join(blocked)}): loading it "
            f"could run arbitrary code, so it is refused. {_unsafe_advice(path, blocked)}")
    return CheckpointError(
        f"{path} is a Python pickle that safe loading cannot read ({_unpickler_reason(exc)}); it is not a "
        f"{'PyTorch checkpoint' if kind == 'pickle' else 'checkpoint written by torch.save'}. Check the path")


def _unsafe_advice(path: Path, blocked: list[str], *, has_safe_globals: bool | None = None) -> str:
    """What to do about an unsafe checkpoint, with the torch installed here (``has_safe_globals``: torch >= 2.5)."""
    if has_safe_globals is None:
        has_safe_globals = hasattr(torch.serialization, "safe_globals")
    if not has_safe_globals and all(name.endswith(_LIGHTNING_ATTRIBUTE_DICT) for name in blocked):
        return (f"Only Lightning's hyper-parameters block it, which torch {torch.__version__} cannot allow safely: "
                f"convert it once on a machine with torch >= 2.5 (`dinomix model convert {path} "
                "dinomix.safetensors`) and use the .safetensors file here")
    return ("If you trust the file, extract its weights once (this runs the pickled code): python -c \"import torch; "
            f"c = torch.load('{path}', weights_only=False); torch.save({{'state_dict': c.get('state_dict', c)}}, "
            "'weights.ckpt')\", then use weights.ckpt")


def _unpickler_reason(exc: Exception) -> str:
    """The line of torch's (multi-line, advice-laden) refusal that says what was refused, e.g. "Trying to load
    unsupported GLOBAL posix.system whose module posix is blocked." (torch's advice to load unsafely is dropped)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for key in ("GLOBAL", "Unsupported"):  # the refused global or instruction, when torch names it
        for line in lines:
            if key in line and not line.startswith("Please file an issue"):
                return line.split(" Please ")[0]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            reason = line.split("WeightsUnpickler error:", 1)[-1].strip() or (lines[i + 1] if i + 1 < len(lines)
                                                                              else "")
            return reason or type(exc).__name__
    return lines[0] if lines else type(exc).__name__


def _blocked_globals(path: Path) -> list[str]:
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return []
    try:
        allowed = {name if isinstance(name, str) else f"{name.__module__}.{name.__qualname__}"
                   for name in (g[1] if isinstance(g, tuple) else g for g in _allowed_globals())}
        return sorted(set(finder(path)) - allowed)
    except Exception:  # best effort, only for the message: legacy (non-zip) files are not supported by the finder
        return []


def read_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict]:
    """Read a weights file into a flat state dict.

    Returns:
        (state_dict, kind, extra): kind is "safetensors", "lightning" or "state_dict"; extra holds the
        safetensors metadata (own format) or the Lightning checkpoint's top-level keys.

    Raises:
        CheckpointNotFoundError: no such file.
        UnsafeCheckpointError: the pickle needs globals outside the allow-list.
        CheckpointError: unreadable or not a state dict.
    """
    path = Path(path)
    kind = _sniff(path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path), device="cpu"), "safetensors", meta
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    obj = _torch_load(path, kind)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a state dict or a Lightning checkpoint")
    if isinstance(obj.get("state_dict"), dict):
        extra = {k: v for k, v in obj.items() if k != "state_dict" and isinstance(v, (str, int, float))}
        state, kind = obj["state_dict"], "lightning"
    else:
        state, kind, extra = obj, "state_dict", {}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries {bad[:5]} are not tensors; expected a state dict of tensors")
    return dict(state), kind, extra


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length followed by a JSON object.
    return len(head) >= 9 and head[8:9] == b"{"


# --------------------------------------------------------------------------------------------------------------------
# Interpreting state dicts


def infer_variant(state_dict: dict[str, torch.Tensor], prefix: str = "") -> BackboneSpec:
    """Find the backbone variant from tensor shapes: width from ``cls_token``, depth from the block indices."""
    cls = state_dict.get(prefix + "cls_token")
    if cls is None:
        raise CheckpointMismatchError(f"no '{prefix}cls_token' tensor: not a DINOv2 / DINO-Mix state dict")
    width = int(cls.shape[-1])
    pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := pattern.match(k))), default=-1)
    ffn = "swiglu" if f"{prefix}blocks.0.mlp.w12.weight" in state_dict else "mlp"
    for spec in VARIANTS.values():
        if (spec.embed_dim, spec.depth, spec.ffn_layer) == (width, depth, ffn):
            return spec
    known = ", ".join(f"{s.name} (width {s.embed_dim}, {s.depth} blocks, {s.ffn_layer})" for s in VARIANTS.values())
    raise CheckpointMismatchError(
        f"no DINO-Mix backbone has width {width}, {depth} blocks and a {ffn} feed-forward; known: {known}"
    )


def _check_keys(expected: dict[str, torch.Tensor], provided: dict[str, torch.Tensor], path: Path | None,
                allow_missing_prefix: str | None = None) -> None:
    missing = sorted(k for k in expected if k not in provided
                     and not (allow_missing_prefix and k.startswith(allow_missing_prefix)))
    unexpected = sorted(k for k in provided if k not in expected)
    shapes = sorted(f"{k}: file {tuple(provided[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in provided if k in expected and provided[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches {_few(shapes)}")
    if problems:
        where = f"{path}" if path else "state dict"
        raise CheckpointMismatchError(f"{where} does not fit a DINO-Mix model: " + "; ".join(problems))


def _few(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{f', ... ({len(items) - n} more)' if len(items) > n else ''}]"


def _init_untrained_aggregator(aggregator: nn.Module) -> None:
    # MixVPR's own init (truncated normal std 0.02, zero bias, LayerNorm 1/0), seeded for reproducibility.
    gen = torch.Generator().manual_seed(UNTRAINED_AGGREGATOR_SEED)
    with torch.no_grad():
        for module in aggregator.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_((torch.randn(module.weight.shape, generator=gen) * 0.02).clamp_(-0.04, 0.04))
                module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


# --------------------------------------------------------------------------------------------------------------------
# Public API


def compute_fingerprint(model: DinoMix) -> ModelFingerprint:
    """sha256 over every persistent tensor (float32, names sorted) + architecture + preprocessing."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}:{tuple(data.shape)}\n".encode())
        digest.update(data.numpy().tobytes())
    return ModelFingerprint(model.spec.model_name, digest.hexdigest(), PREPROCESSING_ID, model.descriptor_dim)


def load_model(path: str | Path, *, expected_variant: str | None = None) -> LoadedModel:
    """Load DINO-Mix weights from any supported file into a CPU float32 model in eval mode.

    Args:
        path: official DINO-Mix ``.ckpt``, DINOv2 ``*_pretrain.pth`` or a ``.safetensors`` file from save_model.
        expected_variant: refuse a file of another backbone (e.g. "vitb14"); None accepts any.

    Raises:
        CheckpointNotFoundError, UnsafeCheckpointError, CheckpointMismatchError, CheckpointError.
    """
    path = Path(path)
    state, kind, extra = read_weights_file(path)
    if kind == "safetensors" and extra.get("format") != OWN_FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not one written by dinomix_ros (metadata {extra})")
    if any(k.startswith(DINOMIX_PREFIX) for k in state):
        aggregator_trained = True
        source_format = {"lightning": "dinomix-lightning", "state_dict": "dinomix-state-dict"}.get(kind, OWN_FORMAT)
    elif "cls_token" in state and "blocks.0.norm1.weight" in state:
        if any(k.startswith("register_tokens") for k in state):
            raise CheckpointMismatchError(f"{path} is a DINOv2 backbone with register tokens; DINO-Mix uses none")
        aggregator_trained, source_format = False, "dinov2-pretrain"
        state = {DINOMIX_PREFIX + k: v for k, v in state.items() if not k.startswith(("norm.", "head."))}
    else:
        raise CheckpointMismatchError(
            f"{path} has neither 'backbone.dino_model.*' keys (DINO-Mix) nor 'cls_token'/'blocks.*' keys (DINOv2); "
            f"first keys: {_few(sorted(state), 5)}"
        )
    spec = infer_variant(state, DINOMIX_PREFIX)
    if expected_variant is not None:
        want = build_model(expected_variant, device="meta").spec
        if want != spec:
            raise CheckpointMismatchError(f"{path} holds a {spec.name} model, but {want.name} was asked for")

    model = build_model(spec.name, device="meta")
    _check_keys(model.state_dict(), state, path, allow_missing_prefix=None if aggregator_trained else "aggregator.")
    model = model.to_empty(device="cpu")
    if not aggregator_trained:
        _init_untrained_aggregator(model.aggregator)
    model.load_state_dict(state, strict=aggregator_trained)  # post-hook recomputes grid_pos_embed
    model.eval().requires_grad_(False)
    fingerprint = compute_fingerprint(model)
    if kind == "safetensors":
        stored = ModelFingerprint.from_dict(json.loads(extra.get("fingerprint", "{}")))
        if stored.id != fingerprint.id:
            raise CheckpointError(f"{path}: weights do not match the fingerprint stored in the file "
                                  f"({fingerprint.id} vs {stored.id}): the file was modified or corrupted")
        aggregator_trained = extra.get("aggregator_trained", "true") == "true"
        source_format = extra.get("source_format", OWN_FORMAT)
    if not aggregator_trained:
        if source_format == "random":
            message = f"{path} holds RANDOM weights (tests/demos): similarity scores are meaningless"
        else:
            message = (f"{path} is a DINOv2 backbone without a trained MixVPR aggregator: descriptors are NOT "
                       "DINO-Mix descriptors and place recognition will be poor. Use an official DINO-Mix .ckpt.")
        _logger.warning(message)
        warnings.warn(message, stacklevel=2)
    _logger.info("loaded %s from %s (%s, fingerprint %s)", spec.model_name, path, source_format, fingerprint.id)
    return LoadedModel(model, fingerprint, source_format, path, aggregator_trained)


def random_model(variant: str = "vits14", seed: int = 0) -> LoadedModel:
    """A model with seeded random weights, for tests and demos (its descriptors carry no place information)."""
    model = init_random_weights(build_model(variant), seed).eval().requires_grad_(False)
    _logger.warning("using RANDOM weights (%s, seed %d): similarity scores are meaningless", model.spec.name, seed)
    return LoadedModel(model, compute_fingerprint(model), "random", None, aggregator_trained=False)


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from (node parameters ``model.*``, CLI flags ``--checkpoint``, ``--random-weights``)."""

    SETTINGS_GROUP: ClassVar[str] = "model"

    checkpoint: str = setting("", "DINO-Mix .ckpt, DINOv2 *_pretrain.pth or .safetensors weights (required unless "
                                  "model.random_weights)", reconfigure=True)
    random_weights: bool = setting(False, "seeded random weights instead of a checkpoint: tests and demos only, "
                                          "scores are meaningless", reconfigure=True)
    variant: str = setting("vits14", "backbone of the random weights",
                           choices=tuple(v.removeprefix("dinov2_") for v in VARIANTS), reconfigure=True)
    seed: int = setting(0, "seed of the random weights", min=0, max=2**31 - 1, reconfigure=True)

    def __post_init__(self) -> None:
        check(self)
        if self.random_weights and self.checkpoint:
            raise SettingError("model.checkpoint", "model.checkpoint and model.random_weights are both set: choose "
                                                   "one")

    def load(self) -> LoadedModel:
        """The model this source names.

        Raises:
            SettingError: neither a checkpoint nor random weights.
            CheckpointError / CheckpointNotFoundError: a bad or missing weights file.
        """
        if self.random_weights:
            return random_model(self.variant, self.seed)
        if not self.checkpoint:
            raise SettingError("model.checkpoint", "model.checkpoint is empty: set it to a DINO-Mix .ckpt (or set "
                                                   "model.random_weights:=true for tests and demos)")
        return load_model(self.checkpoint)


def save_model(loaded: LoadedModel, path: str | Path) -> Path:
    """Write the model as ``.safetensors`` with its fingerprint (no pickle); atomic via a temporary file."""
    from safetensors.torch import save_file

    from dinomix_ros.util.files import atomic_path

    path = Path(path)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in loaded.model.state_dict().items()}
    metadata = {
        "format": OWN_FORMAT,
        "version": str(OWN_FORMAT_VERSION),
        "architecture": loaded.spec.model_name,
        "source_format": loaded.source_format,
        "aggregator_trained": "true" if loaded.aggregator_trained else "false",
        "fingerprint": json.dumps(loaded.fingerprint.to_dict()),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path
