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
import json
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
    folder = run.SHARED / "data" / "mitos_scanner_pairs_dev"
    out = {}
    for d in ("a2h", "h2a"):
        src, dst, slides = run.load_pairs(folder, d)
        base, rows = [], {k: {"delta_e2000": [], "chosen": {}} for k in LAYOUTS}
        for s in sorted(set(slides)):
            tr, te = slides != s, slides == s
            w = run.affine_fit(src[tr], dst[tr])
            base += [scorer.tissue_delta_e(run.affine_apply(x, w), y) for x, y in zip(src[te], dst[te])]
            for name, (with_ids, folds) in LAYOUTS.items():
                st_mod._folds = folds
                try:
                    t = ScannerTransfer.fit(src[tr], dst[tr], slides=list(slides[tr]) if with_ids else None, mpp=0.25,
                                            parts=("colour",))
                finally:
                    st_mod._folds = CONSECUTIVE
                rows[name]["delta_e2000"] += [scorer.tissue_delta_e(x, y) for x, y in zip(t.augment(src[te]), dst[te])]
                rows[name]["chosen"][s] = t.profile["fit"]["colour"]["chosen"]
        for name, r in rows.items():
            diff, lo, hi = run.bootstrap_diff(np.array(r["delta_e2000"]), np.array(base))
            r.update(mean=float(np.mean(r["delta_e2000"])), delta_vs_affine=[diff, lo, hi])
        out[d] = {"affine_mean": float(np.mean(base)), "layouts": rows}
    (HERE / "results" / "fold_layout.json").write_text(json.dumps(out, indent=1))
    lines = ["# Cross-validation folds without slide ids (MITOS dev pairs, leave one slide out, colour part only)", "",
             "Mean CIEDE2000 (score_pairs.py) on the held-out slide; Δ vs the leave-one-slide-out affine 3x4 sRGB baseline, "
             "bootstrap 95 % CI over the 60 crops; the map each fit chose, per held-out slide 03/04/05.", ""]
    for d, r in out.items():
        lines += [f"## {d}", "", "| folds of the inner cross-validation | ΔE2000 | Δ vs affine [95% CI] | chosen maps |", "|---|---|---|---|"]
        for name, x in r["layouts"].items():
            dv = x["delta_vs_affine"]
            lines.append(f"| {name} | {x['mean']:.2f} | {dv[0]:+.2f} [{dv[1]:+.2f}, {dv[2]:+.2f}] | "
                         f"{', '.join(x['chosen'][s] for s in sorted(x['chosen']))} |")
        lines.append("")
    (HERE / "results" / "fold_layout.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
