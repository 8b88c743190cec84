"""Reading and writing tiles (uint8 RGB at the boundary; see :mod:`shiftkit.core.image`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from ..core.errors import InvalidImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

PathLike = Union[str, os.PathLike]


class ImageReadError(InvalidImageError, OSError):
    """A file could not be read as an 8-bit RGB image."""


def read_image(path: PathLike) -> np.ndarray:
    """Read an 8-bit RGB image as ``(H, W, 3)`` uint8.

    RGBA with a fully opaque alpha is converted to RGB; anything else (missing, empty, corrupt, grayscale,
    16-bit, translucent alpha) raises :class:`ImageReadError` naming the file, what was expected and what came.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"`{p}` cannot be read: expected an existing image file, got no such file")
    if p.stat().st_size == 0:
        raise ImageReadError(f"`{p}` cannot be read: expected an 8-bit RGB image, got an empty (0-byte) file")
    data = np.fromfile(str(p), dtype=np.uint8)
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
        img = img[..., :3]
    if img.shape[2] != 3:
        raise ImageReadError(f"`{p}` has {img.shape[2]} channels: expected 3 (RGB)")
    return np.ascontiguousarray(img[..., ::-1])


def write_image(path: PathLike, image: np.ndarray, *, quality: int = 95) -> None:
    """Write ``(H, W, 3)`` uint8 RGB atomically (temporary file in the same folder, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = p.suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if suffix in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(suffix if suffix in IMAGE_SUFFIXES else ".png", np.ascontiguousarray(image[..., ::-1]), params)
    if not ok:
        raise OSError(f"`{p}` could not be encoded as {suffix}")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=str(p.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.tobytes())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def list_images(folder: PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (sorted, by suffix)."""
    root = Path(folder)
    it = root.rglob("*") if recursive else root.glob("*")
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
