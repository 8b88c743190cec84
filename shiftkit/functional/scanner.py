"""Deterministic scanner and slide-preparation shift kernels on float ``(B, 3, H, W)`` batches in ``[0, 1]``.

Every parameter is a per-sample ``(B,)`` tensor (or ``(B, ...)``); random fields (noise) are generated from
per-sample integer seeds, so a tile's result never depends on its batch mates. Lengths are in pixels of the
tile; the shift registry converts micrometres with the tile's µm/px.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import cv2
import kornia
import numpy as np
import torch
import torch.nn.functional as F

from ..core.image import lookup_uint8
from ..stain.mask import linear_to_srgb, srgb_to_linear
from ..stain.model import od_to_rgb, rgb_to_od


# ----------------------------------------------------------------------------- colour helpers


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


def _keep_where(identity: torch.Tensor, images: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Samples whose parameter is the identity get their input back exactly (colour round trips are not).

    On CPU, where ``torch.where`` costs about 1.5 ns per element, only those samples are copied (none, usually);
    elsewhere one ``torch.where`` without a host round trip.
    """
    ident = identity.to(images.device).reshape(-1)
    if images.device.type == "cpu" and not (torch.is_grad_enabled() and (images.requires_grad or out.requires_grad)):
        if not bool(ident.any()):
            return out
        if out.data_ptr() == images.data_ptr():
            out = out.clone()
        out[ident] = images[ident].to(out.dtype)
        return out
    return torch.where(ident.view(-1, *([1] * (images.ndim - 1))), images, out)


# ----------------------------------------------------------------------------- optics


def _on_cpu_without_grad(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether ``x`` can take the OpenCV route: a float32/float64 CPU tensor and no gradient needed."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others))
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not grad


def _grouped_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve each sample with its own kernel ``(B, kh, kw)`` (same for the 3 channels), reflect padding."""
    b, c, h, w = x.shape
    kh, kw = kernel.shape[-2:]
    ph, pw = kh // 2, kw // 2
    if ph >= h or pw >= w:
        raise ValueError(f"`kernel` is too large for the tile: expected a kernel smaller than {(h, w)}, got {(kh, kw)}")
    if _on_cpu_without_grad(x, kernel):
        # OpenCV's filter2D per plane: the same correlation with the same (reflect-101) border as the grouped
        # conv2d below, several times faster on CPU (equal to 1e-6 in float32, tested)
        src = x.contiguous().numpy()
        k = kernel.to(x.dtype).contiguous().numpy()
        out = np.empty_like(src)
        for i in range(b):
            for j in range(c):
                cv2.filter2D(src[i, j], -1, k[i], dst=out[i, j], borderType=cv2.BORDER_REFLECT_101)
        return torch.from_numpy(out)
    y = F.pad(x.reshape(1, b * c, h, w), (pw, pw, ph, ph), mode="reflect")
    wgt = kernel.to(x).repeat_interleave(c, dim=0).view(b * c, 1, kh, kw)
    return F.conv2d(y, wgt, groups=b * c).view(b, c, h, w)


def _gaussian_1d(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    ax = torch.arange(-radius, radius + 1, dtype=torch.float64)
    s = sigma.double().clamp_min(1e-6)[:, None]
    k = torch.exp(-(ax[None] ** 2) / (2 * s * s))
    k = torch.where(sigma[:, None] <= 0, (ax[None] == 0).double(), k)
    return k / k.sum(-1, keepdim=True)


def gaussian_taps(sigma: torch.Tensor, size) -> torch.Tensor:
    """The separable taps of :func:`gaussian_blur` for tiles of ``size`` ``(H, W)``: ``(B, 2r + 1)`` float64, one
    normalized row per σ (σ <= 0: the identity), radius ``r = ceil(3·max σ)``, at least 1, below the tile's side."""
    radius = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    return _gaussian_1d(sigma.cpu(), min(radius, min(size) - 1))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Defocus with a Gaussian PSF of standard deviation ``sigma`` px per sample (0 = identity, exactly).

    Separable, normalized kernels (the mean intensity is kept up to the reflect padding at the border).
    """
    if images.shape[0] == 0:
        return images.clone()
    k = gaussian_taps(sigma, images.shape[-2:]).to(images)
    if _on_cpu_without_grad(images):  # both passes in one OpenCV call per plane
        src = images.contiguous().numpy()
        kn = k.to(images.dtype).numpy()
        out = np.empty_like(src)
        for i in range(src.shape[0]):
            for j in range(src.shape[1]):
                cv2.sepFilter2D(src[i, j], -1, kn[i], kn[i], dst=out[i, j], borderType=cv2.BORDER_REFLECT_101)
        y = torch.from_numpy(out)
    else:
        y = _grouped_conv(images, k[:, None, :])
        y = _grouped_conv(y, k[:, :, None])
    return _keep_where(sigma <= 0, images, y)


def disk_kernel(radius: torch.Tensor, alias_sigma: float = 0.5) -> torch.Tensor:
    """Pillbox PSFs of ``radius`` px, ``(B, K, K)``: area coverage by 8× supersampling, softened by a 3×3
    Gaussian of ``alias_sigma`` px; radius 0 gives the identity kernel."""
    r_max = max(1, int(math.ceil(float(radius.max()))) + 1)
    ss = 8
    ax = (torch.arange((2 * r_max + 1) * ss, dtype=torch.float64) + 0.5) / ss - (r_max + 0.5)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    rr = (xx**2 + yy**2).sqrt()
    k = F.avg_pool2d((rr[None] <= radius.double().view(-1, 1, 1)).double()[:, None], ss)  # (B, 1, K, K)
    if alias_sigma > 0:
        g = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / (2 * alias_sigma**2))
        g2 = (g[:, None] * g[None]) / (g.sum() ** 2)
        k = F.conv2d(k, g2[None, None], padding=1)
    k = k[:, 0]
    delta = torch.zeros_like(k)
    delta[:, r_max, r_max] = 1.0
    k = torch.where(radius.view(-1, 1, 1) <= 0, delta, k)
    return k / k.sum(dim=(-1, -2), keepdim=True)


def disk_blur(images: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Defocus with a pillbox (geometric-optics) PSF of ``radius`` px per sample (0 = identity)."""
    if images.shape[0] == 0:
        return images.clone()
    y = _grouped_conv(images, disk_kernel(radius.cpu()).to(images))
    return _keep_where(radius <= 0, images, y)


def motion_blur(images: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Line-scan motion/sync blur: a 1-D box of ``length`` px along the scan axis (image x); fractional ends."""
    if images.shape[0] == 0:
        return images.clone()
    return _grouped_conv(images, motion_kernel(length)[:, None, :].to(images))


def motion_kernel(length: torch.Tensor) -> torch.Tensor:
    """Horizontal box kernels ``(B, K)`` (float64) of ``length`` px with fractional ends; length <= 1 is the identity."""
    half = max(1, int(math.ceil(float(length.max()) / 2)))
    ax = torch.arange(-half, half + 1, dtype=torch.float64)
    l = length.double().cpu()[:, None]
    k = ((l / 2 + 0.5) - ax[None].abs()).clamp(0.0, 1.0)  # coverage of each pixel by a centred box of length l
    k = torch.where(l <= 1, (ax[None] == 0).double(), k)
    return k / k.sum(-1, keepdim=True)


def focal_tilt(images: torch.Tensor, sigma_max: torch.Tensor, angle: torch.Tensor, levels: int = 6) -> torch.Tensor:
    """Partial defocus: the Gaussian σ ramps linearly from 0 to ``sigma_max`` across the tile along direction
    ``angle`` (radians); rendered by blending ``levels`` blur levels per pixel."""
    b, c, h, w = images.shape
    if b == 0:
        return images.clone()
    ts = torch.linspace(0, 1, levels)
    stack = torch.stack([gaussian_blur(images, sigma_max.cpu() * t) for t in ts])  # (L, B, C, H, W)
    yy = torch.linspace(-1, 1, h, device=images.device)[:, None]
    xx = torch.linspace(-1, 1, w, device=images.device)[None]
    a = angle.to(images.device).view(-1, 1, 1)
    pos = (xx * torch.cos(a) + yy * torch.sin(a)) / (torch.cos(a).abs() + torch.sin(a).abs())  # in [-1, 1]
    pos = ((pos + 1) / 2).clamp(0, 1) * (levels - 1)  # (B, H, W) fractional level
    lo = pos.floor().long().clamp(max=levels - 2)
    frac = (pos - lo).to(images.dtype)[:, None]
    idx = lo[None, :, None].expand(1, b, c, h, w)
    below = stack.gather(0, idx)[0]
    above = stack.gather(0, idx + 1)[0]
    return below + (above - below) * frac


def chromatic_aberration(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Lateral chromatic aberration: R magnified and B shrunk about the centre so that each is displaced by
    ``shift`` px at the tile corner, relative to G (bilinear resampling, border replicated)."""
    b, c, h, w = images.shape
    if b == 0:
        return images.clone()
    r_corner = math.hypot(h / 2, w / 2)
    k = (shift.to(images.device, images.dtype) / r_corner).view(-1, 1, 1, 1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype),
                            torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype), indexing="ij")
    grid = torch.stack([xx, yy], -1)[None].expand(b, h, w, 2)
    out = images.clone()
    for ch, sign in ((0, 1.0), (2, -1.0)):
        g = grid / (1 + sign * k)  # sampling closer to the centre magnifies
        out[:, ch : ch + 1] = F.grid_sample(images[:, ch : ch + 1], g, mode="bilinear", padding_mode="border", align_corners=True)
    return _keep_where(shift == 0, images, out)


# ----------------------------------------------------------------------------- illumination


def vignetting(images: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Flat-field error: linear-light gain ``1 − drop · (r / r_corner)²`` around the tile centre."""
    b, _, h, w = images.shape
    yy = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype)[:, None]
    xx = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype)[None]
    r2 = (xx**2 + yy**2) / 2.0
    gain = 1.0 - _per_sample(drop, images) * r2
    return _keep_where(drop == 0, images, linear_to_srgb(srgb_to_linear(images) * gain))


def stitching_seam(images: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """A tile-stitching seam: right of column ``position·W`` the image is scaled by ``1 + step`` (linear light)
    and shifted down by ``offset`` px (misregistration)."""
    b, c, h, w = images.shape
    col = torch.arange(w, device=images.device)[None, None, None, :]
    right = col >= (position.to(images.device) * w).round().long().view(-1, 1, 1, 1)
    out = []
    for i in range(b):  # offsets are small integers; a roll per sample
        o = int(offset[i])
        out.append(torch.roll(images[i], shifts=o, dims=1) if o else images[i])
    shifted = torch.stack(out) if b else images
    lin = srgb_to_linear(shifted) * (1.0 + _per_sample(step, images))
    out = torch.where(right, linear_to_srgb(lin), images)
    return _keep_where((step == 0) & (offset == 0), images, out)


def line_stripes(images: torch.Tensor, amplitude: torch.Tensor, seed: torch.Tensor, width: int = 64) -> torch.Tensor:
    """Line-scan stripes: bands of ``width`` px along the scan axis, each with its own linear-light gain
    ``1 + amplitude · u`` (u uniform in [−1, 1] per band, drawn from the sample's seed)."""
    b, c, h, w = images.shape
    nb = (w + width - 1) // width + 1
    gains = torch.empty(b, nb)
    phase = torch.empty(b, dtype=torch.long)
    for i in range(b):
        g = torch.Generator().manual_seed(int(seed[i]))
        gains[i] = 1 + float(amplitude[i]) * (2 * torch.rand(nb, generator=g) - 1)
        phase[i] = torch.randint(0, width, (1,), generator=g)
    col = torch.arange(w)[None] + phase[:, None]
    band = (col // width).clamp(max=nb - 1)
    gain = gains.gather(1, band).to(images).view(b, 1, 1, w)
    return _keep_where(amplitude == 0, images, linear_to_srgb(srgb_to_linear(images) * gain))


# ----------------------------------------------------------------------------- sensor


def exposure(images: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Exposure/brightness: multiply linear light by ``gain`` (clipped at white)."""
    return _keep_where(gain == 1, images, linear_to_srgb(srgb_to_linear(images) * _per_sample(gain, images)))


#: expected photon count below which the shot noise is drawn exactly (Poisson by inverse CDF); above it a normal
#: of the same mean and variance is used (skewness 1/sqrt(16) = 0.25 at the switch, falling from there)
SHOT_EXACT_BELOW = 16.0
_SHOT_KMAX = int(SHOT_EXACT_BELOW + 10 * math.sqrt(SHOT_EXACT_BELOW) + 10)  # P(count > kmax) < 1e-12 below the switch


def poisson_inverse_cdf(lam: torch.Tensor, u: torch.Tensor, kmax: int = _SHOT_KMAX) -> torch.Tensor:
    """Poisson counts ``min{k : F(k; λ) >= u}`` for uniforms ``u`` (counts capped at ``kmax + 1``).

    One uniform per pixel whatever λ is, so a pixel's draw depends only on its own λ and ``u``: a tiny change of the
    input moves a count only where ``u`` sits on a step of the CDF (a rejection sampler such as ``torch.poisson``
    consumes a λ-dependent number of uniforms, so one changed pixel reshuffles every later pixel's draw). The loop
    stops once every CDF has passed its uniform."""
    shape = u.shape
    lam, u = lam.float().reshape(-1), u.float().reshape(-1)
    p = torch.exp(-lam)
    cdf = p.clone()
    k = torch.zeros_like(lam)
    out, pos = k, None  # pos: where the active entries sit in ``out`` (None = all of them, in order)
    below = torch.empty_like(lam, dtype=torch.bool)
    for j in range(1, kmax + 1):
        torch.lt(cdf, u, out=below)
        if j % 8 == 0:
            # drop the entries whose CDF has passed their uniform (their count is final): the same arithmetic on
            # fewer entries, so the counts are those of the full loop
            keep = below.nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            if keep.numel() < 0.75 * below.numel():
                if pos is None:
                    out = k
                    pos = keep
                else:
                    out[pos] = k
                    pos = pos[keep]
                lam, u, p, cdf, k = lam[keep], u[keep], p[keep], cdf[keep], k[keep]
                below = torch.ones_like(lam, dtype=torch.bool)
        k += below
        p.mul_(lam).div_(j)
        cdf += p
    if pos is None:
        return k.reshape(shape)
    out[pos] = k
    return out.reshape(shape)


def poisson_gaussian(lin: torch.Tensor, photons: torch.Tensor, read_sigma: torch.Tensor, u: torch.Tensor,
                     z: torch.Tensor) -> torch.Tensor:
    """Linear light with shot and read noise from given uniforms ``u`` and normals ``z`` (sampler 2), unclipped.

    ``lin``, ``u``, ``z``: contiguous ``(B, C, H, W)`` float32 (``lin`` is clamped at 0 in place); ``photons``,
    ``read_sigma``: ``(B,)``. Below :data:`SHOT_EXACT_BELOW` expected photons the count is
    ``poisson_inverse_cdf(λx, u)`` and the value ``count/λ + σ_r z``; above, ``x + sqrt(x/λ + σ_r²) z``."""
    lam, var_read = photons.float(), read_sigma.float() ** 2
    x = lin.clamp_min_(0.0)
    # variance-matched normal x + sqrt(x/λ + σ_r²)·z, in place on one temporary (the same values as the plain
    # expression: every step is one correctly rounded operation in the same order)
    out = torch.div(x, lam.view(-1, 1, 1, 1)).add_(var_read.view(-1, 1, 1, 1)).sqrt_().mul_(z).add_(x)
    # exact counts where few photons are expected: one nonzero, then gathers on the flat tensors
    per = x[0].numel()
    idx = (x < SHOT_EXACT_BELOW / lam.view(-1, 1, 1, 1)).view(-1).nonzero().squeeze(1)
    if idx.numel():
        owner = idx // per
        lam_i = lam[owner]
        counts = poisson_inverse_cdf(x.view(-1)[idx] * lam_i, u.view(-1)[idx])
        out.view(-1)[idx] = counts / lam_i + var_read[owner].sqrt() * z.view(-1)[idx]
    return out


def sensor_noise(images: torch.Tensor, photons: torch.Tensor, read_sigma: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Poisson–Gaussian sensor noise in linear light: ``Poisson(λ·x)/λ + N(0, σ_r²)``.

    Sampler (version 2): per pixel one uniform ``u`` and one normal ``z`` from the sample's own generator. Where the
    expected count ``λx`` is below :data:`SHOT_EXACT_BELOW` the count is drawn exactly by inverse CDF from ``u``
    (``k/λ + σ_r z``); above it by the variance-matched normal ``x + sqrt(x/λ + σ_r²) z``. Mean and variance equal
    the exact model's at every intensity; the cost is two draws per pixel, not a rejection sampler's loop. Draws and
    arithmetic run on the CPU, so one seed gives the same pixels on every device. (This is the float route; 8-bit
    tiles on the CPU draw from quantile tables of the same model:
    :func:`~shiftkit.functional.scanner_u8.sensor_noise_u8`.)

    Args:
        images: ``(B, 3, H, W)`` float in ``[0, 1]`` (sRGB).
        photons: ``(B,)`` λ, photons at white (smaller = noisier).
        read_sigma: ``(B,)`` read-noise σ in linear units.
        seed: ``(B,)`` int64 per-sample seeds of the noise fields (generated on CPU: the same on any device).
    """
    # linear light on the CPU too: the same float input on every device, so the same seed gives the same draws
    lin = srgb_to_linear(images.detach().float().cpu()).contiguous()
    u, z = torch.empty_like(lin), torch.empty_like(lin)
    seeds = seed.long().tolist()

    def draw(i: int) -> None:  # its own generator: the result does not depend on the thread that runs it
        g = torch.Generator().manual_seed(int(seeds[i]))
        torch.rand(lin[i].shape, generator=g, out=u[i])
        torch.randn(lin[i].shape, generator=g, out=z[i])

    workers = min(lin.shape[0], torch.get_num_threads())
    if workers > 1:  # the draws release the GIL
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(draw, range(lin.shape[0])))
    else:
        for i in range(lin.shape[0]):
            draw(i)
    out = poisson_gaussian(lin, photons.detach().float().cpu(), read_sigma.detach().float().cpu(), u, z)
    return linear_to_srgb(out, overwrite=True).to(images)


# ----------------------------------------------------------------------------- ISP


def gamma_curve(images: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Tone curve ``x^γ`` per sample (γ > 1 darkens mid-tones)."""
    return images.clamp_min(0.0) ** _per_sample(gamma, images)


def saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """HSV saturation × ``factor`` per sample (Kornia)."""
    return _keep_where(factor == 1, images, kornia.enhance.adjust_saturation(images, factor.to(images)).clamp(0.0, 1.0))


def white_balance(images: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """Per-channel linear-light gains ``(B, 3)`` (a diagonal colour matrix), normalized to keep luminance."""
    g = gains.to(images)
    lum = torch.tensor([0.212671, 0.715160, 0.072169], device=images.device, dtype=images.dtype)
    g = g / (g * lum).sum(-1, keepdim=True)
    return _keep_where((gains == 1).all(-1), images, linear_to_srgb(srgb_to_linear(images) * g[..., None, None]))


def unsharp_mask(images: torch.Tensor, amount: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Over-sharpening: ``x + amount · (x − blur_σ(x))``."""
    blurred = gaussian_blur(images, torch.full((images.shape[0],), sigma))
    return (images + _per_sample(amount, images) * (images - blurred)).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- storage


def jpeg(images: torch.Tensor, quality: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """JPEG encode/decode with OpenCV's libjpeg (4:2:0 chroma) at ``quality`` per sample.

    ``offset`` ``(B, 2)`` (dy, dx) in pixels shifts the 8×8 block grid before encoding (re-encoding a tile
    on a misaligned grid); the shift is undone after decoding. Runs on CPU; the result returns to the input's
    device. Output values are multiples of 1/255.
    """
    dev, dtype = images.device, images.dtype
    planes = _planar_u8(images)  # (B, 3, H, W) uint8
    out = np.empty_like(planes)
    qualities = quality.long().tolist()
    offsets = offset.long().tolist() if offset is not None else [(0, 0)] * planes.shape[0]
    for i in range(planes.shape[0]):
        tile = cv2.merge([planes[i, 2], planes[i, 1], planes[i, 0]])  # BGR, interleaved, for libjpeg
        dy, dx = offsets[i]
        if dy or dx:
            tile = np.pad(tile, ((dy, 0), (dx, 0), (0, 0)), mode="edge")
        ok, buf = cv2.imencode(".jpg", tile, [cv2.IMWRITE_JPEG_QUALITY, int(qualities[i])])
        dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)[dy:, dx:]
        b_, g_, r_ = cv2.split(dec)
        out[i, 0], out[i, 1], out[i, 2] = r_, g_, b_
    return _from_planar_u8(out, dev, dtype)


def _planar_u8(images: torch.Tensor) -> np.ndarray:
    """``round(255·clamp(x, 0, 1))`` (half to even) as a planar ``(B, 3, H, W)`` uint8 array on the host."""
    x = images.detach().float().cpu().contiguous()
    if x.numel() == 0:
        return np.empty(tuple(x.shape), dtype=np.uint8)
    src = x.numpy().reshape(-1, x.shape[-1])
    src = cv2.threshold(src, 0.0, 0.0, cv2.THRESH_TOZERO)[1]  # negatives to 0 (convertScaleAbs takes |·|)
    return cv2.convertScaleAbs(src, alpha=255.0).reshape(x.shape)  # scale, round half to even, saturate


def _from_planar_u8(planes: np.ndarray, device, dtype) -> torch.Tensor:
    """``k / 255`` of 8-bit planes, in ``dtype`` on ``device`` (by a 256-entry table for float32)."""
    u8 = torch.from_numpy(planes)
    if dtype == torch.float32 and u8.numel():
        return lookup_uint8(u8, "k/255", lambda v: torch.arange(256, dtype=torch.float32) / 255.0).to(device)
    return u8.to(device=device, dtype=dtype) / 255.0


#: OpenJPEG's default of 6 resolution levels needs tiles of at least 2⁵ = 32 px on each side.
JPEG2000_MIN_SIDE = 32


def check_jpeg2000_size(h: int, w: int) -> None:
    """Refuse tiles OpenJPEG cannot encode with a message that says so (instead of OpenCV's codec error)."""
    if min(h, w) < JPEG2000_MIN_SIDE:
        raise ValueError(f"`images` too small for JPEG 2000: expected tiles of at least {JPEG2000_MIN_SIDE} px on each "
                         f"side (OpenJPEG's 6 resolution levels), got {h}x{w}")


def jpeg2000(images: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """JPEG 2000 at a compression ``ratio`` (e.g. 35 for 35:1) per sample, through OpenCV's OpenJPEG."""
    check_jpeg2000_size(*images.shape[-2:])
    dev, dtype = images.device, images.dtype
    planes = _planar_u8(images)
    out = np.empty_like(planes)
    for i in range(planes.shape[0]):
        rate = int(max(1, min(1000, round(1000.0 / float(ratio[i])))))
        tile = cv2.merge([planes[i, 2], planes[i, 1], planes[i, 0]])  # BGR, interleaved
        ok, buf = cv2.imencode(".jp2", tile, [cv2.IMWRITE_JPEG2000_COMPRESSION_X1000, rate])
        b_, g_, r_ = cv2.split(cv2.imdecode(buf, cv2.IMREAD_COLOR))
        out[i, 0], out[i, 1], out[i, 2] = r_, g_, b_
    return _from_planar_u8(out, dev, dtype)


def resample(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Resolution / µm-per-px mismatch: down-sample by ``factor`` (< 1; bicubic with antialiasing, i.e. the
    coarser sampling's low-pass) and back up (bicubic). Area or bilinear round trips blur even at 0.95 as much
    as at 0.5 (sub-pixel interpolation), so they do not give a graded severity."""
    b, c, h, w = images.shape
    out = images.clone()
    for f in torch.unique(factor.cpu()).tolist():  # one resize per distinct factor (one at a fixed severity)
        idx = (factor.cpu() == f).nonzero().flatten().to(images.device)
        if f >= 1.0:
            continue
        small = F.interpolate(images[idx], size=(max(1, round(h * f)), max(1, round(w * f))), mode="bicubic",
                              antialias=True, align_corners=False)
        out[idx] = F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return out


# ----------------------------------------------------------------------------- stain and section


def section_thickness(images: torch.Tensor, scale: torch.Tensor, i0: float = 1.0) -> torch.Tensor:
    """Section thickness: Beer–Lambert ``OD ← t · OD`` per sample (t > 1 thicker, t < 1 thinner)."""
    out = od_to_rgb(rgb_to_od(images, i0=i0) * _per_sample(scale, images), i0=i0).to(images.dtype)
    return _keep_where(scale == 1, images, out)


__all__ = [
    "JPEG2000_MIN_SIDE",
    "check_jpeg2000_size",
    "gaussian_taps",
    "motion_kernel",
    "line_stripes",
    "focal_tilt",
    "chromatic_aberration",
    "jpeg2000",
    "srgb_to_linear",
    "linear_to_srgb",
    "gaussian_blur",
    "disk_blur",
    "disk_kernel",
    "motion_blur",
    "vignetting",
    "stitching_seam",
    "exposure",
    "sensor_noise",
    "poisson_gaussian",
    "poisson_inverse_cdf",
    "gamma_curve",
    "saturation",
    "white_balance",
    "unsharp_mask",
    "jpeg",
    "resample",
    "section_thickness",
]
