"""Small tensor helpers shared by every layer."""

from __future__ import annotations

import torch

from .errors import InvalidArgumentError


def select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """``torch.where(mask, a, b)`` for a boolean ``mask`` that broadcasts against ``a`` and ``b``.

    On CPU without autograd it is computed as the blend ``a·m + b·(1 − m)`` with ``m`` the mask as 0/1
    floats, which is exact (``x·1 = x``, ``x·0 = 0``) and faster there than ``torch.where`` on a boolean mask
    (docs/benchmarks.md, "Where the time goes"). The blend needs finite ``a`` and
    ``b`` (an infinite or NaN value in the operand that is *not* selected would leak as NaN); callers use it on
    images, optical densities and clamped outputs. Elsewhere, and when gradients are needed, ``torch.where``.
    ``overwrite=True`` lets the blend reuse ``a``'s memory (the caller no longer needs ``a``).
    """
    if (a.device.type != "cpu" or not a.is_floating_point() or a.dtype != b.dtype
            or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))):
        return torch.where(mask, a, b)
    shape = torch.broadcast_shapes(mask.shape, a.shape, b.shape)
    if a.shape != shape:
        return torch.where(mask, a, b)
    m = mask.to(a.dtype)
    return (a.mul_(m) if overwrite else a * m).addcmul_(b, 1.0 - m)


def eigh3(a: torch.Tensor):
    """Eigenvalues (ascending) and eigenvectors (columns) of symmetric 3×3 matrices ``(..., 3, 3)``, in closed form.

    A non-iterative replacement for ``torch.linalg.eigh`` on 3×3 batches (D. Eberly, "A Robust Eigensolver for
    3×3 Symmetric Matrices", 2014): the eigenvalues by the trigonometric solution of the characteristic cubic;
    the eigenvector of the eigenvalue that stands furthest from the other two as the longest cross product of
    two rows of ``A − λI``; the other two from the 2×2 problem on the plane orthogonal to it, solved by one
    Jacobi rotation (exact and orthogonal however close those two eigenvalues are). Every
    branch is a ``torch.where`` over the batch: no host synchronisation, no solver library, the same arithmetic
    on every device (CUDA's batched ``eigh`` is a cuSOLVER call that checks its status on the host, and is
    documented to flip nearly degenerate planes, REFERENCES A15). The matrix is scaled by its largest entry
    first. Use float64 where the eigenvectors of close eigenvalues matter.

    Returns ``(values (..., 3), vectors (..., 3, 3))`` as ``torch.linalg.eigh`` does: ``vectors[..., :, k]``
    belongs to ``values[..., k]``, orthonormal; signs are arbitrary.
    """
    if a.shape[-2:] != (3, 3):
        raise InvalidArgumentError(f"`a` has the wrong shape: expected (..., 3, 3) symmetric matrices, got {tuple(a.shape)}")
    scale = a.abs().amax(dim=(-2, -1), keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    m = a / scale
    a00, a01, a02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    a11, a12, a22 = m[..., 1, 1], m[..., 1, 2], m[..., 2, 2]
    q = (a00 + a11 + a22) / 3
    b00, b11, b22 = a00 - q, a11 - q, a22 - q
    p2 = (b00 * b00 + b11 * b11 + b22 * b22 + 2 * (a01 * a01 + a02 * a02 + a12 * a12)) / 6
    p = p2.sqrt()
    ps = torch.where(p > 0, p, torch.ones_like(p))
    det = (b00 * (b11 * b22 - a12 * a12) - a01 * (a01 * b22 - a12 * a02) + a02 * (a01 * a12 - b11 * a02))
    r = (det / (2 * ps * ps * ps)).clamp(-1.0, 1.0)
    phi = torch.acos(r) / 3
    hi = q + 2 * p * torch.cos(phi)  # largest
    lo = q + 2 * p * torch.cos(phi + 2 * torch.pi / 3)  # smallest
    eye = torch.eye(3, dtype=m.dtype, device=m.device)

    def isolated_vector(lam):
        rows = m - lam[..., None, None] * eye
        r0, r1, r2 = rows[..., 0, :], rows[..., 1, :], rows[..., 2, :]
        c = torch.stack([torch.linalg.cross(r0, r1, dim=-1), torch.linalg.cross(r0, r2, dim=-1),
                         torch.linalg.cross(r1, r2, dim=-1)], dim=-2)  # (..., 3, 3)
        n2 = (c * c).sum(-1)
        best = n2.argmax(-1, keepdim=True)
        v = c.gather(-2, best[..., None].expand(*best.shape, 3))[..., 0, :]
        nv = v.norm(dim=-1, keepdim=True)
        e0 = torch.zeros_like(v)
        e0[..., 0] = 1.0
        return torch.where(nv > 0, v / torch.where(nv > 0, nv, torch.ones_like(nv)), e0)  # A = λI: any vector

    def complement(w):
        # an orthonormal pair (u, v) orthogonal to the unit vector w
        big_x = w[..., 0].abs() > w[..., 1].abs()
        inv_x = torch.rsqrt((w[..., 0] ** 2 + w[..., 2] ** 2).clamp_min(1e-300))
        inv_y = torch.rsqrt((w[..., 1] ** 2 + w[..., 2] ** 2).clamp_min(1e-300))
        zero = torch.zeros_like(w[..., 0])
        ux = torch.stack([-w[..., 2] * inv_x, zero, w[..., 0] * inv_x], -1)
        uy = torch.stack([zero, w[..., 2] * inv_y, -w[..., 1] * inv_y], -1)
        u = torch.where(big_x[..., None], ux, uy)
        return u, torch.linalg.cross(w, u, dim=-1)

    first_hi = r >= 0  # the largest eigenvalue is the isolated one; else the smallest
    w0 = isolated_vector(torch.where(first_hi, hi, lo))
    u, v = complement(w0)
    mu = (m @ u[..., None])[..., 0]
    mv = (m @ v[..., None])[..., 0]
    # the 2×2 problem on the plane orthogonal to w0, solved exactly by one Jacobi rotation (no cancellation
    # when the two remaining eigenvalues are close, where the cubic's roots lose half their digits)
    c00, c01, c11 = (u * mu).sum(-1), (u * mv).sum(-1), (v * mv).sum(-1)
    theta = 0.5 * torch.atan2(2 * c01, c00 - c11)
    ct, st = torch.cos(theta), torch.sin(theta)
    w_big = ct[..., None] * u + st[..., None] * v  # the larger eigenvalue of the pair
    w_small = -st[..., None] * u + ct[..., None] * v
    half = 0.5 * (c00 + c11)
    rad = torch.sqrt((0.5 * (c00 - c11)) ** 2 + c01 * c01)
    l0 = (w0 * (m @ w0[..., None])[..., 0]).sum(-1)  # Rayleigh quotient of the isolated vector
    fh = first_hi[..., None]
    vlo = torch.where(fh, w_small, w0)
    vmid = torch.where(fh, w_big, w_small)
    vhi = torch.where(fh, w0, w_big)
    values = torch.stack([torch.where(first_hi, half - rad, l0), torch.where(first_hi, half + rad, half - rad),
                          torch.where(first_hi, l0, half + rad)], dim=-1) * scale[..., 0]
    vectors = torch.stack([vlo, vmid, vhi], dim=-1)
    return values, vectors


def eigh_sym3(a: torch.Tensor, closed_form: bool | None = None):
    """``torch.linalg.eigh`` of ``(..., 3, 3)`` symmetric batches, by :func:`eigh3` off CPU.

    On CPU LAPACK is the faster of the two for the batch sizes used here (the closed form only wins for many
    thousands of matrices; docs/benchmarks.md). On CUDA ``torch.linalg.eigh``
    synchronizes the device with the host (PyTorch documentation) and is a cuSOLVER call; the closed form is a
    few dozen elementwise kernels. ``closed_form`` forces either route (tests run the GPU route on CPU).
    """
    if closed_form is None:
        closed_form = a.device.type != "cpu"
    return eigh3(a) if closed_form else torch.linalg.eigh(a)
