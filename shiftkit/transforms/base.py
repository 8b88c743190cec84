"""Base class of shiftkit's random transforms, on Kornia's intensity augmentation base.

Kornia gives composition in ``AugmentationSequential``, ``p``, ``same_on_batch``, ``keepdim`` and replay with
``forward(x, params=...)``. shiftkit changes one thing: every random number — the per-sample ``p`` gate and
the parameters — comes from the transform's own ``torch.Generator`` (``seed=`` or ``generator=``), drawn on CPU
in float32, never from the global RNG. Subclasses declare their constructor arguments in ``_config`` (for
``to_dict``/``from_dict``), draw parameters in :meth:`sample` and apply them with a ``shiftkit.functional``
kernel in ``apply_transform``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from kornia.augmentation import IntensityAugmentationBase2D

from ..core.errors import InvalidArgumentError, InvalidImageError, UnknownNameError
from ..core.image import cpu_chunk_size, map_batch, raise_heap_thresholds, to_batch
from ..core.ops import select
from ..core.rng import GeneratorHolder, SeedLike, uniform

_REGISTRY: Dict[str, type] = {}


def register_transform(cls):
    """Class decorator: make a transform reachable by :func:`transform_from_dict`."""
    if cls.__name__ in _REGISTRY:
        raise InvalidArgumentError(f"`name` already registered: expected a new transform name, got {cls.__name__!r}")
    _REGISTRY[cls.__name__] = cls
    return cls


def list_transforms() -> list[str]:
    return sorted(_REGISTRY)


#: Version of :meth:`ShiftkitAugmentation.to_dict` configs. 2: transforms built with no range and no preset use
#: the ``medium`` preset (version-1 configs hold resolved ranges and replay unchanged).
CONFIG_VERSION = 2


def transform_from_dict(data: dict) -> "ShiftkitAugmentation":
    """Rebuild any registered transform from :meth:`ShiftkitAugmentation.to_dict` output."""
    name = data.get("transform") if isinstance(data, dict) else None
    if name not in _REGISTRY:
        raise UnknownNameError("transform", name, _REGISTRY)
    return _REGISTRY[name].from_dict(data)


def check_range(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf, length: int = 2) -> Tuple[float, ...]:
    """Validate a ``*_range`` argument: ``length`` finite numbers, ordered, inside ``[lo, hi]``."""
    try:
        vals = tuple(float(v) for v in value)
    except TypeError:
        raise InvalidArgumentError(f"`{name}` has the wrong type: expected a ({'low, high' if length == 2 else '...'}) tuple of numbers, got {value!r}") from None
    if len(vals) != length or not all(math.isfinite(v) for v in vals):
        raise InvalidArgumentError(f"`{name}` is invalid: expected {length} finite numbers, got {value!r}")
    if length == 2 and vals[0] > vals[1]:
        raise InvalidArgumentError(f"`{name}` is not ordered: expected low <= high, got {value!r}")
    if any(v < lo or v > hi for v in vals):
        raise InvalidArgumentError(f"`{name}` out of range: expected values in [{lo}, {hi}], got {value!r}")
    return vals


def slice_parameters(params: Dict[str, torch.Tensor], lo: int, hi: int, batch: int) -> Dict[str, torch.Tensor]:
    """Rows ``lo:hi`` of parameters drawn for ``batch`` samples: every per-sample tensor is sliced, and
    ``forward_input_shape`` (when present) gets ``hi - lo`` as its batch size."""
    out = {}
    for k, v in params.items():
        if k == "forward_input_shape":
            out[k] = torch.cat([torch.tensor([hi - lo], dtype=v.dtype), v[1:]])
        elif torch.is_tensor(v) and v.ndim and v.shape[0] == batch:
            out[k] = v[lo:hi]
        else:
            out[k] = v
    return out


def _guarded(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` with NaN mapped to 0 and values clamped to ``[0, 1]`` (in place unless ``y`` is the input ``x`` —
    already valid — or needs gradients)."""
    if y.data_ptr() == x.data_ptr() and y.shape == x.shape:
        return y
    if (y.requires_grad and torch.is_grad_enabled()) or y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return y.nan_to_num(nan=0.0).clamp(0.0, 1.0)
    return y.nan_to_num_(nan=0.0).clamp_(0.0, 1.0)


class ShiftkitAugmentation(IntensityAugmentationBase2D):
    """Kornia intensity augmentation whose randomness comes from an explicit generator.

    Args:
        p: probability to apply the transform, per sample.
        same_on_batch: one parameter draw (and one ``p`` decision) shared by the whole batch.
        keepdim: keep a ``(3, H, W)`` input's rank.
        seed: an int seed or a ``torch.Generator``; ``None`` derives one from ``torch.initial_seed()``. DataLoader
            workers re-seed from ``(seed, worker seed)`` so they draw differently.

    Inputs are float tensors ``(B, 3, H, W)`` or ``(3, H, W)`` with values in ``[0, 1]`` (as in Kornia); use
    :func:`shiftkit.transforms.to_albumentations` or :func:`shiftkit.transforms.to_torchvision` for numpy/uint8
    pipelines.
    """

    def __init__(self, p: float = 1.0, same_on_batch: bool = False, keepdim: bool = False, seed: SeedLike = None):
        if not (isinstance(p, (int, float)) and 0.0 <= float(p) <= 1.0):
            raise InvalidArgumentError(f"`p` out of range: expected a probability in [0, 1], got {p!r}")
        super().__init__(p=float(p), same_on_batch=bool(same_on_batch), keepdim=bool(keepdim))
        self._rng = GeneratorHolder(seed)
        self._config: Dict[str, Any] = {"p": float(p), "same_on_batch": bool(same_on_batch), "keepdim": bool(keepdim),
                                        "seed": self._rng.seed}

    # ---------------------------------------------------------------- randomness
    @property
    def generator(self) -> torch.Generator:
        override = getattr(self, "_override_generator", None)
        return override if override is not None else self._rng.get()

    def draw_parameters(self, batch_shape: Tuple[int, ...], generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Parameters for ``batch_shape`` drawn from ``generator`` (default: the transform's own), for
        ``forward(x, params=...)``. Adapters use it to draw the same parameters from their own seeds."""
        self._override_generator = generator
        try:
            return self.forward_parameters(tuple(batch_shape))
        finally:
            self._override_generator = None

    def manual_seed(self, seed: int) -> "ShiftkitAugmentation":
        self._rng.manual_seed(seed)
        self._config["seed"] = int(seed)
        return self

    def _u(self, rng: Sequence[float], shape: Tuple[int, ...], batch: int) -> torch.Tensor:
        """``U(rng)`` of shape ``(batch, *shape)``; one row repeated when ``same_on_batch``."""
        rows = 1 if self.same_on_batch else batch
        out = uniform(rng[0], rng[1], (rows, *shape), self.generator)
        return out.expand(batch, *shape).clone() if self.same_on_batch else out

    def sample(self, batch: int) -> Dict[str, torch.Tensor]:
        """Draw the per-sample parameters (CPU float32 tensors with leading dimension ``batch``)."""
        return {}

    def forward_parameters(self, batch_shape: Tuple[int, ...]) -> Dict[str, torch.Tensor]:
        b = int(batch_shape[0])
        if self.p >= 1.0:
            prob = torch.ones(b)
        elif self.p <= 0.0:
            prob = torch.zeros(b)
        else:
            rows = 1 if self.same_on_batch else b
            prob = (torch.rand(rows, generator=self.generator) < self.p).float().expand(b).clone()
        params = self.sample(b)
        params["batch_prob"] = prob
        params["forward_input_shape"] = torch.tensor(tuple(batch_shape), dtype=torch.long)
        return params

    def generate_parameters(self, batch_shape: Tuple[int, ...]) -> Dict[str, torch.Tensor]:
        return self.sample(int(batch_shape[0]))

    # ---------------------------------------------------------------- input checks
    def forward(self, input: torch.Tensor, params: Optional[Dict[str, torch.Tensor]] = None, **kwargs: Any) -> torch.Tensor:
        if not isinstance(input, torch.Tensor) or not input.is_floating_point():
            what = f"tensor of dtype {input.dtype}" if isinstance(input, torch.Tensor) else type(input).__name__
            raise InvalidImageError(
                f"`input` has the wrong type: expected a float tensor (B, 3, H, W) or (3, H, W) in [0, 1] "
                f"(use to_albumentations/to_torchvision for uint8 or numpy), got {what}"
            )
        if input.ndim not in (3, 4) or input.shape[-3] != 3:
            raise InvalidImageError(f"`input` has the wrong shape: expected (B, 3, H, W) or (3, H, W), got {tuple(input.shape)}")
        if input.numel():
            flat = input if input.is_contiguous() or input.ndim != 4 else input.permute(0, 2, 3, 1)  # channels-last: no copy
            lo, hi = torch.aminmax(flat)  # one pass; NaN propagates and fails both tests
            if not (bool(lo >= 0) and bool(hi <= 1)):
                raise InvalidImageError(
                    f"`input` has values outside [0, 1] or non-finite values: expected floats in [0, 1], got range "
                    f"[{lo.item():.4g}, {hi.item():.4g}]"
                )
        if input.ndim == 4 and input.shape[0] == 0:
            return input.clone()
        out = super().forward(input, params=params, **kwargs)  # apply_transform guards every output
        if out is input:
            return out.clone()
        return out.to(input.dtype)

    def apply_transform(self, input, params, flags, transform=None):
        """Run :meth:`apply_batch` — on CPU in cache-sized chunks of tiles written into one output (every step is
        memory-bound there and tiles are independent, so the result is identical)."""
        x = input if input.dtype in (torch.float32, torch.float64) else input.float()
        b = x.shape[0]
        step = cpu_chunk_size(x.shape[-2], x.shape[-1])
        if x.device.type != "cpu" or b <= step:
            return _guarded(self.apply_batch(x, params), x)
        raise_heap_thresholds(step * x[0].numel() * x.element_size())
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        for i in range(0, b, step):
            xi = x[i : i + step].contiguous()  # e.g. a channels-last input: kernels flatten the pixels
            oi = out[i : i + step]
            kw = {"out": oi} if self._accepts_out else {}  # the result may then be written straight into the output
            y = _guarded(self.apply_batch(xi, slice_parameters(params, i, i + step, b), **kw), xi)
            if y.data_ptr() != oi.data_ptr():
                oi.copy_(y)
        return out

    def augment(self, images: Any, params: Optional[Dict[str, torch.Tensor]] = None) -> Any:
        """Apply the transform to images in any format of the image contract and return them in that format.

        ``images``: numpy ``(H, W, 3)``/``(B, H, W, 3)`` or tensors ``(3, H, W)``/``(B, 3, H, W)``, uint8 or float
        (see :mod:`shiftkit.core.image`). One parameter draw covers the batch (or pass ``params`` from
        :meth:`forward_parameters`/:meth:`draw_parameters`), with the same per-sample ``p`` gate as
        :meth:`forward`. On CPU the batch is converted, transformed and written back in cache-sized chunks
        (:func:`shiftkit.core.image.map_batch`), so a uint8 batch never exists as a full-size float copy; the
        result equals ``from_batch(self(to_batch(images)[0], params=params), spec)``.

        Examples:
            >>> import numpy as np
            >>> from shiftkit import HEDJitter
            >>> tiles = np.full((4, 32, 32, 3), 200, np.uint8)
            >>> HEDJitter(seed=0).augment(tiles).shape
            (4, 32, 32, 3)
        """
        if not isinstance(images, (np.ndarray, torch.Tensor)) or images.ndim not in (3, 4):
            to_batch(images, "images")  # raises the image contract's error
        batched = images.ndim == 4
        b = images.shape[0] if batched else 1
        h, w = (images.shape[-3:-1] if isinstance(images, np.ndarray) else images.shape[-2:])
        if params is None:
            params = self.forward_parameters((b, 3, int(h), int(w)))
        gate = params.get("batch_prob", torch.ones(b)) > 0.5

        def run(x, lo, hi, u8):
            if x.shape[0] == 0:
                return x
            kw = {"uint8": u8} if u8 is not None and self._accepts_uint8 else {}
            y = self.apply_batch(x, slice_parameters(params, lo, hi, b), **kw)
            g = gate[lo:hi]  # on the host where the parameters were drawn: no device sync for the test
            if not bool(g.all()):
                y = select(g.to(x.device).view(-1, 1, 1, 1), y.to(x.dtype), x)
            return y

        return map_batch(run, images, "images", with_uint8=True)

    #: Subclasses whose ``apply_batch`` takes ``uint8=`` (the same tiles as 8-bit data, for lookup tables)
    #: set this; :meth:`augment` then passes it for uint8 inputs.
    _accepts_uint8 = False
    #: Subclasses whose ``apply_batch`` takes ``out=`` (a contiguous tensor of ``x``'s shape and dtype that the
    #: result may be written into; the returned tensor is used either way) set this; :meth:`forward` then passes
    #: each CPU chunk's slice of the output, saving one copy of the batch.
    _accepts_out = False

    def apply_batch(self, x: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply the drawn ``params`` to a float batch ``x``: call a ``shiftkit.functional`` kernel."""
        raise NotImplementedError

    # ---------------------------------------------------------------- serialization
    def to_dict(self) -> dict:
        """``{"transform": name, "version": CONFIG_VERSION, "args": {...}}`` (JSON-serializable). ``args`` holds the
        resolved arguments (ranges, not presets), so a config replays the same pixels under later defaults."""
        return {"transform": type(self).__name__, "version": CONFIG_VERSION, "args": json.loads(json.dumps(self._config))}

    @classmethod
    def from_dict(cls, data: dict) -> "ShiftkitAugmentation":
        """Rebuild from :meth:`to_dict` output of this or an earlier config version (a newer one is refused)."""
        if data.get("transform") != cls.__name__:
            raise InvalidArgumentError(f"`data` describes another transform: expected {cls.__name__!r}, got {data.get('transform')!r}")
        version = data.get("version", 1)
        if not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
            raise InvalidArgumentError(f"`data` has an unknown config version: expected 1..{CONFIG_VERSION} (this shiftkit), "
                                       f"got {version!r}; upgrade shiftkit to replay it")
        return cls(**data["args"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "ShiftkitAugmentation":
        import yaml

        return transform_from_dict(yaml.safe_load(text))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config.items())
        return f"{type(self).__name__}({args})"


# ------------------------------------------------------------------ shared by the pipeline adapters
def as_transform(t: Union["ShiftkitAugmentation", dict]) -> "ShiftkitAugmentation":
    """``t`` itself, or the transform its :meth:`~ShiftkitAugmentation.to_dict` describes; anything else is an error."""
    if isinstance(t, dict):
        return transform_from_dict(t)
    if not isinstance(t, ShiftkitAugmentation):
        raise InvalidArgumentError(f"`transform` has the wrong type: expected a shiftkit transform or its to_dict(), got {type(t).__name__}")
    return t


def apply_to_image(transform: "ShiftkitAugmentation", image: Any, generator: torch.Generator) -> Any:
    """One draw from ``generator``, applied by :meth:`ShiftkitAugmentation.augment` (the caller's format back;
    8-bit input takes the lookup-table route)."""
    if not isinstance(image, (np.ndarray, torch.Tensor)) or image.ndim not in (3, 4):
        to_batch(image, "image")  # raises the image contract's error naming the argument
    b = image.shape[0] if image.ndim == 4 else 1
    h, w = image.shape[-3:-1] if isinstance(image, np.ndarray) else image.shape[-2:]
    return transform.augment(image, params=transform.draw_parameters((b, 3, int(h), int(w)), generator))
