"""The Beer–Lambert stain model, tissue masks and stain estimators."""

from .estimate import STATUS_NAMES, EstimatorConfig, StainEstimate, estimate_stains, estimate_stains_pooled
from .mask import tissue_mask
from .model import (
    MACENKO_BETA_LN,
    MACENKO_REFERENCE_MAX_CONCENTRATIONS,
    complete_stain_matrix,
    list_reference_matrices,
    normalize_rows,
    od_to_rgb,
    reference_stain_matrix,
    rgb_to_od,
    stain_angles,
    validate_stain_matrix,
)
from .solve import concentrations_to_od, concentrations_to_rgb, od_to_concentrations, rgb_to_concentrations
from .stats import masked_quantile

__all__ = [
    "STATUS_NAMES",
    "EstimatorConfig",
    "StainEstimate",
    "estimate_stains",
    "estimate_stains_pooled",
    "tissue_mask",
    "MACENKO_BETA_LN",
    "MACENKO_REFERENCE_MAX_CONCENTRATIONS",
    "complete_stain_matrix",
    "list_reference_matrices",
    "normalize_rows",
    "od_to_rgb",
    "reference_stain_matrix",
    "rgb_to_od",
    "stain_angles",
    "validate_stain_matrix",
    "concentrations_to_od",
    "concentrations_to_rgb",
    "od_to_concentrations",
    "rgb_to_concentrations",
    "masked_quantile",
]
