#!/usr/bin/env python3
"""Cross-validation without slide ids: does the layout of the folds matter? (MITOS dev pairs, leave one slide out)

    python experiments/scanner_transfer/fold_layout.py     # ~1 min on this project's 2-core CPU

ScannerTransfer.fit chooses its colour map by cross-validation: leave one slide out when slide ids are given, else
5 folds over the pairs. This compares, per held-out slide, the colour part fitted on the other two slides' 40 pairs
(1) with their slide ids, (2) without, in 5 folds of consecutive pairs (the default since 2026-12-06) and (3)
without, in 5 interleaved folds (pair i in fold i mod 5: the earlier default, under which neighbouring crops of one
field score each other). Scored with shared/eval/score_pairs.py against the leave-one-slide-out affine baseline
(mean paired difference, bootstrap 95 % CI over the 60 crops). Writes results/fold_layout.md and .json.
"""
import sys
from pathlib import Path

import numpy as np

import shiftkit.transforms.scanner_transfer as st_mod
from shiftkit import ScannerTransfer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (loaders, affine baseline, scorer, bootstrap)

CONSECUTIVE = st_mod._folds


def interleaved(groups, n):
    """The earlier default without slide ids: pair i held out in fold i mod 5."""
    if groups is not None and len({str(g) for g in groups}) >= 2:
        return CONSECUTIVE(groups, n)
    k, idx = min(5, n), np.arange(n)
    return [(idx[idx % k != f], idx[idx % k == f]) for f in range(k)] if k >= 2 else []


LAYOUTS = {"slide ids (leave one slide out)": (True, CONSECUTIVE), "no slide ids, consecutive folds (default)": (False, CONSECUTIVE),
           "no slide ids, interleaved folds (earlier)": (False, interleaved)}


def main():
    scorer = run.load_scorer(run.SHARED / "eval" / "score_pairs.py")
    out = {}
    for d in ("a2h", "h2a"):
        base, rows = [], {k: {"delta_e2000": [], "chosen": {}} for k in LAYOUTS}
        for s, tr, te, src, dst, slides, b in run.loso_dev_pairs(d, scorer):
            base += b
            for name, (with_ids, folds) in LAYOUTS.items():
                st_mod._folds = folds
                try:
                    t = ScannerTransfer.fit(src[tr], dst[tr], slides=list(slides[tr]) if with_ids else None, mpp=0.25,
                                            parts=("colour",))
                finally:
                    st_mod._folds = CONSECUTIVE
                rows[name]["delta_e2000"] += [scorer.tissue_delta_e(x, y) for x, y in zip(t.augment(src[te]), dst[te])]
                rows[name]["chosen"][s] = t.profile["fit"]["colour"]["chosen"]
        for r in rows.values():
            r.update(run.against_baseline(r["delta_e2000"], base))
        out[d] = {"affine_mean": float(np.mean(base)), "layouts": rows}
    lines = ["# Cross-validation folds without slide ids (MITOS dev pairs, leave one slide out, colour part only)", "",
             "Mean CIEDE2000 (score_pairs.py) on the held-out slide; Δ vs the leave-one-slide-out affine 3x4 sRGB baseline, "
             "bootstrap 95 % CI over the 60 crops; the map each fit chose, per held-out slide 03/04/05.", ""]
    for d, r in out.items():
        lines += [f"## {d}", "", "| folds of the inner cross-validation | ΔE2000 | Δ vs affine [95% CI] | chosen maps |", "|---|---|---|---|"]
        lines += [f"| {name} | {run.cells(x)} | {', '.join(x['chosen'][s] for s in sorted(x['chosen']))} |"
                  for name, x in r["layouts"].items()] + [""]
    run.save_results("fold_layout", out, lines)


if __name__ == "__main__":
    main()
