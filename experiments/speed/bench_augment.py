"""Stain-augmentation speed: shiftkit next to staintools, tiatoolbox, albumentations HEStain, torchstain and
torch-staintools on the same 224² real tiles (batch 64), one process, median of passes after a warm-up.

    python experiments/speed/bench_augment.py [--device cuda] [--json out.json]

Workloads with **per-tile stain estimation** (the peer is called the way its users call it, tile by tile unless
it has a batch API): shiftkit StainAugment(macenko|vahadane) vs staintools StainAugmentor, tiatoolbox
StainAugmentor (a new object per tile; reusing one silently reuses the first tile's matrix), albumentations
HEStain(method="macenko"), torchstain MacenkoAugmentor and torch-staintools' augmentor. Workloads **without
estimation**: shiftkit HEDJitter and StainAugment(method="fixed") vs albumentations HEStain("random_preset").
The uint8 → float conversion is inside shiftkit's timed region.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_normalize import machine, tiles_224, timed  # noqa: E402

warnings.filterwarnings("ignore")



def shiftkit_runs(device):
    import shiftkit
    from shiftkit.stain import reference_stain_matrix

    def wrap(t):
        t = t.to(device)

        def run(batch):
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255)
            y = t(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return y

        return run

    return {
        "estimate/macenko": ("shiftkit StainAugment(macenko)", wrap(shiftkit.StainAugment(method="macenko", preset="medium", seed=0))),
        "estimate/vahadane": ("shiftkit StainAugment(vahadane)", wrap(shiftkit.StainAugment(method="vahadane", preset="medium", seed=0))),
        "no-estimate": [
            ("shiftkit HEDJitter", wrap(shiftkit.HEDJitter(preset="medium", seed=0))),
            ("shiftkit StainAugment(fixed)", wrap(shiftkit.StainAugment(method="fixed", matrix=reference_stain_matrix("macenko"), preset="medium", seed=0))),
        ],
    }


def peer_runs(device):
    runs = {"estimate/macenko": [], "estimate/vahadane": [], "no-estimate": []}
    try:
        import staintools

        def st(method):
            def run(batch):
                for t in batch:
                    a = staintools.StainAugmentor(method=method, sigma1=0.2, sigma2=0.2)
                    a.fit(t)
                    a.pop()
            return run

        runs["estimate/macenko"].append(("staintools StainAugmentor(macenko)", st("macenko"), 16))
        runs["estimate/vahadane"].append(("staintools StainAugmentor(vahadane)", st("vahadane"), 3))
    except ImportError as exc:
        print("missing staintools:", exc)
    try:
        from tiatoolbox.tools.stainaugment import StainAugmentor as TiaAug

        def tia(method):
            def run(batch):
                for t in batch:  # a new object per tile: one object reuses the first tile's matrix
                    a = TiaAug(method=method, sigma1=0.4, sigma2=0.2, augment_background=False)
                    a.fit(t)
                    a.augment()
            return run

        runs["estimate/macenko"].append(("tiatoolbox StainAugmentor(macenko)", tia("macenko"), 16))
        runs["estimate/vahadane"].append(("tiatoolbox StainAugmentor(vahadane)", tia("vahadane"), 8))
    except ImportError as exc:
        print("missing tiatoolbox:", exc)
    try:
        import albumentations as A

        if hasattr(A, "HEStain"):
            for method, key in (("macenko", "estimate/macenko"), ("vahadane", "estimate/vahadane"), ("random_preset", "no-estimate")):
                aug = A.HEStain(method=method, p=1.0)
                runs[key].append((f"albumentations HEStain({method})", lambda batch, aug=aug: [aug(image=t) for t in batch], 16))
    except ImportError as exc:
        print("missing albumentations:", exc)
    try:
        import torchstain

        def ts(batch):
            a = torchstain.augmentors.MacenkoAugmentor(backend="torch", sigma1=0.2, sigma2=0.2)
            for t in batch:
                a.fit(torch.from_numpy(t).permute(2, 0, 1).float())
                a.augment()
        runs["estimate/macenko"].append(("torchstain MacenkoAugmentor", ts, 16))
    except ImportError as exc:
        print("missing torchstain:", exc)
    try:
        from torch_staintools.augmentor import AugmentorBuilder

        for method, key, n in (("macenko", "estimate/macenko", 64), ("vahadane", "estimate/vahadane", 8)):
            aug = AugmentorBuilder.build(method, rng=0, use_cache=False, device=torch.device(device)).to(device)

            def run(batch, aug=aug):
                y = aug(torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float() / 255)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                return y
            runs[key].append((f"torch-staintools augmentor({method})", run, n))
    except ImportError as exc:
        print("missing torch-staintools:", exc)
    return runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    batch = tiles_224(args.batch)
    ours = shiftkit_runs(args.device)
    peers = peer_runs(args.device)
    print(f"machine: {json.dumps(machine(args.device))}")
    records = []
    for key in ("estimate/macenko", "estimate/vahadane", "no-estimate"):
        mine = ours[key] if isinstance(ours[key], list) else [ours[key]]
        entries = [(n, r, args.batch) for n, r in mine] + peers[key]
        for name, run, n in entries:
            sub = batch[:n]
            try:
                t = timed(lambda: run(sub), args.passes if n > 8 else 2)
                rec = {"workload": key, "library": name, "tiles": n, "tiles_per_s": n / t}
                print(f"{key:18s} {name:40s} {n / t:9.1f} tiles/s ({n} tiles)", flush=True)
            except Exception as exc:
                rec = {"workload": key, "library": name, "error": f"{type(exc).__name__}: {str(exc)[:100]}"}
                print(f"{key:18s} {name:40s} {rec['error']}", flush=True)
            records.append(rec)
    print("\nratios (shiftkit ÷ peer, same run):")
    for key in ("estimate/macenko", "estimate/vahadane", "no-estimate"):
        mine = [r for r in records if r["workload"] == key and r["library"].startswith("shiftkit") and "tiles_per_s" in r]
        others = [r for r in records if r["workload"] == key and not r["library"].startswith("shiftkit") and "tiles_per_s" in r]
        for m in mine:
            for o in others:
                print(f"  {m['library']:34s} vs {o['library']:40s} {m['tiles_per_s'] / o['tiles_per_s']:7.1f}x")
        if others and mine:
            fastest = max(others, key=lambda r: r["tiles_per_s"])
            print(f"  -> fastest peer for {key}: {fastest['library']} ({fastest['tiles_per_s']:.1f} tiles/s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(args.device), "records": records}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
