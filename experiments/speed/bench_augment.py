"""Stain-augmentation speed: shiftkit next to staintools, tiatoolbox, albumentations HEStain, torchstain and
torch-staintools on the same 224² real tiles (batch 64), one process, median of passes after a warm-up.

    python experiments/speed/bench_augment.py [--device cuda] [--json out.json]

Workloads with **per-tile stain estimation** (the peer is called the way its users call it, tile by tile unless
it has a batch API): shiftkit StainAugment(macenko|vahadane) vs staintools StainAugmentor, tiatoolbox
StainAugmentor (a new object per tile; reusing one silently reuses the first tile's matrix), albumentations
HEStain(method="macenko"), torchstain MacenkoAugmentor and torch-staintools' augmentor. Workloads **without
estimation**: shiftkit HEDJitter and StainAugment(method="fixed") vs albumentations HEStain("random_preset").
shiftkit runs twice: ``augment`` on the numpy uint8 batch with uint8 out (the peers' formats; converted in CPU
chunks), and the Kornia-style call on a float tensor with the uint8 → float conversion inside the timed region.
All libraries run in interleaved rounds; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_normalize import machine, paired_rates, tiles_224  # noqa: E402

warnings.filterwarnings("ignore")



def shiftkit_runs(device):
    import shiftkit
    from shiftkit.stain import reference_stain_matrix

    def uint8(t):
        """``augment`` on the numpy uint8 batch, uint8 out: the same formats as the per-tile peers."""
        t = t.to(device)

        def run(batch):
            x = batch if device == "cpu" else torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)
            y = t.augment(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return y

        return run

    def float_tensor(t):
        """The Kornia-style call on a float tensor, the uint8 → float conversion inside the timed region."""
        t = t.to(device)

        def run(batch):
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255)
            y = t(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return y

        return run

    def both(name, make):
        return [(f"shiftkit {name}", uint8(make())), (f"shiftkit {name} [float tensor]", float_tensor(make()))]

    return {
        "estimate/macenko": both("StainAugment(macenko)", lambda: shiftkit.StainAugment(method="macenko", preset="medium", seed=0)),
        "estimate/vahadane": both("StainAugment(vahadane)", lambda: shiftkit.StainAugment(method="vahadane", preset="medium", seed=0)),
        "no-estimate": both("HEDJitter", lambda: shiftkit.HEDJitter(preset="medium", seed=0))
        + both("StainAugment(fixed)", lambda: shiftkit.StainAugment(method="fixed", matrix=reference_stain_matrix("macenko"), preset="medium", seed=0)),
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
    ap.add_argument("--passes", type=int, default=7, help="interleaved rounds (every library once per round)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    batch = tiles_224(args.batch)
    ours = shiftkit_runs(args.device)
    peers = peer_runs(args.device)
    print(f"machine: {json.dumps(machine(args.device))}")
    records = []
    for key in ("estimate/macenko", "estimate/vahadane", "no-estimate"):
        entries = [(n, r, args.batch) for n, r in ours[key]] + peers[key]
        runs = {name: ((lambda run=run, sub=batch[:n]: run(sub)), n) for name, run, n in entries}
        rates = paired_rates(runs, args.passes)
        mine = [name for name, _, _ in entries if name.startswith("shiftkit")]
        peers_ok = [name for name, _, _ in entries if not name.startswith("shiftkit") and isinstance(rates[name], list)]
        fastest = max(peers_ok, key=lambda n: statistics.median(rates[n])) if peers_ok else None
        for name, _, n in entries:
            r = rates[name]
            if isinstance(r, str):
                rec = {"workload": key, "library": name, "error": r}
                print(f"{key:18s} {name:44s} {r}", flush=True)
            else:
                rec = {"workload": key, "library": name, "tiles": n, "tiles_per_s": statistics.median(r), "rounds": len(r)}
                print(f"{key:18s} {name:44s} {rec['tiles_per_s']:9.1f} tiles/s ({n} tiles)", flush=True)
            records.append(rec)
        for m in mine:
            if not isinstance(rates[m], list):
                continue
            for o in peers_ok:
                ratio = [a / b for a, b in zip(rates[m], rates[o])]
                q = statistics.quantiles(ratio, n=4) if len(ratio) > 1 else [ratio[0]] * 3
                records.append({"workload": key, "ratio": f"{m} / {o}", "median": statistics.median(ratio), "q1": q[0], "q3": q[2]})
                mark = "  <- fastest peer" if o == fastest else ""
                print(f"    {m:42s} ÷ {o:40s} {statistics.median(ratio):6.2f}x (quartiles {q[0]:.2f}-{q[2]:.2f}){mark}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(args.device), "records": records}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
