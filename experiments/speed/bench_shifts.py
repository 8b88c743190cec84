"""Shift kernels at severity 3 (batch 64, 224²): shiftkit next to a plain per-tile numpy/OpenCV version of the same
corruption (the way imagecorruptions implements them), same tiles, one process. shiftkit runs twice: the batched
float transform on float tiles ("float", as in a training pipeline after collation) and ``shift_tiles`` on the uint8
tiles with per-tile seeds ("uint8", what ``shiftkit simulate`` and the stress test run: the 8-bit CPU route where the
shift has one, else the float route and a rounding back). Where a plain version exists, the three run in
interleaved rounds (``paired_rates`` of bench_normalize, 0.2 s pause) and each ratio to the plain version is the
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
from bench_normalize import machine, paired_rates, summarize, tiles_224  # noqa: E402

import shiftkit  # noqa: E402
from shiftkit.data.shifted import shift_route, shift_tiles  # noqa: E402


def srgb_lin(x):
    return np.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)


def lin_srgb(x):
    x = np.clip(x, 0, 1)
    return np.where(x > 0.0031308, 1.055 * x ** (1 / 2.4) - 0.055, 12.92 * x)


def _disk(r):
    """shiftkit's anti-aliased pillbox (9×9 at r = 3), so that both sides apply the same PSF. A cruder plain
    circle (``cv2.circle`` into 7×7, aliased) costs 49 taps instead of 81: against it the 8-bit route ran at
    0.53× (run 2026-12-05, docs/benchmarks.md)."""
    from shiftkit.functional.scanner import disk_kernel

    return disk_kernel(torch.tensor([float(r)]))[0].float().numpy()


# plain per-tile versions on uint8 HWC tiles (severity-3 values of the registry)
def baselines():
    v = lambda n: shiftkit.get_shift(n, 3).values  # noqa: E731
    rng = np.random.default_rng(0)
    return {
        "gaussian-defocus": lambda t: cv2.GaussianBlur(t, (0, 0), v("gaussian-defocus")["sigma"]),
        "disk-defocus": lambda t, k=_disk(v("disk-defocus")["radius"]): cv2.filter2D(t, -1, k),
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
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().float().div_(255).to(args.device)
    x8 = torch.from_numpy(batch).permute(0, 3, 1, 2).to(args.device)  # uint8, as simulate stacks decoded tiles
    seeds = list(range(len(batch)))
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

        def run_u8(name=name):
            y = shift_tiles(x8, name, 3, seeds)[0]
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return y

        route = shift_route(name, x8)
        if name in base:
            runs = {"uint8": (run_u8, 64), "float": (run, 64), "plain": (lambda f=base[name]: [f(tile) for tile in batch], 64)}
            rates = paired_rates(runs, args.passes, pause=0.2)
            s8, sf = summarize(rates, "uint8"), summarize(rates, "float")
            plain = s8["plain"]["tiles_per_s"]
            rec = {"shift": name, "route": route, "uint8_tiles_per_s": s8["uint8"]["tiles_per_s"],
                   "float_tiles_per_s": sf["float"]["tiles_per_s"], "plain_tiles_per_s": plain,
                   "uint8_ratio_median": s8["plain"]["ratio_median"], "uint8_ratio_q1": s8["plain"]["ratio_q1"],
                   "uint8_ratio_q3": s8["plain"]["ratio_q3"], "float_ratio_median": sf["plain"]["ratio_median"],
                   "float_ratio_q1": sf["plain"]["ratio_q1"], "float_ratio_q3": sf["plain"]["ratio_q3"]}
            line = (f"{name:22s} [{route:9s}] uint8 {rec['uint8_tiles_per_s']:8.1f} tiles/s "
                    f"({rec['uint8_ratio_median']:5.2f}x plain, quartiles {rec['uint8_ratio_q1']:.2f}-{rec['uint8_ratio_q3']:.2f})   "
                    f"float {rec['float_tiles_per_s']:8.1f} ({rec['float_ratio_median']:5.2f}x)   plain {plain:8.1f}")
        else:
            rates = paired_rates({"uint8": (run_u8, 64), "float": (run, 64)}, args.passes, pause=0.2)
            rec = {"shift": name, "route": route, "uint8_tiles_per_s": summarize(rates, "uint8")["uint8"]["tiles_per_s"],
                   "float_tiles_per_s": summarize(rates, "uint8")["float"]["tiles_per_s"]}
            line = f"{name:22s} [{route:9s}] uint8 {rec['uint8_tiles_per_s']:8.1f} tiles/s   float {rec['float_tiles_per_s']:8.1f}"
        print(line, flush=True)
        records.append(rec)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(args.device), "records": records}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
