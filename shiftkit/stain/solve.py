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
    ``r = D^T x − λ``, ``a = G^{-1} r`` the unconstrained minimiser and ``q = r / diag(G)`` each atom refitted
    alone, the KKT conditions give, per coordinate, ``a_i⁺`` if the other coordinate of ``a`` is positive and
    ``q_i⁺`` otherwise (see :func:`select_nnls_2`). Two small matrix products and a minimum, no iterations.
    ``overwrite=True`` lets the solve reuse ``dtx``'s memory (the caller no longer needs it; ignored when
    gradients are needed).
    """
    inv, diag = _inverse_and_diagonal_2(gram)
    grad = torch.is_grad_enabled() and (dtx.requires_grad or gram.requires_grad)
    r = dtx - lam if lam else dtx
    a = inv.to(r.dtype) @ r
    if grad:
        return select_nnls_2(a, r / diag.to(r.dtype)[..., None], gram[:, 0, 1])
    q = r.div_(diag.to(r.dtype)[..., None]) if (overwrite or r is not dtx) else r / diag.to(r.dtype)[..., None]
    return select_nnls_2(a, q, gram[:, 0, 1])


def _inverse_and_diagonal_2(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = gram
    det = (g[:, 0, 0] * g[:, 1, 1] - g[:, 0, 1] * g[:, 1, 0]).clamp_min(1e-12)
    inv = torch.stack([torch.stack([g[:, 1, 1], -g[:, 0, 1]], -1), torch.stack([-g[:, 1, 0], g[:, 0, 0]], -1)], -2) / det[:, None, None]
    return inv, torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(1e-12)


def select_nnls_2(a: torch.Tensor, q: torch.Tensor, g12: torch.Tensor, host_checks: bool | None = None) -> torch.Tensor:
    """The two-atom active-set choice: ``c_i = a_i⁺`` where the other coordinate ``a_j > 0``, else ``q_i⁺``.

    ``a`` ``(B, 2, M)`` is the unconstrained solution, ``q`` each atom refitted alone (``r_i / G_ii``) and
    ``g12`` ``(B,)`` the off-diagonal of the Gram matrix. Since ``q_i = a_i + (G_12 / G_ii)·a_j``, the choice
    is a minimum when ``G_12 ≥ 0`` (``q_i ≤ a_i`` exactly when ``a_j ≤ 0``; always the case for non-negative
    stain vectors) and a maximum when ``G_12 < 0``: ``c = max(min(a, q), 0)``, two passes instead of masks
    and selections. Without gradients the result is written into ``a`` (which must be the caller's own).
    ``host_checks`` (default: on CPU) looks at the signs on the host to skip work; off (GPU), every tile takes
    ``s·min(s·a, s·q)`` with ``s = ±1``, without a device-to-host round trip.
    """
    grad = torch.is_grad_enabled() and (a.requires_grad or q.requires_grad)
    neg = g12 < 0
    if not (a.device.type == "cpu" if host_checks is None else host_checks):
        s = torch.where(neg, -1.0, 1.0).to(a.dtype)[:, None, None]
        c = torch.minimum(a * s, q * s).mul_(s)
        return c.clamp_min(0.0) if grad else c.clamp_min_(0.0)
    if not bool(neg.any()):
        c = torch.minimum(a, q) if grad else torch.minimum(a, q, out=a)
    elif bool(neg.all()):
        c = torch.maximum(a, q) if grad else torch.maximum(a, q, out=a)
    else:  # mixed signs: s·min(s·a, s·q) with s = ±1 per tile
        s = torch.where(neg, -1.0, 1.0).to(a.dtype)[:, None, None]
        c = torch.minimum(a * s, q * s) * s
    return c.clamp_min(0.0) if grad else c.clamp_min_(0.0)


def nnls_2_projection(matrix: torch.Tensor, extra_rows: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, 4, 3)`` rows ``[G^{-1} S; S / diag(G)]`` (float64) for a ``(B, 2, 3)`` stain matrix ``S``.

    One ``bmm`` of it with the OD ``(B, 3, M)`` gives both halves that :func:`select_nnls_2` chooses from:
    the unconstrained solution ``a`` and the single-stain refits ``q``. ``extra_rows`` ``(R, 3)`` or
    ``(B, R, 3)`` are appended (e.g. ``[1, 1, 1]`` for the summed OD in the same pass).
    """
    s = matrix.double()
    inv, diag = _inverse_and_diagonal_2(s @ s.transpose(-1, -2))
    rows = [inv @ s, s / diag[..., None]]
    if extra_rows is not None:
        rows.append(extra_rows.to(s).expand(s.shape[0], *extra_rows.shape[-2:]))
    return torch.cat(rows, 1)


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
        y = nnls_2_projection(matrix).to(od.dtype) @ flat  # (B, 4, M): a and q in one pass
        c = select_nnls_2(y[:, :2], y[:, 2:], _gram_12(matrix))
        return c.reshape(shape[0], 2, *shape[2:])
    inv, _ = _gram_inverse(matrix)
    proj = (inv @ matrix.double()).to(od.dtype)  # (B, S, 3): pseudo-inverse rows
    c = proj @ flat
    if clamp:
        c = c.clamp_min(0.0) if (c.requires_grad and torch.is_grad_enabled()) else c.clamp_min_(0.0)
    return c.reshape(shape[0], matrix.shape[-2], *shape[2:])


def _gram_12(matrix: torch.Tensor) -> torch.Tensor:
    m = matrix.double()
    return (m[:, 0] * m[:, 1]).sum(-1)


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
