import os
from pathlib import Path

import numpy as np
import pytest
import torch

from shiftkit.data import read_image

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SHIFTKIT_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(int(os.environ.get("SHIFTKIT_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))


def shared(*parts) -> Path:
    """Path under ../shared/data; the test is skipped cleanly where the folder is absent."""
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not available: {p}")
    return p


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
