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
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .. import __version__
from ..core.files import file_sha256
from ..data.io import write_image
from ..core.shift_registry import SEVERITY_TABLE_VERSION
from ..data.shifted import SAMPLER_VERSION, TileDataset, route_differences, sample_seed, shift_routes, shift_tiles
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


def _centred_cosine(clean: np.ndarray, shifted: np.ndarray, mu: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """``cos(clean_i − μ, shifted_i − μ)`` per row, a chunk at a time (no full-size copies of either store)."""
    out = np.empty(clean.shape[0], np.float64)
    for s in range(0, clean.shape[0], chunk):
        a = np.asarray(clean[s:s + chunk], np.float64) - mu
        b = np.asarray(shifted[s:s + chunk], np.float64) - mu
        out[s:s + chunk] = M.cosine_consistency(a, b)
    return out


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


class _Tiles(torch.utils.data.Dataset):
    """The tiles of a run, decoded in DataLoader workers and resized to the working size: ``(index, uint8 (3, S, S)
    or None, error)``. Resized tiles are rounded to 8 bits, so the shifts see what ``shiftkit simulate`` would see
    for the same tiles at that size and take the same route (:func:`shiftkit.data.shifted.shift_route`)."""

    def __init__(self, ds: TileDataset, indices: Sequence[int], size: int = 224):
        self.ds, self.indices, self.size = ds, list(indices), size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = self.indices[j]
        try:
            img, _ = self.ds[i]
        except Exception as exc:  # recorded as a failed input by the clean pass
            return i, None, str(exc)
        if tuple(img.shape[-2:]) != (self.size, self.size):
            x = torch.nn.functional.interpolate(img[None].float(), size=(self.size, self.size), mode="bilinear", antialias=True)[0]
            img = x.clamp_(0, 255).round_().to(torch.uint8)
        return i, img, ""


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def _collate(items):
    return items


class _Stream:
    """Streams ``(indices, float batch, failures)`` in order over a tile list; memory holds a few batches, never the
    whole set. One ``DataLoader`` per tile list, with persistent workers: the units of a run reuse its processes
    instead of starting ``workers`` new ones per shift x severity (which cost more than the units on a GPU)."""

    def __init__(self, ds: TileDataset, batch_size: int, workers: int):
        self.ds, self.batch_size, self.workers, self.loaders = ds, batch_size, workers, {}

    def __call__(self, indices: Sequence[int]):
        key = tuple(indices)
        if key not in self.loaders:
            self.loaders[key] = torch.utils.data.DataLoader(
                _Tiles(self.ds, indices), batch_size=self.batch_size, shuffle=False, num_workers=self.workers,
                collate_fn=_collate, prefetch_factor=2 if self.workers else None, persistent_workers=self.workers > 0)
        for items in self.loaders[key]:
            ok = [(i, x) for i, x, err in items if x is not None]
            bad = [(i, err) for i, x, err in items if x is None]
            yield [i for i, _ in ok], (torch.stack([x for _, x in ok]) if ok else None), bad

    def close(self) -> None:
        self.loaders.clear()  # persistent workers end with their loader


def _save_atomic(path: Path, array: np.ndarray) -> str:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)
    return file_sha256(path)


class StressConfigError(ValueError):
    """RUN_DIR holds units of a stress test made with another configuration."""


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
    workers: int = 0,
    force: bool = False,
    precision: str = "auto",
    input_size: Optional[int] = None,
    shard: Optional[Tuple[int, int]] = None,
    input_norm: Optional[str] = None,
    embed_grid: Optional[int] = None,
) -> dict:
    """Run the stress test and write ``records.json``, ``records.csv``, ``run.json`` and the embedding store.

    Streaming: tiles flow through a ``DataLoader`` (``workers`` processes) in batches of ``batch_size``, are shifted
    with their per-tile seeds and embedded; only the embeddings are kept, one ``.npy`` file per model and unit under
    ``<out>/embeddings`` (memory-mapped for the metrics), so memory does not grow with the number of tiles beyond
    the embeddings. Units are the clean pass and each shift × severity; each is written atomically and journalled
    with its checksum in ``<out>/.shiftkit/units.jsonl``. Resumable: a killed run rerun with the same arguments keeps
    the units it can verify and computes the rest, with the same records; a run folder made with another
    configuration (model, weights, data, shifts' definitions, seed) raises :class:`StressConfigError` naming the
    differences unless ``force``. ``precision`` (``auto``: bf16 on CUDA, float32 elsewhere; ``bf16``, ``fp16``,
    ``fp32``), ``input_size`` (the encoders' input side, default each encoder's own) and the readout overrides
    ``input_norm`` (``"fixed"`` or ``"per-image"``) and ``embed_grid`` (``g > 1``: the last feature map pooled to
    ``g x g``; CNNs only), default each encoder's own (see :meth:`shiftkit.models.Encoder.with_readout`), are part of
    that configuration and apply to the reference encoder too. ``gallery=False`` keeps no tile thumbnails. Returns
    the run description.

    Scale-out: ``shard=(i, n)`` computes only units ``k`` with ``k % n == i`` (the clean pass is unit 0) into
    ``RUN_DIR`` and returns ``{"shard": ..., "units": ...}`` without records; a later call with the same arguments and
    no ``shard`` gathers every shard's units (computing any that are missing) and writes the records. Under
    ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes its shard, and rank 0 gathers after a barrier (Gloo on CPU,
    NCCL on GPU), so one command gives one report.
    """
    from ..data import sample_tiles_dir
    from ..data.shifted import spec_hash

    t0 = time.time()
    out = Path(out_dir)
    ds = TileDataset(data if data is not None else sample_tiles_dir() / "manifest.csv")
    names = sorted({n for pat in shifts for n in list_shifts(pat)})
    severities = [int(v) for v in severities]
    bad_rows = [(str(r.path), r.error) for r in ds.records if r.error]
    candidates = [i for i, r in enumerate(ds.records) if not r.error]
    if not candidates:
        raise ValueError(f"`data` has no readable tile: expected images, got failures {bad_rows[:3]}")
    models = [(model, load_encoder(model, weights))]
    if reference_model:
        models.append((reference_model, load_encoder(reference_model)))
    from ..models.encoders import autocast_for

    autocast_for(precision, device)  # refuses an impossible precision before anything is written
    models = [(m, enc.with_readout(input_norm, embed_grid, input_size)) for m, enc in models]
    for _, enc in models:
        enc.precision = precision

    def readout(e) -> list:  # recorded only where it is not the plain one, so older run folders still resume
        return [] if (e.input_norm, e.grid) == ("fixed", 1) else [e.input_norm, e.grid]

    config = {"format": "shiftkit-stress-units/1",
              "models": [[m, e.weights_sha256, e.input_size, e.precision, *readout(e)] for m, e in models],
              "data": [ds.records[i].sample_id for i in candidates][:100000], "n_candidates": len(candidates),
              "shifts": {n: spec_hash(get_spec(n)) for n in names}, "seed": int(seed), "shiftkit": __version__,
              "routes": shift_routes(names, device)}
    state = out / ".shiftkit"
    cfg_path = state / "stress.json"
    if cfg_path.is_file() and not force:
        old = json.loads(cfg_path.read_text())
        diffs = [k for k in ("models", "data", "n_candidates", "seed", "shiftkit") if old.get(k) != config[k]]
        diffs += [f"shift {n!r}" for n, h in config["shifts"].items() if n in old.get("shifts", {}) and old["shifts"][n] != h]
        old_routes = old.get("routes", {})  # a run from before routes also read float tiles: never resumed
        diffs += route_differences(old_routes, config["routes"], old.get("shifts", {}), unrecorded=None)
        if diffs:
            raise StressConfigError(f"`out_dir` {out} holds a stress test made with another configuration: expected the "
                                    f"same model, weights, data, seed and shift definitions to resume it, got differences in "
                                    f"{', '.join(diffs)}. Use another --out, or --force to start over")
        config["shifts"] = {**old.get("shifts", {}), **config["shifts"]}
        config["routes"] = {**old_routes, **config["routes"]}
    # folders only once the data and the encoders are known good: an early failure leaves nothing behind
    (out / "embeddings").mkdir(parents=True, exist_ok=True)
    (out / "gallery").mkdir(exist_ok=True)
    state.mkdir(exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if shard is None and world > 1:
        shard = (rank, world)
    if shard is not None and not (0 <= shard[0] < shard[1]):
        raise ValueError(f"`shard` out of range: expected i/n with 0 <= i < n, got {shard[0]}/{shard[1]}")
    journal = state / (f"units-{shard[0]}-of-{shard[1]}.jsonl" if shard else "units.jsonl")
    if force:
        for j in state.glob("units*.jsonl"):
            j.unlink()
    tmp_cfg = cfg_path.with_name(f".stress.json.{os.getpid()}.tmp")
    tmp_cfg.write_text(json.dumps(config))
    os.replace(tmp_cfg, cfg_path)  # every shard writes the same configuration
    done: dict = {}
    for jpath in sorted(state.glob("units*.jsonl")):  # every shard's journal: a gathering run sees them all
        for line in jpath.read_text().splitlines():
            try:
                e = json.loads(line)
                done[e["unit"]] = e
            except (json.JSONDecodeError, KeyError):
                continue  # a torn line of a killed run
    all_units = ["clean"] + [f"{name}__{sev}" for name in names for sev in severities]
    mine = {u for k, u in enumerate(all_units) if shard is None or k % shard[1] == shard[0]}

    def unit_files(unit: str) -> dict:
        return {m: out / "embeddings" / f"{_safe(m)}__{unit}.npy" for m, _ in models}

    def verified(unit: str) -> bool:
        e = done.get(unit)
        return e is not None and all(f.is_file() and file_sha256(f) == e["sha256"].get(m) for m, f in unit_files(unit).items())

    def record_unit(unit: str, arrays: dict, extra: dict) -> None:
        shas = {m: _save_atomic(unit_files(unit)[m], arrays[m]) for m, _ in models}
        with open(journal, "a") as fh:
            fh.write(json.dumps({"unit": unit, "sha256": shas, **extra}) + "\n")
        done[unit] = {"unit": unit, "sha256": shas, **extra}

    stream = _Stream(ds, batch_size, workers)
    # clean unit: which tiles decode, and their embeddings
    if "clean" in mine and not verified("clean"):
        valid, failed, embs = [], [], {m: [] for m, _ in models}
        for idx, xb, bad in stream(candidates):
            failed += [(str(ds.records[i].path), err) for i, err in bad]
            if xb is None:
                continue
            valid += idx
            xf = _as_float(xb)
            for m, enc in models:
                embs[m].append(enc.embed(xf, batch_size=batch_size, device=device))
        if not valid:
            raise ValueError(f"`data` has no readable tile: expected images, got failures {failed[:3]}")
        record_unit("clean", {m: np.concatenate(v) for m, v in embs.items()}, {"valid": valid, "failed": failed})
    # a shard may run before the clean pass exists: it streams every candidate and records which tiles it embedded
    known_valid = done["clean"]["valid"] if "clean" in done and verified("clean") else None
    for name in names:
        for sev in severities:
            unit = f"{name}__{sev}"
            if unit in mine and not verified(unit):
                try:
                    embs, used = {m: [] for m, _ in models}, []
                    for idx, xb, _ in stream(known_valid if known_valid is not None else candidates):
                        if xb is None:
                            continue
                        seeds = [sample_seed(seed, name, sev, ds.records[i].sample_id) for i in idx]
                        # on the run's device: uint8 on CPU takes the 8-bit route, as in simulate; elsewhere float
                        shifted = _as_float(shift_tiles(xb.to(device), name, sev, seeds, ds.records[idx[0]].mpp or 0.5)[0])
                        used += idx
                        for m, enc in models:
                            embs[m].append(enc.embed(shifted, batch_size=batch_size, device=device))
                    record_unit(unit, {m: np.concatenate(v) for m, v in embs.items()}, {"valid": used})
                except Exception as exc:  # a failing shift is a record, not a crash
                    done[unit] = {"unit": unit, "error": f"{type(exc).__name__}: {exc}"}
            if progress and unit in mine:
                progress(1)
    stream.close()
    if shard is not None:
        summary = {"shard": list(shard), "units": sorted(mine), "out_dir": str(out)}
        if world > 1 and shard == (rank, world):  # torchrun: rank 0 gathers once every rank is done
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            torch.distributed.barrier()
            if rank != 0:
                return summary
            saved = os.environ.get("WORLD_SIZE")
            os.environ["WORLD_SIZE"] = "1"  # the gathering pass is one process
            try:
                return run_stress_test(model, data, out_dir, shifts=shifts, severities=severities,
                                       label_column=label_column, site_column=site_column, slide_column=slide_column,
                                       reference_model=reference_model, weights=weights, seed=seed, device=device,
                                       batch_size=batch_size, progress=None, gallery=gallery, workers=workers,
                                       precision=precision, input_size=input_size, input_norm=input_norm,
                                       embed_grid=embed_grid)
            finally:
                os.environ["WORLD_SIZE"] = saved if saved is not None else "1"
        return summary
    valid, failed = done["clean"]["valid"], [tuple(f) for f in done["clean"]["failed"]] + bad_rows
    for name in names:
        for sev in severities:
            e = done.get(f"{name}__{sev}", {})
            if "valid" in e and e["valid"] != valid:  # unreadable tiles are unreadable in every unit
                done[f"{name}__{sev}"] = {"unit": e["unit"], "error": "its tiles differ from the clean pass's"}
    recs = [ds.records[i] for i in valid]
    n = len(valid)
    mpp = [r.mpp or 0.5 for r in recs]

    records, worst = _records_from_store(out, models, names, severities, recs, done, label_column, site_column,
                                         slide_column, reference_model, seed, unit_files)
    gallery_items = _gallery(out, ds, valid, names, severities, seed, mpp, worst) if gallery else []
    sizes = sorted({tuple(int(v) for v in ds[valid[0]][0].shape)})
    run = {
        "config": {"model": model, "weights": weights, "reference_model": reference_model, "data": str(data or "bundled sample tiles"),
                   "shifts": names, "severities": list(severities), "seed": seed, "label_column": label_column,
                   "site_column": site_column, "device": device, "precision": precision,
                   "input_size": models[0][1].input_size, "input_norm": models[0][1].input_norm,
                   "embed_grid": models[0][1].grid, "batch_size": batch_size, "workers": workers,
                   "routes": config["routes"]},
        "model_info": {**models[0][1].info, "weights_sha256": models[0][1].weights_sha256, "spec": models[0][1].spec},
        "n_tiles": n, "failed_inputs": failed, "tile_sizes": [list(s) for s in sizes],
        "versions": {"shiftkit": __version__, "torch": torch.__version__, "python": platform.python_version(),
                     "sampler": SAMPLER_VERSION, "severity tables": SEVERITY_TABLE_VERSION},
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None},
        "runtime_s": time.time() - t0, "gallery": gallery_items,
        "units": {"total": 1 + len(names) * len(severities), "store": "embeddings/<model>__<unit>.npy"},
    }
    write_records(out, records)
    (out / "run.json").write_text(json.dumps(run, indent=2))
    return run


def _records_from_store(out, models, names, severities, recs, done, label_column, site_column, slide_column,
                        reference_model, seed, unit_files):
    """Every metric record, from the stored (memory-mapped) embeddings."""
    n = len(recs)
    labels = np.array([r.meta.get(label_column, "") for r in recs]) if label_column else np.array([""] * n)
    has_labels = bool(label_column) and all(labels != "") and len(set(labels)) > 1
    slides = np.array([r.meta.get(slide_column, "") for r in recs])
    groups = slides if all(slides != "") and len(set(slides)) > 1 else None
    sites = np.array([r.meta.get(site_column, "") for r in recs]) if site_column else np.array([""] * n)
    records = []
    # k = 20, but below the smallest class (leave-one-out votes would otherwise be won by the other class)
    k = max(1, min(20, (min(np.unique(labels, return_counts=True)[1]) - 1) if has_labels else 20))
    folds = _probe_folds(labels, seed) if has_labels and min(np.unique(labels, return_counts=True)[1]) >= 2 else None
    probe_clean, knn_clean, clean_emb, clean_mu = {}, {}, {}, {}
    for mname, _ in models:
        e = np.load(unit_files("clean")[mname], mmap_mode="r")
        e = np.asarray(e, dtype=np.float32)
        clean_emb[mname] = e
        clean_mu[mname] = e.mean(0, keepdims=True, dtype=np.float64)
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
    worst = {}
    for name in names:
        spec = get_spec(name)
        for sev in severities:
            unit = done.get(f"{name}__{sev}", {})
            if "error" in unit or not unit:
                records.append(_rec(models[0][0], name, spec.family, sev, "cosine", n=n, seed=seed,
                                    error=unit.get("error", "not computed")))
                continue
            for mname, _ in models:
                e = np.load(unit_files(f"{name}__{sev}")[mname], mmap_mode="r")  # memory-mapped: the metrics read it in chunks
                # centred: pooled features share a large common direction
                cos = _centred_cosine(clean_emb[mname], e, clean_mu[mname])
                est, lo, hi = M.bootstrap_ci(cos, groups=groups, seed=seed)
                records.append(_rec(mname, name, spec.family, sev, "cosine", est, (lo, hi), n, seed))
                if mname == models[0][0] and sev == max(severities):
                    worst[name] = cos
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

    if reference_model and has_labels:  # corruption error per shift against the reference encoder
        ref_name = models[1][0]
        for name in names:
            err = lambda mn: [1 - r["value"] for r in records if r["model"] == mn and r["shift"] == name and r["metric"] == "knn_ba" and r["value"] is not None]  # noqa: E731
            e_f, e_r = err(models[0][0]), err(ref_name)
            if e_f and len(e_f) == len(e_r):
                records.append(_rec(models[0][0], name, get_spec(name).family, 0, "ce", M.corruption_error(e_f, e_r), n=n, seed=seed))

    # real paired shift: same tissue (pair_id) under several conditions
    pair_ids = np.array([r.meta.get("pair_id", "") for r in recs])
    conds = np.array([r.meta.get("condition", "") or r.meta.get("scanner", "") for r in recs])
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
    return records, worst


def _gallery(out, ds, valid, names, severities, seed, mpp, worst):
    """Thumbnails (clean | shifted at the highest severity) of the two tiles whose embeddings moved most per shift,
    re-read from the data (the run keeps no images)."""
    items = []
    sev = max(severities)
    for name, cos in worst.items():
        for j in np.argsort(cos)[:2]:
            i = valid[int(j)]
            _, x, _ = _Tiles(ds, [i])[0]
            shifted = shift_tiles(x[None], name, sev, [sample_seed(seed, name, sev, ds.records[i].sample_id)], mpp[int(j)])[0][0]
            fn = f"{_safe(name)}__{int(j)}.png"
            pair = torch.cat([x, torch.full((3, x.shape[-2], 4), 255, dtype=torch.uint8), shifted], dim=-1)
            write_image(out / "gallery" / fn, pair.permute(1, 2, 0).contiguous().numpy())
            items.append({"shift": name, "severity": sev, "tile": ds.records[i].sample_id, "cosine": float(cos[j]), "file": fn})
    return items


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
