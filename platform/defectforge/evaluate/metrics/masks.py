"""Mask quality: do generated masks of one (product, defect) look like the real ones in bulk?

Why these three numbers: a mask generator can fail quietly in ways image metrics never see:
masks that are empty (no defect at all), masks whose defect area is off (all tiny specks or
huge blobs), or masks that shatter into many fragments. We compare

* the distributions of defect-area fraction (pixels with class id > 0 over all pixels) with the
  1-D Wasserstein distance (``scipy.stats.wasserstein_distance``; same unit as the fraction, 0 =
  identical distributions, independent of image size);
* the empty-mask rate;
* the mean number of connected defect regions per mask (``scipy.ndimage.label`` with its default
  4-connected structuring element; an empty mask counts 0 components).

Each statistic is reported for both sets so a change can be read without the real baseline.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.stats import wasserstein_distance


def _masks(masks: Iterable[Any], what: str) -> list[np.ndarray]:
    out = []
    for i, m in enumerate(masks):
        a = np.asarray(m)
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim != 2 or a.size == 0:
            raise ValueError(f"{what}[{i}]: a mask must be a non-empty H x W array, got shape {a.shape}")
        out.append(a > 0)
    if not out:
        raise ValueError(f"{what}: no masks given")
    return out


def mask_stats(masks: Iterable[Any], what: str = "masks") -> dict[str, np.ndarray]:
    """Per-mask defect-area fraction and connected-component count."""
    binary = _masks(masks, what)
    area = np.array([b.mean() for b in binary], dtype=np.float64)
    comps = np.array([ndimage.label(b)[1] for b in binary], dtype=np.float64)
    return {"area": area, "components": comps}


def mask_quality(generated: Iterable[Any], real: Iterable[Any]) -> dict[str, float]:
    """Compare generated masks against real masks of the same (product, defect)."""
    g = mask_stats(generated, "generated masks")
    r = mask_stats(real, "real masks")
    return {
        "mask_area_w1": float(wasserstein_distance(g["area"], r["area"])),
        "mask_empty_rate": float(np.mean(g["area"] == 0)),
        "mask_empty_rate_real": float(np.mean(r["area"] == 0)),
        "mask_components_mean": float(g["components"].mean()),
        "mask_components_mean_real": float(r["components"].mean()),
        "mask_area_mean": float(g["area"].mean()),
        "mask_area_mean_real": float(r["area"].mean()),
        "mask_n": float(len(g["area"])),
        "mask_n_real": float(len(r["area"])),
    }
