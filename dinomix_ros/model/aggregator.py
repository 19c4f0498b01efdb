"""MixVPR aggregator (Ali-bey et al., WACV 2023) as configured by DINO-Mix.

Parameter names follow the MixVPR / DINO-Mix checkpoints: ``mix.{i}.mix.{0,1,3}``, ``channel_proj``, ``row_proj``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureMixerLayer", "MixVPR"]


class FeatureMixerLayer(nn.Module):
    """``x + Linear(ReLU(Linear(LayerNorm(x))))`` over the last (spatial) axis."""

    def __init__(self, in_dim: int, mlp_ratio: float = 1.0) -> None:
        super().__init__()
        hidden = int(in_dim * mlp_ratio)
        # Indices 0, 1, 3 are the checkpoint names (2 is the parameter-free ReLU).
        self.mix = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, in_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(x)


class MixVPR(nn.Module):
    """Feature-mixing aggregator: (B, C, H*W) feature maps -> (B, out_channels * out_rows) unit descriptors.

    Args:
        in_channels: backbone width C.
        in_h: feature-map height (16 for 224x224 DINOv2 inputs).
        in_w: feature-map width.
        out_channels: channel projection size (1024 in DINO-Mix).
        mix_depth: number of FeatureMixerLayers (2 in DINO-Mix).
        mlp_ratio: hidden ratio of the mixer MLPs (1 in DINO-Mix).
        out_rows: row projection size (4 in DINO-Mix); descriptor size is out_channels * out_rows.
    """

    def __init__(
        self,
        in_channels: int,
        in_h: int = 16,
        in_w: int = 16,
        out_channels: int = 1024,
        mix_depth: int = 2,
        mlp_ratio: float = 1.0,
        out_rows: int = 4,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.hw = in_h * in_w
        self.out_dim = out_channels * out_rows
        self.mix = nn.Sequential(*[FeatureMixerLayer(self.hw, mlp_ratio) for _ in range(mix_depth)])
        self.channel_proj = nn.Linear(in_channels, out_channels)
        self.row_proj = nn.Linear(self.hw, out_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) or (B, C, H*W) -> (B, out_channels * out_rows) float32, L2-normalised.

        Element ``4 * channel + row`` of the output is row ``row`` of projected channel ``channel``.
        """
        x = x.flatten(2)  # (B, C, HW)
        if x.shape[1:] != (self.in_channels, self.hw):
            raise ValueError(f"MixVPR expects (B, {self.in_channels}, {self.hw}) features, got {tuple(x.shape)}")
        x = self.mix(x)  # mixes along HW
        x = self.channel_proj(x.permute(0, 2, 1))  # (B, HW, C) -> (B, HW, out_channels)
        x = self.row_proj(x.permute(0, 2, 1))  # (B, out_channels, HW) -> (B, out_channels, out_rows)
        # Normalise in float32 whatever the compute dtype (fp16 norms of 4096 values lose digits).
        return F.normalize(x.flatten(1).float(), p=2, dim=-1)
