"""Cut large images and whole-slide images into fixed-size tiles with a tissue filter.

Plain images (PNG/JPEG/TIFF) are read whole; whole-slide images (``.svs``, ``.ndpi``, ``.mrxs``, ``.scn``,
``.tif``/``.tiff`` pyramids) are read region by region through OpenSlide (``pip install openslide-python
openslide-bin``; the ``wsi`` extra), so memory stays bounded. Tiles are written atomically with a CSV manifest
(``path, source, x, y, size, level, mpp, tissue_fraction``) that :class:`~shiftkit.data.TileDataset` and
``shiftkit simulate`` read directly.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.errors import InvalidArgumentError
from ..stain.mask import tissue_mask
from .io import ImageReadError, icc_description, icc_transform, read_image, write_image
from .naming import ensure_inside, plan_output_names, source_key

WSI_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


def open_slide(path):
    """Open a whole-slide image with OpenSlide, with a clear error when it is not installed."""
    try:
        import openslide
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImageReadError(f"`{path}` is a whole-slide image: expected openslide-python and openslide-bin installed "
                             f"(pip install 'shiftkit[wsi]'), got {exc}") from exc
    try:
        return openslide.OpenSlide(str(path))
    except Exception as exc:
        raise ImageReadError(f"`{path}` cannot be opened as a whole-slide image: {exc}") from exc


def slide_region(slide, x: int, y: int, size: Tuple[int, int], level: int = 0) -> np.ndarray:
    """An RGB uint8 region ``(h, w, 3)`` at level-0 coordinates ``(x, y)`` of an open OpenSlide slide; transparent
    pixels (outside the scanned area) come back as white glass."""
    rgba = np.asarray(slide.read_region((int(x), int(y)), int(level), (int(size[1]), int(size[0]))))
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    return rgb


def read_region(path, x: int, y: int, size: Tuple[int, int], level: int = 0) -> np.ndarray:
    """:func:`slide_region` of the whole-slide image at ``path`` (opened and closed for this read)."""
    slide = open_slide(path)
    try:
        return slide_region(slide, x, y, size, level)
    finally:
        slide.close()


def tissue_map(image: np.ndarray) -> np.ndarray:
    """The ``(H, W)`` float 0/1 tissue mask of ``(H, W, 3)`` uint8 (luminosity rule of
    :func:`shiftkit.stain.tissue_mask`)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
    return tissue_mask(x)[0, 0].float().numpy()


def tissue_fraction(tile: np.ndarray) -> float:
    """Fraction of tissue pixels (luminosity rule of :func:`shiftkit.stain.tissue_mask`)."""
    return float(tissue_map(tile).mean())


def _grid(h: int, w: int, size: int, stride: int) -> Iterator[Tuple[int, int]]:
    for y in range(0, h - size + 1, stride):
        for x in range(0, w - size + 1, stride):
            yield y, x


@dataclass
class TilingReport:
    written: int = 0
    rejected: int = 0  # too little tissue
    failed: List[Tuple[str, str]] = field(default_factory=list)
    manifest: str = ""


def tile_folders(sources: Sequence) -> List[str]:
    """Each source's tile folder: its path relative to the common folder of all sources, without its suffix;
    sources that would share a folder (``a.png`` and ``a.tif``) keep their suffix (:mod:`shiftkit.data.naming`)."""
    if not sources:
        return []
    parents = [os.path.abspath(os.path.dirname(os.path.abspath(os.fspath(p)))) for p in sources]
    root = os.path.commonpath(parents)
    names = plan_output_names([source_key(p, root) for p in sources], "")
    return [n if n is not None else "" for n in names]


def tile_sources(sources: Sequence, out_dir, size: int = 224, stride: Optional[int] = None, min_tissue: float = 0.5,
                 level: int = 0, mpp: Optional[float] = None, max_pixels: Optional[int] = None,
                 apply_icc: bool = False) -> TilingReport:
    """Cut every source into ``size``² tiles (step ``stride``, default ``size``) keeping those with at least
    ``min_tissue`` tissue; write ``out_dir/<source folder>/<y>_<x>.png`` (:func:`tile_folders`) and
    ``out_dir/tiles.csv``. A source that cannot be opened, exceeds ``max_pixels`` (plain images; slides are read
    region by region) or raises while tiling fails alone and is listed; the manifest is always written. Each
    source's embedded ICC profile (images: the file's; slides: OpenSlide's ``color_profile``) is recorded in the
    manifest's ``icc`` column and embedded in its tiles (so that ``apply_icc`` can still convert them later);
    ``apply_icc`` converts the tiles to sRGB instead."""
    if size < 16 or (stride is not None and stride < 1) or not 0 <= min_tissue <= 1:
        raise InvalidArgumentError(f"`size`/`stride`/`min_tissue` out of range: expected size >= 16, stride >= 1, "
                                   f"min_tissue in [0, 1], got {size}, {stride}, {min_tissue}")
    stride = stride or size
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = TilingReport()
    rows = []
    for src, folder in zip(sources, tile_folders(sources)):
        src = Path(src)
        if not folder:
            report.failed.append((str(src), "listed twice: the first occurrence is tiled"))
            continue
        try:
            if src.suffix.lower() in WSI_SUFFIXES:
                slide = open_slide(src)
                w, h = slide.level_dimensions[level]
                down = slide.level_downsamples[level]
                src_mpp = mpp or (float(slide.properties.get("openslide.mpp-x", 0)) * down or None)
                profile = getattr(slide, "color_profile", None)
                icc = profile.tobytes() if profile is not None else None
                slide.close()
                to_srgb = icc_transform(icc) if apply_icc and icc else None  # built once per slide

                def fetch(y, x, src=src, down=down, to_srgb=to_srgb):
                    region = read_region(src, int(x * down), int(y * down), (size, size), level)
                    return to_srgb(region) if to_srgb is not None else region
            else:
                info: dict = {}
                img = read_image(src, max_pixels=max_pixels, apply_icc=apply_icc, info=info)
                icc = info["icc"]
                h, w = img.shape[:2]
                src_mpp = mpp
                fetch = lambda y, x, img=img: img[y : y + size, x : x + size]  # noqa: E731
        except Exception as exc:
            report.failed.append((str(src), str(exc)))
            continue
        icc_label = icc_description(icc) + (" (applied)" if apply_icc and icc else "")  # once per source
        try:
            for y, x in _grid(h, w, size, stride):
                tile = fetch(y, x)
                frac = tissue_fraction(tile)
                if frac < min_tissue:
                    report.rejected += 1
                    continue
                rel = f"{folder}/{y}_{x}.png"
                write_image(ensure_inside(out, out / rel), tile, icc=None if apply_icc else icc)
                rows.append({"path": rel, "source": str(src), "x": x, "y": y, "size": size, "level": level,
                             "mpp": "" if src_mpp is None else f"{src_mpp:.4f}", "tissue_fraction": f"{frac:.3f}",
                             "icc": icc_label})
                report.written += 1
        except Exception as exc:  # the tiles written so far are kept and listed; the failure is reported
            report.failed.append((str(src), f"tiling stopped: {type(exc).__name__}: {exc}"))
    report.manifest = str(write_csv(out / "tiles.csv", ["path", "source", "x", "y", "size", "level", "mpp",
                                                        "tissue_fraction", "icc"], rows))
    return report


def write_csv(path: Path, fieldnames: Sequence[str], rows: Sequence[dict]) -> Path:
    """Write ``rows`` as a CSV manifest atomically (a temporary file beside it, then renamed): a reader never sees
    half a manifest."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames))
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
    return path
