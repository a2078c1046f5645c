"""Metric library of the evaluation pipeline: pure numpy/torch, no Ray, no MLflow.

Fidelity (``fid``: streaming ``GaussianStats`` + clean-fid's ``frechet_distance``; ``kid``:
clean-fid's ``kernel_distance``, seeded; ``inception_score``), the feature extractors they run on
(``extractors``: clean-fid's Inception from local weights, or the ``randfeat`` stand-in),
diversity (``lpips_diversity``: mean pairwise LPIPS, IC-LPIPS), mask quality (``masks``) and defect
quality (``quality``: mask-area ratio, visibility ratios, memorisation by nearest training image).
Metrics are named for what computed them: ``metric_name("fid", extractor)``.

Why the names resolve lazily (PEP 562 ``__getattr__``): importing ``cleanfid.fid`` or ``lpips``
imports torchvision, which imports ``torch._dynamo`` (~1.2 s here). An evaluation actor needs
only its feature extractor; a fresh actor paid those seconds before its first batch when this
package imported every metric eagerly.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "FeatureExtractor": "defectforge.evaluate.metrics.extractors",
    "GaussianStats": "defectforge.evaluate.metrics.fid",
    "ISResult": "defectforge.evaluate.metrics.is_score",
    "InceptionExtractor": "defectforge.evaluate.metrics.extractors",
    "LpipsDistance": "defectforge.evaluate.metrics.lpips_diversity",
    "MissingWeightsError": "defectforge.evaluate.metrics.extractors",
    "RandFeatExtractor": "defectforge.evaluate.metrics.extractors",
    "assign_clusters": "defectforge.evaluate.metrics.lpips_diversity",
    "build_lpips": "defectforge.evaluate.metrics.lpips_diversity",
    "concat_stats": "defectforge.evaluate.metrics.quality",
    "diversity_from_features": "defectforge.evaluate.metrics.lpips_diversity",
    "diversity_lpips": "defectforge.evaluate.metrics.lpips_diversity",
    "fid_from_features": "defectforge.evaluate.metrics.fid",
    "fid_from_stats": "defectforge.evaluate.metrics.fid",
    "ic_lpips": "defectforge.evaluate.metrics.lpips_diversity",
    "inception_score": "defectforge.evaluate.metrics.is_score",
    "inception_score_from_logits": "defectforge.evaluate.metrics.is_score",
    "kid": "defectforge.evaluate.metrics.kid_score",
    "make_extractor": "defectforge.evaluate.metrics.extractors",
    "mask_quality": "defectforge.evaluate.metrics.masks",
    "mask_stats": "defectforge.evaluate.metrics.masks",
    "mean_over_types": "defectforge.evaluate.metrics.quality",
    "mean_pairwise_lpips": "defectforge.evaluate.metrics.lpips_diversity",
    "metric_name": "defectforge.evaluate.metrics.extractors",
    "nn_distance": "defectforge.evaluate.metrics.quality",
    "pair_stats": "defectforge.evaluate.metrics.quality",
    "quality_from_stats": "defectforge.evaluate.metrics.quality",
    "quality_metrics": "defectforge.evaluate.metrics.quality",
    "resolve_weights_dir": "defectforge.evaluate.metrics.extractors",
    "thumbnails": "defectforge.evaluate.metrics.quality",
    "visibility": "defectforge.evaluate.metrics.quality",
}


# No submodule shares a name with what it exports (``kid_score.py`` exports ``kid``): importing a
# submodule binds it as an attribute of this package, which would hide a same-named function
# from ``__getattr__``. tests/test_metrics.py checks every name resolves to what _WHERE says.


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "FeatureExtractor", "GaussianStats", "ISResult", "InceptionExtractor", "LpipsDistance", "MissingWeightsError",
    "RandFeatExtractor", "assign_clusters", "build_lpips", "diversity_from_features", "diversity_lpips",
    "fid_from_features", "fid_from_stats", "ic_lpips",
    "inception_score", "inception_score_from_logits", "kid", "make_extractor", "mask_quality", "mask_stats",
    "mean_pairwise_lpips", "metric_name", "resolve_weights_dir",
    "concat_stats", "mean_over_types", "nn_distance", "pair_stats", "quality_from_stats", "quality_metrics",
    "thumbnails", "visibility",
]
