"""Bundled sample H&E images (see ``samples/SOURCES.txt`` for origins and licences)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import UnknownNameError
from .io import list_images, read_image

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
_SAMPLES = {
    "stardist": "stardist_histo.jpg",
    "slideflow": "slideflow_norm_tile.jpg",
    "wsidicom": "wsidicom_test_tile.png",
}


def sample_path(name: str) -> Path:
    """Path of a bundled sample image: ``"stardist"`` (500×300), ``"slideflow"`` (299×299), ``"wsidicom"`` (240×240)."""
    if name not in _SAMPLES:
        raise UnknownNameError("name", name, _SAMPLES)
    return SAMPLES_DIR / _SAMPLES[name]


def load_sample(name: str) -> np.ndarray:
    """A bundled sample image as ``(H, W, 3)`` uint8 RGB."""
    return read_image(sample_path(name))


def sample_tiles_dir() -> Path:
    """Folder of the 18 bundled 224×224 H&E tiles (ovarian carcinoma nest and stroma, histolytics, BSD-3)."""
    return SAMPLES_DIR / "tiles"


def load_sample_tiles() -> np.ndarray:
    """The bundled 224×224 tiles as one ``(18, 224, 224, 3)`` uint8 batch."""
    return np.stack([read_image(p) for p in list_images(sample_tiles_dir())])
