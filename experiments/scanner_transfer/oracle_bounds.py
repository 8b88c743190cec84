#!/usr/bin/env python3
"""What could a global colour map reach on the MITOS dev pairs if it saw the held-out slide? In-sample bounds.

    python experiments/scanner_transfer/oracle_bounds.py     # ~1 min on this project's 2-core CPU

The scanner-transfer issue asks for a colour map at least 0.8 CIEDE2000 below the affine baseline, cross-validated by
slide. This script asks whether that margin exists in these data at all, by fitting the same map families with more
knowledge than any real fit has, and scoring every crop with shared/eval/score_pairs.py against the leave-one-slide-
out affine baseline (the issue's baseline; paired differences, bootstrap 95 % CI over the 60 crops):

- **leave one slide out**: fitted on the other two slides (as in run.py and map_families.py);
- **all slides, in sample**: one global map fitted on all 60 pairs, the held-out slide included (the best a single
  map for these three slides can do);
- **the slide itself**: a map fitted on the held-out slide's own 20 pairs (a global map per slide: what is left
  once slide-to-slide variation is known);
- **the slide's other fields**: a map per slide fitted on that slide's other three fields (15 pairs) and scored
  on the held-out field's 5 crops — an honest estimate, unlike the rows above it, of what calibrating each slide
  from a few paired fields would give (also with ScannerTransfer.fit itself, colour part, its map chosen by
  cross-validation over the three fields);
- **per pair**: a map fitted on each pair itself (the floor of the family on this metric).
- **misregistration only**: the real twin moved onto the source crop's grid by the pair's phase-correlation offset
  — what a perfect transfer would output, since every transfer keeps the source's geometry; its score is the
  pairs' misregistration (a few pixels) alone. Maps fitted on the misregistered pair itself can score lower: they
  learn the misregistered block means.

Families: the 3x4 affine sRGB map on every pixel (the baseline's own fit) and the tissue-weighted block fits of
ScannerTransfer's colour part (map_families.py's code) for sRGB -> sRGB and OD -> CIELAB at degree 3, the maps
cross-validation picks on these pairs (a2h and h2a), least squares and the "l1" loss, and a richer map than any
candidate (degree 5 with every cross-channel monomial: 56 terms per output). These are bounds for maps fitted as
the transfer fits them, not for any map: a fit that minimized CIEDE2000 itself could do better in sample. In-sample
rows are bounds, not methods: nothing here ships or is claimed as a result. Writes results/oracle_bounds.md and .json.
"""
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from shiftkit import ScannerTransfer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import map_families as mf  # noqa: E402  (the block fits of ScannerTransfer's colour part)
import run  # noqa: E402  (loaders, affine baseline, scorer, bootstrap)

FAMILIES = {"affine 3x4 sRGB": None, "sRGB -> sRGB degree 3": (("srgb", "srgb", 3, False), "l2"),
            "OD -> CIELAB degree 3": (("od", "lab", 3, False), "l2"),
            "sRGB -> sRGB degree 3, l1 loss": (("srgb", "srgb", 3, False), "l1"),
            "OD -> CIELAB degree 3, l1 loss": (("od", "lab", 3, False), "l1"),
            "sRGB -> sRGB degree 5, all cross terms (56)": (("srgb", "srgb", 5, True), "l2")}
REGIMES = ("leave one slide out", "all slides, in sample", "the slide itself", "the slide's other fields", "per pair",
           "misregistration only")
FLOOR = "the real twin moved onto the source's grid (a perfect transfer)"


TRANSFER = "ScannerTransfer.fit, colour (CV over the fields)"  # the product itself, in the per-field regime only


def fit_apply(fam, src_fit, dst_fit, src_apply, groups=None):
    if fam == TRANSFER:
        st = ScannerTransfer.fit(src_fit, dst_fit, slides=list(groups), mpp=0.25, parts=("colour",), seed=0)
        return list(st.augment(src_apply))
    if fam is None:
        w = run.affine_fit(src_fit, dst_fit)
        return [run.affine_apply(x, w) for x in src_apply]
    fam, loss = fam
    coef = mf.fit(*mf.training_blocks(src_fit, dst_fit), fam, loss=loss)
    return [mf.apply(x, coef, fam) for x in src_apply]


def by_field(fam, src, dst, te, fields, scorer):
    """Each crop of the slide ``te``, scored by the map fitted on that slide's other fields."""
    held = np.zeros(int(te.sum()))
    for f in sorted(set(fields[te])):
        fit_on, test_on = te & (fields != f), fields == f
        outs = fit_apply(fam, src[fit_on], dst[fit_on], src[test_on], fields[fit_on])
        held[test_on[te]] = [scorer.tissue_delta_e(o, y) for o, y in zip(outs, dst[test_on])]
    return held.tolist()


def main():
    warnings.filterwarnings("ignore", message=".*negative Z values.*")
    scorer = run.load_scorer(run.SHARED / "eval" / "score_pairs.py")
    folder = run.SHARED / "data" / "mitos_scanner_pairs_dev"
    out = {}
    for direction in ("a2h", "h2a"):
        src, dst, slides = run.load_pairs(folder, direction)
        fields = np.array([f.name[1:4] for f in sorted((folder / "aperio").glob("A*.png"))])  # slide + frame
        scores = {}
        for s in mf.SLIDES:
            tr, te = slides != s, slides == s
            for name, fam in FAMILIES.items():
                fits = {"leave one slide out": (src[tr], dst[tr]), "all slides, in sample": (src, dst),
                        "the slide itself": (src[te], dst[te])}
                for regime, (a, b) in fits.items():
                    outs = fit_apply(fam, a, b, src[te])
                    scores.setdefault((name, regime), []).extend(
                        scorer.tissue_delta_e(o, y) for o, y in zip(outs, dst[te]))
                scores.setdefault((name, "the slide's other fields"), []).extend(by_field(fam, src, dst, te, fields, scorer))
                scores.setdefault((name, "per pair"), []).extend(
                    scorer.tissue_delta_e(fit_apply(fam, x[None], y[None], [x])[0], y) for x, y in zip(src[te], dst[te]))
            scores.setdefault((TRANSFER, "the slide's other fields"), []).extend(by_field(TRANSFER, src, dst, te, fields, scorer))
            scores.setdefault((FLOOR, "misregistration only"), []).extend(
                scorer.tissue_delta_e(run.moved_twin(x, y), y) for x, y in zip(src[te], dst[te]))
            print(f"{direction} slide {s} done", flush=True)
        base = scores[("affine 3x4 sRGB", "leave one slide out")]
        out[direction] = [{"family": n, "regime": r, "mean": float(np.mean(v)),
                           "per_slide": {s: float(np.mean(np.asarray(v)[slides == s])) for s in mf.SLIDES},
                           "minus_baseline": run.bootstrap_diff(v, base)}
                          for (n, r), v in scores.items()]
    (HERE / "results" / "oracle_bounds.json").write_text(json.dumps(out, indent=1))
    lines = ["# In-sample bounds for global colour maps (MITOS dev pairs)", "",
             ("Mean CIEDE2000 (score_pairs.py) per slide and over the 60 crops; Δ = paired mean difference to the affine "
              "3x4 sRGB map fitted leave one slide out (the issue's baseline), bootstrap 95 % CI. Only the 'leave one "
              "slide out' rows are honest estimates; the others see the held-out slide and are bounds. Written by "
              "oracle_bounds.py."), ""]
    for direction, rows in out.items():
        lines += [f"## {direction}", "", "| map | fitted on | slide 03 | slide 04 | slide 05 | mean | Δ vs baseline [95% CI] |",
                  "|---|---|---|---|---|---|---|"]
        order = {r: i for i, r in enumerate(REGIMES)}
        for r in sorted(rows, key=lambda r: (order[r["regime"]], r["mean"])):
            d, lo, hi = r["minus_baseline"]
            lines.append(f"| {r['family']} | {r['regime']} | " + " | ".join(f"{r['per_slide'][s]:.2f}" for s in mf.SLIDES)
                         + f" | {r['mean']:.2f} | {d:+.2f} [{lo:+.2f}, {hi:+.2f}] |")
        lines.append("")
    (HERE / "results" / "oracle_bounds.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
