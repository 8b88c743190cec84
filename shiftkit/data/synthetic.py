"""Synthetic H&E tiles with known stain matrices and concentrations (Beer–Lambert), seeded.

Used by tests and examples as ground truth: ``I = I0 · exp(-(C^T S))`` with sparse, spatially
structured concentrations — nuclei (mostly hematoxylin, some eosin), cytoplasm/stroma (mostly eosin, a
little hematoxylin) and empty background — plus optional sensor noise.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..stain.model import normalize_rows, reference_stain_matrix


def _smooth_field(bsz: int, size: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    """A smooth random field in [0, 1] per tile ``(B, 1, size, size)``."""
    noise = torch.rand(bsz, 1, size, size, generator=gen)
    k = max(3, int(scale) | 1)
    sigma = scale / 3.0
    ax = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    f = F.conv2d(F.pad(noise, (k // 2, k // 2, 0, 0), mode="reflect"), g.view(1, 1, 1, k))
    f = F.conv2d(F.pad(f, (0, 0, k // 2, k // 2), mode="reflect"), g.view(1, 1, k, 1))
    lo = f.amin(dim=(2, 3), keepdim=True)
    hi = f.amax(dim=(2, 3), keepdim=True)
    return (f - lo) / (hi - lo).clamp_min(1e-8)


def random_stain_matrix(bsz: int, max_angle: float = 10.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``(B, 2, 3)`` stain matrices: the Macenko reference H and E each rotated by up to ``max_angle`` degrees
    in a random direction (kept non-negative)."""
    gen = generator or torch.Generator().manual_seed(0)
    ref = reference_stain_matrix("macenko").expand(bsz, 2, 3)
    out = []
    for k in range(2):
        v = ref[:, k]
        d = torch.randn(bsz, 3, generator=gen)
        d = d - (d * v).sum(-1, keepdim=True) * v
        d = normalize_rows(d)
        ang = torch.deg2rad(torch.rand(bsz, 1, generator=gen) * max_angle)
        w = torch.cos(ang) * v + torch.sin(ang) * d
        out.append(normalize_rows(w.clamp_min(0.0)))
    return torch.stack(out, dim=1)


def synthetic_he(
    batch: int = 4,
    size: int = 224,
    *,
    stain_matrix: Optional[torch.Tensor] = None,
    tissue_fraction: float = 0.8,
    h_max: float = 1.6,
    e_max: float = 0.9,
    noise: float = 0.0,
    i0: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic H&E tiles.

    Args:
        batch: number of tiles.
        size: side of the tiles in pixels.
        stain_matrix: ``(2, 3)`` or ``(B, 2, 3)``; default the Macenko reference.
        tissue_fraction: approximate fraction of pixels covered by tissue (the rest is background, C = 0).
        h_max: peak hematoxylin concentration (natural-log OD).
        e_max: peak eosin concentration (natural-log OD).
        noise: standard deviation of additive Gaussian noise on the intensities.
        i0: background intensity.
        seed: seed of the generator (CPU).

    Returns:
        ``(images, concentrations, matrix)``: ``(B, 3, H, W)`` float32 in [0, 1], ``(B, 2, H, W)`` and
        ``(B, 2, 3)``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    if stain_matrix is None:
        stain_matrix = reference_stain_matrix("macenko")
    m = stain_matrix.float()
    m = normalize_rows(m if m.ndim == 3 else m.expand(batch, 2, 3)).contiguous()
    tissue_field = _smooth_field(batch, size, size / 6, gen)
    thr = torch.quantile(tissue_field.flatten(1), 1.0 - tissue_fraction, dim=1).view(batch, 1, 1, 1) if tissue_fraction < 1 else torch.full((batch, 1, 1, 1), -1.0)
    tissue = (tissue_field > thr).float()
    nuclei_field = _smooth_field(batch, size, max(3.0, size / 40), gen)
    nuclei = ((nuclei_field > 0.62).float() * tissue)
    texture = 0.6 + 0.4 * _smooth_field(batch, size, max(3.0, size / 20), gen)
    pale_h = (_smooth_field(batch, size, max(3.0, size / 30), gen) > 0.75).float() * tissue
    # sparse stains: nuclei are dominated by hematoxylin (5 % eosin), stroma by eosin with sparse pale
    # hematoxylin patches, so that nearly pure pixels of each stain exist, as in real H&E
    h = nuclei * h_max * texture + pale_h * 0.15 * texture * (1.0 - nuclei)
    e = tissue * (0.25 + (e_max - 0.25) * texture) * (1.0 - 0.95 * nuclei)
    conc = torch.cat([h, e], dim=1)
    od = torch.einsum("bshw,bsc->bchw", conc, m)
    img = i0 * torch.exp(-od)
    if noise > 0:
        img = img + noise * torch.randn(img.shape, generator=gen)
    return img.clamp(0.0, 1.0), conc, m


__all__ = ["synthetic_he", "random_stain_matrix"]
