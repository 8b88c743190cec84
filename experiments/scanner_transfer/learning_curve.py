#!/usr/bin/env python3
"""How many registered pairs does a transfer need? Leave one slide out on the MITOS dev pairs, colour only.

    python experiments/scanner_transfer/learning_curve.py     # ~2 min on this project's 2-core CPU

For each direction and held-out slide, n pairs are drawn at random from the two training slides (n = 1, 2, 5, 10,
20 — five draws each, seeded — and all 40), and two colour maps are fitted on exactly those pairs: the default
``ScannerTransfer.fit`` (colour part; slide ids given, so one pair is cross-validated over its 2×2 blocks and pairs
of one slide over consecutive pairs) and the 3×4 affine sRGB least-squares map of ``run.py``. Both are scored on the
held-out slide's 20 crops with ``score_pairs.py``'s ``tissue_delta_e``. Reported per n: mean CIEDE2000 over draws
and held-out crops (both directions' slides pooled per direction), and the paired difference transfer − affine
fitted on the same pairs with a bootstrap 95 % interval over (draw, crop) cells; a fit that refuses (no better
than identity on its own folds) leaves the crops unchanged and is counted — a guide to how many pairs a
user should register, not a target. Writes results/learning_curve.json and .md.
"""
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402

from shiftkit import ScannerTransfer  # noqa: E402
from shiftkit.transforms.scanner_transfer import ScannerTransferError  # noqa: E402

SIZES = (1, 2, 5, 10, 20, 40)
DRAWS = 5


def main():
    scorer = run.load_scorer(run.SHARED / "eval" / "score_pairs.py")
    data = {"sizes": list(SIZES), "draws": DRAWS, "rows": []}
    lines = ["# Learning curve: colour maps fitted on n registered pairs, leave one slide out (MITOS dev pairs)", "",
             "Mean CIEDE2000 on the held-out slide's crops (three held-out slides, five random draws of n training pairs "
             "each; all 40 pairs once). Δ = transfer − affine fitted on the same pairs, bootstrap 95 % CI over "
             "(draw, crop) cells. A fit that refuses (its cross-validated map no better than "
             "identity: a clear error, no profile) leaves the held-out crops unchanged in the transfer column.", ""]
    for direction in ("a2h", "h2a"):
        src, dst, slides = run.load_pairs(run.SHARED / "data" / "mitos_scanner_pairs_dev", direction)
        lines += [f"## {direction}", "",
                  "| pairs | transfer | affine (same pairs) | Δ transfer − affine [95 % CI] | fits refused | "
                  "Δ over the fits not refused |", "|---|---|---|---|---|---|"]
        for n in SIZES:
            st_scores, af_scores, refused, fits = [], [], 0, 0
            for s in sorted(set(slides)):
                train = np.where(slides != s)[0]
                te = slides == s
                rng = np.random.default_rng(1000 * n + int(s))
                for d in range(1 if n >= len(train) else DRAWS):
                    fits += 1
                    pick = np.sort(rng.choice(train, size=min(n, len(train)), replace=False))
                    try:
                        t = ScannerTransfer.fit(src[pick], dst[pick], slides=list(slides[pick]), parts=("colour",),
                                                seed=0)
                    except ScannerTransferError:  # "no better than identity" on its own folds: the user gets no
                        t = None                  # profile, so the held-out crops stay as they are
                        refused += 1
                    w = run.affine_fit(src[pick], dst[pick])
                    for x, y in zip(src[te], dst[te]):
                        st_scores.append(scorer.tissue_delta_e(x if t is None else t.augment(x[None])[0], y))
                        af_scores.append(scorer.tissue_delta_e(run.affine_apply(x, w), y))
                        data["rows"].append({"direction": direction, "n": n, "slide": s, "draw": d,
                                             "transfer": st_scores[-1], "affine": af_scores[-1], "refused": t is None})
            diff = run.bootstrap_diff(st_scores, af_scores)
            ok = [not r["refused"] for r in data["rows"] if r["direction"] == direction and r["n"] == n]
            acc = run.bootstrap_diff(np.array(st_scores)[ok], np.array(af_scores)[ok])
            lines.append(f"| {n} | {np.mean(st_scores):.2f} | {np.mean(af_scores):.2f} | "
                         f"{diff[0]:+.2f} [{diff[1]:+.2f}, {diff[2]:+.2f}] | {refused} of {fits} | "
                         f"{acc[0]:+.2f} [{acc[1]:+.2f}, {acc[2]:+.2f}] |")
            print(direction, lines[-1], flush=True)
        lines.append("")
    run.save_results("learning_curve", data, lines)


if __name__ == "__main__":
    main()
