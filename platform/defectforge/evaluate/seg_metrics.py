"""Metrics of a binary defect segmenter: pixel AUROC / AP / F1-max / mIoU and image AUROC / AP.

Why these: they are the numbers the defect-generation papers report for their downstream
segmentation model (pixel AUROC and AP; F1-max; IoU), so a synthetic-data gain measured here is
comparable. The ranking metrics come from ``sklearn.metrics``; only the small glue (F1 from the PR
curve, IoU from confusion counts) is written here.

Conventions (stated once, used everywhere):

- labels are binary: any mask class id > 0 is "defect";
- a pixel is predicted defect when ``prob >= threshold`` (scikit-learn's convention for the
  thresholds ``precision_recall_curve`` returns);
- ``miou`` is the mean of the defect-class IoU and the background-class IoU at the F1-max threshold
  (``iou_defect`` and ``iou_background`` are reported too);
- image score = max pixel probability; image label = the mask has any defect pixel;
- a metric that is undefined for the given labels (e.g. AUROC when every pixel is background)
  is ``nan``, never an exception, so one degenerate split does not lose a whole sweep's numbers.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

#: Pixel ranking metrics are computed on at most this many pixels (a deterministic subsample).
MAX_PIXELS = 2_000_000

METRIC_NAMES = (
    "pixel_auroc", "pixel_ap", "pixel_f1_max", "f1_threshold", "miou", "iou_defect",
    "iou_background", "image_auroc", "image_ap",
)


def _check(probs: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    masks = np.asarray(masks)
    if probs.shape != masks.shape:
        raise ValueError(f"probs shape {probs.shape} does not match masks shape {masks.shape}")
    if probs.ndim != 3:
        raise ValueError(f"probs/masks must be N x H x W, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contain NaN or inf")
    return probs, masks > 0


def subsample_pixels(
    scores: np.ndarray, labels: np.ndarray, max_pixels: int = MAX_PIXELS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Flattened ``scores, labels``; at most ``max_pixels`` of them, chosen by a fixed seed.

    Why a seeded random subset and not a stride: a stride aliases with image rows and can skip thin
    defects (a crack along a row) entirely; a fixed seed keeps results reproducible.
    """
    scores, labels = np.ravel(scores), np.ravel(labels)
    if scores.size <= max_pixels:
        return scores, labels
    idx = np.sort(np.random.default_rng(seed).choice(scores.size, size=max_pixels, replace=False))
    return scores[idx], labels[idx]


def _ranking(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(AUROC, AP), each ``nan`` when only one class is present (undefined)."""
    if labels.all() or not labels.any():
        return math.nan, math.nan
    return float(roc_auc_score(labels, scores)), float(average_precision_score(labels, scores))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1 over all thresholds, that threshold); (nan, nan) with no positive label."""
    if not labels.any():
        return math.nan, math.nan
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last (precision=1, recall=0) point has no threshold; drop it.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def iou_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """(defect IoU, background IoU) of ``scores >= threshold`` against ``labels``.

    A class absent from both prediction and truth has IoU 1 (nothing to get wrong).
    """
    pred = scores >= threshold
    out = []
    for p, t in ((pred, labels), (~pred, ~labels)):
        union = np.count_nonzero(p | t)
        out.append(1.0 if union == 0 else np.count_nonzero(p & t) / union)
    return float(out[0]), float(out[1])


def segmentation_metrics(
    probs: np.ndarray, masks: np.ndarray, max_pixels: int = MAX_PIXELS
) -> dict[str, float]:
    """All metrics (see the module docstring) of defect probabilities ``probs`` (N x H x W)
    against class-id ``masks`` (N x H x W).

    The ranking metrics and the F1-max threshold use at most ``max_pixels`` pixels; the IoUs at
    that threshold are counted over every pixel (cheap, and exact).
    """
    probs, labels = _check(probs, masks)
    s, y = subsample_pixels(probs, labels, max_pixels)
    pixel_auroc, pixel_ap = _ranking(y, s)
    f1, thr = f1_max(y, s)
    # No defect pixel at all: the only sensible operating point predicts none.
    iou_d, iou_b = iou_at(labels.ravel(), probs.ravel(), math.inf if math.isnan(thr) else thr)
    img_scores = probs.reshape(len(probs), -1).max(axis=1)
    img_labels = labels.reshape(len(labels), -1).any(axis=1)
    image_auroc, image_ap = _ranking(img_labels, img_scores)
    return {
        "pixel_auroc": pixel_auroc, "pixel_ap": pixel_ap, "pixel_f1_max": f1,
        "f1_threshold": thr, "miou": (iou_d + iou_b) / 2, "iou_defect": iou_d,
        "iou_background": iou_b, "image_auroc": image_auroc, "image_ap": image_ap,
    }
