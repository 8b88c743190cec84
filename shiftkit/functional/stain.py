"""Deterministic stain-normalization kernels on float ``(B, 3, H, W)`` batches in ``[0, 1]``.

No randomness and no state: every per-sample quantity is an explicit ``(B, ...)`` tensor. Gradients flow
through the apply steps (``rgb_to_od`` → solve → scale → reconstruct) with respect to the image and the
matrices, except where a clamp is active.
"""

from __future__ import annotations

import math

import kornia
import torch

from ..stain.model import LOG2E, MIN_INTENSITY, od_to_rgb, rgb_to_od
from ..stain.solve import nnls_2_projection, od_to_concentrations, select_nnls_2


def normalize_stains(
    images: torch.Tensor,
    source_matrix: torch.Tensor,
    source_max: torch.Tensor,
    target_matrix: torch.Tensor,
    target_max: torch.Tensor,
    *,
    i0: float = 1.0,
    target_i0: float | None = None,
    clamp_concentrations: bool = True,
    max_scale: float = 5.0,
    log_images: torch.Tensor | None = None,
) -> torch.Tensor:
    """Macenko/Vahadane-style normalization with given source and target stains.

    ``C = solve(S_src, OD)``; ``C_k ← C_k · clamp(maxC_tgt,k / maxC_src,k, 1/max_scale, max_scale)``;
    ``I = I0_tgt · exp(-S_tgt^T C)``.

    Args:
        images: ``(B, 3, H, W)`` float in ``[0, 1]``.
        source_matrix: ``(B, 2, 3)`` stain matrix of each tile.
        source_max: ``(B, 2)`` robust max concentrations of each tile.
        target_matrix: ``(2, 3)`` or ``(B, 2, 3)``.
        target_max: ``(2,)`` or ``(B, 2)``.
        i0: background intensity of the source, ``[0, 1]`` units.
        target_i0: background intensity of the output (default ``i0``).
        clamp_concentrations: clamp concentrations at 0 before rescaling (default; torchstain does not).
        max_scale: bound on the concentration rescaling factor (guards tiles whose maximum is near 0).
        log_images: optional ``ln clamp(images, 1/255, i0)`` of the same shape, float32, e.g. from
            :func:`shiftkit.stain.model.uint8_lookup` for 8-bit data (it is overwritten; ignored with autograd).

    Returns:
        ``(B, 3, H, W)`` in ``[0, 1]``.
    """
    bsz = images.shape[0]
    tm = target_matrix if target_matrix.ndim == 3 else target_matrix.expand(bsz, 2, 3)
    tmax = target_max if target_max.ndim == 2 else target_max.expand(bsz, 2)
    ti0 = i0 if target_i0 is None else target_i0
    dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    src = source_matrix.to(dtype)
    scale = (tmax.to(dtype) / source_max.to(dtype).clamp_min(1e-6)).clamp(1.0 / max_scale, max_scale)
    rebuild = tm.to(dtype).transpose(1, 2) * scale[:, None, :]  # (B, 3, 2): rescaling folded in
    if images.requires_grad and torch.is_grad_enabled() or src.requires_grad or tm.requires_grad:
        od = rgb_to_od(images, i0=i0)
        conc = od_to_concentrations(od.flatten(2), src, clamp=clamp_concentrations)
        return od_to_rgb((rebuild @ conc).reshape(images.shape), i0=ti0)
    # Fast path, algebraically the same: with OD = ln(I0) − ln(I), S·OD = (−S)·ln(I) + ln(I0)·S·1, and
    # I0_t·exp(−R·C) = I0_t·exp((−R)·C): the negations ride on the tiny matrices, and the ln(I0) terms are
    # added (in place) only when I0 ≠ 1. Every full-size step is one pass over a cache-sized chunk.
    if log_images is not None and log_images.dtype == dtype and log_images.shape == images.shape:
        flat = log_images.reshape(bsz, 3, -1)
    else:
        flat = images.to(dtype).flatten(2).clamp(MIN_INTENSITY, i0).log_()
    if clamp_concentrations:
        # the unconstrained solution and the single-stain refits in one (B, 4, 3) product, then their minimum
        proj = nnls_2_projection(source_matrix)
        y = torch.bmm(-proj.to(dtype), flat)
        if i0 != 1.0:
            y.add_((math.log(i0) * proj.sum(-1, keepdim=True)).to(dtype))  # (B, 4, 1) broadcast
        conc = select_nnls_2(y[:, :2], y[:, 2:], (proj[:, 2] * proj[:, 3]).sum(-1))
    else:
        conc = od_to_concentrations(rgb_to_od(images, i0=i0).flatten(2), src, clamp=False)
    out = torch.bmm(rebuild * -LOG2E, conc, out=flat).exp2_()  # exp via exp2 (see LOG2E); reuses ln(I)'s memory
    if ti0 != 1.0:
        out.mul_(ti0)
    if not (clamp_concentrations and ti0 <= 1.0 and bool((rebuild >= 0).all())):
        out = out.clamp_(0.0, 1.0)  # otherwise exp(−R·C) with R, C ≥ 0 is already in (0, I0_t]
    return out.reshape(images.shape)


def rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65, sRGB companding) via Kornia: L in [0, 100], a and b roughly in [-128, 127]."""
    return kornia.color.rgb_to_lab(images)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab`, clamped to ``[0, 1]``."""
    return kornia.color.lab_to_rgb(lab, clip=True)


def reinhard_normalize(
    images: torch.Tensor,
    source_mean: torch.Tensor,
    source_std: torch.Tensor,
    target_mean: torch.Tensor,
    target_std: torch.Tensor,
    lab: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reinhard et al. 2001 colour transfer in CIELAB: ``(x − μ_src) / σ_src · σ_tgt + μ_tgt`` per channel.

    Args:
        images: ``(B, 3, H, W)`` float in ``[0, 1]``.
        source_mean, source_std: ``(B, 3)`` LAB statistics of each tile (tissue-masked, see
            :func:`shiftkit.stain.stats.weighted_mean_std`).
        target_mean, target_std: ``(3,)`` or ``(B, 3)``.
        lab: ``images`` already in LAB (:func:`rgb_to_lab`), if the caller has it.

    Returns:
        ``(B, 3, H, W)`` in ``[0, 1]``.
    """
    lab = rgb_to_lab(images) if lab is None else lab
    tm = target_mean.to(lab)
    ts = target_std.to(lab)
    if tm.ndim == 1:
        tm, ts = tm[None], ts[None]
    out = (lab - source_mean.to(lab)[..., None, None]) / source_std.to(lab)[..., None, None] * ts[..., None, None] + tm[..., None, None]
    return lab_to_rgb(out)
