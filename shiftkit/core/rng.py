"""Randomness: explicit generators, never the global RNG; per-sample seeds for reproducible test sets."""

from __future__ import annotations

import hashlib
import os
from typing import Union

import torch

SeedLike = Union[int, torch.Generator, None]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (``derive_seed(base_seed, shift, severity, sample_id)``), stable across
    processes, platforms and Python versions (BLAKE2b of their ``repr``)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class GeneratorHolder:
    """Owns a CPU ``torch.Generator`` for a transform, and keeps DataLoader workers apart.

    With ``seed`` the draws are reproducible in one process. In each DataLoader worker the generator is
    re-seeded once from ``(seed, worker seed)``, so workers draw different parameters (and reproducibly so,
    given the DataLoader's own seed). With ``seed=None`` the base seed comes from ``torch.initial_seed()``
    (reading it does not consume the global RNG).
    """

    def __init__(self, seed: SeedLike = None):
        if isinstance(seed, torch.Generator):
            self._base = int(seed.initial_seed())
            self._gen = seed
        else:
            self._base = int(seed) if seed is not None else derive_seed("shiftkit", torch.initial_seed())
            self._gen = torch.Generator(device="cpu").manual_seed(self._base)
        self._pid = os.getpid()
        self._worker_checked = False

    @property
    def seed(self) -> int:
        return self._base

    def manual_seed(self, seed: int) -> None:
        self._base = int(seed)
        self._gen.manual_seed(self._base)
        self._worker_checked = False
        self._pid = os.getpid()

    def get(self) -> torch.Generator:
        if not self._worker_checked or os.getpid() != self._pid:
            info = torch.utils.data.get_worker_info()
            if info is not None and os.getpid() != getattr(self, "_seeded_pid", None):
                self._gen.manual_seed(derive_seed(self._base, "worker", info.seed))
                self._seeded_pid = os.getpid()
            self._worker_checked = True
            self._pid = os.getpid()
        return self._gen

    def get_state(self) -> torch.Tensor:
        return self._gen.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self._gen.set_state(state)


def uniform(low: float, high: float, shape, generator: torch.Generator) -> torch.Tensor:
    """``U(low, high)`` of ``shape`` in float32 on CPU from ``generator`` (parameters are drawn on CPU)."""
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float32)
