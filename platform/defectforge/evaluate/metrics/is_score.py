"""Inception Score: ``exp(E_x KL(p(y|x) || p(y)))``, mean and std over splits.

Why our own few lines: clean-fid has no IS; the formula is the standard one of Salimans et al.
(2016) as implemented by the original TF code and StyleGAN2-ADA's ``metrics/inception_score.py``:
the N predictions are cut into ``splits`` consecutive parts, within each part ``p(y)`` is the mean
prediction and the score is ``exp(mean KL)``; the result is the mean and (population) std of the
per-split scores. KL uses ``scipy.special.rel_entr`` so ``0 log 0 = 0`` holds for one-hot rows.

With the standard Inception network the score is logged as ``is``; over any other extractor's
pseudo-logits it carries the extractor's name (``is_randfeat``, see ``extractors.metric_name``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from scipy.special import rel_entr, softmax


class ISResult(NamedTuple):
    mean: float
    std: float


def inception_score(probs: Any, splits: int = 10) -> ISResult:
    """IS of class probabilities ``probs`` (N x C, rows summing to 1)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"inception_score: probs must be a non-empty N x C array, got shape {p.shape}")
    if (p < 0).any() or not np.isfinite(p).all():
        raise ValueError("inception_score: probs must be finite and non-negative")
    row_sums = p.sum(axis=1)
    if not np.allclose(row_sums, 1.0, atol=1e-4):
        raise ValueError(
            "inception_score: rows of probs must sum to 1 "
            f"(got sums in [{row_sums.min():.4g}, {row_sums.max():.4g}]); pass logits to inception_score_from_logits"
        )
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"inception_score: splits must be in [1, N={p.shape[0]}], got {splits}")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = rel_entr(part, marginal).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return ISResult(float(np.mean(scores)), float(np.std(scores)))


def inception_score_from_logits(logits: Any, splits: int = 10) -> ISResult:
    """IS of class logits (softmax is applied first)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"inception_score_from_logits: logits must be N x C, got shape {z.shape}")
    return inception_score(softmax(z, axis=1), splits=splits)
