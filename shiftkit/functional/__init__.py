"""Pure, deterministic kernels. Every random quantity is an explicit ``(B, ...)`` tensor argument."""

from .stain import lab_to_rgb, normalize_stains, reinhard_normalize, rgb_to_lab

__all__ = ["normalize_stains", "reinhard_normalize", "rgb_to_lab", "lab_to_rgb"]
