"""Is a pretrained shared backbone meaningful, or noise? (issue 14, acceptance 4)

Why a check of its own: AnomalyDiffusion, DefectSynth and DefectDiffu only add parts on top of the
shared backbone (``nn/backbone.py``); when the backbone trained here draws noise, each method's
own measures fail for a reason that is not theirs. Two things the methods rely on are measured,
on what the backbone alone draws from pure noise:

* **"a photo of {product}"**: ``kid_randfeat`` of those samples against the product's real
  defect-free images (the test split's, which pretraining never saw; the training split's when a
  split has none), next to the same number for the *untrained* backbone of the same config (the
  acceptance: below half of it);
* **"a defect mask"**: AnomalyDiffusion draws its masks from this prior and DefectSynth
  interpolates in its latent space, so the samples, binarised as AnomalyDiffusion binarises them
  (channel mean > 0), must be non-empty (``mask_nonempty_rate``) and about as large as the real
  training masks (``mask_area_ratio``: mean defect fraction over the real masks' mean, all types
  pooled: the caption names no type), and single shapes like the real ones, not speckle
  (``mask_components``: mean count of 8-connected components per non-empty mask, next to the real
  masks' ``mask_components_real``; a DiT that learned only per-patch statistics draws scattered
  dots whose share and area can pass the other two figures).

Guidance: the photos at 3 (``Backbone.generate``'s default), the masks at 1, as AnomalyDiffusion's
laptop preset draws them (measured: guidance pushes "a defect mask" away from the unconditional
images, towards empty black: the laptop unet's non-empty share 78 % at 1, 38 % at 3, measured
before its preset's ``mask_weight`` 2).

Pure torch/numpy over a ``Backbone`` and rows from ``evaluate.run.load_real``; no Ray, no MLflow.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from defectforge.nn.backbone import MASK_CAPTION, caption


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """B x 3 x H x W in [-1, 1] -> uint8 B x H x W x 3."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def binarise(images: torch.Tensor) -> np.ndarray:
    """Binary B x H x W masks from drawn mask images, AnomalyDiffusion's rule (channel mean > 0)."""
    return (images.mean(dim=1) > 0).cpu().numpy().astype(np.uint8)


@torch.no_grad()
def draw(backbone: Any, prompt: str, n: int, seed: int, steps: int, guidance: float, batch: int = 16) -> torch.Tensor:
    """``n`` images of ``prompt`` from pure noise (seeds ``seed``, ``seed + 1``, ... per batch)."""
    out = [backbone.generate([prompt] * min(batch, n - i), seed=seed + i, steps=steps, guidance=guidance)
           for i in range(0, n, batch)]
    return torch.cat(out)


def backbone_quality(backbone: Any, real: dict[str, Any], products: list[str], n: int = 32, seed: int = 0,
                     steps: int = 25, guidance: float = 3.0, mask_guidance: float = 1.0,
                     extractor: Any = None) -> dict[str, Any]:
    """The figures of the module docstring for one backbone (trained or not).

    ``real``: ``load_real``'s rows (``test`` / ``good_train`` for the defect-free references,
    ``few_shot`` for the training masks). Returns ``kid_randfeat/{product}``,
    ``mask_nonempty_rate``, ``mask_area``, ``mask_area_real`` and ``mask_area_ratio``."""
    from defectforge.evaluate.metrics import kid
    from defectforge.evaluate.metrics.extractors import make_extractor

    extractor = extractor or make_extractor("randfeat")
    backbone = backbone.eval()
    report: dict[str, Any] = {}
    for product in products:
        refs = [r["image"] for r in real["test"] if r["product"] == product and r["defect"] == "good"]
        if len(refs) < 8:
            refs = [r["image"] for r in real["good_train"] if r["product"] == product]
        photos = to_uint8(draw(backbone, caption(product, defective=False), n, seed, steps, guidance))
        report[f"kid_randfeat/{product}"] = float(kid(extractor.features(photos), extractor.features(np.stack(refs))))
    masks = binarise(draw(backbone, MASK_CAPTION, n, seed + 10_000, steps, mask_guidance))
    areas = masks.reshape(len(masks), -1).mean(axis=1)
    real_masks = [(np.asarray(r["mask"]) > 0).astype(np.uint8) for r in real["few_shot"]]
    real_area = float(np.mean([m.mean() for m in real_masks]))
    report.update(mask_nonempty_rate=float((areas > 0).mean()), mask_area=float(areas.mean()),
                  mask_area_real=real_area, mask_area_ratio=float(areas.mean() / real_area),
                  mask_components=components([m for m in masks if m.any()]),
                  mask_components_real=components([m for m in real_masks if m.any()]))
    return report


def components(masks: list[np.ndarray]) -> float:
    """Mean number of 8-connected components per mask (nan for none)."""
    from scipy import ndimage

    if not masks:
        return float("nan")
    return float(np.mean([ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks]))
