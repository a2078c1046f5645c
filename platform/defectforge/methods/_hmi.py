"""DefectSynth's Hybrid Mask Interpolation (HMI): a new defect mask between two real ones.

Why two spaces (the paper's finding): small, thin defects (scratches, cracks) keep their shape
best when their pixels are moved point by point (image space); large blob-like ones (stains,
holes) interpolate more naturally through the diffusion model's latent space, which knows what a
plausible mask looks like. A type chooses once, by its real masks' mean area ratio against
``tau`` (``choose_space``).

* **image space** (``interpolate_image``): both masks' foreground pixel coordinates in row-major
  order, the shorter list resampled to the longer one's length (evenly spaced indices, each
  source point kept at least once, so alpha = 0 / 1 give the source / target mask exactly),
  interpolated by alpha, gaps that opened between neighbouring points filled with points on the
  segment, rasterised, closed (3 x 3) and hole-filled;
* **latent space** (``interpolate_latent``): both masks drawn as images (white on black, the
  caption the backbone pretrained masks under), encoded, DDIM-inverted to noise with the
  backbone (``diffusers.DDIMInverseScheduler``), spherically interpolated, denoised with DDIM and
  binarised.

This file is a helper of ``defect_synth.py`` (method discovery skips ``_`` files).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage

if TYPE_CHECKING:  # pragma: no cover
    from defectforge.nn.backbone import Backbone

IMAGE, LATENT = "image", "latent"


def choose_space(area_ratio: float, tau: float) -> str:
    """The paper's rule: a type whose real masks cover on average at least ``tau`` of the image
    interpolates in latent space, a smaller one in image space."""
    return LATENT if area_ratio >= tau else IMAGE


def _points(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask > 0).astype(np.float64)  # row-major (y, x)


def _resample(points: np.ndarray, n: int) -> np.ndarray:
    """``points`` at ``n`` evenly spaced indices (nearest index: every point is kept, none is
    invented between two that are far apart in the list)."""
    idx = np.rint(np.linspace(0, len(points) - 1, n)).astype(int)
    return points[idx]


def _fill_gaps(points: np.ndarray, open_gap: np.ndarray) -> np.ndarray:
    """Points on the segments between consecutive ``points`` where ``open_gap`` (at most 0.5 px
    apart, so the rasterised segment is 8-connected)."""
    extra = []
    for i in np.flatnonzero(open_gap):
        a, b = points[i], points[i + 1]
        k = int(np.ceil(np.linalg.norm(b - a) / 0.5))
        extra.append(a + (b - a) * np.linspace(0, 1, k + 1)[1:-1, None])
    return np.concatenate([points, *extra]) if extra else points


def interpolate_image(source: np.ndarray, target: np.ndarray, alpha: float, gap: float = 1.5) -> np.ndarray:
    """Image-space HMI of two binary masks (H x W) at ``alpha`` in [0, 1]: uint8 {0, 1}.

    A gap is filled where two consecutive points were neighbours (within ``gap`` px) in *both*
    masks but moved further apart than ``gap`` in the interpolation: a component that is
    connected at both ends stays connected in between, and masks with several components are not
    joined at alpha = 0 / 1. Closing and hole filling apply only strictly between the ends."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} is outside [0, 1]")
    if source.shape != target.shape:
        raise ValueError(f"masks differ in shape: {source.shape} vs {target.shape}")
    a, b = _points(source), _points(target)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("interpolate_image needs two non-empty masks")
    n = max(len(a), len(b))
    a, b = _resample(a, n), _resample(b, n)
    p = (1 - alpha) * a + alpha * b
    if 0 < alpha < 1 and n > 1:
        def steps(q: np.ndarray) -> np.ndarray:
            return np.linalg.norm(np.diff(q, axis=0), axis=1)
        d_a, d_b, d_p = steps(a), steps(b), steps(p)
        p = _fill_gaps(p, (d_a <= gap) & (d_b <= gap) & (d_p > gap))
    h, w = source.shape
    yx = np.rint(p).astype(int)
    yx[:, 0] = yx[:, 0].clip(0, h - 1)
    yx[:, 1] = yx[:, 1].clip(0, w - 1)
    out = np.zeros((h, w), bool)
    out[yx[:, 0], yx[:, 1]] = True
    if 0 < alpha < 1:
        out = ndimage.binary_fill_holes(ndimage.binary_closing(out, np.ones((3, 3), bool)) | out)
    return out.astype(np.uint8)


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per sample (B x ...) by ``alpha`` (B); linear where a and b are
    (nearly) parallel."""
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-12)
    theta = torch.arccos(cos.clamp(-1, 1))
    al = alpha.to(fa)
    sin = torch.sin(theta)
    near = sin.abs() < 1e-6
    wa = torch.where(near, 1 - al, torch.sin((1 - al) * theta) / sin.where(~near, torch.ones_like(sin)))
    wb = torch.where(near, al, torch.sin(al * theta) / sin.where(~near, torch.ones_like(sin)))
    return (wa[:, None] * fa + wb[:, None] * fb).to(a.dtype).view_as(a)


@torch.no_grad()
def invert(backbone: Backbone, latents: torch.Tensor, states: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIM inversion of clean ``latents`` to noise (the reverse of ``Backbone``'s DDIM sampler with
    the same ``steps``; trailing grids mirror each other), guided by text ``states``, no CFG.

    As diffusers' pipelines do, each step evaluates the model at the step's *target* timestep t on
    the latent of the level before. The prediction is turned into noise at that t
    (``Backbone.to_eps``) and the scheduler steps with it as an ε-prediction: diffusers'
    ``DDIMInverseScheduler`` would convert an x0-prediction at the level before, which for the
    first step (the clean level, 1 - ᾱ = 0) divides by zero (measured: NaN latents)."""
    from diffusers import DDIMInverseScheduler

    sched = DDIMInverseScheduler.from_config(backbone.noise_scheduler.config, timestep_spacing="trailing",
                                             prediction_type="epsilon")
    sched.set_timesteps(int(steps), device=backbone.device)
    z = latents
    for t in sched.timesteps:
        tt = torch.full((z.shape[0],), int(t), device=z.device, dtype=torch.long)
        z = sched.step(backbone.to_eps(backbone.denoise(z, tt, states), z, tt), t, z).prev_sample
    return z


@torch.no_grad()
def denoise_from(backbone: Backbone, z: torch.Tensor, states: torch.Tensor, steps: int) -> torch.Tensor:
    """Deterministic DDIM from the noise ``z`` (no CFG): the inverse of ``invert``."""
    sched = backbone.make_scheduler("ddim", steps)
    for t in sched.timesteps:
        tt = torch.full((z.shape[0],), int(t), device=z.device, dtype=torch.long)
        z = sched.step(backbone.denoise(z, tt, states), t, z).prev_sample
    return z


@torch.no_grad()
def interpolate_latent(backbone: Backbone, source: np.ndarray, target: np.ndarray, alpha: np.ndarray,
                       steps: int, caption: str) -> np.ndarray:
    """Latent-space HMI of mask pairs (B x H x W binary) at ``alpha`` (B): B x H x W uint8 {0, 1}.

    The masks are drawn as images (+1 on -1, 3 channels), encoded, inverted to noise under
    ``caption``, slerped, denoised under it and thresholded at 0 (mid-grey) on the channel mean."""
    dev = backbone.device

    def as_image(m: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy((np.asarray(m) > 0).astype(np.float32) * 2 - 1).to(dev)
        return x.unsqueeze(1).expand(-1, 3, -1, -1)

    n = len(source)
    states = backbone.encode_text([caption] * n)
    noise = invert(backbone, backbone.encode(torch.cat([as_image(source), as_image(target)])),
                   torch.cat([states, states]), steps)
    mixed = slerp(noise[:n], noise[n:], torch.as_tensor(np.asarray(alpha, np.float64), device=dev))
    images = backbone.decode(denoise_from(backbone, mixed, states, steps))
    return (images.mean(dim=1) > 0).cpu().numpy().astype(np.uint8)
