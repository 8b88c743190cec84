"""Encoders by spec, and batched embedding extraction.

Specs: ``"default"`` (the bundled encoder below), a foundation-model preset (``"uni2-h"``, ``"virchow2"``, …:
:mod:`shiftkit.models.presets`, ``shiftkit models``; random weights unless ``weights=``), ``"random"`` (timm ``resnet18`` with seed-0 weights, an
untrained reference), ``"timm:<name>"`` (random init unless ``weights=``; ``timm:hf-hub:...`` names load where a
hub is reachable), a ``shiftkit pretrain`` run folder or its ``encoder.json``, a TorchScript file
(``*.pt``/``*.ts``/``*.torchscript``), or ``"module:callable"`` returning an ``nn.Module``. Weights load from
safetensors or a state dict read with ``weights_only=True`` — never by unpickling arbitrary objects.

The default encoder is ``shiftkit/models/weights/default_encoder.safetensors``: a timm ResNet-10t pretrained with
DINO by ``shiftkit pretrain`` (600 CPU steps, stain and synthetic scanner views) on 486 tiles of Camelyon17 and the
permissively licensed example images, whose embedding is a 4 x 4 grid of its last feature map (8,192-d) at a 112²
input whose channels are standardized by each image's own mean and std. The command that made it is in
``default_encoder.json`` and docs/pretraining.md; it is arm (h) of ``experiments/shift_pretraining``. It makes the
main job meaningful and reproducible; it is not a pathology foundation model.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..core.errors import InvalidArgumentError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")

#: How an encoder's input is standardized: ``"fixed"`` — ``(x − mean) / std`` with the encoder's constants (ImageNet's
#: by default); ``"per-image"`` — each image's channels by their own mean and standard deviation over the image, so a
#: colour shift that is affine per channel (most of a scanner's or a lab's) is gone before the network sees it.
INPUT_NORMS = ("fixed", "per-image")
#: Added to the per-image standard deviation: a flat (blank) image stays finite.
PER_IMAGE_STD_FLOOR = 1e-2


def standardize_input(x: torch.Tensor, input_norm: str = "fixed", mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """The network input of float images ``x`` ``(B, 3, H, W)`` in [0, 1] under ``input_norm`` (:data:`INPUT_NORMS`).

    ``"per-image"`` uses statistics of each image alone (never of a batch or a test set), so an image embeds the same
    whatever it is batched with."""
    if input_norm == "fixed":
        m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - m) / s
    if input_norm == "per-image":
        return (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + PER_IMAGE_STD_FLOOR)
    raise InvalidArgumentError(f"`input_norm` is invalid: expected one of {INPUT_NORMS}, got {input_norm!r}")


def autocast_for(precision: str, device: str):
    """The autocast context of ``precision`` on ``device`` (an error naming it when impossible, e.g. fp16 on CPU)."""
    import contextlib

    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"`precision` is invalid: expected one of {PRECISIONS}, got {precision!r}")
    cuda = str(device).startswith("cuda")
    if precision == "fp32" or (precision == "auto" and not cuda):
        return contextlib.nullcontext()
    if precision == "fp16" and not cuda:
        raise InvalidArgumentError(f"`precision` fp16 needs CUDA: expected bf16 or fp32 on {device}, got fp16")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast("cuda" if cuda else "cpu", dtype=dtype)


@dataclass
class Encoder:
    """A loaded encoder and how to feed it."""

    module: nn.Module
    spec: str
    input_size: int = 224
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    weights_sha256: str = ""
    info: dict = field(default_factory=dict)
    #: ``"auto"`` (bf16 autocast on CUDA, float32 elsewhere), ``"bf16"``, ``"fp16"`` (CUDA only) or ``"fp32"``.
    precision: str = "auto"
    #: :data:`INPUT_NORMS`: ``"fixed"`` (``mean``/``std``) or ``"per-image"`` (see :func:`standardize_input`).
    input_norm: str = "fixed"
    #: 1: the module's own (global) embedding; ``g > 1``: its last feature map average-pooled to ``g x g`` and
    #: flattened, an embedding that keeps coarse layout (``g²`` times wider; CNN feature maps only).
    grid: int = 1

    def __post_init__(self):
        if self.input_norm not in INPUT_NORMS:
            raise InvalidArgumentError(f"`input_norm` is invalid: expected one of {INPUT_NORMS}, got {self.input_norm!r}")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise InvalidArgumentError(f"`grid` out of range: expected a positive integer, got {self.grid!r}")
        if self.grid > 1 and not callable(getattr(self.module, "forward_features", None)):
            raise InvalidArgumentError(f"`grid` {self.grid} needs a feature map: expected a timm CNN with "
                                       f"forward_features, got {type(self.module).__name__} ({self.spec})")

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
        """Embeddings ``(N, D)`` float32 of float images ``(N, 3, H, W)`` in [0, 1] (resized to ``input_size``,
        standardized by ``input_norm``, pooled by ``grid``)."""
        m = self.module.to(device).eval()
        out = []
        for s in range(0, images.shape[0], batch_size):
            x = images[s : s + batch_size].to(device).float()
            if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
                x = torch.nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                                    antialias=True, align_corners=False)
            x = standardize_input(x, self.input_norm, self.mean, self.std)
            with autocast_for(self.precision, device):
                if self.grid > 1:
                    f = m.forward_features(x)
                    if f.ndim != 4:
                        raise InvalidArgumentError(f"`grid` {self.grid} needs a feature map: expected (B, C, H, W) "
                                                   f"features from {self.spec}, got shape {tuple(f.shape)}")
                    f = torch.nn.functional.adaptive_avg_pool2d(f.float(), self.grid)
                else:
                    f = m(x)
            if f.ndim == 3:  # tokens: mean-pool
                f = f.mean(1)
            out.append(f.float().flatten(1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)

    def describe_input(self) -> str:
        """How images reach the embedding, in words (for reports)."""
        norm = "per-image channel standardization" if self.input_norm == "per-image" else "fixed mean/std"
        pool = f"{self.grid} x {self.grid} grid of the last feature map" if self.grid > 1 else "global embedding"
        return f"{self.input_size}² input, {norm}, {pool}"

    def with_readout(self, input_norm: Optional[str] = None, grid: Optional[int] = None,
                     input_size: Optional[int] = None) -> Encoder:
        """A copy with another input standardization, embedding grid or input side (``None`` keeps this one's); the
        weights are shared. ``info["architecture"]`` ends with the new :meth:`describe_input`. This is how the
        stress test's ``--input-norm``/``--embed-grid``/``--input-size`` apply a readout to any encoder."""
        if input_norm is None and grid is None and input_size is None:
            return self
        new = replace(self, input_norm=self.input_norm if input_norm is None else input_norm,
                      grid=self.grid if grid is None else grid,
                      input_size=self.input_size if input_size is None else int(input_size), info=dict(self.info))
        arch = str(self.info.get("architecture", ""))
        arch = arch.removesuffix(f"; {self.describe_input()}")
        new.info["architecture"] = f"{arch}; {new.describe_input()}" if arch else new.describe_input()
        return new


def _load_weights(module: nn.Module, weights: Path) -> str:
    """Load ``weights`` (safetensors, or a state dict read with ``weights_only``) into ``module``; every failure is a
    one-line :class:`InvalidArgumentError` naming the file and what was expected."""
    weights = Path(weights)
    if not weights.is_file():
        raise InvalidArgumentError(f"`weights` {weights} cannot be read: expected a safetensors or state-dict file, got no such file")
    data = weights.read_bytes()
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load as load_bytes

            state = load_bytes(data)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as exc:
        kind = "safetensors file" if weights.suffix == ".safetensors" else "state dict (torch.save of tensors)"
        raise InvalidArgumentError(f"`weights` {weights} cannot be read: expected a {kind}, got a truncated or foreign "
                                   f"file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidArgumentError(f"`weights` {weights} is not a state dict: expected a mapping of names to tensors, "
                                   f"got {type(state).__name__}")
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
        raise InvalidArgumentError(f"`weights` {weights} do not fit the model: expected its parameter shapes, got "
                                   f"{first}") from None
    if len(missing) > len(state) // 2:
        raise InvalidArgumentError(f"`weights` {weights} do not fit the model: expected its parameters, got {len(missing)} missing keys")
    return hashlib.sha256(data).hexdigest()


DEFAULT_ENCODER = Path(__file__).parent / "weights" / "default_encoder.json"


def _run_config(spec: str) -> Optional[Path]:
    """The ``encoder.json`` that ``spec`` names (``default``, a run folder or the file itself), else None."""
    if spec == "default":
        if not DEFAULT_ENCODER.is_file():
            raise InvalidArgumentError(f"`model` 'default' is missing from this installation: expected {DEFAULT_ENCODER}, "
                                       "got no file (reinstall shiftkit, or pass --model random)")
        return DEFAULT_ENCODER
    p = Path(spec)
    if p.is_dir():
        if (p / "encoder.json").is_file():
            return p / "encoder.json"
        raise InvalidArgumentError(f"`model` folder is not a pretrain run: expected {p / 'encoder.json'}, got no such file")
    if p.name.endswith(".json") and p.is_file():
        return p
    return None


def _load_run_encoder(cfg_path: Path, weights: Optional[str]) -> Encoder:
    import json

    import timm

    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != "shiftkit-encoder/1" or not str(meta.get("spec", "")).startswith("timm:"):
        raise InvalidArgumentError(f"`model` {cfg_path} is not a shiftkit encoder: expected format 'shiftkit-encoder/1' "
                                   f"with a timm spec, got {meta.get('format')!r}")
    kwargs = dict(meta.get("timm_kwargs", {}))
    kwargs["num_classes"] = 0
    module = timm.create_model(meta["spec"][5:], pretrained=False, **kwargs)
    wpath = Path(weights) if weights is not None else cfg_path.parent / meta.get("weights", "encoder.safetensors")
    if not wpath.is_file():
        raise InvalidArgumentError(f"`model` {cfg_path} has no weights: expected {wpath}, got no such file")
    wsha = _load_weights(module, wpath)
    input_norm, grid = meta.get("input_norm", "fixed"), meta.get("embed_grid", 1)
    train_norm = meta.get("train_input_norm", input_norm)  # files before it existed trained on their readout's
    extras = "".join([f", transfers {', '.join(Path(str(t)).stem for t in meta['transfers'])}" if meta.get("transfers") else "",
                      ", pair views" if meta.get("pair_views") else "",
                      f", trained on {train_norm} standardized views" if train_norm != input_norm else ""])
    info = {"architecture": f"{meta['spec'][5:]} (timm)", "weights": f"{wpath.name}: {meta.get('trained_by', '')}, "
            f"recipe {meta.get('recipe')}, step {meta.get('step')}, augment {meta.get('augment')}{extras}, "
            f"data {Path(str(meta.get('data', ''))).name}", "recipe": meta.get("recipe", "")}
    enc = Encoder(module.eval(), str(cfg_path.parent if cfg_path.name == "encoder.json" else cfg_path),
                  int(meta.get("input_size", 224)), tuple(meta.get("mean", IMAGENET_MEAN)),
                  tuple(meta.get("std", IMAGENET_STD)), wsha, info, input_norm=input_norm, grid=grid)
    info["architecture"] += f"; {enc.describe_input()}"
    return enc


def load_encoder(spec: str = "default", weights: Optional[str] = None, *, input_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Encoder:
    """Load an encoder from ``spec`` (see the module docstring)."""
    import timm

    wsha = ""
    run = _run_config(spec)
    if run is not None:
        return _load_run_encoder(run, weights)
    from .presets import PRESETS, build_preset, get_preset

    if str(spec).lower() in PRESETS:
        preset = get_preset(spec)
        size = input_size if input_size != 224 else preset.input_size
        module = build_preset(preset.name, input_size=size)
        if weights is not None:
            wsha = _load_weights(module.vit, Path(weights))
        info = {"architecture": f"{preset.timm_name} (timm, preset {preset.name}: {preset.pooling} pooling, "
                                f"{preset.out_dim}-d)",
                "weights": str(weights) if weights is not None else "random, seed 0 (architecture only: pass --weights)",
                "source": preset.source}
        if not wsha:
            wsha = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in module.state_dict().values()
                                           if hasattr(p, "numpy"))).hexdigest()
        return Encoder(module.eval(), preset.name, size, preset.mean, preset.std, wsha, info)
    if spec == "random":
        with torch.random.fork_rng():  # seeded weights without touching the caller's global RNG state
            torch.manual_seed(0)
            module = timm.create_model("resnet18", pretrained=False, num_classes=0)
        info = {"architecture": "resnet18 (timm)", "weights": "random, seed 0 (untrained reference)"}
    elif spec.startswith("timm:"):
        name = spec[5:]
        with torch.random.fork_rng():
            torch.manual_seed(0)
            module = timm.create_model(name, pretrained=name.startswith("hf-hub:"), num_classes=0)
        info = {"architecture": name, "weights": "random, seed 0" if weights is None else str(weights)}
    elif Path(spec).suffix in (".pt", ".ts", ".torchscript") and Path(spec).is_file():
        module = torch.jit.load(spec, map_location="cpu")
        wsha = hashlib.sha256(Path(spec).read_bytes()).hexdigest()
        info = {"architecture": "TorchScript", "weights": spec}
    elif ":" in spec:
        mod, fn = spec.split(":", 1)
        try:
            module = getattr(importlib.import_module(mod), fn)()
        except (ImportError, AttributeError) as exc:
            raise InvalidArgumentError(f"`model` cannot be loaded: expected module:callable, got {spec!r} ({exc})") from exc
        info = {"architecture": spec, "weights": "from the callable"}
    else:
        raise InvalidArgumentError(f"`model` has an unknown spec: expected 'default', 'random', 'timm:NAME', a pretrain "
                                   f"run folder, a TorchScript file or 'module:callable', got {spec!r}")
    if weights is not None:
        wsha = _load_weights(module, Path(weights))
    if not wsha:
        wsha = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in module.state_dict().values()
                                       if hasattr(p, "numpy"))).hexdigest()
    return Encoder(module.eval(), spec, input_size, tuple(mean), tuple(std), wsha, info)
