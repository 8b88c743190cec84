"""DINO self-distillation for any timm backbone, from one CPU to many GPUs.

The SSL pieces come from lightly (``DINOProjectionHead``, ``DINOLoss`` with its distributed centring,
``update_momentum``, ``cosine_schedule``, ``get_weight_decay_parameters``); shiftkit adds device-side multi-crop
views with stain and scanner shift (:mod:`shiftkit.train.views`), diversity-aware sampling
(:mod:`shiftkit.train.sampling`), distributed data parallel training under ``torchrun``, gradient accumulation,
bf16 autocast on CUDA, atomic checkpoints with exact resume, a NaN guard and a kNN monitor.

Determinism: every random number of step ``s`` is drawn from generators seeded by ``(seed, s)`` — the global
batch, every view's parameters, and the global torch RNG (for drop-path) — so the run is a function of the
step, and ``--resume`` continues to the same result as an uninterrupted run. Views are drawn for the *global*
batch and sliced, so a 2-process run matches a 1-process run on the same global batch up to float reduction
order (for models without batch norm; batch norm statistics are per process unless converted to SyncBatchNorm,
which this module does on CUDA).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..core.errors import InvalidArgumentError, ShiftkitError, UnknownNameError
from ..core.rng import derive_seed
from ..core.shift_registry import SEVERITY_TABLE_VERSION
from ..models.encoders import IMAGENET_MEAN, IMAGENET_STD, INPUT_NORMS, standardize_input
from .sampling import DiversitySampler
from .views import AUGMENT_PRESETS, MultiCropAugment

CHECKPOINT = "checkpoint.pt"
ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_CONFIG = "encoder.json"

#: Named starting points. ``vit-s16`` follows REFERENCES B6 (ViT-S/16, 2 × 224 + 8 × 96 crops, 65,536 prototypes,
#: lr 2e-4·√(B/1024), EMA 0.992 → 1, weight decay 0.04 → 0.4, teacher temperature 0.04 → 0.07); ``cpu-small`` is
#: a ResNet-10t at 112/48 px with a 4,096-prototype head, sized for CPU smoke runs and the bundled encoder; it adds
#: batch norm to the head and a constant teacher temperature of 0.02, without which short runs on small sets drift
#: into uniform collapse (measured on the bundled tiles: docs/pretraining.md).
RECIPES: Dict[str, dict] = {
    "vit-s16": {"model": "timm:vit_small_patch16_224", "global_size": 224, "local_size": 96, "n_local": 8,
                "batch_size": 256, "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "lr": None,
                "momentum": (0.992, 1.0), "drop_path": 0.1, "norm_last_layer": True,
                "head_batch_norm": False, "teacher_temp": (0.04, 0.07)},
    "cpu-small": {"model": "timm:resnet10t", "global_size": 112, "local_size": 48, "n_local": 4,
                  "batch_size": 32, "out_dim": 4096, "hidden_dim": 512, "bottleneck_dim": 128, "lr": 1e-3,
                  "momentum": (0.99, 1.0), "drop_path": 0.0, "norm_last_layer": False,
                  "head_batch_norm": True, "teacher_temp": (0.02, 0.02)},
}


class TrainingDivergedError(ShiftkitError, FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on (saved as ``config.json``; ``None`` = the recipe's value)."""

    data: str = ""
    out: str = ""
    recipe: str = "auto"
    model: Optional[str] = None
    steps: int = 1000
    batch_size: Optional[int] = None
    accumulate: int = 1
    lr: Optional[float] = None
    min_lr: float = 1e-6
    warmup_steps: Optional[int] = None
    weight_decay: Tuple[float, float] = (0.04, 0.4)
    momentum: Optional[Tuple[float, float]] = None
    teacher_temp: Optional[Tuple[float, float]] = None
    teacher_temp_warmup_steps: Optional[int] = None
    student_temp: float = 0.1
    out_dim: Optional[int] = None
    hidden_dim: Optional[int] = None
    bottleneck_dim: Optional[int] = None
    freeze_last_layer_steps: Optional[int] = None
    norm_last_layer: Optional[bool] = None
    head_batch_norm: Optional[bool] = None
    clip_grad: float = 3.0
    drop_path: Optional[float] = None
    n_global: int = 2
    n_local: Optional[int] = None
    global_size: Optional[int] = None
    local_size: Optional[int] = None
    global_scale: Tuple[float, float] = (0.32, 1.0)
    local_scale: Tuple[float, float] = (0.05, 0.32)
    load_size: int = 224
    augment: str = "shiftkit"
    transfers: Tuple[str, ...] = ()
    pair_views: bool = False
    input_norm: str = "fixed"
    embed_grid: int = 1
    #: Standardization of the exported encoder's embedding (and of the kNN monitor), :data:`INPUT_NORMS`; ``None``:
    #: ``input_norm``. The training views always use ``input_norm``: this changes how the weights are read out, not
    #: what they learn.
    embed_norm: Optional[str] = None
    mpp: float = 0.5
    max_per_slide: Optional[int] = None
    balance_by: Tuple[str, ...] = ()
    seed: int = 0
    checkpoint_every: int = 100
    knn_every: int = 0
    val: Optional[str] = None
    label_column: str = "label"
    device: str = "auto"
    workers: int = 2
    export_dtype: str = "float32"

    def resolved(self) -> "PretrainConfig":
        """A copy with the recipe's values filled in and every field checked."""
        c = PretrainConfig(**asdict(self))
        dev = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        c.device = dev
        if c.recipe == "auto":
            c.recipe = "vit-s16" if dev.startswith("cuda") else "cpu-small"
        if c.recipe not in RECIPES:
            raise UnknownNameError("recipe", c.recipe, RECIPES)
        for k, v in RECIPES[c.recipe].items():
            if getattr(c, k) is None:
                setattr(c, k, tuple(v) if isinstance(v, list) else v)
        if c.model and not c.model.startswith("timm:"):
            raise InvalidArgumentError(f"`model` is not a timm spec: expected 'timm:NAME' (any timm backbone), got {c.model!r}")
        if c.augment not in AUGMENT_PRESETS:
            raise UnknownNameError("augment", c.augment, AUGMENT_PRESETS)
        for name in ("steps", "batch_size", "accumulate", "n_global", "global_size", "local_size", "load_size",
                     "out_dim", "hidden_dim", "bottleneck_dim"):
            v = getattr(c, name)
            if not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"`{name}` out of range: expected a positive integer, got {v!r}")
        if c.n_global < 2 and c.n_local < 1:
            raise InvalidArgumentError("`n_local` out of range: expected >= 1 local view with a single global view, got 0")
        if c.lr is None:
            c.lr = 2e-4 * math.sqrt(c.batch_size / 1024)
        if not (c.lr > 0 and math.isfinite(c.lr)):
            raise InvalidArgumentError(f"`lr` out of range: expected a positive number, got {c.lr!r}")
        if c.warmup_steps is None:
            c.warmup_steps = min(c.steps // 10, 3750)
        if c.teacher_temp_warmup_steps is None:
            c.teacher_temp_warmup_steps = int(0.3 * c.steps)
        if c.freeze_last_layer_steps is None:
            c.freeze_last_layer_steps = min(c.steps // 20, 1250)
        if c.export_dtype not in ("float32", "float16", "bfloat16"):
            raise UnknownNameError("export_dtype", c.export_dtype, ("float32", "float16", "bfloat16"))
        c.weight_decay, c.teacher_temp = tuple(c.weight_decay), tuple(c.teacher_temp)
        c.momentum, c.balance_by = tuple(c.momentum), tuple(c.balance_by)
        c.global_scale, c.local_scale = tuple(c.global_scale), tuple(c.local_scale)
        c.transfers = tuple(str(t) for t in c.transfers)
        if c.transfers:
            from .views import transfer_shift_names

            transfer_shift_names(c.transfers)  # unknown or held-out profiles are refused before any work
        if c.input_norm not in INPUT_NORMS:
            raise UnknownNameError("input_norm", c.input_norm, INPUT_NORMS)
        c.embed_norm = c.input_norm if c.embed_norm is None else c.embed_norm
        if c.embed_norm not in INPUT_NORMS:
            raise UnknownNameError("embed_norm", c.embed_norm, INPUT_NORMS)
        if isinstance(c.embed_grid, bool) or not isinstance(c.embed_grid, int) or c.embed_grid < 1:
            raise InvalidArgumentError(f"`embed_grid` out of range: expected a positive integer, got {c.embed_grid!r}")
        if c.embed_grid > 1 and c.model[5:].startswith(("vit", "deit", "eva", "beit")):
            raise InvalidArgumentError(f"`embed_grid` {c.embed_grid} needs a CNN feature map: expected embed_grid 1 "
                                       f"for the transformer {c.model}, got {c.embed_grid}")
        if c.pair_views and c.n_global < 2:
            raise InvalidArgumentError(f"`pair_views` needs two global views: expected n_global >= 2, got {c.n_global}")
        return c

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidArgumentError(f"`config` has unknown keys: expected fields of PretrainConfig, got {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ------------------------------------------------------------------------------------------------ model
def _timm_backbone(name: str, drop_path: float, seed: int) -> Tuple[nn.Module, dict]:
    import timm

    kwargs: Dict[str, Any] = {"num_classes": 0}
    if drop_path:
        kwargs["drop_path_rate"] = float(drop_path)
    if name.startswith(("vit", "deit", "eva", "beit")):
        kwargs["dynamic_img_size"] = True  # local crops have another size than global ones
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(seed, "init"))
        model = timm.create_model(name, pretrained=False, **kwargs)
    return model, {k: v for k, v in kwargs.items() if k != "drop_path_rate"}


class MultiCropModel(nn.Module):
    """Backbone + DINO head over a list of views: one backbone call per run of equal-sized views, one head call."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views: List[torch.Tensor]) -> List[torch.Tensor]:
        feats, i = [], 0
        while i < len(views):
            j = i
            while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
                j += 1
            f = self.backbone(torch.cat(views[i:j]))
            feats.append(f.flatten(1) if f.ndim == 2 else f.mean(1))
            i = j
        out = self.head(torch.cat(feats))
        return list(out.chunk(len(views)))


def _build(c: PretrainConfig) -> Tuple[MultiCropModel, MultiCropModel, dict]:
    from lightly.models.modules import DINOProjectionHead

    name = c.model[5:]

    def one() -> Tuple[MultiCropModel, dict]:
        backbone, kwargs = _timm_backbone(name, c.drop_path, c.seed)
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
            torch.manual_seed(derive_seed(c.seed, "head"))
            head = DINOProjectionHead(backbone.num_features, c.hidden_dim, c.bottleneck_dim, c.out_dim,
                                      freeze_last_layer=c.freeze_last_layer_steps, norm_last_layer=c.norm_last_layer,
                                      batch_norm=c.head_batch_norm)
        return MultiCropModel(backbone, head), kwargs

    student, kwargs = one()
    teacher, _ = one()
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher, kwargs


# ------------------------------------------------------------------------------------------------ data
class _StepBatches(torch.utils.data.Dataset):
    """Item ``step``: this rank's micro-batches of that step as uint8 ``(A, b, 3, S, S)`` (S = load size)."""

    def __init__(self, dataset, sampler: DiversitySampler, global_batch: int, accumulate: int, rank: int,
                 world: int, load_size: int, twins: Optional[Dict[int, List[int]]] = None, seed: int = 0):
        self.ds, self.sampler, self.twins, self.seed = dataset, sampler, twins, int(seed)
        self.gb, self.acc, self.rank, self.world, self.size = global_batch, accumulate, rank, world, load_size
        self.micro = global_batch // (accumulate * world)
        self._cache: Dict[int, np.ndarray] = {}
        self.cache_limit = (256 << 20) // (3 * load_size * load_size)  # decoded tiles kept: 256 MiB per process

    def __len__(self) -> int:
        return 1 << 62

    def positions(self, k: int) -> Tuple[int, int]:
        lo = k * (self.gb // self.acc) + self.rank * self.micro
        return lo, lo + self.micro

    def _load(self, i: int) -> Tuple[Optional[np.ndarray], str]:
        import cv2

        from ..data.io import read_image

        if i in self._cache:
            return self._cache[i], ""
        try:
            img = read_image(self.ds.records[i].path)
        except Exception as exc:
            return None, f"{self.ds.records[i].path}: {exc}"
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        if s != self.size:
            img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA if s > self.size else cv2.INTER_CUBIC)
        img = np.ascontiguousarray(img)
        if len(self._cache) < self.cache_limit:
            self._cache[i] = img
        return img, ""

    def __getitem__(self, step: int):
        """``(tiles, bad, twins)``: uint8 ``(A, b, 3, S, S)``, the unreadable tiles met, and with pair views the
        registered twins ``(A, b, 3, S, S)`` and which rows have one ``(A, b)`` (else None)."""
        idx = self.sampler.global_batch(step, self.gb)
        out = np.empty((self.acc, self.micro, self.size, self.size, 3), np.uint8)
        tw = np.zeros_like(out) if self.twins is not None else None
        has = np.zeros((self.acc, self.micro), bool)
        bad: List[str] = []
        for k in range(self.acc):
            lo, hi = self.positions(k)
            for j, i in enumerate(idx[lo:hi]):
                img, err = self._load(int(i))
                tries = 0
                while img is None:  # a bad tile is reported and replaced by the next good one, deterministically
                    bad.append(err)
                    tries += 1
                    if tries > len(self.sampler):
                        raise InvalidArgumentError(f"`data` has no readable tile: expected images, got errors such as {err}")
                    i = self.sampler.indices[(np.searchsorted(self.sampler.indices, i) + 1) % len(self.sampler)]
                    img, err = self._load(int(i))
                out[k, j] = img
                if tw is not None and int(i) in self.twins:  # one twin per tile and step, drawn from (seed, step, row)
                    cands = self.twins[int(i)]
                    t = cands[derive_seed(self.seed, "twin", int(step), lo + j) % len(cands)]
                    timg, err = self._load(int(t))
                    if timg is None:
                        bad.append(err)
                    else:
                        tw[k, j], has[k, j] = timg, True
        twins = None if tw is None else (torch.from_numpy(tw).permute(0, 1, 4, 2, 3), torch.from_numpy(has))
        return torch.from_numpy(out).permute(0, 1, 4, 2, 3), bad, twins


#: Fields that may change when a run is resumed: the length of the run and bookkeeping. Any other field must be
#: the run's own (a changed one is refused, naming it).
RESUMABLE_FIELDS = ("steps", "checkpoint_every", "knn_every", "workers", "device")
CHECKPOINT_FORMAT = "shiftkit-pretrain-checkpoint/1"


def load_checkpoint(path: Any) -> dict:
    """A pretraining checkpoint read safely (``weights_only``), or a one-line :class:`InvalidArgumentError` naming the
    file and what was expected when it is missing, truncated or foreign."""
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidArgumentError(f"`{path}` is not a readable shiftkit checkpoint: expected a file written by `shiftkit "
                                   f"pretrain` ({CHECKPOINT_FORMAT}), got a truncated or foreign file "
                                   f"({type(exc).__name__})") from None
    need = ("step", "student", "teacher", "optimizer", "loss", "config")
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT or any(k not in saved for k in need):
        got = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise InvalidArgumentError(f"`{path}` is not a shiftkit checkpoint: expected format {CHECKPOINT_FORMAT!r} with "
                                   f"{', '.join(need)}, got {got!r}")
    return saved


def checkpoint_config(run_dir: Any) -> dict:
    """The configuration a run in ``run_dir`` was made with (from its checkpoint), for resuming it."""
    return dict(load_checkpoint(Path(run_dir) / CHECKPOINT)["config"])


def _changed_fields(new: "PretrainConfig", old: "PretrainConfig") -> List[str]:
    """Fields ``new`` sets (not None) to something other than the run's own, outside :data:`RESUMABLE_FIELDS`."""
    def norm(v):
        return json.loads(json.dumps(v))

    out = []
    for f in fields(PretrainConfig):
        v = getattr(new, f.name)
        if f.name in RESUMABLE_FIELDS or v is None:
            continue
        if norm(v) != norm(getattr(old, f.name)):
            out.append(f"{f.name} ({getattr(old, f.name)!r} -> {v!r})")
    return out


def _truncate_log(path: Path, start: int) -> None:
    """Keep only the log lines of steps before ``start`` (those the checkpoint holds); drop torn lines."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) < start:
                keep.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ helpers
def _dist_info() -> Tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _write_atomic_bytes(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)  # created by open(): its mode honours the umask
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _export_encoder(run: Path, teacher: MultiCropModel, c: PretrainConfig, kwargs: dict, step: int) -> None:
    from safetensors.torch import save_file

    dtype = getattr(torch, c.export_dtype)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in teacher.backbone.state_dict().items()}
    _write_atomic_bytes(run / ENCODER_WEIGHTS, lambda p: save_file(state, str(p)))
    meta = {"format": "shiftkit-encoder/1", "spec": c.model, "timm_kwargs": kwargs, "input_size": c.global_size,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "weights": ENCODER_WEIGHTS,
            "weights_dtype": c.export_dtype, "trained_by": "shiftkit pretrain (DINO, teacher backbone)",
            "step": step, "recipe": c.recipe, "augment": c.augment, "data": c.data, "seed": c.seed,
            "transfers": list(c.transfers), "pair_views": bool(c.pair_views), "input_norm": c.embed_norm,
            "train_input_norm": c.input_norm, "embed_grid": c.embed_grid,
            "severity_table_version": SEVERITY_TABLE_VERSION}
    _write_atomic_bytes(run / ENCODER_CONFIG, lambda p: p.write_text(json.dumps(meta, indent=2)))


def _rng_state(device: torch.device) -> dict:
    st = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def knn_monitor(backbone: nn.Module, images: torch.Tensor, labels: np.ndarray, size: int, device: torch.device,
                k: int = 20, input_norm: str = "fixed", grid: int = 1) -> float:
    """Leave-one-out kNN balanced accuracy of ``backbone`` features (centred, L2-normalised cosine) on uint8
    ``images (N, 3, H, W)`` resized to ``size``, embedded as the exported encoder will (``input_norm``, ``grid``).
    The backbone's train/eval mode is restored afterwards."""
    from ..core.knn import balanced_accuracy, knn_predict
    from ..models.encoders import Encoder

    was = backbone.training
    try:
        emb = Encoder(backbone, "pretrain-monitor", size, input_norm=input_norm, grid=grid).embed(
            images.float() / 255, device=str(device))
    finally:
        backbone.train(was)
    ids = np.arange(len(emb))
    # k well below the class size: with leave-one-out on a small balanced set, k near N always votes for the
    # other class (the left-out tile's own class has one member fewer)
    kk = max(1, min(k, len(emb) // 4) | 1)
    pred = knn_predict(emb, labels, emb, k=kk, exclude_same=(ids, ids))
    return balanced_accuracy(labels, pred)


def twin_index(records) -> Dict[int, List[int]]:
    """Registered twins by record index: rows sharing a ``pair_id`` under another ``scanner`` (else ``condition``)."""
    groups: Dict[str, List[int]] = {}
    for i, r in enumerate(records):
        pid = str(r.meta.get("pair_id", "") or "").strip()
        if pid:
            groups.setdefault(pid, []).append(i)
    out: Dict[int, List[int]] = {}
    for members in groups.values():
        for i in members:
            dom = lambda j: str(records[j].meta.get("scanner") or records[j].meta.get("condition") or "")  # noqa: E731
            others = [j for j in members if dom(j) and dom(j) != dom(i)]
            if others and dom(i):
                out[i] = others
    return out


def split_validation(records) -> Tuple[list, list]:
    """Training and validation records: a manifest ``split`` column of ``val`` marks validation tiles, which are
    then never trained on."""
    val = [r for r in records if str(r.meta.get("split", "")).lower() in ("val", "valid", "validation")]
    return [r for r in records if r not in val] if val else list(records), val


def _load_val(c: PretrainConfig, split_val: list) -> Tuple[Optional[torch.Tensor], Optional[np.ndarray]]:
    if not c.knn_every or not (c.val or split_val):
        return None, None
    from ..data.io import read_image
    from ..data.shifted import TileDataset

    source = c.val or f"the split=val rows of {c.data}"
    recs = [r for r in (TileDataset(c.val).records if c.val else split_val) if c.label_column in r.meta]
    if len(recs) < 3 or len({r.meta[c.label_column] for r in recs}) < 2:
        raise InvalidArgumentError(f"`val` cannot monitor kNN accuracy: expected >= 3 tiles with >= 2 values in column "
                                   f"{c.label_column!r}, got {len(recs)} labelled tiles in {source}")
    import cv2

    imgs = []
    for r in recs:
        im = read_image(r.path)
        imgs.append(cv2.resize(im, (c.global_size, c.global_size), interpolation=cv2.INTER_AREA))
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2), np.array([r.meta[c.label_column] for r in recs])


# ------------------------------------------------------------------------------------------------ training
def pretrain(config: Any, *, resume: bool = False, progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Run DINO pretraining as configured (a :class:`PretrainConfig` or its dict) and return a summary.

    One process, or one rank of ``torchrun`` (``WORLD_SIZE`` > 1: NCCL on CUDA, Gloo on CPU). Writes to
    ``config.out``: ``config.json``, ``diversity.json``, ``log.jsonl`` (one line per step: loss, schedules,
    throughput, and the collapse diagnostics ``teacher_entropy`` — mean entropy of the teacher's centred, sharpened
    distribution per view — and ``teacher_batch_entropy`` — entropy of its batch mean, this rank's batch; both near
    ln(out_dim) means uniform collapse, both near 0 collapse onto one prototype; kNN accuracy every ``knn_every`` steps
    on the labelled ``val`` set, else on the manifest rows whose ``split`` column is ``val`` — which are then left
    out of training), ``checkpoint.pt`` (every ``checkpoint_every`` steps, at the end and on SIGTERM),
    ``encoder.safetensors`` + ``encoder.json`` (the teacher backbone; ``shiftkit stress-test --model RUN_DIR``
    loads it) and ``bad_tiles.txt`` when tiles could not be read (they are replaced by the next readable tile).

    Raises :class:`TrainingDivergedError` when the loss is not finite; the last checkpoint is left as it was.
    """
    try:
        from lightly.loss import DINOLoss
        from lightly.models.utils import get_weight_decay_parameters, update_momentum
        from lightly.utils.scheduler import cosine_schedule
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("shiftkit pretraining needs lightly: pip install 'shiftkit[train]'") from exc
    from ..data.shifted import TileDataset

    cfg = config if isinstance(config, PretrainConfig) else PretrainConfig.from_dict(dict(config))
    if not cfg.data or not cfg.out:
        raise InvalidArgumentError(f"`data` and `out` are required: expected a dataset and a run folder, got data={cfg.data!r}, out={cfg.out!r}")
    run = Path(cfg.out)
    rank, world, local_rank = _dist_info()
    ckpt_path = run / CHECKPOINT
    if resume and ckpt_path.is_file():
        saved = load_checkpoint(ckpt_path)
        old = PretrainConfig.from_dict(saved["config"])
        changed = _changed_fields(cfg, old)
        if changed:
            raise InvalidArgumentError(f"`--resume` cannot change the run's settings: expected only "
                                       f"{', '.join(RESUMABLE_FIELDS)} to differ from {ckpt_path}, got changed "
                                       f"{'; '.join(changed)}")
        for k in RESUMABLE_FIELDS:  # only the length of the run and bookkeeping may change on resume
            setattr(old, k, getattr(cfg, k))
        cfg = old
    else:
        saved = None
        if resume:
            raise InvalidArgumentError(f"`--resume` has nothing to resume: expected {ckpt_path}, got no checkpoint")
        if ckpt_path.exists():
            raise InvalidArgumentError(f"`out` already holds a run: expected a new folder or --resume, got {run} with {CHECKPOINT}")
    c = cfg.resolved()
    if c.batch_size % (c.accumulate * world):
        raise InvalidArgumentError(f"`batch_size` does not split: expected a multiple of accumulate x world size "
                                   f"= {c.accumulate * world}, got {c.batch_size}")

    owns_pg = False
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if c.device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        owns_pg = True
    device = torch.device(f"cuda:{local_rank}" if c.device == "cuda" and world > 1 else c.device)
    if device.type == "cuda" and device.index is not None:  # plain "cuda" is the current device already
        torch.cuda.set_device(device)

    dataset = TileDataset(c.data)
    dataset.records, split_val = split_validation(dataset.records)
    sampler = DiversitySampler(dataset.records, max_per_slide=c.max_per_slide, balance_by=c.balance_by, seed=c.seed)
    student, teacher, timm_kwargs = _build(c)
    loss_fn = DINOLoss(output_dim=c.out_dim, teacher_temp=c.teacher_temp[1], student_temp=c.student_temp)
    start = 0
    if saved is not None:
        student.load_state_dict(saved["student"])
        teacher.load_state_dict(saved["teacher"])
        loss_fn.load_state_dict(saved["loss"])
        start = int(saved["step"])
    for module in (student, teacher, loss_fn):
        module.to(device)
    if world > 1 and device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    decay, no_decay = get_weight_decay_parameters([student])
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=c.lr)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
    ddp = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else None
    model = ddp if ddp is not None else student
    augment = MultiCropAugment(c.n_global, c.n_local, c.global_size, c.local_size, c.global_scale, c.local_scale,
                               c.augment, c.mpp, c.seed, transfers=c.transfers).to(device)
    val_images, val_labels = _load_val(c, split_val) if rank == 0 else (None, None)

    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps({**c.to_dict(), "world_size": world, "torch": torch.__version__,
                                                     "python": platform.python_version()}, indent=2))
        (run / "diversity.json").write_text(json.dumps(sampler.stats, indent=2))

    twins = None
    if c.pair_views:
        twins = twin_index(dataset.records)
        if not twins:
            raise InvalidArgumentError(f"`pair_views` found no registered twins in {c.data}: expected manifest columns "
                                       "`pair_id` and `scanner` (or `condition`), with rows of one pair_id under two values")
    steps_data = _StepBatches(dataset, sampler, c.batch_size, c.accumulate, rank, world, c.load_size, twins, c.seed)
    loader = torch.utils.data.DataLoader(steps_data, batch_size=None, sampler=range(start, c.steps),
                                         num_workers=c.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False, prefetch_factor=2 if c.workers else None)
    stop = {"flag": False}

    def on_term(signum, frame):  # noqa: ARG001
        stop["flag"] = True

    old_handler = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    if rank == 0 and saved is not None:
        _truncate_log(run / "log.jsonl", start)  # steps after the checkpoint are run (and logged) again
    log = open(run / "log.jsonl", "a") if rank == 0 else None
    bad_seen: List[str] = []
    last_ckpt = start if saved is not None else None
    summary: Dict[str, Any] = {"run": str(run), "start_step": start, "steps": c.steps, "status": "finished",
                               "world_size": world, "device": str(device)}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def save(step_next: int) -> None:
        nonlocal last_ckpt
        if rank == 0:
            state = {"format": "shiftkit-pretrain-checkpoint/1", "step": step_next,
                     "student": student.state_dict(), "teacher": teacher.state_dict(),
                     "optimizer": optimizer.state_dict(), "loss": loss_fn.state_dict(), "config": c.to_dict(),
                     "rng": _rng_state(device), "data": {"sampler_seed": c.seed, "next_step": step_next},
                     "world_size": world}
            _write_atomic_bytes(ckpt_path, lambda p: torch.save(state, p))
            _export_encoder(run, teacher, c, timm_kwargs, step_next)
        if world > 1:
            torch.distributed.barrier()
        last_ckpt = step_next

    def any_rank(flag: bool) -> bool:
        if world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device if device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return bool(t.item() > 0)

    try:
        if rank == 0 and val_images is not None and start == 0:
            acc = knn_monitor(
                teacher.backbone, val_images, val_labels, c.global_size, device, input_norm=c.embed_norm, grid=c.embed_grid)
            log.write(json.dumps({"step": 0, "knn_balanced_accuracy": acc}) + "\n")
            log.flush()
        t_wait = time.perf_counter()
        for step, (batches, bad, twin_batches) in zip(range(start, c.steps), loader):
            t0 = time.perf_counter()
            data_wait = t0 - t_wait
            for b in bad:
                if b not in bad_seen:
                    bad_seen.append(b)
            torch.manual_seed(derive_seed(c.seed, "step", step, rank))  # drop-path and any other global-RNG use
            lr = c.lr * (step + 1) / max(1, c.warmup_steps) if step < c.warmup_steps else \
                cosine_schedule(step - c.warmup_steps, max(1, c.steps - c.warmup_steps), c.lr, c.min_lr)
            wd = cosine_schedule(step, c.steps, c.weight_decay[0], c.weight_decay[1])
            mom = cosine_schedule(step, c.steps, c.momentum[0], c.momentum[1])
            tt = c.teacher_temp[0] + (c.teacher_temp[1] - c.teacher_temp[0]) * min(1.0, step / max(1, c.teacher_temp_warmup_steps))
            for gi, group in enumerate(optimizer.param_groups):
                group["lr"] = lr
                group["weight_decay"] = wd if gi == 0 else 0.0
            aug_s, total, h_sample, h_batch = 0.0, 0.0, 0.0, 0.0
            for k in range(c.accumulate):
                ta = time.perf_counter()
                x = batches[k].to(device, non_blocking=True).float().div_(255)
                tw = has = None
                if twin_batches is not None:
                    tw = twin_batches[0][k].to(device, non_blocking=True).float().div_(255)
                    has = twin_batches[1][k]
                views = augment(x, step, offset=steps_data.positions(k)[0], global_batch=c.batch_size, twin=tw, has_twin=has)
                views = [standardize_input(v, c.input_norm) for v in views]
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                aug_s += time.perf_counter() - ta
                sync = ddp.no_sync() if ddp is not None and k < c.accumulate - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        with torch.no_grad():
                            t_out = teacher(views[: c.n_global])
                        s_out = model(views)
                    loss = loss_fn([t.float() for t in t_out], [s.float() for s in s_out], teacher_temp=tt)
                    if any_rank(not bool(torch.isfinite(loss))):
                        where = f"the last good checkpoint is {ckpt_path} (step {last_ckpt})" if last_ckpt is not None \
                            else "no checkpoint was written yet"
                        raise TrainingDivergedError(
                            f"loss is not finite at step {step} (got {loss.item()}): training stopped; {where}. "
                            "Lower --lr, raise warm-up, or check the data.")
                    (loss / c.accumulate).backward()
                total += float(loss.detach()) / c.accumulate
                with torch.no_grad():  # collapse diagnostics: both near ln K = uniform collapse, both near 0 = one prototype
                    pt = torch.softmax((torch.cat(t_out).float() - loss_fn.center.view(1, -1)) / tt, dim=-1)
                    h_sample += float(-(pt * pt.clamp_min(1e-30).log()).sum(-1).mean()) / c.accumulate
                    pm = pt.mean(0)
                    h_batch += float(-(pm * pm.clamp_min(1e-30).log()).sum()) / c.accumulate
            student.head.cancel_last_layer_gradients(step)
            if c.clip_grad:
                torch.nn.utils.clip_grad_norm_(student.parameters(), c.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_momentum(student, teacher, mom)
            if world > 1:
                t = torch.tensor([total], device=device if device.type == "cuda" else "cpu")
                torch.distributed.all_reduce(t)
                total = float(t.item()) / world
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            entry = {"step": step, "loss": total, "lr": lr, "weight_decay": wd, "momentum": mom, "teacher_temp": tt,
                     "teacher_entropy": h_sample, "teacher_batch_entropy": h_batch,
                     "images_per_s": c.batch_size / max(dt, 1e-9), "step_s": dt, "augment_s": aug_s,
                     "data_wait_s": data_wait}
            done = step + 1
            if rank == 0 and val_images is not None and (done % c.knn_every == 0 or done == c.steps):
                entry["knn_balanced_accuracy"] = knn_monitor(
                    teacher.backbone, val_images, val_labels, c.global_size, device, input_norm=c.embed_norm,
                    grid=c.embed_grid)
            if rank == 0:
                log.write(json.dumps(entry) + "\n")
                log.flush()
                if progress:
                    progress(entry)
            summary.update(last_loss=total, last_step=step)
            if any_rank(stop["flag"]):
                save(done)
                summary["status"] = "interrupted"
                break
            if done == c.steps or (c.checkpoint_every and done % c.checkpoint_every == 0):
                save(done)
            t_wait = time.perf_counter()
        else:
            if last_ckpt != c.steps:
                save(c.steps)
    finally:
        if log is not None:
            log.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if rank == 0 and bad_seen:
            (run / "bad_tiles.txt").write_text("\n".join(bad_seen) + "\n")
        if owns_pg:
            torch.distributed.destroy_process_group()
    summary["bad_tiles"] = len(bad_seen)
    summary["checkpoint"] = str(ckpt_path)
    summary["diversity"] = sampler.stats
    return summary


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
