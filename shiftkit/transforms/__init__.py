"""Transforms as ``nn.Module``s: the normalizer and Kornia-compatible random augmentations."""

from .adapters import TorchvisionStainTransform, to_albumentations, to_torchvision
from .base import ShiftkitAugmentation, list_transforms, register_transform, transform_from_dict
from .normalizer import StainNormalizer
from .random_scanner import RandomScanner
from .scanner_transfer import ScannerTransfer, ScannerTransferError
from .shift import Shift
from .stain_augment import (
    HED_PRESETS,
    STAIN_AUGMENT_PRESETS,
    TEMPLATE_PRESETS,
    HEDJitter,
    StainAugment,
    StainNormalize,
    StainTemplateSample,
    fit_stain_statistics,
    load_stain_statistics,
    save_stain_statistics,
)

__all__ = [
    "ShiftkitAugmentation",
    "StainNormalizer",
    "Shift",
    "RandomScanner",
    "ScannerTransfer",
    "ScannerTransferError",
    "StainAugment",
    "HEDJitter",
    "StainTemplateSample",
    "StainNormalize",
    "fit_stain_statistics",
    "save_stain_statistics",
    "load_stain_statistics",
    "STAIN_AUGMENT_PRESETS",
    "HED_PRESETS",
    "TEMPLATE_PRESETS",
    "list_transforms",
    "register_transform",
    "transform_from_dict",
    "to_albumentations",
    "to_torchvision",
    "TorchvisionStainTransform",
]
