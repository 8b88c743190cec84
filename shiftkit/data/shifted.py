"""Shifted test sets: datasets of tiles, ``ShiftedDataset`` and its materialization on disk.

Every output is a pure function of ``(source pixels, shift, severity, mpp, sample seed)`` where the sample seed is
``derive_seed(seed, shift, severity, sample_id)`` and ``sample_id`` is the tile's path relative to the dataset
root. Batch size, worker count, order, shard and device do not change the pixels (CPU vs CUDA within float
tolerance). Outputs are written atomically; a journal line (with the output's SHA-256) follows each write, so a
killed run restarted with the same arguments verifies what exists and finishes only what is missing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.errors import InvalidArgumentError
from ..core.rng import derive_seed
from .io import IMAGE_SUFFIXES, list_images, read_image, write_image

MANIFEST_COLUMNS = ("path", "label", "site", "scanner", "slide", "patient", "mpp", "pair_id", "condition")


@dataclass
class TileRecord:
    """One tile of a dataset: its path, id (relative path) and optional metadata columns."""

    path: Path
    sample_id: str
    meta: Dict[str, str] = field(default_factory=dict)


class TileDataset(torch.utils.data.Dataset):
    """Tiles from a folder (searched recursively) or a CSV manifest with a ``path`` column.

    Optional manifest columns: ``label``, ``site``, ``scanner``, ``slide``, ``patient``, ``mpp``, ``pair_id``,
    ``condition`` (kept in :attr:`TileRecord.meta`). Relative paths in a manifest are relative to its folder.
    ``__getitem__`` returns ``(uint8 (3, H, W) tensor, record)``; unreadable files raise
    :class:`~shiftkit.data.ImageReadError` naming the file.
    """

    def __init__(self, source: Any):
        src = Path(source)
        if src.is_dir():
            self.root = src
            self.records = [TileRecord(p, p.relative_to(src).as_posix()) for p in list_images(src)]
        elif src.suffix.lower() == ".csv":
            if not src.is_file():
                raise InvalidArgumentError(f"`source` cannot be read: expected a folder or a CSV manifest, got missing file {src}")
            self.root = src.parent
            with open(src, newline="") as fh:
                reader = csv.DictReader(fh)
                if "path" not in (reader.fieldnames or []):
                    raise InvalidArgumentError(f"`{src}` has no `path` column: expected a CSV manifest with columns {MANIFEST_COLUMNS}, got {reader.fieldnames}")
                self.records = []
                for row in reader:
                    p = Path(row["path"])
                    p = p if p.is_absolute() else src.parent / p
                    sid = row["path"].replace(os.sep, "/")
                    self.records.append(TileRecord(p, sid, {k: v for k, v in row.items() if k != "path" and v not in (None, "")}))
        elif src.is_file() and src.suffix.lower() in IMAGE_SUFFIXES:
            self.root = src.parent
            self.records = [TileRecord(src, src.name)]
        else:
            raise InvalidArgumentError(f"`source` is not a dataset: expected a folder of images, a CSV manifest or an image, got {source!r}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        return torch.from_numpy(read_image(rec.path)).permute(2, 0, 1), rec


def sample_seed(seed: int, shift: str, severity: int, sample_id: str) -> int:
    """The per-output seed: a stable hash of ``(seed, shift, severity, sample_id)``."""
    return derive_seed(int(seed), str(shift), int(severity), str(sample_id))


def shift_tiles(images: torch.Tensor, shift: str, severity: int, seeds: Sequence[int], mpp: float = 0.5) -> Tuple[torch.Tensor, List[dict]]:
    """Apply ``shift`` at ``severity`` to a float batch, each tile with its own seed.

    Returns the shifted batch and each tile's drawn parameters (JSON-serializable).
    """
    from ..transforms.shift import Shift

    t = Shift(shift, severity=severity, mpp=mpp, seed=0).to(images.device)
    per = [t.draw_parameters((1, *images.shape[1:]), torch.Generator().manual_seed(int(s))) for s in seeds]
    params = {k: torch.cat([p[k] for p in per]) for k in per[0] if k != "forward_input_shape"}
    params["forward_input_shape"] = torch.tensor(tuple(images.shape))
    out = t(images, params=params)
    drawn = [{k: v[0].tolist() for k, v in p.items() if k not in ("batch_prob", "forward_input_shape")} for p in per]
    return out, drawn


class ShiftedDataset(torch.utils.data.Dataset):
    """On-the-fly shifted copy of a dataset: ``ShiftedDataset(base, "jpeg", 3, seed=0)[i]`` gives the same
    pixels as ``shiftkit simulate`` writes for that tile.

    Args:
        base: a :class:`TileDataset` or anything it accepts (folder, CSV manifest).
        shift: a registered shift name.
        severity: 1..5.
        seed: the run seed (per-tile seeds derive from it).
        mpp: µm per pixel; defaults to the manifest's per-tile ``mpp`` column, else 0.5.

    Returns (``__getitem__``): ``(uint8 (3, H, W) tensor, record)``.
    """

    def __init__(self, base: Any, shift: str, severity: int, seed: int = 0, mpp: Optional[float] = None):
        from ..shifts.registry import get_spec

        self.base = base if isinstance(base, TileDataset) else TileDataset(base)
        self.spec = get_spec(shift)
        self.spec.values(int(severity))  # validates the severity
        self.shift, self.severity, self.seed, self.mpp = shift, int(severity), int(seed), mpp

    def __len__(self) -> int:
        return len(self.base)

    def tile_mpp(self, rec: TileRecord) -> float:
        return float(self.mpp if self.mpp is not None else rec.meta.get("mpp", 0.5))

    def __getitem__(self, i: int):
        img, rec = self.base[i]
        x = img[None].float() / 255
        out, _ = shift_tiles(x, self.shift, self.severity, [sample_seed(self.seed, self.shift, self.severity, rec.sample_id)], self.tile_mpp(rec))
        return (out[0] * 255).round().byte(), rec

    def materialize(self, out_dir: Any, **kwargs) -> "SimulationReport":
        """Write this shift/severity under ``out_dir`` exactly as ``shiftkit simulate`` does."""
        return simulate(self.base, out_dir, shifts=[self.shift], severities=[self.severity], seed=self.seed, mpp=self.mpp, **kwargs)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class SimulationReport:
    """What :func:`simulate` did: outputs written now, verified from before, failed inputs, planned total."""

    written: int = 0
    verified: int = 0
    failed: List[Tuple[str, str]] = field(default_factory=list)
    planned: int = 0
    out_dir: str = ""

    def to_dict(self) -> dict:
        return {"planned": self.planned, "written": self.written, "verified_existing": self.verified,
                "failed": [{"path": p, "reason": r} for p, r in self.failed], "out_dir": self.out_dir}


def _shard_filter(records: List[TileRecord], shard: Optional[Tuple[int, int]]) -> List[TileRecord]:
    if shard is None:
        return records
    i, n = shard
    if not (0 <= i < n):
        raise InvalidArgumentError(f"`shard` out of range: expected i/n with 0 <= i < n, got {i}/{n}")
    return [r for r in records if derive_seed("shard", r.sample_id) % n == i]


def simulate(
    base: Any,
    out_dir: Any,
    shifts: Sequence[str],
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    *,
    mpp: Optional[float] = None,
    batch_size: int = 32,
    device: str = "cpu",
    fmt: str = "png",
    shard: Optional[Tuple[int, int]] = None,
    dry_run: bool = False,
    progress: Optional[Callable[[int], None]] = None,
    workers: int = 0,
) -> SimulationReport:
    """Materialize shifted copies of ``base`` as ``out_dir/<shift>/<severity>/<sample_id>``.

    Writes ``manifest.csv`` / ``manifest.json`` (one row per output: source, output, seed, drawn parameters, source
    and output SHA-256, shiftkit version, shift configuration) and ``README.txt``. Unreadable inputs are listed
    (manifest ``failed`` and the report) and every other output completes. ``workers`` > 0 encodes and writes
    files in that many threads (OpenCV releases the GIL); the pixels do not depend on it. See the module docstring
    for the determinism and resume guarantees.
    """
    from .. import __version__
    from ..shifts.registry import get_spec

    ds = base if isinstance(base, TileDataset) else TileDataset(base)
    if fmt not in ("png", "jpeg"):
        raise InvalidArgumentError(f"`fmt` is invalid: expected 'png' (lossless) or 'jpeg', got {fmt!r}")
    specs = [get_spec(s) for s in shifts]
    sevs = sorted({int(s) for s in severities})
    for s in sevs:
        specs[0].values(s)
    out = Path(out_dir)
    records = _shard_filter(ds.records, shard)
    suffix = ".png" if fmt == "png" else ".jpg"
    plan = [(sp.name, sev, rec) for sp in specs for sev in sevs for rec in records]
    report = SimulationReport(planned=len(plan), out_dir=str(out))
    if dry_run:
        return report
    out.mkdir(parents=True, exist_ok=True)
    journal_path = out / (f".journal-{shard[0]}-of-{shard[1]}.jsonl" if shard else ".journal.jsonl")
    done: Dict[str, str] = {}  # output -> SHA-256 recorded by an earlier run (only checksums stay in memory)
    if journal_path.exists():
        with open(journal_path) as fh:
            for line in fh:
                try:
                    e = json.loads(line)
                    done[e["output"]] = e["output_sha256"]
                except (json.JSONDecodeError, KeyError):
                    continue  # a torn last line from a kill
        _rewrite_journal_without_torn_lines(journal_path)
    for tmp in out.rglob("*.tmp"):  # partial files of a killed run never survive
        tmp.unlink()

    def out_rel(name, sev, rec):
        return (Path(name) / str(sev) / Path(rec.sample_id).with_suffix(suffix)).as_posix()

    todo = []
    for name, sev, rec in plan:
        rel = out_rel(name, sev, rec)
        sha = done.get(rel)
        if sha is not None and (out / rel).is_file() and _sha256(out / rel) == sha:
            report.verified += 1
            if progress:
                progress(1)
        else:
            todo.append((name, sev, rec))

    # read each source once, then group by (shift, severity, size) into batches; bounded memory: one batch
    source_cache: Dict[str, Tuple[Optional[np.ndarray], str]] = {}
    failed_sources: Dict[str, str] = {}

    def load(rec: TileRecord):
        if rec.sample_id not in source_cache:
            try:
                img = read_image(rec.path)
                source_cache.clear()  # keep one source in memory at a time beyond the batch
                source_cache[rec.sample_id] = (img, hashlib.sha256(img.tobytes()).hexdigest())
            except Exception as exc:
                failed_sources[rec.sample_id] = str(exc)
                return None, ""
        return source_cache[rec.sample_id]

    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers) if workers and workers > 0 else None

    def write_one(rel, a):
        write_image(out / rel, a)
        return _sha256(out / rel)

    with open(journal_path, "a") as journal:
        # iterate per source so that each file is read once; batch across sources per (shift, severity, size)
        pending: Dict[tuple, list] = {}

        def flush(key):
            name, sev, _ = key
            items = pending.pop(key)
            x = torch.from_numpy(np.stack([it[1] for it in items])).permute(0, 3, 1, 2).float().div(255).to(device)
            seeds = [sample_seed(seed, name, sev, it[0].sample_id) for it in items]
            tile_mpp = float(mpp if mpp is not None else items[0][0].meta.get("mpp", 0.5))
            y, drawn = shift_tiles(x, name, sev, seeds, tile_mpp)
            arr = (y.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            rels = [out_rel(name, sev, it[0]) for it in items]
            shas = list(pool.map(write_one, rels, arr)) if pool else [write_one(r, a) for r, a in zip(rels, arr)]
            for (rec, _, src_sha), rel, out_sha, s_, d in zip(items, rels, shas, seeds, drawn):
                entry = {"source": rec.sample_id, "output": rel, "shift": name, "severity": sev, "seed": s_,
                         "mpp": tile_mpp, "params": d, "source_sha256": src_sha,
                         "output_sha256": out_sha, **{f"meta_{k}": v for k, v in rec.meta.items()}}
                journal.write(json.dumps(entry) + "\n")
                journal.flush()
                report.written += 1
            if progress:
                progress(len(items))

        by_source: Dict[str, list] = {}
        for name, sev, rec in todo:
            by_source.setdefault(rec.sample_id, []).append((name, sev, rec))
        for sid, jobs in by_source.items():
            img, sha = load(jobs[0][2])
            if img is None:
                if progress:
                    progress(len(jobs))
                continue
            for name, sev, rec in jobs:
                tile_mpp = mpp if mpp is not None else rec.meta.get("mpp", 0.5)
                key = (name, sev, (img.shape, str(tile_mpp)))
                pending.setdefault(key, []).append((rec, img, sha))
                if len(pending[key]) >= batch_size:
                    flush(key)
        for key in list(pending):
            flush(key)
    if pool:
        pool.shutdown()

    report.failed = sorted(failed_sources.items())
    config = {"shifts": [sp.to_dict() for sp in specs], "severities": sevs, "seed": int(seed), "mpp": mpp,
              "format": fmt, "shard": list(shard) if shard else None, "shiftkit_version": __version__,
              "torch": torch.__version__, "python": platform.python_version(), "device": device}
    stem = f"manifest-{shard[0]}-of-{shard[1]}" if shard else "manifest"
    n_rows = _write_manifests(out, stem, journal_path, config, report, {out_rel(n, s, r) for n, s, r in plan})
    _write_atomic(out / "README.txt", _readme(config, n_rows, report))
    return report


def _rewrite_journal_without_torn_lines(path: Path) -> None:
    """Drop a torn (killed mid-write) last line so that later appends start on a fresh line."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data and not data.endswith(b"\n"):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data[: data.rfind(b"\n") + 1])
        os.replace(tmp, path)


def _write_manifests(out: Path, stem: str, journal_path: Path, config: dict, report: "SimulationReport", planned: set) -> int:
    """Stream ``<stem>.json`` and ``<stem>.csv`` from the journal, sorted by (shift, severity, source), holding only
    a small index per output in memory (the last journal entry of each planned output wins)."""
    index: Dict[str, tuple] = {}
    extra: set = set()
    with open(journal_path, "rb") as fh:
        offset = 0
        for line in fh:
            try:
                e = json.loads(line)
                if e["output"] in planned:
                    index[e["output"]] = ((e["shift"], e["severity"], e["source"]), offset, len(line))
                    extra.update(k for k in e if k.startswith("meta_"))
            except (json.JSONDecodeError, KeyError):
                pass  # a line that is not a journal entry (torn lines were dropped at start): nothing to index
            offset += len(line)
    order = sorted(index.values())
    cols = ["source", "output", "shift", "severity", "seed", "mpp", "params", "source_sha256", "output_sha256"]
    extra_cols = sorted(extra)
    jtmp, ctmp = out / f".{stem}.json.tmp", out / f".{stem}.csv.tmp"
    with open(journal_path, "rb") as src, open(jtmp, "w") as jf, open(ctmp, "w") as cf:
        jf.write('{"config": ' + json.dumps(config) + ',\n"failed": '
                 + json.dumps([{"path": p, "reason": r} for p, r in report.failed]) + ',\n"outputs": [\n')
        cf.write(",".join(cols + extra_cols) + "\n")
        for i, (_, off, length) in enumerate(order):
            src.seek(off)
            e = json.loads(src.read(length))
            jf.write(("," if i else "") + json.dumps(e) + "\n")
            vals = [json.dumps(e[c]) if c == "params" else str(e[c]) for c in cols] + [str(e.get(k, "")) for k in extra_cols]
            cf.write(",".join('"' + v.replace('"', '""') + '"' for v in vals) + "\n")
        jf.write("]}\n")
    os.replace(jtmp, out / f"{stem}.json")
    os.replace(ctmp, out / f"{stem}.csv")
    return len(order)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _readme(config: dict, n_rows: int, report: SimulationReport) -> str:
    names = ", ".join(s["name"] for s in config["shifts"])
    return (
        "Shifted test set written by shiftkit " + config["shiftkit_version"] + ".\n\n"
        f"Shifts: {names}; severities {config['severities']}; base seed {config['seed']}; format {config['format']}.\n"
        "Layout: <shift>/<severity>/<source path>. manifest.csv / manifest.json list every output with its seed\n"
        "(derived from base seed, shift, severity and source path), drawn parameters and SHA-256 checksums of the\n"
        "source pixels and the output file; the JSON also holds each shift's severity table and source.\n"
        "Regenerate bit for bit with the same command (`shiftkit simulate ... --seed " + str(config["seed"]) + "`).\n"
        f"Outputs: {n_rows}; inputs that failed: {len(report.failed)}.\n"
    )
