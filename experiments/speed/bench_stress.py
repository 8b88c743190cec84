#!/usr/bin/env python3
"""The stress test at scale: clean-pass embedding rate against a plain timm loop, and peak memory against tile count.

    python experiments/speed/bench_stress.py [--sizes 500,2000,8000] [--rounds 3] [--out results/stress_cpu.json]

1. Overhead: the stress test's clean pass (run_stress_test with no shift: stream, embed, store, metrics) against a
   plain loop over the same DataLoader, tiles and model (resize, normalise, forward), for ResNet-10t (the bundled
   encoder) and a random ViT-S/16 (timm:vit_small_patch16_224), in interleaved rounds. Target: overhead <= 10 %.
2. Memory: peak RSS of a whole stress test (bundled encoder, one shift and severity, no reference, no gallery) at
   each size, each in a fresh process. The tiles are the 18 bundled ones listed again and again in a manifest
   (overlapping data is fine for memory). Target: flat in the number of tiles beyond the embeddings.
3. Report: build time and size of report.html at the largest size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_normalize import machine  # noqa: E402


def manifest(folder: Path, n: int) -> Path:
    from shiftkit.data import sample_tiles_dir

    rows = [line for line in (sample_tiles_dir() / "manifest.csv").read_text().splitlines()[1:] if line.strip()]
    src = sample_tiles_dir()
    lines = ["path,label"] + [f"{src / r.split(',')[0]},{r.split(',')[1]}" for r in (rows * (n // len(rows) + 1))[:n]]
    p = folder / f"tiles_{n}.csv"
    p.write_text("\n".join(lines) + "\n")
    return p


DEVICE = "cpu"


def plain_loop(spec: str, data: Path, batch: int) -> float:
    from shiftkit.data.shifted import TileDataset
    from shiftkit.models import load_encoder
    from shiftkit.stress.runner import _Stream

    enc = load_encoder(spec)
    ds = TileDataset(data)
    t0 = time.perf_counter()
    n = 0
    for _, xb, _ in _Stream(ds, batch, 0)(list(range(len(ds)))):
        enc.embed(xb, batch_size=batch, device=DEVICE)
        n += xb.shape[0]
    return n / (time.perf_counter() - t0)


def stress_clean(spec: str, data: Path, batch: int) -> float:
    from shiftkit.stress import run_stress_test

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        run = run_stress_test(spec, data, Path(d) / "run", shifts=["no-such-shift-*"], severities=[1], batch_size=batch,
                              gallery=False, device=DEVICE)
        return run["n_tiles"] / (time.perf_counter() - t0)


CHILD = """
import json, resource, sys, time
from pathlib import Path
from shiftkit.stress import run_stress_test
from shiftkit.report import build_report
t0 = time.perf_counter()
run_stress_test("default", sys.argv[1], sys.argv[2], shifts=["jpeg"], severities=[3], gallery=False, batch_size=64,
                device=sys.argv[3])
t1 = time.perf_counter()
html = build_report(sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "report_seconds": t2 - t1, "report_bytes": Path(html).stat().st_size,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="500,2000,8000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-overhead", action="store_true", help="Only the memory and report measurements.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "stress_cpu.json"))
    a = ap.parse_args(argv)
    global DEVICE
    DEVICE = a.device
    info = machine(a.device)
    print(json.dumps(info))
    sizes = [int(v) for v in a.sizes.split(",")]
    result = {"machine": info, "overhead": {}, "memory": {}}
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        data = manifest(folder, 512)
        for spec in (() if a.no_overhead else ("default", "timm:vit_small_patch16_224")):
            pairs = []
            plain_loop(spec, data, 64)  # warm-up
            for _ in range(a.rounds):
                p = plain_loop(spec, data, 64)
                s = stress_clean(spec, data, 64)
                pairs.append((p, s))
            ratios = sorted(p / s for p, s in pairs)
            med = ratios[len(ratios) // 2]
            result["overhead"][spec] = {"plain_tiles_per_s": [p for p, _ in pairs], "stress_tiles_per_s": [s for _, s in pairs],
                                        "overhead_median": med - 1}
            print(f"{spec:32s} plain {sorted(p for p, _ in pairs)[len(pairs) // 2]:7.1f} tiles/s, stress clean pass "
                  f"{sorted(s for _, s in pairs)[len(pairs) // 2]:7.1f} tiles/s: overhead {100 * (med - 1):+.1f} % (median of {a.rounds} rounds)")
        for n in sizes:
            m = manifest(folder, n)
            out = subprocess.run([sys.executable, "-c", CHILD, str(m), str(folder / f"run_{n}"), a.device], capture_output=True,
                                 text=True, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            result["memory"][n] = rec
            print(f"{n:6d} tiles: {rec['seconds']:6.1f} s, peak RSS {rec['peak_rss_mb']:7.0f} MB, report "
                  f"{rec['report_seconds']:.1f} s / {rec['report_bytes'] / 1e6:.2f} MB")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
