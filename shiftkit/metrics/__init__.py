"""Robustness metrics (functional). Exact definitions in the docstrings (REFERENCES B2)."""

from .functional import (
    balanced_accuracy,
    bootstrap_ci,
    corruption_error,
    cosine_consistency,
    expected_calibration_error,
    flip_rate,
    knn_balanced_accuracy,
    knn_predict,
    linear_probe,
    paired_topk_retrieval,
    relative_corruption_error,
    robustness_index,
    site_predictability,
)

HIGHER_IS_BETTER = {
    "cosine": True, "retrieval@1": True, "retrieval@5": True, "knn_ba": True, "knn_retention": True,
    "probe_ba": True, "probe_retention": True, "flip_rate": False, "ece": False, "ce": False,
    "robustness_index": True, "site_auc": False,
}

__all__ = [
    "balanced_accuracy", "bootstrap_ci", "corruption_error", "cosine_consistency", "expected_calibration_error",
    "flip_rate", "knn_balanced_accuracy", "knn_predict", "linear_probe", "paired_topk_retrieval",
    "relative_corruption_error", "robustness_index", "site_predictability", "HIGHER_IS_BETTER",
]
