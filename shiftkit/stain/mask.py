"""Tissue masks, returned as weights ``(B, 1, H, W)`` in ``{0, 1}`` (fixed shapes, no boolean indexing)."""

from __future__ import annotations

import kornia
import torch

from ..core.errors import InvalidArgumentError, UnknownNameError
from .model import MACENKO_BETA_LN, MIN_INTENSITY, rgb_to_od

TISSUE_METHODS = ("luminosity", "od")


def tissue_mask(
    images: torch.Tensor,
    method: str = "luminosity",
    *,
    luminosity_threshold: float = 0.8,
    od_threshold: float = MACENKO_BETA_LN,
    i0: float = 1.0,
    exclude_saturated: bool = True,
) -> torch.Tensor:
    """Tissue weights for a batch of RGB images.

    Two rules, both excluding saturated pixels unless ``exclude_saturated=False`` (any channel at or below
    1/255: its OD is clipped at ln 255 and points the wrong way, and such pixels dominate a covariance),
    so that black tiles have no tissue:

    * ``"luminosity"`` (default; StainTools, tiatoolbox, torch-staintools): CIE L* / 100 below
      ``luminosity_threshold`` (0.8). Keeps pale eosin, which an OD threshold on every channel drops.
    * ``"od"`` (Macenko 2009, cuCIM): every channel's natural-log OD at or above ``od_threshold``
      (default ``0.15 · ln 10 = 0.345``, Macenko's β = 0.15 in log10 units; pass 0.15 to mimic
      torchstain/MONAI, which use β = 0.15 on natural-log OD).

    Args:
        images: ``(B, 3, H, W)`` float in ``[0, 1]``.
        method: ``"luminosity"`` or ``"od"``.

    Returns:
        ``(B, 1, H, W)`` weights (same dtype as ``images``), 1 for tissue.
    """
    if method not in TISSUE_METHODS:
        raise UnknownNameError("tissue_method", method, TISSUE_METHODS)
    if not 0.0 < luminosity_threshold <= 1.0:
        raise InvalidArgumentError(
            f"`luminosity_threshold` out of range: expected a value in (0, 1], got {luminosity_threshold!r}"
        )
    if od_threshold < 0:
        raise InvalidArgumentError(f"`od_threshold` out of range: expected >= 0 (natural-log OD), got {od_threshold!r}")
    not_saturated = (images > MIN_INTENSITY + 1e-6).all(dim=1, keepdim=True)
    if not exclude_saturated:
        not_saturated = torch.ones_like(not_saturated)
    if method == "luminosity":
        lum = kornia.color.rgb_to_lab(images.float())[:, :1] / 100.0
        keep = lum < luminosity_threshold
    else:
        keep = (rgb_to_od(images, i0=i0) >= od_threshold).all(dim=1, keepdim=True)
    return (keep & not_saturated).to(images.dtype)
