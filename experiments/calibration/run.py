"""Which synthetic severity moves embeddings as much as a real scanner or centre change? (issue #8, item 3)

    python experiments/calibration/run.py [--models default random] [--out experiments/calibration/results]

For each encoder:

* **Real scanner change** (../shared/data/scanners5_same_region; the same region on 5 scanners, a 2 × 2 grid of
  112² crops each): the paired embedding movement ``1 − cos`` (centred cosine) between the same crop on two
  scanners, for each of the 10 scanner pairs.
* **Real centre change** (../shared/data/camelyon17_5centers; 4 crops of 224² from each of 3 tiles per centre):
  unpaired, so measured as the normalised centroid shift
  ``NCS(A, B) = ‖μ_A − μ_B‖ / mean_i ‖f_i − μ_A‖`` between centre 0 and each of centres 1–4.
* **Synthetic**: every registered shift at severities 1–5. The same movement measures are computed on the same
  images: ``1 − cos`` between each scanner crop and its shifted copy, and ``NCS`` between clean and shifted
  centre-0 crops.

Each shift's *equivalent severity* is where its movement curve (linear between severities, 0 at severity 0) first
reaches the median real movement. "> 5" means that even severity 5 moves embeddings less than the real change.
Outputs in ``results/``: ``calibration_<model>.png`` (curves per family with the real range as a band),
``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from shiftkit.metrics.functional import cosine_consistency

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from realdata import DATA, camelyon_crops, scanner_crops  # noqa: E402
SEVERITIES = (1, 2, 3, 4, 5)


def paired_movement(a: np.ndarray, b: np.ndarray, mu: np.ndarray) -> float:
    """Mean paired ``1 − cos`` of embeddings centred on ``mu``."""
    return float(np.mean(1 - cosine_consistency(a - mu, b - mu)))


def ncs(a: np.ndarray, b: np.ndarray) -> float:
    mu_a = a.mean(0)
    spread = np.mean(np.linalg.norm(a - mu_a, axis=1))
    return float(np.linalg.norm(mu_a - b.mean(0)) / max(spread, 1e-12))


def equivalent_severity(curve, target: float):
    xs = [0.0, *SEVERITIES]
    ys = [0.0, *curve]
    for i in range(1, len(xs)):
        if ys[i] >= target:
            lo, hi = ys[i - 1], ys[i]
            return round(xs[i - 1] + (target - lo) / (hi - lo) * (xs[i] - xs[i - 1]) if hi > lo else xs[i], 2)
    return None


def calibrate(model: str, scan: dict, cams: dict) -> dict:
    from shiftkit.core.rng import derive_seed
    from shiftkit.data.shifted import shift_tiles
    from shiftkit.models import load_encoder
    from shiftkit.shifts import get_spec, list_shifts

    enc = load_encoder(model)
    scan_x = torch.cat([scan[k] for k in sorted(scan)])
    scan_e = {k: enc.embed(v) for k, v in scan.items()}
    mu = np.concatenate(list(scan_e.values())).mean(0, keepdims=True)
    names = sorted(scan_e)
    real_scan = {f"{a}~{b}": paired_movement(scan_e[a], scan_e[b], mu) for i, a in enumerate(names) for b in names[i + 1:]}
    # scale reference: the same scanner, *different* tissue (crop i vs crop i+1 of the grid)
    content = float(np.mean([paired_movement(scan_e[k], np.roll(scan_e[k], 1, axis=0), mu) for k in names]))
    cam_e = {k: enc.embed(v) for k, v in cams.items()}
    real_cam = {f"center0~{k}": ncs(cam_e["center0"], cam_e[k]) for k in sorted(cam_e) if k != "center0"}
    src_cam = cams["center0"]
    clean_scan = enc.embed(scan_x)
    rows = {}
    for s in list_shifts():
        sc, cc = [], []
        for sev in SEVERITIES:
            ys, _ = shift_tiles(scan_x, s, sev, [derive_seed("calibration", s, sev, i) for i in range(len(scan_x))])
            sc.append(paired_movement(clean_scan, enc.embed(ys.clamp(0, 1)), mu))
            yc, _ = shift_tiles(src_cam, s, sev, [derive_seed("calibration-cam", s, sev, i) for i in range(len(src_cam))])
            cc.append(ncs(cam_e["center0"], enc.embed(yc.clamp(0, 1))))
        spec = get_spec(s)
        rows[s] = {"family": spec.family, "held_out": spec.held_out, "scanner_movement": sc, "centre_ncs": cc,
                   "equivalent_severity_scanner": equivalent_severity(sc, float(np.median(list(real_scan.values())))),
                   "equivalent_severity_scanner_min": equivalent_severity(sc, min(real_scan.values())),
                   "equivalent_severity_centre": equivalent_severity(cc, float(np.median(list(real_cam.values())))),
                   "equivalent_severity_centre_min": equivalent_severity(cc, min(real_cam.values()))}
    return {"model": model, "model_info": enc.info, "real_scanner_movement": real_scan, "real_centre_ncs": real_cam,
            "content_change_movement": content, "shifts": rows}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = sorted({r["family"] for r in res["shifts"].values()})
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, real, title in ((axes[0], "scanner_movement", res["real_scanner_movement"], "paired 1 − cos (scanners5)"),
                                 (axes[1], "centre_ncs", res["real_centre_ncs"], "normalised centroid shift (Camelyon17)")):
        vals = list(real.values())
        ax.axhspan(min(vals), max(vals), color="0.85", label="real change: range")
        ax.axhline(np.median(vals), color="k", lw=1.2, label="real change: median")
        if key == "scanner_movement":
            ax.axhline(res["content_change_movement"], color="k", lw=1, ls=":", label="other tissue, same scanner")
        for name, r in res["shifts"].items():
            c = cmap(fams.index(r["family"]) % 10)
            ax.plot([0, *SEVERITIES], [0, *r[key]], color=c, lw=1, alpha=0.8, ls="--" if r["held_out"] else "-")
        for i, f in enumerate(fams):
            ax.plot([], [], color=cmap(i % 10), label=f)
        ax.set_xlabel("severity")
        ax.set_title(title, fontsize=10)
    axes[1].legend(fontsize=7, loc="upper left", ncol=2)
    fig.suptitle(f"{res['model']}: synthetic severity vs real shift (dashed = held-out shifts)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["default", "random"])
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    if not (DATA / "scanners5_same_region").is_dir():
        sys.exit(f"needs ../shared/data (set SHIFTKIT_SHARED_DATA): {DATA} not found")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scan, cams = scanner_crops(), camelyon_crops()
    all_res, md = [], ["# Calibration: synthetic severity equivalent to a real scanner / centre change\n"]
    for model in args.models:
        t0 = time.time()
        res = calibrate(model, scan, cams)
        res["runtime_s"] = round(time.time() - t0, 1)
        plot(res, out / f"calibration_{model}.png")
        all_res.append(res)
        rs, rc = list(res["real_scanner_movement"].values()), list(res["real_centre_ncs"].values())
        md += [f"## `{model}` ({res['model_info'].get('architecture', '')})\n",
               f"Real scanner change, paired 1 − cos: median {np.median(rs):.3f} (range {min(rs):.3f}–{max(rs):.3f}, 10 pairs). "
               f"Real centre change, NCS: median {np.median(rc):.3f} (range {min(rc):.3f}–{max(rc):.3f}, 4 pairs). "
               f"Scale reference: another crop of the same scanner image moves {res['content_change_movement']:.3f}.\n",
               "Equivalent severity: where the shift's movement reaches the median real change (in brackets: the "
               "smallest real change).\n",
               "| shift | family | S5 movement (scanner / centre) | equivalent severity: scanner | centre |",
               "|---|---|---|---|---|"]
        for name, r in sorted(res["shifts"].items(), key=lambda kv: (kv[1]["family"], kv[0])):
            fmt = lambda v: "> 5" if v is None else f"{v:.1f}"  # noqa: E731
            md.append(f"| {name}{' (held-out)' if r['held_out'] else ''} | {r['family']} | "
                      f"{r['scanner_movement'][-1]:.3f} / {r['centre_ncs'][-1]:.3f} | "
                      f"{fmt(r['equivalent_severity_scanner'])} ({fmt(r['equivalent_severity_scanner_min'])}) | "
                      f"{fmt(r['equivalent_severity_centre'])} ({fmt(r['equivalent_severity_centre_min'])}) |")
        md.append(f"\n![calibration {model}](calibration_{model}.png)\n")
        print(f"{model}: {res['runtime_s']} s", flush=True)
    (out / "results.json").write_text(json.dumps(all_res, indent=2))
    (out / "results.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
