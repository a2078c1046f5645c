"""Cross-attention that can be re-weighted by a spatial map and recorded (a diffusers processor).

Three of the four methods act on the post-softmax cross-attention probabilities of their
diffusion backbone:

* AnomalyDiffusion's adaptive attention re-weighting (AAR) multiplies them by a per-pixel weight
  that is large where the generated image still differs from the defect-free one inside the mask;
* DefectSynth's shape-aware embedding (SAE) multiplies them by ``1 + ||M||_1 softmax(...)``;
* DefectDiffu reads the maps of its defect blocks to predict the mask.

So one processor does both: ``AttentionControl`` is the state shared by every cross-attention
layer of a model (the weight map for the current step, which tokens it applies to, whether to
record); ``ControlledAttnProcessor`` wraps the layer's own processor: while the control is idle it calls
that processor (diffusers' fused SDPA one by default), so an installed model runs exactly as
before; when active it computes the layer the way diffusers' ``AttnProcessor`` does (explicit
softmax: the fused kernel never materialises the probabilities) with the weight applied between
the softmax and the product with the values. ``install`` puts it on cross-attention layers only;
self-attention keeps its processor.

Why post-softmax multiplication as the papers write it (``A' = A * w``), not the official
AnomalyDiffusion code's pre-softmax scaling clamped to [1, 1.5]: the issue asks for the paper's
mechanism; rows are deliberately *not* renormalised, which is what the papers' equations say.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor


@dataclass
class AttentionControl:
    """What the controlled processors of one model do on the next forward pass.

    * ``weight``: B x H x W spatial weights (any resolution: resized bilinearly to each layer's
      grid), or None for no re-weighting;
    * ``tokens``: a bool mask over the text tokens the weight applies to (None = every token): T
      entries for all samples, or B x T, one row per sample;
    * ``latent_hw``: the latent's (H, W), so 1-D token sequences (transformer blocks) map back to
      a grid when it is not square; None = square;
    * ``record``: keep every cross-attention layer's probabilities in ``maps`` as
      (layer name, B x heads x h x w x T) tensors, detached unless ``record_grad`` (a loss on the
      maps, as DefectDiffu's mask head, needs their graph).

    A weight whose batch divides the layer's (classifier-free guidance runs the conditional and
    unconditional halves in one batch) is repeated to fit.
    """

    weight: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    latent_hw: tuple[int, int] | None = None
    record: bool = False
    record_grad: bool = False
    maps: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.weight is not None or self.record

    def reset(self) -> None:
        self.weight, self.tokens, self.record = None, None, False
        self.maps.clear()


def grid_of(sequence: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of a layer whose spatial sequence has ``sequence`` positions: the latent's aspect
    ratio at that layer's downsampling (square when ``latent_hw`` is None)."""
    if latent_hw is None:
        side = math.isqrt(sequence)
        if side * side != sequence:
            raise ValueError(f"cannot map {sequence} positions to a square grid; set AttentionControl.latent_hw")
        return side, side
    H, W = latent_hw
    factor = math.sqrt(H * W / sequence)
    h, w = round(H / factor), round(W / factor)
    if h * w != sequence:
        raise ValueError(f"{sequence} positions do not fit the latent's {H}x{W} aspect ratio")
    return h, w


class ControlledAttnProcessor(AttnProcessor):
    """diffusers' ``AttnProcessor`` with ``control`` applied to cross-attention (see the module doc)."""

    def __init__(self, control: AttentionControl, name: str = "", original: object | None = None) -> None:
        super().__init__()
        self.control = control
        self.name = name
        self.original = original  # the layer's processor before install (used while idle)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None or not self.control.active:
            if self.original is not None:
                return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise ValueError(f"{self.name}: attention with q/k normalisation is not supported by the controlled path")
        # The body of AttnProcessor.__call__ (diffusers 0.42), with the control between the
        # softmax and the product with the values.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        height = width = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)

        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, N, T), rows sum to 1
        heads = attn.heads
        n = probs.shape[1]
        h, w = (height, width) if height is not None else grid_of(n, self.control.latent_hw)
        if self.control.weight is not None:
            probs = probs * self._weight(probs, heads, h, w)
        if self.control.record:
            b = probs.shape[0] // heads
            kept = probs if self.control.record_grad else probs.detach()
            self.control.maps.append((self.name, kept.reshape(b, heads, h, w, probs.shape[-1])))

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _weight(self, probs: torch.Tensor, heads: int, h: int, w: int) -> torch.Tensor:
        """The control's B x H x W map at this layer's grid, as a (B*heads, h*w, T) factor."""
        weight = self.control.weight.to(probs)  # dtype and device of the layer
        b = probs.shape[0] // heads
        if b % weight.shape[0]:
            raise ValueError(f"{self.name}: attention weight has batch {weight.shape[0]}, the layer {b}")
        weight = weight.repeat(b // weight.shape[0], 1, 1)  # guidance's halves share one map
        grid = F.interpolate(weight[:, None], size=(h, w), mode="bilinear", align_corners=False)
        factor = grid.reshape(b, 1, h * w, 1).expand(b, heads, h * w, 1).reshape(b * heads, h * w, 1)
        if self.control.tokens is None:
            return factor
        tokens = self.control.tokens.to(device=probs.device, dtype=torch.bool)
        if tokens.shape[-1] != probs.shape[-1]:
            raise ValueError(f"{self.name}: token mask has {tokens.shape[-1]} entries per row, the layer "
                             f"{probs.shape[-1]} tokens")
        if tokens.dim() == 1:
            tokens = tokens.reshape(1, 1, -1)
        else:  # one row per sample (prompts whose slots sit at different positions)
            if b % tokens.shape[0]:
                raise ValueError(f"{self.name}: token mask has batch {tokens.shape[0]}, the layer {b}")
            tokens = tokens.repeat(b // tokens.shape[0], 1)
            tokens = tokens[:, None, None, :].expand(b, heads, 1, -1).reshape(b * heads, 1, -1)
        return torch.where(tokens, factor, torch.ones_like(factor))


def install(model: torch.nn.Module, control: AttentionControl) -> int:
    """Give every cross-attention layer (``attn2``) of ``model`` (a diffusers UNet or transformer
    with classic attention processors) a controlled processor sharing ``control``, wrapping the
    layer's own; self-attention keeps its processor. Returns how many layers got one."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    current = model.attn_processors
    processors, count = {}, 0
    for name, proc in current.items():
        if name.endswith("attn2.processor") and isinstance(proc, (AttnProcessor, AttnProcessor2_0)) \
                and not isinstance(proc, ControlledAttnProcessor):
            processors[name] = ControlledAttnProcessor(control, name, original=proc)
            count += 1
        else:
            processors[name] = proc
    if count == 0:
        raise ValueError("install: the model has no cross-attention layer with a classic diffusers processor")
    model.set_attn_processor(processors)  # (diffusers pops the entries it used)
    return count


@contextmanager
def controlled(model: torch.nn.Module, control: AttentionControl | None) -> Iterator[None]:
    """``install`` for the duration of a ``with`` block (nothing when ``control`` is None), the
    model's own processors put back after it, also when sampling fails."""
    if control is None:
        yield
        return
    before = dict(model.attn_processors)
    install(model, control)
    try:
        yield
    finally:
        model.set_attn_processor(before)
