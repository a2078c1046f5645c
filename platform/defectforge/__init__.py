"""defectforge: few-shot industrial defect-image generation on Ray, tracked with MLflow."""

__version__ = "0.1.0"
