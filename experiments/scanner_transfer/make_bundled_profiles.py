#!/usr/bin/env python3
"""Fit the bundled colour-only scanner-transfer profiles from the five-scanner region (shared/data/scanners5_same_region).

The same canine SCC region on five scanners, one image each (about 236 x 237 px). Each image is cropped to the
common 236 x 236 and cut into a 2 x 2 grid of 118 px blocks; the blocks are the pairs, and the block position is the
cross-validation group (leave one spatial block out), because there is one pair per scanner. Colour only: the
images are downsampled overviews of unknown µm/px, so no MTF is fitted. Only the small parameter files are shipped
(shiftkit/shifts/profiles), with their source named; the images stay in shared/data (licence unverified).

    python experiments/scanner_transfer/make_bundled_profiles.py [--data ../shared/data] [--out shiftkit/shifts/profiles]
    python experiments/scanner_transfer/make_bundled_profiles.py --add-domain   # keep the shipped maps, add their domain

``--add-domain`` refits each shipped profile's own map only (its weights must come back unchanged) and writes the
input domain and the affine slope beyond it that fits now record into the shipped file, leaving its map and cross-validation report as they were
(a full refit picks CIELAB outputs at equal CV error, slower to apply).
"""
import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from shiftkit import ScannerTransfer

HERE = Path(__file__).resolve().parent
SOURCE = ("DeepMicroscopy/MultiScanner_SCC README figure (Wilm et al. 2023, canine cutaneous SCC, one region on five "
          "scanners), shared/data/scanners5_same_region; derived parameters only")
#: train profiles may be training views; held-out ones are kept for evaluation
FLAGS = {"nz210": False, "leica": False, "nz2": True, "3dhistech": True}
NAMES = {"aperio": "Aperio ScanScope CS2", "nz210": "Hamamatsu NanoZoomer S210", "nz2": "Hamamatsu NanoZoomer 2.0-HT",
         "3dhistech": "3DHistech Pannoramic 1000", "leica": "Leica Aperio GT 450"}


def blocks(img: np.ndarray, n: int = 2) -> list:
    s = img.shape[0] // n
    return [img[i * s:(i + 1) * s, j * s:(j + 1) * s] for i in range(n) for j in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(HERE.parents[2] / "shared" / "data" / "scanners5_same_region"))
    ap.add_argument("--out", default=str(HERE.parents[1] / "shiftkit" / "shifts" / "profiles"))
    ap.add_argument("--add-domain", action="store_true",
                    help="add the input domain and the slope beyond it to the shipped maps, unchanged")
    a = ap.parse_args(argv)
    data, out = Path(a.data), Path(a.out)
    imgs = {k: np.array(Image.open(data / f"{k}.png").convert("RGB")) for k in NAMES}
    side = min(min(x.shape[:2]) for x in imgs.values())
    imgs = {k: x[:side, :side] for k, x in imgs.items()}
    src = blocks(imgs["aperio"])
    for dst_name, held_out in FLAGS.items():
        if a.add_domain:
            path = out / f"scanners5-aperio-to-{dst_name}.json"
            shipped = json.loads(path.read_text())
            c = shipped["colour"]
            candidate = (c["space"], c.get("out_space", c["space"]), int(c["degree"]))
            t = ScannerTransfer.fit(src, blocks(imgs[dst_name]), parts=("colour",), slides=[0, 1, 2, 3], max_shift_px=24,
                                    colour_candidates=[candidate])
            diff = float(np.abs(np.asarray(t.profile["colour"]["weights"]) - np.asarray(c["weights"])).max())
            if diff > 1e-9:
                raise SystemExit(f"{path.name}: the refitted map differs from the shipped one by {diff:.2e}; refit in full")
            c["domain"], c["beyond_slope"] = t.profile["colour"]["domain"], t.profile["colour"]["beyond_slope"]
            shipped["fit"]["colour"]["domain_quantiles"] = t.profile["fit"]["colour"]["domain_quantiles"]
            path.write_text(json.dumps(shipped, indent=2))
            print(f"{path.name}: map {candidate} unchanged (max weight difference {diff:.1e}); domain {c['domain']}")
            continue
        t = ScannerTransfer.fit(src, blocks(imgs[dst_name]), parts=("colour",), slides=[0, 1, 2, 3],
                                name=f"scanners5-aperio-to-{dst_name}", held_out=held_out,
                                source=f"{NAMES['aperio']} -> {NAMES[dst_name]}: {SOURCE}", max_shift_px=24)
        path = t.save(out / f"scanners5-aperio-to-{dst_name}.json")
        c = t.profile["fit"]["colour"]
        print(f"{path.name}: {t.profile['fit']['used']}/{t.profile['fit']['pairs']} blocks, colour {c['chosen']}, "
              f"CV dE2000 {c['identity_delta_e2000']:.2f} -> {c['cv_delta_e2000_after']:.2f}, "
              f"{'held-out' if held_out else 'train'}")


if __name__ == "__main__":
    main()
