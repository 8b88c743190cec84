"""Deterministic stain-normalization kernels on float ``(B, 3, H, W)`` batches in ``[0, 1]``.

No randomness and no state: every per-sample quantity is an explicit ``(B, ...)`` tensor. Gradients flow
through the apply steps (``rgb_to_od`` → solve → scale → reconstruct) with respect to the image and the
matrices, except where a clamp is active.
"""

from __future__ import annotations

import math

import kornia
import torch

from ..stain.mask import linear_to_srgb, srgb_to_linear
from ..stain.model import LOG2E, MIN_INTENSITY, od_to_rgb, rgb_to_od
from ..stain.solve import nnls_2_projection, od_to_concentrations, select_nnls_2
from ..stain.stats import weighted_mean_cov


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
    # exp(−R·C) with R, C ≥ 0 is already in (0, I0_t]; the test looks at R on the host, so off CPU (where a
    # clamp costs less than a device sync) the output is always clamped
    if images.device.type != "cpu" or not (clamp_concentrations and ti0 <= 1.0 and bool((rebuild >= 0).all())):
        out = out.clamp_(0.0, 1.0)
    return out.reshape(images.shape)


def rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65, sRGB companding) via Kornia: L in [0, 100], a and b roughly in [-128, 127]."""
    return kornia.color.rgb_to_lab(images)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab`, clamped to ``[0, 1]``."""
    return kornia.color.lab_to_rgb(lab, clip=True)


# CIELAB exactly as Kornia computes it (D65 white, sRGB companding, kornia.color's constants), split into its
# non-linear part, the companded tristimulus values f = f(XYZ / white), and its linear part L*a*b* = A·f + c.
# Reinhard's per-channel affine transfer in LAB is then one 3×3 affine map of f per tile, and LAB itself is
# never stored.
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_XYZ_TO_RGB = ((3.2404813432005266, -1.5371515162713185, -0.4985363261688878),
               (-0.9692549499965682, 1.8759900014898907, 0.0415559265582928),
               (0.0556466391351772, -0.2040413383665112, 1.0573110696453443))
_WHITE = (0.95047, 1.0, 1.08883)
_F_TO_LAB = ((0.0, 116.0, 0.0), (500.0, -500.0, 0.0), (0.0, 200.0, -200.0))
_LAB_TO_F = ((1 / 116, 1 / 500, 0.0), (1 / 116, 0.0, 0.0), (1 / 116, 0.0, -1 / 200))  # its inverse, in closed form
_LAB_OFFSET = (-16.0, 0.0, 0.0)


def _matrix(rows, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, device=like.device)


def lab_companded(images: torch.Tensor, u8: torch.Tensor | None = None, linear: torch.Tensor | None = None) -> torch.Tensor:
    """The companded tristimulus values ``f = (f(X/Xn), f(Y/Yn), f(Z/Zn))`` ``(B, 3, H·W)`` of ``(B, 3, H, W)``
    sRGB images, with ``L*a*b* = A·f + c`` (:func:`rgb_to_lab` to within 2e-4 in LAB units, tested: the
    minimum picks the line for ``t`` just above 0.008856, where the two differ by 3e-7).

    ``f(t) = t^(1/3)`` above 0.008856 and ``7.787·t + 4/29`` below, computed as the minimum of the two (the
    line is the cube root's tangent there, and the cube root is concave), the cube root as ``exp2(log2(t)/3)``.
    ``u8``: the same images as uint8, whose sRGB decoding then comes from a lookup table; ``linear``: their
    :func:`shiftkit.stain.mask.srgb_to_linear`, if the caller has it.
    """
    lin = (srgb_to_linear(images, u8) if linear is None else linear).flatten(2)
    dtype = lin.dtype
    m = (_matrix(_RGB_TO_XYZ, lin) / _matrix(_WHITE, lin)[:, None]).to(dtype)
    t = m @ lin  # XYZ / white
    f = torch.clamp_min(t, 0.008856).log2_().mul_(1 / 3).exp2_()
    return torch.minimum(f, t.mul_(7.787).add_(4 / 29), out=f)


def lab_moments(f: torch.Tensor, weights: torch.Tensor, binary: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted per-channel LAB mean and population std ``(B, 3)`` (float64; std floored at 1e-6) from the
    companded values ``f`` ``(B, 3, M)`` of :func:`lab_companded` and weights ``(B, M)``. LAB is formed by one
    3×3 product for this (a temporary): the variances of ``a* = 500·(f_x − f_y)`` and ``b*`` taken from the
    covariance of ``f`` would lose digits to cancellation. ``binary=True`` promises weights in ``{0, 1}``."""
    a = _matrix(_F_TO_LAB, f).to(f.dtype)
    mean, cov, _ = weighted_mean_cov(a @ f, weights, binary=binary)  # (LAB − c) moments
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    return mean + _matrix(_LAB_OFFSET, f), var.clamp_min(0).sqrt().clamp_min(1e-6)


def reinhard_from_companded(
    f: torch.Tensor, source_mean: torch.Tensor, source_std: torch.Tensor, target_mean: torch.Tensor,
    target_std: torch.Tensor, shape: torch.Size,
) -> torch.Tensor:
    """Reinhard's transfer applied to the companded values of :func:`lab_companded` (consumed: overwritten) and
    back to sRGB ``shape`` ``(B, 3, H, W)``, clamped to ``[0, 1]``; :func:`lab_to_rgb` of the transferred LAB to
    within 2e-4 (tested).

    In f: ``f' = A⁻¹·D·A·f + A⁻¹·(D·(c − μ_src) + μ_tgt − c)`` with ``D = diag(σ_tgt / σ_src)``. Then as Kornia:
    ``f_z ≥ 0``; the inverse companding ``f³`` above 6/29 and ``(f − 4/29) / 7.787`` below, as
    ``max(f, t)³ + (min(f, t) − t) / 7.787`` with ``t = 6/29`` (exact above ``t``, 3e-6 off below); white point and linear RGB
    in one 3×3 product; sRGB encoding as the minimum of its two branches.
    """
    dtype = f.dtype
    a = _matrix(_F_TO_LAB, f)
    c = _matrix(_LAB_OFFSET, f)
    tm, ts = target_mean.double().to(f.device), target_std.double().to(f.device)
    if tm.ndim == 1:
        tm, ts = tm[None], ts[None]
    d = ts / source_std.double().clamp_min(1e-6)  # (B, 3)
    a_inv = _matrix(_LAB_TO_F, f)  # no linear-algebra call on the device
    k = a_inv @ (d[:, :, None] * a)  # (B, 3, 3)
    bias = (d * (c - source_mean.double()) + tm - c) @ a_inv.T  # (B, 3)
    f2 = torch.baddbmm(bias.to(dtype)[..., None], k.to(dtype), f) if f.shape[0] else f
    return srgb_from_companded(f2, shape)


def srgb_from_companded(f: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """sRGB ``shape`` ``(B, 3, H, W)`` in ``[0, 1]`` from companded values ``f`` ``(B, 3, H·W)`` (consumed:
    overwritten), as Kornia's :func:`lab_to_rgb` does after forming ``f`` from L*a*b*: ``f_z ≥ 0``; the inverse
    companding ``f³`` above 6/29 and ``(f − 4/29) / 7.787`` below, as ``max(f, t)³ + (min(f, t) − t) / 7.787``
    with ``t = 6/29`` (exact above ``t``, 3e-6 off below); white point and linear RGB in one 3×3 product; sRGB
    encoding as the minimum of its two branches."""
    dtype = f.dtype
    f[:, 2].clamp_min_(0.0)
    thr = 0.2068966
    low = torch.clamp_max(f, thr).sub_(thr)  # 0 above the threshold
    xyz = f.clamp_min_(thr).pow_(3).add_(low, alpha=1 / 7.787)  # in place: one allocation in all
    m = (_matrix(_XYZ_TO_RGB, f) * _matrix(_WHITE, f)[None]).to(dtype)
    lin = torch.matmul(m, xyz, out=low)  # linear RGB
    return linear_to_srgb(lin, overwrite=True, out=f).reshape(shape)


def lab_inverse_affine(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A⁻¹, c)`` float64 on ``like``'s device: the companded values of L*a*b* are ``f = A⁻¹·(L*a*b* − c)``, the
    input of :func:`srgb_from_companded` (Kornia's constants)."""
    return _matrix(_LAB_TO_F, like), _matrix(_LAB_OFFSET, like)


def rgb_to_lab_fast(images: torch.Tensor) -> torch.Tensor:
    """:func:`rgb_to_lab` of ``(B, 3, H, W)`` sRGB through :func:`lab_companded` and one 3×3 product: within 2e-4
    LAB units of Kornia (tested), several times faster on CPU."""
    f = lab_companded(images)
    a = _matrix(_F_TO_LAB, f).to(f.dtype)
    return torch.matmul(a, f).add_(_matrix(_LAB_OFFSET, f).to(f.dtype)[:, None]).reshape(images.shape)


def lab_to_rgb_fast(lab: torch.Tensor) -> torch.Tensor:
    """:func:`lab_to_rgb` of ``(B, 3, H, W)`` L*a*b* (clamped to ``[0, 1]``) through :func:`srgb_from_companded`:
    within 2e-4 of Kornia (tested)."""
    v = lab.flatten(2)
    a_inv, c = lab_inverse_affine(v)
    f = torch.matmul(a_inv.to(v.dtype), v - c.to(v.dtype)[:, None])
    return srgb_from_companded(f, lab.shape)


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
        source_mean: ``(B, 3)`` LAB mean of each tile (tissue-masked, see
            :func:`shiftkit.stain.stats.weighted_mean_std`).
        source_std: ``(B, 3)`` LAB standard deviation of each tile (tissue-masked, likewise).
        target_mean: ``(3,)`` or ``(B, 3)`` target LAB mean.
        target_std: ``(3,)`` or ``(B, 3)`` target LAB standard deviation.
        lab: ``images`` already in LAB (:func:`rgb_to_lab`), if the caller has it.

    Returns:
        ``(B, 3, H, W)`` in ``[0, 1]``.
    """
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (images, source_mean, source_std, target_mean, target_std))
    if lab is None and not grad:  # the same transfer without a LAB tensor (see reinhard_from_companded)
        out = reinhard_from_companded(lab_companded(images), source_mean, source_std, target_mean, target_std, images.shape)
        return out.to(images.dtype) if images.is_floating_point() else out
    lab = rgb_to_lab(images) if lab is None else lab
    tm = target_mean.to(lab)
    ts = target_std.to(lab)
    if tm.ndim == 1:
        tm, ts = tm[None], ts[None]
    out = (lab - source_mean.to(lab)[..., None, None]) / source_std.to(lab)[..., None, None] * ts[..., None, None] + tm[..., None, None]
    return lab_to_rgb(out)


# ----------------------------------------------------------------------------- Reinhard, 8-bit OpenCV route
#: OpenCV's 8-bit CIELAB: L·255/100, a + 128, b + 128 (D65, sRGB).
_LAB8_SCALE = (255.0 / 100.0, 1.0, 1.0)
_LAB8_OFFSET = (0.0, 128.0, 128.0)


def reinhard_opencv8(image, target_mean, target_std, *, luminosity_threshold: float = 0.8, min_tissue_pixels: int = 256,
                     min_tissue_fraction: float = 0.01, min_std: float = 1e-2, source=None):
    """Reinhard's transfer on one uint8 RGB image ``(H, W, 3)`` in OpenCV's 8-bit CIELAB: ``cvtColor`` to LAB,
    tissue-masked ``meanStdDev`` (tissue: L*/100 below ``luminosity_threshold``), the per-channel affine map as a
    256-entry lookup table per channel (``cv2.LUT``: exact for 8-bit LAB), ``cvtColor`` back.

    ``target_mean``/``target_std`` (and ``source``, a ``(mean, std)`` pair to use instead of the image's own) are
    in float CIELAB units (L 0–100, a, b), as :class:`~shiftkit.StainNormalizer` fits them. Returns ``(uint8
    image, status code)``; a tile with too little tissue or a flat channel is returned unchanged (status 1 or 2).
    The quantisation of OpenCV's 8-bit LAB (L in steps of 0.39) makes this route differ from the float route by
    about one level; it is opt-in (``StainNormalizer("reinhard", route="opencv8")``)."""
    import cv2
    import numpy as np

    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    scale, offset = np.array(_LAB8_SCALE), np.array(_LAB8_OFFSET)
    mask = np.ascontiguousarray(lab[..., 0] < luminosity_threshold * 255.0).view(np.uint8)
    n_tissue, n = int(cv2.countNonZero(mask)), mask.size
    if n_tissue < min_tissue_pixels or n_tissue / n < min_tissue_fraction:
        return image, 1
    if source is None:
        m8, s8 = cv2.meanStdDev(lab, mask=mask)
        m8, s8 = m8.ravel(), s8.ravel()
    else:
        m8, s8 = np.asarray(source[0], float) * scale + offset, np.asarray(source[1], float) * scale
    if (s8 / scale < min_std).any():
        return image, 2
    tm = np.asarray(target_mean, float) * scale + offset
    ts = np.asarray(target_std, float) * scale
    v = np.arange(256, dtype=np.float64)[:, None]
    lut = np.clip(np.rint((v - m8) * (ts / s8) + tm), 0, 255).astype(np.uint8)  # (256, 3)
    out = cv2.cvtColor(cv2.LUT(lab, lut[None]), cv2.COLOR_LAB2RGB)
    return out, 0
