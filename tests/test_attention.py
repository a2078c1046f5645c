"""nn/attention.py: the re-weighted cross-attention is the papers' A' = softmax(QK^T/sqrt(d)) * w,
checked against a hand computation; idle, it is diffusers' own processor bit for bit."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor

from defectforge.nn.attention import AttentionControl, ControlledAttnProcessor, grid_of, install


def _layer() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()


def _by_hand(attn: Attention, x: torch.Tensor, ctx: torch.Tensor, w: torch.Tensor | None,
             tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head cross-attention written out: per head softmax(q k^T * d^-1/2), times the
    spatial weight (on the chosen tokens), times v, heads concatenated, output projection."""
    b, n, _ = x.shape
    heads, d = attn.heads, 4
    q = attn.to_q(x).reshape(b, n, heads, d).permute(0, 2, 1, 3)
    k = attn.to_k(ctx).reshape(b, -1, heads, d).permute(0, 2, 1, 3)
    v = attn.to_v(ctx).reshape(b, -1, heads, d).permute(0, 2, 1, 3)
    probs = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)  # b, heads, n, T
    if w is not None:
        factor = w.reshape(b, 1, n, 1).expand_as(probs)
        if tokens is not None:
            factor = torch.where(tokens.reshape(1, 1, 1, -1), factor, torch.ones_like(factor))
        probs = probs * factor
    out = (probs @ v).permute(0, 2, 1, 3).reshape(b, n, heads * d)
    return attn.to_out[0](out), probs


def test_reweighted_probabilities_and_output_match_a_hand_computation():
    attn = _layer()
    x, ctx = torch.randn(2, 16, 8), torch.randn(2, 5, 6)  # 16 positions = a 4x4 grid, 5 tokens
    w = torch.rand(2, 4, 4) * 3
    tokens = torch.tensor([False, True, True, False, False])
    control = AttentionControl(weight=w, tokens=tokens, record=True)
    attn.set_processor(ControlledAttnProcessor(control, "layer"))
    with torch.no_grad():
        got = attn(x, encoder_hidden_states=ctx)
        want, probs = _by_hand(attn, x, ctx, w.reshape(2, 16), tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (name, recorded), = control.maps
    assert name == "layer" and recorded.shape == (2, 2, 4, 4, 5)
    torch.testing.assert_close(recorded.reshape(2, 2, 16, 5), probs, rtol=1e-5, atol=1e-6)
    # Tokens outside the mask keep their softmax probability; rows are not renormalised.
    assert not torch.allclose(recorded.sum(-1), torch.ones(2, 2, 4, 4))


def test_a_weight_map_is_resized_to_each_layer_and_ones_change_nothing():
    attn = _layer()
    x, ctx = torch.randn(1, 16, 8), torch.randn(1, 3, 6)
    attn.set_processor(AttnProcessor())
    with torch.no_grad():
        plain = attn(x, encoder_hidden_states=ctx)
        attn.set_processor(ControlledAttnProcessor(AttentionControl(weight=torch.ones(1, 32, 32))))
        torch.testing.assert_close(attn(x, encoder_hidden_states=ctx), plain)
        # A constant map of 2 at any resolution doubles every probability.
        attn.set_processor(ControlledAttnProcessor(AttentionControl(weight=torch.full((1, 7, 9), 2.0))))
        want, _ = _by_hand(attn, x, ctx, torch.full((1, 16), 2.0))
        torch.testing.assert_close(attn(x, encoder_hidden_states=ctx), want, rtol=1e-5, atol=1e-6)


def test_installed_in_a_unet_idle_is_diffusers_and_records_every_cross_attention_layer():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                attention_head_dim=4, norm_num_groups=4).eval()
    z, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 12)
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    cross = [k for k in unet.attn_processors if k.endswith("attn2.processor")]
    with torch.no_grad():
        plain = unet(z, t, encoder_hidden_states=ctx).sample  # diffusers' default (SDPA) processors
        control = AttentionControl()
        assert install(unet, control) == len(cross) > 0
        after = unet.attn_processors
        assert all(type(after[k]) is before[k] for k in after if k not in cross)  # self-attention untouched
        assert torch.equal(unet(z, t, encoder_hidden_states=ctx).sample, plain)  # idle: the layers' own code
        control.record = True
        unet(z, t, encoder_hidden_states=ctx)
    assert sorted(name for name, _ in control.maps) == sorted(cross)  # each cross-attention layer once
    assert all(m.shape[0] == 2 and m.shape[-1] == 3 for _, m in control.maps)
    control.reset()
    assert not control.active and control.maps == []


def test_a_varying_map_on_a_non_square_grid_lands_where_it_belongs_and_fits_guidance_batches():
    """A map with a distinct value per position, at the layer's own 2 x 4 grid (row-major), and a
    batch of one map for a layer batch of two (the two halves of classifier-free guidance)."""
    attn = _layer()
    x, ctx = torch.randn(2, 8, 8), torch.randn(2, 3, 6)
    w = torch.arange(1.0, 9.0).reshape(1, 2, 4)
    attn.set_processor(ControlledAttnProcessor(AttentionControl(weight=w, latent_hw=(4, 8))))
    with torch.no_grad():
        want, _ = _by_hand(attn, x, ctx, w.reshape(1, 8).repeat(2, 1))
        torch.testing.assert_close(attn(x, encoder_hidden_states=ctx), want, rtol=1e-5, atol=1e-6)
        attn.set_processor(ControlledAttnProcessor(AttentionControl(weight=w.transpose(1, 2).reshape(1, 2, 4),
                                                                    latent_hw=(4, 8))))
        assert not torch.allclose(attn(x, encoder_hidden_states=ctx), want)  # another layout, another result
        attn.set_processor(ControlledAttnProcessor(AttentionControl(weight=w, tokens=torch.ones(4, dtype=torch.bool),
                                                                    latent_hw=(4, 8))))
        with pytest.raises(ValueError, match="token mask has 4 entries per row, the layer 3"):
            attn(x, encoder_hidden_states=ctx)


def test_grid_of_sequences():
    assert grid_of(64, None) == (8, 8)
    assert grid_of(32, (8, 16)) == (4, 8)
    with pytest.raises(ValueError, match="square"):
        grid_of(12, None)
