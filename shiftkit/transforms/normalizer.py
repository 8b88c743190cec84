"""``StainNormalizer``: Reinhard, Macenko and Vahadane normalization as an ``nn.Module``."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..core.errors import InvalidArgumentError, StainEstimationError, UnknownNameError
from ..core.image import map_batch, to_batch
from ..core.ops import select
from ..functional.stain import lab_companded, lab_moments, normalize_stains, reinhard_from_companded, reinhard_normalize, rgb_to_lab
from ..stain.estimate import (
    STATUS_DEGENERATE,
    STATUS_LOW_TISSUE,
    STATUS_NAMES,
    STATUS_OK,
    INTENSITIES,
    EstimatorConfig,
    StainEstimate,
    estimator_config,
    estimate_batch,
    estimate_stains_pooled,
)
from ..stain.mask import srgb_to_linear
from ..stain.model import MACENKO_REFERENCE_MAX_CONCENTRATIONS, reference_stain_matrix, uint8_lookup, validate_stain_matrix
from ..stain.stats import weighted_mean_std

NORMALIZER_METHODS = ("reinhard", "macenko", "vahadane")
FAILURE_POLICIES = ("reference", "identity", "raise")
_FORMAT = "shiftkit.StainNormalizer"
_MIN_LAB_STD = 1e-2


def _lab_statistics(x: torch.Tensor, cfg: EstimatorConfig, lab: Optional[torch.Tensor] = None):
    """Tissue-masked LAB mean/std ``(B, 3)``, tissue pixel counts and totals ``(B,)`` (``lab``: ``x`` in LAB, if
    already computed)."""
    w = cfg.tissue_weights(x).flatten(1)
    lab = (rgb_to_lab(x) if lab is None else lab).flatten(2)
    mean, std = weighted_mean_std(lab, w, eps=1e-6)
    return mean, std, w.sum(-1), torch.full_like(w[:, 0], w.shape[-1])


#: Pixels a pooled source estimate reads at most (a deterministic raster-order stride over all images).
POOLED_MAX_PIXELS = 2_000_000


@dataclass
class LabStatistics:
    """Pooled tissue-masked CIELAB statistics of a set of images (Reinhard's pooled source): ``mean`` and ``std``
    ``(1, 3)``, ``status_code`` ``(1,)`` (``ok`` or ``low-tissue``/``degenerate``)."""

    mean: torch.Tensor
    std: torch.Tensor
    status_code: torch.Tensor

    def __len__(self) -> int:
        return int(self.mean.shape[0])


def _strided_pixels(images: Sequence[Any], max_pixels: int) -> list:
    """Each image as a ``(1, 3, 1, n)`` strip of every k-th pixel in raster order, with one stride k over all images
    so that at most ``max_pixels`` are kept (deterministic; a whole slide's tiles fit in memory)."""
    batches = [to_batch(img, f"images[{i}]")[0] for i, img in enumerate(images)]
    total = sum(int(x.shape[0] * x.shape[-2] * x.shape[-1]) for x in batches)
    step = max(1, math.ceil(total / int(max_pixels)))
    return [x.permute(1, 0, 2, 3).reshape(3, -1)[:, ::step].reshape(1, 3, 1, -1) for x in batches]


def _is_cpu_uint8(images: Any) -> bool:
    if isinstance(images, np.ndarray):
        return images.dtype == np.uint8
    return isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.device.type == "cpu"


def _lab_status(cfg: EstimatorConfig, n_tissue: torch.Tensor, n: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Reinhard's per-tile (or pooled) status codes: low-tissue, degenerate (a flat LAB channel), else ok."""
    flat = (std < _MIN_LAB_STD).any(-1)
    return torch.where(~cfg.enough_tissue(n_tissue, n), STATUS_LOW_TISSUE,
                       torch.where(flat, STATUS_DEGENERATE, STATUS_OK)).to(torch.int8)


class StainNormalizer(nn.Module):
    """Normalize H&E tiles to a target's stain appearance, per tile, batched, on any device.

    Methods:

    * ``"reinhard"`` — Reinhard et al. 2001 colour transfer in CIELAB (Kornia), with **tissue-masked**
      statistics of each tile and of the target.
    * ``"macenko"`` — Macenko et al. 2009: each tile's stain matrix and 99th-percentile concentrations are
      estimated (:func:`shiftkit.estimate_stains`), concentrations are rescaled to the target's and the
      image is rebuilt with the target's stain matrix.
    * ``"vahadane"`` — the same with the sparse non-negative (Vahadane et al. 2016) estimator.

    Before :meth:`fit`, the stain methods use the Macenko reference target (HERef/maxCRef of torchstain and
    MONAI); Reinhard must be fitted.

    Failure policy per tile (``on_failure``): a tile whose estimate has status ``"low-tissue"`` or
    ``"degenerate"`` is (``"reference"``, default) normalized with the reference stain matrix and its
    concentrations instead of its own estimate, (``"identity"``) returned unchanged, or (``"raise"``) makes
    the call raise :class:`StainEstimationError`. For Reinhard both fallbacks return the tile unchanged. A
    tile's output never depends on the other tiles of its batch, and no NaN is ever returned.

    Args:
        method: ``"reinhard"``, ``"macenko"`` or ``"vahadane"``.
        on_failure: ``"reference"``, ``"identity"`` or ``"raise"``.
        clamp_concentrations: clamp concentrations at 0 (stain methods).
        max_scale: bound on the per-stain concentration rescaling factor (stain methods).
        route: ``"float"`` (default: float CIELAB on any device, tissue rule of the estimator options) or, for
            Reinhard, ``"opencv8"``: uint8 images on the CPU through OpenCV's 8-bit CIELAB and a lookup table per
            channel (:func:`~shiftkit.functional.reinhard_opencv8`; luminosity tissue rule; about one level from
            the float route). Other inputs (float, or on a GPU) take the float route.
        **options: estimator options (see :func:`shiftkit.estimate_stains`), e.g. ``i0=240/255``.

    Shape:
        Input and output follow the image contract: numpy ``(H, W, 3)``/``(B, H, W, 3)`` or torch
        ``(3, H, W)``/``(B, 3, H, W)``; dtype, device and layout are kept.

    Examples:
        >>> from shiftkit.data import load_sample
        >>> norm = StainNormalizer("macenko").fit(load_sample("slideflow"))
        >>> out = norm(load_sample("stardist"))
        >>> out.shape, out.dtype
        ((300, 500, 3), dtype('uint8'))
    """

    def __init__(
        self,
        method: str = "macenko",
        *,
        on_failure: str = "reference",
        clamp_concentrations: bool = True,
        max_scale: float = 5.0,
        route: str = "float",
        **options: Any,
    ):
        super().__init__()
        if method not in NORMALIZER_METHODS:
            raise UnknownNameError("method", method, NORMALIZER_METHODS)
        if on_failure not in FAILURE_POLICIES:
            raise UnknownNameError("on_failure", on_failure, FAILURE_POLICIES)
        if not (isinstance(max_scale, (int, float)) and max_scale >= 1.0 and math.isfinite(max_scale)):
            raise InvalidArgumentError(f"`max_scale` out of range: expected a finite number >= 1, got {max_scale!r}")
        if route not in ("float", "opencv8"):
            raise UnknownNameError("route", route, ("float", "opencv8"))
        if route == "opencv8" and method != "reinhard":
            raise InvalidArgumentError(f"`route` 'opencv8' is Reinhard's: expected method 'reinhard', got {method!r}")
        self.route = route
        self.method = method
        self.on_failure = on_failure
        self.clamp_concentrations = bool(clamp_concentrations)
        self.max_scale = float(max_scale)
        self.options = dict(options)
        self.config = estimator_config("vahadane" if method == "vahadane" else "macenko", self.options)
        ref = reference_stain_matrix(self.config.reference)
        self.register_buffer("target_matrix", ref.clone())
        self.register_buffer("target_max_concentrations", torch.tensor(MACENKO_REFERENCE_MAX_CONCENTRATIONS))
        self.register_buffer("target_mean", torch.zeros(3))
        self.register_buffer("target_std", torch.ones(3))
        self.register_buffer("fitted", torch.tensor(False))

    # ------------------------------------------------------------------ fitting
    def fit(self, images: Union[Any, Sequence[Any]], *, intensity: str = "pooled") -> "StainNormalizer":
        """Fit the target on one image, a batch, or a list of images of any sizes (pooled over their tissue).

        ``intensity``: where the target's intensity scale comes from. ``"pooled"`` (default): the pooled tissue
        (the maximum concentrations' percentile over all pixels; Reinhard's LAB mean and standard deviation over
        all pixels). ``"median"``: the median over the tiles with enough tissue of each tile's own value (under the
        pooled stain matrix) — a typical tile's intensity. A pooled percentile follows the darkest images when the
        target images differ in stain intensity; on the MITOS dev pairs towards Aperio (whose slides differ most)
        the median target cut per-tile Vahadane's CIEDE2000 from 12.35 to 10.53, and towards Hamamatsu it raised it
        from 7.96 to 8.63 (docs/real_scanner_shift.md). With one image both are the same.

        Returns ``self``. Raises :class:`StainEstimationError` if the pooled target has too little tissue
        or a degenerate stain estimate.
        """
        if intensity not in INTENSITIES:
            raise UnknownNameError("intensity", intensity, INTENSITIES)
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise InvalidArgumentError("`images` is empty: expected at least one image to fit on, got 0 images")
        for i, img in enumerate(items):
            shape = tuple(getattr(img, "shape", ()))
            if len(shape) == 4 and shape[0] == 0:
                raise InvalidArgumentError(f"`images` is empty: expected at least one image to fit on, got a batch of 0 "
                                           f"images{f' at images[{i}]' if len(items) > 1 else ''} (shape {shape})")
        if self.method == "reinhard":
            labs, ws, tile_stats = [], [], []
            for i, img in enumerate(items):
                x, _ = to_batch(img, f"images[{i}]")
                w = self.config.tissue_weights(x)
                lab_i = rgb_to_lab(x.float())
                labs.append(lab_i.permute(1, 0, 2, 3).reshape(3, -1))
                ws.append(w.float().reshape(-1))
                if intensity == "median":  # each tile's own statistics, where it has enough tissue
                    w_i = w.float().reshape(w.shape[0], -1)
                    m_i, s_i = weighted_mean_std(lab_i.flatten(2), w_i)
                    keep = w_i.sum(-1) >= self.config.min_tissue_pixels
                    tile_stats.append(torch.cat([m_i, s_i], -1)[keep])
            lab, w = torch.cat(labs, -1)[None], torch.cat(ws, -1)[None]
            if float(w.sum()) < self.config.min_tissue_pixels:
                raise StainEstimationError(
                    f"`images` has too little tissue to fit a Reinhard target: expected at least "
                    f"{self.config.min_tissue_pixels} tissue pixels, got {int(w.sum())}"
                )
            mean, std = weighted_mean_std(lab, w)
            stats = torch.cat(tile_stats) if tile_stats else torch.zeros(0, 6)
            if len(stats):
                mid = stats.quantile(0.5, dim=0)
                mean, std = mid[None, :3], mid[None, 3:]
            self.target_mean.copy_(mean[0].to(self.target_mean))
            self.target_std.copy_(std[0].to(self.target_std))
        else:
            est = estimate_stains_pooled(items, self.config.method, on_failure="raise", intensity=intensity,
                                         **self.options)
            self.target_matrix.copy_(est.matrix[0].to(self.target_matrix))
            self.target_max_concentrations.copy_(est.max_concentrations[0].to(self.target_max_concentrations))
        self.fitted.fill_(True)
        return self

    def set_target(self, matrix: Any, max_concentrations: Any) -> "StainNormalizer":
        """Use a given stain matrix ``(2, 3)`` and max concentrations ``(2,)`` as the target (stain methods)."""
        if self.method == "reinhard":
            raise InvalidArgumentError("`method` has no stain-matrix target: expected 'macenko' or 'vahadane', got 'reinhard'")
        m = validate_stain_matrix(torch.as_tensor(matrix, dtype=torch.float32), "matrix")
        c = torch.as_tensor(max_concentrations, dtype=torch.float32)
        if c.shape != (2,) or not bool(torch.isfinite(c).all()) or bool((c <= 0).any()):
            raise InvalidArgumentError(f"`max_concentrations` is invalid: expected 2 positive finite values, got {c.tolist()}")
        self.target_matrix.copy_(m.to(self.target_matrix))
        self.target_max_concentrations.copy_(c.to(self.target_max_concentrations))
        self.fitted.fill_(True)
        return self

    # ------------------------------------------------------------------ applying
    def normalize(self, images: Any, *, source: Union[str, StainEstimate, LabStatistics] = "tile", return_status: bool = False):
        """Normalize ``images``; with ``return_status=True`` also return the per-tile status names.

        Args:
            images: images in any format of the image contract (a batch, or one image).
            source: where each tile's *source* stains come from. ``"tile"``: its own estimate (default).
                ``"pooled"``: one estimate from the tissue of all ``images`` (:meth:`pooled_source`, a bounded
                deterministic pixel sample), applied to each — the right choice for tiles of one slide or one
                scanner. A :class:`~shiftkit.StainEstimate` with ``B = 1`` (e.g. from :meth:`pooled_source` or
                :func:`~shiftkit.estimate_stains_pooled`) or, for Reinhard, :class:`LabStatistics`: reuse a slide's
                estimate across calls. In pooled modes a tile with too little tissue keeps its own status and
                fallback; every other tile takes the pooled source and its status.
            return_status: also return the per-tile status names.

        On CPU a batch is converted, normalized and written back in cache-sized chunks of tiles
        (:func:`shiftkit.core.image.map_batch`); tiles are independent, so the result is the same as in one go.
        """
        if isinstance(source, str):
            if source not in ("tile", "pooled"):
                raise UnknownNameError("source", source, ("tile", "pooled"))
            pooled = None if source == "tile" else self.pooled_source(images)
        else:
            pooled = self._check_source(source)
        if self.route == "opencv8" and _is_cpu_uint8(images):
            return self._normalize_opencv8(images, pooled, return_status)
        codes = []

        def run(x, lo, hi, u8):
            y, code = self._normalize_chunk(x, u8, pooled) if x.shape[0] else (x, torch.zeros(0, dtype=torch.int8, device=x.device))
            codes.append(code)
            return y

        out = map_batch(run, images, "images", with_uint8=True)
        code = torch.cat(codes) if codes else torch.zeros(0, dtype=torch.int8)
        if self.on_failure == "raise" and not bool((code == STATUS_OK).all()):
            bad = [(i, STATUS_NAMES[int(c)]) for i, c in enumerate(code.tolist()) if c != STATUS_OK]
            raise StainEstimationError(f"normalization failed for tiles {bad}: expected status 'ok' for every tile (on_failure='raise')")
        return (out, [STATUS_NAMES[int(c)] for c in code.tolist()]) if return_status else out

    def pooled_source(self, images: Any, max_pixels: int = POOLED_MAX_PIXELS) -> Union[StainEstimate, LabStatistics]:
        """The pooled source of ``images`` (a batch, or a sequence of images of any sizes, e.g. all tiles of a slide):
        a :class:`~shiftkit.StainEstimate` with ``B = 1`` (Macenko/Vahadane) or :class:`LabStatistics` (Reinhard),
        from a deterministic sample of at most ``max_pixels`` pixels in raster order.

        Args:
            images: the images to pool.
            max_pixels: largest number of pixels read (one stride over all images).
        """
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise InvalidArgumentError("`images` is empty: expected at least one image to pool, got 0 images")
        strips = _strided_pixels(items, max_pixels)
        if self.method != "reinhard":
            return estimate_stains_pooled(strips, self.config.method, **self.options)
        x = torch.cat(strips, dim=-1)
        mean, std, n_tissue, n = _lab_statistics(x, self.config)
        return LabStatistics(mean, std, _lab_status(self.config, n_tissue, n, std))

    def pooled_source_from_files(self, paths: Sequence[Union[str, os.PathLike]], max_pixels: int = POOLED_MAX_PIXELS):
        """:meth:`pooled_source` of image files, read one at a time (the stride comes from the headers, so memory
        holds one image and the sample). Returns ``(source, failures)`` with ``failures`` a list of
        ``(path, reason)`` for files that could not be read (they are left out of the pool).

        Args:
            paths: image files (e.g. every tile of one slide).
            max_pixels: largest number of pixels read over all files.
        """
        from ..core.files import image_size, read_image

        sizes = [image_size(p) for p in paths]
        total = sum(w * h for w, h in (s for s in sizes if s is not None)) or 1
        step = max(1, math.ceil(total / int(max_pixels)))
        strips, failures = [], []
        for p in paths:
            try:
                x = torch.from_numpy(read_image(p)).reshape(1, -1, 3)[:, ::step]
                strips.append(x.permute(2, 0, 1)[None].float().div(255))
            except Exception as exc:  # listed by the caller; the pool is made of the readable files
                failures.append((p, str(exc)))
        if not strips:
            raise InvalidArgumentError(f"`paths` has no readable image to pool: expected image files, got {len(paths)} failures")
        return self.pooled_source(strips, max_pixels=max_pixels * 2), failures

    def _check_source(self, source: Any) -> Union[StainEstimate, LabStatistics]:
        want = LabStatistics if self.method == "reinhard" else StainEstimate
        if not isinstance(source, want) or len(source) != 1:
            got = f"{type(source).__name__}" + (f" with B = {len(source)}" if hasattr(source, "__len__") else "")
            raise InvalidArgumentError(f"`source` is invalid: expected 'tile', 'pooled' or a {want.__name__} with B = 1 "
                                       f"for method {self.method!r}, got {got}")
        return source

    def forward(self, images: Any) -> Any:
        return self.normalize(images)

    def _normalize_opencv8(self, images: Any, pooled: Optional[LabStatistics], return_status: bool):
        """Reinhard through OpenCV's 8-bit LAB, tile by tile, for uint8 images on the CPU (numpy or torch)."""
        from ..functional.stain import reinhard_opencv8

        if not bool(self.fitted):
            raise InvalidArgumentError("`StainNormalizer('reinhard')` is not fitted: expected a call to .fit(target) first, got none")
        is_torch = isinstance(images, torch.Tensor)
        arr = images.numpy() if is_torch else images
        if arr.ndim not in (3, 4):
            to_batch(images, "images")  # raises the contract's error naming what came
        single = arr.ndim == 3
        chw = is_torch  # torch follows (B, 3, H, W); numpy (B, H, W, 3)
        batch = arr[None] if single else arr
        hwc = np.ascontiguousarray(np.moveaxis(batch, 1, -1)) if chw else batch
        if hwc.shape[-1] != 3:
            to_batch(images, "images")
        cfg = self.config
        src = None if pooled is None or int(pooled.status_code.reshape(-1)[0]) != STATUS_OK else \
            (pooled.mean.reshape(-1).tolist(), pooled.std.reshape(-1).tolist())
        tm, ts = self.target_mean.tolist(), self.target_std.tolist()
        out = np.empty_like(hwc)
        codes = []
        for i, tile in enumerate(hwc):
            out[i], c = reinhard_opencv8(np.ascontiguousarray(tile), tm, ts, luminosity_threshold=cfg.luminosity_threshold,
                                         min_tissue_pixels=cfg.min_tissue_pixels, min_tissue_fraction=cfg.min_tissue_fraction,
                                         min_std=_MIN_LAB_STD, source=src)
            codes.append(c)
        if self.on_failure == "raise" and any(codes):
            bad = [(i, STATUS_NAMES[c]) for i, c in enumerate(codes) if c]
            raise StainEstimationError(f"normalization failed for tiles {bad}: expected status 'ok' for every tile (on_failure='raise')")
        res = np.moveaxis(out, -1, 1) if chw else out
        res = res[0] if single else res
        if is_torch:
            res = torch.from_numpy(np.ascontiguousarray(res))
        return (res, [STATUS_NAMES[c] for c in codes]) if return_status else res

    def _normalize_chunk(self, x: torch.Tensor, u8: Optional[torch.Tensor] = None,
                         pooled: Union[None, StainEstimate, LabStatistics] = None) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if pooled is not None and self.method != "reinhard":
            return self._normalize_pooled(x, u8, pooled)
        if self.method == "reinhard":
            if not bool(self.fitted):
                raise InvalidArgumentError("`StainNormalizer('reinhard')` is not fitted: expected a call to .fit(target) first, got none")
            fast = not (torch.is_grad_enabled() and x.requires_grad)
            if fast:  # LAB's companded values once, for the statistics and for the transfer (no LAB tensor)
                lin = srgb_to_linear(x, u8)  # shared by the tissue rule and LAB
                w = cfg.tissue_weights(x, lin).flatten(1)
                f = lab_companded(x, linear=lin)
                mean, std = lab_moments(f, w, binary=True)  # tissue weights are 0 or 1
                n_tissue, n = w.sum(-1), torch.full_like(w[:, 0], w.shape[-1])
            else:
                lab = rgb_to_lab(x)  # once: for the statistics and for the transfer
                mean, std, n_tissue, n = _lab_statistics(x, cfg, lab)
            enough = cfg.enough_tissue(n_tissue, n)
            code = _lab_status(cfg, n_tissue, n, std)
            if pooled is not None:  # tiles with tissue take the pooled statistics and status
                pm, ps = pooled.mean.to(mean), pooled.std.to(std)
                mean = torch.where(enough[:, None], pm.expand_as(mean), mean)
                std = torch.where(enough[:, None], ps.expand_as(std), std)
                code = torch.where(enough, pooled.status_code.to(code.device).expand_as(code), code)
            ok = code == STATUS_OK
            safe_std = torch.where(ok[:, None], std, torch.ones_like(std))
            tm, ts = self.target_mean.to(x.device), self.target_std.to(x.device)
            if fast:
                y = reinhard_from_companded(f, mean, safe_std, tm, ts, x.shape)
            else:
                y = reinhard_normalize(x, mean, safe_std, tm, ts, lab=lab)
            y = select(ok[:, None, None, None], y.to(x.dtype), x)  # both fallbacks: unchanged
        else:
            y, code = self._apply_estimate(x, estimate_batch(x, cfg, None, "report", u8), u8)
        return y, code  # from_batch maps any NaN to 0 as a last guard

    def _normalize_pooled(self, x: torch.Tensor, u8: Optional[torch.Tensor], pooled: StainEstimate) -> tuple[torch.Tensor, torch.Tensor]:
        """Tiles with enough tissue take the pooled estimate (and its status); the others their own estimate."""
        cfg = self.config
        w = cfg.tissue_weights(x).flatten(1)
        n_tissue, n = w.sum(-1), w.shape[-1]
        enough = cfg.enough_tissue(n_tissue, n)
        b = x.shape[0]
        p = pooled.to(x.device)
        est = StainEstimate(matrix=p.matrix.to(x.dtype).expand(b, 2, 3).clone(),
                            max_concentrations=p.max_concentrations.to(x.dtype).expand(b, 2).clone(),
                            tissue_fraction=(n_tissue / n).to(x.dtype),
                            status_code=p.status_code.to(torch.int8).expand(b).clone())
        low = (~enough).nonzero().flatten()
        if low.numel():  # their own per-tile status and fallback
            own = estimate_batch(x[low], cfg, None, "report", None if u8 is None else u8[low])
            est.matrix[low], est.max_concentrations[low] = own.matrix.to(x.dtype), own.max_concentrations.to(x.dtype)
            est.status_code[low] = own.status_code
        return self._apply_estimate(x, est, u8)

    def _apply_estimate(self, x: torch.Tensor, est: StainEstimate, u8: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalize the float batch ``x`` given its per-tile estimate (Macenko/Vahadane); ``u8``, the same tiles
        as uint8 when the input was 8-bit, lets the log-intensity come from a lookup table."""
        code = est.status_code
        if x.shape[0] == 0:
            return x, code
        log_images = uint8_lookup(u8, "log", self.config.i0) if u8 is not None and x.dtype == torch.float32 else None
        y = normalize_stains(
            x,
            est.matrix,
            est.max_concentrations,
            self.target_matrix.to(x.device, x.dtype),
            self.target_max_concentrations.to(x.device, x.dtype),
            i0=self.config.i0,
            clamp_concentrations=self.clamp_concentrations,
            max_scale=self.max_scale,
            log_images=log_images,
        ).to(x.dtype)
        if self.on_failure == "identity":
            y = select((code == STATUS_OK)[:, None, None, None], y, x)
        return y, code

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        """JSON-serializable description: method, options and the fitted target."""
        from .. import __version__

        target = (
            {"mean": self.target_mean.tolist(), "std": self.target_std.tolist()}
            if self.method == "reinhard"
            else {"matrix": self.target_matrix.tolist(), "max_concentrations": self.target_max_concentrations.tolist()}
        )
        return {
            "format": _FORMAT,
            "version": 1,
            "shiftkit_version": __version__,
            "method": self.method,
            "on_failure": self.on_failure,
            "clamp_concentrations": self.clamp_concentrations,
            "max_scale": self.max_scale,
            "options": self.options,
            "fitted": bool(self.fitted),
            "target": target,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "StainNormalizer":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise InvalidArgumentError(f"`data` is not a saved normalizer: expected format {_FORMAT!r}, got {data.get('format') if isinstance(data, dict) else type(data).__name__!r}")
        norm = cls(
            data["method"],
            on_failure=data.get("on_failure", "reference"),
            clamp_concentrations=data.get("clamp_concentrations", True),
            max_scale=data.get("max_scale", 5.0),
            **data.get("options", {}),
        )
        t = data["target"]
        if norm.method == "reinhard":
            norm.target_mean.copy_(torch.tensor(t["mean"]))
            norm.target_std.copy_(torch.tensor(t["std"]))
            norm.fitted.fill_(bool(data.get("fitted", True)))
        else:
            norm.set_target(t["matrix"], t["max_concentrations"])
            norm.fitted.fill_(bool(data.get("fitted", True)))
        return norm

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Save as JSON (atomically)."""
        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "StainNormalizer":
        """Load a normalizer saved by :meth:`save`."""
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidArgumentError(f"`{p}` cannot be loaded: expected a JSON file written by StainNormalizer.save, got {exc}") from exc
        return cls.from_dict(data)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, on_failure={self.on_failure!r}, fitted={bool(self.fitted)}"
