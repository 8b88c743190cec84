import os
from pathlib import Path

import numpy as np
import pytest
import torch

from shiftkit.data import read_image

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SHIFTKIT_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(int(os.environ.get("SHIFTKIT_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))


def _bundled_copies() -> dict:
    """Shared images that ship, byte for byte, inside installed packages (ours or scikit-image's)."""
    import skimage

    samples = REPO / "shiftkit" / "data" / "samples"
    return {
        ("pypi_wsidicom", "test_tile.png"): samples / "wsidicom_test_tile.png",
        ("pypi_stardist", "histo.jpg"): samples / "stardist_histo.jpg",
        ("pypi_slideflow", "norm_tile.jpg"): samples / "slideflow_norm_tile.jpg",
        ("pypi_skimage_ihc_not_he", "ihc.png"): Path(skimage.__file__).parent / "data" / "ihc.png",
    }


def shared(*parts) -> Path:
    """Path under ../shared/data, or the identical bundled copy (tests/test_readme.py checks they are identical);
    the test is skipped cleanly where neither exists."""
    p = DATA.joinpath(*parts)
    if p.exists():
        return p
    copy = _bundled_copies().get(tuple(parts))
    if copy is not None and copy.exists():
        return copy
    pytest.skip(f"shared data not available: {p}")


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return out


@pytest.fixture
def real_tile():
    """A 224x224 uint8 H&E tile from the bundled samples."""
    from shiftkit.data import load_sample_tiles

    return load_sample_tiles()[0]


@pytest.fixture
def edge_tiles(real_tile):
    """Degenerate 224x224 tiles: white, black, 5 % tissue (real tissue pasted on white)."""
    white = np.full((224, 224, 3), 255, np.uint8)
    black = np.zeros((224, 224, 3), np.uint8)
    five = white.copy()
    five[:50, :50] = real_tile[:50, :50]  # 2500 px = 5.0 %
    return {"white": white, "black": black, "five": five}


def load_real(path: Path, size: int = 224) -> np.ndarray:
    img = read_image(path)
    return img[:size, :size]
