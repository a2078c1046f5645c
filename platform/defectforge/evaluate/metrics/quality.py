"""Defect-quality metrics every generator is held to, per (product, defect) type.

Why these, on top of FID/KID/LPIPS: image-level fidelity scores are dominated by the defect-free
background, which a generator can copy from its inputs. They do not notice a generator whose
"defects" are invisible (the mask says defect, the pixels say normal surface), whose defects are
noise rather than structure, whose masks are the wrong size or empty, or which reproduces its few
training images. Each of these failure modes gets one number here:

* **mask area** -- ``mask_area_ratio``: mean defect-area fraction of the generated masks over the
  mean of the real masks of the type (1 = same size on average); ``mask_empty_rate``: share of
  generated masks with no defect pixel. Masks are uint8 class-id maps; any id > 0 is defect.
* **visibility, contrast** -- per pair, |mean grey level inside the mask - mean grey level in a
  ring around it| (the ring is the mask dilated by ``ring_px`` pixels, minus the mask): a defect
  that does not stand out from its surroundings has contrast ~ 0. ``visibility_contrast_ratio``
  is the mean over generated pairs over the mean over the real pairs of the type.
* **visibility, high frequency** -- per pair, mean |Laplacian| of the grey image over the mask
  pixels: texture/edge energy of the defect. i.i.d. noise pasted into the mask scores far above a
  real defect, a blurred or flat patch far below. ``visibility_hf_ratio`` as above.
* **memorisation** -- ``nn_gray_mad_generated``: mean over generated images of the distance to the
  nearest few-shot TRAINING image of the type; ``nn_gray_mad_real_test``: the same for the real
  held-out TEST images of the type (how far a genuinely new image of this type lies from the
  training set); ``memorisation_ratio`` = generated / real test. Well below 1 means the generator
  stays closer to its training images than new real images do, i.e. copies. The distance is the
  mean absolute difference of 32 x 32 grey thumbnails (box-filtered, grey levels 0-255), minimised
  over each training image and its left-right mirror (generators train with random flips, so a
  mirrored copy is still a copy). Cheap, deterministic, needs no network weights, and an exact
  copy has distance 0.

Ratios compare against the same statistic on the real pairs of the same (product, defect) type at
the same resolution, so they are comparable across types and datasets: ~1 is "like the real
defects". A ratio is ``nan`` when either side is undefined (no non-empty mask, no test images).

Grey level: ITU-R BT.601 luma (0.299 R + 0.587 G + 0.114 B); a grayscale dataset stored as three
equal channels gets its channel value back. Pure numpy/scipy/PIL: no Ray, no MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

LUMA = np.array([0.299, 0.587, 0.114])
THUMB_SIZE = 32
#: Per-pair statistics ``pair_stats`` returns (one value per pair, nan where undefined).
STAT_KEYS = ("area", "contrast", "hf", "nn")


def to_gray(image: Any) -> np.ndarray:
    """float64 H x W grey levels (0-255) of a uint8 H x W x 3 image (or an H x W grey image)."""
    a = np.asarray(image)
    if a.ndim == 2:
        return a.astype(np.float64)
    if a.ndim != 3 or a.shape[2] not in (1, 3):
        raise ValueError(f"an image must be H x W x 3 (or H x W), got shape {a.shape}")
    if a.shape[2] == 1:
        return a[..., 0].astype(np.float64)
    return a.astype(np.float64) @ LUMA


def _binary(mask: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim != 2:
        raise ValueError(f"a mask must be an H x W class-id map, got shape {m.shape}")
    if shape is not None and m.shape != tuple(shape):
        raise ValueError(f"mask is {m.shape} but its image is {tuple(shape)}")
    return m > 0


def default_ring_px(shape: Sequence[int]) -> int:
    """Ring width for an image of ``shape``: 1/64 of the short side, at least 2 pixels.

    Why scale with size: the ring should sample the defect's immediate surroundings, ~4 px at
    256 px; a fixed width would reach far across a small image and hug the edge of a large one.
    Generated and real pairs are compared at the same resolution, so they use the same ring.
    """
    return max(2, int(round(min(shape[0], shape[1]) / 64)))


def visibility(image: Any, mask: Any, ring_px: int | None = None) -> tuple[float, float]:
    """(contrast, high-frequency energy) of one pair; ``nan`` for an empty mask (and contrast is
    ``nan`` when the mask leaves no ring, i.e. covers the whole image).

    contrast = |mean grey inside the mask - mean grey in the ring| where ring = dilation of the
    mask by ``ring_px`` pixels (8-connected, so the ring is ``ring_px`` wide in every direction)
    minus the mask; hf = mean |Laplacian| (``scipy.ndimage.laplace``, reflect border) of the grey
    image over the mask pixels.
    """
    gray = to_gray(image)
    inside = _binary(mask, gray.shape)
    if not inside.any():
        return math.nan, math.nan
    ring_px = default_ring_px(gray.shape) if ring_px is None else int(ring_px)
    if ring_px < 1:
        raise ValueError(f"ring_px must be >= 1, got {ring_px}")
    ring = ndimage.binary_dilation(inside, structure=np.ones((3, 3), bool), iterations=ring_px) & ~inside
    contrast = abs(float(gray[inside].mean()) - float(gray[ring].mean())) if ring.any() else math.nan
    hf = float(np.abs(ndimage.laplace(gray))[inside].mean())
    return contrast, hf


def mask_area(mask: Any) -> float:
    """Defect-area fraction of a class-id mask (pixels with id > 0 over all pixels)."""
    return float(_binary(mask).mean())


def thumbnails(images: Iterable[Any], size: int = THUMB_SIZE) -> np.ndarray:
    """N x size x size float32 grey thumbnails (PIL box filter: each pixel the mean of its area)."""
    out = [np.asarray(Image.fromarray(to_gray(im).astype(np.float32)).resize((size, size), Image.BOX))
           for im in images]
    return np.stack(out).astype(np.float32) if out else np.zeros((0, size, size), np.float32)


def nn_distance(queries: np.ndarray, train: np.ndarray, mirror: bool = True) -> np.ndarray:
    """Per query thumbnail, the mean absolute difference to its nearest ``train`` thumbnail (and,
    with ``mirror``, to the nearest left-right mirrored one). ``nan`` everywhere without train."""
    q = np.asarray(queries, np.float32)
    if len(q) == 0:
        return np.zeros(0)
    t = np.asarray(train, np.float32)
    if len(t) == 0:
        return np.full(len(q), math.nan)
    if mirror:
        t = np.concatenate([t, t[:, :, ::-1]])
    qf, tf = q.reshape(len(q), -1), t.reshape(len(t), -1)
    # chunk the queries so the |q - t| tensor stays small (256 x 2k x 1024 floats at most)
    out = [np.abs(qf[i:i + 256, None, :] - tf[None, :, :]).mean(axis=2).min(axis=1) for i in range(0, len(qf), 256)]
    return np.concatenate(out).astype(np.float64)


def pair_stats(images: Sequence[Any], masks: Sequence[Any], train_thumbs: np.ndarray | None = None,
               ring_px: int | None = None) -> dict[str, np.ndarray]:
    """Per-pair ``area``, ``contrast``, ``hf`` and (with ``train_thumbs``) ``nn`` distance, so that
    pairs spread over many blocks can be measured where they live and combined later."""
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    vis = [visibility(im, m, ring_px) for im, m in zip(images, masks)]
    out = {
        "area": np.array([mask_area(m) for m in masks], np.float64),
        "contrast": np.array([v[0] for v in vis], np.float64),
        "hf": np.array([v[1] for v in vis], np.float64),
    }
    out["nn"] = (nn_distance(thumbnails(images), train_thumbs) if train_thumbs is not None
                 else np.full(len(images), math.nan))
    return out


def concat_stats(parts: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Join ``pair_stats`` results (e.g. of several blocks) into one."""
    parts = list(parts)
    return {k: np.concatenate([np.asarray(p[k], np.float64) for p in parts]) if parts else np.zeros(0)
            for k in STAT_KEYS}


def _mean(values: np.ndarray) -> float:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def quality_from_stats(generated: dict[str, np.ndarray], real: dict[str, np.ndarray],
                       real_test_nn: np.ndarray | None = None) -> dict[str, float]:
    """The type's quality metrics from per-pair statistics of its generated and real pairs and
    the nearest-training-image distances of its real test images (see the module docstring)."""
    area_g, area_r = _mean(generated["area"]), _mean(real["area"])
    gen_area = np.asarray(generated["area"])
    out = {
        "mask_area_ratio": _ratio(area_g, area_r),
        "mask_empty_rate": float(np.mean(gen_area == 0)) if len(gen_area) else math.nan,
    }
    for key in ("contrast", "hf"):
        g, r = _mean(generated[key]), _mean(real[key])
        out[f"visibility_{key}"] = g
        out[f"visibility_{key}_real"] = r
        out[f"visibility_{key}_ratio"] = _ratio(g, r)
    nn_g = _mean(generated["nn"])
    nn_t = _mean(real_test_nn) if real_test_nn is not None else math.nan
    out["nn_gray_mad_generated"] = nn_g
    out["nn_gray_mad_real_test"] = nn_t
    out["memorisation_ratio"] = _ratio(nn_g, nn_t)
    return out


def quality_metrics(generated_images: Sequence[Any], generated_masks: Sequence[Any], real_images: Sequence[Any],
                    real_masks: Sequence[Any], train_images: Sequence[Any] | None = None,
                    test_images: Sequence[Any] | None = None, ring_px: int | None = None) -> dict[str, float]:
    """All quality metrics of one (product, defect) type from arrays in memory.

    ``real_*``: the real defect pairs of the type (the reference for the mask and visibility
    ratios); ``train_images``: its few-shot training images; ``test_images``: its held-out real
    test images (memorisation metrics are ``nan`` without both).
    """
    train = thumbnails(train_images) if train_images is not None else None
    gen = pair_stats(generated_images, generated_masks, train, ring_px)
    real = pair_stats(real_images, real_masks, None, ring_px)
    test_nn = (nn_distance(thumbnails(test_images), train) if train is not None and test_images is not None
               else None)
    return quality_from_stats(gen, real, test_nn)


def mean_over_types(per_type: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the types that define it (``nan`` when none does): how a product
    (and the overall level) reports per-type quality, like LPIPS and mask quality."""
    rows = list(per_type)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: _mean(np.array([r.get(k, math.nan) for r in rows], np.float64)) for k in keys}
