"""DINOv2 ViT/14 backbone as DINO-Mix uses it (spec: shared/spec/model.md, section "Forward pass").

Module and parameter names are the checkpoint format of facebookresearch/dinov2 (``patch_embed.proj``,
``blocks.{i}.attn.qkv``, ``ls1.gamma``, ``mlp.w12`` ...), so official files load strictly with no renaming.
Differences from the DINOv2 repository, all required by DINO-Mix: no final ``norm`` and no ``head`` (both are
identity in DINO-Mix), the forward pass returns the last block's patch tokens (cls dropped), and only 224x224
inputs are accepted, so the position embedding is resampled once (``refresh_pos_embed``) instead of per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PATCH_SIZE",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "SwiGLUFFN",
    "LayerScale",
    "Block",
    "DinoVisionTransformer",
    "resample_pos_embed",
]

PATCH_SIZE = 14
# DINOv2 pretraining resolution: pos_embed holds a 37x37 grid (518 / 14) plus the cls position.
PRETRAIN_GRID = 37
# DINOv2's "historical kludge" (interpolate_pos_encoding): scale by (grid + 0.1) / 37 rather than to the size.
INTERPOLATE_OFFSET = 0.1


class PatchEmbed(nn.Module):
    """Non-overlapping 14x14 patches -> tokens, row-major."""

    def __init__(self, embed_dim: int, in_chans: int = 3, patch_size: int = PATCH_SIZE) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, H/14, W/14)
        return x.flatten(2).transpose(1, 2)  # (B, HW, C)


class Attention(nn.Module):
    """Multi-head self-attention; ``qkv`` rows are [q; k; v], scale head_dim ** -0.5."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # default scale is head_dim ** -0.5
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (ViT-S/B/L)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward (ViT-g): ``w3(silu(x1) * x2)`` with ``x1, x2 = w12(x).chunk(2)``.

    ``hidden_dim`` is the size after the gate (4096 for ViT-g, DINOv2's ``SwiGLUFFNFused`` rounding of 2/3 * 4C).
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel residual scale ``gamma``."""

    def __init__(self, dim: int, init_value: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, dim: int, num_heads: int, ffn_layer: str, ffn_hidden_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        if ffn_layer == "mlp":
            self.mlp: nn.Module = Mlp(dim, ffn_hidden_dim)
        elif ffn_layer == "swiglu":
            self.mlp = SwiGLUFFN(dim, ffn_hidden_dim)
        else:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected 'mlp' or 'swiglu'")
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's ``interpolate_pos_encoding`` for a square ``grid`` x ``grid`` patch grid.

    Args:
        pos_embed: (1, 1 + M*M, C) stored embedding (M = 37 for the released DINOv2 weights).
        grid: patches per side of the input (16 for 224x224).

    Returns:
        (1, 1 + grid*grid, C) embedding in the dtype of ``pos_embed``; computed in float32 like DINOv2.
    """
    n_stored = pos_embed.shape[1] - 1
    side = int(round(n_stored**0.5))
    if side * side != n_stored:
        raise ValueError(f"pos_embed holds {n_stored} patch positions, not a square grid")
    if side == grid:
        return pos_embed
    pe = pos_embed.float()
    cls_pos, patch_pos = pe[:, :1], pe[:, 1:]
    dim = pe.shape[-1]
    scale = (grid + INTERPOLATE_OFFSET) / side
    patch_pos = F.interpolate(
        patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),  # (1, C, M, M)
        mode="bicubic",
        scale_factor=(scale, scale),
        align_corners=False,
        antialias=False,
    )
    if patch_pos.shape[-2:] != (grid, grid):
        raise ValueError(f"pos_embed resampling gave {tuple(patch_pos.shape[-2:])}, expected ({grid}, {grid})")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat((cls_pos, patch_pos), dim=1).to(pos_embed.dtype)


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT/14 without register tokens, final norm or head; returns the last block's patch tokens.

    Args:
        embed_dim: token width C.
        depth: number of blocks (all of them run).
        num_heads: attention heads (C / 64).
        ffn_layer: ``"mlp"`` (GELU) or ``"swiglu"``.
        ffn_hidden_dim: hidden width of the feed-forward layer.
        input_size: the only accepted input side in pixels (224 for DINO-Mix).
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        ffn_layer: str,
        ffn_hidden_dim: int,
        input_size: int = 224,
    ) -> None:
        super().__init__()
        if input_size % PATCH_SIZE:
            raise ValueError(f"input_size {input_size} is not a multiple of the patch size {PATCH_SIZE}")
        self.embed_dim = embed_dim
        self.input_size = input_size
        self.grid = input_size // PATCH_SIZE
        self.patch_embed = PatchEmbed(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + PRETRAIN_GRID * PRETRAIN_GRID, embed_dim))
        # Present in every DINOv2 / DINO-Mix file (masked-image pretraining); never used at inference.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, ffn_layer, ffn_hidden_dim) for _ in range(depth))
        # pos_embed resampled to the input grid; derived from pos_embed, so not saved in state dicts.
        self.register_buffer("grid_pos_embed", torch.zeros(1, 1 + self.grid * self.grid, embed_dim), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module.refresh_pos_embed())
        self.refresh_pos_embed()

    @torch.no_grad()
    def refresh_pos_embed(self) -> None:
        """Recompute ``grid_pos_embed`` from ``pos_embed``.

        Runs after ``load_state_dict``; call it yourself after changing ``pos_embed`` in place.
        """
        resampled = resample_pos_embed(self.pos_embed.detach(), self.grid)
        self.grid_pos_embed = resampled.to(device=self.pos_embed.device, dtype=self.pos_embed.dtype).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) normalised RGB -> (B, 256, C) patch tokens of the last block."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"DINO-Mix takes (B, 3, {self.input_size}, {self.input_size}) inputs, got {tuple(x.shape)}; "
                "resize whole images with dinomix_ros.imaging.preprocess first"
            )
        x = self.patch_embed(x)  # (B, 256, C)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.grid_pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x[:, 1:]  # drop cls -> (B, 256, C)
