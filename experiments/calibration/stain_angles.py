"""How far do the stain vectors turn under a real scanner change? The physical anchor of the stain-hue severity
table and the StainAugment presets (issue #16, item 5; severity tables version 2).

    python experiments/calibration/stain_angles.py        # ~20 s on this project's 2-core CPU

For each slide of ../shared/data/mitos_scanner_pairs_dev (the same fields scanned on an Aperio ScanScope XT and a
Hamamatsu NanoZoomer 2.0-HT), one stain matrix per scanner is estimated from the tissue of all 20 crops of the
slide (``estimate_stains_pooled``, Macenko and Vahadane), and the angle between the two scanners' haematoxylin
and eosin vectors is reported. The same for the five-scanner region (../shared/data/scanners5_same_region), each
scanner against the Aperio image. Slides 03 and 04 set the table; slide 05 (held out of the pretraining study)
is reported as a check. Writes ``results/stain_angles.json`` and ``results/stain_angles.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import shiftkit
from shiftkit.data import read_image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from realdata import DATA  # noqa: E402

METHODS = ("macenko", "vahadane")
CALIBRATION_SLIDES = ("03", "04")


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    return float(np.degrees(np.arccos(np.clip(a @ b, -1.0, 1.0))))


def _tiles(paths) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.ascontiguousarray(read_image(p)[..., :3])).permute(2, 0, 1) for p in paths])


def _angles(src: torch.Tensor, dst: torch.Tensor, method: str) -> dict:
    ma = shiftkit.estimate_stains_pooled(src, method=method).matrix[0].numpy()
    mb = shiftkit.estimate_stains_pooled(dst, method=method).matrix[0].numpy()
    return {"H": round(_angle(ma[0], mb[0]), 2), "E": round(_angle(ma[1], mb[1]), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    mitos = DATA / "mitos_scanner_pairs_dev"
    if not mitos.is_dir():
        print(f"needs {mitos} (the MITOS pairs of ../shared/data)", file=sys.stderr)
        return 2
    rows = []
    slides = sorted({p.name[1:3] for p in (mitos / "aperio").glob("A*.png")})
    for slide in slides:
        a = _tiles(sorted((mitos / "aperio").glob(f"A{slide}*.png")))
        h = _tiles(sorted((mitos / "hamamatsu").glob(f"H{slide}*.png")))
        for m in METHODS:
            rows.append({"data": "mitos", "pair": f"slide {slide}: Aperio XT -> Hamamatsu 2.0-HT", "slide": slide,
                         "method": m, "n_tiles": len(a), "calibration": slide in CALIBRATION_SLIDES, **_angles(a, h, m)})
    s5 = DATA / "scanners5_same_region"
    if s5.is_dir():
        imgs = {p.stem: read_image(p)[..., :3] for p in sorted(s5.glob("*.png"))}
        hh, ww = min(i.shape[0] for i in imgs.values()), min(i.shape[1] for i in imgs.values())
        t = {k: torch.from_numpy(np.ascontiguousarray(v[:hh, :ww])).permute(2, 0, 1)[None] for k, v in imgs.items()}
        for name in sorted(t):
            if name == "aperio":
                continue
            for m in METHODS:
                rows.append({"data": "scanners5", "pair": f"aperio -> {name}", "slide": None, "method": m,
                             "n_tiles": 1, "calibration": False, **_angles(t["aperio"], t[name], m)})
    cal = [r for r in rows if r["calibration"]]
    summary = {m: {"E_max": max(r["E"] for r in cal if r["method"] == m), "H_max": max(r["H"] for r in cal if r["method"] == m)}
               for m in METHODS}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stain_angles.json").write_text(json.dumps({"rows": rows, "calibration_slides": CALIBRATION_SLIDES,
                                                       "summary": summary}, indent=1))
    md = ["# Stain-vector rotation under a real scanner change", "",
          "Angle (degrees) between one scanner's pooled stain vector and the other's, same tissue. "
          f"Calibration rows: MITOS slides {', '.join(CALIBRATION_SLIDES)}.", "",
          "| data | pair | method | H ° | E ° | calibration |", "|---|---|---|---|---|---|"]
    md += [f"| {r['data']} | {r['pair']} | {r['method']} | {r['H']:.1f} | {r['E']:.1f} | {'yes' if r['calibration'] else ''} |"
           for r in rows]
    md += ["", "Largest rotation on the calibration slides: " + "; ".join(
        f"{m} H {s['H_max']:.1f}°, E {s['E_max']:.1f}°" for m, s in summary.items()) + "."]
    (out / "stain_angles.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
