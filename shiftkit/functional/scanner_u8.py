"""The 8-bit CPU route of the scanner kernels: uint8 ``(B, H, W, 3)`` tiles in, uint8 out, one OpenCV call per tile.

This is what ``shiftkit simulate`` and the stress test run on a CPU: tiles arrive as 8-bit images and leave as
8-bit images, so converting to float, filtering planes and rounding back costs more than the corruption itself.
Each kernel takes the same per-sample parameters as its float twin in :mod:`shiftkit.functional.scanner` and
builds the same PSF; tiles are spread over ``torch.get_num_threads()`` threads. Results equal
``round(255 · float_route(x / 255))`` exactly for the codecs (JPEG, JPEG 2000, which already ran through 8 bits)
and within one level for the filters (OpenCV's 8-bit filtering rounds once at the end); tests/test_routes.py
states every tolerance. Pointwise tone curves use :func:`pointwise_lut`: a
256-entry table per sample computed by the float kernel itself, so they are equal to the float route up to float
rounding of the same operations.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict

import cv2
import numpy as np
import torch

from .scanner import check_jpeg2000_size, disk_kernel, gaussian_taps, motion_kernel

Params = Dict[str, torch.Tensor]


def _tiles(images: np.ndarray) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 tiles of shape (B, H, W, 3), got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images)


def _each(n: int, fn: Callable[[int], None]) -> None:
    """``fn(i)`` for every tile, spread over ``torch.get_num_threads()`` threads: OpenCV's codecs and filters
    release the GIL and a 224² tile is too small for their own threading. A tile's result does not depend on the
    thread. One thread (e.g. in a DataLoader worker) or one tile: a plain loop. The pool lives for one call, so a
    forked process never inherits a pool without threads."""
    workers = min(n, torch.get_num_threads())
    if workers <= 1:
        for i in range(n):
            fn(i)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, range(n)))


def gaussian_blur_u8(images: np.ndarray, sigma: torch.Tensor) -> np.ndarray:
    """:func:`~shiftkit.functional.scanner.gaussian_blur` on 8-bit tiles (the same separable kernel and radius)."""
    x = _tiles(images)
    if x.shape[0] == 0:
        return x.copy()
    k = gaussian_taps(sigma, x.shape[1:3]).float().numpy()
    out = np.empty_like(x)
    identity = (sigma.cpu() <= 0).tolist()

    def one(i: int) -> None:
        if identity[i]:
            out[i] = x[i]
        else:
            cv2.sepFilter2D(x[i], -1, k[i], k[i], dst=out[i], borderType=cv2.BORDER_REFLECT_101)

    _each(x.shape[0], one)
    return out


def _filter_u8(x: np.ndarray, kernels: np.ndarray, identity) -> np.ndarray:
    out = np.empty_like(x)
    kh, kw = kernels.shape[-2:]
    if kh // 2 >= x.shape[1] or kw // 2 >= x.shape[2]:
        raise ValueError(f"`kernel` is too large for the tile: expected a kernel smaller than {x.shape[1:3]}, got {(kh, kw)}")

    def one(i: int) -> None:
        if identity[i]:
            out[i] = x[i]
        else:
            cv2.filter2D(x[i], -1, kernels[i], dst=out[i], borderType=cv2.BORDER_REFLECT_101)

    _each(x.shape[0], one)
    return out


def disk_blur_u8(images: np.ndarray, radius: torch.Tensor) -> np.ndarray:
    """:func:`~shiftkit.functional.scanner.disk_blur` on 8-bit tiles (the same anti-aliased pillbox)."""
    x = _tiles(images)
    if x.shape[0] == 0:
        return x.copy()
    return _filter_u8(x, disk_kernel(radius.cpu()).float().numpy(), (radius.cpu() <= 0).tolist())


def motion_blur_u8(images: np.ndarray, length: torch.Tensor) -> np.ndarray:
    """:func:`~shiftkit.functional.scanner.motion_blur` on 8-bit tiles (the same box with fractional ends)."""
    x = _tiles(images)
    if x.shape[0] == 0:
        return x.copy()
    k = motion_kernel(length.cpu()).float().numpy()[:, None, :]
    return _filter_u8(x, k, [False] * x.shape[0])


def saturation_u8(images: np.ndarray, factor: torch.Tensor) -> np.ndarray:
    """:func:`~shiftkit.functional.scanner.saturation` on 8-bit tiles, in closed form: scaling HSV saturation by
    ``f`` with hue and value kept moves each channel ``c`` to ``v − k·(v − c)`` with ``v`` the pixel's maximum and
    ``k = min(f, v / (v − min))`` (the clamp of saturation at 1), no HSV round trip."""
    x = _tiles(images)
    out = np.empty_like(x)
    factors = factor.cpu().double().tolist()

    def one(i: int) -> None:
        if factors[i] == 1:
            out[i] = x[i]
            return
        r, g, b = cv2.split(x[i])
        v = cv2.max(cv2.max(r, g), b).astype(np.float32)
        d = v - cv2.min(cv2.min(r, g), b)
        k = np.minimum(np.float32(factors[i]), cv2.divide(v, d))  # OpenCV's x / 0 = 0: grey pixels stay (v - c = 0)
        v3, k3 = cv2.merge([v, v, v]), cv2.merge([k, k, k])
        cv2.convertScaleAbs(v3 - k3 * (v3 - x[i].astype(np.float32)), dst=out[i])  # >= 0; rounds half to even

    _each(x.shape[0], one)
    return out


_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10 decodes to RGB without a conversion


def _decode_rgb(buf: np.ndarray, dst: np.ndarray, dy: int, dx: int) -> None:
    if _IMREAD_RGB is not None:
        dst[...] = cv2.imdecode(buf, _IMREAD_RGB)[dy:, dx:]
    else:
        cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR)[dy:, dx:], cv2.COLOR_BGR2RGB, dst=dst)


def jpeg_u8(images: np.ndarray, quality: torch.Tensor, offset: torch.Tensor | None = None) -> np.ndarray:
    """:func:`~shiftkit.functional.scanner.jpeg` on 8-bit tiles: the same libjpeg round trip, without the float
    conversions (equal bytes)."""
    x = _tiles(images)
    out = np.empty_like(x)
    qualities = quality.long().tolist()
    offsets = offset.long().tolist() if offset is not None else [(0, 0)] * x.shape[0]

    def one(i: int) -> None:
        tile = cv2.cvtColor(x[i], cv2.COLOR_RGB2BGR)
        dy, dx = offsets[i]
        if dy or dx:
            tile = np.pad(tile, ((dy, 0), (dx, 0), (0, 0)), mode="edge")
        ok, buf = cv2.imencode(".jpg", tile, [cv2.IMWRITE_JPEG_QUALITY, int(qualities[i])])
        if not ok:
            raise RuntimeError("OpenCV could not JPEG-encode a tile")
        _decode_rgb(buf, out[i], dy, dx)

    _each(x.shape[0], one)
    return out


def jpeg2000_u8(images: np.ndarray, ratio: torch.Tensor) -> np.ndarray:
    """:func:`~shiftkit.functional.scanner.jpeg2000` on 8-bit tiles (equal bytes)."""
    x = _tiles(images)
    check_jpeg2000_size(*x.shape[1:3])
    out = np.empty_like(x)
    ratios = ratio.cpu().double().tolist()

    def one(i: int) -> None:
        rate = int(max(1, min(1000, round(1000.0 / ratios[i]))))
        ok, buf = cv2.imencode(".jp2", cv2.cvtColor(x[i], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG2000_COMPRESSION_X1000, rate])
        if not ok:
            raise RuntimeError("OpenCV could not JPEG 2000-encode a tile")
        _decode_rgb(buf, out[i], 0, 0)

    _each(x.shape[0], one)
    return out


def resample_u8(images: np.ndarray, factor: torch.Tensor) -> np.ndarray:
    """:func:`~shiftkit.functional.scanner.resample` on 8-bit tiles: torch's 8-bit antialiased bicubic down and
    bicubic up (the float route's filters; the intermediate image is rounded to 8 bits)."""
    x = _tiles(images)
    out = x.copy()
    h, w = x.shape[1:3]
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    for f in torch.unique(factor.cpu()).tolist():
        if f >= 1.0:
            continue
        idx = (factor.cpu() == f).nonzero().flatten()
        small = torch.nn.functional.interpolate(t[idx], size=(max(1, round(h * f)), max(1, round(w * f))),
                                                mode="bicubic", antialias=True, align_corners=False)
        up = torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
        out[idx.numpy()] = up.permute(0, 2, 3, 1).numpy()
    return out


def pointwise_lut(kernel: Callable[[torch.Tensor, Params], torch.Tensor], images: np.ndarray, params: Params) -> np.ndarray:
    """Apply a per-channel pointwise float ``kernel`` to 8-bit tiles through one 256-entry table per sample and
    channel, computed by ``kernel`` itself on the ramp ``k / 255`` (float32) and rounded as the float route
    rounds: ``round(255 · clamp(y, 0, 1))``."""
    x = _tiles(images)
    b = x.shape[0]
    ramp = (torch.arange(256, dtype=torch.float32) / 255).view(1, 1, 1, 256).expand(b, 3, 1, 256).contiguous()
    lut = (kernel(ramp, params).clamp(0, 1) * 255).round().to(torch.uint8)  # (B, 3, 1, 256)
    lut = lut[:, :, 0].permute(0, 2, 1).contiguous().numpy()  # (B, 256, 3)
    out = np.empty_like(x)
    for i in range(b):
        cv2.LUT(x[i], lut[i][None], dst=out[i])
    return out


__all__ = ["gaussian_blur_u8", "disk_blur_u8", "motion_blur_u8", "saturation_u8", "jpeg_u8", "jpeg2000_u8", "resample_u8", "pointwise_lut"]
