"""Pure, deterministic kernels. Every random quantity is an explicit ``(B, ...)`` tensor argument."""

from .augment import (
    COLOR_SPACES,
    hed_jitter,
    hed_matrix,
    hed_to_rgb,
    perturb_stains,
    rgb_to_hed,
    rgb_to_space,
    rotate_stain_vectors,
    space_to_rgb,
    transfer_statistics,
)
from .stain import lab_to_rgb, normalize_stains, reinhard_normalize, reinhard_opencv8, rgb_to_lab

__all__ = [
    "normalize_stains",
    "reinhard_normalize",
    "reinhard_opencv8",
    "rgb_to_lab",
    "lab_to_rgb",
    "perturb_stains",
    "rotate_stain_vectors",
    "hed_jitter",
    "hed_matrix",
    "rgb_to_hed",
    "hed_to_rgb",
    "rgb_to_space",
    "space_to_rgb",
    "transfer_statistics",
    "COLOR_SPACES",
]
