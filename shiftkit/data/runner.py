"""Apply a batched image function to many files: streaming, grouped by size, atomic writes, nothing lost."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from .io import IMAGE_SUFFIXES, list_images, read_image, write_image

#: ``fn(batch) -> (out_batch, statuses)``; batch is a ``(B, 3, H, W)`` uint8 tensor on the chosen device.
BatchFn = Callable[[torch.Tensor], "tuple[torch.Tensor, Sequence[str]]"]


@dataclass
class RunReport:
    """What happened to every input of :func:`map_images`."""

    written: list = field(default_factory=list)  # (source, output, status)
    failed: list = field(default_factory=list)  # (source, reason)

    @property
    def status_counts(self) -> dict:
        counts: dict = {}
        for _, _, s in self.written:
            counts[s] = counts.get(s, 0) + 1
        return counts

    def to_dict(self) -> dict:
        return {
            "written": len(self.written),
            "failed": [{"path": str(p), "reason": r} for p, r in self.failed],
            "status_counts": self.status_counts,
            "not_ok": [{"path": str(s), "output": str(o), "status": st} for s, o, st in self.written if st != "ok"],
        }


def collect_inputs(src: Path) -> tuple[Path, list[Path]]:
    """``(root, files)`` for a single image file or a folder (searched recursively)."""
    src = Path(src)
    if src.is_dir():
        return src, list_images(src)
    return src.parent, [src]


def output_path(src: Path, root: Path, out_dir: Path, fmt: str) -> Path:
    """Mirror ``src`` (relative to ``root``) under ``out_dir``; ``fmt`` ``"same"`` keeps the suffix."""
    rel = src.relative_to(root) if src != root else Path(src.name)
    if fmt != "same":
        rel = rel.with_suffix("." + fmt)
    return out_dir / rel


def map_images(
    files: Iterable[Path],
    fn: BatchFn,
    out_path: Callable[[Path], Path],
    *,
    batch_size: int = 32,
    device: str = "cpu",
    progress: Optional[Callable[[int], None]] = None,
) -> RunReport:
    """Read ``files``, batch images of equal size, apply ``fn``, and write each result atomically.

    Unreadable inputs and failing batches are recorded in :attr:`RunReport.failed` with the reason; every
    other input completes. Memory holds at most one pending batch per distinct image size.
    """
    report = RunReport()
    buckets: dict = {}

    def flush(shape):
        paths, arrays = buckets.pop(shape)
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device)
        try:
            out, statuses = fn(batch)
            out_np = out.permute(0, 2, 3, 1).cpu().numpy()
        except Exception as exc:  # a failing batch must not lose the others
            for p in paths:
                report.failed.append((p, f"processing failed: {type(exc).__name__}: {exc}"))
            return
        for p, img, status in zip(paths, out_np, statuses):
            dst = out_path(p)
            try:
                write_image(dst, img)
                report.written.append((p, dst, status))
            except Exception as exc:
                report.failed.append((p, f"cannot write {dst}: {exc}"))

    for p in files:
        try:
            img = read_image(p)
        except Exception as exc:
            report.failed.append((p, str(exc)))
            if progress:
                progress(1)
            continue
        key = img.shape
        buckets.setdefault(key, ([], []))
        buckets[key][0].append(p)
        buckets[key][1].append(img)
        if len(buckets[key][0]) >= batch_size:
            n = len(buckets[key][0])
            flush(key)
            if progress:
                progress(n)
    for key in list(buckets):
        n = len(buckets[key][0])
        flush(key)
        if progress:
            progress(n)
    return report


__all__ = ["RunReport", "collect_inputs", "output_path", "map_images", "IMAGE_SUFFIXES"]
