"""DefectSynth: few-shot defect image + mask generation by modelling shape and appearance.

Mechanisms, as the paper writes them, on the shared backbone (``nn/backbone.py``: an SD-1.5
folder, frozen, else trained here in stage ``backbone`` on the run's own training images):

1. **Hybrid Mask Interpolation** (``methods/_hmi.py``), at sampling, seeded: a new mask between
   two real training masks of the requested type at alpha ~ U(0, 1), in image space (point-wise)
   for types whose real masks' mean area ratio is below ``tau`` (thin, small defects), else in
   the backbone's latent space (DDIM inversion, slerp, denoising). A latent interpolation that
   comes out empty falls back to the image-space one of the same pair (counted in the batch's
   ``extras["hmi_fallbacks"]``).
2. **ControlNet** (stage ``controlnet``, rows ``defective``): ``diffusers.ControlNetModel`` built
   from the backbone UNet (``from_unet``; its encoder is copied again from the trained UNet when
   the stage starts, ``begin_stage``), trained on mask -> defective image under the prompt
   "a {product} with {defect} defect" (dropped to "" with ``prompt_dropout``, the unconditional
   mode guidance needs). The backbone stays frozen. Sampling: DDIM with real classifier-free
   guidance (``guidance``; unconditional branch = the empty prompt with the *same* control),
   blended onto the defect-free image: generated inside the latent mask dilated by a radius that
   shrinks linearly with t (``blend_radius`` latent cells at t = T, 0 at the end), the noised
   normal latent outside; the last step keeps the normal latent itself outside the mask.
3. **Shape-aware expression (SAE)**: once per sample a real defect of the type (latent z_r, mask
   M_r: the interpolation's source) is aligned to the generated mask M_g by the rotation and
   shift maximising their overlap (``align``: a grid of angles, every shift at once by FFT
   cross-correlation); each step w = ||M_g||_1 softmax(mean_c((M_g ⊙ (z'_r - z_t))^2)) + 1
   (``sae_weights``, paper Eq. 7) multiplies the post-softmax cross-attention probabilities of the
   defect-name tokens (Eq. 8, ``nn/attention.py``). ``sae: clamped`` clips w to [1, 1.5] as the
   official code does; ``off`` disables it.
4. **Shape-aware feature fusion (SFF)**, after denoising: in each sample ``sff_rate``·h·w random
   latent points are replaced by ``sff_self``·itself + (1 - ``sff_self``) split evenly over their
   best matches (dot product of channel-normalised features) in the other samples of the batch
   of the same type, searched inside those samples' masks (defect features fuse with defect
   features; the issue leaves where to search open); only the mask region keeps the change.

Official-code bugs not copied: CFG 9 with ``unconditional_conditioning=None`` (no guidance at
all); the normal image encoded from [0, 1] while training used [-1, 1]; only a batch's first
sample kept; training on all test defects and testing the segmenter on all test images (ours: the
project's few-shot split, test held out). The dilation schedule of the blend is ours (linear in
t): the official schedule's constants were not available here to check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors import safe_open
from scipy import ndimage
from torch import nn

from defectforge.methods._hmi import IMAGE, LATENT, choose_space, interpolate_image, interpolate_latent
from defectforge.methods.base import (
    CheckpointError,
    Conditions,
    GeneratedBatch,
    Generator,
    GeneratorContext,
    SamplingOptions,
    Stage,
    read_checkpoint_meta,
    verified_weight_file,
)
from defectforge.methods.crop_paste import BANK, BANK_KEYS, CropBank, defect_region
from defectforge.methods.registry import register
from defectforge.nn.backbone import BACKBONE_PRESETS, MASK_CAPTION, Backbone, BackboneMethodConfig

CONTROLNET = "controlnet"
SAMPLING = {"sampling_time": True}


class DefectSynthConfig(BackboneMethodConfig):
    """DefectSynth's knobs (paper defaults; ``tiny`` / ``laptop`` shrink the backbone).

    Every field but ``backbone*``, ``controlnet_steps`` and ``prompt_dropout`` acts at sampling
    only (HMI, guidance, SAE, SFF, blending): sweep trials that differ only there share one
    trained model."""

    name: Literal["defect-synth"] = "defect-synth"
    tau: float = Field(0.053, ge=0, le=1, description="HMI: types whose real masks cover at least this share of the "
                                                      "image on average interpolate in latent space, others in image "
                                                      "space (paper 0.053)", json_schema_extra=SAMPLING)
    hmi_gap: float = Field(1.5, gt=0, description="image-space HMI: neighbouring points further apart than this "
                                                  "(px) get the segment between them filled",
                           json_schema_extra=SAMPLING)
    guidance: float = Field(9.0, ge=1, description="classifier-free guidance scale (paper 9; 1 = none)",
                            json_schema_extra=SAMPLING)
    sae: Literal["paper", "clamped", "off"] = Field("paper", description="shape-aware expression: Eq. 7 as "
                                                                         "written, clipped to [1, 1.5] (official "
                                                                         "code), or none", json_schema_extra=SAMPLING)
    sae_angles: int = Field(24, ge=1, le=360, description="SAE alignment: rotations tried (evenly over 360 degrees)",
                            json_schema_extra=SAMPLING)
    sff_rate: float = Field(0.2, ge=0, le=1, description="SFF: share of latent points fused per sample (paper 0.2)",
                            json_schema_extra=SAMPLING)
    sff_self: float = Field(0.7, ge=0, le=1, description="SFF: weight a fused point keeps of itself (paper 0.7)",
                            json_schema_extra=SAMPLING)
    blend_radius: int = Field(2, ge=0, le=16, description="blending: dilation of the latent mask at t = T (latent "
                                                          "cells), shrinking linearly to 0",
                              json_schema_extra=SAMPLING)
    prompt_dropout: float = Field(0.1, ge=0, le=1, description="controlnet stage: prompt -> '' (the unconditional "
                                                               "branch of guidance)")
    controlnet_steps: int | None = Field(None, ge=1, description="stage controlnet's steps (null = train.steps)")

    @classmethod
    def preset(cls, name: str) -> dict[str, Any]:
        if name == "tiny":
            return {"backbone": dict(BACKBONE_PRESETS["tiny"]), "sae_angles": 8}
        if name == "laptop":
            return {"backbone": dict(BACKBONE_PRESETS["laptop"]), "backbone_steps": 600, "backbone_lr": 5e-4,
                    "controlnet_steps": 300, "guidance": 5.0}
        if name == "paper":
            return {"backbone": dict(BACKBONE_PRESETS["paper"])}
        return {}

    @classmethod
    def run_preset(cls, name: str) -> dict[str, Any]:
        """laptop: a report every 100 steps (the global laptop preset's 200 is two thirds of the
        300-step ControlNet stage): an ASHA sweep stops a losing trial after 100 steps, not 200
        (measured: a stopped trial cost 108 s of a 16-min sweep, 87 s of it training)."""
        return {"train": {"checkpoint_every": 100}} if name == "laptop" else {}


def align(real: np.ndarray, target: np.ndarray, angles: int) -> tuple[float, int, int, int]:
    """The rotation (degrees, about the image centre) and then shift (dy, dx) of binary mask
    ``real`` that maximise its overlap (pixels) with ``target``: (angle, dy, dx, overlap).

    Every shift is scored at once by cross-correlation (``scipy.signal.fftconvolve`` with the
    flipped mask), for each of ``angles`` rotations; ties keep the first (smallest angle, then
    shift in raster order)."""
    from scipy.signal import fftconvolve  # here: scipy.signal costs ~0.6 s in every config-validating process

    h, w = target.shape
    tgt = (target > 0).astype(np.float64)
    best = (0.0, 0, 0, -1)
    for k in range(int(angles)):
        angle = 360.0 * k / int(angles)
        rot = rotate_mask(real, angle).astype(np.float64)
        corr = np.rint(fftconvolve(tgt, rot[::-1, ::-1], mode="full"))
        i, j = np.unravel_index(int(np.argmax(corr)), corr.shape)
        if corr[i, j] > best[3]:
            best = (angle, int(i) - (h - 1), int(j) - (w - 1), int(corr[i, j]))
    return best


def rotate_mask(mask: np.ndarray, angle: float) -> np.ndarray:
    return ndimage.rotate((mask > 0).astype(np.uint8), angle, reshape=False, order=0, mode="constant") > 0


def transform(array: np.ndarray, angle: float, dy: int, dx: int, order: int) -> np.ndarray:
    """Rotate about the centre, then shift by (dy, dx) (the transform ``align`` returns); H x W or
    H x W x C; what moves in from outside is the nearest edge value (images) or 0 (masks)."""
    mode = "nearest" if order else "constant"
    out = ndimage.rotate(array, angle, axes=(1, 0), reshape=False, order=order, mode=mode)
    shift = (dy, dx) + (0,) * (array.ndim - 2)
    return ndimage.shift(out, shift, order=0, mode=mode)


def sae_weights(mask: torch.Tensor, z_ref: torch.Tensor, z_t: torch.Tensor, mode: str) -> torch.Tensor:
    """Shape-aware expression weights (paper Eq. 7): B x h x w.

    ``mask`` (M_g) B x h x w in {0, 1} at latent resolution; ``z_ref`` (z'_r, the aligned real
    defect's latent) and ``z_t`` B x C x h x w. w = ||M_g||_1 softmax(mean_c((M_g ⊙ (z'_r - z_t))^2))
    + 1, the softmax over all h·w positions of each sample (outside M_g the argument is 0, as the
    equation is written). ``mode`` "clamped" clips w to [1, 1.5] (the official code)."""
    m = mask.float()
    s = ((m.unsqueeze(1) * (z_ref - z_t)) ** 2).mean(dim=1)
    area = m.flatten(1).sum(dim=1, keepdim=True)
    w = (area * torch.softmax(s.flatten(1), dim=1)).view_as(s) + 1
    return w.clamp(1.0, 1.5) if mode == "clamped" else w


def sff(z: torch.Tensor, mask: torch.Tensor, groups: list[Any], rate: float, keep: float,
        generator: torch.Generator) -> torch.Tensor:
    """Shape-aware feature fusion (module docstring, 4): B x C x h x w latents, ``mask`` B x 1 x h x w.

    ``groups[i]``: sample i's type; only samples of one type fuse. For each sample, round(rate·h·w)
    positions drawn from ``generator``; each becomes keep·itself + (1 - keep)·mean over the other
    samples j of the feature at j's best-matching masked position (largest dot product of the
    channel-normalised features). The result differs from ``z`` only inside ``mask``."""
    b, c, h, w = z.shape
    k = int(round(rate * h * w))
    if k == 0 or b < 2:
        return z
    flat = z.flatten(2)  # B x C x hw
    feats = F.normalize(flat, dim=1)
    inside = mask.flatten(1) > 0  # B x hw
    out = flat.clone()
    for i in range(b):
        points = torch.randperm(h * w, generator=generator)[:k].to(z.device)
        others = [j for j in range(b) if j != i and groups[j] == groups[i] and bool(inside[j].any())]
        if not others:
            continue
        fused = torch.zeros(c, k, dtype=z.dtype, device=z.device)
        for j in others:
            where = torch.nonzero(inside[j]).squeeze(1)
            best = where[(feats[i][:, points].T @ feats[j][:, where]).argmax(dim=1)]
            fused += flat[j][:, best]
        out[i][:, points] = keep * flat[i][:, points] + (1 - keep) * fused / len(others)
    out = out.view_as(z)
    return mask * out + (1 - mask) * z


@register
class DefectSynth(Generator):
    """See the module docstring. Modules: ``backbone`` (trained here or copied; a folder's is not a
    module of the checkpoint), ``controlnet``, ``bank`` (the training masks and defect images, as
    Crop-Paste keeps its crops: buffers whose shapes come from the data)."""

    config_class = DefectSynthConfig
    requires_normal_images = True

    def __init__(self, config: DefectSynthConfig, context: GeneratorContext) -> None:
        super().__init__(config, context)
        self.backbone = Backbone(config.backbone, context.products, context.resolution)
        self.controlnet = self._controlnet()
        self.bank = CropBank()

    def _controlnet(self) -> nn.Module:
        """A ControlNet copied from the backbone UNet; its mask embedding downsamples by the
        latent factor (one stride-2 level per factor of 2), the mask entering as one channel."""
        from diffusers import ControlNetModel

        f = self.backbone.downsample
        levels = int(round(np.log2(f))) + 1
        widths = (16, 32, 96, 256, 256)[:levels]
        return ControlNetModel.from_unet(self.backbone.unet, conditioning_embedding_out_channels=widths,
                                         conditioning_channels=1)

    # ----------------------------------------------------------------------------- training
    def trainable_modules(self) -> dict[str, nn.Module]:
        return {**self.backbone.trainable_modules(), CONTROLNET: self.controlnet}

    def saved_modules(self) -> dict[str, nn.Module]:
        return {**self.backbone.saved_modules(), CONTROLNET: self.controlnet, BANK: self.bank}

    def stages(self) -> list[Stage]:
        c = self.config
        return [*self.backbone.stages(steps=c.backbone_steps, lr=c.backbone_lr),
                Stage(CONTROLNET, (CONTROLNET,), steps=c.controlnet_steps, rows="defective")]

    def begin_stage(self, stage: str) -> None:
        """The ControlNet starts as a copy of the backbone UNet *as trained* (stage ``backbone``
        ran after construction, or its weights were loaded from a pretraining run)."""
        if stage == CONTROLNET:
            self.controlnet.load_state_dict(self._controlnet().to(self.backbone.device).state_dict())

    def prepare_from_data(self, rows: list[dict[str, Any]]) -> None:
        """Keep every training defect's mask (its own class, binary) and image at full frame."""
        self.backbone.initialise()  # a backbone copied from another defectforge checkpoint
        images, masks, products, classes = [], [], [], []
        for row in rows:
            if (found := defect_region(row, self.context)) is None:
                continue
            own, region = found
            images.append(np.asarray(row["image"], np.uint8))
            masks.append(region.astype(np.uint8))
            products.append(self.context.products.index(row["product"]))
            classes.append(own)
        if not masks:
            raise ValueError("defect-synth: the training rows hold no defect with a non-empty mask")
        h, w = masks[0].shape
        dev = self.bank.images.device
        self.bank.set(torch.from_numpy(np.stack(images)).to(dev), torch.from_numpy(np.stack(masks)).to(dev),
                      torch.tensor([[h, w]] * len(masks), dtype=torch.long, device=dev),
                      torch.tensor(products, dtype=torch.long, device=dev),
                      torch.tensor(classes, dtype=torch.long, device=dev))

    def load_modules(self, directory: str | Path, hashes: dict[str, str] | None = None,
                     names: list[str] | None = None) -> None:
        """The bank's buffers take the file's shapes first (they come from the data); then the
        shared loader checks hashes, keys and values of every module."""
        if hashes is None:
            hashes = read_checkpoint_meta(directory)["sha256"]
        if names is None or BANK in names:
            path = verified_weight_file(Path(directory), BANK, hashes)
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            except Exception as exc:  # safetensors' own SafetensorError
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
            if set(shapes) == set(BANK_KEYS):
                dev = self.bank.images.device
                self.bank.set(*(torch.zeros(shapes[k], dtype=getattr(self.bank, k).dtype, device=dev)
                                for k in BANK_KEYS))
        super().load_modules(directory, hashes, names)

    def _names(self, product: torch.Tensor, defect: torch.Tensor) -> list[tuple[str, str]]:
        out = []
        for p, d in zip(product.tolist(), defect.tolist()):
            name = self.context.products[p]
            if d <= 0:
                raise ValueError(f"defect-synth trains its ControlNet on defective rows only, got a defect-free "
                                 f"{name} row")
            out.append((name, self.context.classes[name][d - 1]))
        return out

    @staticmethod
    def prompt(product: str, defect: str) -> str:
        return f"a {product.replace('_', ' ')} with {defect.replace('_', ' ')} defect"

    def residuals(self, control: torch.Tensor) -> Any:
        """``extra`` for ``Backbone.denoise`` / ``guided``: the ControlNet's residuals for a batch
        (``control`` B x 1 x H x W in {0, 1}, repeated when guidance doubles the batch)."""
        def extra(z: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> dict[str, Any]:
            cond = control.repeat(z.shape[0] // control.shape[0], 1, 1, 1)
            down, mid = self.controlnet(z, t, encoder_hidden_states=states, controlnet_cond=cond, return_dict=False)
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return extra

    def training_step(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        if stage == "backbone":
            return self.backbone.pretraining_loss(batch)
        if stage != CONTROLNET:
            raise ValueError(f"defect-synth has stages backbone, {CONTROLNET}; not {stage!r}")
        bb = self.backbone
        names = self._names(batch["product"].long(), batch["defect"].long())
        n = len(names)
        dropped = (torch.rand(n) < self.config.prompt_dropout).tolist()
        states = bb.encode_text(["" if drop else self.prompt(*pd) for pd, drop in zip(names, dropped)])
        control = (batch["mask"] > 0).float().unsqueeze(1)
        z0 = bb.encode(batch["image"])
        noise = torch.randn_like(z0)
        t = torch.randint(0, int(bb.noise_scheduler.config.num_train_timesteps), (n,), device=z0.device)
        z_t = bb.noise_scheduler.add_noise(z0, noise, t)
        pred = bb.denoise(z_t, t, states, **self.residuals(control)(z_t, t, states))
        loss = F.mse_loss(pred.float(), bb.target(z0, noise, t).float())
        return {"loss": loss, "controlnet_mse": loss.detach()}

    # ----------------------------------------------------------------------------- sampling
    def _sampling(self, options: SamplingOptions | None) -> tuple[SamplingOptions, DefectSynthConfig]:
        options = options or self.default_sampling
        return options, self.sampling_config(options)

    def _bank_of(self, product: str, defect: str) -> np.ndarray:
        """Bank indices of a type (KeyError naming what the bank holds when it has none)."""
        if product not in self.context.products or defect not in self.context.classes.get(product, ()):
            raise KeyError(f"defect-synth does not know {product}/{defect}; it knows "
                           f"{', '.join(f'{p}/{d}' for p in self.context.products for d in self.context.classes[p])}")
        if len(self.bank) == 0:
            raise RuntimeError("defect-synth has no real masks: train it (prepare_from_data) or load a checkpoint")
        found = np.flatnonzero((self.bank.product.cpu().numpy() == self.context.products.index(product))
                               & (self.bank.class_id.cpu().numpy() == self.context.class_id(product, defect)))
        if len(found) == 0:
            raise KeyError(f"defect-synth kept no real mask of {product}/{defect} (none in its training rows)")
        return found

    def area_ratio(self, product: str, defect: str) -> float:
        """Mean share of the image the type's real training masks cover (HMI's space rule)."""
        masks = self.bank.masks[torch.from_numpy(self._bank_of(product, defect)).to(self.bank.masks.device)]
        return float(masks.float().mean())

    @torch.no_grad()
    def hmi_masks(self, conditions: Conditions, seed: int,
                  options: SamplingOptions | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One HMI mask per condition (N x H x W uint8 {0, 1}), the bank index of each one's source
        mask (SAE aligns that real defect), and what was done (space per sample, fallbacks)."""
        options, cfg = self._sampling(options)
        masks_np = self.bank.masks.cpu().numpy()
        out = np.zeros((len(conditions),) + masks_np.shape[1:], np.uint8)
        sources = np.zeros(len(conditions), np.int64)
        spaces, latent = [], []
        for i, (p, d) in enumerate(zip(conditions.product, conditions.defect)):
            choices = self._bank_of(p, d)
            rng = np.random.default_rng([int(seed), i, 17])
            a, b = (rng.choice(choices, 2, replace=False) if len(choices) > 1 else (choices[0], choices[0]))
            alpha = float(rng.uniform())
            sources[i] = a
            space = choose_space(self.area_ratio(p, d), cfg.tau)
            spaces.append(space)
            if space == LATENT:
                latent.append((i, a, b, alpha))
            else:
                out[i] = interpolate_image(masks_np[a], masks_np[b], alpha, cfg.hmi_gap)
        fallbacks = 0
        if latent:
            idx, a, b, alpha = (np.array(v) for v in zip(*latent))
            drawn = interpolate_latent(self.backbone, masks_np[a], masks_np[b], alpha, options.steps or 25,
                                       MASK_CAPTION)
            for j, i in enumerate(idx):
                if drawn[j].any():
                    out[i] = drawn[j]
                else:  # an empty latent interpolation: the image-space one of the same pair
                    out[i] = interpolate_image(masks_np[a[j]], masks_np[b[j]], float(alpha[j]), cfg.hmi_gap)
                    spaces[i] = IMAGE
                    fallbacks += 1
        return out, sources, {"hmi_space": spaces, "hmi_fallbacks": fallbacks}

    def aligned_references(self, masks: np.ndarray, sources: np.ndarray, angles: int) -> torch.Tensor:
        """z'_r per sample: the source real defect image rotated and shifted onto its HMI mask
        (``align``), encoded."""
        images = []
        bank_images, bank_masks = self.bank.images.cpu().numpy(), self.bank.masks.cpu().numpy()
        for mask, src in zip(masks, sources):
            angle, dy, dx, _ = align(bank_masks[src], mask, angles)
            images.append(transform(bank_images[src], angle, dy, dx, order=1))
        x = torch.from_numpy(np.stack(images)).to(self.backbone.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        return self.backbone.encode(x)

    def defect_tokens(self, products: list[str], defects: list[str]) -> torch.Tensor:
        """B x L bool: the tokens of " {defect} defect" in each prompt (what SAE re-weights)."""
        tok, L = self.backbone.tokenizer, self.backbone.max_tokens
        rows = []
        for p, d in zip(products, defects):
            full = tok(self.prompt(p, d)).input_ids[:L]
            head = tok(self.prompt(p, d).rsplit(" with ", 1)[0] + " with").input_ids[:-1]
            if full[:len(head)] != head:
                raise ValueError(f"{type(tok).__name__} does not tokenise {self.prompt(p, d)!r} with its prefix first")
            end = len(full) - 1 if full[-1] == tok.eos_token_id else len(full)
            rows.append([len(head) <= j < end for j in range(L)])
        return torch.tensor(rows, device=self.backbone.device)

    @torch.no_grad()
    def synthesize(self, normal: torch.Tensor, masks: np.ndarray, sources: np.ndarray, products: list[str],
                   defects: list[str], seed: int, options: SamplingOptions | None = None,
                   return_latent: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images (B x 3 x H x W in [-1, 1]) generated inside ``masks`` on ``normal`` (module
        docstring, 2-4); with ``return_latent`` also the final latent (= encode(normal) outside
        the latent mask exactly)."""
        from defectforge.nn.attention import AttentionControl, controlled

        options, cfg = self._sampling(options)
        bb = self.backbone
        n, dev = normal.shape[0], bb.device
        g = torch.Generator().manual_seed(int(seed))
        y0 = bb.encode(normal)
        f = bb.downsample
        mask_t = torch.from_numpy(masks).to(dev).float().unsqueeze(1)
        m_lat = F.max_pool2d(mask_t, kernel_size=f, stride=f)
        states = bb.encode_text([self.prompt(p, d) for p, d in zip(products, defects)])
        uncond = bb.encode_text([""] * n) if cfg.guidance != 1.0 else None
        extra = self.residuals(mask_t)
        control = None
        if cfg.sae != "off":
            z_ref = self.aligned_references(masks, sources, cfg.sae_angles)
            tokens = self.defect_tokens(products, defects)
            control = AttentionControl(tokens=tokens if uncond is None else torch.cat([tokens,
                                                                                       torch.zeros_like(tokens)]))
        T = int(bb.noise_scheduler.config.num_train_timesteps)
        with controlled(bb.unet, control):
            sched = bb.make_scheduler(options.sampler, options.steps)
            z = torch.randn(y0.shape, generator=g).to(dev)
            steps = list(sched.timesteps)
            for i, t in enumerate(steps):
                tt = torch.full((n,), int(t), device=dev, dtype=torch.long)
                if control is not None:
                    control.weight = sae_weights(m_lat[:, 0], z_ref, z, cfg.sae)
                z = bb.step(sched, options.sampler, bb.guided(z, tt, states, uncond, cfg.guidance, extra), t, z, g)
                if i + 1 < len(steps):  # generated inside the dilated mask, the noised normal latent outside
                    t_next = int(steps[i + 1])
                    r = int(round(cfg.blend_radius * t_next / T))
                    region = F.max_pool2d(m_lat, 2 * r + 1, stride=1, padding=r) if r else m_lat
                    background = bb.noise_scheduler.add_noise(
                        y0, torch.randn(y0.shape, generator=g).to(dev),
                        torch.full((n,), t_next, device=dev, dtype=torch.long))
                else:
                    region, background = m_lat, y0
                z = z * region + background * (1 - region)
        groups = list(zip(products, defects))
        z = sff(z, m_lat, groups, cfg.sff_rate, cfg.sff_self, g)
        images = bb.decode(z).clamp(-1, 1)
        return (images, z) if return_latent else images

    @torch.no_grad()
    def sample(self, n: int, conditions: Conditions, seed: int,
               options: SamplingOptions | None = None) -> GeneratedBatch:
        normal = self.normal_images(n, conditions)
        masks, sources, info = self.hmi_masks(conditions, seed, options)
        images = self.synthesize(normal, masks, sources, list(conditions.product), list(conditions.defect), seed,
                                 options)
        return self.pairs(images, masks, conditions, extras={"method": "defect-synth", **info})
