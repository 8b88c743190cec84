"""Deterministic stain-augmentation kernels. Every random quantity is an explicit ``(B, ...)`` argument.

Units: concentrations are natural-log OD (see :mod:`shiftkit.stain.model`); angles in degrees.
"""

from __future__ import annotations

import kornia
import torch

from ..core.ops import select
from ..stain.model import LOG2E, MIN_INTENSITY, RUIFROK_DAB, normalize_rows, od_to_rgb, reference_stain_matrix, rgb_to_od
from ..stain.solve import nnls_2_projection, od_to_concentrations, select_nnls_2
from .stain import reinhard_normalize


def _tangent_basis(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit vectors orthogonal to the unit vectors ``v`` ``(..., 3)`` and to each other."""
    axis = torch.zeros_like(v)
    axis.scatter_(-1, v.abs().argmin(-1, keepdim=True), 1.0)  # the coordinate axis least aligned with v
    u1 = normalize_rows(torch.linalg.cross(v, axis, dim=-1))
    u2 = torch.linalg.cross(v, u1, dim=-1)
    return u1, u2


def rotate_stain_vectors(matrix: torch.Tensor, angle: torch.Tensor, azimuth: torch.Tensor) -> torch.Tensor:
    """Rotate each stain vector by ``angle`` degrees towards the tangent direction ``azimuth`` (radians).

    Args:
        matrix: ``(B, S, 3)`` unit stain vectors.
        angle: ``(B, S)`` rotation in degrees (0 keeps the vector).
        azimuth: ``(B, S)`` direction of the rotation in the plane orthogonal to the vector.

    Returns:
        ``(B, S, 3)`` unit vectors; components pushed below 0 are clipped (OD vectors are non-negative).
    """
    v = normalize_rows(matrix)
    u1, u2 = _tangent_basis(v)
    th = torch.deg2rad(angle.to(v.dtype))[..., None]
    ps = azimuth.to(v.dtype)[..., None]
    w = torch.cos(th) * v + torch.sin(th) * (torch.cos(ps) * u1 + torch.sin(ps) * u2)
    return normalize_rows(w.clamp_min(0.0))


def perturb_stains(
    images: torch.Tensor,
    matrix: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    *,
    angle: torch.Tensor | None = None,
    azimuth: torch.Tensor | None = None,
    background_od: float | None = None,
    i0: float = 1.0,
    keep_residual: bool = True,
    od: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scale, shift and rotate the stains of each tile; rebuild the image.

    ``C = NNLS(S, OD)``, ``R = OD − Sᵀ C``; ``C' = max(α·C + β, 0)``; ``S' = rotate(S, angle, azimuth)``;
    ``OD' = S'ᵀ C' + R`` (``R`` dropped when ``keep_residual=False``); ``I = I0·exp(−OD')``. With α = 1,
    β = 0, angle = 0 and the residual kept, the tile is reproduced up to floating-point error.

    Args:
        images: ``(B, 3, H, W)`` float in ``[0, 1]``.
        matrix: ``(B, 2, 3)`` stain matrix of each tile.
        alpha: ``(B, 2)`` per-stain scale of the concentrations.
        beta: ``(B, 2)`` per-stain shift of the concentrations, in natural-log OD.
        angle: optional ``(B, 2)`` stain-vector rotation, in degrees.
        azimuth: optional ``(B, 2)`` direction of that rotation, in radians.
        background_od: if given, pixels whose summed OD (natural log) is below it are background (glass) and
            keep their input value; e.g. 0.3 ≈ every channel brighter than 90 % of ``I0``.
        i0: background intensity.
        keep_residual: add back the OD the two stains do not explain.
        od: optional precomputed :func:`rgb_to_od` of ``images`` (e.g. by lookup table for 8-bit data); it is
            overwritten.

    Returns:
        ``(B, 3, H, W)`` in ``[0, 1]``.
    """
    shape = images.shape
    od = (rgb_to_od(images, i0=i0) if od is None or od.shape != shape or od.dtype != images.dtype else od).flatten(2)
    m = matrix.to(od.dtype)
    m2 = rotate_stain_vectors(m, angle, azimuth) if angle is not None else m
    a_, b_ = alpha.to(od.dtype)[..., None], beta.to(od.dtype)[..., None]
    if _needs_grad(images, matrix, alpha, beta, angle):
        od = rgb_to_od(images, i0=i0).flatten(2)  # differentiable, whatever was passed
        conc = od_to_concentrations(od, m, clamp=True)
        new = (a_ * conc + b_).clamp_min(0.0)
        od2 = m2.transpose(1, 2) @ new
        if keep_residual:
            od2 = od2 + (od - m.transpose(1, 2) @ conc)
        out = od_to_rgb(od2.reshape(shape), i0=i0)
        return _keep_background(out, images, od, background_od)
    if not keep_residual:
        tissue = _tissue(od, shape, background_od)
        conc = od_to_concentrations(od, m, clamp=True)
        od2 = torch.bmm(m2.transpose(1, 2), conc.mul_(a_).add_(b_).clamp_min_(0.0), out=od)
        return _restore_background(_od_to_rgb_(od2, i0).reshape(shape), images, tissue)
    # The same arithmetic in fewer passes. With OD = −ln(I_c / I0), I_c = clamp(I, 1/255, I0), the output is
    # I0·exp(−OD') = I_c·exp(−Δ) with Δ = S'ᵀC' − SᵀC: one (B, 5, 3) product gives the NNLS candidates
    # and the summed OD; C and C' share its rows; Δ is 0 on background, where I·exp(0) = I exactly.
    extra = None if background_od is None else torch.ones(1, 3, dtype=torch.float64)
    y = torch.bmm(nnls_2_projection(m, extra).to(od.dtype), od)
    conc = select_nnls_2(y[:, :2], y[:, 2:4], (m.double()[:, 0] * m.double()[:, 1]).sum(-1))
    torch.mul(conc, a_, out=y[:, 2:4]).add_(b_).clamp_min_(0.0)  # C' = max(α·C + β, 0) (addcmul broadcasts slowly)
    keep = None
    if background_od is not None:
        s_od = y[:, 4:5]  # 1.0 on tissue, 0.0 on background (on CPU written over the summed OD: no new memory)
        keep = torch.ge(s_od, background_od, out=s_od) if s_od.device.type == "cpu" else (s_od >= background_od).to(s_od.dtype)
        y[:, :4].mul_(keep)
    neg_delta = torch.bmm(torch.cat([m.transpose(1, 2), -m2.transpose(1, 2)], 2) * LOG2E, y[:, :4], out=od)  # −Δ·log2(e)
    flat = images.reshape(od.shape)
    clamped = torch.clamp(flat, MIN_INTENSITY, i0, out=y[:, :3])  # y is free again: no fresh memory
    out = neg_delta.exp2_().mul_(clamped).clamp_(0.0, 1.0)
    if keep is not None and i0 != 1.0:  # background brighter than I0 was clamped above: put the input back
        out.mul_(keep).addcmul_(flat.to(out.dtype), 1.0 - keep)
    return out.reshape(shape)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and torch.is_tensor(t) and t.requires_grad for t in tensors)


def _tissue(od: torch.Tensor, shape, background_od: float | None):
    """``(B, 1, H, W)`` bool: summed OD at or above ``background_od`` (None: no background rule)."""
    return None if background_od is None else od.reshape(shape).sum(1, keepdim=True) >= background_od


def _od_to_rgb_(od: torch.Tensor, i0: float) -> torch.Tensor:
    """:func:`od_to_rgb` in place on ``od`` (no autograd)."""
    out = od.mul_(-LOG2E).exp2_()  # exp(−OD) by exp2 (see LOG2E)
    if i0 != 1.0:
        out.mul_(i0)
    return out.clamp_(0.0, 1.0)


def _restore_background(out: torch.Tensor, images: torch.Tensor, tissue) -> torch.Tensor:
    """The input pixel where ``tissue`` is False; ``out``'s memory is reused (autograd: ``torch.where``)."""
    return out if tissue is None else select(tissue, out, images.to(out.dtype), overwrite=True)


def _keep_background(out: torch.Tensor, images: torch.Tensor, od: torch.Tensor, background_od: float | None) -> torch.Tensor:
    """Where the summed OD of the input is below ``background_od`` (glass), return the input pixel."""
    return _restore_background(out, images, _tissue(od, images.shape, background_od))


def hed_matrix(dtype=torch.float32, device=None) -> torch.Tensor:
    """Ruifrok & Johnston's H, E, DAB unit vectors as a ``(3, 3)`` matrix (rows), as in scikit-image's rgb2hed."""
    m = torch.cat([reference_stain_matrix("ruifrok", dtype=torch.float64), normalize_rows(torch.tensor([RUIFROK_DAB], dtype=torch.float64))])
    return m.to(dtype=dtype, device=device)


def rgb_to_hed(images: torch.Tensor, i0: float = 1.0) -> torch.Tensor:
    """RGB ``(B, 3, H, W)`` to H, E, DAB concentrations ``(B, 3, H, W)`` (natural-log OD units, unclamped).

    The same colour deconvolution as ``skimage.color.rgb2hed`` up to the constant factor ``ln(10^6)`` that
    scikit-image ≥ 0.19 divides by.
    """
    od = rgb_to_od(images, i0=i0)
    m = hed_matrix(od.dtype, od.device)
    return od_to_concentrations(od, m[None].expand(od.shape[0], 3, 3), clamp=False)


def hed_to_rgb(hed: torch.Tensor, i0: float = 1.0) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed`, clipped to ``[0, 1]``."""
    m = hed_matrix(hed.dtype, hed.device)
    od = torch.einsum("bshw,sc->bchw", hed, m)
    return od_to_rgb(od, i0=i0)


def hed_jitter(
    images: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, i0: float = 1.0, background_od: float | None = None,
    od: torch.Tensor | None = None,
) -> torch.Tensor:
    """HED colour augmentation (Tellez et al. 2018): ``c' = α·c + β`` per HED channel, rebuilt and **clipped**
    (never min-max rescaled, so absolute intensity is kept and blank tiles stay blank).

    Args:
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        alpha: ``(B, 3)`` scale of the H, E and DAB concentrations.
        beta: ``(B, 3)`` shift of the H, E and DAB concentrations, in natural-log OD.
        i0: background (incident light) intensity in ``[0, 1]`` units.
        background_od: keep pixels whose summed OD is below it (see :func:`perturb_stains`).
        od: optional precomputed :func:`rgb_to_od` of ``images`` (see :func:`perturb_stains`).
    """
    # linear in OD: OD' = Mᵀ(α ⊙ M⁻ᵀ OD + β) = A·OD + b with one (3, 3) matrix and bias per tile
    od = rgb_to_od(images, i0=i0) if od is None or od.shape != images.shape or od.dtype != images.dtype else od
    m = hed_matrix(torch.float64, od.device)
    a = m.T[None] * alpha.double()[:, None, :] @ torch.linalg.inv(m.T)[None]  # (B, 3, 3)
    b = (m.T[None] @ beta.double()[..., None])  # (B, 3, 1)
    if _needs_grad(images, alpha, beta):
        od = rgb_to_od(images, i0=i0)  # differentiable, whatever was passed
        out = torch.baddbmm(b.to(od.dtype), a.to(od.dtype), od.flatten(2)).reshape(images.shape)
        return _keep_background(od_to_rgb(out, i0=i0), images, od, background_od)
    tissue = _tissue(od, images.shape, background_od)
    # −OD'·log2(e) from the product (the bias in place, not a broadcast copy), then exp2 (see LOG2E)
    out = torch.bmm((a * -LOG2E).to(od.dtype), od.flatten(2)).add_((b * -LOG2E).to(od.dtype)).exp2_()
    if i0 != 1.0:
        out.mul_(i0)
    return _restore_background(out.clamp_(0.0, 1.0).reshape(images.shape), images, tissue)


COLOR_SPACES = ("lab", "hsv", "hed")


def rgb_to_space(images: torch.Tensor, space: str) -> torch.Tensor:
    """RGB to ``"lab"`` (Kornia CIELAB), ``"hsv"`` (Kornia, H in radians) or ``"hed"`` (:func:`rgb_to_hed`)."""
    if space == "lab":
        return kornia.color.rgb_to_lab(images)
    if space == "hsv":
        return kornia.color.rgb_to_hsv(images)
    return rgb_to_hed(images)


def space_to_rgb(x: torch.Tensor, space: str) -> torch.Tensor:
    if space == "lab":
        return kornia.color.lab_to_rgb(x, clip=True)
    if space == "hsv":
        h = torch.remainder(x[:, :1], 2 * torch.pi)
        return kornia.color.hsv_to_rgb(torch.cat([h, x[:, 1:].clamp(0.0, 1.0)], 1)).clamp(0.0, 1.0)
    return hed_to_rgb(x)


def transfer_statistics(
    images: torch.Tensor,
    source_mean: torch.Tensor,
    source_std: torch.Tensor,
    target_mean: torch.Tensor,
    target_std: torch.Tensor,
    space: str = "lab",
) -> torch.Tensor:
    """Per-channel mean/std transfer in a colour space (Reinhard in LAB; RandStainNA in LAB/HSV/HED).

    ``x' = (x − μ_src) / σ_src · σ_tgt + μ_tgt`` with ``(B, 3)`` statistics, then back to RGB in ``[0, 1]``.
    """
    if space == "lab":  # Reinhard's transfer: without gradients it never forms the LAB image
        return reinhard_normalize(images, source_mean, source_std, target_mean, target_std)
    x = rgb_to_space(images, space)
    y = (x - source_mean.to(x)[..., None, None]) / source_std.to(x)[..., None, None] * target_std.to(x)[..., None, None] + target_mean.to(x)[..., None, None]
    return space_to_rgb(y, space)
