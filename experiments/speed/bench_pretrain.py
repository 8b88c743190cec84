"""Pretraining speed: images/s of ``shiftkit pretrain`` and the cost of its views as a fraction of a step, next to
lightly's own ``DINOTransform`` (torchvision on PIL images, per image, the usual DataLoader-side pipeline).

    python experiments/speed/bench_pretrain.py [--device cuda] [--steps 12] [--json out.json]

Workloads, one process, real 224² tiles (Camelyon17 / scanner crops, else the bundled tiles):

* **views**: making the multi-crop views of one batch (2 global + n local): shiftkit's ``MultiCropAugment`` on the
  batch tensor (``dino`` preset = geometry + colour only; ``shiftkit`` preset = + StainAugment + RandomScanner)
  vs lightly ``DINOTransform`` applied image by image to PIL images. Reported in images/s.
* **training**: ``pretrain()`` for ``--steps`` steps (the first two are warm-up and excluded) with the recipe of
  the device (``cpu-small`` on CPU, ``vit-s16`` at batch 256 on CUDA); median images/s and the median fraction
  of a step spent making views (``augment_s / step_s`` from the run log, with CUDA synchronised around it).

The issue's target: views < 10 % of a step on CUDA for ViT-S/16 at batch 256 with StainAugment + RandomScanner.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_normalize import machine, tiles_224, timed  # noqa: E402

warnings.filterwarnings("ignore")


def bench_views(device: str, batch: int, recipe: dict, passes: int) -> dict:
    from PIL import Image
    from lightly.transforms.dino_transform import DINOTransform

    from shiftkit.train import MultiCropAugment

    tiles = tiles_224(batch)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    out = {}
    for preset in ("dino", "shiftkit"):
        aug = MultiCropAugment(2, recipe["n_local"], recipe["global_size"], recipe["local_size"], augment=preset, seed=0)
        step = {"i": 0}

        def run():
            step["i"] += 1
            v = aug(x.to(device).float().div_(255), step=step["i"])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return v

        t = timed(run, passes)
        out[f"shiftkit MultiCropAugment({preset})"] = batch / t
    lt = DINOTransform(global_crop_size=recipe["global_size"], local_crop_size=recipe["local_size"],
                       n_local_views=recipe["n_local"], solarization_prob=0.0)
    pil = [Image.fromarray(t) for t in tiles]
    t = timed(lambda: [lt(im) for im in pil], max(1, passes // 2))
    out["lightly DINOTransform (per image, PIL)"] = batch / t
    return out


def bench_training(device: str, steps: int, batch: int, recipe_name: str) -> dict:
    from shiftkit.data.io import write_image
    from shiftkit.train import PretrainConfig, pretrain

    tiles = tiles_224(min(256, batch * 2))
    res = {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "tiles"
        root.mkdir()
        for i, t in enumerate(tiles):
            write_image(root / f"{i:04d}.png", t)
        for preset in ("dino", "shiftkit"):
            out = Path(d) / preset
            cfg = PretrainConfig(data=str(root), out=str(out), recipe=recipe_name, steps=steps, batch_size=batch,
                                 augment=preset, checkpoint_every=0, workers=2, device=device)
            t0 = time.perf_counter()
            pretrain(cfg)
            wall = time.perf_counter() - t0
            log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if '"loss"' in l][2:]
            res[preset] = {"images_per_s": statistics.median(e["images_per_s"] for e in log),
                           "augment_fraction": statistics.median(e["augment_s"] / e["step_s"] for e in log),
                           "data_wait_s": statistics.median(e["data_wait_s"] for e in log),
                           "steps_timed": len(log), "wall_s": wall}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from shiftkit.train import RECIPES

    recipe_name = "vit-s16" if a.device.startswith("cuda") else "cpu-small"
    recipe = RECIPES[recipe_name]
    batch = recipe["batch_size"]
    res = {"machine": machine(a.device), "device": a.device, "recipe": recipe_name, "batch": batch}
    res["views_images_per_s"] = bench_views(a.device, batch, recipe, a.passes)
    res["training"] = bench_training(a.device, a.steps, batch, recipe_name)
    v = res["views_images_per_s"]
    peer = v["lightly DINOTransform (per image, PIL)"]
    print(json.dumps(res["machine"]))
    print(f"views, batch {batch}, recipe {recipe_name} ({a.device}):")
    for k, val in v.items():
        print(f"  {k:45s} {val:9.1f} img/s   ({val / peer:5.2f}x lightly)")
    for preset, r in res["training"].items():
        print(f"training --augment {preset:8s}: {r['images_per_s']:8.1f} img/s, views {100 * r['augment_fraction']:5.1f} % "
              f"of a step, data wait {r['data_wait_s'] * 1000:.0f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
