"""Stain-normalization speed: shiftkit next to staintools, torchstain, torch-staintools and tiatoolbox.

Same real tiles, same target, one process. The libraries run in interleaved rounds (each once per round, after
a warm-up), so that each ratio shiftkit / peer is taken within a round under the same machine conditions.
Prints the median tiles/s per library and workload, the median (and quartiles) of the per-round ratios, and
the machine. A peer that is not importable is listed as
missing (install it with ``pip install -e ".[reference]"``; torch-staintools pins kornia 0.8, so run this
script from a venv that has it, see docs/benchmarks.md).

    python experiments/speed/bench_normalize.py                    # CPU, all importable peers
    python experiments/speed/bench_normalize.py --device cuda      # shiftkit and GPU-capable peers on CUDA
    python experiments/speed/bench_normalize.py --json out.json    # also write the records

Workloads (target fitted once on the stardist H&E image, as in REFERENCES A17/A18):
  * ``fit``: fitting the target image;
  * ``macenko``/``vahadane``/``reinhard``: normalizing a batch of tiles with per-tile estimation.
Peers without a batch API are called tile by tile (that is how their users call them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
DATA = Path(os.environ.get("SHIFTKIT_SHARED_DATA", REPO.parent / "shared" / "data"))

warnings.filterwarnings("ignore")


# ----------------------------------------------------------------------------- data


def _read(path: Path) -> np.ndarray:
    from shiftkit.data import read_image

    return read_image(path)


def tiles_224(n: int) -> np.ndarray:
    """``n`` real 224² tiles: crops of the Camelyon17 and scanner images, else the bundled tiles."""
    crops = []
    for folder in ("camelyon17_5centers", "scanners5_same_region", "tcga_crc_examples"):
        for p in sorted((DATA / folder).glob("*")):
            if p.suffix.lower() not in (".png", ".jpg", ".tif"):
                continue
            img = _read(p)
            for y in range(0, img.shape[0] - 223, 224):
                for x in range(0, img.shape[1] - 223, 224):
                    crops.append(img[y : y + 224, x : x + 224])
    if not crops:
        from shiftkit.data import load_sample_tiles

        crops = list(load_sample_tiles())
    out = [crops[i % len(crops)] for i in range(n)]
    return np.stack(out)


def images_1024(n: int) -> np.ndarray:
    srcs = [DATA / "targets_henorm" / "example1.png", DATA / "targets_henorm" / "example2.png",
            DATA / "pypi_histolytics" / "hgsc_nest.jpg", DATA / "pypi_histolytics" / "hgsc_stromal_he.jpg"]
    imgs = [_read(p)[:1024, :1024] for p in srcs if p.exists()]
    if not imgs:
        from shiftkit.data import load_sample

        imgs = [np.pad(load_sample("stardist"), ((0, 724), (0, 524), (0, 0)), mode="reflect")[:1024, :1024]]
    return np.stack([imgs[i % len(imgs)] for i in range(n)])


def target_image() -> np.ndarray:
    p = DATA / "pypi_stardist" / "histo.jpg"
    if p.exists():
        return _read(p)
    from shiftkit.data import load_sample

    return load_sample("stardist")


# ----------------------------------------------------------------------------- adapters
# Each adapter: name, fit(target), run(batch uint8 (B,H,W,3)) -> None. Built lazily; ImportError = missing.


def shiftkit_adapter(method, device, **opts):
    from shiftkit import StainNormalizer

    norm = StainNormalizer(method, **opts).to(device)

    def fit(t):
        norm.fit(t)

    def run(batch):
        # numpy (B, H, W, 3) uint8 goes in as is on CPU (what users pass); on CUDA the uint8 batch is moved first
        x = batch if device == "cpu" else torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)
        y = norm(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return y

    return fit, run


def staintools_adapter(method, device):
    import staintools

    norm = staintools.ReinhardColorNormalizer() if method == "reinhard" else staintools.StainNormalizer(method=method)
    return norm.fit, lambda batch: [norm.transform(t) for t in batch]


def torchstain_adapter(method, device):
    import torchstain

    if method == "vahadane":
        raise ImportError("torchstain has no Vahadane")
    cls = torchstain.normalizers.MacenkoNormalizer if method == "macenko" else torchstain.normalizers.ReinhardNormalizer
    norm = cls(backend="torch")

    def to_t(img):
        return torch.from_numpy(img).permute(2, 0, 1).float()  # CHW in [0, 255], torchstain's convention

    def run(batch):
        for t in batch:
            if method == "macenko":
                norm.normalize(I=to_t(t), stains=False)
            else:
                norm.normalize(I=to_t(t))

    return (lambda t: norm.fit(to_t(t))), run


def tiatoolbox_adapter(method, device):
    from tiatoolbox.tools.stainnorm import get_normalizer

    norm = get_normalizer(method)
    return norm.fit, lambda batch: [norm.transform(t) for t in batch]


def torch_staintools_adapter(method, device):
    from torch_staintools.normalizer import NormalizerBuilder

    norm = NormalizerBuilder.build(method, concentration_solver="qr", use_cache=False, device=torch.device(device))
    norm = norm.to(device)

    def to_t(b):
        return torch.from_numpy(b).to(device).permute(0, 3, 1, 2).float() / 255

    def run(batch):
        out = norm(to_t(batch))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    return (lambda t: norm.fit(to_t(t[None]))), run


PEERS = {
    "staintools": staintools_adapter,
    "torchstain": torchstain_adapter,
    "torch-staintools": torch_staintools_adapter,
    "tiatoolbox": tiatoolbox_adapter,
}
# peers that are slow per tile get fewer tiles per pass (rates are per tile, so they stay comparable):
# (library, method, size) -> tiles; peers get 16 tiles at 224² and 4 images at 1024² otherwise
SLOW = {("staintools", "vahadane", 224): 4, ("torch-staintools", "vahadane", 224): 4,
        ("staintools", "vahadane", 1024): 1, ("torch-staintools", "vahadane", 1024): 1, ("tiatoolbox", "vahadane", 1024): 2}


def timed(fn, passes: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_rates(runs: dict, rounds: int, pause: float = 0.5) -> dict:
    """Tiles/s of every entry of ``runs`` (``name -> (fn, tiles)``), measured in interleaved rounds.

    After one warm-up call each, every round calls every entry once, back to back, so that the ratio of two
    entries in the same round is taken under the same machine conditions (this shared machine drifts by up to
    2× within minutes, REFERENCES A18). Before every timed call the process sleeps ``pause`` seconds: OpenMP and
    OpenBLAS worker threads of the previous library keep spinning for up to ~0.2 s after its call and, on 2
    cores, halve the speed of a multi-threaded call that follows at once (measured: shiftkit Macenko 430-580
    tiles/s right after tiatoolbox's numpy code, 1150-1280 after a 0.2-0.5 s pause). Returns
    ``name -> list of tiles/s``, one per round; an entry that raises is reported as its error string instead.
    """
    rates, alive = {}, {}
    for name, (fn, n) in runs.items():
        try:
            fn()
            alive[name] = (fn, n)
            rates[name] = []
        except Exception as exc:  # a peer that fails on these tiles
            rates[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
    for _ in range(rounds):
        for name, (fn, n) in alive.items():
            time.sleep(pause)
            t0 = time.perf_counter()
            fn()
            rates[name].append(n / (time.perf_counter() - t0))
    return rates


def summarize(rates: dict, ours: str) -> dict:
    """Median tiles/s per entry and, per peer, the median and quartiles of the per-round ratio ours ÷ peer."""
    out = {}
    for name, r in rates.items():
        if isinstance(r, str):
            out[name] = {"error": r}
            continue
        rec = {"tiles_per_s": statistics.median(r), "rounds": len(r)}
        if name != ours and isinstance(rates.get(ours), list):
            ratio = [a / b for a, b in zip(rates[ours], r)]
            q = statistics.quantiles(ratio, n=4) if len(ratio) > 1 else [ratio[0]] * 3
            rec.update(ratio_median=statistics.median(ratio), ratio_q1=q[0], ratio_q3=q[2])
        out[name] = rec
    return out


def machine(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # no /proc/cpuinfo (not Linux): keep platform.processor()
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--passes", type=int, default=7, help="interleaved rounds (every library once per round)")
    ap.add_argument("--sizes", default="224,1024")
    ap.add_argument("--methods", default="macenko,vahadane,reinhard")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--batch-1024", type=int, default=64, help="batch size at 1024² (memory: ~1 GB per 16 images)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    target = target_image()
    records = []
    print(f"machine: {json.dumps(machine(args.device))}")
    for size in [int(s) for s in args.sizes.split(",")]:
        batch = tiles_224(args.batch) if size == 224 else images_1024(args.batch_1024)
        for method in args.methods.split(","):
            libs = [("shiftkit", lambda m, d: shiftkit_adapter(m, d)),
                    ("shiftkit[all pixels]", lambda m, d: shiftkit_adapter(m, d, max_pixels=None))]
            if method == "reinhard":  # the default float route and the opt-in 8-bit OpenCV route
                libs = libs[:1] + ([("shiftkit[opencv8]", lambda m, d: shiftkit_adapter(m, d, route="opencv8"))]
                                   if args.device == "cpu" else [])
            libs += [(p, PEERS[p]) for p in args.peers.split(",") if p in PEERS]
            runs, fits = {}, {}
            for name, make in libs:
                try:
                    fit, run = make(method, args.device)
                    fit(target)
                except ImportError as exc:
                    records.append({"library": name, "method": method, "size": size, "error": f"missing: {exc}"})
                    continue
                except Exception as exc:  # a peer that cannot even be built or fitted
                    records.append({"library": name, "method": method, "size": size, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                n = batch.shape[0]
                if not name.startswith("shiftkit"):
                    n = min(n, SLOW.get((name, method, size), 16 if size == 224 else 4))
                fits[name] = timed(lambda fit=fit: fit(target), max(1, args.passes // 2))
                runs[name] = (lambda run=run, sub=batch[:n]: run(sub), n)
            rates = paired_rates(runs, args.passes)
            alt = summarize(rates, "shiftkit[opencv8]") if isinstance(rates.get("shiftkit[opencv8]"), list) else {}
            for name, rec in summarize(rates, "shiftkit").items():
                rec = {"library": name, "method": method, "size": size, "tiles": runs[name][1], **rec}
                if "ratio_median" in alt.get(name, {}) and not name.startswith("shiftkit"):  # the 8-bit route ÷ peer
                    rec.update({f"opencv8_{k}": alt[name][k] for k in ("ratio_median", "ratio_q1", "ratio_q3")})
                if "tiles_per_s" in rec:
                    rec["fit_s"] = fits[name]
                records.append(rec)
                if "tiles_per_s" in rec:
                    ratio = (f"   shiftkit ÷ this: {rec['ratio_median']:5.2f}x (quartiles {rec['ratio_q1']:.2f}-{rec['ratio_q3']:.2f})"
                             if "ratio_median" in rec else "")
                    if "opencv8_ratio_median" in rec:
                        ratio += (f"   shiftkit[opencv8] ÷ this: {rec['opencv8_ratio_median']:5.2f}x "
                                  f"(quartiles {rec['opencv8_ratio_q1']:.2f}-{rec['opencv8_ratio_q3']:.2f})")
                    msg = f"{rec['tiles_per_s']:9.1f} tiles/s  (fit {rec['fit_s']*1000:7.1f} ms, {rec['tiles']} tiles){ratio}"
                else:
                    msg = rec["error"]
                print(f"{size:5d}² {method:9s} {name:22s} {msg}", flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(args.device), "records": records}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
