"""Closed-form concentration solves and reconstruction (differentiable, batched, no lstsq)."""

from __future__ import annotations

import torch

from .model import od_to_rgb, rgb_to_od


def _gram_inverse(matrix: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of the 2×2 (or 3×3) Gram matrix ``S S^T`` in float64 and its determinant."""
    s = matrix.double()
    g = s @ s.transpose(-1, -2)
    det = torch.linalg.det(g)
    safe = torch.where(det.abs() < eps, torch.full_like(det, eps), det)
    if g.shape[-1] == 2:
        a, b, c = g[..., 0, 0], g[..., 0, 1], g[..., 1, 1]
        inv = torch.stack([torch.stack([c, -b], -1), torch.stack([-b, a], -1)], -2) / safe[..., None, None]
    else:
        inv = torch.linalg.inv(g + torch.eye(g.shape[-1], dtype=g.dtype, device=g.device) * (det.abs() < eps)[..., None, None] * eps)
    return inv, det


def positive_lasso_2(dtx: torch.Tensor, gram: torch.Tensor, lam: float, overwrite: bool = False) -> torch.Tensor:
    """Exact solution of ``min_a ½‖x − D a‖² + λ·Σa, a ≥ 0`` for two atoms, per pixel (λ = 0: NNLS).

    ``dtx`` is ``D^T x`` ``(B, 2, M)``, ``gram`` is ``D^T D`` ``(B, 2, 2)`` (positive definite). With
    ``r = D^T x − λ`` and ``a = G^{-1} r`` the unconstrained minimiser, the KKT conditions give: if
    ``a_2 ≤ 0`` the optimum has ``a_2 = 0`` and ``a_1 = max(r_1, 0) / G_11`` (and symmetrically), otherwise
    ``a_1 = max(a_1, 0)``. Two small matrix products and two selections, no iterations. ``overwrite=True``
    lets the solve reuse ``dtx``'s memory (the caller no longer needs it; ignored when gradients are needed).
    """
    g = gram
    det = (g[:, 0, 0] * g[:, 1, 1] - g[:, 0, 1] * g[:, 1, 0]).clamp_min(1e-12)
    inv = torch.stack([torch.stack([g[:, 1, 1], -g[:, 0, 1]], -1), torch.stack([-g[:, 1, 0], g[:, 0, 0]], -1)], -2) / det[:, None, None]
    diag = torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(1e-12)[..., None]
    grad = torch.is_grad_enabled() and (dtx.requires_grad or gram.requires_grad)
    r = dtx - lam if lam else dtx
    a = inv.to(r.dtype) @ r
    if grad:
        other_out = torch.stack((a[:, 1] <= 0, a[:, 0] <= 0), 1)  # (B, 2, M): the *other* atom is inactive
        return torch.where(other_out, (r / diag.to(r.dtype)).clamp_min(0), a.clamp_min(0))
    q = r.div_(diag.to(r.dtype)) if (overwrite or r is not dtx) else r / diag.to(r.dtype)
    # The same selection without torch.where on a boolean mask (several times slower on CPU): a {0, 1}
    # mask m, 1 where the other atom is active, and c = m·a⁺ + (1 − m)·q⁺, exact since m is 0 or 1.
    m = torch.empty_like(a)
    torch.sign(a[:, 1], out=m[:, 0])
    torch.sign(a[:, 0], out=m[:, 1])
    m.clamp_min_(0)
    a.clamp_min_(0).mul_(m)
    return a.add_(q.clamp_min_(0).mul_(m.sub_(1).neg_()))  # intermediates are ours: in place


def od_to_concentrations(od: torch.Tensor, matrix: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
    """Concentrations of ``S`` stains by least squares, non-negative by default.

    * ``clamp=False``: ``C = (S S^T)^{-1} S · OD``, the 2×2 (or 3×3) normal equations solved in closed form
      (Gram matrix in float64; a near-singular one — parallel stains — is regularised instead of giving Inf).
    * ``clamp=True`` with 2 stains: the exact non-negative least-squares solution per pixel, in closed form
      (:func:`positive_lasso_2` with λ = 0: when one stain would be negative it is 0 and the other is refitted,
      rather than clipping the unconstrained solution, which overestimates the other stain). With 3 stains
      the unconstrained solution is clipped at 0.

    Args:
        od: ``(B, 3, N)`` or ``(B, 3, H, W)`` natural-log OD.
        matrix: ``(B, S, 3)`` or ``(S, 3)`` stain matrix (S = 2 or 3).
        clamp: clamp concentrations at 0 (physical: stains only absorb).

    Returns:
        ``(B, S, N)`` or ``(B, S, H, W)``, in the dtype of ``od``.
    """
    shape = od.shape
    flat = od.reshape(shape[0], 3, -1)
    if matrix.ndim == 2:
        matrix = matrix.expand(shape[0], *matrix.shape)
    if clamp and matrix.shape[-2] == 2:
        m = matrix.to(od.dtype)
        c = positive_lasso_2(m @ flat, (matrix.double() @ matrix.double().transpose(-1, -2)).to(od.dtype), 0.0, overwrite=True)
        return c.reshape(shape[0], 2, *shape[2:])
    inv, _ = _gram_inverse(matrix)
    proj = (inv @ matrix.double()).to(od.dtype)  # (B, S, 3): pseudo-inverse rows
    c = proj @ flat
    if clamp:
        c = c.clamp_min(0.0) if (c.requires_grad and torch.is_grad_enabled()) else c.clamp_min_(0.0)
    return c.reshape(shape[0], matrix.shape[-2], *shape[2:])


def concentrations_to_od(conc: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``OD = S^T C``: ``(B, S, ...)`` concentrations and ``(B, S, 3)`` matrix to ``(B, 3, ...)`` OD."""
    shape = conc.shape
    flat = conc.reshape(shape[0], shape[1], -1)
    if matrix.ndim == 2:
        matrix = matrix.expand(shape[0], *matrix.shape)
    od = matrix.transpose(-1, -2).to(conc.dtype) @ flat
    return od.reshape(shape[0], 3, *shape[2:])


def rgb_to_concentrations(images: torch.Tensor, matrix: torch.Tensor, i0: float = 1.0, clamp: bool = True) -> torch.Tensor:
    """RGB ``(B, 3, H, W)`` in ``[0, 1]`` to concentrations ``(B, S, H, W)`` for stain ``matrix``."""
    return od_to_concentrations(rgb_to_od(images, i0=i0), matrix, clamp=clamp)


def concentrations_to_rgb(conc: torch.Tensor, matrix: torch.Tensor, i0: float = 1.0) -> torch.Tensor:
    """Concentrations ``(B, S, H, W)`` and ``(B, S, 3)`` matrix to RGB in ``[0, 1]``."""
    return od_to_rgb(concentrations_to_od(conc, matrix), i0=i0)
