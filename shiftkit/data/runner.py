"""Apply a batched image function to many files: streaming, grouped by size, atomic writes, nothing lost."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from .io import IMAGE_SUFFIXES, list_images, read_image, write_image
from .naming import UnsafeOutputError, ensure_inside, plan_output_names, source_key

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


def plan_outputs(files: Sequence[Path], root: Path, out_dir: Path, fmt: str) -> tuple[list, list]:
    """``(jobs, duplicates)``: each file with its output path under ``out_dir`` by the naming rule of
    :mod:`shiftkit.data.naming` (``fmt`` ``"same"`` keeps each suffix), and the files listed twice."""
    keys = [source_key(f, root) for f in files]
    names = plan_output_names(keys, None if fmt == "same" else "." + fmt)
    jobs = [(f, Path(out_dir) / n) for f, n in zip(files, names) if n is not None]
    dups = [f for f, n in zip(files, names) if n is None]
    return jobs, dups


def output_path(src: Path, root: Path, out_dir: Path, fmt: str) -> Path:
    """The output of one ``src`` alone (no other source to collide with): its key under ``out_dir``."""
    return plan_outputs([src], root, out_dir, fmt)[0][0][1]


def map_images(
    jobs: Iterable[tuple],
    fn: BatchFn,
    *,
    out_dir: Path,
    batch_size: int = 32,
    device: str = "cpu",
    progress: Optional[Callable[[int], None]] = None,
    in_place: bool = False,
    max_pixels: Optional[int] = None,
    apply_icc: bool = False,
) -> RunReport:
    """Read each ``(source, output)`` of ``jobs``, batch images of equal size, apply ``fn``, write atomically.

    Unreadable inputs (and images over ``max_pixels``) and tiles whose processing raises are recorded in
    :attr:`RunReport.failed` with the reason; a batch that raises is retried tile by tile, so only the tiles that
    raise fail. Every output must resolve inside ``out_dir`` and, unless ``in_place``, must not be a source.
    ``apply_icc`` converts inputs with an embedded ICC profile to sRGB first.
    Memory holds at most one pending batch per distinct image size.
    """
    jobs = list(jobs)
    report = RunReport()
    buckets: dict = {}
    sources = {str(Path(s).resolve()) for s, _ in jobs}

    def write(p, dst, img, status):
        try:
            ensure_inside(out_dir, dst)
            if not in_place and str(Path(dst).resolve()) in sources:
                raise UnsafeOutputError(f"output `{dst}` is a source image: expected a path that is no input (use in-place)")
            write_image(dst, img)
            report.written.append((p, dst, status))
        except Exception as exc:
            report.failed.append((p, f"cannot write {dst}: {exc}"))

    def run(batch_arrays):
        batch = torch.from_numpy(np.stack(batch_arrays)).permute(0, 3, 1, 2).to(device)
        out, statuses = fn(batch)
        return out.permute(0, 2, 3, 1).cpu().numpy(), list(statuses)

    def flush(shape):
        items, arrays = buckets.pop(shape)
        try:
            out_np, statuses = run(arrays)
            done = list(zip(items, out_np, statuses))
        except Exception:  # retry tile by tile: only the tiles that raise fail
            done = []
            for item, arr in zip(items, arrays):
                try:
                    o, st = run([arr])
                    done.append((item, o[0], st[0]))
                except Exception as exc:
                    report.failed.append((item[0], f"processing failed: {type(exc).__name__}: {exc}"))
        for (p, dst), img, status in done:
            write(p, dst, img, status)

    for p, dst in jobs:
        try:
            img = read_image(p, max_pixels=max_pixels, apply_icc=apply_icc)
        except Exception as exc:
            report.failed.append((p, str(exc)))
            if progress:
                progress(1)
            continue
        key = img.shape
        buckets.setdefault(key, ([], []))
        buckets[key][0].append((p, dst))
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


__all__ = ["RunReport", "collect_inputs", "plan_outputs", "output_path", "map_images", "IMAGE_SUFFIXES"]
