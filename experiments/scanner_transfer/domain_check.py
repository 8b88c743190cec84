#!/usr/bin/env python3
"""Does a fitted colour map stay sane on colours it was not fitted on? The input domain, with and without.

    python experiments/scanner_transfer/domain_check.py     # ~2 min on this project's 2-core CPU

ScannerTransfer's colour map is a polynomial (degree up to 3, chosen by cross-validation) fitted on the tissue of the
training pairs. Outside the colours it was fitted on, a cubic can turn round: fitted Hamamatsu -> Aperio on the 60
MITOS dev pairs (an optical-density -> CIELAB cubic), darker tissue came out *lighter*. Since 2026-12-06 a fit
records its input domain (per channel, the 0.1 % and 99.9 % quantiles of the training tissue pixels in the map's
input space) and inputs are held inside it before the polynomial. This measures, with the domain and without it
(the same weights):

- lightness monotonicity: the share of tissue pixels (L* < 85) whose output gets more than 1 L* *lighter* when the
  input gets 15 % more optical density in every channel (a darker version of the same colour) — for a map fitted
  on all 60 pairs, on pixels of the MITOS crops themselves, the Camelyon17 five centres, the 24 Kather 2016 colorectal
  tiles (some stained darker than any MITOS crop) and the histolab edge cases (pen marks, IHC, blank);
- the leave-one-slide-out score on the dev pairs (colour part only; shared/eval/score_pairs.py; paired difference
  to the affine baseline with bootstrap 95 % CI), which the domain must not make worse.

Writes results/domain_check.md and .json.
"""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.color import rgb2lab

from shiftkit import ScannerTransfer
from shiftkit.shifts.transfer import PROFILES_DIR

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (loaders, affine baseline, scorer, bootstrap)

DATA = run.SHARED / "data"
SETS = {"Camelyon17 5 centres": ("camelyon17_5centers", "*.png", 1),
        "Kather 2016 (24 tiles, 8 classes)": ("kather2016_8classes", "0[1-8]*/*.tif", 1),
        "histolab edge cases": ("edge_cases_histolab", "*.png", 1)}


VARIANTS = ("affine slope beyond (default)", "held at the edge", "polynomial everywhere (before)")


def variant(t, name):
    """The same transfer, same weights, with the domain handled as ``name`` (one of :data:`VARIANTS`)."""
    drop = {VARIANTS[0]: (), VARIANTS[1]: ("beyond_slope",), VARIANTS[2]: ("domain", "beyond_slope")}[name]
    return ScannerTransfer({**t.profile, "colour": {k: v for k, v in t.profile["colour"].items() if k not in drop}})


def pixels(images, n=200_000, seed=0):
    p = np.concatenate([im.reshape(-1, 3) for im in images])
    return p[np.random.default_rng(seed).choice(len(p), min(n, len(p)), replace=False)]


def lightening(t, px):
    """Share of tissue pixels (L* < 85) whose output gets > 1 L* lighter with 15 % more optical density, and the
    output's spread of L* over those pixels relative to the input's (contrast kept: 1 = as much as the input's)."""
    x = torch.tensor(px / 255.0, dtype=torch.float32).T.reshape(1, 3, -1, 1).clamp(1 / 255, 1)
    darker = torch.exp(torch.log(x) * 1.15)
    lab = lambda v: rgb2lab(v[0, :, :, 0].T.numpy().reshape(-1, 1, 3))[:, 0, 0]  # noqa: E731
    lx = lab(x)
    tissue = lx < 85
    with torch.no_grad():
        ly = lab(t(x))
        return float(((lab(t(darker)) - ly) > 1.0)[tissue].mean()), float(ly[tissue].std() / lx[tissue].std())


def load_set(folder, pattern, step):
    files = sorted((DATA / folder).glob(pattern))[::step]
    return [np.array(Image.open(f).convert("RGB"))[:512, :512] for f in files]


def outside(t, px):
    """Share of tissue pixels with a channel outside the colour map's domain."""
    from shiftkit.functional.transfer import _to_space

    c = t.profile["colour"]
    v = _to_space(torch.tensor(px / 255.0), c["space"]).numpy()
    lo, hi = np.asarray(c["domain"])
    tissue = rgb2lab(px.reshape(-1, 1, 3) / 255.0)[:, 0, 0] < 85
    return float(((v < lo) | (v > hi)).any(1)[tissue].mean())


def table(t, sets):
    rec = {name: {"outside_domain": outside(t, px), **{v: dict(zip(("lighter", "contrast"), lightening(variant(t, v), px)))
                                                      for v in VARIANTS}} for name, px in sets.items()}
    lines = ["| pixels | outside the domain | " + " | ".join(f"{v}: lighter / contrast" for v in VARIANTS) + " |",
             "|---|---|" + "---|" * len(VARIANTS)]
    lines += [f"| {k} | {r['outside_domain']:.1%} | " + " | ".join(f"{r[v]['lighter']:.2%} / {r[v]['contrast']:.2f}"
                                                                    for v in VARIANTS) + " |" for k, r in rec.items()]
    return rec, lines


def main():
    scorer = run.load_scorer(run.SHARED / "eval" / "score_pairs.py")
    sets = {name: load_set(*spec) for name, spec in SETS.items()}
    sets = {k: pixels(v) for k, v in sets.items() if v}
    data, lines = {"sets": list(sets), "directions": {}, "bundled": {}}, []
    lines += ["# Colour map beyond its input domain", "",
              "Per pixel set: the share of tissue pixels (L* < 85) with a channel outside the map's domain; then per way "
              "of handling it, the share of tissue pixels whose output gets > 1 L* *lighter* when the input gets 15 % "
              "more optical density (0 = lightness monotone) / the output's standard deviation of L* over tissue relative "
              "to the input's (contrast kept). Same weights in every column. Leave one slide out: colour part only, "
              "mean CIEDE2000 and Δ vs the affine baseline [bootstrap 95 % CI over the 60 held-out crops].", ""]
    for direction in ("a2h", "h2a"):
        src, dst, slides = run.load_pairs(DATA / "mitos_scanner_pairs_dev", direction)
        t = ScannerTransfer.fit(src, dst, slides=slides, parts=("colour",))
        c = t.profile["colour"]
        rec, rows = table(t, {"MITOS dev (source side)": pixels(list(src)), **sets})
        rec = {"map": t.profile["fit"]["colour"]["chosen"], "domain": c["domain"], "beyond_slope": c["beyond_slope"],
               "pixels": rec}
        scores = {v: [] for v in VARIANTS}
        base = []
        for s, tr, te, _, _, _, b in run.loso_dev_pairs(direction, scorer):
            ts = ScannerTransfer.fit(src[tr], dst[tr], slides=slides[tr], parts=("colour",))
            for v in VARIANTS:
                scores[v] += [scorer.tissue_delta_e(o, y) for o, y in zip(variant(ts, v).augment(src[te]), dst[te])]
            base += b
        rec["loso"] = {v: run.against_baseline(scores[v], base) for v in VARIANTS}
        rec["loso_default_minus_before"] = list(run.bootstrap_diff(np.array(scores[VARIANTS[0]]), np.array(scores[VARIANTS[2]])))
        data["directions"][direction] = rec
        d = rec["loso_default_minus_before"]
        lines += [f"## MITOS {direction}, fitted on all 60 pairs (map {rec['map']}; domain low "
                  f"{np.round(c['domain'][0], 3).tolist()}, high {np.round(c['domain'][1], 3).tolist()} in its input space)",
                  ""] + rows
        lines += ["", "| leave one slide out | ΔE2000 | Δ vs affine |", "|---|---|---|"]
        lines += [f"| {v} | {run.cells(rec['loso'][v])} |" for v in VARIANTS]
        lines += ["", f"Default minus before, paired: {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}].", ""]
    lines += ["## Bundled scanners5 profiles (fitted on one small region: a narrow domain)", ""]
    for path in sorted(PROFILES_DIR.glob("scanners5-*.json")):
        t = ScannerTransfer.load(path)
        if t.profile["colour"].get("beyond_slope") is None:
            lines += [f"{path.stem}: no domain recorded (run make_bundled_profiles.py --add-domain)", ""]
            continue
        rec, rows = table(t, {"MITOS dev Aperio": pixels(list(run.load_pairs(DATA / "mitos_scanner_pairs_dev", "a2h")[0])),
                              **sets})
        data["bundled"][path.stem] = rec
        lines += [f"### {path.stem} (map {t.profile['fit']['colour']['chosen']})", ""] + rows + [""]
    run.save_results("domain_check", data, lines)


if __name__ == "__main__":
    main()
