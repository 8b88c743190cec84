"""Shift kernels at severity 3 (batch 64, 224²): shiftkit batched next to a plain per-tile numpy/OpenCV version of
the same corruption (the way imagecorruptions implements them), same tiles, one process. Where a plain version
exists, the two run in interleaved rounds (``paired_rates`` of bench_normalize, 0.2 s pause) and the ratio is the
median of the per-round ratios with its quartiles; shifts without one get the median of ``--passes`` calls.

    python experiments/speed/bench_shifts.py [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_normalize import machine, paired_rates, summarize, tiles_224, timed  # noqa: E402

import shiftkit  # noqa: E402


def srgb_lin(x):
    return np.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)


def lin_srgb(x):
    x = np.clip(x, 0, 1)
    return np.where(x > 0.0031308, 1.055 * x ** (1 / 2.4) - 0.055, 12.92 * x)


def _disk(r):
    k = np.zeros((2 * int(np.ceil(r)) + 1,) * 2, np.float32)
    cv2.circle(k, (k.shape[0] // 2,) * 2, int(r), 1.0, -1)
    return k / k.sum()


# plain per-tile versions on uint8 HWC tiles (severity-3 values of the registry)
def baselines():
    v = lambda n: shiftkit.get_shift(n, 3).values  # noqa: E731
    rng = np.random.default_rng(0)
    return {
        "gaussian-defocus": lambda t: cv2.GaussianBlur(t, (0, 0), v("gaussian-defocus")["sigma"]),
        "disk-defocus": lambda t: cv2.filter2D(t, -1, _disk(v("disk-defocus")["radius"])),
        "motion-blur": lambda t: cv2.filter2D(t, -1, np.full((1, int(v("motion-blur")["length"])), 1 / int(v("motion-blur")["length"]), np.float32)),
        "sensor-noise": lambda t: (lin_srgb(rng.poisson(srgb_lin(t / 255) * 200) / 200 + rng.normal(0, 0.008, t.shape)) * 255).astype(np.uint8),
        "exposure": lambda t: (lin_srgb(srgb_lin(t / 255) * 1.2) * 255).astype(np.uint8),
        "gamma": lambda t: ((t / 255) ** 1.35 * 255).astype(np.uint8),
        "saturation": lambda t: cv2.cvtColor(np.clip(cv2.cvtColor(t, cv2.COLOR_RGB2HSV).astype(np.float32) * [1, 1.5, 1], 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB),
        "jpeg": lambda t: cv2.imdecode(cv2.imencode(".jpg", t, [cv2.IMWRITE_JPEG_QUALITY, 70])[1], cv2.IMREAD_COLOR),
        "jpeg2000": lambda t: cv2.imdecode(cv2.imencode(".jp2", t, [cv2.IMWRITE_JPEG2000_COMPRESSION_X1000, 29])[1], cv2.IMREAD_COLOR),
        "resample": lambda t: cv2.resize(cv2.resize(t, (179, 179), interpolation=cv2.INTER_AREA), (224, 224), interpolation=cv2.INTER_CUBIC),
        "section-thickness": lambda t: (np.exp(-1.5 * -np.log(np.maximum(t / 255, 1 / 255))) * 255).astype(np.uint8),
        "vignetting": lambda t: t,  # placeholder replaced below
    }



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--passes", type=int, default=7, help="rounds (pairs) or calls (shifts without a plain version)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    batch = tiles_224(64)
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255).to(args.device)
    base = baselines()
    yy, xx = np.mgrid[-1:1:224j, -1:1:224j]
    gain = (1 - 0.07 * (xx**2 + yy**2) / 2)[..., None]
    base["vignetting"] = lambda t: (lin_srgb(srgb_lin(t / 255) * gain) * 255).astype(np.uint8)
    print(f"machine: {json.dumps(machine(args.device))}")
    records = []
    for name in shiftkit.list_shifts():
        t = shiftkit.get_shift(name, 3, seed=0).to(args.device)

        def run():
            y = t(x)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return y

        if name in base:
            pair = {"shiftkit": (run, 64), "plain": (lambda f=base[name]: [f(tile) for tile in batch], 64)}
            summ = summarize(paired_rates(pair, args.passes, pause=0.2), "shiftkit")
            ours, plain = summ["shiftkit"]["tiles_per_s"], summ["plain"]["tiles_per_s"]
            r = summ["plain"]
            rec = {"shift": name, "shiftkit_tiles_per_s": ours, "plain_tiles_per_s": plain,
                   "ratio_median": r["ratio_median"], "ratio_q1": r["ratio_q1"], "ratio_q3": r["ratio_q3"]}
            line = (f"{name:22s} shiftkit {ours:9.1f} tiles/s   plain numpy/OpenCV {plain:9.1f} tiles/s   "
                    f"ratio {r['ratio_median']:5.2f}x (quartiles {r['ratio_q1']:.2f}-{r['ratio_q3']:.2f})")
        else:
            ours = 64 / timed(run, args.passes)
            rec = {"shift": name, "shiftkit_tiles_per_s": ours}
            line = f"{name:22s} shiftkit {ours:9.1f} tiles/s"
        print(line, flush=True)
        records.append(rec)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(args.device), "records": records}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
