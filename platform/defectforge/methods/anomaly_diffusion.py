"""AnomalyDiffusion (Hu et al., AAAI 2024): few-shot anomaly image + mask generation on a frozen LDM.

Mechanisms, as the paper writes them, on the shared backbone (``nn/backbone.py``: an SD-1.x
folder, else trained here in stage ``backbone`` on the run's own training images):

1. **Spatial anomaly embedding** (stage ``anomaly``): ``k`` learned token vectors per
   (product, defect type) carry the defect's appearance; one spatial encoder for all types (the
   paper's ResNet-50 + FPN; here a small CNN with a feature pyramid, ``SpatialEncoder``) turns
   the mask into ``n`` more tokens that carry *where*. Both are spliced into the prompt
   "a photo of a defective {product} <k + n slots>" at the text encoder's token-embedding level
   (``Backbone.encode_ids``), as the official code's textual inversion does. The backbone stays
   frozen: only the embeddings and the encoder learn.
2. **Masked loss**: the diffusion MSE only inside the mask, max-pooled to latent resolution: the
   embeddings learn the defect, not the background around it. The paper's ε-MSE on an
   ε-prediction backbone; on the x0-prediction backbone trained here the x0-MSE (``masked_loss``).
3. **Blended sampling** onto a defect-free image y (``Conditions.normal_image``): each step
   x_{t-1} = step(x_t)·m + q(y_{t-1} | y_0)·(1 - m) in latent space; the last step blends with
   y_0 itself, so outside the latent mask the result *is* y (exactly, with the pixel-unshuffle
   latent). The returned mask is m.
4. **Adaptive attention re-weighting** (``aar: paper``): from x̂0 = decode(ẑ0),
   d = ||m⊙y - m⊙x̂0||² per pixel, w = ||m||₁·softmax(f(d)) with f = 1/d and -inf where d = 0
   (outside m, and where x̂0 already equals y), and the post-softmax cross-attention
   probabilities of the embedding tokens are multiplied by w (``nn/attention.py``): attention is
   pushed to where the image still looks normal. The official code scales pre-softmax logits,
   clamped to [1, 1.5]; we follow the paper. One UNet call per step: the weight of step t comes
   from the x̂0 of step t+1 (none at the first step).
5. **Mask embedding** (stage ``mask``): ``k_mask`` vectors per defect type learned by textual
   inversion on the real masks drawn as images ("a defect mask <slots>", the caption the backbone
   pretrained masks under). Sampling draws a mask with classifier-free guidance
   (``mask_guidance``; unconditional = the empty prompt), binarises it, redraws empty or
   border-touching ones, then generates the image on it.

Not copied from the official code (github.com/sjtuplayer/anomalydiffusion): its split trains on
ids 0..floor(n/3) inclusive, so one image is also in test (ours: the project's few-shot split,
disjoint by assertion); its downstream model is picked on the test set (ours: on validation);
masks saved as JPEG (ours: PNG); a BERT fetched at run time (ours: a local backbone).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from defectforge.methods.base import Conditions, GeneratedBatch, Generator, GeneratorContext, SamplingOptions, Stage
from defectforge.methods.registry import register
from defectforge.nn.backbone import BACKBONE_PRESETS, MASK_CAPTION, Backbone, BackboneMethodConfig

ANOMALY, MASK = "anomaly", "mask"


class AnomalyDiffusionConfig(BackboneMethodConfig):
    """AnomalyDiffusion's knobs (paper defaults; ``tiny`` / ``laptop`` shrink the backbone).

    ``sampling_time`` fields (``aar``, ``mask_guidance``, ``image_guidance``, ``mask_attempts``)
    change sampling only: sweep trials that differ in them reuse one trained model."""

    name: Literal["anomaly-diffusion"] = "anomaly-diffusion"
    k: int = Field(8, ge=1, le=32, description="anomaly embedding vectors per (product, defect type) (paper 8)")
    n: int = Field(4, ge=1, le=16, description="tokens the spatial encoder makes from the mask (paper 4)")
    k_mask: int = Field(4, ge=1, le=16, description="mask embedding vectors per defect type (paper 4)")
    encoder_widths: tuple[int, ...] = Field((32, 64, 128), description="spatial encoder: channels per pyramid level")
    aar: Literal["paper", "off"] = Field("paper", description="adaptive attention re-weighting",
                                         json_schema_extra={"sampling_time": True})
    mask_guidance: float = Field(5.0, ge=1, description="classifier-free guidance of the mask draw (1 = none)",
                                 json_schema_extra={"sampling_time": True})
    image_guidance: float = Field(1.0, ge=1, description="classifier-free guidance of the image (1 = none)",
                                  json_schema_extra={"sampling_time": True})
    mask_attempts: int = Field(6, ge=1, description="draws per mask before keeping the last (border cleared)",
                               json_schema_extra={"sampling_time": True})
    anomaly_steps: int | None = Field(None, ge=1, description="stage anomaly's steps (null = train.steps)")
    mask_steps: int | None = Field(None, ge=1, description="stage mask's steps (null = train.steps)")

    @classmethod
    def preset(cls, name: str) -> dict[str, Any]:
        if name == "tiny":
            return {"backbone": dict(BACKBONE_PRESETS["tiny"]), "k": 2, "n": 2, "k_mask": 2,
                    "encoder_widths": [8, 16, 16]}
        if name == "laptop":
            # measured (README, "AnomalyDiffusion"): ~4.5 min of pretraining + ~3 min of the
            # method's stages on one core; the embeddings at train.lr (the laptop preset's 1e-3)
            return {"backbone": dict(BACKBONE_PRESETS["laptop"]), "k": 8, "n": 4, "k_mask": 4,
                    "encoder_widths": [16, 32, 64], "backbone_steps": 600, "backbone_lr": 5e-4,
                    "anomaly_steps": 300, "mask_steps": 300,
                    # measured: the paper's mask guidance 5 drew speckled masks (~17 components,
                    # 4x the real area) from embeddings trained this briefly; 1 drew single blobs
                    # (area ratio 0.78); image guidance 5 took the in-mask contrast ratio 0.16 -> 0.62
                    "mask_guidance": 1.0, "image_guidance": 5.0}
        if name == "paper":
            return {"backbone": dict(BACKBONE_PRESETS["paper"]), "k": 8, "n": 4, "k_mask": 4,
                    "encoder_widths": [64, 128, 256]}
        return {}


class SpatialEncoder(nn.Module):
    """Mask (B x 1 x H x W in {0, 1}) -> ``n`` token vectors, through a small feature pyramid.

    A strided CNN (one level per ``widths`` entry, each halving the map), an FPN top-down pass
    (1x1 laterals, upsample-and-add), each level average-pooled, concatenated, and a linear map to
    ``n`` x ``dim``. The linear map starts at zero and adds to ``init``, a token embedding, so the
    spatial tokens begin as ordinary words and learn to say where the defect is."""

    def __init__(self, widths: tuple[int, ...], dim: int, n: int, init: torch.Tensor) -> None:
        super().__init__()
        chans = (1, *widths)
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1), nn.GroupNorm(1, chans[i + 1]),
                          nn.SiLU(), nn.Conv2d(chans[i + 1], chans[i + 1], 3, padding=1), nn.SiLU())
            for i in range(len(widths)))
        fpn = widths[0]
        self.laterals = nn.ModuleList(nn.Conv2d(w, fpn, 1) for w in widths)
        self.out = nn.Linear(fpn * len(widths), n * dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.init = nn.Parameter(init.detach().clone().expand(n, dim).clone())
        self.n, self.dim = n, dim

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        feats, x = [], mask
        for level in self.levels:
            x = level(x)
            feats.append(x)
        pyramid = [self.laterals[-1](feats[-1])]
        for i in range(len(feats) - 2, -1, -1):
            up = F.interpolate(pyramid[0], size=feats[i].shape[-2:], mode="nearest")
            pyramid.insert(0, self.laterals[i](feats[i]) + up)
        pooled = torch.cat([p.mean(dim=(2, 3)) for p in pyramid], dim=1)
        return self.init.unsqueeze(0) + self.out(pooled).view(-1, self.n, self.dim)


def aar_weights(mask: torch.Tensor, normal: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
    """Adaptive attention re-weighting map (paper Eq. 8-9): B x H x W.

    ``mask`` B x H x W in {0, 1}; ``normal`` (y) and ``x0_hat`` B x C x H x W. d = per-pixel
    squared distance of m⊙y and m⊙x̂0 summed over channels; f = 1/d where d > 0, -inf where
    d = 0 (so outside m and wherever x̂0 already equals y the weight is 0); w = ||m||₁·softmax(f)
    over the pixels of each image. A mask-free image gets all-zero weights (nothing to re-weight)."""
    m = mask.float()
    d = ((m.unsqueeze(1) * (normal - x0_hat)) ** 2).sum(dim=1)
    f = torch.where(d > 0, 1.0 / d.clamp_min(1e-30), torch.full_like(d, float("-inf")))
    flat = f.flatten(1)
    area = m.flatten(1).sum(dim=1, keepdim=True)
    finite = torch.isfinite(flat).any(dim=1, keepdim=True)
    soft = torch.where(finite, torch.softmax(torch.where(finite, flat, torch.zeros_like(flat)), dim=1),
                       torch.zeros_like(flat))
    return (area * soft).view_as(d)


def border_touching(mask: np.ndarray, width: int) -> bool:
    """Whether a binary mask has foreground within ``width`` pixels of the image border."""
    return bool(mask[:width].any() or mask[-width:].any() or mask[:, :width].any() or mask[:, -width:].any())


@register
class AnomalyDiffusion(Generator):
    """See the module docstring. Modules: ``backbone`` (trained here or copied; a folder's is not a
    module of the checkpoint), ``anomaly`` (embeddings + spatial encoder), ``mask_embedding``."""

    config_class = AnomalyDiffusionConfig
    requires_normal_images = True

    def __init__(self, config: AnomalyDiffusionConfig, context: GeneratorContext) -> None:
        super().__init__(config, context)
        self.backbone = Backbone(config.backbone, context.products, context.resolution)
        self.types = [(p, d) for p in context.products for d in context.classes[p]]
        self.type_index = {t: i for i, t in enumerate(self.types)}
        dim = int(self.backbone.text_encoder.get_input_embeddings().weight.shape[1])
        init = self._word_row()
        self.anomaly = nn.ModuleDict({
            "embeddings": nn.ParameterList([nn.Parameter(v) for v in self._near_word(init, config.k, len(self.types))]),
            "encoder": SpatialEncoder(tuple(config.encoder_widths), dim, config.n, init)})
        self.mask_embedding = nn.ParameterList([nn.Parameter(v) for v in
                                                self._near_word(init, config.k_mask, len(self.types))])

    @torch.no_grad()
    def _word_row(self) -> torch.Tensor:
        """The mean token row of the word "defect" in the text encoder's embedding table: where
        every learned vector starts (textual inversion starts from a word; the official code's is
        "crack")."""
        table = self.backbone.text_encoder.get_input_embeddings()
        ids = self.backbone.tokenize(["defect"])[0]
        keep = (ids != self.backbone.tokenizer.pad_token_id).float().unsqueeze(1)
        return (table(ids) * keep).sum(0) / keep.sum()  # (no boolean indexing: builds on the meta device)

    @staticmethod
    def _near_word(init: torch.Tensor, rows: int, count: int) -> list[torch.Tensor]:
        """``count`` tensors of ``rows`` copies of ``init`` with a small seeded jitter (1 % of its
        norm per dimension), so the vectors of a type do not start identical."""
        g = torch.Generator().manual_seed(0)
        dim = init.shape[-1]
        jitter = 0.01 * init.norm() / dim**0.5
        return [init + jitter * torch.randn(rows, dim, generator=g, device="cpu").to(init.device)
                for _ in range(count)]

    def begin_stage(self, stage: str) -> None:
        """The stage's vectors restart at the word "defect" of the text encoder *as trained*.

        Why: they are built with the model, before stage ``backbone`` trains the text encoder (or
        before ``initialise`` copies a trained one in), so at construction "defect" is a row of a
        random table; textual inversion must start from the word as the frozen encoder knows it.
        Measured (README, "AnomalyDiffusion"): starting from the random table's row the trained
        embeddings did no better than untrained ones."""
        if stage not in (ANOMALY, MASK):
            return
        init = self._word_row()
        with torch.no_grad():
            if stage == ANOMALY:
                for p, v in zip(self.anomaly["embeddings"], self._near_word(init, self.config.k, len(self.types))):
                    p.copy_(v)
                self.anomaly["encoder"].init.copy_(init.expand_as(self.anomaly["encoder"].init))
            else:
                for p, v in zip(self.mask_embedding, self._near_word(init, self.config.k_mask, len(self.types))):
                    p.copy_(v)

    # ----------------------------------------------------------------------------- training
    def trainable_modules(self) -> dict[str, nn.Module]:
        return {**self.backbone.trainable_modules(), "anomaly": self.anomaly, "mask_embedding": self.mask_embedding}

    def saved_modules(self) -> dict[str, nn.Module]:
        return {**self.backbone.saved_modules(), "anomaly": self.anomaly, "mask_embedding": self.mask_embedding}

    def stages(self) -> list[Stage]:
        c = self.config
        return [*self.backbone.stages(steps=c.backbone_steps, lr=c.backbone_lr),
                Stage(ANOMALY, ("anomaly",), steps=c.anomaly_steps, rows="defective"),
                Stage(MASK, ("mask_embedding",), steps=c.mask_steps, rows="defective")]

    def prepare_from_data(self, rows: list[dict[str, Any]]) -> None:
        self.backbone.initialise()  # a backbone copied from another defectforge checkpoint

    def _type_ids(self, product: torch.Tensor, defect: torch.Tensor) -> list[int]:
        out = []
        for p, d in zip(product.tolist(), defect.tolist()):
            name = self.context.products[p]
            if d <= 0:
                raise ValueError(f"anomaly-diffusion trains on defective rows only, got a defect-free {name} row")
            out.append(self.type_index[(name, self.context.classes[name][d - 1])])
        return out

    def _latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Pixel mask B x H x W -> B x 1 x h x w at latent resolution, max-pooled (any defect pixel
        in a latent cell marks the cell)."""
        f = self.backbone.downsample
        return F.max_pool2d(mask.float().unsqueeze(1), kernel_size=f, stride=f)

    def anomaly_states(self, products: list[str], type_ids: list[int], mask: torch.Tensor) -> torch.Tensor:
        """Text states of "a photo of a defective {product} <k anomaly + n spatial slots>"."""
        c = self.config
        ids, slots = self.backbone.slot_ids([f"a photo of a defective {p}" for p in products], c.k + c.n)
        vecs = torch.cat([torch.stack([self.anomaly["embeddings"][i] for i in type_ids]),
                          self.anomaly["encoder"](mask.float().unsqueeze(1))], dim=1)
        return self.backbone.encode_ids(ids, self.backbone.splice(ids, slots, vecs)), slots

    def mask_states(self, type_ids: list[int]) -> torch.Tensor:
        ids, slots = self.backbone.slot_ids([MASK_CAPTION] * len(type_ids), self.config.k_mask)
        vecs = torch.stack([self.mask_embedding[i] for i in type_ids])
        return self.backbone.encode_ids(ids, self.backbone.splice(ids, slots, vecs))

    def training_step(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        if stage == "backbone":
            return self.backbone.pretraining_loss(batch)
        if stage not in (ANOMALY, MASK):
            raise ValueError(f"anomaly-diffusion has stages backbone, {ANOMALY}, {MASK}; not {stage!r}")
        image, mask = batch["image"], batch["mask"]
        type_ids = self._type_ids(batch["product"].long(), batch["defect"].long())
        binary = (mask > 0).float()
        bb = self.backbone
        if stage == ANOMALY:
            products = [self.context.products[p] for p in batch["product"].tolist()]
            states, _ = self.anomaly_states(products, type_ids, binary)
            z0 = bb.encode(image)
        else:
            states = self.mask_states(type_ids)
            z0 = bb.encode((binary * 2 - 1).unsqueeze(1).expand_as(image))
        noise = torch.randn_like(z0)
        t = torch.randint(0, int(bb.noise_scheduler.config.num_train_timesteps), (z0.shape[0],), device=z0.device)
        z_t = bb.noise_scheduler.add_noise(z0, noise, t)
        pred = bb.denoise(z_t, t, states).float()
        target = bb.target(z0, noise, t).float()
        if stage == MASK:
            loss = F.mse_loss(pred, target)
            return {"loss": loss, "mask_mse": loss.detach()}
        return {"loss": self.masked_loss(pred, target, self._latent_mask(mask))}

    @staticmethod
    def masked_loss(pred: torch.Tensor, target: torch.Tensor, latent_mask: torch.Tensor) -> torch.Tensor:
        """The diffusion MSE inside the latent mask only (mean over the masked latent values), in
        the backbone's own parameterisation: the paper's ε-MSE on an ε-prediction backbone (an SD
        folder). On the x0-prediction backbone trained here the ε-MSE would weight each timestep by
        its signal-to-noise ratio (ᾱ/(1-ᾱ), ~1e5 at the smallest t of the cosine schedule), so a few
        near-clean samples would drive the embeddings; the x0-MSE keeps every t at its usual weight.
        Either way nothing outside the mask contributes (the prediction's gradient there is 0)."""
        m = latent_mask.expand_as(pred)
        return ((pred - target) ** 2 * m).sum() / m.sum().clamp_min(1.0)

    # ----------------------------------------------------------------------------- sampling
    def _sampling(self, options: SamplingOptions | None) -> tuple[SamplingOptions, AnomalyDiffusionConfig]:
        options = options or self.default_sampling
        return options, self.sampling_config(options)

    @torch.no_grad()
    def sample_masks(self, type_ids: list[int], seed: int, options: SamplingOptions | None = None) -> np.ndarray:
        """Binary masks (N x H x W uint8 in {0, 1}) drawn from the mask embeddings with CFG;
        empty or border-touching draws are redrawn up to ``mask_attempts`` times, then the last
        draw is kept with its border ring cleared (it may then be empty: the caller redraws)."""
        options, cfg = self._sampling(options)
        res = self.context.resolution
        ring = max(1, res // 32)
        out = np.zeros((len(type_ids), res, res), np.uint8)
        todo = list(range(len(type_ids)))
        for attempt in range(cfg.mask_attempts):
            if not todo:
                break
            states = self.mask_states([type_ids[i] for i in todo])
            imgs = self._draw(states, seed * 7_919 + attempt, options, cfg.mask_guidance)
            draws = (imgs.mean(dim=1) > 0).cpu().numpy().astype(np.uint8)
            keep = []
            for j, i in enumerate(todo):
                out[i] = draws[j]
                if not draws[j].any() or border_touching(draws[j], ring):
                    keep.append(i)
            todo = keep
        for i in todo:
            out[i][:ring], out[i][-ring:], out[i][:, :ring], out[i][:, -ring:] = 0, 0, 0, 0
        return out

    def _draw(self, states: torch.Tensor, seed: int, options: SamplingOptions, guidance: float) -> torch.Tensor:
        """Plain (unblended) sampling from ``states``: the mask draw."""
        return self.backbone.sample_states(states, seed, options.sampler, options.steps, guidance)

    @torch.no_grad()
    def blend_sample(self, normal: torch.Tensor, mask: torch.Tensor, products: list[str], type_ids: list[int],
                     seed: int, options: SamplingOptions | None = None,
                     return_latent: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images (B x 3 x H x W in [-1, 1]) generated inside ``mask`` on the defect-free ``normal``
        images (blended sampling with AAR; module docstring, 3-4); with ``return_latent`` also the
        final latent, which equals encode(normal) outside the latent mask exactly. In pixels that
        holds exactly for the pixel-unshuffle latent; a VAE's decoder mixes cells (convolutions,
        its mid-block attention and GroupNorm statistics), so there the background is decode of a
        latent that differs only inside the mask (a random tiny VAE in the tests moved it by 0.26
        on average in [-1, 1]; a trained SD VAE far less), as in the paper."""
        from defectforge.nn.attention import AttentionControl, controlled

        options, cfg = self._sampling(options)
        bb = self.backbone
        n = normal.shape[0]
        g = torch.Generator().manual_seed(int(seed))
        y0 = bb.encode(normal)
        m_lat = self._latent_mask(mask)
        states, slots = self.anomaly_states(products, type_ids, mask.float())
        uncond = bb.encode_text([""] * n) if cfg.image_guidance != 1.0 else None
        # With guidance the UNet runs [conditional; unconditional] in one batch (``Backbone.guided``): the
        # weight applies to the embedding tokens of the conditional half only.
        tokens = slots if uncond is None else torch.cat([slots, torch.zeros_like(slots)])
        control = AttentionControl(tokens=tokens) if cfg.aar == "paper" else None
        with controlled(bb.unet, control):
            sched = bb.make_scheduler(options.sampler, options.steps)
            z = torch.randn(y0.shape, generator=g).to(bb.device)
            steps = list(sched.timesteps)
            for i, t in enumerate(steps):
                tt = torch.full((n,), int(t), device=bb.device, dtype=torch.long)
                pred = bb.guided(z, tt, states, uncond, cfg.image_guidance)
                if control is not None:  # the weight of the next step, from this step's x̂0 (one call per step)
                    x0_hat = bb.decode(bb.to_x0(pred, z, tt)).clamp(-1, 1)
                    control.weight = aar_weights(mask.float(), normal, x0_hat)
                z = bb.step(sched, options.sampler, pred, t, z, g)
                if i + 1 < len(steps):  # the defect-free image at the next step's noise level
                    t_next = torch.full((n,), int(steps[i + 1]), device=bb.device, dtype=torch.long)
                    background = bb.noise_scheduler.add_noise(y0, torch.randn(y0.shape, generator=g).to(bb.device),
                                                              t_next)
                else:
                    background = y0
                z = z * m_lat + background * (1 - m_lat)
        images = bb.decode(z).clamp(-1, 1)
        return (images, z) if return_latent else images

    @torch.no_grad()
    def sample(self, n: int, conditions: Conditions, seed: int,
               options: SamplingOptions | None = None) -> GeneratedBatch:
        normal = self.normal_images(n, conditions)
        type_ids = []
        for p, d in zip(conditions.product, conditions.defect):
            if (p, d) not in self.type_index:
                raise KeyError(f"anomaly-diffusion has no embedding for {p}/{d}; it knows "
                               f"{', '.join(f'{a}/{b}' for a, b in self.types)}")
            type_ids.append(self.type_index[(p, d)])
        masks = self.sample_masks(type_ids, seed, options)
        images = self.blend_sample(normal, torch.from_numpy(masks).to(normal.device), list(conditions.product),
                                   type_ids, seed, options)
        return self.pairs(images, masks, conditions)
