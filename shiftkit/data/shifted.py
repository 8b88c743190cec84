"""Shifted test sets: datasets of tiles, ``ShiftedDataset`` and its materialization on disk.

Every output is a pure function of ``(source pixels, shift, severity, mpp, sample seed)`` where the sample seed is
``derive_seed(seed, shift, severity, sample_id)`` and ``sample_id`` is the tile's path relative to the dataset
root. Batch size, worker count, order and shard do not change the pixels. The device picks the route
(:func:`shift_route`): on CPU, shifts with an 8-bit kernel run on the uint8 tiles as they are ("uint8-cpu"); on
other devices every shift takes the float route, equal to the 8-bit route within the tolerances tests/test_routes.py
states. The route is part of the run's configuration, recorded in the manifest and checked on resume. Outputs are written atomically; a journal line (with the output's SHA-256) follows each write, so a
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
from ..core.files import file_sha256
from ..core.rng import derive_seed
from ..core.shift_registry import SEVERITY_TABLE_VERSION
from .io import IMAGE_SUFFIXES, icc_description, list_images, read_image, write_image
from .naming import ensure_inside, overlaps, plan_output_names, shift_folder, source_key

MANIFEST_COLUMNS = ("path", "label", "site", "scanner", "slide", "patient", "mpp", "pair_id", "condition")


@dataclass
class TileRecord:
    """One tile of a dataset: its path, id (the path as given, which seeds derive from), optional metadata columns,
    its output key (:func:`~shiftkit.data.naming.source_key`) and, for a bad manifest row, the reason."""

    path: Path
    sample_id: str
    meta: Dict[str, str] = field(default_factory=dict)
    key: str = ""
    error: str = ""

    @property
    def mpp(self) -> Optional[float]:
        """The row's ``mpp`` (validated when the manifest was read), or None."""
        v = self.meta.get("mpp")
        return None if v is None else float(v)


def _check_row(row: dict, line: int, src: Path) -> str:
    """The reason a manifest row is unusable, or ''."""
    if not (row.get("path") or "").strip():
        return f"`{src}` line {line}: the `path` cell is empty: expected an image path"
    cell = row.get("mpp")
    if cell not in (None, ""):
        try:
            v = float(cell)
        except ValueError:
            v = float("nan")
        if not (np.isfinite(v) and v > 0):
            return f"`{src}` line {line}: the `mpp` cell is invalid: expected a positive number of µm per pixel, got {cell!r}"
    return ""


class TileDataset(torch.utils.data.Dataset):
    """Tiles from a folder (searched recursively) or a CSV manifest with a ``path`` column.

    Optional manifest columns: ``label``, ``site``, ``scanner``, ``slide``, ``patient``, ``mpp``, ``pair_id``,
    ``condition`` (kept in :attr:`TileRecord.meta`). Relative paths in a manifest are relative to its folder;
    absolute paths and paths outside it are accepted (outputs get a sanitised name, see
    :mod:`shiftkit.data.naming`). A row with a bad cell (empty ``path``, non-numeric ``mpp``) is kept with its
    :attr:`TileRecord.error` so that a run can fail that row alone. ``__getitem__`` returns
    ``(uint8 (3, H, W) tensor, record)``; unreadable files (and images over ``max_pixels``) raise
    :class:`~shiftkit.data.ImageReadError` naming the file.
    """

    def __init__(self, source: Any, *, max_pixels: Optional[int] = None, apply_icc: bool = False):
        src = Path(source)
        self.max_pixels = max_pixels
        self.apply_icc = bool(apply_icc)
        self.kind = "folder"
        if src.is_dir():
            self.root = src
            self.records = [TileRecord(p, p.relative_to(src).as_posix(), key=source_key(p, src)) for p in list_images(src)]
        elif src.suffix.lower() == ".csv":
            if not src.is_file():
                raise InvalidArgumentError(f"`source` cannot be read: expected a folder or a CSV manifest, got missing file {src}")
            self.root, self.kind = src.parent, "manifest"
            with open(src, newline="") as fh:
                reader = csv.DictReader(fh)
                if "path" not in (reader.fieldnames or []):
                    raise InvalidArgumentError(f"`{src}` has no `path` column: expected a CSV manifest with columns {MANIFEST_COLUMNS}, got {reader.fieldnames}")
                self.records = []
                for line, row in enumerate(reader, start=2):
                    given = (row.get("path") or "").strip()
                    p = Path(given)
                    p = p if p.is_absolute() else src.parent / p
                    meta = {k: v for k, v in row.items() if k not in ("path", None) and v not in (None, "")}
                    self.records.append(TileRecord(p, given.replace(os.sep, "/"), meta, key=source_key(p, src.parent),
                                                   error=_check_row(row, line, src)))
        elif src.is_file() and src.suffix.lower() in IMAGE_SUFFIXES:
            self.root, self.kind = src.parent, "image"
            self.records = [TileRecord(src, src.name, key=src.name)]
        else:
            raise InvalidArgumentError(f"`source` is not a dataset: expected a folder of images, a CSV manifest or an image, got {source!r}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        if rec.error:
            raise InvalidArgumentError(rec.error)
        return torch.from_numpy(read_image(rec.path, max_pixels=self.max_pixels, apply_icc=self.apply_icc)).permute(2, 0, 1), rec


def sample_seed(seed: int, shift: str, severity: int, sample_id: str) -> int:
    """The per-output seed: a stable hash of ``(seed, shift, severity, sample_id)``."""
    return derive_seed(int(seed), str(shift), int(severity), str(sample_id))


def shift_tiles(images: torch.Tensor, shift: str, severity: int, seeds: Sequence[int], mpp: float = 0.5) -> Tuple[torch.Tensor, List[dict]]:
    """Apply ``shift`` at ``severity`` to a batch ``(B, 3, H, W)``, each tile with its own seed.

    The route follows the input (:func:`shift_route`): uint8 tiles on CPU take the 8-bit route where the shift has
    one (OpenCV calls and lookup tables on the tiles as they are); other uint8 input takes the float route and is
    rounded back; float input in [0, 1] takes the float route and stays float. ``shiftkit simulate``,
    :class:`ShiftedDataset` and the stress test all call this, so the same tiles, seed and device give the same
    pixels everywhere.

    Returns the shifted batch (the input's dtype) and each tile's drawn parameters (JSON-serializable).
    """
    from ..shifts.routes import apply_u8, route_for
    from ..transforms.shift import Shift

    t = Shift(shift, severity=severity, mpp=mpp, seed=0).to(images.device)
    per = [t.draw_parameters((1, *images.shape[1:]), torch.Generator().manual_seed(int(s))) for s in seeds]
    params = {k: torch.cat([p[k] for p in per]) for k in per[0] if k != "forward_input_shape"}
    drawn = [{k: v[0].tolist() for k, v in p.items() if k not in ("batch_prob", "forward_input_shape")} for p in per]
    if images.dtype == torch.uint8:
        if route_for(t.spec, images) == "uint8-cpu":
            kernel_params = {k: v for k, v in params.items() if k != "batch_prob"}
            y = apply_u8(t.spec, images.permute(0, 2, 3, 1).numpy(), kernel_params)
            return torch.from_numpy(y).permute(0, 3, 1, 2), drawn
        x = images.contiguous().float().div_(255)  # NCHW-contiguous: the float kernels are slower on channels-last
        params["forward_input_shape"] = torch.tensor(tuple(x.shape))
        # x and the kernel's output are this call's own tensors: round in place
        return t(x, params=params).clamp_(0, 1).mul_(255).round_().to(torch.uint8), drawn
    params["forward_input_shape"] = torch.tensor(tuple(images.shape))
    return t(images, params=params), drawn


def shift_route(shift: str, images: torch.Tensor) -> str:
    """The route :func:`shift_tiles` takes for ``images``: ``"uint8-cpu"`` or ``"float"``."""
    from ..shifts.registry import get_spec
    from ..shifts.routes import route_for

    return route_for(get_spec(shift), images)


class ShiftedDataset(torch.utils.data.Dataset):
    """On-the-fly shifted copy of a dataset: ``ShiftedDataset(base, "jpeg", 3, seed=0)[i]`` gives the same
    pixels as ``shiftkit simulate`` (on CPU) writes for that tile. It runs on CPU, so it takes the route simulate
    takes there (:func:`shift_route`); a set simulated with ``--device cuda`` took the float route and agrees
    within that route's tolerance (docs/simulate.md).

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
        return float(self.mpp if self.mpp is not None else (rec.mpp or 0.5))

    def __getitem__(self, i: int):
        img, rec = self.base[i]
        out, _ = shift_tiles(img[None], self.shift, self.severity, [sample_seed(self.seed, self.shift, self.severity, rec.sample_id)], self.tile_mpp(rec))
        return out[0].contiguous(), rec

    def materialize(self, out_dir: Any, **kwargs) -> "SimulationReport":
        """Write this shift/severity under ``out_dir`` exactly as ``shiftkit simulate`` does."""
        return simulate(self.base, out_dir, shifts=[self.shift], severities=[self.severity], seed=self.seed, mpp=self.mpp, **kwargs)




@dataclass
class SimulationReport:
    """What :func:`simulate` did: outputs written now, verified from before, failures (input or output, with the
    reason), planned total."""

    written: int = 0
    verified: int = 0
    failed: List[Tuple[str, str]] = field(default_factory=list)
    planned: int = 0
    out_dir: str = ""

    def to_dict(self) -> dict:
        return {"planned": self.planned, "written": self.written, "verified_existing": self.verified,
                "failed": [{"path": p, "reason": r} for p, r in self.failed], "out_dir": self.out_dir}


#: Version of the random draws of the shift kernels: bumped whenever a kernel draws or applies its randomness
#: differently, so that a shifted set made by an older sampler is never resumed as if it were the same.
#: 2: sensor noise by inverse-CDF Poisson / variance-matched normal (one uniform + one normal per pixel).
#: 3: the 8-bit CPU route draws sensor noise by per-level quantile tables (12 random bits per pixel,
#: functional.scanner_u8.sensor_noise_u8) and runs both scanner profiles (A component by component, B's blur,
#: vignetting, saturation and sharpening chained in float32 per tile); disk blur filters in float32 there. The
#: float route is unchanged.
SAMPLER_VERSION = 3
#: simulate's own files inside OUT_DIR: configuration, journals, temporary files.
STATE_DIR = ".shiftkit"


class ConfigMismatchError(InvalidArgumentError):
    """OUT_DIR holds a shifted set made with another configuration (the message names the fields)."""


def _shard_filter(records: List[TileRecord], shard: Optional[Tuple[int, int]]) -> List[TileRecord]:
    if shard is None:
        return records
    i, n = shard
    if not (0 <= i < n):
        raise InvalidArgumentError(f"`shard` out of range: expected i/n with 0 <= i < n, got {i}/{n}")
    return [r for r in records if derive_seed("shard", r.sample_id) % n == i]


def spec_hash(spec) -> str:
    """SHA-256 of a shift's definition (its ``to_dict()``): resumed runs compare shifts by content."""
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def default_workers() -> int:
    """simulate's encoding threads when not given: one per CPU core available to this process, at most 8 (PNG
    encoding is about half of simulate's time on 224² tiles and releases the GIL)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def shift_routes(names: Sequence[str], device: str = "cpu") -> Dict[str, str]:
    """Each shift's route for uint8 tiles on ``device`` (what :func:`shift_tiles` takes there)."""
    from ..shifts.registry import get_spec
    from ..shifts.routes import route_on

    return {n: route_on(get_spec(n), device) for n in names}


def route_differences(old_routes: Dict[str, str], new_routes: Dict[str, str], earlier: Sequence[str],
                      unrecorded: Optional[str] = "float") -> List[str]:
    """The shifts made before (``earlier``) whose route would change (another device), as messages. A shift without
    a recorded route counts as ``unrecorded`` (simulate's sets from before routes took the float route)."""
    return [f"route of {n!r} ({old_routes.get(n, unrecorded)} -> {r}; another device)"
            for n, r in new_routes.items() if n in earlier and old_routes.get(n, unrecorded) != r]


def _state_config(specs, seed: int, mpp: Optional[float], fmt: str, device: str = "cpu") -> dict:
    from .. import __version__

    return {"format": "shiftkit-simulate-state/1", "seed": int(seed), "mpp": mpp, "output_format": fmt,
            "shiftkit_version": __version__, "torch": torch.__version__, "sampler_version": SAMPLER_VERSION,
            "severity_table_version": SEVERITY_TABLE_VERSION, "shifts": {sp.name: spec_hash(sp) for sp in specs},
            "routes": shift_routes([sp.name for sp in specs], device)}


def _config_differences(old: dict, new: dict) -> List[str]:
    diffs = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in ("seed", "mpp", "output_format", "shiftkit_version", "torch",
                                                                "sampler_version", "severity_table_version", "apply_icc")
             if old.get(k) != new.get(k)]
    old_shifts = old.get("shifts", {})
    diffs += [f"shift {n!r} configuration (content hash {old_shifts[n][:12]} -> {h[:12]})"
              for n, h in new["shifts"].items() if n in old_shifts and old_shifts[n] != h]
    diffs += route_differences(old.get("routes", {}), new.get("routes", {}), old_shifts)
    return diffs


def _prepare_out_dir(out: Path, config: dict, force: bool) -> None:
    """Check OUT_DIR against the configuration it was made with, and record the configuration.

    A new or empty folder is taken as it is. A folder made by ``simulate`` is resumed only with the same seed, mpp,
    output format, versions and, for every shift made before, the same shift configuration; otherwise
    :class:`ConfigMismatchError` names the differing fields. Any other non-empty folder is refused. ``force``
    forgets the earlier state (journals), so that every planned output is written again.
    """
    state = out / STATE_DIR
    cfg_path = state / "simulate.json"
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        diffs = _config_differences(old, config)
        if diffs and not force:
            raise ConfigMismatchError(
                f"`out_dir` {out} holds a shifted set made with another configuration: expected the same seed, mpp, "
                f"format, versions and shift definitions to resume it, got differences in: {'; '.join(diffs)}. "
                "Use another OUT_DIR, or --force to regenerate every output")
        if not diffs:
            config = {**config, "shifts": {**old.get("shifts", {}), **config["shifts"]},
                      "routes": {**old.get("routes", {}), **config["routes"]}}
    elif out.is_dir() and any(out.iterdir()) and not force:
        examples = sorted(p.name for p in out.iterdir())[:3]
        raise ConfigMismatchError(
            f"`out_dir` {out} is not empty and was not made by this version of `shiftkit simulate`: expected a new or "
            f"empty folder, or one made by simulate, got entries such as {examples}. Use another OUT_DIR, or --force "
            "to write there anyway (files at output names are replaced)")
    if force:
        for j in state.glob("journal*.jsonl"):
            j.unlink()
    state.mkdir(parents=True, exist_ok=True)
    _write_atomic(cfg_path, json.dumps(config, indent=2, sort_keys=True))


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
    workers: Optional[int] = None,
    force: bool = False,
    max_pixels: Optional[int] = None,
    apply_icc: Optional[bool] = None,
) -> SimulationReport:
    """Materialize shifted copies of ``base`` as ``out_dir/<shift>/<severity>/<output name>``.

    Output names follow :mod:`shiftkit.data.naming` (relative to the input root; sanitised for sources outside
    it; collisions resolved by one rule; never outside ``out_dir``). Writes ``manifest.csv`` / ``manifest.json``
    (one row per output: source, output, seed, drawn parameters, source and output SHA-256, shiftkit version,
    shift configuration; and every failure with its reason) and ``README.txt``, also when inputs failed.

    Resume: an existing output is reused only when its journal entry matches the seed, mpp, shift, severity,
    source file checksum and output checksum, and ``out_dir`` was made with the same configuration (seed, mpp,
    format, versions, shift definitions by content hash); a folder made otherwise raises
    :class:`ConfigMismatchError` naming the differences, unless ``force``. simulate's own files (configuration,
    journals, temporary files) live in ``out_dir/.shiftkit``; only its own temporary files are ever removed.

    Isolation: a source that cannot be read (missing, corrupt, over ``max_pixels``, a bad manifest row) or a tile
    whose shift raises fails alone (a batch that raises is retried tile by tile); every other output completes.
    ``workers`` threads encode and write files (default ``None``: one per CPU core, at most 8, chosen from
    experiments/speed/bench_simulate.py; 0 writes in the calling thread); the pixels do not depend on it.

    Colour profiles: each source's embedded ICC profile is recorded in the manifest (``icc``, its description) and
    embedded in its outputs (PNG, JPEG, TIFF: the shifted pixels stay in the source's colour space);
    ``apply_icc=True`` converts sources with one to sRGB before the shift instead (default: the dataset's setting).
    """
    from ..shifts.registry import get_spec

    ds = base if isinstance(base, TileDataset) else TileDataset(base, max_pixels=max_pixels)
    if max_pixels is not None:
        ds.max_pixels = max_pixels
    if apply_icc is not None:
        ds.apply_icc = bool(apply_icc)
    if fmt not in ("png", "jpeg"):
        raise InvalidArgumentError(f"`fmt` is invalid: expected 'png' (lossless) or 'jpeg', got {fmt!r}")
    specs = [get_spec(s) for s in shifts]
    sevs = sorted({int(s) for s in severities})
    for s in sevs:
        specs[0].values(s)
    out = Path(out_dir)
    if ds.kind == "folder" and overlaps(out, ds.root):
        raise InvalidArgumentError(f"`out_dir` is inside the input folder: expected a folder outside {ds.root} (outputs "
                                   f"there would be read as inputs next time), got {out}")
    if ds.kind != "folder" and out.exists() and out.resolve() == ds.root.resolve():
        raise InvalidArgumentError(f"`out_dir` is the input's own folder: expected another folder, got {out}")
    suffix = ".png" if fmt == "png" else ".jpg"
    usable = [r for r in ds.records if not r.error]
    planned_names = iter(plan_output_names([r.key for r in usable], suffix))
    names = [None if r.error else next(planned_names) for r in ds.records]
    bad_rows: Dict[str, str] = {}
    valid: List[Tuple[TileRecord, str]] = []
    for rec, name in zip(ds.records, names):
        if rec.error:
            bad_rows[rec.sample_id or rec.error.split(": ", 1)[0]] = rec.error
        elif name is None:
            bad_rows.setdefault(rec.sample_id, f"`{rec.path}` is listed more than once: expected one row per source, "
                                               "got a duplicate row (only the first is used)")
        else:
            valid.append((rec, name))
    name_of = {id(rec): name for rec, name in valid}
    records = _shard_filter([rec for rec, _ in valid], shard)
    plan = [(sp.name, sev, rec) for sp in specs for sev in sevs for rec in records]
    report = SimulationReport(planned=len(plan), out_dir=str(out))
    if dry_run:
        report.failed = sorted(bad_rows.items())
        return report
    config = {**_state_config(specs, seed, mpp, fmt, device), "apply_icc": ds.apply_icc}
    _prepare_out_dir(out, config, force)
    state = out / STATE_DIR
    tag = f"{shard[0]}-of-{shard[1]}" if shard else "all"
    journal_path = state / (f"journal-{tag}.jsonl" if shard else "journal.jsonl")
    tmp_dir = state / "tmp" / tag
    if tmp_dir.exists():  # this shard's partial files of a killed run; nothing else is touched
        for t in tmp_dir.iterdir():
            t.unlink()
    sources = {str(rec.path.resolve()) for rec in ds.records if not rec.error}

    def out_rel(name, sev, rec):
        return (Path(shift_folder(name)) / str(sev) / name_of[id(rec)]).as_posix()

    done: Dict[str, dict] = {}  # output -> last journal entry of an earlier run
    if journal_path.exists():
        with open(journal_path) as fh:
            for line in fh:
                try:
                    e = json.loads(line)
                    done[e["output"]] = e
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line from a kill
        _rewrite_journal_without_torn_lines(journal_path)

    file_sha: Dict[str, str] = {}

    def source_file_sha(rec: TileRecord) -> str:
        if rec.sample_id not in file_sha:
            try:
                file_sha[rec.sample_id] = file_sha256(rec.path)
            except OSError:
                file_sha[rec.sample_id] = ""
        return file_sha[rec.sample_id]

    def tile_mpp(rec: TileRecord) -> float:
        return float(mpp if mpp is not None else (rec.mpp or 0.5))

    todo = []
    for name, sev, rec in plan:
        rel = out_rel(name, sev, rec)
        e = done.get(rel)
        reusable = (
            e is not None and e.get("source") == rec.sample_id and e.get("shift") == name and e.get("severity") == sev
            and e.get("seed") == sample_seed(seed, name, sev, rec.sample_id) and e.get("mpp") == tile_mpp(rec)
            and e.get("source_file_sha256") == source_file_sha(rec) and (out / rel).is_file()
            and file_sha256(out / rel) == e.get("output_sha256")
        )
        if reusable:
            report.verified += 1
            if progress:
                progress(1)
        else:
            todo.append((name, sev, rec))

    # read each source once, then group by (shift, severity, size, mpp) into batches; bounded memory: one batch
    icc_of: Dict[str, str] = {}
    icc_bytes_of: Dict[str, bytes] = {}  # sources whose profile is kept: embedded in their outputs (one copy per profile)
    icc_copies: Dict[bytes, bytes] = {}
    failed: Dict[str, str] = dict(bad_rows)

    def read_source(rec: TileRecord):
        """``(image, pixel sha, file sha, icc description, icc bytes, error)`` of one source; touches no shared state
        (runs in the pool)."""
        try:
            info: dict = {}
            img = read_image(rec.path, max_pixels=ds.max_pixels, apply_icc=ds.apply_icc, info=info)
            return (img, hashlib.sha256(img.tobytes()).hexdigest(), info["sha256"], icc_description(info["icc"]),
                    info["icc"], "")
        except Exception as exc:
            return None, "", "", "", None, str(exc)

    def read_ahead(recs: List[TileRecord], window: int):
        """``read_source`` of each record in order; with a pool, up to ``window`` reads run ahead in it (decoding
        overlaps the shift kernels; memory grows by at most ``window`` source images)."""
        if pool is None or window <= 0:
            for rec in recs:
                yield read_source(rec)
            return
        from collections import deque

        ahead, it = deque(), iter(recs)
        for rec in it:
            ahead.append(pool.submit(read_source, rec))
            if len(ahead) >= window:
                break
        while ahead:
            res = ahead.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                ahead.append(pool.submit(read_source, nxt))
            yield res

    from concurrent.futures import ThreadPoolExecutor

    if workers is None:
        workers = default_workers()
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None

    def write_one(rel, a, icc=None):
        target = ensure_inside(out, out / rel)
        if str(target.resolve()) in sources:
            raise InvalidArgumentError(f"output `{target}` is a source image: expected a path that is no input")
        write_image(target, a, tmp_dir=tmp_dir, icc=icc)
        return file_sha256(target)

    def run_batch(name, sev, items):
        x = torch.from_numpy(np.stack([it[1] for it in items])).permute(0, 3, 1, 2).to(device)  # uint8 tiles
        seeds = [sample_seed(seed, name, sev, it[0].sample_id) for it in items]
        y, drawn = shift_tiles(x, name, sev, seeds, tile_mpp(items[0][0]))
        return y.permute(0, 2, 3, 1).cpu().numpy(), seeds, drawn

    with open(journal_path, "a") as journal:
        pending: Dict[tuple, list] = {}

        def flush(key):
            name, sev, _ = key
            items = pending.pop(key)
            try:
                results = [run_batch(name, sev, items)]
                groups = [items]
            except Exception:  # retry tile by tile, so that only the tiles that raise fail
                results, groups = [], []
                for it in items:
                    try:
                        results.append(run_batch(name, sev, [it]))
                        groups.append([it])
                    except Exception as exc:
                        failed[it[0].sample_id] = f"shift {name!r} severity {sev} failed: {type(exc).__name__}: {exc}"
            for group, (arr, seeds, drawn) in zip(groups, results):
                rels = [out_rel(name, sev, it[0]) for it in group]
                iccs = [icc_bytes_of.get(it[0].sample_id) for it in group]  # the source's profile, kept (not applied)
                if pool:  # encode and write in the pool while the next batch is read and shifted
                    outs = [pool.submit(guarded, r, a, c) for r, a, c in zip(rels, arr, iccs)]
                else:
                    outs = [guarded(r, a, c) for r, a, c in zip(rels, arr, iccs)]
                inflight.append((name, sev, group, rels, outs, seeds, drawn))
            drain(keep=2)  # at most two batches in flight: bounded memory
            if progress:
                progress(len(items))

        def guarded(rel, a, icc=None):
            try:
                return write_one(rel, a, icc), ""
            except Exception as exc:
                return "", f"cannot write {rel}: {type(exc).__name__}: {exc}"

        inflight: List[tuple] = []

        def drain(keep: int) -> None:
            """Journal the oldest batches once their files are written (a journal line always follows its file)."""
            while len(inflight) > keep:
                name, sev, group, rels, outs, seeds, drawn = inflight.pop(0)
                outcomes = [o.result() for o in outs] if pool else outs
                for (rec, _, src_sha), rel, (out_sha, err), s_, d in zip(group, rels, outcomes, seeds, drawn):
                    if err:
                        failed[rel] = err
                        continue
                    entry = {"source": rec.sample_id, "output": rel, "shift": name, "severity": sev, "seed": s_,
                             "mpp": tile_mpp(rec), "params": d, "source_sha256": src_sha,
                             "source_file_sha256": source_file_sha(rec), "output_sha256": out_sha,
                             "icc": icc_of.get(rec.sample_id, ""), "icc_applied": ds.apply_icc,
                             **{f"meta_{k}": v for k, v in rec.meta.items()}}
                    journal.write(json.dumps(entry) + "\n")
                    journal.flush()
                    report.written += 1

        by_source: Dict[str, list] = {}
        for name, sev, rec in todo:
            by_source.setdefault(rec.sample_id, []).append((name, sev, rec))
        sources_in_order = [jobs[0][2] for jobs in by_source.values()]
        for (sid, jobs), (img, sha, fsha, icc, icc_bytes, err) in zip(by_source.items(),
                                                                      read_ahead(sources_in_order, batch_size)):
            if img is None:
                failed[sid] = err
                if progress:
                    progress(len(jobs))
                continue
            file_sha[sid] = fsha  # the bytes decoded: the file is read once
            icc_of[sid] = icc
            if icc_bytes and not ds.apply_icc:
                icc_bytes_of[sid] = icc_copies.setdefault(icc_bytes, icc_bytes)
            for name, sev, rec in jobs:
                key = (name, sev, (img.shape, tile_mpp(rec)))
                pending.setdefault(key, []).append((rec, img, sha))
                if len(pending[key]) >= batch_size:
                    flush(key)
        for key in list(pending):
            flush(key)
        drain(keep=0)
    if pool:
        pool.shutdown()

    report.failed = sorted(failed.items())
    from .. import __version__

    manifest_config = {"shifts": [sp.to_dict() for sp in specs], "severities": sevs, "seed": int(seed), "mpp": mpp,
                       "format": fmt, "shard": list(shard) if shard else None, "shiftkit_version": __version__,
                       "sampler_version": SAMPLER_VERSION, "severity_table_version": SEVERITY_TABLE_VERSION,
                       "torch": torch.__version__, "apply_icc": ds.apply_icc,
                       "python": platform.python_version(), "device": device,
                       "routes": config["routes"]}
    stem = f"manifest-{shard[0]}-of-{shard[1]}" if shard else "manifest"
    n_rows = _write_manifests(out, stem, journal_path, manifest_config, report, {out_rel(n, s, r) for n, s, r in plan})
    _write_atomic(out / "README.txt", _readme(manifest_config, n_rows, report))
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
    cols = ["source", "output", "shift", "severity", "seed", "mpp", "params", "source_sha256", "output_sha256", "icc"]
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
            vals = [json.dumps(e[c]) if c == "params" else str(e.get(c, "")) for c in cols] + [str(e.get(k, "")) for k in extra_cols]
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
