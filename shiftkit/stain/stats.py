"""Masked, fixed-shape statistics over flattened pixels ``(B, C, N)`` with weights ``(B, N)``."""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from ..core.ops import select


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
    qlist = [float(q)] if scalar else [float(v) for v in q]
    mask = weights > 0
    n = mask.sum(-1, keepdim=True)  # (..., 1)
    size = values.shape[-1]
    fill = torch.finfo(values.dtype).max
    cols = []
    for qi in qlist:
        pos = qi * (n - 1).clamp_min(0).to(torch.float64)  # (..., 1), ascending rank among selected
        # only the extreme ranks are needed for extreme quantiles: topk instead of a full sort
        k = min(size, int(math.floor(min(qi, 1.0 - qi) * max(size - 1, 0))) + 2)
        if qi >= 0.5:
            top = select(mask, values, torch.full_like(values, -fill)).topk(k, dim=-1, largest=True, sorted=True).values
            rank = (n - 1).clamp_min(0).to(torch.float64) - pos  # rank from the top
            lo_i, hi_i = rank.ceil().long(), rank.floor().long()  # lower value sits further from the top
            frac = (rank.ceil() - rank).to(values.dtype)
        else:
            top = select(mask, values, torch.full_like(values, fill)).topk(k, dim=-1, largest=False, sorted=True).values
            lo_i, hi_i = pos.floor().long(), pos.ceil().long()
            frac = (pos - pos.floor()).to(values.dtype)
        lo_i, hi_i = lo_i.clamp(0, k - 1), hi_i.clamp(0, k - 1)
        vlo, vhi = top.gather(-1, lo_i), top.gather(-1, hi_i)
        cols.append(vlo + (vhi - vlo) * frac)
    out = torch.cat(cols, dim=-1)
    out = torch.where(n > 0, out, torch.zeros_like(out))
    return out[..., 0] if scalar else out


def weighted_mean_cov(x: torch.Tensor, weights: torch.Tensor, binary: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted mean ``(B, C)``, covariance ``(B, C, C)`` and weight sum ``(B,)``, returned in float64.

    Rows with zero total weight get mean 0 and identity covariance (flagged by the weight sum).
    ``binary=True`` promises weights in ``{0, 1}`` (a mask), which saves the square root.
    """
    w = weights.to(x.dtype)
    n = w.sum(-1).double()  # (B,)
    safe = n.clamp_min(1.0)
    mean = (x * w[:, None]).sum(-1).double() / safe[:, None]
    # centred (two-pass) products accumulated by a blocked matmul in the input precision, then float64
    xc = (x - mean[..., None].to(x.dtype)).mul_((w if binary else w.sqrt())[:, None])
    cov = (xc @ xc.transpose(-1, -2)).double() / safe[:, None, None]
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
