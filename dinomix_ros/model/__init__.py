"""DINO-Mix model: DINOv2 backbone (backbone.py), MixVPR aggregator (aggregator.py), variants (dinomix.py) and
weight files (checkpoint.py)."""

import torch

# with torch.device(...), weights_only loading, inference_mode and the uint8 antialiased resize need torch >= 2.0
# (Ubuntu 22.04's python3-torch is 1.8: install a PyTorch 2 wheel, or NVIDIA's on Jetson)
if tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < (2, 0):
    raise ImportError(f"dinomix_ros needs PyTorch >= 2.0, found {torch.__version__}: pip install 'torch>=2.0' (on a "
                      "Jetson, NVIDIA's wheel for your JetPack)")

from dinomix_ros.model.aggregator import MixVPR  # noqa: E402
from dinomix_ros.model.backbone import DinoVisionTransformer  # noqa: E402
from dinomix_ros.model.checkpoint import (  # noqa: E402
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    LoadedModel,
    ModelFingerprint,
    UnsafeCheckpointError,
    compute_fingerprint,
    load_model,
    random_model,
    save_model,
)
from dinomix_ros.model.dinomix import DESCRIPTOR_DIM, VARIANTS, DinoMix, build_model, init_random_weights  # noqa: E402

__all__ = [
    "DESCRIPTOR_DIM",
    "VARIANTS",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "DinoMix",
    "DinoVisionTransformer",
    "LoadedModel",
    "MixVPR",
    "ModelFingerprint",
    "UnsafeCheckpointError",
    "build_model",
    "compute_fingerprint",
    "init_random_weights",
    "load_model",
    "random_model",
    "save_model",
]
