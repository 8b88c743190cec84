"""CIEDE2000 colour difference in torch, and a colour-profile kernel fitted to a target ΔE2000."""

from __future__ import annotations

import math

import kornia
import torch

from .scanner import linear_to_srgb, srgb_to_linear


def delta_e2000(lab1: torch.Tensor, lab2: torch.Tensor) -> torch.Tensor:
    """CIEDE2000 (Sharma, Wu & Dalal 2005) between CIELAB tensors ``(..., 3, ...)`` along dim -3 or a last dim of 3.

    Args:
        lab1: ``(B, 3, *)`` CIELAB (L in [0, 100]).
        lab2: ``(B, 3, *)`` CIELAB, the same shape.

    Returns:
        ``(B, *)`` ΔE00 (kL = kC = kH = 1).
    """
    L1, a1, b1 = lab1[:, 0], lab1[:, 1], lab1[:, 2]
    L2, a2, b2 = lab2[:, 0], lab2[:, 1], lab2[:, 2]
    C1 = torch.sqrt(a1**2 + b1**2)
    C2 = torch.sqrt(a2**2 + b2**2)
    Cb = (C1 + C2) / 2
    G = 0.5 * (1 - torch.sqrt(Cb**7 / (Cb**7 + 25.0**7)))
    a1p, a2p = (1 + G) * a1, (1 + G) * a2
    C1p = torch.sqrt(a1p**2 + b1**2)
    C2p = torch.sqrt(a2p**2 + b2**2)
    h1p = torch.remainder(torch.atan2(b1, a1p), 2 * math.pi)
    h2p = torch.remainder(torch.atan2(b2, a2p), 2 * math.pi)
    dLp = L2 - L1
    dCp = C2p - C1p
    dh = h2p - h1p
    dh = torch.where(dh > math.pi, dh - 2 * math.pi, torch.where(dh < -math.pi, dh + 2 * math.pi, dh))
    dh = torch.where(C1p * C2p == 0, torch.zeros_like(dh), dh)
    dHp = 2 * torch.sqrt(C1p * C2p) * torch.sin(dh / 2)
    Lbp = (L1 + L2) / 2
    Cbp = (C1p + C2p) / 2
    hsum = h1p + h2p
    hbp = torch.where((h1p - h2p).abs() > math.pi, torch.where(hsum < 2 * math.pi, (hsum + 2 * math.pi) / 2, (hsum - 2 * math.pi) / 2), hsum / 2)
    hbp = torch.where(C1p * C2p == 0, hsum, hbp)
    T = (1 - 0.17 * torch.cos(hbp - math.radians(30)) + 0.24 * torch.cos(2 * hbp)
         + 0.32 * torch.cos(3 * hbp + math.radians(6)) - 0.20 * torch.cos(4 * hbp - math.radians(63)))
    dtheta = math.radians(30) * torch.exp(-(((torch.rad2deg(hbp) - 275) / 25) ** 2))
    Rc = 2 * torch.sqrt(Cbp**7 / (Cbp**7 + 25.0**7))
    Sl = 1 + 0.015 * (Lbp - 50) ** 2 / torch.sqrt(20 + (Lbp - 50) ** 2)
    Sc = 1 + 0.045 * Cbp
    Sh = 1 + 0.015 * Cbp * T
    Rt = -torch.sin(2 * dtheta) * Rc
    return torch.sqrt((dLp / Sl) ** 2 + (dCp / Sc) ** 2 + (dHp / Sh) ** 2 + Rt * (dCp / Sc) * (dHp / Sh)).clamp_min(0)


def apply_color_matrix(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply a ``(B, 3, 3)`` colour matrix in linear light (sRGB companding around it), clipped to [0, 1]."""
    lin = srgb_to_linear(images)
    out = torch.einsum("bij,bjhw->bihw", matrix.to(images), lin)
    return linear_to_srgb(out)


def color_profile(images: torch.Tensor, direction: torch.Tensor, target_de: torch.Tensor, pixels: int = 1024,
                  iters: int = 14) -> torch.Tensor:
    """A scanner colour profile: ``M = I + ε·D`` in linear light with ``D`` ``(B, 3, 3)`` a white-preserving
    direction (rows summing to 0), ``ε`` found per tile by bisection so that the mean ΔE2000 over the tile's
    non-background pixels (a fixed strided sample of ``pixels``) equals ``target_de``."""
    b, _, h, w = images.shape
    if b == 0:
        return images.clone()
    flat = images.flatten(2)
    step = max(1, flat.shape[-1] // pixels)
    sample = flat[..., ::step][..., None]  # (B, 3, P, 1)
    keep = (sample.amin(1) < 0.9).float()  # not glass
    keep = torch.where(keep.sum(dim=(1, 2), keepdim=True) > 0, keep, torch.ones_like(keep))
    lab0 = kornia.color.rgb_to_lab(sample)
    eye = torch.eye(3, device=images.device, dtype=images.dtype)
    d = direction.to(images)
    lo = torch.zeros(b, device=images.device, dtype=images.dtype)
    hi = torch.full((b,), 2.0, device=images.device, dtype=images.dtype)
    target = target_de.to(images)
    for _ in range(iters):
        mid = (lo + hi) / 2
        lab = kornia.color.rgb_to_lab(apply_color_matrix(sample, eye + mid[:, None, None] * d))
        de = (delta_e2000(lab0, lab) * keep).sum(dim=(1, 2)) / keep.sum(dim=(1, 2))
        too_far = de > target
        hi = torch.where(too_far, mid, hi)
        lo = torch.where(too_far, lo, mid)
    eps = (lo + hi) / 2
    out = apply_color_matrix(images, eye + eps[:, None, None] * d)
    return torch.where((target_de <= 0).to(images.device).view(-1, 1, 1, 1), images, out)
