"""Diversity over scale, in miniature (issue #8, item 2).

    python experiments/diversity/run.py [--steps 120] [--seeds 0 1 2] [--out experiments/diversity/results]

The same encoder (recipe ``cpu-small``: ResNet-10t, DINO, 2 × 112 + 4 × 48 views, batch 32, the same number of
steps) is pretrained on four training sets cut from ../shared/data/camelyon17_5centers (crops of 128² at
stride 64 from 512² tiles, 3 tiles per centre):

* ``A one-centre-many``: all 147 crops of centre 0, plain DINO views (``--augment dino``);
* ``B one-centre-few``: 48 of those crops, plain DINO views (the control for C);
* ``C one-centre-few+sim``: the same 48 crops with simulated stain and scanner shift (``--augment shiftkit``);
* ``D four-centres-few``: 48 crops, 12 from each of centres 0–3, plain DINO views.

Centre 4 is never trained on. Each arm is trained with every seed, and each encoder (the teacher backbone) is
then evaluated on:

* **real cross-centre shift**: site predictability, the cross-validated logistic-regression AUC of the centre
  from embeddings of 60 Camelyon17 crops of 224² (5 centres, all 15 tiles; lower = less centre information);
* **real cross-scanner shift**: paired top-1 retrieval of the same tissue across the 10 pairs of
  ../shared/data/scanners5_same_region (2 × 2 grid of 112² crops per scanner; higher = more scanner-invariant),
  and the mean paired centred cosine between scanners (a continuous version of the same question);
* **synthetic held-out shifts**: mean centred cosine between clean and shifted embeddings, over every held-out
  shift at severity 3, on the 24 Kather 2016 tiles (higher = more invariant);
* **usefulness**: leave-one-out kNN balanced accuracy (k = 3) of the 8 Kather tissue classes (chance 0.125).

Reported: per arm, the mean over seeds with a 95 % t-interval, and every seed's value; plus an untrained
encoder (same architecture, seed-0 weights) as a reference. Results in ``results/``: ``results.json``,
``results.md``, ``diversity.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shiftkit.data import read_image, write_image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from realdata import DATA, camelyon_crops, scanner_crops  # noqa: E402
ARMS = {
    "A one-centre-many": {"augment": "dino"},
    "B one-centre-few": {"augment": "dino"},
    "C one-centre-few+sim": {"augment": "shiftkit"},
    "D four-centres-few": {"augment": "dino"},
}
METRICS = {"site_auc": ("centre AUC (Camelyon17) ↓", -1), "scanner_top1": ("scanner paired top-1 ↑", 1),
           "scanner_cosine": ("scanner paired cosine ↑", 1),
           "heldout_cosine": ("held-out shifts cosine ↑", 1), "kather_knn_ba": ("Kather 8-class kNN BA ↑", 1)}


def crops(img: np.ndarray, size: int = 128, stride: int = 64):
    for y in range(0, img.shape[0] - size + 1, stride):
        for x in range(0, img.shape[1] - size + 1, stride):
            yield (y, x), img[y:y + size, x:x + size]


def training_sets(work: Path) -> dict:
    tiles = {p.stem: read_image(p) for p in sorted((DATA / "camelyon17_5centers").glob("center*.png"))}
    rng = np.random.default_rng(0)
    sets = {k: [] for k in ARMS}
    for stem, img in tiles.items():
        centre = int(stem.split("_")[0][-1])
        cs = list(crops(img))
        for (y, x), c in cs:
            write_image(work / "crops" / f"{stem}_{y}_{x}.png", c)
        names = [f"{stem}_{y}_{x}.png" for (y, x), _ in cs]
        if centre == 0:
            sets["A one-centre-many"] += names
            few = sorted(rng.choice(names, 16, replace=False).tolist())
            sets["B one-centre-few"] += few
            sets["C one-centre-few+sim"] += few
        if centre <= 3:
            sets["D four-centres-few"] += sorted(rng.choice(names, 4, replace=False).tolist())
    out = {}
    for arm, names in sets.items():
        m = work / f"{arm.split()[0]}.csv"
        m.write_text("path,slide,site\n" + "".join(f"crops/{n},{n.rsplit('_', 2)[0]},{n.split('_')[0]}\n" for n in names))
        out[arm] = (m, len(names))
    return out


def eval_sets():
    cams = camelyon_crops()
    kather, klab = [], []
    for d in sorted((DATA / "kather2016_8classes").glob("0*")):
        for p in sorted(d.glob("*.tif")):
            kather.append(read_image(p))
            klab.append(d.name)
    return {"cam": torch.cat([cams[k] for k in sorted(cams)]),
            "cam_sites": np.array([k for k in sorted(cams) for _ in range(len(cams[k]))]), "scan": scanner_crops(),
            "kather": torch.from_numpy(np.stack(kather)).permute(0, 3, 1, 2).float() / 255,
            "kather_labels": np.array(klab)}


def evaluate(enc, ev) -> dict:
    from shiftkit.core.rng import derive_seed
    from shiftkit.data.shifted import shift_tiles
    from shiftkit.metrics.functional import (balanced_accuracy, cosine_consistency, knn_predict,
                                             paired_topk_retrieval, site_predictability)
    from shiftkit.shifts import list_shifts

    out = {"site_auc": site_predictability(enc.embed(ev["cam"]), ev["cam_sites"])}
    emb = {k: enc.embed(v) for k, v in ev["scan"].items()}
    names = sorted(emb)
    top1 = [paired_topk_retrieval(emb[a], emb[b], ks=(1,))[1] for i, a in enumerate(names) for b in names[i + 1:]]
    out["scanner_top1"] = float(np.mean(top1))
    mu_s = np.concatenate([emb[k] for k in names]).mean(0, keepdims=True)
    out["scanner_cosine"] = float(np.mean([cosine_consistency(emb[a] - mu_s, emb[b] - mu_s).mean()
                                           for i, a in enumerate(names) for b in names[i + 1:]]))
    clean = enc.embed(ev["kather"])
    mu = clean.mean(0, keepdims=True)
    cos = []
    for s in list_shifts(held_out=True):
        y, _ = shift_tiles(ev["kather"], s, 3, [derive_seed("diversity", s, i) for i in range(len(ev["kather"]))])
        cos.append(float(cosine_consistency(clean - mu, enc.embed(y.clamp(0, 1)) - mu).mean()))
    out["heldout_cosine"] = float(np.mean(cos))
    ids = np.arange(len(clean))
    out["kather_knn_ba"] = balanced_accuracy(ev["kather_labels"], knn_predict(clean, ev["kather_labels"], clean, k=3,
                                                                             exclude_same=(ids, ids)))
    return out


def t_interval(values):
    from scipy import stats

    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), float("nan"), float("nan")
    h = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(v.mean() - h), float(v.mean() + h)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    if not (DATA / "camelyon17_5centers").is_dir():
        sys.exit(f"needs ../shared/data (set SHIFTKIT_SHARED_DATA): {DATA} not found")
    from shiftkit.models import load_encoder
    from shiftkit.train import PretrainConfig, pretrain

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="shiftkit-diversity-"))
    try:
        sets = training_sets(work)
        ev = eval_sets()
        import timm

        with torch.random.fork_rng():
            torch.manual_seed(0)
            untrained = timm.create_model("resnet10t", num_classes=0)
        from shiftkit.models.encoders import Encoder

        results = {"untrained": {"seed0": evaluate(Encoder(untrained.eval(), "untrained", 112), ev)}, "arms": {}}
        for arm, (manifest, n) in sets.items():
            results["arms"][arm] = {"tiles": n, "augment": ARMS[arm]["augment"], "seeds": {}}
            for seed in args.seeds:
                run = work / f"{arm.split()[0]}-{seed}"
                t0 = time.time()
                cfg = PretrainConfig(data=str(manifest), out=str(run), recipe="cpu-small", steps=args.steps,
                                     batch_size=32, load_size=128, augment=ARMS[arm]["augment"], seed=seed,
                                     checkpoint_every=0, workers=1, device="cpu")
                s = pretrain(cfg)
                r = evaluate(load_encoder(str(run)), ev)
                r["train_s"] = round(time.time() - t0, 1)
                r["final_loss"] = s["last_loss"]
                results["arms"][arm]["seeds"][seed] = r
                print(arm, seed, json.dumps(r), flush=True)
            results["arms"][arm]["diversity"] = s["diversity"]
        results["config"] = {"steps": args.steps, "seeds": args.seeds, "batch_size": 32, "recipe": "cpu-small",
                             "runtime_s": round(time.time() - t_start, 1), "torch": torch.__version__}
        (out / "results.json").write_text(json.dumps(results, indent=2))
        write_summary(results, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_summary(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| arm | tiles | views | " + " | ".join(v[0] for v in METRICS.values()) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    u = results["untrained"]["seed0"]
    lines.append("| untrained (seed-0 weights) | – | – | " + " | ".join(f"{u[m]:.3f}" for m in METRICS) + " |")
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
    for ax, (m, (label, _)) in zip(axes, METRICS.items()):
        names, means, lo, hi = [], [], [], []
        for arm, a in results["arms"].items():
            vals = [r[m] for r in a["seeds"].values()]
            mean, l, h = t_interval(vals)
            names.append(arm.split()[0])
            means.append(mean)
            lo.append(mean - l if np.isfinite(l) else 0)
            hi.append(h - mean if np.isfinite(h) else 0)
        ax.bar(names, means, yerr=[lo, hi], capsize=4, color="#7a6fa8")
        ax.axhline(u[m], color="k", ls="--", lw=1, label="untrained")
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "diversity.png", dpi=110)
    for arm, a in results["arms"].items():
        cells = []
        for m in METRICS:
            vals = [r[m] for r in a["seeds"].values()]
            mean, l, h = t_interval(vals)
            cells.append(f"{mean:.3f} [{l:.3f}, {h:.3f}] ({', '.join(f'{v:.2f}' for v in vals)})")
        lines.append(f"| {arm} | {a['tiles']} | {a['augment']} | " + " | ".join(cells) + " |")
    c = results["config"]
    text = (f"# Diversity over scale: results\n\n{c['steps']} steps × batch {c['batch_size']} per run, seeds "
            f"{c['seeds']}, recipe {c['recipe']}; total runtime {c['runtime_s'] / 60:.1f} min.\n"
            "Cells: mean over seeds [95 % t-interval] (per-seed values).\n\n" + "\n".join(lines) + "\n")
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
