"""Normalization quality on real shift: shiftkit next to staintools, torchstain and tiatoolbox, same images.

    python experiments/realshift/normalization_quality.py [--out experiments/realshift/results]

Cases: the five scanners of ../shared/data/scanners5_same_region (each normalized to the Aperio image), and
Camelyon17 tiles of centres 1–4 (each normalized to a target pooled from the three centre-0 tiles).
Metrics per output (tissue = luminosity mask of the source):
  * dE2000: CIEDE2000 between the mean tissue colour (CIELAB) of the output and of the target (↓);
  * ssim_structure: SSIM between the summed optical density of the output and of the source (structure kept, ↑);
  * angle_h / angle_e: angles (degrees) between the Macenko H and E vectors of the output and of the target (↓).
Peers that are not importable are listed as missing. Run it from an environment that has them all (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import structural_similarity

from shiftkit import StainNormalizer, estimate_stains
from shiftkit.data import read_image
from shiftkit.stain import stain_angles, tissue_mask

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("SHIFTKIT_SHARED_DATA", HERE.parents[2] / "shared" / "data"))


def methods():
    out = {f"shiftkit/{m}": (lambda m: lambda tgt: StainNormalizer(m).fit(tgt))(m) for m in ("macenko", "vahadane", "reinhard")}
    try:
        import staintools

        def st(m):
            def fit(tgt):
                n = staintools.ReinhardColorNormalizer() if m == "reinhard" else staintools.StainNormalizer(method=m)
                n.fit(tgt)
                return n.transform
            return fit
        out.update({f"staintools/{m}": st(m) for m in ("macenko", "vahadane", "reinhard")})
    except ImportError:
        print("missing: staintools")
    try:
        import torchstain

        def ts(m):
            def fit(tgt):
                n = torchstain.normalizers.MacenkoNormalizer(backend="numpy") if m == "macenko" else torchstain.normalizers.ReinhardNormalizer(backend="numpy")
                n.fit(tgt)
                return (lambda img: np.asarray(n.normalize(I=img)[0] if m == "macenko" else n.normalize(I=img)).astype(np.uint8))
            return fit
        out.update({f"torchstain/{m}": ts(m) for m in ("macenko", "reinhard")})
    except ImportError:
        print("missing: torchstain")
    try:
        from tiatoolbox.tools.stainnorm import get_normalizer

        def tia(m):
            def fit(tgt):
                n = get_normalizer(m)
                n.fit(tgt)
                return n.transform
            return fit
        out.update({f"tiatoolbox/{m}": tia(m) for m in ("macenko", "vahadane", "reinhard")})
    except ImportError:
        print("missing: tiatoolbox")
    return out


def tissue(img):
    return tissue_mask(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)[0, 0].numpy() > 0


def metrics(src, out, tgt, tgt_matrix):
    m_src, m_tgt = tissue(src), tissue(tgt)
    lab_out = rgb2lab(out)[m_src].mean(0)
    lab_tgt = rgb2lab(tgt)[m_tgt].mean(0)
    de = float(deltaE_ciede2000(lab_out[None], lab_tgt[None])[0])
    od = lambda x: -np.log(np.clip(x / 255.0, 1 / 255, 1)).sum(-1)  # noqa: E731
    ssim = float(structural_similarity(od(src), od(out), data_range=float(od(src).max() - od(src).min() + 1e-6)))
    est = estimate_stains(out, "macenko")
    ang = stain_angles(est.matrix.double(), tgt_matrix.double())[0].tolist() if est.status == ["ok"] else [float("nan")] * 2
    return {"dE2000": de, "ssim_structure": ssim, "angle_h": ang[0], "angle_e": ang[1]}


def cases():
    sc = DATA / "scanners5_same_region"
    ref = read_image(sc / "aperio.png")
    for p in sorted(sc.glob("*.png")):
        if p.stem != "aperio":
            yield "scanners5", p.stem, read_image(p), ref
    cam = DATA / "camelyon17_5centers"
    target = np.concatenate([read_image(p) for p in sorted(cam.glob("center0_*.png"))], axis=1)  # pooled target
    for p in sorted(cam.glob("center*.png")):
        if not p.stem.startswith("center0"):
            yield "camelyon17", p.stem, read_image(p), target


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meths = methods()
    rows = []
    fitted = {}
    for dataset, name, src, tgt in cases():
        tgt_matrix = estimate_stains(tgt, "macenko").matrix
        base = metrics(src, src, tgt, tgt_matrix)
        rows.append({"dataset": dataset, "source": name, "method": "none (input)", **base, "error": ""})
        for mname, make in meths.items():
            key = (dataset, mname)
            try:
                if key not in fitted:
                    fitted[key] = make(tgt)
                res = np.asarray(fitted[key](src)).astype(np.uint8)
                rows.append({"dataset": dataset, "source": name, "method": mname, **metrics(src, res, tgt, tgt_matrix), "error": ""})
            except Exception as exc:
                rows.append({"dataset": dataset, "source": name, "method": mname, "dE2000": None, "ssim_structure": None,
                             "angle_h": None, "angle_e": None, "error": f"{type(exc).__name__}: {str(exc)[:80]}"})
    with open(out / "normalization_quality.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    # summary: mean per dataset and method
    lines = ["| dataset | method | mean ΔE2000 to target ↓ | mean SSIM of OD structure ↑ | mean H angle ° ↓ | mean E angle ° ↓ | failures |",
             "|---|---|---|---|---|---|---|"]
    summary = []
    for dataset in ("scanners5", "camelyon17"):
        for mname in ["none (input)"] + list(meths):
            sel = [r for r in rows if r["dataset"] == dataset and r["method"] == mname]
            ok = [r for r in sel if not r["error"]]
            mean = lambda k: float(np.nanmean([r[k] for r in ok])) if ok else float("nan")  # noqa: E731
            rec = {"dataset": dataset, "method": mname, **{k: mean(k) for k in ("dE2000", "ssim_structure", "angle_h", "angle_e")},
                   "failures": len(sel) - len(ok), "n": len(sel)}
            summary.append(rec)
            lines.append(f"| {dataset} | {mname} | {rec['dE2000']:.2f} | {rec['ssim_structure']:.3f} | {rec['angle_h']:.1f} | "
                         f"{rec['angle_e']:.1f} | {rec['failures']}/{rec['n']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
