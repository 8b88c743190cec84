"""``Shift``: any registered shift at a severity, as a Kornia-compatible transform."""

from __future__ import annotations

from typing import Dict

import torch

from ..core.errors import InvalidArgumentError
from ..core.rng import SeedLike
from ..core.shift_registry import REFERENCE_MPP, get_spec
from .base import ShiftkitAugmentation, register_transform


@register_transform
class Shift(ShiftkitAugmentation):
    """Apply the registered shift ``name`` at ``severity`` (1..5) to tiles of ``mpp`` µm/px.

    The severity fixes the physical parameters (the registry's table); the random parts (direction, position,
    noise fields) are drawn per sample from the transform's generator, so the same seed gives the same pixels at
    every batch size and on every device.

    Args:
        name: a name from :func:`shiftkit.shifts.list_shifts`.
        severity: 1..5.
        mpp: the tiles' µm per pixel (pixel-valued severities are defined at 0.5 µm/px).
        p: probability per sample.
        same_on_batch: one draw for the whole batch.
        keepdim: keep a ``(3, H, W)`` input's rank.
        seed: an int seed or a ``torch.Generator``.
    """

    def __init__(self, name: str, severity: int = 3, mpp: float = REFERENCE_MPP, p: float = 1.0,
                 same_on_batch: bool = False, keepdim: bool = False, seed: SeedLike = None):
        super().__init__(p=p, same_on_batch=same_on_batch, keepdim=keepdim, seed=seed)
        self.spec = get_spec(name)
        if not (isinstance(mpp, (int, float)) and 0.05 <= float(mpp) <= 20.0):
            raise InvalidArgumentError(f"`mpp` out of range: expected µm per pixel in [0.05, 20], got {mpp!r}")
        self.severity = int(severity)
        self.mpp = float(mpp)
        self.values = self.spec.values(self.severity, self.mpp)
        self._config.update(name=name, severity=self.severity, mpp=self.mpp)

    def sample(self, batch: int) -> Dict[str, torch.Tensor]:
        rows = 1 if self.same_on_batch else batch
        vals = {k: torch.full((rows,), v, dtype=torch.float32) for k, v in self.values.items()}
        params = self.spec.sample(vals, self.generator, rows)
        if self.same_on_batch:
            params = {k: v.expand(batch, *v.shape[1:]).clone() for k, v in params.items()}
        return params

    def apply_batch(self, x: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        p = {k: v for k, v in params.items() if k not in ("batch_prob", "forward_input_shape")}
        return self.spec.kernel(x, p)

    def extra_repr(self) -> str:
        return f"{self.spec.name}, severity={self.severity}, mpp={self.mpp}"
