"""Masked, fixed-shape statistics over flattened pixels ``(B, C, N)`` with weights ``(B, N)``."""

from __future__ import annotations

from typing import Sequence, Union

import torch


def masked_quantile(values: torch.Tensor, weights: torch.Tensor, q: Union[float, Sequence[float]]) -> torch.Tensor:
    """Quantiles of ``values`` over the entries with positive weight, per row.

    Uses numpy's default ("linear") definition on the selected entries: position ``q · (n − 1)`` in
    the sorted values, linearly interpolated. Rows with no selected entry give 0.

    Args:
        values: ``(..., N)``.
        weights: ``(..., N)``; entries with weight > 0 are used (weights act as a mask).
        q: a quantile in ``[0, 1]`` or a sequence of them.

    Returns:
        ``(..., Q)`` (``(...)`` if ``q`` is a scalar).
    """
    scalar = isinstance(q, (int, float))
    qs = torch.as_tensor([q] if scalar else list(q), dtype=torch.float64, device=values.device)
    mask = weights > 0
    fill = torch.finfo(values.dtype).max
    s = torch.where(mask, values, torch.full_like(values, fill)).sort(dim=-1).values
    n = mask.sum(-1, keepdim=True)  # (..., 1)
    pos = qs * (n - 1).clamp_min(0).to(torch.float64)  # (..., Q)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = (pos - lo.to(torch.float64)).to(values.dtype)
    vlo = s.gather(-1, lo)
    vhi = s.gather(-1, hi)
    out = vlo + (vhi - vlo) * frac
    out = torch.where(n > 0, out, torch.zeros_like(out))
    return out[..., 0] if scalar else out


def weighted_mean_cov(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted mean ``(B, C)``, covariance ``(B, C, C)`` and weight sum ``(B,)`` in float64.

    Rows with zero total weight get mean 0 and identity covariance (flagged by the weight sum).
    """
    xd = x.double()
    w = weights.double()
    n = w.sum(-1)  # (B,)
    safe = n.clamp_min(1.0)
    mean = (xd * w[:, None]).sum(-1) / safe[:, None]
    xc = (xd - mean[..., None]) * w[:, None].sqrt()
    cov = xc @ xc.transpose(-1, -2) / safe[:, None, None]
    eye = torch.eye(x.shape[1], dtype=torch.float64, device=x.device).expand_as(cov)
    empty = (n <= 0)[:, None, None]
    cov = torch.where(empty | ~torch.isfinite(cov), eye, cov)
    return mean, cov, n


def weighted_mean_std(x: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel weighted mean and standard deviation ``(B, C)`` (population std, floored at ``eps``)."""
    w = weights[:, None].to(x.dtype)
    n = w.sum(-1).clamp_min(1.0)
    mean = (x * w).sum(-1) / n
    var = (((x - mean[..., None]) ** 2) * w).sum(-1) / n
    return mean, var.clamp_min(0).sqrt().clamp_min(eps)
