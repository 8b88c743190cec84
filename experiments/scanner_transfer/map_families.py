#!/usr/bin/env python3
"""How much can any global colour map gain over the affine baseline on the MITOS dev pairs? Leave one slide out.

    python experiments/scanner_transfer/map_families.py     # ~2 min on this project's 2-core CPU

For each held-out slide, every map is fitted on the other two slides' pairs (tissue-weighted least squares on 8x8
block means, as ScannerTransfer fits) and scored with shared/eval/score_pairs.py on the held-out slide. Families:
input space (sRGB, optical density, CIELAB) x output space (where the squares are taken: sRGB or CIELAB) x degree
1-3, per-channel powers or all cross-channel monomials. The table ranks them by their held-out mean, i.e. it picks
with hindsight: the best row is an optimistic bound for a map chosen without seeing the test slide. A second table
normalizes every slide's source stains (pooled per slide, Reinhard / Macenko / Vahadane, target: the training
slides' source images) before the map, which would remove slide-to-slide stain variation if it were scanner
specific. Two more probes beyond per-pixel least squares: the same maps fitted with the "l1" loss of
shiftkit.functional.transfer.fit_colour_map (least Euclidean residual lengths, 5 reweighted steps), and maps that also
see the pixel's surroundings (Gaussian-blurred sRGB at sigma 8 and/or 64 px as extra linear terms: a scanner's
veiling glare or local exposure would show there). Writes results/map_families.md and .json. Research only: nothing
here ships.
"""
import itertools
import json
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
from skimage.color import lab2rgb, rgb2lab

from shiftkit import StainNormalizer
from shiftkit.functional.transfer import weighted_ridge

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # the loaders, the affine baseline and the scorer of the main experiment)

SLIDES = ("03", "04", "05")


def block(x):
    return cv2.resize(np.ascontiguousarray(x, dtype=np.float64) / 255, (x.shape[1] // 8, x.shape[0] // 8),
                      interpolation=cv2.INTER_AREA)


def to_space(v, space):
    if space == "od":
        return -np.log(np.clip(v, 1 / 255, 1))
    if space == "lab":
        return rgb2lab(v.reshape(-1, 1, 3)).reshape(-1, 3) / 100
    return v


def from_space(v, space):
    if space == "lab":
        return np.clip(lab2rgb((v * 100).reshape(-1, 1, 3)).reshape(-1, 3), 0, 1)
    return np.clip(v, 0, 1)


def features(v, degree, cross):
    cols = [np.ones(len(v))]
    for d in range(1, degree + 1):
        terms = itertools.combinations_with_replacement(range(3), d) if cross else [(c,) * d for c in range(3)]
        cols += [np.prod(v[:, list(t)], axis=1) for t in terms]
    return np.stack(cols, 1)


def fit(s, d, w, fam, ridge=1e-3, loss="l2", ctx=None):
    """``ctx``: extra feature columns per row (the surroundings), appended to the polynomial's."""
    space, out, degree, cross = fam
    x, y = features(to_space(s, space), degree, cross), to_space(d, out)
    x = x if ctx is None else np.concatenate([x, ctx], 1)
    return weighted_ridge(x, y, w, ridge, loss)  # the regression of ScannerTransfer's colour fit


def surroundings(img, sigmas, blocks=False):
    """Gaussian-blurred sRGB of ``img`` at each sigma (px, reflected border), per pixel or per 8x8 block."""
    x = np.ascontiguousarray(img, dtype=np.float64) / 255
    out = []
    for sig in sigmas:
        c = cv2.GaussianBlur(x, (0, 0), sig, borderType=cv2.BORDER_REFLECT)
        if blocks:
            c = cv2.resize(c, (img.shape[1] // 8, img.shape[0] // 8), interpolation=cv2.INTER_AREA)
        out.append(c.reshape(-1, 3))
    return np.concatenate(out, 1)


def apply(img, coef, fam, sigmas=()):
    space, out, degree, cross = fam
    x = features(to_space(img.reshape(-1, 3) / 255.0, space), degree, cross)
    x = np.concatenate([x, surroundings(img, sigmas)], 1) if sigmas else x
    y = from_space(x @ coef, out)
    return (y * 255).round().astype(np.uint8).reshape(img.shape)


def training_blocks(src, dst):
    s = np.concatenate([block(x).reshape(-1, 3) for x in src])
    dm = [block(x) for x in dst]
    w = np.concatenate([(rgb2lab(b)[..., 0] < 85).reshape(-1) for b in dm]).astype(float)
    return s, np.concatenate([b.reshape(-1, 3) for b in dm]), w


def main():
    warnings.filterwarnings("ignore", message=".*negative Z values.*")
    scorer = run.load_scorer(run.SHARED / "eval" / "score_pairs.py")
    folder = run.SHARED / "data" / "mitos_scanner_pairs_dev"
    fams = [(i, o, d, c) for i in ("srgb", "od", "lab") for o in ("srgb", "lab") for d in (1, 2, 3) for c in (False, True)
            if not (d == 1 and c)]
    keep = [("srgb", "srgb", 1, False), ("srgb", "srgb", 3, False), ("od", "srgb", 2, False), ("od", "lab", 3, False)]
    out = {}
    for direction in ("a2h", "h2a"):
        src, dst, slides = run.load_pairs(folder, direction)
        res = {}
        for s in SLIDES:
            tr, te = slides != s, slides == s
            w_aff = run.affine_fit(src[tr], dst[tr])
            res.setdefault("affine 3x4 sRGB on all pixels (baseline)", []).extend(
                scorer.tissue_delta_e(run.affine_apply(x, w_aff), y) for x, y in zip(src[te], dst[te]))
            for norm in ("none", "reinhard", "macenko", "vahadane"):
                srcn = src
                if norm != "none":  # each slide's source, pooled, to the training slides' source images
                    n = StainNormalizer(norm).fit(list(src[tr]))
                    srcn = src.copy()
                    for k in SLIDES:
                        srcn[slides == k] = n.normalize(src[slides == k], source="pooled")
                sb, db, wb = training_blocks(srcn[tr], dst[tr])
                if norm == "none":
                    plain = sb, db, wb
                for fam in fams if norm == "none" else keep:
                    coef = fit(sb, db, wb, fam)
                    name = f"{fam[0]}->{fam[1]} degree {fam[2]}{' cross' if fam[3] else ''}"
                    name = name if norm == "none" else f"{name}, source stains normalized per slide ({norm})"
                    res.setdefault(name, []).extend(scorer.tissue_delta_e(apply(x, coef, fam), y)
                                                    for x, y in zip(srcn[te], dst[te]))
                    if norm == "none" and fam in keep + [("srgb", "srgb", 3, True), ("od", "lab", 3, True)]:
                        coef = fit(sb, db, wb, fam, loss="l1")
                        res.setdefault(f"{name}, l1 loss", []).extend(scorer.tissue_delta_e(apply(x, coef, fam), y)
                                                                      for x, y in zip(src[te], dst[te]))
            sb, db, wb = plain
            for sigmas in ((8,), (64,), (8, 64)):
                fam = ("srgb", "srgb", 3, True)
                ctx = np.concatenate([surroundings(x, sigmas, blocks=True) for x in src[tr]])
                coef = fit(sb, db, wb, fam, ctx=ctx)
                res.setdefault(f"srgb->srgb degree 3 cross + surroundings (sigma {'/'.join(map(str, sigmas))} px)",
                               []).extend(scorer.tissue_delta_e(apply(x, coef, fam, sigmas), y) for x, y in zip(src[te], dst[te]))
            print(f"{direction} slide {s} done", flush=True)
        base = np.array(res["affine 3x4 sRGB on all pixels (baseline)"])
        out[direction] = {k: {"mean": float(np.mean(v)), "diff_vs_baseline": float(np.mean(np.array(v) - base)),
                              "per_slide": {s: float(np.mean(np.array(v)[slides == s])) for s in SLIDES}}
                          for k, v in res.items()}
    (HERE / "results" / "map_families.json").write_text(json.dumps(out, indent=1))
    lines = ["# Global colour maps, leave one slide out: ranked with hindsight (an optimistic bound)", "",
             ("Mean CIEDE2000 (score_pairs.py) over the 60 held-out crops; Δ = paired mean difference to the affine "
              "baseline. Written by map_families.py."), ""]
    for direction, rows in out.items():
        lines += [f"## {direction}", "", "| map | slide 03 | slide 04 | slide 05 | mean | Δ vs baseline |", "|---|---|---|---|---|---|"]
        for k, r in sorted(rows.items(), key=lambda kv: kv[1]["mean"]):
            lines.append(f"| {k} | " + " | ".join(f"{r['per_slide'][s]:.2f}" for s in SLIDES)
                         + f" | {r['mean']:.2f} | {r['diff_vs_baseline']:+.2f} |")
        lines.append("")
    (HERE / "results" / "map_families.md").write_text("\n".join(lines))
    print("\n".join(lines[:40]))


if __name__ == "__main__":
    main()
