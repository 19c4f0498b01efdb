"""DINO-Mix = DINOv2 ViT/14 backbone + MixVPR aggregator; the variant table and its one builder."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from dinomix_ros.model.aggregator import MixVPR
from dinomix_ros.model.backbone import PATCH_SIZE, DinoVisionTransformer
from dinomix_ros.imaging.preprocess import INPUT_SIZE  # the only input size DINO-Mix was trained and is evaluated at

__all__ = [
    "BackboneSpec",
    "VARIANTS",
    "DESCRIPTOR_DIM",
    "INPUT_SIZE",
    "DinoV2Backbone",
    "DinoMix",
    "build_model",
    "init_random_weights",
    "resolve_variant",
    "variant_names",
]

GRID = INPUT_SIZE // PATCH_SIZE  # 16 patches per side -> 256 tokens
AGG_OUT_CHANNELS = 1024
AGG_OUT_ROWS = 4
AGG_MIX_DEPTH = 2
AGG_MLP_RATIO = 1.0
DESCRIPTOR_DIM = AGG_OUT_CHANNELS * AGG_OUT_ROWS  # 4096


@dataclass(frozen=True)
class BackboneSpec:
    """Dimensions of one DINOv2 ViT/14 backbone (dinov2/models/vision_transformer.py: vit_small ... vit_giant2)."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    ffn_layer: str  # "mlp" (exact GELU) or "swiglu"
    ffn_hidden_dim: int

    @property
    def model_name(self) -> str:
        """Name of the DINO-Mix model on this backbone, e.g. ``dinomix_vitb14``."""
        return self.name.replace("dinov2_", "dinomix_")


VARIANTS: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("dinov2_vits14", 384, 12, 6, "mlp", 1536),
        BackboneSpec("dinov2_vitb14", 768, 12, 12, "mlp", 3072),
        BackboneSpec("dinov2_vitl14", 1024, 24, 16, "mlp", 4096),
        # SwiGLU hidden width: DINOv2's SwiGLUFFNFused rounds 2/3 * 4 * 1536 up to a multiple of 8 -> 4096.
        BackboneSpec("dinov2_vitg14", 1536, 40, 24, "swiglu", 4096),
    )
}


def variant_names() -> list[str]:
    """Accepted variant names: ``dinov2_vits14`` ... and their short forms ``vits14``, ``s`` ..."""
    return sorted(VARIANTS)


def resolve_variant(name: str) -> BackboneSpec:
    """Look a variant up by ``dinov2_vitb14``, ``dinomix_vitb14``, ``vitb14`` or ``b``."""
    key = name.lower().replace("dinomix_", "dinov2_")
    for spec in VARIANTS.values():
        if key in (spec.name, spec.name.removeprefix("dinov2_"), spec.name[len("dinov2_vit")]):
            return spec
    raise ValueError(f"unknown DINO-Mix variant {name!r}; expected one of {variant_names()} (or s, b, l, g)")


class DinoV2Backbone(nn.Module):
    """Holds the ViT as ``dino_model``, which gives the official ``backbone.dino_model.*`` key names."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        self.dino_model = DinoVisionTransformer(
            spec.embed_dim, spec.depth, spec.num_heads, spec.ffn_layer, spec.ffn_hidden_dim, input_size=INPUT_SIZE
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dino_model(x)


class DinoMix(nn.Module):
    """(B, 3, 224, 224) ImageNet-normalised RGB -> (B, 4096) L2-normalised float32 descriptors."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = DinoV2Backbone(spec)
        self.aggregator = MixVPR(
            in_channels=spec.embed_dim,
            in_h=GRID,
            in_w=GRID,
            out_channels=AGG_OUT_CHANNELS,
            mix_depth=AGG_MIX_DEPTH,
            mlp_ratio=AGG_MLP_RATIO,
            out_rows=AGG_OUT_ROWS,
        )

    @property
    def descriptor_dim(self) -> int:
        return self.aggregator.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(x)  # (B, 256, C), row-major patch order
        return self.aggregator(tokens.transpose(1, 2))  # (B, C, 256) -> (B, 4096)


def build_model(variant: str, *, device: torch.device | str | None = None) -> DinoMix:
    """Build an uninitialised DINO-Mix model (``device="meta"`` builds shapes only, allocating nothing)."""
    spec = resolve_variant(variant)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return DinoMix(spec)


@torch.no_grad()
def init_random_weights(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter with seeded random values (tests and demos: descriptors are then meaningless).

    Linear/conv weights ~ N(0, 0.02), biases ~ N(0, 0.02), LayerNorm weights ~ 1 + N(0, 0.1), layer-scale gammas
    ~ U(0.1, 1), tokens and position embedding ~ N(0, 0.02): every parameter matters, so comparisons against an
    independent implementation exercise all of them. The global RNG is left untouched.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    for name, param in module.named_parameters():
        if name.endswith(".gamma"):
            values = torch.rand(param.shape, generator=gen) * 0.9 + 0.1
        elif isinstance(_owner(module, name), nn.LayerNorm) and name.endswith(".weight"):
            values = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
        else:
            values = 0.02 * torch.randn(param.shape, generator=gen)
        param.copy_(values.to(param.dtype))
    for sub in module.modules():
        if isinstance(sub, DinoVisionTransformer):
            sub.refresh_pos_embed()
    return module


def _owner(root: nn.Module, param_name: str) -> nn.Module:
    return root.get_submodule(param_name.rpartition(".")[0])
