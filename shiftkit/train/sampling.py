"""Diversity-aware sampling for pretraining: a cap on patches per slide, balanced draws over manifest columns,
and the diversity statistics a run logs.

The sampler is stateless in the step: the global batch of step ``s`` is ``multinomial(weights, B)`` from a
generator seeded with ``derive_seed(seed, "batch", s)``. The data position is therefore the step alone, resume is
exact, and every rank of a distributed run computes the same global batch and takes its own slice — the batch
does not depend on the world size.
"""

from __future__ import annotations

from collections import Counter
from pathlib import PurePosixPath
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..core.errors import InvalidArgumentError
from ..core.rng import derive_seed

DIVERSITY_COLUMNS = ("slide", "site", "scanner")


def slide_of(record) -> str:
    """The slide a tile belongs to: the manifest's ``slide`` column, else the tile's folder (relative path)."""
    s = record.meta.get("slide")
    if s:
        return str(s)
    parent = PurePosixPath(record.sample_id).parent.as_posix()
    return parent if parent != "." else "(root)"


def entropy_bits(counts: Sequence[float]) -> float:
    """Shannon entropy (bits) of a distribution given as counts or weights."""
    c = np.asarray([float(v) for v in counts if v > 0])
    if c.size == 0:
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # never -0.0


def _column(records, col: str) -> List[str]:
    return [slide_of(r) if col == "slide" else str(r.meta.get(col, "unknown")) for r in records]


def diversity_stats(records, weights: Optional[np.ndarray] = None, columns: Sequence[str] = DIVERSITY_COLUMNS) -> dict:
    """Counts, Shannon entropies (bits) and Hill numbers (effective counts, ``2**H``) of the slides, sites and
    scanners of ``records``, and patches per slide. With ``weights`` (the sampler's), the entropies of the
    *sampled* distribution are given too. A column no record has is reported as absent."""
    out: Dict[str, object] = {"patches": len(records)}
    for col in columns:
        vals = _column(records, col)
        if col != "slide" and all(v == "unknown" for v in vals):
            out[col] = None
            continue
        cnt = Counter(vals)
        h = entropy_bits(list(cnt.values()))
        entry = {"count": len(cnt), "entropy_bits": round(h, 4), "hill": round(2.0 ** h, 3)}
        if weights is not None:
            w: Dict[str, float] = {}
            for v, wt in zip(vals, weights):
                w[v] = w.get(v, 0.0) + float(wt)
            hs = entropy_bits(list(w.values()))
            entry.update(sampled_entropy_bits=round(hs, 4), sampled_hill=round(2.0 ** hs, 3))
        out[col] = entry
    per_slide = np.array(list(Counter(_column(records, "slide")).values()) or [0])
    out["patches_per_slide"] = {"min": int(per_slide.min()), "median": float(np.median(per_slide)),
                                "mean": round(float(per_slide.mean()), 3), "max": int(per_slide.max())}
    return out


class DiversitySampler:
    """Which tiles a pretraining run sees, and how often.

    Args:
        records: the dataset's :class:`~shiftkit.data.shifted.TileRecord` list.
        max_per_slide: keep at most this many tiles per slide (a seeded choice per slide); ``None`` keeps all.
        balance_by: manifest columns (``site``, ``scanner``, ``slide``, ...) to balance: each combination of their
            values gets the same probability mass, split evenly over its tiles. Empty: uniform over tiles.
        seed: run seed.
    """

    def __init__(self, records: Sequence[Any], *, max_per_slide: Optional[int] = None, balance_by: Sequence[str] = (), seed: int = 0):
        if not len(records):
            raise InvalidArgumentError("`data` has no tiles: expected at least one image, got an empty dataset")
        if max_per_slide is not None and int(max_per_slide) < 1:
            raise InvalidArgumentError(f"`max_per_slide` out of range: expected a positive integer or None, got {max_per_slide!r}")
        self.seed = int(seed)
        self.balance_by = tuple(balance_by)
        self.max_per_slide = None if max_per_slide is None else int(max_per_slide)
        keep = list(range(len(records)))
        if self.max_per_slide is not None:
            by_slide: Dict[str, List[int]] = {}
            for i, r in enumerate(records):
                by_slide.setdefault(slide_of(r), []).append(i)
            keep = []
            for slide, idx in sorted(by_slide.items()):
                if len(idx) > self.max_per_slide:
                    g = torch.Generator().manual_seed(derive_seed(self.seed, "cap", slide))
                    idx = sorted(idx[j] for j in torch.randperm(len(idx), generator=g)[: self.max_per_slide].tolist())
                keep.extend(idx)
            keep.sort()
        self.indices = np.asarray(keep, dtype=np.int64)
        kept = [records[i] for i in keep]
        for col in self.balance_by:
            if col != "slide" and all(col not in r.meta for r in kept):
                raise InvalidArgumentError(f"`balance_by` names a column the data lacks: expected one of the manifest's "
                                           f"columns, got {col!r}")
        if self.balance_by:
            keys = list(zip(*[_column(kept, c) for c in self.balance_by]))
            cnt = Counter(keys)
            w = np.array([1.0 / (len(cnt) * cnt[k]) for k in keys])
        else:
            w = np.full(len(kept), 1.0 / len(kept))
        self.weights = w / w.sum()
        self._weights_t = torch.as_tensor(self.weights, dtype=torch.float64)
        self.stats = diversity_stats(kept, self.weights)
        self.stats["dataset_patches"] = len(records)
        self.stats["max_per_slide"] = self.max_per_slide
        self.stats["balance_by"] = list(self.balance_by)

    def __len__(self) -> int:
        return len(self.indices)

    def global_batch(self, step: int, size: int) -> np.ndarray:
        """Dataset indices of the global batch of ``step`` (with replacement, by the sampling weights)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "batch", int(step)))
        pick = torch.multinomial(self._weights_t, int(size), replacement=True, generator=g).numpy()
        return self.indices[pick]

