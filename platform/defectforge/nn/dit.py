"""DefectDiffu's segmented Diffusion Transformer (Shi et al., "Few-shot Defect Image Generation based
on Consistency Modeling", ECCV 2024), built from diffusers' DiT blocks.

What the paper does: the N + M + K adaLN-Zero blocks of a pretrained DiT (DiT-XL/2: 10 / 10 / 8) are
split into three groups, each conditioned on its own prompt through adaLN ("TDIA"): the
*background* blocks on the product prompt c_p, the *defect* blocks on the defect prompt c_d, the
*fusion* blocks on the fused prompt c_f. A block's conditioning vector is the timestep embedding
plus a projection of its group's pooled prompt. The defect blocks also cross-attend from the image
tokens to the defect prompt (Eq. 5, softmax over the text tokens), and their attention maps,
concatenated over blocks and heads, are decoded into the defect mask.

What the official code (github.com/FFDD-diffusion/DefectDiffu, ``models_add_cross_concate.py``)
does differently, and what we do:

* it feeds the defect blocks' cross-attention *one* vector (``t + y_defect``) as its only key, so
  it takes the softmax over the image positions (``dim=-2``; over one key it would be 1); we
  cross-attend to c_d's token states with the softmax over the tokens, as Eq. 5 writes it;
* its cross-attention has no output projection and is added ungated at full strength; ours is
  diffusers' ``Attention`` (inside diffusers' ``BasicTransformerBlock``: LayerNorm, after
  self-attention, before the MLP) with a zero-initialised output projection, so a pretrained DiT
  loaded here computes exactly what it computed before until training moves it;
* it projects all three prompts with one shared linear layer; we have one per group, each
  zero-initialised (a freshly built or loaded model ignores the prompts);
* its mask head is per token (LayerNorm, MLP, linear, unpatchify); ours is a small conv head on the
  patch grid (``MaskHead``) over the maps reduced as ``reduce_attention`` explains.

What follows diffusers' ``DiTTransformer2DModel`` (so ``from_diffusers`` is exact, see its test):
every block keeps its own timestep embedder (``norm1.emb``, an ``AdaLayerNormZero`` with
``CombinedTimestepLabelEmbeddings``; in a checkpoint converted from the original DiT the copies
are equal, in one trained in diffusers they need not be), and the final layer (``proj_out_1`` /
``proj_out_2``) is modulated by the *first* block's embedder, as diffusers does, plus here the
fusion group's projection (the official code's final layer also takes ``t + y_fusion``). The class
label is dropped: each block's class-embedding table is replaced by ``nn.Identity`` and the block
gets its group's projected prompt where diffusers passes class labels, so diffusers' own block
forward computes ``timestep embedding + projected prompt``. A fresh model is initialised as the DiT
paper initialises one, adaLN-Zero included (``initialise_as_dit``; diffusers' class keeps PyTorch's
defaults).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed
from torch import nn

from defectforge.nn.attention import AttentionControl, ControlledAttnProcessor

if TYPE_CHECKING:
    from diffusers import DiTTransformer2DModel

#: The block groups in order, and the keys of ``forward``'s ``pooled``.
GROUPS = ("background", "defect", "fusion")
#: Keys of a diffusers DiT that have no counterpart here: the class-label embedding tables.
IGNORED_DIFFUSERS_KEY = "class_embedder"


@dataclass(frozen=True)
class DiTConfig:
    """The architecture. The DiT fields and their defaults are ``DiTTransformer2DModel``'s
    (DiT-XL/2 but for ``num_layers``, which is the sum of the three groups here)."""

    sample_size: int = 32  # latent side
    in_channels: int = 4  # = out channels of ``sample`` and of ``mask_latent``
    patch_size: int = 2
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    background_blocks: int = 10  # N
    defect_blocks: int = 10  # M
    fusion_blocks: int = 8  # K
    text_dim: int = 1024  # width of the text encoder's token states and pooled vector
    mask_head_channels: int = 64
    # A depthwise 3x3 convolution over the patch grid after every block, a zero-initialised
    # residual (``SegmentedDiT`` docstring, "Local mixing"); off = DiT exactly.
    local_mixing: bool = False
    dropout: float = 0.0
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"
    upcast_attention: bool = False
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("sample_size", "in_channels", "patch_size", "num_attention_heads", "attention_head_dim",
                     "defect_blocks", "text_dim", "mask_head_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("background_blocks", "fusion_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"DiTConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.sample_size % self.patch_size:
            raise ValueError(f"DiTConfig: sample_size {self.sample_size} is not a multiple of patch_size "
                             f"{self.patch_size}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_layers(self) -> int:
        return self.background_blocks + self.defect_blocks + self.fusion_blocks

    @property
    def block_groups(self) -> tuple[str, ...]:
        """The group of each block, in order."""
        return (("background",) * self.background_blocks + ("defect",) * self.defect_blocks
                + ("fusion",) * self.fusion_blocks)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], *, background_blocks: int, defect_blocks: int,
                       fusion_blocks: int, text_dim: int, mask_head_channels: int = 64) -> DiTConfig:
        """The architecture of a ``DiTTransformer2DModel`` config split into the three groups, whose
        sizes must add up to its ``num_layers``."""
        kind = config.get("_class_name", "DiTTransformer2DModel")
        if kind != "DiTTransformer2DModel":
            raise ValueError(f"not a DiTTransformer2DModel config: _class_name is {kind!r}")
        if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
            raise ValueError(f"a DiT with norm_type {config['norm_type']!r} (only 'ada_norm_zero' is a DiT block)")
        layers = int(config.get("num_layers", 28))
        total = background_blocks + defect_blocks + fusion_blocks
        if total != layers:
            raise ValueError(f"background_blocks + defect_blocks + fusion_blocks = {background_blocks} + "
                             f"{defect_blocks} + {fusion_blocks} = {total}, but the DiT has num_layers = {layers}")
        defaults = {f.name: f.default for f in fields(cls)}
        shared = {name: config.get(name, defaults[name]) for name in (
            "sample_size", "in_channels", "patch_size", "num_attention_heads", "attention_head_dim", "dropout",
            "attention_bias", "activation_fn", "upcast_attention", "norm_elementwise_affine", "norm_eps")}
        out_channels = config.get("out_channels") or shared["in_channels"]
        if out_channels < shared["in_channels"]:
            raise ValueError(f"a DiT with out_channels {out_channels} < in_channels {shared['in_channels']}: "
                             "its output cannot be a sample of the input's shape")
        return cls(**shared, background_blocks=background_blocks, defect_blocks=defect_blocks,
                   fusion_blocks=fusion_blocks, text_dim=text_dim, mask_head_channels=mask_head_channels)


@dataclass(frozen=True)
class SegmentedDiTOutput:
    """``sample``: B x C x h x w (the parameterisation of the loaded DiT's first C output channels);
    ``mask_latent``: B x C x h x w, the mask head's prediction; ``attention_maps``: one
    B x heads x (h/p * w/p) x L tensor of post-softmax probabilities per defect block, in order
    (with their graph: a loss on them trains the cross-attention)."""

    sample: torch.Tensor
    mask_latent: torch.Tensor
    attention_maps: tuple[torch.Tensor, ...]


def reduce_attention(attention_maps: Sequence[torch.Tensor], tokens: torch.Tensor,
                     grid: tuple[int, int]) -> torch.Tensor:
    """The defect blocks' maps (each B x heads x N x L, N = gh * gw) as one B x (M*heads) x gh x gw
    image: per block and head, the probabilities of the chosen ``tokens`` (B x L or L, bool)
    summed, on the patch grid, blocks then heads along the channels.

    Why a sum over chosen tokens: a position's probabilities sum to 1 over the tokens it may attend
    to (the softmax is over the tokens, Eq. 5; padding tokens get 0), so the *sum over every
    attended token* is 1 at every position and says nothing about where the defect is. What does is
    the share of that unit that goes to the tokens describing the defect rather than to the
    prompt's others (the start / end tokens absorb attention where nothing described is). Summing
    keeps that share whatever the number of tokens a defect name takes (CLIP's BPE and the
    backbone's bytes split the same word differently), where one channel per token would not.
    ``SegmentedDiT.forward`` checks the choice (not every attended token, none of the padding).
    """
    gh, gw = grid
    reduced = []
    for probs in attention_maps:
        b, heads, n, length = probs.shape
        if n != gh * gw:
            raise ValueError(f"attention map over {n} positions does not fit the {gh}x{gw} patch grid")
        chosen = tokens.to(probs.dtype).expand(b, length)
        reduced.append((probs * chosen[:, None, None, :]).sum(-1).reshape(b, heads, gh, gw))
    return torch.cat(reduced, dim=1)


class MaskHead(nn.Module):
    """B x (M*heads) x gh x gw reduced attention maps (``reduce_attention``) -> B x C x h x w mask
    latent: two 3x3 convolutions on the patch grid, bilinear upsampling by the patch size, a 3x3
    convolution to the latent's channels."""

    def __init__(self, maps: int, out_channels: int, patch_size: int, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(maps, hidden, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU(),
            nn.Upsample(scale_factor=patch_size, mode="bilinear", align_corners=False),
            nn.Conv2d(hidden, out_channels, 3, padding=1),
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.body(maps)


def _is_new_layer(key: str) -> bool:
    """A state-dict key of a layer DefectDiffu adds to DiT (none of them is in a DiT checkpoint)."""
    return key.startswith(("prompt_proj.", "mask_head.", "local_mix.")) or ".attn2." in key or ".norm2." in key


class SegmentedDiT(nn.Module):
    """DiT with background / defect / fusion block groups (module docstring). Module names follow
    ``DiTTransformer2DModel`` (``pos_embed``, ``transformer_blocks``, ``norm_out``, ``proj_out_1``,
    ``proj_out_2``); the new layers are ``prompt_proj[group]``, the defect blocks' ``norm2`` /
    ``attn2``, ``mask_head`` and, with ``local_mixing``, ``local_mix[i]``.

    **Local mixing** (``DiTConfig.local_mixing``; not in DiT or DefectDiffu): after block i the
    tokens, laid out on the patch grid, get ``x + dwconv3x3_i(x)``, the convolution zero-initialised
    (a model starts computing exactly what it computes without it). Why: a DiT trained from scratch
    on a few dozen images for a few hundred CPU steps learns per-token statistics but no spatial
    structure (measured, README "What the shared backbone trained here draws": "a defect mask"
    drawn as ~5 scattered single-cell dots, metal photos as per-pixel noise instead of brushed
    streaks), because global attention starts uniform and must learn locality from the position
    embedding. A depthwise convolution gives every block a neighbourhood from the start: the
    inductive bias of the convolutional additions to vision transformers (e.g. the 3x3 output
    convolution of U-ViT, Bao et al. 2023; depthwise convolutions in the feed-forward of LocalViT,
    Li et al. 2021). It costs dim x 10 parameters per block. A DiT loaded from a folder has none
    (its config cannot ask for it), so the paper's architecture is what a pretrained DiT runs."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.block_groups = config.block_groups
        self.pos_embed = PatchEmbed(height=config.sample_size, width=config.sample_size, patch_size=config.patch_size,
                                    in_channels=config.in_channels, embed_dim=dim)
        # Records the defect blocks' attention probabilities (with their graph) on every forward.
        self.attention_control = AttentionControl(record=True, record_grad=True)
        blocks = []
        for i, group in enumerate(self.block_groups):
            block = BasicTransformerBlock(
                dim, config.num_attention_heads, config.attention_head_dim, dropout=config.dropout,
                cross_attention_dim=config.text_dim if group == "defect" else None,
                activation_fn=config.activation_fn, num_embeds_ada_norm=1, attention_bias=config.attention_bias,
                upcast_attention=config.upcast_attention, norm_type="ada_norm_zero",
                norm_elementwise_affine=config.norm_elementwise_affine, norm_eps=config.norm_eps)
            # The block gets its group's projected prompt where diffusers passes class labels.
            block.norm1.emb.class_embedder = nn.Identity()
            if group == "defect":  # its output projection starts at zero (initialise_as_dit)
                block.attn2.set_processor(ControlledAttnProcessor(self.attention_control,
                                                                  f"transformer_blocks.{i}.attn2"))
            blocks.append(block)
        self.transformer_blocks = nn.ModuleList(blocks)
        if config.local_mixing:  # built after the blocks, so with it off every weight is drawn as before
            self.local_mix = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
                                           for _ in self.block_groups)
        self.prompt_proj = nn.ModuleDict({group: nn.Linear(config.text_dim, dim) for group in GROUPS})
        for proj in self.prompt_proj.values():
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, config.patch_size * config.patch_size * config.in_channels)
        self.mask_head = MaskHead(config.defect_blocks * config.num_attention_heads, config.in_channels,
                                  config.patch_size, config.mask_head_channels)
        self.initialise_as_dit()

    @torch.no_grad()
    def initialise_as_dit(self) -> None:
        """The DiT paper's initialisation of a model trained from scratch (Peebles & Xie 2023, the
        official ``DiT.initialize_weights``): xavier-uniform linear layers with zero biases, the patch
        embedding as a linear layer, the timestep MLPs N(0, 0.02), and **adaLN-Zero**: every
        block's modulation layer (``norm1.linear``) and the final layer (``proj_out_1``,
        ``proj_out_2``) zeroed, so each block starts as the identity and the model's output at 0.
        The paper measures adaLN-Zero training markedly faster than the alternatives (its Fig. 5);
        diffusers' ``DiTTransformer2DModel`` keeps PyTorch's defaults, as it expects converted
        weights (``from_diffusers`` loads over all of this). The new layers stay as documented above
        (cross-attention output, prompt projections and local mixing zero, the mask head PyTorch's)."""
        for module in self.transformer_blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        weight = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        for block, group in zip(self.transformer_blocks, self.block_groups):
            embedder = block.norm1.emb.timestep_embedder
            nn.init.normal_(embedder.linear_1.weight, std=0.02)
            nn.init.normal_(embedder.linear_2.weight, std=0.02)
            if group == "defect":
                nn.init.zeros_(block.attn2.to_out[0].weight)
                nn.init.zeros_(block.attn2.to_out[0].bias)
        for layer in self.adaln_zero_layers():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.config.local_mixing:
            for conv in self.local_mix:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def adaln_zero_layers(self) -> list[nn.Linear]:
        """The layers adaLN-Zero builds at zero: each block's modulation and the final layer's two."""
        return [block.norm1.linear for block in self.transformer_blocks] + [self.proj_out_1, self.proj_out_2]

    # ------------------------------------------------------------------------------ forward
    def forward(self, latent: torch.Tensor, timestep: torch.Tensor | float, pooled: Mapping[str, torch.Tensor],
                defect_states: torch.Tensor, defect_token_mask: torch.Tensor | None = None,
                mask_tokens: torch.Tensor | None = None) -> SegmentedDiTOutput:
        """``latent`` B x C x h x w (h, w multiples of the patch size); ``timestep`` B (or one for
        all); ``pooled``: B x text_dim pooled prompts by group (``GROUPS``: c_p, c_d, c_f);
        ``defect_states``: B x L x text_dim token states of c_d; ``defect_token_mask``: B x L bool,
        False = padding (left out of the softmax), None = none; ``mask_tokens``: B x L or L bool,
        the tokens whose probabilities the mask head sums (``reduce_attention``), None = every
        attended token but each row's last (the end token, which CLIP's and ByT5's tokenizers put
        after every prompt): pass the defect words' tokens where they are known."""
        cfg = self.config
        b, c, h, w = latent.shape
        p = cfg.patch_size
        if c != cfg.in_channels or h % p or w % p:
            raise ValueError(f"latent {tuple(latent.shape)}: expected {cfg.in_channels} channels and sides that are "
                             f"multiples of the patch size {p}")
        grid = (h // p, w // p)
        timestep = torch.as_tensor(timestep, device=latent.device)
        timestep = timestep.expand(b) if timestep.dim() == 0 else timestep
        if timestep.shape != (b,):
            raise ValueError(f"timestep {tuple(timestep.shape)}: expected ({b},)")
        prompts = self._project_prompts(pooled, b)
        attended, bias = self._padding(defect_states, defect_token_mask, b, latent.dtype)
        tokens = self._mask_tokens(mask_tokens, attended)

        control = self.attention_control
        control.maps.clear()
        control.record, control.record_grad, control.latent_hw = True, True, grid
        x = self.pos_embed(latent)
        for i, (block, group) in enumerate(zip(self.transformer_blocks, self.block_groups)):
            cross = group == "defect"
            x = block(x, encoder_hidden_states=defect_states if cross else None,
                      encoder_attention_mask=bias if cross else None, timestep=timestep, class_labels=prompts[group])
            if cfg.local_mixing:  # tokens are row-major on the patch grid (PatchEmbed's flatten)
                on_grid = x.transpose(1, 2).reshape(b, -1, *grid)
                x = x + self.local_mix[i](on_grid).flatten(2).transpose(1, 2)
        maps = tuple(m.reshape(b, m.shape[1], grid[0] * grid[1], m.shape[-1]) for _, m in control.maps)
        control.maps.clear()  # the output holds them; the control should not keep their graph alive
        if len(maps) != cfg.defect_blocks:
            raise RuntimeError(f"recorded {len(maps)} cross-attention maps for {cfg.defect_blocks} defect blocks")

        # diffusers' DiT output layer: adaLN on the first block's timestep embedding (+ fusion prompt).
        conditioning = self.transformer_blocks[0].norm1.emb(timestep, prompts["fusion"], hidden_dtype=x.dtype)
        shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        x = self.proj_out_2(x).reshape(b, grid[0], grid[1], p, p, c)
        sample = torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, h, w)
        return SegmentedDiTOutput(sample=sample, mask_latent=self.mask_head(reduce_attention(maps, tokens, grid)),
                                  attention_maps=maps)

    def _project_prompts(self, pooled: Mapping[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        missing, extra = set(GROUPS) - set(pooled), set(pooled) - set(GROUPS)
        if missing or extra:
            raise ValueError(f"pooled prompts must be given for exactly {GROUPS}; missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)}")
        out = {}
        for group in GROUPS:
            vector = pooled[group]
            if vector.shape != (batch, self.config.text_dim):
                raise ValueError(f"pooled[{group!r}] {tuple(vector.shape)}: expected ({batch}, {self.config.text_dim})")
            proj = self.prompt_proj[group]
            out[group] = proj(vector.to(proj.weight.dtype))
        return out

    def _padding(self, states: torch.Tensor, mask: torch.Tensor | None, batch: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B x L bool attended tokens, B x 1 x L additive attention bias or None)."""
        if states.dim() != 3 or states.shape[0] != batch or states.shape[2] != self.config.text_dim:
            raise ValueError(f"defect_states {tuple(states.shape)}: expected ({batch}, L, {self.config.text_dim})")
        length = states.shape[1]
        if mask is None:
            return torch.ones(batch, length, dtype=torch.bool, device=states.device), None
        if mask.dtype != torch.bool or mask.shape != (batch, length):
            raise ValueError(f"defect_token_mask {mask.dtype} {tuple(mask.shape)}: expected bool ({batch}, {length})")
        if not bool(mask.any(-1).all()):
            raise ValueError("defect_token_mask: a row has no token to attend to")
        # diffusers' convention for encoder attention masks (UNet2DConditionModel): -10000 where padded.
        bias = (~mask).to(dtype) * -10000.0
        return mask, bias[:, None, :]

    @staticmethod
    def _mask_tokens(tokens: torch.Tensor | None, attended: torch.Tensor) -> torch.Tensor:
        length = attended.shape[1]
        if tokens is None:
            last = length - 1 - attended.flip(-1).to(torch.uint8).argmax(-1)
            tokens = attended & (torch.arange(length, device=attended.device) != last[:, None])
        else:
            if tokens.dtype != torch.bool or tokens.shape not in ((length,), attended.shape):
                raise ValueError(f"mask_tokens {tokens.dtype} {tuple(tokens.shape)}: expected bool ({length},) or "
                                 f"{tuple(attended.shape)}")
            tokens = tokens.to(attended.device).expand_as(attended)
            if bool((tokens & ~attended).any()):
                raise ValueError("mask_tokens include padding tokens (their probabilities are 0)")
        if not bool(tokens.any(-1).all()):
            raise ValueError("mask_tokens: a row chooses no token (its mask-head input would be 0 everywhere)")
        if bool((tokens == attended).all(-1).any()):
            raise ValueError("mask_tokens: a row chooses every attended token; their probabilities sum to 1 at "
                             "every position, so the mask head would see no defect (reduce_attention)")
        return tokens

    # ------------------------------------------------------------------------- pretrained DiT
    def diffusers_key_map(self) -> dict[str, str]:
        """{DiTTransformer2DModel state-dict key: ours} for every weight the two share.

        The blocks here *are* diffusers' blocks with diffusers' module names, so the map is the
        identity on names over our keys minus the new layers (``_is_new_layer``); built from our own
        state dict, it cannot drift from the modules. What it leaves out of their side: the
        class-label tables (``IGNORED_DIFFUSERS_KEY``). ``proj_out_2`` maps onto the first C
        output channels (``_first_channels``) when the DiT also predicts its variance."""
        return {key: key for key in self.state_dict() if not _is_new_layer(key)}

    @classmethod
    def from_diffusers(cls, transformer: DiTTransformer2DModel | str | Path, *, background_blocks: int,
                       defect_blocks: int, fusion_blocks: int, text_dim: int,
                       mask_head_channels: int = 64) -> SegmentedDiT:
        """A model with the weights of a diffusers DiT (a model, or a folder with ``config.json`` and
        ``*.safetensors``), split into groups that add up to its ``num_layers``; the new layers keep
        their (zero) initialisation, so it computes the DiT's first C output channels.

        Every key of theirs must be mapped or be a class-label table, and every key of ours must come
        from theirs unless it is a new layer; else a ValueError naming the key (diffusers and
        ``load_state_dict(strict=False)`` would warn, or say nothing, and leave it random)."""
        if isinstance(transformer, (str, Path)):
            config, state = _read_folder(Path(transformer))
        else:
            config, state = dict(transformer.config), transformer.state_dict()
        model = cls(DiTConfig.from_diffusers(config, background_blocks=background_blocks, defect_blocks=defect_blocks,
                                             fusion_blocks=fusion_blocks, text_dim=text_dim,
                                             mask_head_channels=mask_head_channels))
        key_map = model.diffusers_key_map()
        ours_now = model.state_dict()
        loaded: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key in key_map:
                ours = key_map[key]
                if ours == "proj_out_2.weight" or ours == "proj_out_2.bias":
                    value = _first_channels(value, model.config.patch_size, model.config.in_channels)
                if value.shape != ours_now[ours].shape:
                    raise ValueError(f"DiT weight {key!r} has shape {tuple(value.shape)}, ours {ours!r} "
                                     f"{tuple(ours_now[ours].shape)}")
                loaded[ours] = value
            elif IGNORED_DIFFUSERS_KEY not in key:
                raise ValueError(f"unexpected key {key!r} in the DiT weights (neither mapped nor a class-label table)")
        missing = sorted(set(key_map) - set(state))
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"the DiT weights have no {missing[0]!r}{more}")
        result = model.load_state_dict(loaded, strict=False)
        not_loaded = [k for k in result.missing_keys if not _is_new_layer(k)]
        if not_loaded or result.unexpected_keys:  # the key map's own invariant
            raise RuntimeError(f"key map left {not_loaded or result.unexpected_keys} unloaded")
        return model


def _first_channels(weight: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """``proj_out_2``'s weight (p*p*out x D) or bias (p*p*out), whose rows are (p, q, channel),
    reduced to the first ``channels`` output channels (a DiT that also predicts its variance has
    out = 2C; ``sample`` is the first C, as diffusers' pipelines split it)."""
    rows = weight.shape[0]
    out = rows // (patch_size * patch_size)
    if out * patch_size * patch_size != rows or out < channels:
        raise ValueError(f"proj_out_2 has {rows} rows, not patch {patch_size}^2 x >= {channels} channels")
    if out == channels:
        return weight
    tail = weight.shape[1:]
    return weight.reshape(patch_size, patch_size, out, *tail)[:, :, :channels].reshape(-1, *tail)


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and the union of the ``*.safetensors`` files of a diffusers model folder."""
    from safetensors.torch import load_file

    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json")
    config = json.loads((folder / "config.json").read_text())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(f))
        twice = sorted(set(part) & set(state))
        if twice:
            raise ValueError(f"{folder}: key {twice[0]!r} is in more than one weight file")
        state.update(part)
    return config, state
