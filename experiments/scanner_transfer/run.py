#!/usr/bin/env python3
"""Real scanner shift, leave one slide out: how close does each method bring one scanner's crops to the real twins?

    python experiments/scanner_transfer/run.py [--direction a2h|h2a|both] [--pairs ../shared/data/mitos_scanner_pairs_dev]

Data: the 60 registered MITOS-ATYPIA-14 pairs (Aperio XT / Hamamatsu 2.0-HT, slides 03, 04, 05). For each held-out
slide, everything fitted (targets, maps, transfers) sees only the other two slides. Outputs are scored by the
functions of shared/eval/score_pairs.py (CIEDE2000 of 8x8 block means over tissue; sharpness ratio to the twin).
Writes results/results.json, results/results.md and results/scanner_transfer.png. Nothing fitted here ships.
"""
import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

import shiftkit
from shiftkit import ScannerTransfer, StainNormalizer
from shiftkit.functional.transfer import pair_offset

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared"


def load_scorer(path: Path):
    spec = importlib.util.spec_from_file_location("score_pairs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_pairs(folder: Path, direction: str):
    a_files = sorted((folder / "aperio").glob("A*.png"))
    h_files = [folder / "hamamatsu" / ("H" + f.name[1:]) for f in a_files]
    rd = lambda p: np.array(Image.open(p).convert("RGB"))  # noqa: E731
    a, h = np.stack([rd(p) for p in a_files]), np.stack([rd(p) for p in h_files])
    slides = np.array([f.name[1:3] for f in a_files])
    return (a, h, slides) if direction == "a2h" else (h, a, slides)


def moved_twin(a, b):
    """The twin ``b`` moved onto ``a``'s grid by the pair's phase-correlation offset (bilinear, reflected border): what a
    perfect transfer of ``a`` would give, since every transfer keeps ``a``'s geometry — its distance to ``b`` is the
    misregistration's alone."""
    dx, dy, _ = pair_offset(a, b)  # b[p + d] ≈ a[p]
    m = np.float32([[1, 0, -dx], [0, 1, -dy]])
    return cv2.warpAffine(b, m, (b.shape[1], b.shape[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def affine_fit(src, dst):
    """The baseline: a full 3x4 least-squares map in sRGB on every pixel of the training pairs."""
    x = np.concatenate([src.reshape(-1, 3) / 255.0, np.ones((src.size // 3, 1))], axis=1)
    y = dst.reshape(-1, 3) / 255.0
    return np.linalg.lstsq(x, y, rcond=None)[0]


def affine_apply(img, w):
    x = np.concatenate([img.reshape(-1, 3) / 255.0, np.ones((img.size // 3, 1))], axis=1)
    return np.clip(x @ w * 255, 0, 255).round().astype(np.uint8).reshape(img.shape)


def peers(src_test, target_images, failures):
    """staintools Macenko/Vahadane and torchstain Macenko, per tile, target fitted on the pooled training twins. A
    tile a peer raises on is scored unchanged (its failure mode) and counted in ``failures``."""
    out = {}
    try:
        import staintools

        tgt = np.concatenate([t for t in target_images], axis=1)  # one wide image = pooled target
        for m in ("macenko", "vahadane"):
            n = staintools.StainNormalizer(method=m)
            n.fit(tgt)
            res = []
            for x in src_test:
                try:
                    res.append(n.transform(x))
                except Exception:  # staintools raises on some tiles: scored unchanged, counted
                    res.append(x)
                    failures[f"staintools {m} (per tile)"] = failures.get(f"staintools {m} (per tile)", 0) + 1
            out[f"staintools {m} (per tile)"] = np.stack(res)
    except ImportError:
        pass
    try:
        import torch
        import torchstain

        n = torchstain.normalizers.MacenkoNormalizer(backend="torch")
        n.fit(torch.from_numpy(np.concatenate([t for t in target_images], axis=1)).permute(2, 0, 1).float())
        res = []
        for x in src_test:
            try:
                y, _, _ = n.normalize(torch.from_numpy(x).permute(2, 0, 1).float(), stains=False)
                res.append(np.clip(y.numpy(), 0, 255).astype(np.uint8))
            except Exception:
                res.append(x)
                failures["torchstain macenko (per tile)"] = failures.get("torchstain macenko (per tile)", 0) + 1
        out["torchstain macenko (per tile)"] = np.stack(res)
    except ImportError:
        pass
    return out


def run_direction(direction, folder, scorer, rows, timings, failures):
    src, dst, slides = load_pairs(folder, direction)
    for s in sorted(set(slides)):
        tr, te = slides != s, slides == s
        outs = {"unnormalized": src[te]}
        for m in ("macenko", "vahadane"):
            norm = StainNormalizer(m).fit(list(dst[tr]))
            outs[f"shiftkit {m} (per tile)"] = norm.normalize(src[te])
            outs[f"shiftkit {m} (pooled source, slide)"] = norm.normalize(src[te], source="pooled")
            cohort = norm.pooled_source(src)
            outs[f"shiftkit {m} (pooled source, cohort)"] = norm.normalize(src[te], source=cohort)
            # which half of the pooled estimate matters: the slide's stain vectors with the cohort's intensity scale
            outs[f"shiftkit {m} (slide stains, cohort intensity)"] = norm.normalize(src[te], source=dataclasses.replace(
                norm.pooled_source(src[te]), max_concentrations=cohort.max_concentrations))
            # the target's intensity scale from the median training twin instead of the pooled percentile
            med = StainNormalizer(m).fit(list(dst[tr]), intensity="median")
            outs[f"shiftkit {m} (per tile, median-intensity target)"] = med.normalize(src[te])
            outs[f"shiftkit {m} (pooled source, slide, median-intensity target)"] = med.normalize(src[te], source="pooled")
        outs.update(peers(src[te], dst[tr], failures.setdefault(direction, {})))
        w = affine_fit(src[tr], dst[tr])
        outs["affine 3x4 sRGB (baseline)"] = np.stack([affine_apply(x, w) for x in src[te]])
        t0 = time.perf_counter()
        st = ScannerTransfer.fit(src[tr], dst[tr], slides=list(slides[tr]), mpp=0.25, parts=("colour", "mtf", "noise"),
                                seed=0)  # the noise part's draws: reproducible
        timings.append(time.perf_counter() - t0)
        outs["ScannerTransfer (paired)"] = st.augment(src[te])
        outs["ScannerTransfer (paired, colour only)"] = ScannerTransfer(
            {**st.profile, "parts": ["colour"]}, seed=0).augment(src[te])
        # the colour fit's loss: least absolute residual lengths alone, and both losses cross-validated
        for label, losses in (("L1 colour fit", ("l1",)), ("colour loss by CV", ("l2", "l1"))):
            alt = ScannerTransfer.fit(src[tr], dst[tr], slides=list(slides[tr]), mpp=0.25, parts=("colour", "mtf", "noise"),
                                      colour_losses=losses, seed=0)
            outs[f"ScannerTransfer (paired, {label})"] = alt.augment(src[te])
        matched = ScannerTransfer.fit(src[tr], dst[tr], slides=list(slides[tr]), mpp=0.25, parts=("colour", "mtf", "noise"),
                                      mtf_mode="matched", seed=0)
        outs["ScannerTransfer (paired, matched MTF)"] = matched.augment(src[te])
        un = ScannerTransfer.fit_unpaired(list(src[tr]), list(dst[tr]), mpp=0.25, seed=0)
        outs["ScannerTransfer (unpaired)"] = un.augment(src[te])
        outs["per-pair affine (floor)"] = np.stack([affine_apply(x, affine_fit(x[None], y[None])) for x, y in zip(src[te], dst[te])])
        for name, o in outs.items():
            for i, (x, y) in enumerate(zip(o, dst[te])):
                rows.append({"direction": direction, "slide": s, "crop": int(np.where(te)[0][i]), "method": name,
                             "delta_e2000": scorer.tissue_delta_e(x, y),
                             "sharpness_ratio": scorer.sharpness(x) / scorer.sharpness(y)})
        print(f"{direction} slide {s}: {len(outs)} methods scored", flush=True)


def bootstrap_diff(a, b, n=2000, seed=0):
    d = np.asarray(a) - np.asarray(b)
    rng = np.random.default_rng(seed)
    boots = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(n)]
    return float(d.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def loso_dev_pairs(direction, scorer, folder=None):
    """The side experiments' loop: the MITOS dev pairs in ``direction``, leave one slide out. Yields
    ``(slide, train mask, test mask, src, dst, slides, the affine baseline's CIEDE2000 per held-out crop)``."""
    src, dst, slides = load_pairs(Path(folder) if folder else SHARED / "data" / "mitos_scanner_pairs_dev", direction)
    for s in sorted(set(slides)):
        tr, te = slides != s, slides == s
        yield str(s), tr, te, src, dst, slides, affine_scores(src, dst, tr, te, scorer)


def affine_scores(src, dst, tr, te, scorer):
    """The baseline's CIEDE2000 per held-out crop: the 3x4 affine sRGB map fitted on the training pairs."""
    w = affine_fit(src[tr], dst[tr])
    return [scorer.tissue_delta_e(affine_apply(x, w), y) for x, y in zip(src[te], dst[te])]


def against_baseline(scores, base):
    """Mean CIEDE2000 and the paired difference to the baseline with its bootstrap 95 % CI, for the side experiments."""
    return {"mean": float(np.mean(scores)), "delta_vs_affine": list(bootstrap_diff(np.array(scores), np.array(base)))}


def cells(x):
    """Markdown cells 'mean | Δ [lo, hi]' of an :func:`against_baseline` record."""
    d = x["delta_vs_affine"]
    return f"{x['mean']:.2f} | {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]"


def save_results(stem, data, lines):
    """Write results/STEM.json and results/STEM.md and print the markdown."""
    (HERE / "results" / f"{stem}.json").write_text(json.dumps(data, indent=1))
    (HERE / "results" / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def summarise(rows):
    out = {}
    for direction in sorted({r["direction"] for r in rows}):
        rs = [r for r in rows if r["direction"] == direction]
        methods = list(dict.fromkeys(r["method"] for r in rs))
        slides = sorted({r["slide"] for r in rs})
        base = {r["crop"]: r["delta_e2000"] for r in rs if r["method"] == "affine 3x4 sRGB (baseline)"}
        unnorm = {(r["slide"], r["crop"]): r["delta_e2000"] for r in rs if r["method"] == "unnormalized"}
        table = {}
        for m in methods:
            mr = [r for r in rs if r["method"] == m]
            crops = [r["crop"] for r in mr]
            table[m] = {
                "delta_e2000": float(np.mean([r["delta_e2000"] for r in mr])),
                "per_slide": {s: float(np.mean([r["delta_e2000"] for r in mr if r["slide"] == s])) for s in slides},
                "sharpness_ratio": float(np.mean([r["sharpness_ratio"] for r in mr])),
                "sharpness_per_slide": {s: float(np.mean([r["sharpness_ratio"] for r in mr if r["slide"] == s])) for s in slides},
                "minus_baseline": bootstrap_diff([r["delta_e2000"] for r in mr], [base[c] for c in crops]),
                "worse_than_unnormalized_on": [s for s in slides if np.mean([r["delta_e2000"] for r in mr if r["slide"] == s])
                                               > np.mean([unnorm[(s, c)] for (sl, c) in unnorm if sl == s])],
            }
        out[direction] = table
    return out


def write_markdown(summary, path, fit_s, failures):
    lines = ["# Scanner transfer, leave one slide out (MITOS-ATYPIA-14 dev pairs)", "",
             "Mean CIEDE2000 of 8x8 block means over tissue (lower is better) per held-out slide; sharpness = "
             "Laplacian variance of the output / the twin's (1 = matched), mean over crops (per slide in brackets). Δ vs baseline: mean paired difference to the "
             "3x4 affine sRGB map over the 60 crops, bootstrap 95 % CI.", "",
             f"ScannerTransfer.fit on 40 pairs: {np.mean(fit_s):.1f} s (mean of {len(fit_s)} fits).",
             "Tiles a peer raised on, scored unchanged: " + (json.dumps(failures) if any(failures.values()) else "none")
             + ".", ""]
    for direction, table in summary.items():
        slides = list(next(iter(table.values()))["per_slide"])
        lines += [f"## {direction}", "", "| method | " + " | ".join(f"slide {s}" for s in slides)
                  + " | mean | Δ vs baseline [95% CI] | sharpness |", "|---|" + "---|" * (len(slides) + 3)]
        for m, v in table.items():
            d = v["minus_baseline"]
            lines.append(f"| {m} | " + " | ".join(f"{v['per_slide'][s]:.2f}" for s in slides)
                         + f" | {v['delta_e2000']:.2f} | {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] | {v['sharpness_ratio']:.2f} ("
                         + "/".join(f"{v['sharpness_per_slide'][s]:.2f}" for s in slides) + ") |")
        lines.append("")
    path.write_text("\n".join(lines))


def figure(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(7 * len(summary), 5), squeeze=False)
    for ax, (direction, table) in zip(axes[0], summary.items()):
        names = list(table)
        vals = [table[n]["delta_e2000"] for n in names]
        ax.barh(range(len(names)), vals, color=["tab:blue" if "ScannerTransfer" in n else "tab:gray" for n in names])
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("mean CIEDE2000 to the real twin (↓), leave one slide out")
        ax.set_title(direction)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default=str(SHARED / "data" / "mitos_scanner_pairs_dev"))
    ap.add_argument("--scorer", default=str(SHARED / "eval" / "score_pairs.py"))
    ap.add_argument("--direction", choices=("a2h", "h2a", "both"), default="both")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    folder, out = Path(a.pairs), Path(a.out)
    if not folder.is_dir():
        sys.exit(f"no pairs at {folder}")
    out.mkdir(parents=True, exist_ok=True)
    scorer = load_scorer(Path(a.scorer))
    rows, fit_s, failures = [], [], {}
    for direction in (("a2h", "h2a") if a.direction == "both" else (a.direction,)):
        run_direction(direction, folder, scorer, rows, fit_s, failures)
    summary = summarise(rows)
    (out / "results.json").write_text(json.dumps({"summary": summary, "rows": rows, "fit_seconds": fit_s,
                                                  "peer_failures_scored_unchanged": failures,
                                                  "shiftkit": shiftkit.__version__}, indent=1))
    write_markdown(summary, out / "results.md", fit_s, failures)
    figure(summary, out / "scanner_transfer.png")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
