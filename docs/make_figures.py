"""Generate the picture grids of docs/augmentation.md: original, light, medium, strong on bundled tiles.

    python docs/make_figures.py          # writes docs/img/*.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import shiftkit
from shiftkit.data import load_sample_tiles

OUT = Path(__file__).resolve().parent / "img"


def grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of (N, 3, H, W) tensors → one uint8 HWC image with 4-px white gutters."""
    pad = 4
    n, _, h, w = rows[0].shape
    canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c in range(n):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y : y + h, x : x + w] = (row[c].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    return canvas


def main() -> None:
    from shiftkit.data import write_image

    OUT.mkdir(parents=True, exist_ok=True)
    tiles = load_sample_tiles()
    x = torch.from_numpy(tiles[[0, 4, 9, 13]]).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(160, 160), mode="area")
    stats = shiftkit.fit_stain_statistics(list(tiles))
    makers = {
        "stain_augment": lambda preset: shiftkit.StainAugment(preset=preset, seed=0),
        "hed_jitter": lambda preset: shiftkit.HEDJitter(preset=preset, seed=0),
        "stain_template_sample": lambda preset: shiftkit.StainTemplateSample(stats, preset=preset, seed=0),
    }
    for name, make in makers.items():
        rows = [x] + [make(p)(x) for p in ("light", "medium", "strong")]
        write_image(OUT / f"{name}.png", grid(rows))
        print("wrote", OUT / f"{name}.png")
    norm = shiftkit.StainNormalize(shiftkit.StainNormalizer("macenko").fit(shiftkit.data.load_sample("slideflow")))
    write_image(OUT / "stain_normalize.png", grid([x, norm(x)]))
    print("wrote", OUT / "stain_normalize.png")


if __name__ == "__main__":
    main()
