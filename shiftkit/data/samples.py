"""Bundled sample H&E images (see ``samples/SOURCES.txt`` for origins and licences)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.files import SAMPLES_DIR, list_images, read_image, sample_path  # noqa: F401  (re-exported)


def load_sample(name: str) -> np.ndarray:
    """A bundled sample image as ``(H, W, 3)`` uint8 RGB."""
    return read_image(sample_path(name))


def sample_tiles_dir() -> Path:
    """Folder of the 18 bundled 224×224 H&E tiles (ovarian carcinoma nest and stroma, histolytics, BSD-3)."""
    return SAMPLES_DIR / "tiles"


def load_sample_tiles() -> np.ndarray:
    """The bundled 224×224 tiles as one ``(18, 224, 224, 3)`` uint8 batch."""
    return np.stack([read_image(p) for p in list_images(sample_tiles_dir())])
