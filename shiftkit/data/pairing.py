"""Registered tile pairs from two scans of the same slide, for :meth:`shiftkit.ScannerTransfer.fit` and
``shiftkit fit-scanner --pairs``.

The two scans may be plain images or whole-slide images (read region by region through OpenSlide, as
:mod:`shiftkit.data.tiling` does), placed on the glass differently (any multiple of 90° and a mirror) and at different
pixel sizes, the glass turned by up to ±5°. :func:`pair_tiles` registers them on thumbnails at the source's
physical scale (phase correlation over the destination's eight quarter turns and mirrors, then over small rotations;
normalized cross-correlation for one scan that fits well inside the other),
refits the map at full resolution as a similarity on a few tiles matched with a wide search, and matches every
source tile with tissue within ``± search_px`` (normalized cross-correlation). Each pair is written as two
equal-size tiles in the source's orientation and pixel size (the destination's own pixels turned exactly where the
glass is not rotated, else warped bilinearly; resized when the pixel sizes differ) with a ``pairs.csv`` manifest
(``src,dst,slide,...``). A tile whose match is weak is listed, one whose field lies beyond the destination counted;
neither is written.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import cv2
import numpy as np

from ..core.errors import InvalidArgumentError
from .io import icc_description, icc_transform, read_image, write_image
from .naming import ensure_inside
from .tiling import WSI_SUFFIXES, open_slide, slide_region, tissue_fraction, tissue_map, write_csv

#: The largest side of the thumbnails the global registration runs on.
THUMB_SIDE = 1024


class _Scan:
    """A plain image held in memory, or a whole-slide image read region by region (level 0)."""

    def __init__(self, path, max_pixels: Optional[int] = None, mpp: Optional[float] = None, apply_icc: bool = False):
        self.path = Path(path)
        self.slide = None
        self._thumb: Optional[Tuple[np.ndarray, float]] = None
        self._to_srgb = None
        if self.path.suffix.lower() in WSI_SUFFIXES:
            slide = open_slide(self.path)
            self.width, self.height = (int(v) for v in slide.dimensions)
            prop = slide.properties.get("openslide.mpp-x")
            self.mpp = mpp if mpp is not None else (float(prop) if prop else None)
            profile = getattr(slide, "color_profile", None)
            self.icc = profile.tobytes() if profile is not None else None
            self.slide = slide
            self.image = None
            if apply_icc and self.icc:
                self._to_srgb = icc_transform(self.icc)  # built once, applied to every region and the thumbnail
        else:
            info: dict = {}
            self.image = read_image(self.path, max_pixels=max_pixels, apply_icc=apply_icc, info=info)
            self.icc = info["icc"]
            self.height, self.width = self.image.shape[:2]
            self.mpp = mpp
        #: the scan's tiles are converted to sRGB; else they are written with the scan's profile embedded
        self.applied = bool(apply_icc and self.icc)
        self.icc_label = icc_description(self.icc) + (" (applied)" if self.applied else "")

    @property
    def tile_icc(self) -> Optional[bytes]:
        """The profile to embed in the tiles written from this scan: its own, unless converted to sRGB."""
        return None if self.applied else self.icc

    def close(self) -> None:
        if self.slide is not None:
            self.slide.close()

    def thumbnail(self) -> Tuple[np.ndarray, float]:
        """``(thumbnail uint8 RGB, scale)``: at most :data:`THUMB_SIDE` px a side, the scale in thumbnail px per
        full-resolution px (made once: the registration and the tissue prefilter both use it)."""
        if self._thumb is None:
            self._thumb = self._make_thumbnail()
        return self._thumb

    def _make_thumbnail(self) -> Tuple[np.ndarray, float]:
        scale = min(1.0, THUMB_SIDE / max(self.width, self.height))
        size = (max(1, round(self.width * scale)), max(1, round(self.height * scale)))
        if self.slide is not None:
            thumb = np.array(self.slide.get_thumbnail(size).convert("RGB"))  # writable: torch reads it
            thumb = self._to_srgb(thumb) if self._to_srgb is not None else thumb
        else:
            thumb = cv2.resize(self.image, size, interpolation=cv2.INTER_AREA) if scale < 1 else self.image
        return thumb, thumb.shape[1] / self.width

    def region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The ``(h, w, 3)`` uint8 region at ``(x, y)`` (level 0), white beyond the scan."""
        if self.slide is not None:
            region = slide_region(self.slide, x, y, (h, w))
            return self._to_srgb(region) if self._to_srgb is not None else region
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.width), min(y + h, self.height)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self.image[y0:y1, x0:x1]
        return out


def _darkness(rgb: np.ndarray) -> np.ndarray:
    return 255.0 - cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).astype(np.float32)


def _tapered(x: np.ndarray) -> np.ndarray:
    """``x`` times a Hann window: no step at the border where it is zero-padded (a scan filled with tissue to its
    edges would otherwise correlate best at zero shift)."""
    if min(x.shape) < 2:
        return x
    return x * cv2.createHanningWindow((x.shape[1], x.shape[0]), cv2.CV_32F)


def dihedral(image: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """``image`` mirrored left-right (when ``flip``), then turned ``k`` quarter turns counter-clockwise."""
    out = image[:, ::-1] if flip else image
    return np.ascontiguousarray(np.rot90(out, k))


def _dihedral_matrix(k: int, flip: bool, w: float, h: float) -> np.ndarray:
    """The 3x3 map of pixel coordinates ``(x, y, 1)`` of a ``w × h`` image to those of :func:`dihedral`'s output."""
    m = np.eye(3)
    if flip:
        m = np.array([[-1.0, 0, w - 1], [0, 1, 0], [0, 0, 1]]) @ m
    for _ in range(k % 4):  # a quarter turn counter-clockwise: (x, y) -> (y, w - 1 - x); the size becomes h × w
        m = np.array([[0.0, 1, 0], [-1, 0, w - 1], [0, 0, 1]]) @ m
        w, h = h, w
    return m


@dataclass
class PairingReport:
    written: int = 0
    rejected: int = 0  # source tiles with too little tissue, or beyond max_pairs
    beyond: int = 0  # source tiles whose field lies beyond the destination scan (by the registration, or the match)
    unmatched: List[Tuple[str, str]] = field(default_factory=list)  # (source tile, reason): weak matches
    registration: dict = field(default_factory=dict)
    manifest: str = ""


def _correlate(a: np.ndarray, b: np.ndarray) -> Tuple[float, float, float]:
    """Phase correlation of two tapered arrays, zero-padded to a common canvas: ``(dx, dy, peak)`` with
    ``b[p + d] ≈ a[p]``."""
    hc, wc = a.shape[0] + b.shape[0], a.shape[1] + b.shape[1]
    pa, pb = np.zeros((hc, wc), np.float32), np.zeros((hc, wc), np.float32)
    pa[:a.shape[0], :a.shape[1]] = a
    pb[:b.shape[0], :b.shape[1]] = b
    (dx, dy), peak = cv2.phaseCorrelate(pa, pb)
    return float(dx), float(dy), float(peak)


#: Rotations of the glass searched on the thumbnails beyond the quarter turns and mirrors, in degrees.
ANGLES = tuple(np.round(np.arange(-5.0, 5.001, 0.25), 2))


def register_scans(src: _Scan, dst: _Scan, scale: float) -> dict:
    """The global map from source to destination pixels, on thumbnails at the source's physical scale: the best of
    the destination's eight quarter turns and mirrors by phase-correlation peak, then the best small rotation of the
    glass (:data:`ANGLES`, refined to 0.1°) for it. ``scale``: destination px per source px. Returns the turn
    ``k``, ``flip``, ``glass_angle`` (degrees, as :func:`_glass_angle`), the peaks, and ``matrix``: the 3x3 map of
    source to destination pixel coordinates (good to about a thumbnail pixel, ``thumb_px`` source px;
    :func:`pair_tiles` refits it at full resolution)."""
    ts_img, ts = src.thumbnail()
    td_img, td = dst.thumbnail()
    # both at one physical scale, the coarser of the two (c thumbnail px per source px): a small region against a
    # whole slide does not blow the slide's thumbnail up
    c = min(ts, td * scale)

    def resized(img, f):
        if abs(f - 1) < 1e-9:
            return img
        return cv2.resize(img, (max(1, round(img.shape[1] * f)), max(1, round(img.shape[0] * f))),
                          interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)

    ts_img, td_img = resized(ts_img, c / ts), resized(td_img, c / (td * scale))
    ts, td = ts_img.shape[1] / src.width, td_img.shape[1] / dst.width
    half = lambda img: cv2.resize(img, (max(1, img.shape[1] // 2), max(1, img.shape[0] // 2)),  # noqa: E731
                                  interpolation=cv2.INTER_AREA)
    # a source that fits well inside the destination (a region against a whole slide) is found by normalized
    # cross-correlation of the whole source thumbnail; two scans of about one extent by phase correlation
    area = lambda img: img.shape[0] * img.shape[1]  # noqa: E731
    contained = max(ts_img.shape[:2]) <= min(td_img.shape[:2]) and area(ts_img) <= 0.5 * area(td_img)
    contains = max(td_img.shape[:2]) <= min(ts_img.shape[:2]) and area(td_img) <= 0.5 * area(ts_img)

    def corr(a_, b_):  # (dx, dy, score) with b_[p + d] ≈ a_[p]
        if contained or contains:
            big, small = (b_, a_) if contained else (a_, b_)
            _, score, _, (lx, ly) = cv2.minMaxLoc(cv2.matchTemplate(big, small, cv2.TM_CCOEFF_NORMED))
            sign = 1.0 if contained else -1.0  # the destination inside the source: a_[p + l] ≈ b_[p], so d = -l
            return sign * lx, sign * ly, float(score) if np.isfinite(score) else -1.0
        return _correlate(_tapered(a_), _tapered(b_))

    # the turn, mirror and coarse angle on half-size thumbnails (4x fewer pixels), the fine angle on the full ones
    a_half, a = _darkness(half(ts_img)), _darkness(ts_img)
    tries = []
    for flip in (False, True):
        for k in range(4):
            dx, dy, peak = corr(a_half, _darkness(dihedral(half(td_img), k, flip)))
            tries.append({"k": k, "flip": flip, "dx": 2 * dx, "dy": 2 * dy, "peak": peak})
    best = max(tries, key=lambda t: t["peak"])
    turned = _darkness(dihedral(td_img, best["k"], best["flip"]))
    turned_half = _darkness(half(dihedral(td_img, best["k"], best["flip"])))

    def at(angle, b, ref):  # `b` rotated by `angle` about its centre, correlated with `ref`
        rot = cv2.getRotationMatrix2D(((b.shape[1] - 1) / 2, (b.shape[0] - 1) / 2), float(angle), 1.0)
        return corr(ref, cv2.warpAffine(b, rot, (b.shape[1], b.shape[0]), flags=cv2.INTER_LINEAR)), rot

    coarse = {float(ang): at(ang, turned_half, a_half)[0][2] for ang in ANGLES}
    angle = max(coarse, key=coarse.get)
    fine = {round(angle + f, 2): at(angle + f, turned, a) for f in np.arange(-0.2, 0.201, 0.1)}
    angle = max(fine, key=lambda g: fine[g][0][2])
    (dx, dy, peak), rot = fine[angle]
    # source px -> source thumb -> rotated, turned destination thumb (+ d) -> turned thumb -> destination thumb -> px
    m_d = _dihedral_matrix(best["k"], best["flip"], td_img.shape[1], td_img.shape[0])
    rot3 = np.vstack([rot, [0.0, 0.0, 1.0]])
    chain = (np.diag([1 / td, 1 / td, 1.0]) @ np.linalg.inv(m_d) @ np.linalg.inv(rot3)
             @ np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1.0]]) @ np.diag([ts, ts, 1.0]))
    others = sorted(t["peak"] for t in tries)[-2]
    return {"k": best["k"], "flip": best["flip"], "glass_angle": float(-angle), "peak": peak, "turn_peak": best["peak"],
            "method": "normalized cross-correlation" if contained or contains else "phase correlation",
            "second_peak": others, "scale": scale, "matrix": chain.tolist(), "thumb_px": 1 / ts, "tries": tries}


def pair_tiles(src_path, dst_path, out_dir, *, size: int = 256, stride: Optional[int] = None, min_tissue: float = 0.5,
               max_pairs: Optional[int] = None, search_px: int = 48, min_score: float = 0.5,
               src_mpp: Optional[float] = None, dst_mpp: Optional[float] = None, min_peak: float = 0.1,
               max_pixels: Optional[int] = None, slide: Optional[str] = None, apply_icc: bool = False) -> PairingReport:
    """Cut registered ``size``² tile pairs from two scans of one slide into ``out_dir/src``, ``out_dir/dst`` and
    ``out_dir/pairs.csv`` (``src,dst,slide,x,y,dst_cx,dst_cy,score,mpp``: paths relative to it, the source tile's
    top-left, the destination tile's centre in destination pixels, the match's normalized cross-correlation, the
    pairs' µm/px (the source's, when known; both tiles are at it), then ``src_icc,dst_icc``: each scan's embedded ICC
    profile (a slide's OpenSlide ``color_profile``, an image's own; ``""`` for none); ``slide`` defaults to the
    source file's stem, so that ``shiftkit fit-scanner --pairs a/pairs.csv --pairs b/pairs.csv`` cross-validates by
    slide). Tiles carry their scan's profile embedded, so that ``fit-scanner --apply-icc`` can convert them; with
    ``apply_icc`` they are converted to sRGB here instead (the manifest says "(applied)").

    Source tiles on a grid (step ``stride``, default ``size``) with at least ``min_tissue`` tissue are kept (at most
    ``max_pairs``, evenly spread over the candidates); each is located in the destination by the global
    registration (:func:`register_scans`, refitted at full resolution as a similarity on up to
    :data:`REFINE_TILES` of them) and matched within ``± search_px`` by normalized cross-correlation; a
    match under ``min_score`` is listed in the report (``unmatched``), a tile whose field lies beyond the destination
    (a scan of part of the slide) counted (``beyond``); neither is written. Pixel sizes
    (µm/px): a whole-slide image's own unless given; plain images without one are taken as equal.
    ``out_dir`` is new, empty or a previous output of this function, whose listed pairs are replaced once the scans
    have registered; a folder with other files in ``src/`` or ``dst/`` is refused before anything is written.

    Raises:
        InvalidArgumentError: an argument out of range, or a global registration whose phase-correlation peak is
            under ``min_peak`` (not the same slide, or too little shared tissue; on 256-px MITOS crops the same field
            on two scanners gave 0.31-0.94, its other orientations up to 0.13, a different field 0.05).
        ImageReadError: a scan that cannot be read.
    """
    if size < 32 or (stride is not None and stride < 1) or not 0 <= min_tissue <= 1 or search_px < 1 \
            or not -1 <= min_score <= 1 or (max_pairs is not None and max_pairs < 1):
        raise InvalidArgumentError(f"`size`/`stride`/`min_tissue`/`search_px`/`min_score`/`max_pairs` out of range: "
                                   f"expected size >= 32, stride >= 1, min_tissue in [0, 1], search_px >= 1, min_score "
                                   f"in [-1, 1], max_pairs >= 1, got {size}, {stride}, {min_tissue}, {search_px}, "
                                   f"{min_score}, {max_pairs}")
    for name, v in (("src_mpp", src_mpp), ("dst_mpp", dst_mpp)):
        if v is not None and not (np.isfinite(v) and v > 0):
            raise InvalidArgumentError(f"`{name}` is invalid: expected a positive number of µm per pixel, got {v!r}")
    stride = stride or size
    _check_output(Path(out_dir))
    src, dst = _Scan(src_path, max_pixels, src_mpp, apply_icc), None
    try:
        dst = _Scan(dst_path, max_pixels, dst_mpp, apply_icc)
        scale = src.mpp / dst.mpp if src.mpp and dst.mpp else 1.0  # destination px per source px
        if not 0.2 <= scale <= 5:
            raise InvalidArgumentError(f"the scans' pixel sizes are too far apart: expected within 5x, got "
                                       f"{src.mpp} and {dst.mpp} µm/px")
        reg = register_scans(src, dst, scale)
        if reg["peak"] < min_peak:
            raise InvalidArgumentError(f"`{dst_path}` does not register with `{src_path}`: expected a phase-correlation "
                                       f"peak of at least {min_peak} on the thumbnails, got {reg['peak']:.3f} (not the "
                                       "same slide, or too little shared tissue)")
        report = PairingReport(registration=dict(reg, src_mpp=src.mpp, dst_mpp=dst.mpp, src_icc=src.icc_label,
                                                 dst_icc=dst.icc_label))
        _cut_pairs(src, dst, reg, Path(out_dir), size, stride, min_tissue, max_pairs, search_px, min_score,
                   slide or Path(src_path).stem, report)
        return report
    finally:
        src.close()
        if dst is not None:
            dst.close()


def _turn_linear(k: int, flip: bool, scale: float) -> np.ndarray:
    """The ``(2, 2)`` linear part of the source -> destination map for quarter turns, mirror and scale alone (no
    rotation of the glass)."""
    return scale * np.linalg.inv(_dihedral_matrix(k, flip, 1, 1))[:2, :2]


def _window(dst: _Scan, m: np.ndarray, x: int, y: int, size: int, search: int, k: int, flip: bool, scale: float):
    """The destination's view of the source window ``[x - search, x + size + search)²``, in the source's orientation
    and pixel size: ``(window uint8, A)`` with ``A`` the 3x3 map of window pixel indices to destination pixel
    indices. Where ``m`` is a quarter turn / mirror times ``scale`` (to a quarter pixel over the window) the pixels are
    the destination's own, turned exactly (and resized by area when the pixel sizes differ); otherwise (a rotated
    glass) they are warped bilinearly."""
    win = size + 2 * search
    origin = np.array([[1.0, 0, x - search], [0, 1, y - search], [0, 0, 1]])
    a = m @ origin
    if np.abs(a[:2, :2] - _turn_linear(k, flip, scale)).max() * win < 0.25:
        side = max(1, int(round(win * scale)))
        cx, cy, _ = a @ np.array([(win - 1) / 2, (win - 1) / 2, 1.0])
        x0, y0 = int(round(cx - (side - 1) / 2)), int(round(cy - (side - 1) / 2))
        region = dst.region(x0, y0, side, side)
        window = dihedral(region, k, flip)  # a square turns about its centre
        if side != win:
            window = cv2.resize(window, (win, win), interpolation=cv2.INTER_AREA if side > win else cv2.INTER_CUBIC)
        f = side / win  # window index -> turned-region index -> region index -> destination index
        to_turned = np.array([[f, 0, (f - 1) / 2], [0, f, (f - 1) / 2], [0, 0, 1.0]])
        a = np.array([[1.0, 0, x0], [0, 1, y0], [0, 0, 1]]) @ np.linalg.inv(_dihedral_matrix(k, flip, side, side)) @ to_turned
        return window, a
    corners = a @ np.array([[0, win - 1, 0, win - 1], [0, 0, win - 1, win - 1], [1, 1, 1, 1.0]])
    x0, y0 = int(np.floor(corners[0].min())) - 2, int(np.floor(corners[1].min())) - 2
    x1, y1 = int(np.ceil(corners[0].max())) + 3, int(np.ceil(corners[1].max())) + 3
    region = dst.region(x0, y0, x1 - x0, y1 - y0)
    to_region = np.array([[1.0, 0, -x0], [0, 1, -y0], [0, 0, 1]]) @ a
    window = cv2.warpAffine(region, to_region[:2], (win, win), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(255, 255, 255))
    return window, a


def _match(dst, m, x, y, tile, search, reg, subpixel=False):
    """``(score, window, lx, ly, A)``: the best place of ``tile`` in its destination window (with ``subpixel``, the
    place refined by a parabola through the correlation's neighbours, as floats)."""
    window, a = _window(dst, m, x, y, tile.shape[0], search, reg["k"], reg["flip"], reg["scale"])
    ncc = cv2.matchTemplate(_darkness(window), _darkness(tile), cv2.TM_CCOEFF_NORMED)
    _, score, _, (lx, ly) = cv2.minMaxLoc(ncc)
    if subpixel:
        def vertex(lo, c, hi):
            den = lo - 2 * c + hi
            return 0.0 if den >= 0 else float(np.clip(0.5 * (lo - hi) / den, -0.5, 0.5))
        h, w = ncc.shape
        fx = vertex(ncc[ly, lx - 1], ncc[ly, lx], ncc[ly, lx + 1]) if 0 < lx < w - 1 else 0.0
        fy = vertex(ncc[ly - 1, lx], ncc[ly, lx], ncc[ly + 1, lx]) if 0 < ly < h - 1 else 0.0
        lx, ly = lx + fx, ly + fy
    return (float(score) if np.isfinite(score) else -1.0), window, lx, ly, a


def _glass_angle(lin: np.ndarray, reg: dict) -> float:
    """The rotation of the glass (degrees, counter-clockwise as displayed: OpenCV's getRotationMatrix2D convention)
    from the source to the destination left once the quarter turns, mirror and scale of ``reg`` are taken out of
    the linear map ``lin``."""
    left = lin @ np.linalg.inv(_turn_linear(reg["k"], reg["flip"], reg["scale"]))
    return float(np.degrees(np.arctan2(left[0, 1] - left[1, 0], left[0, 0] + left[1, 1])))


#: Source tiles matched with a wide search to refine the thumbnails' registration at full resolution.
REFINE_TILES = 16


def _inside(m: np.ndarray, x: int, y: int, size: int, dst: _Scan, margin: float = 0.0) -> bool:
    """Whether the source tile at ``(x, y)`` lands inside the destination under ``m`` (to ``margin`` px)."""
    c = m @ np.array([[x, x + size - 1, x, x + size - 1], [y, y, y + size - 1, y + size - 1], [1, 1, 1, 1.0]])
    return bool(c[0].min() >= -margin and c[1].min() >= -margin and c[0].max() <= dst.width - 1 + margin
                and c[1].max() <= dst.height - 1 + margin)


def _refine(dst, m, candidates, size, search_px, min_score, reg) -> Tuple[np.ndarray, dict]:
    """The source -> destination map refitted on up to :data:`REFINE_TILES` tiles spread over the part of the source
    the destination covers, each matched within ``± max(search_px, 3 thumbnail px)`` (the thumbnails' map is good to
    about a thumbnail pixel, which on a large slide is many full-resolution pixels): an affine least-squares fit with
    outlier rejection, then its nearest similarity."""
    wide = int(max(search_px, 3 * reg.get("thumb_px", 1.0) + 8))
    candidates = [c for c in candidates if _inside(m, c[1], c[0], size, dst)]  # where the destination has the field
    if not candidates:
        return m, {"search_px": wide, "tiles": 0, "matched": 0, "refitted": False}
    pick = _spread(candidates, REFINE_TILES)
    src_pts, dst_pts = [], []
    for y, x, tile in pick:
        score, _, lx, ly, a = _match(dst, m, x, y, tile, wide, reg, subpixel=True)
        if score >= min_score:
            src_pts.append([x + (size - 1) / 2, y + (size - 1) / 2])
            dst_pts.append((a @ np.array([lx + (size - 1) / 2, ly + (size - 1) / 2, 1.0]))[:2])
    info = {"search_px": wide, "tiles": int(len(pick)), "matched": len(src_pts)}
    if len(src_pts) < 4:
        return m, dict(info, refitted=False)
    sp, dp = np.asarray(src_pts), np.asarray(dst_pts)
    keep = np.ones(len(sp), bool)
    for _ in range(2):
        x_ = np.c_[sp[keep], np.ones(keep.sum())]
        coef = np.linalg.lstsq(x_, dp[keep], rcond=None)[0]  # (3, 2)
        res = np.linalg.norm(np.c_[sp, np.ones(len(sp))] @ coef - dp, axis=1)
        new = res <= max(2.0, 3 * np.median(res))
        if new.sum() < 4 or (new == keep).all():
            break
        keep = new
    # an affine map from points spread over the source; degenerate when they lie on a line
    if np.linalg.matrix_rank(np.c_[sp[keep], np.ones(keep.sum())]) < 3:
        return m, dict(info, refitted=False)
    # the nearest similarity (rotation or reflection, one scale): the glass is rigid; fewer parameters, less noise
    u, sv, vt = np.linalg.svd(coef[:2].T)
    lin = sv.mean() * (u @ vt)
    shift = (dp[keep] - sp[keep] @ lin.T).mean(0)
    fitted = np.array([[lin[0, 0], lin[0, 1], shift[0]], [lin[1, 0], lin[1, 1], shift[1]], [0.0, 0.0, 1.0]])
    res = np.linalg.norm(np.c_[sp, np.ones(len(sp))] @ fitted[:2].T - dp, axis=1)
    return fitted, dict(info, refitted=True, inliers=int(keep.sum()), rms_px=float(np.sqrt(np.mean(res[keep] ** 2))),
                        glass_angle=_glass_angle(lin, reg))


def _spread(items: list, n: int) -> list:
    """At most ``n`` of ``items``, evenly spread over the list (its order: rows of the grid)."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, n).round().astype(int).tolist()))]


def _likely_tissue(src: _Scan, grid: list, size: int, threshold: float) -> list:
    """The grid positions whose footprint on the source's thumbnail has at least ``threshold`` tissue."""
    thumb, t = src.thumbnail()
    mask = tissue_map(thumb)
    integral = cv2.integral(mask)
    out = []
    for y, x in grid:
        x0, y0 = int(x * t), int(y * t)
        x1, y1 = max(x0 + 1, int(np.ceil((x + size) * t))), max(y0 + 1, int(np.ceil((y + size) * t)))
        x1, y1 = min(x1, mask.shape[1]), min(y1, mask.shape[0])
        area = max(1, (x1 - x0) * (y1 - y0))
        frac = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / area
        if frac >= threshold:
            out.append((y, x))
    return out


MANIFEST_FIELDS = ["src", "dst", "slide", "x", "y", "dst_cx", "dst_cy", "score", "mpp", "src_icc", "dst_icc"]


def _check_output(out: Path) -> None:
    """A folder whose ``src/`` or ``dst/`` holds files but that has no ``pairs.csv`` was not made by
    :func:`pair_tiles` and is refused before anything is read or written."""
    held = [f for d in ("src", "dst") if (out / d).is_dir() for f in (out / d).iterdir()]
    if held and not (out / "pairs.csv").exists():
        raise InvalidArgumentError(f"`out_dir` {out} is not a pair-tiles output: expected an empty or new folder, got "
                                   f"{len(held)} files in its src/ or dst/ and no pairs.csv (nothing was written)")


def _clear_previous(out: Path) -> None:
    """Remove the tiles a previous run's ``pairs.csv`` lists (inside ``out/src`` and ``out/dst`` only) and leave an
    empty manifest, so that the folder holds this run's pairs only, listed as they are written."""
    manifest = out / "pairs.csv"
    if manifest.exists():
        with open(manifest, newline="") as fh:
            for row in csv.DictReader(fh):
                for key in ("src", "dst"):
                    f = out / (row.get(key) or "")
                    if row.get(key) and f.is_file() and f.resolve().parent.parent == out.resolve():
                        f.unlink()
    write_csv(manifest, MANIFEST_FIELDS, [])


def _cut_pairs(src, dst, reg, out, size, stride, min_tissue, max_pairs, search_px, min_score, slide, report):
    m = np.asarray(reg["matrix"])
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out)
    grid = [(y, x) for y in range(0, src.height - size + 1, stride) for x in range(0, src.width - size + 1, stride)]
    if max_pairs is not None and len(grid) > 4 * max_pairs:
        # a large scan: read only tiles whose footprint on the thumbnail looks like tissue (at 0.8 of min_tissue),
        # twice as many as wanted, evenly spread; each is checked at full resolution below
        likely = _likely_tissue(src, grid, size, 0.8 * min_tissue)
        report.rejected += len(grid) - len(likely)
        grid = _spread(likely, 2 * max_pairs)
        report.rejected += len(likely) - len(grid)
    candidates = []
    for y, x in grid:
        tile = src.region(x, y, size, size)
        if tissue_fraction(tile) < min_tissue:
            report.rejected += 1
            continue
        candidates.append((y, x, tile))
    if max_pairs is not None and len(candidates) > max_pairs:
        kept = _spread(candidates, max_pairs)
        report.rejected += len(candidates) - len(kept)
        candidates = kept
    if candidates:  # twice: the second round's windows follow the first round's rotation
        m, info = _refine(dst, m, candidates, size, search_px, min_score, reg)
        m, info2 = _refine(dst, m, candidates, size, search_px, min_score, dict(reg, thumb_px=1.0)) \
            if info["refitted"] else (m, info)
        report.registration["refined"] = [info, info2] if info2 is not info else [info]
        report.registration["matrix"] = m.tolist()
        if info2.get("refitted"):
            report.registration["glass_angle"] = info2["glass_angle"]
    rows = []
    for y, x, tile in candidates:
        name = f"{y}_{x}.png"
        if not _inside(m, x, y, size, dst, margin=search_px * reg["scale"]):
            report.beyond += 1
            continue
        score, window, lx, ly, a = _match(dst, m, x, y, tile, search_px, reg)
        if score < min_score:
            report.unmatched.append((name, f"weak match: normalized cross-correlation {score:.2f} < {min_score}"))
            continue
        corners = a @ np.array([[lx, lx + size - 1, lx, lx + size - 1], [ly, ly, ly + size - 1, ly + size - 1],
                                [1, 1, 1, 1.0]])
        if (corners[0].min() < -0.5 or corners[1].min() < -0.5 or corners[0].max() > dst.width - 0.5
                or corners[1].max() > dst.height - 0.5):
            report.beyond += 1
            continue
        twin = np.ascontiguousarray(window[ly:ly + size, lx:lx + size])
        write_image(ensure_inside(out, out / "src" / name), tile, icc=src.tile_icc)
        write_image(ensure_inside(out, out / "dst" / name), twin, icc=dst.tile_icc)
        cx, cy, _ = a @ np.array([lx + (size - 1) / 2, ly + (size - 1) / 2, 1.0])  # the twin's centre, destination px
        rows.append({"src": f"src/{name}", "dst": f"dst/{name}", "slide": slide, "x": x, "y": y,
                     "dst_cx": f"{cx:.1f}", "dst_cy": f"{cy:.1f}", "score": f"{score:.3f}",
                     "mpp": "" if src.mpp is None else f"{src.mpp:.4f}", "src_icc": src.icc_label,
                     "dst_icc": dst.icc_label})
        report.written += 1
    report.manifest = str(write_csv(out / "pairs.csv", MANIFEST_FIELDS, rows))


__all__ = ["PairingReport", "pair_tiles", "dihedral", "THUMB_SIDE", "ANGLES", "REFINE_TILES"]
