#!/usr/bin/env python3
"""Do Aperio crops sent through the learned A -> B transfer look more like their real Hamamatsu twins than under the
best hand-set scanner profile at any severity — to an encoder, and in colour and sharpness?

    python experiments/scanner_transfer/encoder_check.py [--encoders default,random]

Leave one slide out: the transfer of each held-out slide is fitted on the other two. For every candidate image x_i
of crop i and its real twin h_i: the encoder's cosine cos(f(x_i) − μ, f(h_i) − μ) with μ the mean embedding of the
real twins (the same centring for every candidate), CIEDE2000 of 8x8 block means over tissue, and the sharpness
ratio (score_pairs.py). Candidates: the Aperio crop itself, ScannerTransfer (paired), and scanner-profile-a/b at
severities 1-5. Writes results/encoder_check.json and .md.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

import shiftkit
from shiftkit import ScannerTransfer
from shiftkit.models import load_encoder

from run import HERE, SHARED, load_pairs, load_scorer  # noqa: E402  (same folder)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default=str(SHARED / "data" / "mitos_scanner_pairs_dev"))
    ap.add_argument("--encoders", default="default,random")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    scorer = load_scorer(SHARED / "eval" / "score_pairs.py")
    src, dst, slides = load_pairs(Path(a.pairs), "a2h")
    cands = {"aperio (unchanged)": src.copy()}
    transfer = np.empty_like(src)
    for s in sorted(set(slides)):
        tr, te = slides != s, slides == s
        st = ScannerTransfer.fit(src[tr], dst[tr], slides=list(slides[tr]), mpp=0.25, parts=("colour", "mtf", "noise"))
        transfer[te] = st.augment(src[te])
    cands["ScannerTransfer (paired, LOSO)"] = transfer
    for prof in ("scanner-profile-a", "scanner-profile-b"):
        for sev in range(1, 6):
            cands[f"{prof} S{sev}"] = shiftkit.get_shift(prof, sev, mpp=0.25, seed=0).augment(src)
    rows = {}
    for name, imgs in cands.items():
        rows[name] = {"delta_e2000": float(np.mean([scorer.tissue_delta_e(x, y) for x, y in zip(imgs, dst)])),
                      "sharpness_ratio": float(np.mean([scorer.sharpness(x) / scorer.sharpness(y) for x, y in zip(imgs, dst)]))}
    to_t = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    for spec in a.encoders.split(","):
        enc = load_encoder(spec)
        with torch.no_grad():
            fh = enc.embed(to_t(dst))
            mu = fh.mean(0, keepdims=True)
            hn = (fh - mu) / np.linalg.norm(fh - mu, axis=1, keepdims=True)
            for name, imgs in cands.items():
                f = enc.embed(to_t(imgs)) - mu
                f /= np.linalg.norm(f, axis=1, keepdims=True)
                rows[name][f"cosine_{spec}"] = float((f * hn).sum(1).mean())
    specs = a.encoders.split(",")
    hand = [n for n in rows if n.startswith("scanner-profile")]
    best = {k: min(hand, key=lambda n: rows[n][k]) for k in ("delta_e2000",)}
    best.update({f"cosine_{s}": max(hand, key=lambda n: rows[n][f"cosine_{s}"]) for s in specs})
    best["sharpness_ratio"] = min(hand, key=lambda n: abs(np.log(rows[n]["sharpness_ratio"])))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder_check.json").write_text(json.dumps({"rows": rows, "best_hand_set": best}, indent=1))
    lines = ["# Learned transfer vs hand-set scanner profiles (Aperio -> Hamamatsu, leave one slide out)", "",
             "cosine: encoder embedding of the candidate vs the real twin (centred on the twins' mean; higher = more "
             "alike); ΔE2000 and sharpness ratio as in score_pairs.py (sharpness 1 = matched).", "",
             "| candidate | " + " | ".join(f"cosine ({s})" for s in specs) + " | ΔE2000 | sharpness |",
             "|---|" + "---|" * (len(specs) + 2)]
    for name in ["aperio (unchanged)", "ScannerTransfer (paired, LOSO)"] + sorted(set(best.values())):
        r = rows[name]
        lines.append(f"| {name} | " + " | ".join(f"{r[f'cosine_{s}']:.3f}" for s in specs)
                     + f" | {r['delta_e2000']:.2f} | {r['sharpness_ratio']:.2f} |")
    lines += ["", "Best hand-set candidate per column: " + "; ".join(f"{k}: {v}" for k, v in best.items()) + "."]
    (out / "encoder_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
