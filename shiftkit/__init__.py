"""shiftkit: stain- and scanner-domain shift for H&E computational pathology."""

__version__ = "0.1.0"

from .core import InvalidArgumentError, InvalidImageError, ShiftkitError, StainEstimationError, UnknownNameError
from .stain import StainEstimate, estimate_stains, estimate_stains_pooled
from .shifts import get_shift, list_shifts
from .transforms import (
    RandomScanner,
    ScannerTransfer,
    Shift,
    HEDJitter,
    StainAugment,
    StainNormalize,
    StainNormalizer,
    StainTemplateSample,
    fit_stain_statistics,
)

__all__ = [
    "__version__",
    "ShiftkitError",
    "InvalidImageError",
    "InvalidArgumentError",
    "StainEstimationError",
    "UnknownNameError",
    "StainEstimate",
    "estimate_stains",
    "estimate_stains_pooled",
    "StainNormalizer",
    "StainAugment",
    "HEDJitter",
    "StainTemplateSample",
    "StainNormalize",
    "fit_stain_statistics",
    "Shift",
    "RandomScanner",
    "ScannerTransfer",
    "get_shift",
    "list_shifts",
]
