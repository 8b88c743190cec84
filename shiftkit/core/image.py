"""The image contract: what shiftkit accepts, how it computes, and what it gives back.

Accepted inputs (validated by :func:`to_batch`):

* ``numpy.ndarray`` channel-last: ``(H, W, 3)`` or a batch ``(B, H, W, 3)``;
* ``torch.Tensor`` channel-first: ``(3, H, W)`` or a batch ``(B, 3, H, W)``, on any device;
* dtypes ``uint8`` (values 0..255) or floating (``float16``, ``bfloat16``, ``float32``,
  ``float64``) with values in ``[0, 1]``;
* a 4th alpha channel is accepted when it is fully opaque (255 or 1.0); it is dropped for
  computation and put back unchanged on output. Other channel counts, grayscale images,
  non-finite values and floats outside ``[0, 1]`` raise :class:`InvalidImageError`.

Inside the library every image is a float tensor ``(B, 3, H, W)`` RGB in ``[0, 1]``:
float64 when the caller gave float64, float32 otherwise (half-precision inputs are computed in
float32 and cast back). :func:`from_batch` restores the caller's type, dtype, device, layout
and alpha; ``uint8`` is rounded (``round(255 * x)``), so a ``uint8`` image round-trips exactly
through an identity. Inputs are never modified in place and a batch of ``B = 0`` works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from .errors import InvalidImageError

_NUMPY_DTYPES = {np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
_TORCH_DTYPES = {torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64}


@dataclass
class ImageSpec:
    """How an input looked, so that the output can look the same."""

    is_numpy: bool
    batched: bool
    dtype: Any
    device: torch.device
    alpha: Optional[torch.Tensor]  # (B, 1, H, W) in the caller's dtype, or None

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.dtype in (torch.float64, np.dtype(np.float64)):
            return torch.float64
        return torch.float32


def _describe(x: Any) -> str:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        kind = "numpy array" if isinstance(x, np.ndarray) else "tensor"
        return f"{kind} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def to_batch(image: Any, arg: str = "images", out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ImageSpec]:
    """Validate ``image`` and return it as a float ``(B, 3, H, W)`` tensor in ``[0, 1]``.

    Args:
        image: numpy ``(H, W, C)``/``(B, H, W, C)`` or torch ``(C, H, W)``/``(B, C, H, W)``
            with ``C`` = 3, or 4 with an opaque alpha channel.
        arg: the argument's name, used in error messages.
        out: optional float tensor ``(B, 3, H, W)`` of the compute dtype and device that ``uint8`` data is
            converted into (reused memory, e.g. across the chunks of :func:`map_batch`); ignored otherwise.

    Returns:
        ``(batch, spec)``: the float batch (a new tensor or a non-aliasing view that callers
        must not modify in place) and the :class:`ImageSpec` for :func:`from_batch`.

    Raises:
        TypeError: ``image`` is neither a numpy array nor a tensor, or has an unsupported dtype.
        InvalidImageError: wrong rank or channel count, translucent alpha, non-finite values
            or floats outside ``[0, 1]``.
    """
    x, spec, _ = _to_batch(image, arg, out)
    return x, spec


def _to_batch(image: Any, arg: str, out: Optional[torch.Tensor]) -> tuple[torch.Tensor, ImageSpec, Optional[torch.Tensor]]:
    """:func:`to_batch`, also returning the contiguous channel-first uint8 batch for uint8 inputs (else None)."""
    if isinstance(image, np.ndarray):
        if image.dtype not in _NUMPY_DTYPES:
            raise TypeError(f"`{arg}` has an unsupported dtype: expected uint8 or float16/32/64, got {_describe(image)}")
        if image.ndim not in (3, 4):
            what = "a grayscale image" if image.ndim == 2 else _describe(image)
            raise InvalidImageError(
                f"`{arg}` has the wrong shape: expected an RGB numpy array (H, W, 3) or (B, H, W, 3), got {what}"
            )
        batched = image.ndim == 4
        arr = image if batched else image[None]
        channels = arr.shape[-1]
        if arr.dtype == np.uint8 and arr.size and channels in (3, 4):
            t = torch.from_numpy(_planar_u8(arr))  # a channel-first copy (OpenCV's SIMD de-interleave)
        else:
            if not arr.flags.writeable or not arr.flags.c_contiguous:
                arr = np.ascontiguousarray(arr).copy()
            t = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # a channel-first copy
        is_numpy, dtype, device = True, image.dtype, torch.device("cpu")
    elif isinstance(image, torch.Tensor):
        if image.dtype not in _TORCH_DTYPES:
            raise TypeError(
                f"`{arg}` has an unsupported dtype: expected uint8, float16, bfloat16, float32 or float64, "
                f"got {_describe(image)}"
            )
        if image.ndim not in (3, 4):
            what = "a grayscale image" if image.ndim == 2 else _describe(image)
            raise InvalidImageError(
                f"`{arg}` has the wrong shape: expected an RGB tensor (3, H, W) or (B, 3, H, W), got {what}"
            )
        batched = image.ndim == 4
        t = image if batched else image[None]
        channels = t.shape[1]
        is_numpy, dtype, device = False, image.dtype, image.device
    else:
        raise TypeError(f"`{arg}` has the wrong type: expected a numpy array or a torch tensor, got {_describe(image)}")

    if channels not in (3, 4):
        hint = " (grayscale)" if channels == 1 else ""
        layout = "(..., H, W, 3)" if is_numpy else "(..., 3, H, W)"
        raise InvalidImageError(
            f"`{arg}` has the wrong number of channels{hint}: expected 3 (RGB) or 4 (RGBA, opaque) in layout "
            f"{layout}, got {channels} channels in {_describe(image)}"
        )

    spec = ImageSpec(is_numpy=is_numpy, batched=batched, dtype=dtype, device=device, alpha=None)
    if channels == 4:
        alpha = t[:, 3:4]
        opaque = 255 if t.dtype == torch.uint8 else 1.0
        if alpha.numel() and not bool((alpha == opaque).all()):
            raise InvalidImageError(
                f"`{arg}` has a translucent alpha channel: expected RGBA with alpha = {opaque} everywhere "
                f"(fully opaque), got alpha in [{alpha.min().item()}, {alpha.max().item()}]"
            )
        spec.alpha = alpha.clone()
        t = t[:, :3]

    cdtype = spec.compute_dtype
    u8 = None
    if t.dtype == torch.uint8:
        t = u8 = t.contiguous()  # bytes: cheap, and the float pass below then writes a contiguous tensor
        if cdtype == torch.float64:
            x = t.to(cdtype).div_(255.0)
        elif out is not None and out.shape == t.shape and out.dtype == cdtype and out.device == t.device and out.is_contiguous():
            x = out.copy_(t).mul_(1.0 / 255.0)  # into reused memory; the same values as the line below
        else:
            x = t * (1.0 / 255.0)  # one pass, a new tensor
    else:
        x = t.to(cdtype)
        if x.numel():
            lo, hi = torch.aminmax(x)  # one pass; NaN propagates and fails both tests
            if not (bool(lo >= 0) and bool(hi <= 1)):
                finite = torch.isfinite(x)
                n_nonfinite = int((~finite).sum())
                if n_nonfinite:
                    raise InvalidImageError(
                        f"`{arg}` has non-finite values: expected finite floats in [0, 1], got {n_nonfinite} NaN/Inf "
                        f"values in {_describe(image)}"
                    )
                raise InvalidImageError(
                    f"`{arg}` has floats outside [0, 1]: expected values in [0, 1] (divide 8-bit data by 255 or "
                    f"pass uint8), got range [{x.min().item():.4g}, {x.max().item():.4g}] in {_describe(image)}"
                )
    if x.data_ptr() == t.data_ptr() and x.numel():
        # Same storage as the caller's data (float input of the compute dtype): hand out a copy-on-write
        # guarantee by cloning, so no later operation can touch the caller's memory.
        x = x.clone()
    return x.contiguous(), spec, u8


def _planar_u8(arr: np.ndarray) -> np.ndarray:
    """``(B, H, W, C)`` uint8 to a new C-contiguous ``(B, C, H, W)`` (C = 3 or 4), by ``cv2.split``."""
    import cv2

    b, h, w, c = arr.shape
    planes = cv2.split(np.ascontiguousarray(arr).reshape(b, h * w, c))
    return np.stack(planes, axis=1).reshape(b, c, h, w)


def _to_u8(y: torch.Tensor) -> torch.Tensor:
    """``round(255·y)`` as uint8 for ``y`` in ``[0, 1]`` (rounding half to even, as ``torch.round``)."""
    if y.device.type == "cpu" and y.dtype == torch.float32 and y.is_contiguous() and y.numel() and y.ndim >= 2:
        import cv2

        src = y.detach().numpy().reshape(-1, y.shape[-1])
        dst = np.empty(src.shape, dtype=np.uint8)
        cv2.convertScaleAbs(src, dst, 255.0)  # one SIMD pass: scale, round, saturate (y ≥ 0, so |·| is a no-op)
        return torch.from_numpy(dst).reshape(y.shape)
    return y.mul_(255.0).round_().to(torch.uint8)  # y is always our own tensor here


def _interleave_u8(planar: np.ndarray, out: np.ndarray) -> None:
    """Write ``(B, C, H, W)`` uint8 into the C-contiguous ``(B, H, W, C)`` array ``out``, by ``cv2.merge``."""
    import cv2

    b, c, h, w = planar.shape
    dst = out.reshape(b, h * w, c)  # a view: ``out`` is contiguous
    res = cv2.merge([planar[:, k].reshape(b, h * w) for k in range(c)], dst)
    if not np.shares_memory(res, dst):  # OpenCV reallocated: copy (not expected for a matching dst)
        dst[...] = res.reshape(dst.shape)


def from_batch(x: torch.Tensor, spec: ImageSpec, out: Any = None, consume: bool = False) -> Any:
    """Return ``x`` (``(B, 3, H, W)`` float in ``[0, 1]``) in the caller's format described by ``spec``.

    Values are clamped to ``[0, 1]`` (and NaN mapped to 0 as a last guard); ``uint8`` outputs are
    rounded. With ``out`` (an array or tensor already in the caller's format, shape and dtype), the result
    is written into it and ``out`` is returned. ``consume=True`` allows ``x`` to be overwritten (saves a copy).
    """
    if consume and not x.requires_grad:
        y = torch.nan_to_num_(x, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)
    else:
        y = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)  # a new tensor
    target_dtype = spec.dtype
    if spec.is_numpy:
        torch_dtype = {
            np.dtype(np.uint8): torch.uint8,
            np.dtype(np.float16): torch.float16,
            np.dtype(np.float32): torch.float32,
            np.dtype(np.float64): torch.float64,
        }[np.dtype(target_dtype)]
    else:
        torch_dtype = target_dtype
    if torch_dtype == torch.uint8:
        y = _to_u8(y)
    else:
        y = y.to(torch_dtype)
    if spec.alpha is not None:
        y = torch.cat([y, spec.alpha.to(y.device)], dim=1)
    y = y.to(spec.device)
    if not spec.batched:
        y = y[0]
    if spec.is_numpy:
        yb = y if spec.batched else y[None]
        if out is None:
            out = np.empty((yb.shape[0], *yb.shape[2:], yb.shape[1]), dtype=yb.numpy().dtype)
            out = out if spec.batched else out[0]
        if torch_dtype == torch.uint8 and yb.numel() and yb.shape[1] in (3, 4) and out.flags.c_contiguous:
            _interleave_u8(yb.numpy(), out if spec.batched else out[None])  # OpenCV's SIMD interleave
        else:
            torch.from_numpy(out if spec.batched else out[None]).copy_(yb.permute(0, 2, 3, 1))
        return out
    if out is not None:
        return out.copy_(y)
    return y


#: On CPU, batches are processed in chunks of about this many pixels (8 tiles of 224²): every step is
#: memory-bound there, so intermediates that stay in cache are faster, and tiles are independent.
CPU_CHUNK_PIXELS = 8 * 224 * 224


def cpu_chunk_size(height: int, width: int, chunk_pixels: int = CPU_CHUNK_PIXELS) -> int:
    """Tiles per CPU chunk for tiles of ``height × width`` (at least 1)."""
    return max(1, int(chunk_pixels) // max(1, int(height) * int(width)))


_HEAP_WARMED = [0]


def raise_heap_thresholds(chunk_bytes: int) -> None:
    """Let the allocator keep a chunk's temporaries between chunks instead of returning them to the OS.

    glibc serves large blocks with mmap and trims the heap top once more than twice its mmap threshold is free;
    after an mmapped block is freed it raises that threshold to the block's size (its documented dynamic
    threshold, up to 32 MiB). Without this, every chunk's first large temporaries come from fresh pages, whose
    page faults cost about as much as the arithmetic (docs/benchmarks.md, "Where the time goes").
    One block of four chunk-sized tensors, allocated and freed once per process, sets the threshold accordingly.
    """
    size = min(4 * int(chunk_bytes), 32 << 20)
    if size > _HEAP_WARMED[0]:
        _HEAP_WARMED[0] = size
        torch.empty(size, dtype=torch.uint8)  # allocated and immediately freed


def map_batch(fn: Callable[..., torch.Tensor], image: Any, arg: str = "images",
              chunk_pixels: int = CPU_CHUNK_PIXELS, with_uint8: bool = False) -> Any:
    """Apply a per-tile computation to ``image`` and return its result in the caller's format.

    ``fn(x, lo, hi)`` receives tiles ``lo:hi`` as a float ``(hi - lo, 3, H, W)`` batch in ``[0, 1]`` (see
    :func:`to_batch`; it must not modify ``x`` in place, and ``x``'s memory is reused for the next chunk) and
    returns a float batch of the same shape, which is consumed (it may be overwritten). On CPU
    the input is converted, processed and converted back chunk by chunk (about ``chunk_pixels`` pixels at a
    time) straight into one output allocated in the caller's format: no full-size float copy of the batch
    is ever made, and every intermediate stays cache-sized. Elsewhere ``fn`` sees the whole batch. ``fn``
    must treat tiles independently (a tile's output may not depend on its chunk mates), so that the result
    does not depend on the chunking. With ``with_uint8=True`` it is called as ``fn(x, lo, hi, u8)``, where
    ``u8`` is the same tiles as a contiguous ``(hi - lo, 3, H, W)`` uint8 tensor when the input is uint8 (for
    lookup tables: 256 values instead of a transcendental per pixel), else None.
    """
    on_cpu = isinstance(image, np.ndarray) or (isinstance(image, torch.Tensor) and image.device.type == "cpu")
    chunked = on_cpu and image.ndim == 4
    if chunked:
        to_batch(image[:0], arg)  # dtype and channel checks once, on an empty slice
        b = image.shape[0]
        h, w = image.shape[1:3] if isinstance(image, np.ndarray) else image.shape[2:4]
        step = cpu_chunk_size(h, w, chunk_pixels)
        chunked = b > step
    call = (lambda x, lo, hi, u8: fn(x, lo, hi, u8)) if with_uint8 else (lambda x, lo, hi, u8: fn(x, lo, hi))
    if not chunked:
        x, spec, u8 = _to_batch(image, arg, None)
        return from_batch(call(x, 0, x.shape[0], u8), spec)
    out = buf = None
    raise_heap_thresholds(step * 3 * h * w * 4)
    for lo in range(0, b, step):
        hi = min(b, lo + step)
        x, spec, u8 = _to_batch(image[lo:hi], arg, None if buf is None else buf[: hi - lo])
        if buf is None and x.shape[0] == step:
            buf = x  # uint8 chunks are converted into this memory from now on (fresh memory costs page faults)
        y = call(x, lo, hi, u8)
        if out is None:
            channels = 3 if spec.alpha is None else 4
            if spec.is_numpy:
                out = np.empty((b, h, w, channels), dtype=spec.dtype)
            else:
                out = torch.empty((b, channels, h, w), dtype=spec.dtype, device=spec.device)
        from_batch(y, spec, out=out[lo:hi], consume=True)
        del y  # release before the next chunk allocates
    return out


_TABLES: dict = {}


def lookup_uint8(u8: torch.Tensor, key: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` of the float values of 8-bit pixels, by a 256-entry table, as float32 of ``u8``'s shape.

    ``fn`` is evaluated once per ``key`` (cached) on the 256 float32 values the image contract gives uint8 pixels
    (``k · (1/255)``, exactly :func:`to_batch`'s), so a pixel gets what ``fn`` gives its float value; one table read
    replaces the per-pixel arithmetic. CPU tensors use OpenCV's ``LUT``, others an index.
    """
    lut = _TABLES.get(key)
    if lut is None:
        lut = fn(torch.arange(256, dtype=torch.uint8) * (1.0 / 255.0)).to(torch.float32).contiguous()
        _TABLES[key] = lut
    if u8.device.type == "cpu" and u8.is_contiguous() and u8.numel():
        import cv2

        src = u8.numpy().reshape(-1, u8.shape[-1])
        dst = np.empty(src.shape, dtype=np.float32)
        cv2.LUT(src, lut.numpy(), dst)
        return torch.from_numpy(dst).reshape(u8.shape)
    return lut.to(u8.device)[u8.long()]


def as_float_batch(image: Any, arg: str = "images") -> torch.Tensor:
    """Shortcut: validate ``image`` and return only the float ``(B, 3, H, W)`` batch."""
    return to_batch(image, arg)[0]
