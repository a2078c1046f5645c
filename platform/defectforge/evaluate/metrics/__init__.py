"""Metric library of the evaluation pipeline: pure numpy/torch, no Ray, no MLflow.

Fidelity (``fid``: streaming ``GaussianStats`` + clean-fid's ``frechet_distance``; ``kid``:
clean-fid's ``kernel_distance``, seeded; ``inception_score``), the feature extractors they run on
(``extractors``: clean-fid's Inception from local weights, or the ``randfeat`` stand-in),
diversity (``lpips_diversity``: mean pairwise LPIPS, IC-LPIPS), mask quality (``masks``) and defect
quality (``quality``: mask-area ratio, visibility ratios, memorisation by nearest training image).
Metrics are named for what computed them: ``metric_name("fid", extractor)``.
"""

from defectforge.evaluate.metrics.extractors import (
    FeatureExtractor,
    InceptionExtractor,
    MissingWeightsError,
    RandFeatExtractor,
    make_extractor,
    metric_name,
    resolve_weights_dir,
)
from defectforge.evaluate.metrics.fid import GaussianStats, fid_from_features, fid_from_stats
from defectforge.evaluate.metrics.inception_score import ISResult, inception_score, inception_score_from_logits
from defectforge.evaluate.metrics.kid import kid
from defectforge.evaluate.metrics.lpips_diversity import (
    LpipsDistance,
    assign_clusters,
    build_lpips,
    ic_lpips,
    mean_pairwise_lpips,
)
from defectforge.evaluate.metrics.masks import mask_quality, mask_stats
from defectforge.evaluate.metrics.quality import (
    concat_stats,
    mean_over_types,
    nn_distance,
    pair_stats,
    quality_from_stats,
    quality_metrics,
    thumbnails,
    visibility,
)

__all__ = [
    "FeatureExtractor", "GaussianStats", "ISResult", "InceptionExtractor", "LpipsDistance", "MissingWeightsError",
    "RandFeatExtractor", "assign_clusters", "build_lpips", "fid_from_features", "fid_from_stats", "ic_lpips",
    "inception_score", "inception_score_from_logits", "kid", "make_extractor", "mask_quality", "mask_stats",
    "mean_pairwise_lpips", "metric_name", "resolve_weights_dir",
    "concat_stats", "mean_over_types", "nn_distance", "pair_stats", "quality_from_stats", "quality_metrics",
    "thumbnails", "visibility",
]
