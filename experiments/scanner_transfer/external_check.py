#!/usr/bin/env python3
"""An external check of the MITOS-learned transfer: another specimen, lab and species, the same scanner families.

    python experiments/scanner_transfer/external_check.py     # ~1 min on this project's 2-core CPU

Everything is fitted, as a user would, on all 60 MITOS dev pairs (Aperio ScanScope XT / Hamamatsu NanoZoomer
2.0-HT, human breast, slides 03-05 as cross-validation groups) and applied to the five-scanner region of
``../shared/data/scanners5_same_region`` (canine squamous-cell carcinoma, one ~236² downsampled overview per
scanner): its ``aperio.png`` (ScanScope CS2) is sent towards Hamamatsu and scored against ``nz2.png`` (NanoZoomer
2.0-HT, the MITOS destination's model) and ``nz210.png`` (NanoZoomer S210); h2a sends ``nz2.png`` towards Aperio,
scored against ``aperio.png``. The region's µm/px is not documented (an overview), so only colour maps are
compared (no MTF, no noise). Scored with ``../shared/eval/score_pairs.py``'s own ``tissue_delta_e`` (CIEDE2000 of
8×8 block means over the twin's tissue); the scans are registered to within about 1 px (phase correlation).

One specimen: the interval of each difference to the affine baseline is a bootstrap over 4×4 spatial regions of
the image (59² px each; per-block differences are spatially correlated, so the regions, not the blocks, are
resampled) — it says how uniform the difference is across this region, not how it varies across specimens.
Caveat: the bundled ``scanners5`` profiles were fitted on these very images and are not used here; the row "fitted
on this pair" fits a transfer on three of the pair's 2×2 spatial blocks and predicts the fourth (what fitting on
one's own scanner units gives; optimistic, the blocks share the specimen).
Writes results/external_check.json and .md.
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.color import deltaE_ciede2000, rgb2lab

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (paths, loaders, the affine baseline, peers, save_results)

from shiftkit import ScannerTransfer, StainNormalizer  # noqa: E402

REGION = run.SHARED / "data" / "scanners5_same_region"
GRID = 4  # spatial regions per side for the bootstrap


def read(name):
    x = np.array(Image.open(REGION / f"{name}.png").convert("RGB"))
    return x[:236, :236]  # the scanners' common size


def block_delta_e(image, twin, scorer):
    """Per-block CIEDE2000 and tissue mask as score_pairs.tissue_delta_e computes them (its mean over the mask)."""
    lo, lt = rgb2lab(scorer.block8(image) / 255.0), rgb2lab(scorer.block8(twin) / 255.0)
    de, tissue = deltaE_ciede2000(lo, lt), lt[..., 0] < 85
    assert abs(float(de[tissue].mean()) - scorer.tissue_delta_e(image, twin)) < 1e-9
    return de, tissue


def region_bootstrap(de, base, tissue, n=2000, seed=0):
    """Mean difference over tissue blocks and a 95 % bootstrap interval resampling GRID×GRID spatial regions."""
    h, w = de.shape
    ys, xs = np.meshgrid(np.arange(h) * GRID // h, np.arange(w) * GRID // w, indexing="ij")
    region = (ys * GRID + xs)[tissue]
    d = (de - base)[tissue]
    sums = np.bincount(region, d, GRID * GRID)
    counts = np.bincount(region, minlength=GRID * GRID)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n):
        pick = rng.integers(0, GRID * GRID, GRID * GRID)
        boots.append(sums[pick].sum() / max(counts[pick].sum(), 1))
    return float(d.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def methods(src_train, dst_train, slides):
    """Every colour method fitted on all 60 pairs: name -> function of one uint8 image."""
    w = run.affine_fit(src_train, dst_train)
    st = ScannerTransfer.fit(src_train, dst_train, slides=list(slides), mpp=0.25, parts=("colour",), seed=0)
    un = ScannerTransfer.fit_unpaired(list(src_train), list(dst_train), parts=("colour",), seed=0)
    out = {"unnormalized": lambda x: x, "affine 3x4 sRGB (baseline)": lambda x: run.affine_apply(x, w),
           "ScannerTransfer (paired, colour)": lambda x: st.augment(x[None])[0],
           "ScannerTransfer (unpaired, colour)": lambda x: un.augment(x[None])[0]}
    for m in ("macenko", "vahadane"):
        norm = StainNormalizer(m).fit(list(dst_train))
        out[f"shiftkit {m} (target: the 60 twins)"] = lambda x, n=norm: n.normalize(x[None])[0]
    return out, st


def own_pair_blocks(x, y):
    """The transfer fitted on this very pair, each 2x2 spatial block predicted by a fit on the other three (the cut
    of ``ScannerTransfer.fit``'s single-pair cross-validation): what fitting on one's own scanner units gives, an
    optimistic bound since neighbouring blocks share the specimen."""
    r, c = 8 * round(x.shape[0] / 16), 8 * round(x.shape[1] / 16)  # cut at multiples of 8 px, as the fit cuts
    corners = ((0, 0), (0, c), (r, 0), (r, c))
    cut = lambda im: [im[:r, :c], im[:r, c:], im[r:, :c], im[r:, c:]]  # noqa: E731
    xs, ys, out = cut(x), cut(y), np.empty_like(x)
    for k, (oy, ox) in enumerate(corners):
        tr = [i for i in range(4) if i != k]
        t = ScannerTransfer.fit([xs[i] for i in tr], [ys[i] for i in tr], slides=tr, parts=("colour",), seed=0)
        out[oy:oy + xs[k].shape[0], ox:ox + xs[k].shape[1]] = t.augment(xs[k][None])[0]
    return out


def main():
    scorer = run.load_scorer(run.SHARED / "eval" / "score_pairs.py")
    ims = {n: read(n) for n in ("aperio", "nz2", "nz210")}
    cases = {"a2h": ("aperio", ("nz2", "nz210")), "h2a": ("nz2", ("aperio",))}
    table, data = [], {"region": str(REGION.relative_to(run.SHARED.parent)), "grid": GRID, "rows": []}
    failures = {}
    for direction, (src_name, twins) in cases.items():
        src, dst, slides = run.load_pairs(run.SHARED / "data" / "mitos_scanner_pairs_dev", direction)
        fns, st = methods(src, dst, slides)
        x = ims[src_name]
        outs = {k: f(x) for k, f in fns.items()}
        outs.update({k: v[0] for k, v in run.peers(x[None], dst, failures.setdefault(direction, {})).items()})
        c = st.profile["colour"]
        data.setdefault("colour_map", {})[direction] = f"{c['space']}-{c.get('out_space', c['space'])}-{c['degree']}"
        for twin in twins:
            y = ims[twin]
            outs["ScannerTransfer fitted on this pair (held-out 2x2 blocks)"] = own_pair_blocks(x, y)
            base, tissue = block_delta_e(outs["affine 3x4 sRGB (baseline)"], y, scorer)
            table += [f"\n### {direction}: {src_name}.png → scored against {twin}.png ({int(tissue.sum())} tissue blocks)\n",
                      "| method | CIEDE2000 | Δ vs affine [95 % region bootstrap] |", "|---|---|---|"]
            for k, o in outs.items():
                de, _ = block_delta_e(o, y, scorer)
                m, lo, hi = region_bootstrap(de, base, tissue)
                data["rows"].append({"direction": direction, "source": src_name, "twin": twin, "method": k,
                                     "delta_e2000": float(de[tissue].mean()), "delta_vs_affine": [m, lo, hi]})
                table.append(f"| {k} | {de[tissue].mean():.2f} | {m:+.2f} [{lo:+.2f}, {hi:+.2f}] |")
    data["peer_failures"] = failures
    lines = ["# External check: MITOS-fitted colour maps on the five-scanner region (another specimen)", "",
             "Fitted on all 60 MITOS dev pairs; applied to one canine SCC overview; colour only (µm/px unknown). "
             "Intervals resample 4×4 spatial regions of this one image. Colour maps chosen by the fit's CV: "
             f"{data['colour_map']}. Peer failures (scored unchanged): {failures}."] + table
    run.save_results("external_check", data, lines)


if __name__ == "__main__":
    main()
