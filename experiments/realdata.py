"""Crops of the real multi-scanner and multi-centre images in ../shared/data, shared by the experiments.

* ``scanner_crops()``: ``{scanner: (4, 3, 112, 112) float}``, a 2 × 2 grid of 112² crops of the same region
  (../shared/data/scanners5_same_region), in the same grid order for every scanner (pairs by position).
* ``camelyon_crops()``: ``{centre: (4·tiles, 3, 224, 224) float}``, the four 224² corners of each 512² tile of
  ../shared/data/camelyon17_5centers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from shiftkit.data import read_image

DATA = Path(os.environ.get("SHIFTKIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _tensor(crops) -> torch.Tensor:
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255


def scanner_crops() -> dict:
    out = {}
    for p in sorted((DATA / "scanners5_same_region").glob("*.png")):
        img = read_image(p)
        out[p.stem] = _tensor([img[gy * 112:gy * 112 + 112, gx * 112:gx * 112 + 112] for gy in range(2) for gx in range(2)])
    return out


def camelyon_crops() -> dict:
    crops: dict = {}
    for p in sorted((DATA / "camelyon17_5centers").glob("center*.png")):
        img = read_image(p)
        crops.setdefault(p.stem.split("_")[0], []).extend(img[y:y + 224, x:x + 224] for y in (0, 288) for x in (0, 288))
    return {k: _tensor(v) for k, v in crops.items()}
