"""Reading plain image files: the lowest-level file input, shared by every layer that reads images (the
transforms' ``from_images`` folder reader, the built-in shifts' bundled targets, :mod:`shiftkit.data`).
uint8 RGB at the boundary; see :mod:`shiftkit.core.image`."""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

from .errors import InvalidImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

PathLike = Union[str, os.PathLike]

#: Default limit on the pixels of one plain image (64 MP), checked from the file header before decoding.
#: ``SHIFTKIT_MAX_PIXELS`` in the environment changes the default; whole-slide images go through
#: ``shiftkit tile``, which reads regions.
DEFAULT_MAX_PIXELS = 64_000_000


def default_max_pixels() -> int:
    """The pixel limit in force: ``SHIFTKIT_MAX_PIXELS`` if set (a positive integer), else 64 MP."""
    env = os.environ.get("SHIFTKIT_MAX_PIXELS", "").strip()
    if env:
        try:
            value = int(float(env))
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"`SHIFTKIT_MAX_PIXELS` is invalid: expected a positive integer, got {env!r}")
        return value
    return DEFAULT_MAX_PIXELS


def image_header(path: PathLike) -> tuple:
    """``((width, height) or None, ICC profile bytes or None)`` from one read of the file header (no pixel is
    decoded); the size is None when Pillow cannot parse the header."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: the caller applies its own limit
            with Image.open(path) as im:
                icc = im.info.get("icc_profile")
                return tuple(int(v) for v in im.size), (bytes(icc) if icc else None)
    except Image.DecompressionBombError as exc:
        nums = [int(v) for v in re.findall(r"\d+", str(exc))]
        return ((nums[0], 1) if nums else (1 << 31, 1)), None
    except Exception:
        return None, None


def image_size(path: PathLike) -> Optional[tuple]:
    """``(width, height)`` from the file header (no pixel is decoded), or None when Pillow cannot parse it."""
    return image_header(path)[0]


class ImageReadError(InvalidImageError, OSError):
    """A file could not be read as an 8-bit RGB image."""


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_icc(path: PathLike) -> Optional[bytes]:
    """The ICC colour profile embedded in an image file (PNG, JPEG, TIFF), or None (Pillow reads the header only)."""
    return image_header(path)[1]


#: The IJG (libjpeg) luminance quantization table at quality 50, natural order (ITU-T T.81, Annex K, table K.1).
IJG_LUMINANCE = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                 14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)


def ijg_luminance_table(quality: int) -> np.ndarray:
    """The luminance quantization table libjpeg writes at ``quality`` (1–100; its integer scaling, baseline-clamped
    to 1–255), natural order."""
    q = int(quality)
    scale = 5000 // q if q < 50 else 200 - 2 * q
    return np.clip((np.asarray(IJG_LUMINANCE) * scale + 50) // 100, 1, 255)


def jpeg_quality(path: PathLike) -> Optional[dict]:
    """The JPEG quality of a file, from its luminance quantization table (the file header only; no pixel is
    decoded): ``{"quality": q, "exact": bool, "mean_abs_error": e}`` with ``q`` the IJG quality (1–100, the scale of
    libjpeg, OpenCV and Pillow) whose table is nearest, ``exact`` when it is that table exactly (an encoder with its
    own tables gets the nearest IJG quality). None for a file that is not a JPEG or has no table."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                if im.format != "JPEG":
                    return None
                tables = getattr(im, "quantization", None) or {}
                table = np.asarray(tables.get(0, []), np.float64)
    except Exception:
        return None
    if table.size != 64:
        return None
    errors = {q: float(np.abs(table - ijg_luminance_table(q)).mean()) for q in range(100, 0, -1)}
    best = min(errors, key=lambda q: (errors[q], -q))  # equal tables: the higher quality
    return {"quality": best, "exact": errors[best] == 0.0, "mean_abs_error": round(errors[best], 4)}


def icc_description(icc: Optional[bytes]) -> str:
    """A profile's description (e.g. ``"sRGB IEC61966-2.1"``), ``""`` for none, ``"unreadable"`` for a broken one."""
    if not icc:
        return ""
    from PIL import ImageCms

    try:
        return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip() or "unnamed"
    except Exception:
        return "unreadable"


def icc_transform(icc: bytes):
    """A function converting ``(H, W, 3)`` uint8 in the colour space of profile ``icc`` to sRGB (LittleCMS through
    Pillow's ImageCms, perceptual intent), built once for many images (e.g. every region of a slide). Raises
    :class:`ImageReadError` when the profile cannot be used."""
    from PIL import Image, ImageCms

    try:
        transform = ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"),
                                            "RGB", "RGB")
    except Exception as exc:
        raise ImageReadError(f"the embedded ICC profile cannot be applied: expected an RGB input profile, got "
                             f"{icc_description(icc)!r} ({type(exc).__name__})") from None

    def to_srgb(image: np.ndarray) -> np.ndarray:
        out = ImageCms.applyTransform(Image.fromarray(np.ascontiguousarray(image)), transform)
        return np.array(out, dtype=np.uint8)  # a writable copy (Pillow's buffer is read-only)

    return to_srgb


def icc_to_srgb(image: np.ndarray, icc: bytes) -> np.ndarray:
    """``(H, W, 3)`` uint8 in the colour space of profile ``icc``, converted to sRGB (:func:`icc_transform`)."""
    return icc_transform(icc)(image)


def read_image(path: PathLike, *, max_pixels: Optional[int] = None, apply_icc: bool = False,
               info: Optional[dict] = None) -> np.ndarray:
    """Read an 8-bit RGB image as ``(H, W, 3)`` uint8.

    RGBA with a fully opaque alpha is converted to RGB; anything else (missing, empty, corrupt, grayscale,
    16-bit, translucent alpha, a dangling link, more than ``max_pixels`` pixels — default
    :func:`default_max_pixels`, checked from the header before decoding) raises :class:`ImageReadError` naming the
    file, what was expected and what came. ``apply_icc=True`` converts an image with an embedded ICC profile to
    sRGB (:func:`icc_to_srgb`); images without one are returned as stored. A dict given as ``info`` receives
    ``"sha256"`` (of the file's bytes, the ones decoded) and ``"icc"`` (the embedded profile or None), so that a
    caller needs no second read of the file.
    """
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise ImageReadError(f"`{p}` is a dangling symbolic link: expected an existing image file, got a link to {os.readlink(p)!r}")
    if not p.is_file():
        raise ImageReadError(f"`{p}` cannot be read: expected an existing image file, got no such file")
    if p.stat().st_size == 0:
        raise ImageReadError(f"`{p}` cannot be read: expected an 8-bit RGB image, got an empty (0-byte) file")
    limit = default_max_pixels() if max_pixels is None else int(max_pixels)
    size, icc = image_header(p)
    if size is not None and size[0] * size[1] > limit:
        raise ImageReadError(f"`{p}` is too large: expected at most {limit:,} pixels (--max-pixels, SHIFTKIT_MAX_PIXELS; "
                             f"cut large images with `shiftkit tile`), got {size[0]}x{size[1]} = {size[0] * size[1]:,}")
    data = np.fromfile(str(p), dtype=np.uint8)
    if info is not None:
        import hashlib

        info.update(sha256=hashlib.sha256(data).hexdigest(), icc=icc)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(f"`{p}` cannot be decoded: expected a PNG/JPEG/TIFF 8-bit RGB image, got a corrupt or unsupported file")
    if img.dtype != np.uint8:
        raise ImageReadError(f"`{p}` has the wrong bit depth: expected 8-bit RGB, got {img.dtype}")
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        raise ImageReadError(f"`{p}` is grayscale: expected an 8-bit RGB image, got shape {img.shape}")
    if img.shape[2] == 4:
        if not (img[..., 3] == 255).all():
            raise ImageReadError(f"`{p}` has a translucent alpha channel: expected RGB or opaque RGBA, got alpha min {int(img[..., 3].min())}")
        rgb = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)  # OpenCV's channel swap: the same bytes as a reversed copy, ~30x faster
    elif img.shape[2] == 3:
        rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    else:
        raise ImageReadError(f"`{p}` has {img.shape[2]} channels: expected 3 (RGB)")
    if apply_icc and icc:
        try:
            rgb = icc_to_srgb(rgb, icc)
        except ImageReadError as exc:
            raise ImageReadError(f"`{p}`: {exc}") from None
    return rgb


def list_images(folder: PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (sorted, by suffix; hidden names skipped).

    Symbolic links with an image suffix are listed even when they dangle, so that a run reports them as
    failures instead of skipping them without a word.
    """
    root = Path(folder)
    it = root.rglob("*") if recursive else root.glob("*")
    return sorted(p for p in it if (p.is_file() or (p.is_symlink() and not p.exists()))
                  and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


#: The bundled sample images (``shiftkit/data/samples``; origins and licences in its ``SOURCES.txt``).
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "data" / "samples"
SAMPLES = {
    "stardist": "stardist_histo.jpg",
    "slideflow": "slideflow_norm_tile.jpg",
    "wsidicom": "wsidicom_test_tile.png",
}


def sample_path(name: str) -> Path:
    """Path of a bundled sample image: ``"stardist"`` (500×300), ``"slideflow"`` (299×299), ``"wsidicom"`` (240×240)."""
    from .errors import UnknownNameError

    if name not in SAMPLES:
        raise UnknownNameError("name", name, SAMPLES)
    return SAMPLES_DIR / SAMPLES[name]
