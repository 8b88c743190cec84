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


def od_to_concentrations(od: torch.Tensor, matrix: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
    """Least-squares concentrations of ``S`` stains: ``C = (S S^T)^{-1} S · OD``.

    The 2×2 (or 3×3) normal equations are solved in closed form; the Gram matrix is formed in float64
    and a near-singular one (parallel stains) is regularised instead of producing Inf.

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
