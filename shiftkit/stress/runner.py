"""The stress-test runner: an encoder × every shift and severity (and real paired shift), as flat records.

Records: ``model, shift, family, severity, metric, value, ci_low, ci_high, n, seed, error`` (JSON and CSV). A
shift that fails becomes a record with its error. Embeddings are cached under ``<out>/embeddings`` so that the
report can be rebuilt without the model; thumbnails of the tiles whose embeddings moved most are kept under
``<out>/gallery`` for the report's failure gallery.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .. import __version__
from ..data.io import write_image
from ..data.shifted import TileDataset, sample_seed, shift_tiles
from ..metrics import functional as M
from ..models import load_encoder
from ..shifts import get_spec, list_shifts

#: ``cosine`` = cos(f(x) − μ, f(T x) − μ) with μ the mean clean embedding of the run (centring removes the
#: common direction that pooled features share, which otherwise keeps every cosine near 1).
RECORD_FIELDS = ("model", "shift", "family", "severity", "metric", "value", "ci_low", "ci_high", "n", "seed", "error")


def _rec(model, shift, family, severity, metric, value=None, ci=(None, None), n=0, seed=0, error=""):
    return {"model": model, "shift": shift, "family": family, "severity": severity, "metric": metric,
            "value": None if value is None else float(value), "ci_low": None if ci[0] is None else float(ci[0]),
            "ci_high": None if ci[1] is None else float(ci[1]), "n": int(n), "seed": int(seed), "error": error}


def _loo_knn(emb_ref: np.ndarray, labels: np.ndarray, emb_query: np.ndarray, k: int) -> np.ndarray:
    """kNN prediction of each query from the *other* reference samples (leave one out, i ↔ i excluded)."""
    ids = np.arange(len(labels))
    return M.knn_predict(emb_ref, labels, emb_query, k=k, exclude_same=(ids, ids))


def _probe_folds(labels: np.ndarray, seed: int):
    """Stratified folds for cross-fitted linear probes (at most 5, at least 2, bounded by the smallest class)."""
    from sklearn.model_selection import StratifiedKFold

    n_min = int(np.unique(labels, return_counts=True)[1].min())
    return list(StratifiedKFold(n_splits=max(2, min(5, n_min)), shuffle=True, random_state=seed).split(labels, labels))


def _probe_predict(clean: np.ndarray, labels: np.ndarray, query: np.ndarray, folds, seed: int):
    """Out-of-fold probe predictions and probabilities for ``query``: each fold's probe is trained on the *clean*
    embeddings of the other folds."""
    classes = np.unique(labels)
    proba = np.zeros((len(labels), len(classes)))
    for tr, te in folds:
        model = M.linear_probe(clean[tr], labels[tr], seed=seed)
        cols = np.searchsorted(classes, model.classes_)
        proba[np.ix_(te, cols)] = model.predict_proba(query[te])
    return classes[proba.argmax(1)], proba


def run_stress_test(
    model: str = "default",
    data=None,
    out_dir="shiftkit-report",
    *,
    shifts: Sequence[str] = ("*",),
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    label_column: Optional[str] = "label",
    site_column: Optional[str] = "site",
    slide_column: str = "slide",
    reference_model: Optional[str] = None,
    weights: Optional[str] = None,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 32,
    progress=None,
    gallery: bool = True,
) -> dict:
    """Run the stress test and write ``records.json``, ``records.csv``, ``run.json`` and the embedding cache.

    ``gallery=False`` keeps no tile thumbnails (for data whose images must not leave their folder).
    Returns the run description (config, timing, counts).
    """
    from ..data import sample_tiles_dir

    t0 = time.time()
    out = Path(out_dir)
    ds = TileDataset(data if data is not None else sample_tiles_dir() / "manifest.csv")
    names = sorted({n for pat in shifts for n in list_shifts(pat)})
    images, recs, failed = [], [], []
    for i in range(len(ds)):
        try:
            img, rec = ds[i]
            images.append(img)
            recs.append(rec)
        except Exception as exc:
            failed.append((str(ds.records[i].path), str(exc)))
    if not images:
        raise ValueError(f"`data` has no readable tile: expected images, got failures {failed[:3]}")
    sizes = {tuple(im.shape) for im in images}
    x = torch.stack([torch.nn.functional.interpolate(im[None].float(), size=(224, 224), mode="bilinear", antialias=True)[0]
                     if tuple(im.shape) != (3, 224, 224) else im.float() for im in images]) / 255
    n = x.shape[0]
    labels = np.array([r.meta.get(label_column, "") for r in recs]) if label_column else np.array([""] * n)
    has_labels = bool(label_column) and all(labels != "") and len(set(labels)) > 1
    slides = np.array([r.meta.get(slide_column, "") for r in recs])
    groups = slides if all(slides != "") and len(set(slides)) > 1 else None
    sites = np.array([r.meta.get(site_column, "") for r in recs]) if site_column else np.array([""] * n)
    mpp = [r.mpp or 0.5 for r in recs]

    models = [(model, load_encoder(model, weights))]
    if reference_model:
        models.append((reference_model, load_encoder(reference_model)))
    # folders only once the data and the encoders are known good: an early failure leaves nothing behind
    (out / "embeddings").mkdir(parents=True, exist_ok=True)
    (out / "gallery").mkdir(exist_ok=True)
    records = []
    # k = 20, but below the smallest class (leave-one-out votes would otherwise be won by the other class)
    k = max(1, min(20, (min(np.unique(labels, return_counts=True)[1]) - 1) if has_labels else 20))
    folds = _probe_folds(labels, seed) if has_labels and min(np.unique(labels, return_counts=True)[1]) >= 2 else None
    probe_clean, knn_clean = {}, {}
    clean_emb = {}
    for mname, m in models:
        e = m.embed(x, batch_size=batch_size, device=device)
        clean_emb[mname] = e
        np.save(out / "embeddings" / f"{_safe(mname)}__clean.npy", e)
        if has_labels:
            pred = _loo_knn(e, labels, e, k)
            knn_clean[mname] = (pred, M.balanced_accuracy(labels, pred))
            records.append(_rec(mname, "none", "clean", 0, "knn_ba", knn_clean[mname][1], n=n, seed=seed))
        if folds is not None:
            p_pred, p_proba = _probe_predict(e, labels, e, folds, seed)
            probe_clean[mname] = (p_pred, M.balanced_accuracy(labels, p_pred))
            records.append(_rec(mname, "none", "clean", 0, "probe_ba", probe_clean[mname][1], n=n, seed=seed))
            records.append(_rec(mname, "none", "clean", 0, "ece", M.expected_calibration_error(p_proba, np.searchsorted(np.unique(labels), labels)), n=n, seed=seed))
        if site_column and all(sites != "") and len(set(sites)) > 1:
            try:
                records.append(_rec(mname, "none", "clean", 0, "site_auc", M.site_predictability(e, sites), n=n, seed=seed))
                if has_labels:
                    sl = slides if groups is not None else np.arange(n)
                    records.append(_rec(mname, "none", "clean", 0, "robustness_index", M.robustness_index(e, labels, sites, sl, k), n=n, seed=seed))
            except Exception as exc:
                records.append(_rec(mname, "none", "clean", 0, "site_auc", error=f"{type(exc).__name__}: {exc}", n=n, seed=seed))

    gallery_items = []
    for name in names:
        spec = get_spec(name)
        for sev in severities:
            try:
                seeds = [sample_seed(seed, name, sev, r.sample_id) for r in recs]
                shifted = torch.cat([shift_tiles(x[i : i + batch_size], name, sev, seeds[i : i + batch_size], mpp[i])[0]
                                     for i in range(0, n, batch_size)])
                for mname, m in models:
                    e = m.embed(shifted, batch_size=batch_size, device=device)
                    np.save(out / "embeddings" / f"{_safe(mname)}__{name}__{sev}.npy", e)
                    mu = clean_emb[mname].mean(0, keepdims=True)  # centred: pooled features share a large common direction
                    cos = M.cosine_consistency(clean_emb[mname] - mu, e - mu)
                    est, lo, hi = M.bootstrap_ci(cos, groups=groups, seed=seed)
                    records.append(_rec(mname, name, spec.family, sev, "cosine", est, (lo, hi), n, seed))
                    if has_labels:
                        clean_pred, ba_clean = knn_clean[mname]
                        pred = _loo_knn(clean_emb[mname], labels, e, k)
                        ba = M.balanced_accuracy(labels, pred)
                        records.append(_rec(mname, name, spec.family, sev, "knn_ba", ba, n=n, seed=seed))
                        records.append(_rec(mname, name, spec.family, sev, "knn_retention", ba / ba_clean if ba_clean > 0 else None, n=n, seed=seed))
                        flips = (pred != clean_pred).astype(float)
                        f_est, f_lo, f_hi = M.bootstrap_ci(flips, groups=groups, seed=seed)
                        records.append(_rec(mname, name, spec.family, sev, "flip_rate", f_est, (f_lo, f_hi), n, seed))
                    if folds is not None:
                        p_pred, p_proba = _probe_predict(clean_emb[mname], labels, e, folds, seed)
                        pba = M.balanced_accuracy(labels, p_pred)
                        pc_pred, pc_ba = probe_clean[mname]
                        records.append(_rec(mname, name, spec.family, sev, "probe_ba", pba, n=n, seed=seed))
                        records.append(_rec(mname, name, spec.family, sev, "probe_retention", pba / pc_ba if pc_ba > 0 else None, n=n, seed=seed))
                        records.append(_rec(mname, name, spec.family, sev, "probe_flip_rate", M.flip_rate(pc_pred, p_pred), n=n, seed=seed))
                        records.append(_rec(mname, name, spec.family, sev, "ece", M.expected_calibration_error(p_proba, np.searchsorted(np.unique(labels), labels)), n=n, seed=seed))
                    if gallery and mname == models[0][0] and sev == max(severities):
                        worst = np.argsort(cos)[:2]
                        for i in worst:
                            fn = f"{_safe(name)}__{i}.png"
                            pair = torch.cat([x[i], torch.ones(3, x.shape[-2], 4), shifted[i]], dim=-1)
                            write_image(out / "gallery" / fn, (pair.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())
                            gallery_items.append({"shift": name, "severity": sev, "tile": recs[i].sample_id, "cosine": float(cos[i]), "file": fn})
            except Exception as exc:  # a failing shift is a record, not a crash
                records.append(_rec(models[0][0], name, spec.family, sev, "cosine", n=n, seed=seed,
                                    error=f"{type(exc).__name__}: {exc}"))
            if progress:
                progress(1)

    if reference_model and has_labels:  # corruption error per shift against the reference encoder
        ref_name = models[1][0]
        for name in names:
            err = lambda mn: [1 - r["value"] for r in records if r["model"] == mn and r["shift"] == name and r["metric"] == "knn_ba" and r["value"] is not None]  # noqa: E731
            e_f, e_r = err(models[0][0]), err(ref_name)
            if e_f and len(e_f) == len(e_r):
                records.append(_rec(models[0][0], name, get_spec(name).family, 0, "ce", M.corruption_error(e_f, e_r), n=n, seed=seed))

    # real paired shift: same tissue (pair_id) under several conditions
    pair_ids = np.array([r.meta.get("pair_id", "") for r in recs])
    conds = np.array([r.meta.get("condition", "") for r in recs])
    if all(pair_ids != "") and len(set(conds)) > 1:
        e = clean_emb[models[0][0]]
        e = e - e.mean(0, keepdims=True)  # centred, as for the synthetic-shift cosine
        cs = sorted(set(conds))
        for ia, ca in enumerate(cs):
            for cb in cs[ia + 1 :]:
                a_idx = {p: i for i, (p, c) in enumerate(zip(pair_ids, conds)) if c == ca}
                b_idx = {p: i for i, (p, c) in enumerate(zip(pair_ids, conds)) if c == cb}
                common = sorted(set(a_idx) & set(b_idx))
                if len(common) < 2:
                    continue
                A = e[[a_idx[p] for p in common]]
                B = e[[b_idx[p] for p in common]]
                cos = M.cosine_consistency(A, B)
                est, lo, hi = M.bootstrap_ci(cos, seed=seed)
                label = f"real:{ca}|{cb}"
                records.append(_rec(models[0][0], label, "real", 0, "paired_cosine", est, (lo, hi), len(common), seed))
                for kk, v in M.paired_topk_retrieval(A, B, ks=(1, 3, 5, 10)).items():
                    records.append(_rec(models[0][0], label, "real", 0, f"paired_top{kk}", v, n=len(common), seed=seed))

    run = {
        "config": {"model": model, "weights": weights, "reference_model": reference_model, "data": str(data or "bundled sample tiles"),
                   "shifts": names, "severities": list(severities), "seed": seed, "label_column": label_column,
                   "site_column": site_column, "device": device},
        "model_info": {**models[0][1].info, "weights_sha256": models[0][1].weights_sha256, "spec": models[0][1].spec},
        "n_tiles": n, "failed_inputs": failed, "tile_sizes": [list(s) for s in sizes],
        "versions": {"shiftkit": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None},
        "runtime_s": time.time() - t0, "gallery": gallery_items,
    }
    write_records(out, records)
    (out / "run.json").write_text(json.dumps(run, indent=2))
    return run


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_records(out: Path, records: list) -> None:
    records = sorted(records, key=lambda r: (r["model"], r["shift"], r["severity"], r["metric"]))
    (out / "records.json").write_text(json.dumps(records, indent=1))
    with open(out / "records.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RECORD_FIELDS)
        w.writeheader()
        w.writerows(records)


def read_records(out) -> list:
    return json.loads((Path(out) / "records.json").read_text())
