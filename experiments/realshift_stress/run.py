"""Stress test on real multi-centre and multi-scanner data (issue #6, item 7).

    python experiments/realshift_stress/run.py [--model default] [--out experiments/realshift_stress/results]

* Camelyon17, 5 centres (../shared/data/camelyon17_5centers): 15 tiles of 512² → 60 crops of 224², site = centre,
  slide = source tile (bootstrap over slides). Synthetic shifts + site predictability.
* Five scanners, same tissue (../shared/data/scanners5_same_region): a 2 × 2 grid of 112² crops per scanner image,
  pair_id = grid position, condition = scanner → paired cosine and top-k retrieval across every scanner pair.

Tiles are cut into a scratch folder outside the repository (the data stays in ../shared); the committed results
are records, run descriptions, the HTML reports (plots only) and Markdown summaries, with no image thumbnails.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
from pathlib import Path


from shiftkit.data import read_image, write_image
from shiftkit.report import build_report
from shiftkit.stress import run_stress_test

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("SHIFTKIT_SHARED_DATA", HERE.parents[2] / "shared" / "data"))


def camelyon(work: Path) -> Path:
    rows = []
    for p in sorted((DATA / "camelyon17_5centers").glob("center*.png")):
        img = read_image(p)
        centre = p.stem.split("_")[0]
        for y in (0, 288):
            for x in (0, 288):
                name = f"{p.stem}_{y}_{x}.png"
                write_image(work / "camelyon" / name, img[y : y + 224, x : x + 224])
                rows.append([name, centre, p.stem])
    with open(work / "camelyon" / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "site", "slide"])
        w.writerows(rows)
    return work / "camelyon" / "manifest.csv"


def scanners(work: Path) -> Path:
    rows = []
    for p in sorted((DATA / "scanners5_same_region").glob("*.png")):
        img = read_image(p)
        for gy in range(2):
            for gx in range(2):
                name = f"{p.stem}_{gy}{gx}.png"
                write_image(work / "scanners" / name, img[gy * 112 : gy * 112 + 112, gx * 112 : gx * 112 + 112])
                rows.append([name, f"{gy}{gx}", p.stem, p.stem])
    with open(work / "scanners" / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "pair_id", "condition", "scanner"])
        w.writerows(rows)
    return work / "scanners" / "manifest.csv"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--shifts", default="*")
    args = ap.parse_args(argv)
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="shiftkit-realshift-"))
    try:
        cam = camelyon(work)
        run_stress_test(args.model, cam, out / "camelyon17", shifts=[args.shifts], severities=[1, 3, 5],
                        label_column=None, site_column="site", gallery=False)
        build_report(out / "camelyon17")
        sc = scanners(work)
        run_stress_test(args.model, sc, out / "scanners5", shifts=["gaussian-defocus", "jpeg", "stain-hue", "color-profile"],
                        severities=[1, 3, 5], label_column=None, site_column="scanner", gallery=False)
        build_report(out / "scanners5")
        for sub in ("camelyon17", "scanners5"):  # embeddings are derived from data that stays in ../shared
            shutil.rmtree(out / sub / "embeddings", ignore_errors=True)
        print("wrote", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
