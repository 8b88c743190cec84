"""`shiftkit simulate` throughput and peak memory on N tiles (cut from the bundled images), 3 shifts × 5 severities,
and head to head with a plain OpenCV script.

    python experiments/speed/bench_simulate.py --tiles 1000 5000          # throughput and peak memory per size
    python experiments/speed/bench_simulate.py --versus-plain 256 --rounds 3

Each size runs in a fresh subprocess so that peak RSS (ru_maxrss) is measured independently; peak memory must
not grow with the number of tiles.

``--versus-plain N``: in one process, interleaved rounds on the same N tiles, (a) ``shiftkit.data.simulate`` as
``shiftkit simulate`` runs it (checksums, journal, atomic writes, manifest) and (b) a plain script: ``cv2.imread`` →
the same corruption at severity 3 written with OpenCV/numpy (Gaussian blur σ from the severity table; JPEG at its
quality; Poisson–Gaussian noise in linear light) → ``cv2.imwrite`` PNG at OpenCV's default compression (the level
simulate writes with). Both single-process; simulate as users run it (encoding threads by core count, its
default), the plain loop once serial (the script a user writes) and once over a thread pool of the same size (the
same threads). Prints outputs/s, the ratios per round, and where
simulate's CPU time goes (decode, shift kernels, encode + write, the rest = bookkeeping) in one extra run, measured
in whichever thread runs each part.
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


VERSUS = ["jpeg", "gaussian-defocus", "sensor-noise"]


def plain_script(src: Path, out: Path, files, threads: int = 1) -> int:
    """The 30-line OpenCV loop a user would write: read, corrupt at severity 3, write PNG. ``threads`` > 1 runs the
    loop body over the files in a thread pool (the same threads simulate encodes with)."""
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        chunks = [files[i::threads] for i in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(lambda fs: plain_script(src, out, fs), chunks))
    import cv2
    import numpy as np

    from shiftkit.shifts import get_spec

    sigma = get_spec("gaussian-defocus").values(3)["sigma"]
    quality = int(get_spec("jpeg").values(3)["quality"])
    noise = get_spec("sensor-noise").values(3)
    rng = np.random.default_rng(0)
    n = 0
    for f in files:
        bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
        rel = f.relative_to(src)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        outs = {"jpeg": cv2.imdecode(buf, cv2.IMREAD_COLOR),
                "gaussian-defocus": cv2.GaussianBlur(bgr, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)}
        x = bgr.astype(np.float32) / 255
        lin = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
        lam = noise["photons"]
        y = rng.poisson(lin * lam) / lam + noise["read_sigma"] * rng.standard_normal(lin.shape)
        y = np.clip(y, 0, 1)
        s = np.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055)
        outs["sensor-noise"] = np.clip(np.rint(s * 255), 0, 255).astype(np.uint8)
        for name, img in outs.items():
            p = out / name / "3" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(p), img)
            n += 1
    return n


def versus_plain(n: int, rounds: int) -> dict:
    import numpy as np
    import torch

    from shiftkit.data import list_images, simulate
    from shiftkit.data.shifted import default_workers

    threads = default_workers()

    work = Path(tempfile.mkdtemp())
    try:
        make_tiles(n, work / "tiles")
        files = list_images(work / "tiles")
        simulate(work / "tiles", work / "warm", VERSUS, [3], seed=0, batch_size=64)  # imports, kernels, caches
        plain_script(work / "tiles", work / "warm_plain", files[:8])
        rows = []
        for r in range(rounds):
            order = ("shiftkit", "plain", "plain_threads")
            for name in (order if r % 2 == 0 else order[::-1]):
                out = work / f"out_{name}_{r}"
                t0 = time.perf_counter()
                if name == "shiftkit":  # as users run it: default workers (encoding threads, one per core)
                    k = simulate(work / "tiles", out, VERSUS, [3], seed=0, batch_size=64).written
                else:
                    k = plain_script(work / "tiles", out, files, threads if name == "plain_threads" else 1)
                rows.append({"round": r, "who": name, "outputs": k, "outputs_per_s": k / (time.perf_counter() - t0)})
                shutil.rmtree(out, ignore_errors=True)
        rate = lambda r, who: next(x["outputs_per_s"] for x in rows if x["round"] == r and x["who"] == who)  # noqa: E731
        ratios = [rate(r, "shiftkit") / rate(r, "plain") for r in range(rounds)]
        ratios_threads = [rate(r, "shiftkit") / rate(r, "plain_threads") for r in range(rounds)]
        # where the time goes: CPU seconds of each part in whichever threads run it. Decoding and encoding run in
        # simulate's worker threads (time.thread_time() around read_image and write_image there); the shift kernels
        # spread tiles over their own threads, so they get the process's CPU time (time.process_time()) during each
        # shift_tiles call less the decoding and encoding that finished meanwhile. The rest of the process's CPU
        # time is bookkeeping: checksums, journal, manifest rows, paths, copies.
        import threading

        import shiftkit.data.shifted as shifted_mod

        spent = {"decode_cpu_s": 0.0, "shift_kernels_cpu_s": 0.0, "encode_write_cpu_s": 0.0}
        lock = threading.Lock()

        def timed(fn, key):
            def wrapper(*a, **k):
                t = time.thread_time()
                try:
                    return fn(*a, **k)
                finally:
                    with lock:
                        spent[key] += time.thread_time() - t
            return wrapper

        def timed_kernels(fn, key):
            def wrapper(*a, **k):
                with lock:
                    t, io = time.process_time(), spent["decode_cpu_s"] + spent["encode_write_cpu_s"]
                try:
                    return fn(*a, **k)
                finally:
                    with lock:
                        io_during = spent["decode_cpu_s"] + spent["encode_write_cpu_s"] - io
                        spent[key] += max(0.0, time.process_time() - t - io_during)
            return wrapper

        originals = {name: getattr(shifted_mod, name) for name in ("read_image", "shift_tiles", "write_image")}
        for name, key, wrap in (("read_image", "decode_cpu_s", timed), ("shift_tiles", "shift_kernels_cpu_s", timed_kernels),
                                ("write_image", "encode_write_cpu_s", timed)):
            setattr(shifted_mod, name, wrap(originals[name], key))
        try:
            ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            simulate(work / "tiles", work / "out_prof", VERSUS, [3], seed=0, batch_size=64)
            ru1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
        finally:
            for name, fn in originals.items():
                setattr(shifted_mod, name, fn)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        breakdown = {"wall_s": wall, "cpu_s": cpu, **spent,
                     "bookkeeping_cpu_s": max(0.0, cpu - sum(spent.values()))}
        return {"tiles": n, "shifts": VERSUS, "severity": 3, "threads": torch.get_num_threads(),
                "simulate_workers": threads, "rounds": rows,
                "ratio_per_round": ratios, "ratio_median": float(np.median(ratios)),
                "ratio_quartiles": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))],
                "ratio_vs_threaded_plain_per_round": ratios_threads,
                "ratio_vs_threaded_plain_median": float(np.median(ratios_threads)),
                "ratio_vs_threaded_plain_quartiles": [float(np.percentile(ratios_threads, 25)),
                                                      float(np.percentile(ratios_threads, 75))],
                "simulate_breakdown": breakdown}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiles", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--versus-plain", type=int, default=None, metavar="N", help="Head to head with a plain OpenCV script on N tiles.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.child is not None:
        return child(args.child)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_normalize import machine

    print("machine:", json.dumps(machine("cpu")))
    if args.versus_plain:
        res = versus_plain(args.versus_plain, args.rounds)
        for row in res["rounds"]:
            print(f"round {row['round']}: {row['who']:8s} {row['outputs_per_s']:7.1f} outputs/s")
        q = res["ratio_quartiles"]
        print(f"shiftkit simulate / plain script: {res['ratio_median']:.2f}x (quartiles {q[0]:.2f}-{q[1]:.2f})")
        q = res["ratio_vs_threaded_plain_quartiles"]
        print(f"shiftkit simulate / plain script in {res['simulate_workers']} threads: "
              f"{res['ratio_vs_threaded_plain_median']:.2f}x (quartiles {q[0]:.2f}-{q[1]:.2f})")
        b = res["simulate_breakdown"]
        print(f"simulate, one more run: {b['wall_s']:.2f} s wall, {b['cpu_s']:.2f} CPU-s: decode {b['decode_cpu_s']:.2f}, "
              f"shift kernels {b['shift_kernels_cpu_s']:.2f}, encode + write {b['encode_write_cpu_s']:.2f}, "
              f"bookkeeping {b['bookkeeping_cpu_s']:.2f} CPU-s")
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine("cpu"), "versus_plain": res}, indent=2))
        return 0
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
