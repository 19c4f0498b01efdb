"""DINO-Mix model: DINOv2 backbone (backbone.py), MixVPR aggregator (aggregator.py), variants (dinomix.py) and
weight files (checkpoint.py)."""

from dinomix_ros.model.aggregator import MixVPR
from dinomix_ros.model.backbone import DinoVisionTransformer
from dinomix_ros.model.checkpoint import (
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
from dinomix_ros.model.dinomix import DESCRIPTOR_DIM, VARIANTS, DinoMix, build_model, init_random_weights

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
