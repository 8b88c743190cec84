"""Scanner transfer: the pure pieces of a transfer learned from registered pairs (see :class:`~shiftkit.ScannerTransfer`).

Parts, in the order they are fitted and applied:

- **colour**: a separable polynomial map ``y = W^T φ(x)`` with ``φ(x) = [1, x_1, x_2, x_3, x_1², …, x_3^d]``
  (degree 1 is the full 3×4 affine map; degree 2–3 add a per-channel tone curve). The input ``x`` and the output
  ``y`` are each in sRGB, optical density or CIELAB (``space`` and ``out_space``); the map is fitted by
  tissue-weighted ridge regression in the output space on 8×8 block means, least squares or least Euclidean
  residual lengths (``loss``);
- **mtf**: a relative modulation transfer function ``g(f) = sqrt(P_dst(f) / P_src(f))`` from the radially averaged
  power spectra of the pairs (Hann-windowed grayscale), applied as a radial FFT filter;
- **noise**: additive Gaussian noise whose σ is the extra noise of the destination (Immerkær's estimate);
- **jpeg**: JPEG re-encoding at a given quality (applied by :func:`shiftkit.functional.scanner.jpeg`).

A per-sample ``strength`` s ∈ [0, 1] interpolates every part from identity (0) to the fitted transfer (1): colour
``x + s·(map(x) − x)``, MTF ``g(f)^s``, noise ``s·σ``.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import cv2
import numpy as np
import torch
from sklearn.isotonic import IsotonicRegression, isotonic_regression

from ..core.errors import InvalidArgumentError
from .stain import lab_inverse_affine, rgb_to_lab_fast, srgb_from_companded

#: Colour spaces of a colour map's input and output: sRGB in [0, 1], optical density ``-ln(x)`` (x floored at
#: 1/255) and CIELAB / 100 (D65, Kornia's conversion to within 2e-4 LAB units).
SPACES = ("srgb", "od", "lab")
#: Radial frequency bins of the MTF, over [0, 0.5] cycles per pixel.
MTF_BINS = 32
LOW_BAND = (1.0 / 16.0, 1.0 / 8.0)  # cycles/px: where relative_mtf goes from 1 to the fitted gain
#: Losses of the colour fit: least squares, or the sum of Euclidean residual lengths (see :func:`fit_colour_map`).
LOSSES = ("l2", "l1")
#: Reweighted least-squares steps of the ``"l1"`` colour fit (on the MITOS dev pairs 5 and 10 differ by < 0.05 ΔE).
L1_ITERATIONS = 5


# ----------------------------------------------------------------------------------------------- colour
def _check_space(space: str, arg: str = "space") -> None:
    if space not in SPACES:
        raise InvalidArgumentError(f"`{arg}` is invalid: expected one of {SPACES}, got {space!r}")


def _to_space(x: torch.Tensor, space: str) -> torch.Tensor:
    """``(N, 3)`` or ``(B, 3, H, W)`` sRGB in ``[0, 1]`` to ``space`` (float64 stays float64)."""
    v = x if x.dtype == torch.float64 else x.float()
    if space == "od":  # one new tensor, the rest in place (each fresh multi-MB tensor costs page faults on CPU)
        return v.clamp_min(1.0 / 255.0).log_().neg_()
    if space == "lab":
        if v.ndim == 2:  # (N, 3) values as one (1, 3, N, 1) image
            return rgb_to_lab_fast(v.t()[None, :, :, None])[0, :, :, 0].t() / 100.0
        return rgb_to_lab_fast(v).div_(100.0)
    return v


def colour_features(x: torch.Tensor, space: str, degree: int) -> torch.Tensor:
    """``φ(x)``: ``(N, 1 + 3·degree)`` features of ``(N, 3)`` values in ``[0, 1]`` (sRGB) for a colour map whose
    input is in ``space``."""
    _check_space(space)
    v = _to_space(x.double(), space)
    cols = [torch.ones_like(v[:, :1])] + [v ** d for d in range(1, degree + 1)]
    return torch.cat(cols, dim=1)


def fit_colour_map(src: np.ndarray, dst: np.ndarray, weight: np.ndarray, space: str, degree: int,
                   ridge: float = 1e-3, out_space: str | None = None, loss: str = "l2") -> np.ndarray:
    """Tissue-weighted ridge regression for the colour map.

    Args:
        src: ``(N, 3)`` source colours in ``[0, 1]``.
        dst: ``(N, 3)`` destination colours in ``[0, 1]``.
        weight: ``(N,)`` non-negative weights (tissue).
        space: the input's space, one of :data:`SPACES`.
        degree: polynomial degree per channel (1 = affine).
        ridge: ridge penalty on the non-constant coefficients, relative to the weighted count.
        out_space: the output's space, where the error is measured (default: ``space``).
        loss: ``"l2"``, least squares; or ``"l1"``, the weighted sum of the residuals' Euclidean lengths in the output
            space (in CIELAB: the mean ΔE76, closer to a mean-CIEDE2000 judge than squares, which chase the few
            worst blocks), by :data:`L1_ITERATIONS` reweighted least-squares steps from the least-squares fit, each
            weighting a row by ``1 / max(|r|, 0.01)`` (0.01 output units: 1 ΔE in CIELAB / 100, 2.55 levels in sRGB).

    Returns:
        ``W`` ``(1 + 3·degree, 3)``.
    """
    if loss not in LOSSES:
        raise InvalidArgumentError(f"`loss` is invalid: expected one of {LOSSES}, got {loss!r}")
    x = colour_features(torch.from_numpy(np.asarray(src, np.float64)), space, degree).numpy()
    out_space = space if out_space is None else out_space
    _check_space(out_space, "out_space")
    y = _to_space(torch.from_numpy(np.asarray(dst, np.float64)), out_space).numpy()
    w = np.asarray(weight, np.float64)
    if w.sum() <= 0:
        raise InvalidArgumentError("`weight` is all zero: expected tissue in at least one pair, got none")
    return weighted_ridge(x, y, w, ridge, loss)


def weighted_ridge(x: np.ndarray, y: np.ndarray, weight: np.ndarray, ridge: float, loss: str = "l2") -> np.ndarray:
    """The regression behind :func:`fit_colour_map` on any feature matrix ``x`` ``(N, K)`` whose first column is the
    constant (not penalised): ``(K, M)`` coefficients for targets ``y`` ``(N, M)``. ``"l2"``: weighted ridge least
    squares; ``"l1"``: then :data:`L1_ITERATIONS` reweighted steps, each weighting a row by ``weight / max(|r|, 0.01)``
    with ``|r|`` the Euclidean length of its residual."""
    def solve(w):
        xw = x * w[:, None]
        reg = ridge * w.sum() * np.eye(x.shape[1])
        reg[0, 0] = 0.0
        return np.linalg.solve(x.T @ xw + reg, xw.T @ y)

    coef = solve(weight)
    for _ in range(L1_ITERATIONS if loss == "l1" else 0):
        coef = solve(weight / np.maximum(np.linalg.norm(x @ coef - y, axis=1), 0.01))
    return coef


#: Quantiles of the training tissue pixels that bound a colour map's input (see :func:`colour_domain`).
DOMAIN_QUANTILES = (0.001, 0.999)


def colour_domain(pixels: np.ndarray, space: str, quantiles: Tuple[float, float] = DOMAIN_QUANTILES) -> np.ndarray:
    """``(2, 3)``: per channel, the ``quantiles`` (default 0.1 % and 99.9 %) of ``(N, 3)`` sRGB ``pixels`` in
    ``[0, 1]`` taken to ``space`` — the input range a colour map was fitted on, beyond which
    :func:`apply_colour_map` continues the polynomial linearly (a polynomial of degree 3 fitted on tissue can turn
    round outside it: darker tissue came out lighter)."""
    _check_space(space)
    v = _to_space(torch.from_numpy(np.asarray(pixels, np.float64).reshape(-1, 3)), space).numpy()
    if len(v) == 0:
        raise InvalidArgumentError("`pixels` is empty: expected the tissue pixels the colour map was fitted on")
    return np.quantile(v, quantiles, axis=0)


def apply_colour_map(images: torch.Tensor, weights: torch.Tensor, space: str, degree: int,
                     strength: torch.Tensor, out_space: str | None = None,
                     domain: torch.Tensor | np.ndarray | None = None,
                     slope: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """Apply a fitted colour map to ``(B, 3, H, W)`` in ``[0, 1]`` with per-sample ``strength`` ``(B,)``.

    The map is separable per input channel, so it runs as one ``(3·degree) → 3`` channel mix of the power planes
    in float32 (float64 inputs stay float64); the result equals :func:`colour_features` ``@ weights`` up to
    float32 rounding, taken from ``out_space`` (default ``space``) back to sRGB. Strength interpolates in sRGB.

    ``domain`` ``(2, 3)`` (rows: low and high, in ``space``; from :func:`colour_domain`): the polynomial is
    evaluated on the input held inside it, per channel. Beyond it the map goes on linearly with ``slope`` ``(3, 3)``
    (row i: the output's change per unit of input channel i, in the map's spaces; the affine fit's, see
    :func:`fit_colour_map`): ``map(x) = poly(c) + slope^T (x − c)`` with ``c`` the held input — continuous, and
    linear with the affine map's slope where the polynomial has no data. Without ``slope`` the map is constant
    beyond the domain (a ``slope`` without a ``domain`` is not used).
    """
    out_space = space if out_space is None else out_space
    _check_space(space)
    _check_space(out_space, "out_space")
    dt = torch.float64 if images.dtype == torch.float64 else torch.float32
    b, _, h, wd = images.shape
    beyond = domain is not None and slope is not None
    planes = torch.empty(b, 3 * degree + (3 if beyond else 0), h * wd, dtype=dt, device=images.device)
    head = planes[:, :3]
    x = images.to(dt).reshape(b, 3, -1)
    if domain is None:
        if space == "od":  # straight into the first planes: no separate tensor to copy there
            torch.clamp_min(x, 1.0 / 255.0, out=head).log_().neg_()
        else:
            head.copy_(x if space == "srgb" else _to_space(images.to(dt), space).reshape(b, 3, -1))
    else:
        dom = np.asarray(domain.detach().cpu() if torch.is_tensor(domain) else domain, np.float64).reshape(2, 3)
        lo, hi = dom[0].tolist(), dom[1].tolist()
        if not beyond and space == "od":  # held in sRGB, where the logarithm needs a clamp anyway: OD in [lo, hi]
            for i in range(3):            # is sRGB in [e^-hi, e^-lo]
                torch.clamp(x[:, i], max(math.exp(-hi[i]), 1.0 / 255.0), math.exp(-lo[i]), out=head[:, i])
            head.log_().neg_()
        else:
            if space == "od":
                v = torch.clamp_min(x, 1.0 / 255.0, out=planes[:, -3:] if beyond else head).log_().neg_()
            else:
                v = x if space == "srgb" else _to_space(images.to(dt), space).reshape(b, 3, -1)
                if beyond:  # the unheld input is a plane too: poly(c) + S^T(v - c) = S^T v + poly(c) - S^T c
                    planes[:, -3:].copy_(v)
            for i in range(3):  # per channel with scalar bounds: several times faster than tensor bounds on CPU
                torch.clamp(v[:, i], lo[i], hi[i], out=head[:, i])
    w = weights.detach().to("cpu", torch.float64)
    if beyond:  # poly(c) + S^T (v - c): the linear rows take -S, the unheld input's planes take S
        sl = torch.as_tensor(np.asarray(slope.detach().cpu() if torch.is_tensor(slope) else slope, np.float64)).reshape(3, 3)
        w = torch.cat([w[:1], w[1:4] - sl, w[4:], sl])
    if out_space == "lab":  # fold L*a*b* = 100·y into the companded values f = A⁻¹(L*a*b* − c): one product fewer
        a_inv, c = lab_inverse_affine(w)
        w = torch.cat([((100.0 * w[0] - c) @ a_inv.t())[None], 100.0 * w[1:] @ a_inv.t()])
    elif out_space == "od":  # e^-y as 2^(-y / ln 2), the factor folded into the weights: exp2 is ~3x faster than exp
        w = w * (-1.0 / math.log(2.0))
    w = w.to(device=images.device, dtype=dt)
    for d in range(1, degree):
        torch.mul(planes[:, 3 * (d - 1):3 * d], planes[:, :3], out=planes[:, 3 * d:3 * (d + 1)])
    y = torch.matmul(w[1:].t(), planes).add_(w[0].view(1, 3, 1))  # (3, 3·d [+ 3]) @ (B, 3·d [+ 3], HW)
    if out_space == "lab":
        y = srgb_from_companded(y, (b, 3, h, wd))
    else:
        y = y.view(b, 3, h, wd)
        if out_space == "od":
            y.exp2_()
    x0 = images.to(dt)
    s = strength.to(device=images.device, dtype=dt)
    if not bool((s == 1).all()):  # samples at strength 1 keep the map's value exactly, whatever their batch mates
        y = torch.where((s == 1).view(-1, 1, 1, 1), y, x0 + s.view(-1, 1, 1, 1) * (y - x0))
    return y.clamp_(0.0, 1.0).to(images.dtype)


# ----------------------------------------------------------------------------------------------- geometry
def pair_offset(src: np.ndarray, dst: np.ndarray) -> Tuple[float, float, float]:
    """``(dx, dy, peak)``: the translation of ``dst`` relative to ``src`` by phase correlation (OpenCV, Hann
    window) and the correlation peak (1 = identical up to a shift; low = different content)."""
    gs = cv2.cvtColor(np.ascontiguousarray(src), cv2.COLOR_RGB2GRAY).astype(np.float64)
    gd = cv2.cvtColor(np.ascontiguousarray(dst), cv2.COLOR_RGB2GRAY).astype(np.float64)
    win = cv2.createHanningWindow((gs.shape[1], gs.shape[0]), cv2.CV_64F)
    (dx, dy), peak = cv2.phaseCorrelate(gs, gd, win)
    return float(dx), float(dy), float(peak)


def block_means(image: np.ndarray, block: int = 8) -> np.ndarray:
    """Area-averaged ``block × block`` means of ``(H, W, 3)`` uint8, as floats in ``[0, 1]``."""
    h, w = (image.shape[0] // block) * block, (image.shape[1] // block) * block
    x = np.ascontiguousarray(image[:h, :w], dtype=np.float64) / 255.0
    return cv2.resize(x, (w // block, h // block), interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------------------------- sharpness
def radial_power(image: np.ndarray, bins: int = MTF_BINS, weight: np.ndarray | None = None) -> np.ndarray:
    """Radially averaged power spectrum of a Hann-windowed grayscale ``(H, W, 3)`` uint8 image, ``(bins,)`` over
    [0, 0.5] cycles per pixel. ``weight`` ``(H, W)`` in ``[0, 1]`` (e.g. a smoothed tissue mask) multiplies the
    window, so that only those regions count; the weighted mean is removed first."""
    g = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float64) / 255.0
    win = np.outer(np.hanning(g.shape[0]), np.hanning(g.shape[1]))
    if weight is not None:
        win = win * np.asarray(weight, dtype=np.float64)
    g = g - (g * win).sum() / max(float(win.sum()), 1e-12)
    p = np.abs(np.fft.rfft2(g * win)) ** 2
    fy = np.fft.fftfreq(g.shape[0])[:, None]
    fx = np.fft.rfftfreq(g.shape[1])[None, :]
    r = np.sqrt(fx ** 2 + fy ** 2)
    idx = np.clip((r / 0.5 * bins).astype(int), 0, bins)
    total = np.bincount(idx.ravel(), weights=p.ravel(), minlength=bins + 1)[:bins]
    count = np.bincount(idx.ravel(), minlength=bins + 1)[:bins]
    return total / np.maximum(count, 1)


def relative_mtf(src_power: Sequence[np.ndarray], dst_power: Sequence[np.ndarray], max_gain: float = 4.0,
                 low_band: Tuple[float, float] = LOW_BAND) -> np.ndarray:
    """``g(f)``: the geometric mean over pairs of ``sqrt(P_dst / P_src)`` per radial bin, smoothed by a 3-bin running
    median, then made **monotone** in ``f`` from ``g(0) = 1``: an isotonic regression (scikit-learn) of ``log g``,
    non-increasing and at most 1 when the destination is the blurrier scan (the median gain over the upper half of
    the bins is below 1), else non-decreasing and at least 1. A rising gain (towards the sharper scan) is 1 below
    ``low_band[0]`` cycles/px and reaches the fitted ``g`` at ``low_band[1]`` (a smoothstep in ``log g``, which keeps
    it monotone). Clipped to ``[0, max_gain]``.

    Two lenses' relative MTF is 1 at low frequencies and moves away from 1 steadily. On real pairs the ratio measured
    after the colour map is 1.5-1.9 already at the lowest frequencies, in both directions: the least-squares colour
    map, fitted on pairs misregistered by a few pixels, shrinks contrast (regression to the mean), and the ratio
    makes up for it. Amplifying coarse scales adds structure that is misregistered against the twin and moves
    tissue colour away from it, so a rising gain leaves the coarse scales to the colour part: ``low_band`` defaults
    to (1/16, 1/8) cycles/px, the frequencies that 8×8 block means carry. On the MITOS dev pairs (leave one slide
    out, experiments/scanner_transfer) a rising gain without the band cost 0.49 CIEDE2000 (8.37 against 7.87 colour
    only; 7.95 with it). A falling gain is the measured blur and is kept as it is (towards the blurrier MITOS
    scanner the isotonic fit stays at 1 below 0.18 cycles/px anyway)."""
    lo, hi = (float(v) for v in low_band)
    if not 0.0 <= lo < hi <= 0.5:
        raise InvalidArgumentError(f"`low_band` is not a frequency band: expected 0 <= low < high <= 0.5 cycles/px, "
                                   f"got {low_band}")
    ratios = [np.sqrt(np.maximum(d, 1e-20) / np.maximum(s, 1e-20)) for s, d in zip(src_power, dst_power)]
    g = np.exp(np.mean(np.log(np.maximum(np.stack(ratios), 1e-6)), axis=0))

    def isotonic(y, weight, increasing):
        return IsotonicRegression(increasing=increasing).fit(np.arange(len(y)), y, sample_weight=weight).predict(np.arange(len(y)))

    return _shape_gain(g, max_gain, (lo, hi), isotonic)


def _shape_gain(g: np.ndarray, max_gain: float, low_band: Tuple[float, float], isotonic) -> np.ndarray:
    """:func:`relative_mtf`'s shaping of raw gains ``g`` ``(K,)`` or ``(B, K)`` (row by row): 3-bin running median,
    monotone from g(0) = 1 by ``isotonic(log g, weights, increasing)``, the rising gain's low band, the cap."""
    lo, hi = low_band
    g = np.array(g, np.float64)
    one = g.ndim == 1
    g = np.atleast_2d(g)
    g[:, 0] = 1.0
    g = np.clip(g, 1e-6, 1e6)
    padded = np.concatenate([g[:, :1], g, g[:, -1:]], axis=1)
    g = np.median(np.stack([padded[:, :-2], padded[:, 1:-1], padded[:, 2:]]), axis=0)
    g[:, 0] = 1.0
    k = g.shape[1]
    blurrier = np.median(g[:, k // 2:], axis=1) < 1.0  # (B,)
    weight = np.ones(k)
    weight[0] = 1e6  # pins g(0) = 1
    log_g = np.stack([isotonic(np.log(row), weight, not b) for row, b in zip(g, blurrier)]) if len(g) else np.log(g)
    log_g = np.where(blurrier[:, None], np.minimum(log_g, 0.0), np.maximum(log_g, 0.0))
    centres = (np.arange(k) + 0.5) / k * 0.5
    t = np.where(blurrier[:, None], 1.0, np.clip((centres - lo) / (hi - lo), 0.0, 1.0)[None])
    out = np.exp(log_g * t * t * (3.0 - 2.0 * t))
    out[:, 0] = 1.0
    out = np.clip(out, 0.0, max_gain)
    return out[0] if one else out


def _radial_grid(gain: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The radial gain ``(K,)`` (or one per sample, ``(B, K)``) on the one-sided FFT grid of ``h × w``
    (``(h, w // 2 + 1)``, or ``(B, h, w // 2 + 1)``), on ``gain``'s device."""
    g = gain.detach().float()
    fy = torch.fft.fftfreq(h, device=g.device)[:, None]
    fx = torch.fft.rfftfreq(w, device=g.device)[None, :]
    r = torch.sqrt(fx ** 2 + fy ** 2).clamp(max=0.5)
    k = g.shape[-1]
    pos = (r / 0.5 * k - 0.5).clamp(0, k - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=k - 1)
    t = pos - lo.float()
    return (g[..., lo] * (1 - t) + g[..., hi] * t).clamp_min(1e-6)


_GRIDS: dict = {}


def _gain_grid(gain: torch.Tensor, h: int, w: int, device: torch.device) -> torch.Tensor:
    """:func:`_radial_grid` on ``device``; for a gain held on the CPU, cached by its values (it was rebuilt for every
    CPU chunk: about 0.3 ms of small operations each). A gain on another device is not read back to the host."""
    if gain.device.type != "cpu":
        return _radial_grid(gain, h, w).to(device)
    key = (gain.detach().float().contiguous().numpy().tobytes(), h, w, str(device))
    grid = _GRIDS.get(key)
    if grid is None:
        if len(_GRIDS) >= 32:
            _GRIDS.clear()
        grid = _GRIDS[key] = _radial_grid(gain, h, w).to(device)
    return grid


def mtf_filter(images: torch.Tensor, gain: torch.Tensor, strength: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Filter ``(B, 3, H, W)`` by the radial gain ``gain`` ``(K,)`` (bins over [0, 0.5] cycles/px; or one gain per
    sample, ``(B, K)``) raised to the per-sample ``strength`` ``(B,)``; linear interpolation between bin centres; the
    mean (f = 0) is kept; a sample at strength 0 comes back exactly (clamped). The result is clamped to ``[0, 1]``
    and written into ``out`` when given (float32, the shape of ``images``)."""
    b, c, h, w = images.shape
    if images.numel() == 0:  # nothing to filter (torch.fft refuses an empty batch)
        return out if out is not None else images.clone()
    x = images.float()
    s = strength.float().to(x.device)
    if gain.ndim == 2:  # one gain per sample: (B, 1, h, w//2+1)
        gf = _radial_grid(gain.to(x.device), h, w)[:, None]
    else:
        gf = _gain_grid(gain, h, w, x.device)[None, None]  # (1, 1, h, w//2+1)
    # in place where the tensors are large (each fresh multi-MB tensor costs page faults on CPU)
    if bool((s == 1).all()):
        filt = gf
    else:  # per-sample powers; samples at strength 1 get the gain exactly, whatever their batch mates
        filt = torch.where((s == 1).view(-1, 1, 1, 1), gf, torch.exp(s.view(-1, 1, 1, 1) * torch.log(gf)))
    spec = torch.fft.rfft2(x).mul_(filt)
    y = torch.fft.irfft2(spec, s=(h, w), out=out) if out is not None else torch.fft.irfft2(spec, s=(h, w))
    y.clamp_(0.0, 1.0)
    zero = s == 0
    if bool(zero.any()):  # strength 0 is the identity exactly, not up to an FFT round trip
        y[zero] = x[zero].clamp(0.0, 1.0)
    return y if out is not None else y.to(images.dtype)


#: Grayscale level under which an 8×8 block counts as tissue in :func:`tissue_power` (about L* 85, the scorer's).
TISSUE_GRAY = 0.83


def tissue_power(images: torch.Tensor, bins: int = MTF_BINS) -> torch.Tensor:
    """Radially averaged power spectra ``(B, bins)`` over [0, 0.5] cycles/px of ``(B, 3, H, W)`` in ``[0, 1]``, over
    tissue, as a density: the grayscale image (OpenCV's weights) times a Hann window times a smooth tissue weight (8×8
    block means darker than :data:`TISSUE_GRAY`, closed and eroded by one block so that the tissue's edges with the
    background do not count, bilinearly upsampled; the mask before erosion where the eroded one keeps under 5 %, the
    whole tile where that too does), the
    weighted mean removed, ``|FFT|²`` averaged per radial bin and divided by the window's energy, so that tiles of
    different sizes and tissue fractions compare. Batched on the input's device (the matched MTF computes it for
    every tile it filters)."""
    b, _, h, w = images.shape
    dev = images.device
    x = images.float().reshape(b, 3, h * w)
    gray = torch.matmul(torch.tensor([[0.299, 0.587, 0.114]], device=dev), x).view(b, 1, h, w)  # one pass
    nn = torch.nn.functional
    blocks = nn.adaptive_avg_pool2d(gray, (max(1, -(-h // 8)), max(1, -(-w // 8))))
    tissue = (blocks < TISSUE_GRAY).float()
    grow = lambda m: nn.max_pool2d(m, 3, stride=1, padding=1)  # noqa: E731  (by one block)
    shrink = lambda m: -nn.max_pool2d(-m, 3, stride=1, padding=1)  # noqa: E731
    inner = shrink(shrink(grow(tissue)))  # closed (gaps filled), then one block in from the tissue's edges
    few = lambda m: m.mean((-2, -1), keepdim=True) < 0.05  # noqa: E731
    mask = torch.where(few(inner), torch.where(few(tissue), torch.ones_like(tissue), tissue), inner)
    win = torch.outer(torch.hann_window(h, periodic=False, dtype=torch.float32, device=dev),
                      torch.hann_window(w, periodic=False, dtype=torch.float32, device=dev)) if h > 1 and w > 1 else \
        torch.ones(h, w, device=dev)
    wt = nn.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False).mul_(win).view(b, 1, h * w)
    flat = gray.view(b, 1, h * w)
    dot = lambda u, v: torch.bmm(u, v.transpose(1, 2)).view(b, 1, 1)  # noqa: E731  (per-sample sums, no temporaries)
    mean = dot(flat, wt) / dot(torch.ones_like(wt[:1]).expand(b, -1, -1), wt).clamp_min(1e-12)
    energy = dot(wt, wt).view(b, 1).clamp_min(1e-12)
    g = flat.mul_(wt).addcmul_(wt, mean, value=-1.0).view(b, 1, h, w)  # (gray - weighted mean) · window, in place
    p = torch.view_as_real(torch.fft.rfft2(g)).square_().sum(-1).flatten(1)  # |FFT|², (B, h·(w//2+1))
    fy = torch.fft.fftfreq(h, device=dev)[:, None]
    fx = torch.fft.rfftfreq(w, device=dev)[None, :]
    idx = (torch.sqrt(fx ** 2 + fy ** 2) / 0.5 * bins).long().clamp(max=bins).flatten()
    total = torch.zeros(b, bins + 1, device=dev).index_add_(1, idx, p)[:, :bins]
    count = torch.bincount(idx, minlength=bins + 1)[:bins].clamp_min(1)
    return total / count / energy


def matched_gains(power: torch.Tensor, reference: np.ndarray, max_gain: float) -> torch.Tensor:
    """The matched MTF: for each tile's :func:`tissue_power` ``(B, K)``, the gain ``(B, K)`` that takes it to the
    destination's ``reference`` spectrum ``(K,)``, shaped as :func:`relative_mtf` shapes a paired ratio (monotone
    from g(0) = 1, a rising gain 1 below ``LOW_BAND``, capped at ``max_gain``); float32 on the CPU."""
    p = power.detach().to("cpu", torch.float64).numpy()
    ref = np.asarray(reference, np.float64)
    raw = np.maximum(np.sqrt(np.maximum(ref, 1e-20) / np.maximum(p, 1e-20)), 1e-6)  # relative_mtf of one pair per row

    def isotonic(y, weight, increasing):  # the function behind IsotonicRegression, without the estimator's overhead
        return isotonic_regression(y, sample_weight=weight, increasing=increasing)

    return torch.tensor(_shape_gain(raw.reshape(-1, len(ref)), max_gain, LOW_BAND, isotonic), dtype=torch.float32)


def resample_power(power: np.ndarray, fit_mpp: float, mpp: float) -> np.ndarray:
    """A :func:`tissue_power` reference measured at ``fit_mpp`` µm/px, for tiles at ``mpp``: the frequency axis as in
    :func:`resample_gain`, and the density scaled by ``(fit_mpp / mpp)²`` (the same variance over a band of
    physical frequencies spreads over ``(mpp / fit_mpp)²`` times the area in cycles/px)."""
    return resample_gain(power, fit_mpp, mpp) * (fit_mpp / mpp) ** 2


def resample_gain(gain: np.ndarray, fit_mpp: float, mpp: float) -> np.ndarray:
    """The gain profile of a transfer fitted at ``fit_mpp`` µm/px, for tiles at ``mpp``: a frequency of f cycles/px
    at ``mpp`` is f·fit_mpp/mpp cycles/px at the fit's resolution. Frequencies beyond the fit's Nyquist keep its last
    value."""
    k = len(gain)
    centres = (np.arange(k) + 0.5) / k * 0.5
    return np.interp(np.clip(centres * fit_mpp / mpp, 0, 0.5), centres, gain)


# ----------------------------------------------------------------------------------------------- noise
def noise_sigma(image: np.ndarray) -> float:
    """σ of additive white noise in ``[0, 1]`` units, by Immerkær's estimator (Computer Vision and Image
    Understanding 64(2), 1996): the mean absolute response of the Laplacian-difference mask
    ``[[1, −2, 1], [−2, 4, −2], [1, −2, 1]]`` times √(π/2)/6, on the grayscale image."""
    g = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float64) / 255.0
    if min(g.shape) < 3:
        return 0.0
    m = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)
    r = cv2.filter2D(g, cv2.CV_64F, m)[1:-1, 1:-1]
    return float(math.sqrt(math.pi / 2) / 6 * np.abs(r).mean())


def add_noise(images: torch.Tensor, sigma: float, strength: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Gaussian noise ``N(0, (s·σ)²)`` per pixel, each sample from its own seed (drawn on CPU: the same on any
    device)."""
    if sigma <= 0:
        return images
    noise = torch.stack([torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds.tolist()]).to(images)
    return (images + noise * (sigma * strength.to(images).view(-1, 1, 1, 1))).clamp(0.0, 1.0)


def blockiness(image: np.ndarray) -> float:
    """Mean absolute horizontal+vertical gradient on 8-px JPEG block borders over that inside blocks (≈ 1: no
    block structure; JPEG at low quality: clearly above 1)."""
    g = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float64)
    dx = np.abs(np.diff(g, axis=1))
    dy = np.abs(np.diff(g, axis=0))
    bx = dx[:, 7::8].mean() if dx.shape[1] > 8 else 0.0
    by = dy[7::8, :].mean() if dy.shape[0] > 8 else 0.0
    inside = (np.delete(dx, np.s_[7::8], axis=1).mean() + np.delete(dy, np.s_[7::8], axis=0).mean()) / 2
    return float((bx + by) / 2 / max(inside, 1e-9))


__all__ = ["SPACES", "LOSSES", "MTF_BINS", "DOMAIN_QUANTILES", "colour_features", "fit_colour_map", "weighted_ridge",
           "colour_domain", "apply_colour_map", "pair_offset", "block_means",
           "radial_power", "relative_mtf", "mtf_filter", "resample_gain", "tissue_power", "matched_gains",
           "resample_power", "TISSUE_GRAY", "noise_sigma", "add_noise", "blockiness"]
