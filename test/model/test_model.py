"""The DINO-Mix model against independent implementations (spec: shared/spec/model.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinomix_ros.model import DinoMix, MixVPR, build_model, init_random_weights
from dinomix_ros.model.backbone import resample_pos_embed
from dinomix_ros.model.dinomix import VARIANTS, resolve_variant

transformers = pytest.importorskip("transformers", reason="transformers is the independent backbone oracle")


def hf_dinov2_from(model: DinoMix) -> torch.nn.Module:
    """transformers' Dinov2Model carrying the same weights, with our pre-computed 16x16 position embedding.

    Key names are those of transformers 5.x (pinned in requirements-dev.txt).
    """
    spec = model.spec
    vit = model.backbone.dino_model
    config = transformers.Dinov2Config(
        hidden_size=spec.embed_dim,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.num_heads,
        mlp_ratio=spec.ffn_hidden_dim // spec.embed_dim,
        image_size=224,
        patch_size=14,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=spec.ffn_layer == "swiglu",
        attn_implementation="eager",
    )
    hf = transformers.Dinov2Model(config).eval()
    c = spec.embed_dim
    state = {
        "embeddings.cls_token": vit.cls_token,
        "embeddings.mask_token": vit.mask_token,
        # 224x224 -> 257 positions, so HF uses them as given (no resampling of its own)
        "embeddings.position_embeddings": vit.grid_pos_embed,
        "embeddings.patch_embeddings.projection.weight": vit.patch_embed.proj.weight,
        "embeddings.patch_embeddings.projection.bias": vit.patch_embed.proj.bias,
        "layernorm.weight": torch.ones(c),
        "layernorm.bias": torch.zeros(c),
    }
    for i, blk in enumerate(vit.blocks):
        p = f"encoder.layer.{i}."
        qw, kw, vw = blk.attn.qkv.weight.chunk(3, dim=0)
        qb, kb, vb = blk.attn.qkv.bias.chunk(3, dim=0)
        state.update({
            p + "norm1.weight": blk.norm1.weight, p + "norm1.bias": blk.norm1.bias,
            p + "attention.q_proj.weight": qw, p + "attention.q_proj.bias": qb,
            p + "attention.k_proj.weight": kw, p + "attention.k_proj.bias": kb,
            p + "attention.v_proj.weight": vw, p + "attention.v_proj.bias": vb,
            p + "attention.o_proj.weight": blk.attn.proj.weight,
            p + "attention.o_proj.bias": blk.attn.proj.bias,
            p + "layer_scale1.lambda1": blk.ls1.gamma,
            p + "norm2.weight": blk.norm2.weight, p + "norm2.bias": blk.norm2.bias,
            p + "mlp.fc1.weight": blk.mlp.fc1.weight, p + "mlp.fc1.bias": blk.mlp.fc1.bias,
            p + "mlp.fc2.weight": blk.mlp.fc2.weight, p + "mlp.fc2.bias": blk.mlp.fc2.bias,
            p + "layer_scale2.lambda1": blk.ls2.gamma,
        })
    hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return hf


@pytest.mark.parametrize("variant", ["dinov2_vits14", "dinov2_vitb14"])
def test_backbone_equals_transformers_dinov2(variant: str) -> None:
    model = init_random_weights(build_model(variant), seed=7).eval()
    hf = hf_dinov2_from(model)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ours = model.backbone(x)  # (B, 256, C), last block, no final norm, cls dropped
        out = hf(pixel_values=x, output_hidden_states=True)
        theirs = out.hidden_states[-1][:, 1:]  # output of the last layer, before HF's final layernorm
    assert ours.shape == (2, 256, VARIANTS[variant].embed_dim)
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-5, f"backbone differs from transformers' Dinov2Model by {diff}"
    # The spec's warning: HF's own pos-embed resampling (size=) differs from DINOv2's (scale_factor + 0.1).
    assert not torch.allclose(model.backbone.dino_model.grid_pos_embed, _resample_by_size(model), atol=1e-4)


def _resample_by_size(model: DinoMix) -> torch.Tensor:
    pe = model.backbone.dino_model.pos_embed.detach()
    patch = pe[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    patch = torch.nn.functional.interpolate(patch, size=(16, 16), mode="bicubic", align_corners=False)
    return torch.cat([pe[:, :1], patch.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1)


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                    np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))


def test_pos_embed_resampling_matches_a_numpy_bicubic_with_dinov2_offset() -> None:
    """DINOv2 rule: bicubic (a=-0.75, border clamp) with scale factor (16 + 0.1) / 37, i.e. source step 37/16.1."""
    rng = np.random.default_rng(0)
    dim = 5
    pe = rng.standard_normal((1, 1 + 37 * 37, dim)).astype(np.float32)
    grid = rng.standard_normal((37, 37, dim))
    pe[0, 1:] = grid.reshape(-1, dim)
    step = 37 / 16.1
    src = (np.arange(16) + 0.5) * step - 0.5
    base = np.floor(src).astype(int)
    frac = src - base
    weights = np.stack([_cubic(frac + 1), _cubic(frac), _cubic(1 - frac), _cubic(2 - frac)], axis=1)  # (16, 4)
    idx = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, 36)  # (16, 4)
    expected = np.einsum("ia,jb,iajbd->ijd", weights, weights, grid[idx[:, :, None, None], idx[None, None, :, :]])
    ours = resample_pos_embed(torch.from_numpy(pe), 16).numpy()
    assert ours.shape == (1, 257, dim)
    np.testing.assert_array_equal(ours[0, 0], pe[0, 0])  # cls position untouched
    np.testing.assert_allclose(ours[0, 1:].reshape(16, 16, dim), expected, atol=2e-5)


def test_pos_embed_is_recomputed_after_loading_weights() -> None:
    a = init_random_weights(build_model("s"), seed=1)
    b = init_random_weights(build_model("s"), seed=2)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.backbone.dino_model.grid_pos_embed, a.backbone.dino_model.grid_pos_embed)
    assert "backbone.dino_model.grid_pos_embed" not in a.state_dict()  # derived, never saved


def _mixvpr_by_hand(x: np.ndarray, agg: MixVPR) -> np.ndarray:
    """MixVPR in plain numpy loops: x (B, C, HW)."""
    p = {k: v.detach().double().numpy() for k, v in agg.state_dict().items()}
    out = []
    for b in range(x.shape[0]):
        feat = x[b].astype(np.float64)  # (C, HW)
        for i in range(len(agg.mix)):
            g, beta = p[f"mix.{i}.mix.0.weight"], p[f"mix.{i}.mix.0.bias"]
            w1, b1 = p[f"mix.{i}.mix.1.weight"], p[f"mix.{i}.mix.1.bias"]
            w2, b2 = p[f"mix.{i}.mix.3.weight"], p[f"mix.{i}.mix.3.bias"]
            new = np.empty_like(feat)
            for c in range(feat.shape[0]):
                row = feat[c]
                normed = (row - row.mean()) / math.sqrt(row.var() + 1e-5) * g + beta
                hidden = np.maximum(w1 @ normed + b1, 0.0)
                new[c] = row + (w2 @ hidden + b2)
            feat = new
        chan = p["channel_proj.weight"] @ feat + p["channel_proj.bias"][:, None]  # (out_channels, HW)
        rows = chan @ p["row_proj.weight"].T + p["row_proj.bias"][None, :]  # (out_channels, out_rows)
        desc = np.array([rows[c, r] for c in range(rows.shape[0]) for r in range(rows.shape[1])])  # 4*c + r
        out.append(desc / np.linalg.norm(desc))
    return np.stack(out)


def test_mixvpr_by_hand_on_small_tensors() -> None:
    agg = init_random_weights(MixVPR(in_channels=6, in_h=3, in_w=3, out_channels=5, mix_depth=2, out_rows=4), 11)
    x = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ours = agg(x)
        ours_flat = agg(x.flatten(2))  # (B, C, HW) input is the same thing
    assert ours.shape == (2, 20) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), _mixvpr_by_hand(x.flatten(2).numpy(), agg), atol=1e-6)
    torch.testing.assert_close(ours, ours_flat)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(2))
    # element 4 * channel + row: channel 2, row 3 equals rows[2, 3] before normalisation
    with torch.inference_mode():
        mixed = agg.mix(x.flatten(2))
        rows = agg.row_proj(agg.channel_proj(mixed.permute(0, 2, 1)).permute(0, 2, 1))  # (B, 5, 4)
    torch.testing.assert_close(ours[:, 4 * 2 + 3], rows[:, 2, 3] / rows.flatten(1).norm(dim=1))


def test_mixvpr_rejects_wrong_feature_size() -> None:
    agg = MixVPR(in_channels=384)
    with pytest.raises(ValueError, match=r"expects \(B, 384, 256\)"):
        agg(torch.zeros(1, 384, 15, 15))


def test_full_model_is_backbone_then_mixvpr_with_normalised_output() -> None:
    model = init_random_weights(build_model("s"), seed=3).eval()
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        desc = model(x)
        tokens = model.backbone(x)  # (B, 256, C)
        fmap = tokens.transpose(1, 2).reshape(3, 384, 16, 16)  # the feature map as DINO-Mix builds it
        expected = model.aggregator(fmap)
    assert desc.shape == (3, 4096) and desc.dtype == torch.float32
    torch.testing.assert_close(desc, expected)
    torch.testing.assert_close(desc.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("size", [(1, 3, 448, 448), (1, 3, 224, 280), (1, 1, 224, 224), (3, 224, 224)])
def test_inputs_other_than_224_are_refused(size: tuple[int, ...]) -> None:
    model = build_model("s")
    with pytest.raises(ValueError, match=r"takes \(B, 3, 224, 224\) inputs"):
        model(torch.zeros(size))


@pytest.mark.parametrize(
    "variant, width, depth, ffn_key, ckpt_mib",
    [  # checkpoint sizes (fp32) from the spec's table
        ("dinov2_vits14", 384, 12, "mlp.fc1.weight", 86.7),
        ("dinov2_vitb14", 768, 12, "mlp.fc1.weight", 334),
        ("dinov2_vitl14", 1024, 24, "mlp.fc1.weight", 1.1 * 1024),
        ("dinov2_vitg14", 1536, 40, "mlp.w12.weight", 4.2 * 1024),
    ],
)
def test_variants_on_meta_device_have_official_names_and_shapes(variant, width, depth, ffn_key, ckpt_mib) -> None:
    model = build_model(variant, device="meta")
    state = model.state_dict()
    prefix = "backbone.dino_model."
    assert state[prefix + "pos_embed"].shape == (1, 1370, width)
    assert state[prefix + "cls_token"].shape == (1, 1, width)
    assert state[prefix + "mask_token"].shape == (1, width)
    assert state[prefix + "patch_embed.proj.weight"].shape == (width, 3, 14, 14)
    assert state[prefix + f"blocks.{depth - 1}.ls2.gamma"].shape == (width,)
    assert prefix + f"blocks.{depth}.norm1.weight" not in state
    assert state[prefix + "blocks.0.attn.qkv.weight"].shape == (3 * width, width)
    assert prefix + "blocks.0." + ffn_key in state
    if variant == "dinov2_vitg14":
        assert state[prefix + "blocks.0.mlp.w12.weight"].shape == (8192, 1536)
        assert state[prefix + "blocks.0.mlp.w3.weight"].shape == (1536, 4096)
    assert not any(k.startswith((prefix + "norm.", prefix + "head.")) for k in state)
    assert state["aggregator.channel_proj.weight"].shape == (1024, width)
    assert state["aggregator.row_proj.weight"].shape == (4, 256)
    assert {k for k in state if k.startswith("aggregator.mix.")} == {
        f"aggregator.mix.{i}.mix.{j}.{w}" for i in (0, 1) for j in (0, 1, 3) for w in ("weight", "bias")
    }
    size_mib = sum(v.numel() for v in state.values()) * 4 / 2**20
    assert size_mib == pytest.approx(ckpt_mib, rel=0.04)


def test_variant_names_resolve_and_unknown_is_refused() -> None:
    assert resolve_variant("b") is resolve_variant("vitb14") is resolve_variant("dinomix_vitb14")
    with pytest.raises(ValueError, match="unknown DINO-Mix variant 'vitx14'"):
        resolve_variant("vitx14")
