"""Tissue masks, returned as weights ``(B, 1, H, W)`` in ``{0, 1}`` (fixed shapes, no boolean indexing)."""

from __future__ import annotations

import torch

from ..core.errors import InvalidArgumentError, UnknownNameError
from ..core.image import lookup_uint8
from .model import MACENKO_BETA_LN, MIN_INTENSITY, rgb_to_od

TISSUE_METHODS = ("luminosity", "od")


def srgb_to_linear(images: torch.Tensor, u8: torch.Tensor | None = None) -> torch.Tensor:
    """Linear RGB of sRGB ``images`` in ``[0, 1]`` (a new tensor), with Kornia's constants:
    ``((x + 0.055) / 1.055)^2.4`` above 0.04045 and ``x / 12.92`` below.

    Computed without a mask as ``g(max(x, t)) + (min(x, t) − t) / 12.92`` (the branches meet at ``t`` to 2.3e-9),
    the power as ``exp2(2.4·log2(·))``. ``u8``: the same images as uint8, read from a 256-entry table of this
    function instead (float32 images only).
    """
    if u8 is not None and images.dtype == torch.float32:
        return lookup_uint8(u8, "srgb-linear", srgb_to_linear).reshape(images.shape)
    x = images if images.is_floating_point() else images.float()
    t = 0.04045
    if torch.is_grad_enabled() and x.requires_grad:  # the same arithmetic, out of place
        return torch.exp2(torch.log2(torch.clamp_min(x, t) * (1 / 1.055) + 0.055 / 1.055) * 2.4) + (torch.clamp_max(x, t) - t) / 12.92
    g = torch.clamp_min(x, t).mul_(1 / 1.055).add_(0.055 / 1.055).log2_().mul_(2.4).exp2_()
    return g.add_(torch.clamp_max(x, t), alpha=1 / 12.92).sub_(t / 12.92)


def linear_to_srgb(linear: torch.Tensor, overwrite: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """sRGB encoding of linear RGB with Kornia's constants, clamped to ``[0, 1]``: ``1.055·x^(1/2.4) − 0.055``
    above 0.0031308 and ``12.92·x`` below.

    Computed without a mask as ``min(g(max(x, t)), 12.92·x)``: ``g`` is concave and starts 6e-6 above the line
    at ``t``, so the minimum is the line below ``t`` and ``g`` from 3e-5 above it (within 6e-6 in between).
    ``overwrite=True`` lets it reuse ``linear``'s memory (no autograd); ``out``, a scratch tensor of the same shape
    and dtype, then holds the result (no allocation: a fresh multi-MB tensor costs page faults on CPU).
    """
    t = 0.0031308
    x = linear
    if torch.is_grad_enabled() and x.requires_grad:
        g = torch.exp2(torch.log2(torch.clamp_min(x, t)) * (1 / 2.4)) * 1.055 - 0.055
        return torch.minimum(g, x * 12.92).clamp(0.0, 1.0)
    g = torch.clamp_min(x, t, out=out if overwrite else None).log2_().mul_(1 / 2.4).exp2_().mul_(1.055).sub_(0.055)
    return torch.minimum(g, x.mul_(12.92) if overwrite else x * 12.92, out=g).clamp_(0.0, 1.0)


def relative_luminance(images: torch.Tensor, linear: torch.Tensor | None = None) -> torch.Tensor:
    """CIE Y (D65) of sRGB images ``(B, 3, H, W)`` in ``[0, 1]``, as ``(B, 1, H, W)``.

    The same Y that CIELAB's L* is computed from (Kornia, OpenCV, scikit-image), so thresholding L* equals
    thresholding Y, without the cube root and the chroma channels. ``linear``: :func:`srgb_to_linear` of
    ``images``, if the caller has it.
    """
    lin = srgb_to_linear(images) if linear is None else linear
    # the channel sum as in-place multiply-adds: the same arithmetic for a tile whatever its batch
    return (lin[:, :1] * 0.212671).add_(lin[:, 1:2], alpha=0.715160).add_(lin[:, 2:3], alpha=0.072169)


def _lightness_to_luminance(lightness: float) -> float:
    """Inverse of CIE L* = 116 f(Y) − 16 for relative luminance Y in [0, 1]."""
    f = (lightness + 16.0) / 116.0
    delta = 6.0 / 29.0
    return f**3 if f > delta else 3 * delta**2 * (f - 4.0 / 29.0)


def tissue_mask(
    images: torch.Tensor,
    method: str = "luminosity",
    *,
    luminosity_threshold: float = 0.8,
    od_threshold: float = MACENKO_BETA_LN,
    i0: float = 1.0,
    exclude_saturated: bool = True,
    linear: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tissue weights for a batch of RGB images.

    Two rules, both excluding saturated pixels unless ``exclude_saturated=False`` (any channel at or below
    1/255: its OD is clipped at ln 255 and points the wrong way, and such pixels dominate a covariance),
    so that black tiles have no tissue:

    * ``"luminosity"`` (default; StainTools, tiatoolbox, torch-staintools): CIE L* / 100 (sRGB, D65) below
      ``luminosity_threshold`` (0.8), evaluated as the equivalent threshold on luminance Y. Keeps pale
      eosin, which an OD threshold on every channel drops.
    * ``"od"`` (Macenko 2009, cuCIM): every channel's natural-log OD at or above ``od_threshold``
      (default ``0.15 · ln 10 = 0.345``, Macenko's β = 0.15 in log10 units; pass 0.15 to mimic
      torchstain/MONAI, which use β = 0.15 on natural-log OD).

    Args:
        images: ``(B, 3, H, W)`` (or flattened ``(B, 3, N)``) float in ``[0, 1]``.
        method: ``"luminosity"`` or ``"od"``.
        luminosity_threshold: the luminosity rule's threshold on L*/100 (tissue below it).
        od_threshold: the OD rule's threshold β in natural-log units (tissue when every channel's OD exceeds it).
        i0: background (incident light) intensity in ``[0, 1]`` units.
        exclude_saturated: pixels with a channel at 0 (clipped OD) are not tissue.
        linear: :func:`srgb_to_linear` of ``images``, if the caller has it (saves the luminosity rule's decoding).

    Returns:
        ``(B, 1, H, W)`` (or ``(B, 1, N)``) weights (same dtype as ``images``), 1 for tissue.
    """
    if method not in TISSUE_METHODS:
        raise UnknownNameError("tissue_method", method, TISSUE_METHODS)
    if not 0.0 < luminosity_threshold <= 1.0:
        raise InvalidArgumentError(
            f"`luminosity_threshold` out of range: expected a value in (0, 1], got {luminosity_threshold!r}"
        )
    if od_threshold < 0:
        raise InvalidArgumentError(f"`od_threshold` out of range: expected >= 0 (natural-log OD), got {od_threshold!r}")
    sat = MIN_INTENSITY + 1e-6
    if linear is not None and method == "luminosity" and images.device.type == "cpu":
        # from the linear RGB at hand: one-row passes (the darkest channel, the luminance) instead of
        # comparisons and reductions over all three channels; the same pixels, as srgb_to_linear is increasing
        keep = relative_luminance(images, linear).lt_(_lightness_to_luminance(100.0 * luminosity_threshold))
        if exclude_saturated:
            darkest = torch.minimum(linear[:, :1], linear[:, 1:2])
            torch.minimum(darkest, linear[:, 2:3], out=darkest)
            keep.mul_(darkest.gt_(float(srgb_to_linear(torch.tensor([sat], dtype=linear.dtype)))))
        return keep.to(images.dtype)
    not_saturated = (images > sat).all(dim=1, keepdim=True)
    if not exclude_saturated:
        not_saturated = torch.ones_like(not_saturated)
    if method == "luminosity":
        keep = relative_luminance(images, linear) < _lightness_to_luminance(100.0 * luminosity_threshold)
    else:
        keep = (rgb_to_od(images, i0=i0) >= od_threshold).all(dim=1, keepdim=True)
    return (keep & not_saturated).to(images.dtype)
