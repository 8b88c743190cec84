#!/usr/bin/env python3
"""Speed of a learned ScannerTransfer against shiftkit's per-tile Macenko normalization, in one interleaved run.

    python experiments/speed/bench_scanner_transfer.py [--rounds 7] [--device cpu] [--out results/scanner_transfer_cpu.json]

Workload: float32 (64, 3, 224, 224) batches of real tiles. "transfer (colour+MTF)" applies a profile fitted on the
MITOS dev pairs (colour map and relative MTF; the bundled colour-only profile when the pairs are absent);
"macenko (per tile)" is StainNormalizer("macenko") with a fitted target, estimating every tile. The target of the
scanner-transfer issue: the transfer at least as fast as the normalization (ratio >= 1). The colour map is whichever
cross-validation picks on these pairs (Aperio -> Hamamatsu); "transfer h2a" is the reverse fit (Hamamatsu ->
Aperio, its own choice of map), "transfer h2a, matched MTF" the same with mtf_mode="matched" (a spectrum and a
monotone fit per tile) and "transfer, CIELAB colour map" the forward fit restricted to the dearest
candidate (CIELAB in and out, degree 3), the slowest a fitted map can apply. Also times ScannerTransfer.fit on the
60 pairs (target < 30 s). Prints the machine and writes the JSON record.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_normalize import DATA, machine, paired_rates, summarize, tiles_224  # noqa: E402

import shiftkit  # noqa: E402
from shiftkit import ScannerTransfer, StainNormalizer  # noqa: E402
from shiftkit.data import load_sample  # noqa: E402


def mitos_pairs():
    from PIL import Image

    folder = DATA / "mitos_scanner_pairs_dev"
    a_files = sorted((folder / "aperio").glob("A*.png"))
    rd = lambda p: np.array(Image.open(p).convert("RGB"))  # noqa: E731
    return (np.stack([rd(p) for p in a_files]), np.stack([rd(folder / "hamamatsu" / ("H" + p.name[1:])) for p in a_files]),
            [p.name[1:3] for p in a_files])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "scanner_transfer_cpu.json"))
    a = ap.parse_args(argv)
    info = machine(a.device)
    print(json.dumps(info))
    fit_s, st_lab, st_h2a, st_matched = None, None, None, None
    try:
        src, dst, slides = mitos_pairs()
        t0 = time.perf_counter()
        st = ScannerTransfer.fit(src, dst, slides=slides, mpp=0.25, parts=("colour", "mtf"))
        fit_s = time.perf_counter() - t0
        print(f"ScannerTransfer.fit on {len(src)} pairs: {fit_s:.1f} s (target < 30 s); colour map "
              f"{st.profile['fit']['colour']['chosen']}")
        st_lab = ScannerTransfer.fit(src, dst, slides=slides, mpp=0.25, parts=("colour", "mtf"),
                                     colour_candidates=[("lab", "lab", 3)])
        st_h2a = ScannerTransfer.fit(dst, src, slides=slides, mpp=0.25, parts=("colour", "mtf"))
        print(f"h2a colour map {st_h2a.profile['fit']['colour']['chosen']}")
        st_matched = ScannerTransfer.fit(dst, src, slides=slides, mpp=0.25, parts=("colour", "mtf"), mtf_mode="matched")
    except (FileNotFoundError, ValueError):
        st = ScannerTransfer.load(shiftkit.shifts.transfer.PROFILES_DIR / "scanners5-aperio-to-nz2.json")
    st = st.to(a.device) if hasattr(st, "to") else st
    x = torch.from_numpy(tiles_224(64)).permute(0, 3, 1, 2).float().div(255).contiguous().to(a.device)
    norm = StainNormalizer("macenko").fit(load_sample("slideflow")).to(a.device)
    params = st.draw_parameters(x.shape)

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    runs = {
        "transfer (colour+MTF)": (lambda: (st(x, params=params), sync()), x.shape[0]),
        "macenko (per tile)": (lambda: (norm.normalize(x), sync()), x.shape[0]),
    }
    if st_lab is not None:
        st_lab, st_h2a, st_matched = (t.to(a.device) if hasattr(t, "to") else t for t in (st_lab, st_h2a, st_matched))
        runs["transfer h2a"] = (lambda: (st_h2a(x, params=params), sync()), x.shape[0])
        runs["transfer h2a, matched MTF"] = (lambda: (st_matched(x, params=params), sync()), x.shape[0])
        runs["transfer, CIELAB colour map"] = (lambda: (st_lab(x, params=params), sync()), x.shape[0])
    with torch.no_grad():
        rates = paired_rates(runs, a.rounds)
    summary = summarize(rates, "transfer (colour+MTF)")
    for name in ("transfer h2a", "transfer h2a, matched MTF", "transfer, CIELAB colour map"):
        if isinstance(rates.get(name), list) and isinstance(rates.get("macenko (per tile)"), list):
            vs = summarize({k: rates[k] for k in (name, "macenko (per tile)")}, name)["macenko (per tile)"]
            summary[name]["vs_macenko"] = {k: vs[k] for k in ("ratio_median", "ratio_q1", "ratio_q3")}
            print(f"{name} / macenko: {vs['ratio_median']:.2f}x (quartiles {vs['ratio_q1']:.2f}-{vs['ratio_q3']:.2f})")
    for name, r in summary.items():
        extra = f"  ratio transfer/this {r['ratio_median']:.2f}x (quartiles {r['ratio_q1']:.2f}-{r['ratio_q3']:.2f})" \
            if "ratio_median" in r else ""
        print(f"{name:24s} {r.get('tiles_per_s', 0):8.1f} tiles/s{extra}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "batch": list(x.shape), "fit_seconds_60_pairs": fit_s, "parts": st.parts,
                               "colour_map": st.profile.get("fit", {}).get("colour", {}).get("chosen"),
                               "colour_map_h2a": st_h2a.profile["fit"]["colour"]["chosen"] if st_h2a is not None else None,
                               "summary": summary, "rates": rates}, indent=2))


if __name__ == "__main__":
    main()
