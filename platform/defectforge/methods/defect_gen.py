"""Defect-Gen (Defect Spectrum, Yang et al.): two-model pixel-space diffusion over image ⊕ mask.

The mechanism, and why:

* **Joint image + mask diffusion.** The diffused variable is ``x = image ⊕ one_hot(mask)``:
  C + (K + 1) channels, the image in [-1, 1] and the one-hot mask in {0, 1} as the official code
  has it (``mask_encoding="onehot01"``; ``"signed"`` scales it to ±1). K = ``context.max_classes``;
  C = 1 for grayscale data (``context.image_channels``), else 3. Generating the mask with the image
  keeps the pair consistent without a separate mask model; the mask is read back by softmax +
  argmax over the K + 1 channels (the argmax of the softmax is the argmax of the channels).
* **x0 prediction** (``prediction_type="sample"``, the official ``parameterization: x0``) on the
  cosine schedule. With ε-prediction an x̂0 at the first sampling step is (x_t - √(1-ᾱ)ε̂)/√ᾱ with
  ᾱ ≈ 2e-9 at t = T-1: every error of ε̂ is amplified ~10⁴× (DESIGN.md, "Diffusion facts"), which
  an under-trained CPU model turns into pure noise. ε and v stay options.
* **Optional mask cross-entropy** (``mask_ce_weight``; the official ``seperate_channel_loss``
  uses 0.2): the image channels keep the MSE, the mask channels of x̂0 are trained as class logits.
* **Two UNets, one trajectory.** Few-shot defect data (tens of images) is easy to memorise. A
  large-receptive-field UNet (deep, attention at low resolution, mid block) denoises the early,
  high-noise steps ``t >= u`` where global layout is decided; a small-receptive-field UNet (2/3/6
  downsamplings, no attention, no mid block) denoises the late steps ``t < u``. The small model
  only ever sees patches, so it learns local defect texture rather than whole training images,
  which adds diversity where the large model would copy. Sampling is *one* reverse trajectory
  ``T-1 -> u`` (large) then ``u-1 -> 0`` (small); the official code restarts the time range at
  the switch instead, which we deliberately do not copy.
* **Each UNet trains on the timesteps it may serve.** ``u_range = [lo, hi]`` is the range the
  switch may take at sampling time: the large model trains on ``t >= lo``, the small one on
  ``t < hi``. Inside that range ``u`` is a sampling-time choice (``generate``, sweeps) that needs no
  retraining; outside it the config is rejected. ``u_range: null`` trains both on all timesteps.
* **Pixel-unshuffle for the large model** (``large_unshuffle``): an exact, parameter-free fold of
  f×f pixel blocks into channels, so the global model works at 1/f resolution with f² times the
  channels per pixel: on a CPU the width goes where compute is cheap (``nn.unets.UnshuffledUNet``).
* **Conditioning.** A learned product embedding plus a learned defect-type embedding (class id,
  0 = good) is added to each UNet's time embedding (``class_embed_type="identity"``). With one
  product this is the per-product model; with several, the multi-product model.

Pure torch + diffusers: no Ray, no MLflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from defectforge.config import MethodConfigBase
from defectforge.methods.base import Conditions, GeneratedBatch, Generator, GeneratorContext, SamplingOptions, Stage
from defectforge.methods.registry import register
from defectforge.nn.unets import (
    RECEPTIVE_FIELDS,
    LabelEmbedding,
    UnshuffledUNet,
    build_large_unet,
    build_patch_unet,
    time_embed_dim,
)

if TYPE_CHECKING:  # diffusers is imported where a model is built: every process that validates a
    # config imports this module (the registry's config union), and diffusers costs ~1.5 s there
    from diffusers import DDIMScheduler, DDPMScheduler

STAGE = "diffusion"


class DefectGenConfig(MethodConfigBase):
    """Defect-Gen's knobs. Defaults are the paper preset (256 px); ``tiny`` and ``laptop`` shrink it.

    Fields marked ``sampling_time`` (``u``) may change after training without retraining (inside
    ``u_range``); every other field shapes the trained weights.
    """

    name: Literal["defect-gen"] = "defect-gen"
    u: int = Field(200, ge=1, description="switch timestep: t >= u large model, t < u small model",
                   json_schema_extra={"sampling_time": True})
    u_range: tuple[int, int] | None = Field(
        None, description="[lo, hi]: u may be chosen in lo..hi at sampling time; the large model trains on "
                          "t >= lo, the small one on t < hi. null = both train on all timesteps")
    num_train_timesteps: int = Field(1000, ge=2, description="T, diffusion steps")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(
        "squaredcos_cap_v2", description="squaredcos_cap_v2 = the cosine schedule of the paper")
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = Field(
        "sample", description="sample = x0 prediction (the official parameterization)")
    mask_encoding: Literal["onehot01", "signed"] = Field(
        "onehot01", description="one-hot mask channels in {0, 1} (official) or scaled to {-1, 1}")
    mask_ce_weight: float = Field(0.0, ge=0, description="weight of a cross-entropy loss on the mask channels "
                                  "of x0-hat (official separate_channel_loss: 0.2); 0 = MSE on all channels")
    grayscale_as_one_channel: bool = Field(
        True, description="model grayscale data (context.image_channels = 1) as one image channel")
    large_unshuffle: Literal[1, 2, 4] = Field(
        1, description="large model works at resolution / f on f*f times the channels (exact pixel-unshuffle)")
    receptive_field: Literal["small", "medium", "large"] = Field(
        "small", description="small model: 2 / 3 / 6 downsamplings (paper Table 12)")
    large_downsamplings: int = Field(5, ge=1, le=8)
    large_widths: tuple[int, ...] = Field((128, 128, 256, 256, 512, 512, 512),
                                          description="channels per level of the large model (first d+1 used)")
    small_widths: tuple[int, ...] = Field((128, 128, 256, 256, 256, 256, 256),
                                          description="channels per level of the small model (first d+1 used)")
    layers_per_block: int = Field(2, ge=1)
    attention_resolution: int = Field(32, ge=1, description="large model: attention on maps <= this size")
    attention_head_dim: int = Field(64, ge=1)
    norm_num_groups: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DefectGenConfig:
        T = self.num_train_timesteps
        if not 0 < self.u < T:
            raise ValueError(f"method.u={self.u} must satisfy 0 < u < method.num_train_timesteps={T}")
        if self.mask_ce_weight > 0 and self.prediction_type != "sample":
            raise ValueError("method.mask_ce_weight > 0 needs method.prediction_type=sample: the cross-entropy "
                             "treats the predicted mask channels as class logits (the official x0 setting)")
        if self.u_range is not None:
            lo, hi = self.u_range
            if not 0 < lo <= hi < T:
                raise ValueError(f"method.u_range={list(self.u_range)} must satisfy 0 < lo <= hi < "
                                 f"method.num_train_timesteps={T}")
            if not lo <= self.u <= hi:
                raise ValueError(f"method.u={self.u} is outside method.u_range={list(self.u_range)}, the range "
                                 "this model's two UNets were trained for; choose u inside it or retrain "
                                 "with a wider method.u_range")
        need = self.large_downsamplings + 1
        if len(self.large_widths) < need:
            raise ValueError(f"method.large_widths has {len(self.large_widths)} entries; "
                             f"method.large_downsamplings={self.large_downsamplings} needs {need}")
        need = RECEPTIVE_FIELDS[self.receptive_field] + 1
        if len(self.small_widths) < need:
            raise ValueError(f"method.small_widths has {len(self.small_widths)} entries; "
                             f"method.receptive_field={self.receptive_field!r} needs {need}")
        return self

    @classmethod
    def preset(cls, name: str) -> dict[str, Any]:
        if name == "tiny":
            # 64 px, seconds-scale tests: the smallest widths that still run every code path.
            return {"large_downsamplings": 6, "large_widths": [8, 16, 32, 32, 64, 64, 64],
                    "small_widths": [8, 16, 32, 32, 32, 32, 32], "layers_per_block": 1,
                    "attention_resolution": 8, "attention_head_dim": 16, "norm_num_groups": 4,
                    "num_train_timesteps": 1000, "u": 200, "receptive_field": "small"}
        if name == "laptop":
            # 64 px on 2 CPUs; chosen by measurement (README, "Defect-Gen laptop preset").
            return dict(LAPTOP)
        if name == "paper":
            # The official configuration (config/large_recep.yml, small_recep.yml): x0 prediction,
            # cosine schedule, T = 1000, one-hot mask in {0, 1}.
            return {"large_downsamplings": 5, "large_widths": [128, 128, 256, 256, 512, 512],
                    "small_widths": [128, 128, 256, 256, 256, 256, 256], "layers_per_block": 2,
                    "attention_resolution": 32, "attention_head_dim": 64, "norm_num_groups": 32,
                    "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                    "prediction_type": "sample", "mask_encoding": "onehot01", "mask_ce_weight": 0.0,
                    "grayscale_as_one_channel": False, "large_unshuffle": 1,
                    "u": 200, "receptive_field": "small"}
        return {}


# The laptop preset's method part (see DefectGenConfig.preset); module-level so the README table
# and the tests name one source.
LAPTOP: dict[str, Any] = {
    "large_unshuffle": 2, "large_downsamplings": 4, "large_widths": [24, 48, 64, 96, 96],
    "attention_resolution": 4, "attention_head_dim": 32,
    "small_widths": [8, 16, 32, 32, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 4,
    "num_train_timesteps": 1000, "prediction_type": "sample", "mask_encoding": "onehot01",
    "u": 200, "u_range": [100, 500], "receptive_field": "small",
}


@register
class DefectGen(Generator):
    """Two-UNet image ⊕ mask diffusion; see the module docstring for the mechanism.

    ``unet_large`` / ``unet_small`` are plain attributes called as ``unet(x, t, class_labels=...)``
    so a test (or a profiler) can hook or wrap them and see which model ran at which timestep.
    """

    config_class = DefectGenConfig

    def __init__(self, config: DefectGenConfig, context: GeneratorContext) -> None:
        super().__init__(config, context)
        self.num_mask_channels = context.max_classes + 1
        one = config.grayscale_as_one_channel and context.image_channels == 1
        self.image_channels = 1 if one else 3
        channels = self.image_channels + self.num_mask_channels
        res = context.resolution
        f = config.large_unshuffle
        if res % f:
            raise ValueError(f"method.large_unshuffle={f} needs data.resolution divisible by {f}, got {res}")
        large = build_large_unet(
            resolution=res // f, channels=channels * f * f, widths=config.large_widths,
            downsamplings=config.large_downsamplings, layers_per_block=config.layers_per_block,
            attention_resolution=config.attention_resolution, attention_head_dim=config.attention_head_dim,
            norm_num_groups=config.norm_num_groups)
        self.unet_large = UnshuffledUNet(large, f) if f > 1 else large
        self.unet_small = build_patch_unet(
            resolution=res, channels=channels, widths=config.small_widths,
            receptive_field=config.receptive_field, layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups)
        n_products = len(context.products)
        self.embed_large = LabelEmbedding(n_products, self.num_mask_channels, time_embed_dim(self.unet_large))
        self.embed_small = LabelEmbedding(n_products, self.num_mask_channels, time_embed_dim(self.unet_small))
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
            prediction_type=config.prediction_type, clip_sample=True, timestep_spacing="trailing")

    # ----------------------------------------------------------------------------- training
    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"unet_large": self.unet_large, "unet_small": self.unet_small,
                "embed_large": self.embed_large, "embed_small": self.embed_small}

    def stages(self) -> list[Stage]:
        """One stage: both models train jointly, each on the timesteps it may serve (``u_range``)."""
        return [Stage(STAGE, tuple(self.trainable_modules()))]

    def timestep_ranges(self) -> dict[str, tuple[int, int]]:
        """Half-open training ranges [lo, hi) of each UNet: large t >= u_range[0], small t < u_range[1]."""
        T = self.config.num_train_timesteps
        if self.config.u_range is None:
            return {"large": (0, T), "small": (0, T)}
        lo, hi = self.config.u_range
        return {"large": (lo, T), "small": (0, hi)}

    def encode(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``image`` B,3,H,W in [-1, 1] and ``mask`` B,H,W class ids -> x0 B,C+K+1,H,W.

        C = ``self.image_channels`` (grayscale: the mean of the three equal channels). The mask
        channels are the one-hot in {0, 1} (``onehot01``) or in {-1, 1} (``signed``).
        """
        k = self.num_mask_channels - 1
        if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) > k):
            raise ValueError(f"batch['mask'] holds class ids {int(mask.min())}..{int(mask.max())}; "
                             f"this generator knows 0..{k}")
        if self.image_channels == 1:
            image = image.mean(dim=1, keepdim=True)
        onehot = F.one_hot(mask.long(), self.num_mask_channels).permute(0, 3, 1, 2).to(image.dtype)
        if self.config.mask_encoding == "signed":
            onehot = onehot * 2 - 1
        return torch.cat([image, onehot], dim=1)

    def to_x0_space(self, out: torch.Tensor) -> torch.Tensor:
        """The model output as the scheduler expects it.

        With the mask cross-entropy (``mask_ce_weight`` > 0) the mask channels of an x0 prediction
        are class *logits* (that is what the CE trains); the x0 they stand for is their softmax,
        a point of the one-hot simplex like the training data ({0, 1}, or 2p - 1 for ``signed``).
        Handing raw logits to the sampler instead (what the official code's clamp to [-1, 1]
        does) puts x_t off the training distribution; measured here, samples collapsed to one
        pattern. Without the CE the output already is x0 (or ε / v).
        """
        if self.config.mask_ce_weight <= 0:
            return out
        c = self.image_channels
        probs = out[:, c:].float().softmax(dim=1).to(out.dtype)
        if self.config.mask_encoding == "signed":
            probs = probs * 2 - 1
        return torch.cat([out[:, :c], probs], dim=1)

    def x0_from_prediction(self, pred: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂0 from the model output under the configured parameterization."""
        kind = self.config.prediction_type
        if kind == "sample":
            return pred
        ab = self.noise_scheduler.alphas_cumprod.to(xt.device)[t].to(xt.dtype).view(-1, 1, 1, 1)
        if kind == "epsilon":
            return (xt - (1 - ab).sqrt() * pred) / ab.sqrt()
        return ab.sqrt() * xt - (1 - ab).sqrt() * pred  # v-prediction

    def training_step(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        """Each model's diffusion loss on its own timesteps (``timestep_ranges``); ``loss`` is their sum.

        ``mask_ce_weight`` = 0: MSE between the model output and its target on every channel.
        > 0 (the official ``seperate_channel_loss``): MSE on the image channels only, plus
        ``mask_ce_weight`` × cross-entropy of x̂0's mask channels (as class logits) against the mask.
        """
        if stage != STAGE:
            raise ValueError(f"defect-gen has one stage {STAGE!r}, not {stage!r}")
        image, mask = batch["image"], batch["mask"]
        res = self.context.resolution
        if image.ndim != 4 or image.shape[1:] != (3, res, res) or mask.shape != (image.shape[0], res, res):
            raise ValueError(f"batch: expected image B,3,{res},{res} and mask B,{res},{res}; "
                             f"got image {tuple(image.shape)}, mask {tuple(mask.shape)}")
        x0 = self.encode(image, mask)
        product, defect = batch["product"].long(), batch["defect"].long()
        sched = self.noise_scheduler
        ranges = self.timestep_ranges()
        c, w_ce = self.image_channels, self.config.mask_ce_weight
        losses: dict[str, torch.Tensor] = {}
        for name, unet, embed in (("large", self.unet_large, self.embed_large),
                                  ("small", self.unet_small, self.embed_small)):
            lo, hi = ranges[name]
            noise = torch.randn_like(x0)
            t = torch.randint(lo, hi, (x0.shape[0],), device=x0.device)
            xt = sched.add_noise(x0, noise, t)
            pred = unet(xt, t, class_labels=embed(product, defect)).sample.float()
            kind = sched.config.prediction_type
            target = (noise if kind == "epsilon" else
                      sched.get_velocity(x0, noise, t) if kind == "v_prediction" else x0).float()
            if w_ce > 0:
                x0_hat = self.x0_from_prediction(pred, xt.float(), t)
                ce = F.cross_entropy(x0_hat[:, c:], mask.long())
                losses[f"mse_{name}"] = F.mse_loss(pred[:, :c], target[:, :c])
                losses[f"ce_{name}"] = ce
                losses[f"loss_{name}"] = losses[f"mse_{name}"] + w_ce * ce
            else:
                losses[f"loss_{name}"] = F.mse_loss(pred, target)
        losses["loss"] = losses["loss_large"] + losses["loss_small"]
        return losses

    # ----------------------------------------------------------------------------- sampling
    def _labels(self, conditions: Conditions) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.context
        products, defects = [], []
        for p, d in zip(conditions.product, conditions.defect):
            if p not in ctx.products:
                raise KeyError(f"unknown product {p!r}; this generator knows {list(ctx.products)}")
            products.append(ctx.products.index(p))
            defects.append(0 if d == "good" else ctx.class_id(p, d))
        dev = self.device
        return (torch.tensor(products, dtype=torch.long, device=dev),
                torch.tensor(defects, dtype=torch.long, device=dev))

    def make_scheduler(self, sampler: str, steps: int | None) -> DDPMScheduler | DDIMScheduler:
        """A fresh scheduler on the training betas, its timestep grid set (``steps=None`` = all T)."""
        T = self.config.num_train_timesteps
        steps = T if steps is None else int(steps)
        if not 1 <= steps <= T:
            raise ValueError(f"sampling.steps={steps} must be in 1..{T} (method.num_train_timesteps)")
        from diffusers import DDIMScheduler, DDPMScheduler

        if sampler == "ddpm":
            sched = DDPMScheduler.from_config(self.noise_scheduler.config)
        elif sampler == "ddim":
            sched = DDIMScheduler.from_config(self.noise_scheduler.config)
        else:
            raise ValueError(f"sampling.sampler={sampler!r} is not one of ['ddpm', 'ddim']")
        # "trailing" makes the grid start at T-1 (pure noise) for any number of steps.
        sched.set_timesteps(steps, device=self.device)
        return sched

    @torch.no_grad()
    def sample(self, n: int, conditions: Conditions, seed: int,
               options: SamplingOptions | None = None) -> GeneratedBatch:
        """``n`` image + mask pairs on one reverse trajectory: large model for t >= u, small below.

        With DDIM (or DDPM with ``steps`` < T) the switch maps onto the step grid: grid points
        ``t >= u`` use the large model, the rest the small one, continuing from the same ``x``.
        ``options``: sampler, steps, chunk size and ``u`` (``SamplingOptions``; default: the
        checkpoint's). Reproducible for (``seed``, options): one ``torch.Generator`` on the model's device
        draws the initial noise and every DDPM step's noise in order.
        """
        if n != len(conditions):
            raise ValueError(f"sample: n={n} but conditions has {len(conditions)} entries")
        options = options or self.default_sampling
        u = self.sampling_config(options).u  # the options' u (checked against u_range), else the config's
        sampler, steps = options.sampler, options.steps
        product, defect = self._labels(conditions)
        batch_size = n if options.batch_size is None else int(options.batch_size)
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        chunks = [self._sample_chunk(product[i:i + batch_size], defect[i:i + batch_size], sampler, steps, u, gen)
                  for i in range(0, n, max(batch_size, 1))]
        x = torch.cat(chunks) if chunks else torch.zeros(0, self.image_channels + self.num_mask_channels,
                                                         self.context.resolution, self.context.resolution)
        images, masks = self.decode(x, conditions.product)
        return GeneratedBatch(images=images, masks=masks, product=list(conditions.product),
                              defect=list(conditions.defect),
                              extras={"sampler": sampler, "steps": steps, "u": u})

    def _sample_chunk(self, product: torch.Tensor, defect: torch.Tensor, sampler: str,
                      steps: int | None, u: int, gen: torch.Generator) -> torch.Tensor:
        sched = self.make_scheduler(sampler, steps)
        res = self.context.resolution
        x = torch.randn((len(product), self.image_channels + self.num_mask_channels, res, res), generator=gen,
                        device=self.device, dtype=next(self.unet_large.parameters()).dtype)
        emb_large, emb_small = self.embed_large(product, defect), self.embed_small(product, defect)
        for t in sched.timesteps:
            if int(t) >= u:
                out = self.unet_large(x, t, class_labels=emb_large).sample
            else:
                out = self.unet_small(x, t, class_labels=emb_small).sample
            x = sched.step(self.to_x0_space(out), t, x, generator=gen).prev_sample
        return x

    def decode(self, x: torch.Tensor, products: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """x B,C+K+1,H,W -> (images B,H,W,3 uint8, masks B,H,W uint8 class ids).

        The mask is the softmax + argmax (= the argmax) over the product's *valid* channels
        0..len(classes[product]) only: in multi-product mode K is the largest class count, and a
        product with fewer defect types must never receive an id it does not have. A one-channel
        (grayscale) image is repeated to three channels, the sample contract.
        """
        c = self.image_channels
        images = ((x[:, :c].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        if c == 1:
            images = images.expand(-1, -1, -1, 3)
        logits = x[:, c:].float().clone()
        for i, p in enumerate(products):
            logits[i, len(self.context.classes[p]) + 1:] = -torch.inf
        masks = logits.argmax(dim=1).to(torch.uint8)
        return images.cpu().numpy(), masks.cpu().numpy()
