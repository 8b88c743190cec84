"""Procedural, seeded tissue and slide artifacts (no external sprites).

The geometry of each tile's artifact (blobs, curves, spots) is drawn from that tile's integer seed with numpy's
PCG64 and rasterized with OpenCV on CPU; the overlay is then applied to the batch in torch. Sizes are in pixels
of the tile. Absorbing overlays (ink, dust, folds, threads) act in optical density (Beer–Lambert), so they
darken tissue and glass the way extra dye or material would.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from ..stain.model import od_to_rgb, rgb_to_od


def _curve(rng: np.random.Generator, h: int, w: int, n: int = 64) -> np.ndarray:
    """A smooth random cubic Bézier curve crossing the tile, as ``(n, 2)`` int32 (x, y) points."""
    side = rng.integers(0, 2)
    if side == 0:  # left → right
        p0 = (0, rng.uniform(0, h)); p3 = (w - 1, rng.uniform(0, h))
    else:  # top → bottom
        p0 = (rng.uniform(0, w), 0); p3 = (rng.uniform(0, w), h - 1)
    p1 = (rng.uniform(0, w), rng.uniform(0, h)); p2 = (rng.uniform(0, w), rng.uniform(0, h))
    t = np.linspace(0, 1, n)[:, None]
    pts = ((1 - t) ** 3) * p0 + 3 * ((1 - t) ** 2) * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
    return np.round(pts).astype(np.int32)


def _stroke_masks(seed: torch.Tensor, h: int, w: int, counts, thickness, blur: tuple | None = None) -> np.ndarray:
    """``(B, 1, H, W)`` masks of ``counts[i]`` random curves of ``thickness[i]`` px per sample (anti-aliased),
    optionally Gaussian-blurred with ``blur = (kernel, sigma)``."""
    masks = np.zeros((len(seed), 1, h, w), np.float32)
    for i, (s, n, t) in enumerate(zip(seed.tolist(), counts, thickness)):
        if n <= 0 or t <= 0:
            continue
        rng = np.random.default_rng(int(s))
        for _ in range(int(n)):
            cv2.polylines(masks[i, 0], [_curve(rng, h, w)], False, 1.0, thickness=max(1, int(round(t))), lineType=cv2.LINE_AA)
        if blur is not None:
            masks[i, 0] = cv2.GaussianBlur(masks[i, 0], (blur[0], blur[0]), blur[1])
    return masks


def _smooth_blobs(rng: np.random.Generator, h: int, w: int, fraction: float, scale: float) -> np.ndarray:
    """Boolean mask of smooth random blobs covering about ``fraction`` of the tile."""
    noise = rng.random((h, w)).astype(np.float32)
    k = int(scale) | 1
    field = cv2.GaussianBlur(noise, (k, k), scale / 3)
    thr = np.quantile(field, 1 - fraction)
    return field > thr


def air_bubbles(images: torch.Tensor, area: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Mounting-medium bubbles covering ``area`` of the tile: grey fill (≈ 225/255, α 0.75) and a dark 2-px rim."""
    b, _, h, w = images.shape
    fill = np.zeros((b, 1, h, w), np.float32)
    rim = np.zeros((b, 1, h, w), np.float32)
    for i, (s, a) in enumerate(zip(seed.tolist(), area.tolist())):
        if a <= 0:
            continue
        m = _smooth_blobs(np.random.default_rng(int(s)), h, w, float(a), max(9.0, min(h, w) / 4)).astype(np.uint8)
        dil = cv2.dilate(m, np.ones((5, 5), np.uint8))
        fill[i, 0] = m
        rim[i, 0] = dil - m
    fill_t, rim_t = torch.from_numpy(fill).to(images), torch.from_numpy(rim).to(images)
    out = images * (1 - 0.75 * fill_t) + 0.75 * fill_t * (225 / 255)
    return out * (1 - 0.6 * rim_t)


def _od_overlay(images: torch.Tensor, mask: torch.Tensor, od: torch.Tensor) -> torch.Tensor:
    """Add absorbance ``mask · od`` (``od`` an RGB OD vector ``(B, 3)``) to the image (Beer–Lambert)."""
    base = rgb_to_od(images)
    out = od_to_rgb(base + mask.to(images) * od.to(images)[..., None, None]).to(images.dtype)
    return _unchanged_where_empty(mask, images, out)


def _unchanged_where_empty(mask: torch.Tensor, images: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Samples with nothing drawn get their input back exactly (an OD round trip is not bit-exact)."""
    empty = mask.to(images.device).flatten(1).amax(1) == 0
    return torch.where(empty.view(-1, 1, 1, 1), images, out)


def pen_ink(images: torch.Tensor, width: torch.Tensor, alpha: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """A marker stroke along a random smooth curve, ``width`` px, opacity ``alpha`` (dark-blue ink by default)."""
    b, _, h, w = images.shape
    m = torch.from_numpy(_stroke_masks(seed, h, w, [1] * b, width.tolist())).to(images)
    ink = torch.tensor([1.2, 0.9, 0.35])  # OD of a dark-blue marker at full opacity
    return _od_overlay(images, m * alpha.to(images).view(-1, 1, 1, 1) * 3.0, ink.expand(b, 3))


def dust(images: torch.Tensor, radius: torch.Tensor, opacity: torch.Tensor, seed: torch.Tensor, count: int = 3) -> torch.Tensor:
    """Dark spots from debris: ``count`` blurred disks of ``radius`` px at random places, ``opacity`` 0..1."""
    b, _, h, w = images.shape
    masks = np.zeros((b, 1, h, w), np.float32)
    for i, (s, r) in enumerate(zip(seed.tolist(), radius.tolist())):
        if r <= 0:
            continue
        rng = np.random.default_rng(int(s))
        for _ in range(count):
            cv2.circle(masks[i, 0], (int(rng.uniform(0, w)), int(rng.uniform(0, h))), max(1, int(round(r))), 1.0, -1, cv2.LINE_AA)
        k = int(2 * math.ceil(r / 2) + 1)
        masks[i, 0] = cv2.GaussianBlur(masks[i, 0], (k, k), r / 4 + 0.5)
    m = torch.from_numpy(masks).to(images) * opacity.to(images).view(-1, 1, 1, 1)
    return _od_overlay(images, m * 2.5, torch.ones(b, 3) * 0.9)  # near-neutral dark absorber


def tissue_fold(images: torch.Tensor, width: torch.Tensor, layers: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """A fold: along a random curve band of ``width`` px the section lies ``layers`` times over itself, so its OD
    is multiplied by ``1 + layers`` (with soft edges)."""
    b, _, h, w = images.shape
    m = torch.from_numpy(_stroke_masks(seed, h, w, [1] * b, width.tolist(), blur=(7, 2))).to(images)
    od = rgb_to_od(images)
    out = od_to_rgb(od * (1 + m * layers.to(images).view(-1, 1, 1, 1))).to(images.dtype)
    return _unchanged_where_empty(m, images, out)


def threads(images: torch.Tensor, count: torch.Tensor, thickness: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Out-of-focus fibres above the focal plane: ``count`` dark curves of ``thickness`` px, blurred."""
    b, _, h, w = images.shape
    m = torch.from_numpy(_stroke_masks(seed, h, w, count.tolist(), thickness.tolist(), blur=(9, 2.5))).to(images)
    return _od_overlay(images, m * 1.5, torch.tensor([0.6, 0.6, 0.5]).expand(b, 3))


def tears(images: torch.Tensor, length: torch.Tensor, seed: torch.Tensor, gap: float = 3.0) -> torch.Tensor:
    """Sectioning cracks: a white gap of ``gap`` px along a random curve, covering ``length`` × tile width,
    with a slightly darker 1-px rim (torn edges)."""
    b, _, h, w = images.shape
    gaps = np.zeros((b, 1, h, w), np.float32)
    rims = np.zeros((b, 1, h, w), np.float32)
    for i, (s, ln) in enumerate(zip(seed.tolist(), length.tolist())):
        if ln <= 0:
            continue
        rng = np.random.default_rng(int(s))
        total = 0.0
        while total < ln:  # several cracks until the requested total length (in tile widths) is reached
            pts = _curve(rng, h, w)
            frac = min(1.0, ln - total)
            pts = pts[: max(2, int(len(pts) * frac))]
            cv2.polylines(gaps[i, 0], [pts], False, 1.0, thickness=int(gap), lineType=cv2.LINE_8)
            total += frac
        dil = cv2.dilate(gaps[i, 0], np.ones((3, 3), np.uint8))
        rims[i, 0] = np.clip(dil - gaps[i, 0], 0, 1)
    g = torch.from_numpy(gaps).to(images)
    r = torch.from_numpy(rims).to(images)
    white = torch.full_like(images, 0.94)
    out = images * (1 - g) + white * g
    return out * (1 - 0.3 * r)


__all__ = ["air_bubbles", "pen_ink", "dust", "tissue_fold", "threads", "tears"]
