"""``RandomScanner``: a random scanner shift (or composite profile) and severity per tile, for training."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ..core.errors import InvalidArgumentError
from ..core.rng import SeedLike
from ..core.shift_registry import REFERENCE_MPP, get_spec, list_shifts
from .base import ShiftkitAugmentation, check_range, register_transform


@register_transform
class RandomScanner(ShiftkitAugmentation):
    """Per tile, draw one shift from ``shifts`` and a severity from ``severity_range``, and apply it.

    By default the pool is every *training* shift of the scanner families (optics, illumination, sensor, isp,
    storage, scanner profiles), never a held-out one. Each tile's draw is stored as ``(choice, severity, seed)``
    and its shift parameters come from a generator seeded with its own seed, so replay is exact and a tile's
    result does not depend on its batch mates.

    Args:
        shifts: registered shift names (default: the training scanner shifts).
        severity_range: inclusive integer range of severities.
        mpp: µm per pixel of the tiles.
        p: probability per sample.
        same_on_batch: one draw for the whole batch.
        keepdim: keep a ``(3, H, W)`` input's rank.
        seed: an int seed or a ``torch.Generator`` (see :class:`~shiftkit.transforms.base.ShiftkitAugmentation`).
    """

    def __init__(self, shifts: Optional[Sequence[str]] = None, severity_range: Sequence[int] = (1, 3),
                 mpp: float = REFERENCE_MPP, p: float = 1.0, same_on_batch: bool = False, keepdim: bool = False,
                 seed: SeedLike = None):
        super().__init__(p=p, same_on_batch=same_on_batch, keepdim=keepdim, seed=seed)
        if shifts is None:
            shifts = [n for n in list_shifts(held_out=False) if get_spec(n).family != "stain"]
        self.shifts = [get_spec(n).name for n in shifts]
        if not self.shifts:
            raise InvalidArgumentError("`shifts` is empty: expected at least one registered shift name, got []")
        lo, hi = check_range("severity_range", severity_range, 1, 5)
        if lo != int(lo) or hi != int(hi):
            raise InvalidArgumentError(f"`severity_range` is invalid: expected integers in 1..5, got {severity_range!r}")
        self.severity_range = (int(lo), int(hi))
        self.mpp = float(mpp)
        self._config.update(shifts=list(self.shifts), severity_range=list(self.severity_range), mpp=self.mpp)

    def sample(self, batch: int) -> Dict[str, torch.Tensor]:
        rows = 1 if self.same_on_batch else batch
        g = self.generator
        out = {
            "choice": torch.randint(0, len(self.shifts), (rows,), generator=g),
            "severity": torch.randint(self.severity_range[0], self.severity_range[1] + 1, (rows,), generator=g),
            "seed": torch.randint(0, 2**62, (rows,), generator=g, dtype=torch.int64),
        }
        return {k: v.expand(batch).clone() for k, v in out.items()} if self.same_on_batch else out

    def apply_batch(self, x: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        out = x.clone()
        choice, sev, seeds = params["choice"].cpu(), params["severity"].cpu(), params["seed"].cpu()
        for c, s in sorted({(int(a), int(b)) for a, b in zip(choice, sev)}):
            idx = ((choice == c) & (sev == s)).nonzero().flatten()
            spec = get_spec(self.shifts[c])
            vals = spec.values(s, self.mpp)
            drawn = []
            for i in idx.tolist():  # each tile's shift parameters from its own seed
                g = torch.Generator().manual_seed(int(seeds[i]))
                drawn.append(spec.sample({k: torch.tensor([v], dtype=torch.float32) for k, v in vals.items()}, g, 1))
            p = {k: torch.cat([d[k] for d in drawn]) for k in drawn[0]}
            dev_idx = idx.to(x.device)
            out[dev_idx] = spec.kernel(x[dev_idx], p).to(x.dtype)
        return out
