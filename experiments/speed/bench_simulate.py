"""`shiftkit simulate` throughput and peak memory on N tiles (cut from the bundled images), 3 shifts × 5 severities.

    python experiments/speed/bench_simulate.py --tiles 1000 5000

Each size runs in a fresh subprocess so that peak RSS (ru_maxrss) is measured independently; peak memory must
not grow with the number of tiles.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHIFTS = ["jpeg", "gaussian-defocus", "sensor-noise"]


def make_tiles(n: int, out: Path) -> None:
    import numpy as np

    from shiftkit.data import list_images, read_image, sample_path, sample_tiles_dir, write_image

    srcs = [read_image(p) for p in list_images(sample_tiles_dir())] + [read_image(sample_path("stardist"))]
    k = 0
    rng = np.random.default_rng(0)
    while k < n:  # random 224² crops (with flips) so that the tiles differ
        img = srcs[k % len(srcs)]
        h, w = img.shape[:2]
        y, x = rng.integers(0, max(1, h - 224 + 1)), rng.integers(0, max(1, w - 224 + 1))
        t = img[y : y + 224, x : x + 224]
        if t.shape[:2] != (224, 224):
            t = np.pad(t, ((0, 224 - t.shape[0]), (0, 224 - t.shape[1]), (0, 0)), mode="reflect")
        t = t[:, ::-1] if k % 2 else t
        write_image(out / f"{k // 1000:03d}" / f"tile_{k:06d}.png", np.ascontiguousarray(t))
        k += 1


def child(n: int) -> None:
    from shiftkit.data import simulate

    work = Path(tempfile.mkdtemp())
    try:
        make_tiles(n, work / "tiles")
        t0 = time.perf_counter()
        rep = simulate(work / "tiles", work / "out", SHIFTS, [1, 2, 3, 4, 5], seed=0, batch_size=64)
        dt = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"tiles": n, "outputs": rep.written, "seconds": dt, "outputs_per_s": rep.written / dt,
                          "tiles_per_s": n / dt, "peak_rss_mb": peak_mb}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiles", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--child", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.child is not None:
        return child(args.child)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_normalize import machine

    print("machine:", json.dumps(machine("cpu")))
    results = []
    for n in args.tiles:
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(rec)
        print(f"{n:6d} tiles x {len(SHIFTS)} shifts x 5 severities: {rec['outputs_per_s']:.1f} outputs/s "
              f"({rec['tiles_per_s']:.2f} source tiles/s), {rec['seconds']:.0f} s, peak RSS {rec['peak_rss_mb']:.0f} MB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine("cpu"), "results": results}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
