"""Stain augmentation transforms: StainAugment, HEDJitter, StainTemplateSample, StainNormalize.

Each is a thin Kornia-compatible wrapper over a deterministic ``shiftkit.functional`` kernel; the random
parameters are per sample, drawn from the transform's own generator and replayable with ``params=``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch

from ..core.errors import InvalidArgumentError, UnknownNameError
from ..core.files import list_images, read_image
from ..core.image import to_batch
from ..core.ops import select
from ..core.rng import SeedLike
from ..functional.augment import COLOR_SPACES, hed_jitter, perturb_stains, rgb_to_space, transfer_statistics
from ..stain.estimate import EstimatorConfig, estimator_config, estimate_batch, estimate_stains_pooled
from ..functional.stain import lab_companded, lab_moments, reinhard_from_companded
from ..stain.mask import srgb_to_linear, tissue_mask
from ..stain.model import rgb_to_od, uint8_lookup, validate_stain_matrix
from ..stain.solve import od_to_concentrations
from ..stain.stats import masked_quantile, weighted_mean_std
from .base import ShiftkitAugmentation, check_range, register_transform
from .normalizer import StainNormalizer

#: Presets and where their numbers come from (REFERENCES A14.4).
STAIN_AUGMENT_PRESETS = {
    # StainTools/torchstain/stainlib use U(1 ± 0.2) and U(± 0.2) ("medium"); tiatoolbox uses α ± 0.4 ("strong").
    # Hue rotation has no literature default: 2° and 5° are shiftkit's choices, about the spread of H vectors
    # measured across the Camelyon17 centres (REFERENCES A17 / docs/normalization.md); "strong" reaches 15°, the
    # eosin-vector rotation of a real Aperio XT -> Hamamatsu 2.0-HT change (experiments/calibration/stain_angles.py;
    # 10° before severity tables v2).
    "light": {"alpha_range": (0.9, 1.1), "beta_range": (-0.05, 0.05), "angle_range": (0.0, 2.0)},
    "medium": {"alpha_range": (0.8, 1.2), "beta_range": (-0.2, 0.2), "angle_range": (0.0, 5.0)},
    "strong": {"alpha_range": (0.6, 1.4), "beta_range": (-0.2, 0.2), "angle_range": (0.0, 15.0)},
}
HED_PRESETS = {
    # Tellez et al. 2018: "light" θ = 0.05, "strong" θ = 0.2 (sigma = bias = θ); 0.1 in between (DIAG "Light").
    "light": {"alpha_range": (0.95, 1.05), "beta_range": (-0.05, 0.05)},
    "medium": {"alpha_range": (0.9, 1.1), "beta_range": (-0.1, 0.1)},
    "strong": {"alpha_range": (0.8, 1.2), "beta_range": (-0.2, 0.2)},
}
TEMPLATE_PRESETS = {
    # RandStainNA's std_hyper: -0.3 in its README ("light"), 0 by default ("medium"); 0.5 widens the draws.
    "light": {"std_hyper": -0.3},
    "medium": {"std_hyper": 0.0},
    "strong": {"std_hyper": 0.5},
}


def _read_folder(images: Any) -> Any:
    """``images`` as given, or the images of a folder (a path) as a list."""
    if not isinstance(images, (str, Path)):
        return images
    return [read_image(p) for p in list_images(images)]


def _check_background_od(value: float) -> float:
    if not (isinstance(value, (int, float)) and 0.0 <= float(value) <= 3.0):
        raise InvalidArgumentError(f"`background_od` out of range: expected a summed natural-log OD in [0, 3], got {value!r}")
    return float(value)


def _preset(presets: dict, name: Optional[str], arg: str = "preset") -> dict:
    if name is None:
        return {}
    if name not in presets:
        raise UnknownNameError(arg, name, presets)
    return presets[name]


_RANGE_BOUNDS = {"alpha_range": ((1.0, 1.0), 0.0, 10.0), "beta_range": ((0.0, 0.0), -5.0, 5.0), "angle_range": ((0.0, 0.0), 0.0, 45.0)}


#: The preset a range-drawing transform uses when it is built with no range and no preset: ``StainAugment()``
#: is medium stain augmentation, never an identity. (Serialized configs hold the resolved ranges, so configs
#: written before this default replay exactly as they were.)
DEFAULT_PRESET = "medium"


def _ranges(presets: dict, preset: Optional[str], **given) -> dict:
    """Validated ``*_range`` arguments: an explicit value, else the preset's, else the identity range. With no
    range given and no preset, the :data:`DEFAULT_PRESET`."""
    if preset is None and all(v is None for v in given.values()):
        preset = DEFAULT_PRESET
    chosen = _preset(presets, preset)
    out = {}
    for name, value in given.items():
        identity, lo, hi = _RANGE_BOUNDS[name]
        out[name] = check_range(name, value if value is not None else chosen.get(name, identity), lo, hi)
    return out


@register_transform
class StainAugment(ShiftkitAugmentation):
    """Beer–Lambert stain augmentation: per-stain concentration scale and shift, and stain-vector (hue) rotation.

    For each tile: its stain matrix is estimated (``method="macenko"``/``"vahadane"``, per tile, batched) or
    given (``method="fixed"`` with ``matrix``); concentrations ``C`` come from a non-negative solve; then
    ``C' = max(α·C + β, 0)`` per stain, each stain vector is rotated by an angle drawn from ``angle_range``
    (degrees) in a random direction, the OD residual is added back and the tile rebuilt. Background (non-tissue)
    pixels (summed OD below ``background_od``) are kept unless ``augment_background=True``.

    Args:
        method: ``"macenko"``, ``"vahadane"`` or ``"fixed"``.
        alpha_range: range of the per-stain scale α.
        beta_range: range of the per-stain shift β.
        beta_units: ``"absolute"`` (β in natural-log OD, as StainTools/tiatoolbox) or ``"relative"`` (β times the
            tile's 99th-percentile concentration of that stain, as torch-staintools).
        angle_range: range of the rotation of each stain vector, degrees (0 = no hue change).
        matrix: ``(2, 3)`` stain matrix for ``method="fixed"``.
        keep_residual: add back the OD the two stains do not explain (so α=1, β=0, angle 0 is the identity).
        augment_background: also change background pixels.
        background_od: background (glass) = pixels whose summed natural-log OD is below this (0.3 ≈ every
            channel brighter than 90 % of ``I0``); kept unchanged unless ``augment_background``.
        preset: ``"light"``, ``"medium"`` or ``"strong"`` (explicit ranges override it).
        p: probability per sample.
        same_on_batch: one draw for the whole batch.
        keepdim: keep a ``(3, H, W)`` input's rank.
        seed: an int seed or a ``torch.Generator`` (see :class:`ShiftkitAugmentation`).
        **options: stain-estimation options (:func:`shiftkit.estimate_stains`), e.g. ``i0``.

    Shape:
        ``(B, 3, H, W)`` or ``(3, H, W)`` float in ``[0, 1]``, output the same.

    Examples:
        >>> import torch
        >>> from shiftkit.data import load_sample_tiles
        >>> x = torch.from_numpy(load_sample_tiles()[:4]).permute(0, 3, 1, 2).float() / 255
        >>> aug = StainAugment(preset="medium", seed=0)
        >>> aug(x).shape
        torch.Size([4, 3, 224, 224])
    """

    def __init__(
        self,
        method: str = "macenko",
        alpha_range: Optional[Sequence[float]] = None,
        beta_range: Optional[Sequence[float]] = None,
        beta_units: str = "absolute",
        angle_range: Optional[Sequence[float]] = None,
        matrix: Optional[Any] = None,
        keep_residual: bool = True,
        augment_background: bool = False,
        background_od: float = 0.3,
        preset: Optional[str] = None,
        p: float = 1.0,
        same_on_batch: bool = False,
        keepdim: bool = False,
        seed: SeedLike = None,
        **options: Any,
    ):
        super().__init__(p=p, same_on_batch=same_on_batch, keepdim=keepdim, seed=seed)
        if method not in ("macenko", "vahadane", "fixed"):
            raise UnknownNameError("method", method, ("macenko", "vahadane", "fixed"))
        if beta_units not in ("absolute", "relative"):
            raise UnknownNameError("beta_units", beta_units, ("absolute", "relative"))
        r = _ranges(STAIN_AUGMENT_PRESETS, preset, alpha_range=alpha_range, beta_range=beta_range, angle_range=angle_range)
        self.alpha_range, self.beta_range, self.angle_range = r["alpha_range"], r["beta_range"], r["angle_range"]
        self.method = method
        self.beta_units = beta_units
        self.keep_residual = bool(keep_residual)
        self.augment_background = bool(augment_background)
        self.background_od = _check_background_od(background_od)
        self.est_config = estimator_config("vahadane" if method == "vahadane" else "macenko", dict(options))
        if method == "fixed":
            if matrix is None:
                raise InvalidArgumentError("`matrix` is missing: expected a (2, 3) stain matrix for method='fixed', got None")
            self.register_buffer("matrix", validate_stain_matrix(torch.as_tensor(matrix, dtype=torch.float32), "matrix"))
        elif matrix is not None:
            raise InvalidArgumentError(f"`matrix` is only used with method='fixed': expected None for method={method!r}, got a matrix")
        self._config.update(
            method=method, alpha_range=list(self.alpha_range), beta_range=list(self.beta_range), beta_units=beta_units,
            angle_range=list(self.angle_range), matrix=None if matrix is None else self.matrix.tolist(),
            keep_residual=self.keep_residual, augment_background=self.augment_background,
            background_od=self.background_od, **options,
        )

    @classmethod
    def from_images(cls, images: Any, estimator: str = "macenko", **kwargs: Any) -> "StainAugment":
        """A fixed-matrix ``StainAugment`` whose matrix is fitted once on ``images`` (pooled over their tissue).

        The stain matrix is estimated with :func:`shiftkit.stain.estimate_stains_pooled` (``estimator``
        ``"macenko"`` or ``"vahadane"``) from one image, a batch, or a list of images of any sizes, then used for
        every tile, as tiatoolbox's StainAugmentor does with its first image, but from the whole set and
        explicitly. ``images`` may also be a folder of images. ``kwargs`` are the other constructor arguments (``preset``, ranges, ``seed``, ``i0``, ...);
        ``i0`` and the tissue options also apply to the fit. The result serializes as ``method="fixed"`` with
        the fitted matrix.

        Raises:
            StainEstimationError: the pooled images give no usable estimate (too little tissue, degenerate).
        """
        if estimator not in ("macenko", "vahadane"):
            raise UnknownNameError("estimator", estimator, ("macenko", "vahadane"))
        for bad in ("method", "matrix"):
            if bad in kwargs:
                raise InvalidArgumentError(f"`{bad}` is set by from_images: expected it absent, got {bad}={kwargs[bad]!r}")
        fit_opts = {k: v for k, v in kwargs.items() if k in EstimatorConfig.__dataclass_fields__ and k != "seed"}
        est = estimate_stains_pooled(_read_folder(images), estimator, on_failure="raise", **fit_opts)
        return cls(method="fixed", matrix=est.matrix[0].float(), **kwargs)

    def sample(self, batch: int) -> Dict[str, torch.Tensor]:
        return {
            "alpha": self._u(self.alpha_range, (2,), batch),
            "beta": self._u(self.beta_range, (2,), batch),
            "angle": self._u(self.angle_range, (2,), batch),
            "azimuth": self._u((0.0, 2 * math.pi), (2,), batch),
        }

    _accepts_uint8 = True

    def apply_batch(self, x, params, uint8=None):
        cfg = self.est_config
        od = uint8_lookup(uint8, "od", cfg.i0) if uint8 is not None and x.dtype == torch.float32 else None
        if self.method == "fixed":
            mat = self.matrix.to(x).expand(x.shape[0], 2, 3)
            maxc = None
        else:
            est = estimate_batch(x, cfg, None, "report", uint8 if x.dtype == torch.float32 else None)
            mat, maxc = est.matrix, est.max_concentrations
        beta = params["beta"].to(x)
        if self.beta_units == "relative":
            if maxc is None:  # fixed matrix: the tile's robust maximum under the same tissue rule as the estimators
                conc = od_to_concentrations((rgb_to_od(x, i0=cfg.i0) if od is None else od).flatten(2), mat)
                w = cfg.tissue_weights(x).flatten(1)
                maxc = masked_quantile(conc, w[:, None].expand_as(conc), cfg.percentile / 100)
            beta = beta * maxc.to(x)
        return perturb_stains(
            x, mat, params["alpha"].to(x), beta, angle=params["angle"].to(x), azimuth=params["azimuth"].to(x),
            background_od=None if self.augment_background else self.background_od, i0=cfg.i0,
            keep_residual=self.keep_residual, od=od,
        )


@register_transform
class HEDJitter(ShiftkitAugmentation):
    """HED colour augmentation (Tellez et al. 2018) with per-sample α, β and clipping (no min-max rescaling).

    Colour deconvolution with Ruifrok & Johnston's H, E and DAB vectors; ``c' = α·c + β`` per channel; rebuilt
    and clipped. β is in natural-log OD units (scikit-image ≥ 0.19's ``rgb2hed`` divides these by ln 10⁶).

    Args:
        alpha_range: range of α for H and E (and DAB if ``jitter_dab``).
        beta_range: range of β for H and E (and DAB if ``jitter_dab``).
        jitter_dab: also jitter the DAB channel (off by default: H&E has no DAB).
        augment_background: also change non-tissue pixels (Tellez's original shifts glass too, tinting blank
            areas; off by default, as in :class:`StainAugment`).
        background_od: the background rule of :class:`StainAugment`.
        cutoff_range: DIAG-style tissue cutoff: tiles whose mean intensity (0–1) lies outside this range are
            returned unchanged (e.g. ``(0.05, 0.95)``); ``None`` augments every tile.
        preset: ``"light"`` (θ = 0.05), ``"medium"`` (0.1), ``"strong"`` (0.2).
        p: probability per sample.
        same_on_batch: one draw for the whole batch.
        keepdim: keep a ``(3, H, W)`` input's rank.
        seed: an int seed or a ``torch.Generator`` (see :class:`ShiftkitAugmentation`).
    """

    def __init__(
        self,
        alpha_range: Optional[Sequence[float]] = None,
        beta_range: Optional[Sequence[float]] = None,
        jitter_dab: bool = False,
        augment_background: bool = False,
        background_od: float = 0.3,
        cutoff_range: Optional[Sequence[float]] = None,
        preset: Optional[str] = None,
        p: float = 1.0,
        same_on_batch: bool = False,
        keepdim: bool = False,
        seed: SeedLike = None,
    ):
        super().__init__(p=p, same_on_batch=same_on_batch, keepdim=keepdim, seed=seed)
        r = _ranges(HED_PRESETS, preset, alpha_range=alpha_range, beta_range=beta_range)
        self.alpha_range, self.beta_range = r["alpha_range"], r["beta_range"]
        self.jitter_dab = bool(jitter_dab)
        self.augment_background = bool(augment_background)
        self.background_od = _check_background_od(background_od)
        self.cutoff_range = None if cutoff_range is None else check_range("cutoff_range", cutoff_range, 0.0, 1.0)
        self._config.update(alpha_range=list(self.alpha_range), beta_range=list(self.beta_range), jitter_dab=self.jitter_dab,
                            augment_background=self.augment_background, background_od=self.background_od,
                            cutoff_range=None if self.cutoff_range is None else list(self.cutoff_range))

    def sample(self, batch: int) -> Dict[str, torch.Tensor]:
        alpha = self._u(self.alpha_range, (3,), batch)
        beta = self._u(self.beta_range, (3,), batch)
        if not self.jitter_dab:
            alpha[:, 2] = 1.0
            beta[:, 2] = 0.0
        return {"alpha": alpha, "beta": beta}

    _accepts_uint8 = True

    def apply_batch(self, x, params, uint8=None):
        od = uint8_lookup(uint8, "od") if uint8 is not None and x.dtype == torch.float32 else None
        out = hed_jitter(x, params["alpha"].to(x), params["beta"].to(x),
                         background_od=None if self.augment_background else self.background_od, od=od)
        if self.cutoff_range is not None:
            m = x.mean(dim=(1, 2, 3))
            keep = (m < self.cutoff_range[0]) | (m > self.cutoff_range[1])
            out = select(keep[:, None, None, None], x, out)
        return out


def fit_stain_statistics(images: Any, color_space: str = "lab", *, luminosity_threshold: float = 0.8) -> dict:
    """Dataset statistics for :class:`StainTemplateSample` (RandStainNA, Shen et al. 2022).

    For each image, the tissue-masked per-channel mean and std in ``color_space`` (``"lab"``, ``"hsv"``,
    ``"hed"``); then the mean and the standard deviation of those over the images.

    Args:
        images: a batch, a list of images (any sizes) or a folder path.
        color_space: ``"lab"``, ``"hsv"`` or ``"hed"``.
        luminosity_threshold: tissue rule of :func:`~shiftkit.stain.tissue_mask` (L*/100 below it is tissue).

    Returns:
        ``{"color_space", "n_images", "mean": {"mean", "std"}, "std": {"mean", "std"}}`` (lists of 3 floats),
        JSON/YAML-serializable (:func:`save_stain_statistics`).
    """
    if color_space not in COLOR_SPACES:
        raise UnknownNameError("color_space", color_space, COLOR_SPACES)
    images = _read_folder(images)
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    means, stds = [], []
    for i, img in enumerate(items):
        x, _ = to_batch(img, f"images[{i}]")
        w = tissue_mask(x, luminosity_threshold=luminosity_threshold).flatten(1)
        w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
        m, s = weighted_mean_std(rgb_to_space(x.float(), color_space).flatten(2), w)
        means.append(m)
        stds.append(s)
    if not means:
        raise InvalidArgumentError("`images` is empty: expected at least one image, got 0")
    m = torch.cat(means)
    s = torch.cat(stds)
    sd = lambda t: t.std(0, unbiased=True) if t.shape[0] > 1 else torch.zeros(3)  # noqa: E731
    return {
        "color_space": color_space,
        "n_images": int(m.shape[0]),
        "mean": {"mean": m.mean(0).tolist(), "std": sd(m).tolist()},
        "std": {"mean": s.mean(0).tolist(), "std": sd(s).tolist()},
    }


def save_stain_statistics(stats: dict, path: Union[str, Path]) -> None:
    """Write statistics as JSON (``.json``) or YAML (``.yaml``/``.yml``)."""
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        p.write_text(yaml.safe_dump(stats, sort_keys=False))
    else:
        p.write_text(json.dumps(stats, indent=2))


def load_stain_statistics(path: Union[str, Path]) -> dict:
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(p.read_text())
    return json.loads(p.read_text())


@register_transform
class StainTemplateSample(ShiftkitAugmentation):
    """RandStainNA-style augmentation: transfer each tile to a randomly sampled stain template.

    Per sample, a target mean ``μ ~ N(mean.mean, mean.std·(1+std_hyper))`` and std
    ``σ ~ N(std.mean, std.std·(1+std_hyper))`` are drawn per channel (σ floored at ``min_std``, never negative),
    and the tile's tissue-masked statistics in ``color_space`` are moved to them.

    Args:
        statistics: output of :func:`fit_stain_statistics` (or a path to its JSON/YAML).
        std_hyper: widening (>0) or narrowing (<0) of the sampling spread.
        distribution: ``"normal"`` or ``"uniform"`` (± 3 spreads).
        min_std: floor of the sampled std (colour-space units).
        preset: ``"light"`` (std_hyper −0.3), ``"medium"`` (0), ``"strong"`` (0.5).
        p: probability per sample.
        same_on_batch: one draw for the whole batch.
        keepdim: keep a ``(3, H, W)`` input's rank.
        seed: an int seed or a ``torch.Generator`` (see :class:`ShiftkitAugmentation`).
    """

    def __init__(
        self,
        statistics: Union[dict, str, Path],
        std_hyper: Optional[float] = None,
        distribution: str = "normal",
        min_std: float = 1e-3,
        preset: Optional[str] = None,
        p: float = 1.0,
        same_on_batch: bool = False,
        keepdim: bool = False,
        seed: SeedLike = None,
    ):
        super().__init__(p=p, same_on_batch=same_on_batch, keepdim=keepdim, seed=seed)
        stats = load_stain_statistics(statistics) if isinstance(statistics, (str, Path)) else statistics
        try:
            space = stats["color_space"]
            vals = {k: torch.tensor(stats[a][b], dtype=torch.float32) for k, (a, b) in
                    {"mm": ("mean", "mean"), "ms": ("mean", "std"), "sm": ("std", "mean"), "ss": ("std", "std")}.items()}
        except (KeyError, TypeError) as exc:
            raise InvalidArgumentError(f"`statistics` is malformed: expected the output of fit_stain_statistics, got missing {exc}") from None
        if space not in COLOR_SPACES:
            raise UnknownNameError("statistics['color_space']", space, COLOR_SPACES)
        if any(v.shape != (3,) or not bool(torch.isfinite(v).all()) for v in vals.values()):
            raise InvalidArgumentError("`statistics` is malformed: expected 3 finite values per entry")
        if distribution not in ("normal", "uniform"):
            raise UnknownNameError("distribution", distribution, ("normal", "uniform"))
        sh = std_hyper if std_hyper is not None else _preset(TEMPLATE_PRESETS, preset).get("std_hyper", 0.0)
        if not (isinstance(sh, (int, float)) and -1.0 <= sh <= 10.0):
            raise InvalidArgumentError(f"`std_hyper` out of range: expected a number in [-1, 10], got {sh!r}")
        if not (isinstance(min_std, (int, float)) and min_std > 0):
            raise InvalidArgumentError(f"`min_std` out of range: expected a positive number, got {min_std!r}")
        self.color_space = space
        self.stats = vals
        self.std_hyper = float(sh)
        self.distribution = distribution
        self.min_std = float(min_std)
        self._config.update(statistics=stats, std_hyper=self.std_hyper, distribution=distribution, min_std=self.min_std)

    def _draw(self, center: torch.Tensor, spread: torch.Tensor, batch: int) -> torch.Tensor:
        rows = 1 if self.same_on_batch else batch
        if self.distribution == "normal":
            z = torch.randn(rows, 3, generator=self.generator)
        else:
            z = 6.0 * torch.rand(rows, 3, generator=self.generator) - 3.0
        out = center + z * spread * (1.0 + self.std_hyper)
        return out.expand(batch, 3).clone() if self.same_on_batch else out

    def sample(self, batch: int) -> Dict[str, torch.Tensor]:
        mean = self._draw(self.stats["mm"], self.stats["ms"], batch)
        std = self._draw(self.stats["sm"], self.stats["ss"], batch).clamp_min(self.min_std)
        return {"target_mean": mean, "target_std": std}

    _accepts_uint8 = True

    def apply_batch(self, x, params, uint8=None):
        tm, ts = params["target_mean"].to(x), params["target_std"].to(x)
        if self.color_space == "lab" and not (torch.is_grad_enabled() and x.requires_grad):
            # LAB through its companded values (shiftkit.functional.stain.lab_companded): no LAB image is formed
            lin = srgb_to_linear(x, uint8 if x.dtype == torch.float32 else None)
            w = tissue_mask(x, linear=lin).flatten(1)
            w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
            f = lab_companded(x, linear=lin)
            m, s = lab_moments(f, w, binary=True)
            flat = (s < 1e-3)  # a flat tile cannot be rescaled: keep it
            out = reinhard_from_companded(f, m, torch.where(flat, torch.ones_like(s), s), tm, ts, x.shape).to(x.dtype)
            return select(flat.any(-1)[:, None, None, None], x, out)
        w = tissue_mask(x).flatten(1)
        w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
        m, s = weighted_mean_std(rgb_to_space(x, self.color_space).flatten(2), w)
        flat = (s < 1e-3)  # a flat tile cannot be rescaled: keep it
        out = transfer_statistics(x, m, torch.where(flat, torch.ones_like(s), s), tm, ts, self.color_space)
        return select(flat.any(-1)[:, None, None, None], x, out)


@register_transform
class StainNormalize(ShiftkitAugmentation):
    """The :class:`~shiftkit.StainNormalizer` as a ``p = 1`` pipeline step (no randomness).

    Args:
        normalizer: a fitted :class:`~shiftkit.StainNormalizer`, its ``to_dict()``, or a path to its JSON.
        keepdim: keep a ``(3, H, W)`` input's rank.
    """

    def __init__(self, normalizer: Union[StainNormalizer, dict, str, Path], keepdim: bool = False):
        super().__init__(p=1.0, same_on_batch=False, keepdim=keepdim, seed=0)
        if isinstance(normalizer, (str, Path)):
            normalizer = StainNormalizer.load(normalizer)
        elif isinstance(normalizer, dict):
            normalizer = StainNormalizer.from_dict(normalizer)
        if not isinstance(normalizer, StainNormalizer):
            raise InvalidArgumentError(f"`normalizer` has the wrong type: expected a StainNormalizer, dict or path, got {type(normalizer).__name__}")
        self.normalizer = normalizer
        self._config = {"normalizer": normalizer.to_dict(), "keepdim": bool(keepdim)}

    _accepts_uint8 = True

    def apply_batch(self, x, params, uint8=None):
        return self.normalizer._normalize_chunk(x, uint8 if x.dtype == torch.float32 else None)[0]
