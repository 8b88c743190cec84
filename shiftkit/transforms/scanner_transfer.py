"""``ScannerTransfer``: a real scanner change learned from registered pairs (or, weaker, two unpaired sets).

See :mod:`shiftkit.functional.transfer` for the parts and docs/real_scanner_shift.md for how to fit your own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..core.errors import InvalidArgumentError, InvalidImageError, ShiftkitError
from ..core.image import to_batch
from ..core.rng import SeedLike
from ..functional import transfer as T
from ..functional.scanner import jpeg as jpeg_kernel
from .base import ShiftkitAugmentation, check_range, register_transform

PARTS = ("colour", "mtf", "noise", "jpeg")
PROFILE_FORMAT = "shiftkit-scanner-transfer/1"
#: The 8x8 blocks a colour map is fitted on: tissue (L* < 85) in the destination scan (the region the metric judges),
#: or tissue in either scan of the pair (not selected on the destination alone; see :meth:`ScannerTransfer.fit`).
FIT_REGIONS = ("destination", "either")
# caps on the relative MTF's gain, chosen by cross-validation (the geometric-mean sharpness closest to the twins'):
# 1.5 (3.5 dB) limits noise amplification most; 8 (18 dB) matches the sharper scan's fine detail where it is there
MTF_MAX_GAINS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
#: How the MTF part filters: one relative gain for every tile, or each tile towards the destination's spectrum.
MTF_MODES = ("relative", "matched")
#: Colour-map candidates compared by cross-validation: (input space, output space, degree per channel) over sRGB,
#: optical density and CIELAB; degree 1 is a 3x4 affine map (in sRGB to sRGB, the affine baseline). Ordered from
#: the cheapest to apply to the dearest (a CIELAB conversion costs about as much as the degree-3 map itself); an
#: exact tie goes to the cheaper.
COLOUR_CANDIDATES = tuple(sorted(((i, o, d) for i in T.SPACES for o in T.SPACES for d in (1, 2, 3)),
                                 key=lambda c: (T.SPACES.index(c[0]) + T.SPACES.index(c[1]), c[2])))


class ScannerTransferError(ShiftkitError, ValueError):
    """A transfer cannot be fitted from the data given (the message says why)."""


def _uint8_list(images: Any, arg: str) -> List[np.ndarray]:
    """Images of any contract format (a batch, or a sequence of single images of any sizes) as uint8 HWC arrays."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    out = []
    for i, img in enumerate(items):
        x, _ = to_batch(img, f"{arg}[{i}]")
        out.append((x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy())
    return out


def _float(img: np.ndarray) -> torch.Tensor:
    """One ``(H, W, 3)`` uint8 image as a ``(1, 3, H, W)`` float tensor in ``[0, 1]``."""
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255


def _u8(x: torch.Tensor) -> np.ndarray:
    """The inverse of :func:`_float` for a ``(1, 3, H, W)`` result in ``[0, 1]``."""
    return (x[0] * 255).round().byte().permute(1, 2, 0).numpy()


def _tissue(img: np.ndarray) -> np.ndarray:
    """The ``(H, W)`` tissue mask (0/1) of ``(H, W, 3)`` uint8."""
    from ..stain.mask import tissue_mask

    return tissue_mask(_float(img))[0, 0].numpy()


def _tissue_fraction(img: np.ndarray) -> float:
    return float(_tissue(img).mean())


def _tissue_weight(mask_a: np.ndarray, mask_b: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """Where both images of a pair are tissue (their :func:`_tissue` masks), as a smooth ``(H, W)`` weight in
    ``[0, 1]``: the common tissue mask, closed (gaps inside tissue filled) and eroded by ``2·sigma`` px, then blurred
    by a Gaussian of ``sigma`` px, so that the weight stays inside tissue (background noise, which the two scanners
    do not share, would otherwise leak into the high-frequency ratio) and the spectrum does not see the mask's edges.
    Where the eroded mask keeps under 5 % of the pixels, the mask itself is used; where that too is under 5 %, the
    whole image."""
    import cv2

    both = np.minimum(mask_a, mask_b).astype(np.float64)
    r = int(round(2 * sigma))
    kernel = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    eroded = cv2.erode(cv2.morphologyEx(both, cv2.MORPH_CLOSE, kernel), kernel)
    for w in (eroded, both):
        if w.mean() >= 0.05:
            return np.clip(cv2.GaussianBlur(w, (0, 0), sigma), 0.0, 1.0)
    return np.ones_like(both)


def _lab(x: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(np.clip(x, 0, 1))


def _delta_e(a: np.ndarray, b: np.ndarray, tissue: np.ndarray) -> float:
    """Mean CIEDE2000 over tissue blocks (the metric of shared/eval/score_pairs.py on block means)."""
    from skimage.color import deltaE_ciede2000

    if not tissue.any():
        return float("nan")
    return float(deltaE_ciede2000(_lab(a), _lab(b))[tissue].mean())


def _laplacian_var(img: np.ndarray) -> float:
    import cv2

    return float(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float64), cv2.CV_64F).var())


def _finite_mean(values: Sequence[float]) -> Optional[float]:
    """Mean of the finite values (a held-out pair without tissue blocks scores NaN), or None where there are none:
    a profile's figures are numbers or null, never NaN (which strict JSON parsers reject)."""
    finite = [float(v) for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _quadrants(img: np.ndarray) -> List[np.ndarray]:
    """The 2×2 spatial blocks of one pair's image, cut at multiples of 8 px (the 8×8 blocks and a JPEG grid keep
    their phase): the cross-validation groups of a fit on a single pair."""
    h, w = img.shape[:2]
    r, c = 8 * round(h / 16), 8 * round(w / 16)
    return [img[:r, :c], img[:r, c:], img[r:, :c], img[r:, c:]]


def _folds(groups: Sequence[Any], n: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Leave-one-group-out when there are several groups (slides, spatial blocks), else 5 folds of consecutive pairs
    (pairs listed in order usually run field by field: neighbouring, often overlapping crops stay in one fold
    instead of scoring each other, as interleaved folds let them)."""
    g = np.asarray([str(x) for x in groups]) if groups is not None else None
    if g is not None and len(set(g)) >= 2:
        return [(np.where(g != v)[0], np.where(g == v)[0]) for v in sorted(set(g))]
    k = min(5, n)
    idx = np.arange(n)
    return [(np.setdiff1d(idx, te), te) for te in np.array_split(idx, k)] if k >= 2 else []


@register_transform
class ScannerTransfer(ShiftkitAugmentation):
    """A learned scanner change as an augmentation: colour map → relative MTF → noise → JPEG. This is the order
    of the fit (the MTF is measured against the colour-mapped sources, so that the two together give scanner B's
    spectrum); it is an empirical whole-scanner difference, not the physical chain of :mod:`shiftkit.shifts`.

    ``ScannerTransfer()`` is the identity; :meth:`fit` learns one from registered pairs and :meth:`fit_unpaired`
    from two unpaired sets. Called on a float ``(B, 3, H, W)`` tensor in ``[0, 1]`` it returns the same shape,
    dtype and device, clamped to ``[0, 1]``; a per-sample ``strength`` drawn from ``strength_range`` interpolates
    from identity (0) to the full transfer (1). ``.augment()`` takes numpy uint8 tiles like every shiftkit
    augmentation. The reverse direction (B → A, normalization towards A) is ``ScannerTransfer.fit(dst, src)``.

    Args:
        profile: a fitted profile (the dict :meth:`fit` builds, or a path to its JSON); ``None`` is the identity.
        strength_range: range of the per-sample strength in ``[0, 1]``.
        mpp: µm per pixel of the tiles this transfer is applied to (default: the profile's); the MTF is rescaled
            to it, and a ratio to the fit's µm/px outside ``[0.5, 2]`` is refused.
        parts: apply only these of the profile's fitted parts (default: all), e.g. ``("colour", "mtf")`` for a
            deterministic normalization without the destination's noise and JPEG; a part the profile lacks is an
            error. :attr:`profile` is then the fitted profile restricted to them.
        p: probability per sample.
        same_on_batch: one draw for the whole batch.
        keepdim: keep a ``(3, H, W)`` input's rank.
        seed: an int seed or a ``torch.Generator`` (see :class:`~shiftkit.transforms.base.ShiftkitAugmentation`).
    """

    def __init__(self, profile: Union[None, dict, str, Path] = None, strength_range: Sequence[float] = (1.0, 1.0),
                 mpp: Optional[float] = None, p: float = 1.0, same_on_batch: bool = False, keepdim: bool = False,
                 seed: SeedLike = None, parts: Optional[Sequence[str]] = None):
        super().__init__(p=p, same_on_batch=same_on_batch, keepdim=keepdim, seed=seed)
        if isinstance(profile, (str, Path)):
            profile = self.read_profile(profile)
        self.profile = _check_profile(profile if profile is not None else {"format": PROFILE_FORMAT, "parts": []})
        if parts is not None:
            keep = _check_parts(list(parts) if not isinstance(parts, str) else [parts])
            missing = [q for q in keep if q not in self.profile["parts"]]
            if missing:
                raise InvalidArgumentError(f"`parts` is invalid: expected parts the profile has "
                                           f"({list(self.profile['parts'])}), got {missing} it lacks")
            self.profile = dict(self.profile, parts=[q for q in self.profile["parts"] if q in keep])
        self.strength_range = check_range("strength_range", strength_range, 0.0, 1.0)
        fit_mpp = self.profile.get("mtf", {}).get("mpp")
        self.mpp = float(mpp) if mpp is not None else fit_mpp
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            raise InvalidArgumentError(f"`mpp` is invalid: expected a positive number of µm per pixel, got {mpp!r}")
        gain, self._reference = None, None
        if "mtf" in self.profile["parts"]:
            mtf = self.profile["mtf"]
            gain = np.asarray(mtf["gain"], np.float64)
            if mtf.get("mode", "relative") == "matched":
                self._reference = np.asarray(mtf["reference_power"], np.float64)
            if fit_mpp is not None and self.mpp is not None and self.mpp != fit_mpp:
                ratio = self.mpp / fit_mpp
                if not 0.5 <= ratio <= 2.0:
                    raise InvalidArgumentError(f"`mpp` is too far from the fit's: expected within 0.5-2x of {fit_mpp} µm/px "
                                               f"(the MTF cannot be extrapolated further), got {self.mpp}")
                gain = T.resample_gain(gain, fit_mpp, self.mpp)
                if self._reference is not None:
                    self._reference = T.resample_power(self._reference, fit_mpp, self.mpp)
        self._gain = None if gain is None else torch.tensor(gain, dtype=torch.float32)
        self._weights = (torch.tensor(self.profile["colour"]["weights"], dtype=torch.float64)
                         if "colour" in self.profile["parts"] else None)
        self._domain, self._beyond = _colour_domain(self.profile)
        self._config.update(profile=self.profile, strength_range=list(self.strength_range), mpp=mpp)

    # ------------------------------------------------------------------ profile IO
    @staticmethod
    def read_profile(path: Union[str, Path]) -> dict:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidArgumentError(f"`profile` {p} cannot be read: expected a scanner-transfer JSON file, got "
                                       f"{type(exc).__name__}: {exc}") from None
        return data

    def save(self, path: Union[str, Path]) -> Path:
        """Write the profile as JSON (no pickle): parts, fitted values, the fit's data summary, µm/px, residuals."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(self.profile, indent=2))
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: Union[str, Path], **kwargs: Any) -> "ScannerTransfer":
        """A transfer from a JSON profile written by :meth:`save` (keyword arguments as for the constructor)."""
        return cls(cls.read_profile(path), **kwargs)

    @property
    def parts(self) -> List[str]:
        return list(self.profile["parts"])

    # ------------------------------------------------------------------ augmentation
    def sample(self, batch: int) -> Dict[str, torch.Tensor]:
        strength = self._u(self.strength_range, (), batch)
        seeds = torch.randint(0, 2 ** 31 - 1, (1 if self.same_on_batch else batch,), generator=self.generator)
        return {"strength": strength, "seed": seeds.expand(batch).clone()}

    _accepts_out = True

    def apply_batch(self, x: torch.Tensor, params: Dict[str, torch.Tensor],
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = params["strength"]
        y = x
        if self._weights is not None:  # in the order of the fit: the MTF was measured on colour-mapped sources
            c = self.profile["colour"]
            y = T.apply_colour_map(y, self._weights, c["space"], int(c["degree"]), s, _out_space(c), self._domain,
                                   self._beyond)
        if self._gain is not None:
            direct = out is not None and out.dtype == torch.float32 and self.profile["parts"][-1] == "mtf"
            gain = self._gain
            if self._reference is not None:  # matched: each tile's own gain towards the destination's spectrum
                gain = T.matched_gains(T.tissue_power(y), self._reference, float(self.profile["mtf"]["max_gain"]))
            y = T.mtf_filter(y, gain, s, out=out if direct else None)
        if "noise" in self.profile["parts"]:
            y = T.add_noise(y, float(self.profile["noise"]["sigma"]), s, params["seed"])
        if "jpeg" in self.profile["parts"]:
            q = 100.0 - s.to(torch.float32) * (100.0 - float(self.profile["jpeg"]["quality"]))
            y = jpeg_kernel(y, q)
        return y if y is x else y.clamp_(0.0, 1.0)  # every part returns a new tensor: clamped in place

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, src_images: Any, dst_images: Any, *, parts: Sequence[str] = PARTS, max_shift_px: float = 16.0,
            min_peak: float = 0.05, slides: Optional[Sequence[Any]] = None, mpp: Optional[float] = None,
            name: str = "", held_out: bool = False, source: str = "", ridge: float = 1e-3,
            jpeg_quality: Optional[float] = None, align: bool = False,
            colour_candidates: Sequence[Tuple[str, str, int]] = COLOUR_CANDIDATES, mtf_max_gain: Optional[float] = None,
            colour_losses: Sequence[str] = ("l2",), mtf_mode: str = "relative", background_weight: float = 0.0,
            fit_region: str = "destination", **kwargs: Any) -> "ScannerTransfer":
        """Learn the transfer that takes ``src_images`` (scanner A) to ``dst_images`` (scanner B) from registered
        pairs, pair by pair the same size.

        Each pair's offset is measured by phase correlation; pairs smaller than :data:`MIN_PAIR_SIDE` px a side,
        further apart than ``max_shift_px``, with a correlation peak under ``min_peak``, with almost no tissue, or
        whose stains are not H&E are refused (named
        and counted in ``profile["fit"]["refused"]``). The colour map (input space, output space and degree,
        :data:`COLOUR_CANDIDATES`) and the loss it is fitted with (``colour_losses``) are chosen by cross-validation
        over ``slides`` (leave one slide out; else 5 folds of consecutive pairs; a single pair: leave one of its 2×2
        spatial blocks out, every part fitted on the blocks; a single pair under 64 px a side is not cross-validated,
        the first candidate is used and the report says so), on the mean CIEDE2000 of 8×8 block means over
        tissue; a map whose cross-validated residual is not below identity's is an error. The map's input domain is
        recorded (``profile["colour"]["domain"]``: per channel of its input space, the 0.1 % and 99.9 % quantiles of
        the training tissue pixels) with the slope of the affine map fitted on the same pairs (``"beyond_slope"``):
        inside the domain the map is the polynomial, beyond it the polynomial at the domain's edge plus the affine
        slope times the excess — in the cross-validation too. Beyond the colours it was fitted on a cubic can turn
        round: fitted Hamamatsu -> Aperio on the MITOS dev pairs, 13 % of the tissue pixels of darker-stained
        colorectal tiles came out lighter when made darker; 0.00 % with the domain
        (experiments/scanner_transfer/domain_check.py). The fit records the share of its own training tissue pixels
        that come out more than 1 L* lighter when made 15 % darker (``profile["fit"]["colour"]["lighter_when_darker"]``;
        the fit report warns above 1 %).

        Args:
            src_images: images of scanner A (a batch, or a sequence of images of any sizes).
            dst_images: the same fields on scanner B, in the same order.
            parts: the parts to fit, of ``("colour", "mtf", "noise", "jpeg")``.
            max_shift_px: largest accepted misregistration, in pixels.
            min_peak: smallest accepted phase-correlation peak.
            slides: optional slide id per pair (cross-validation groups). Give them where you can: without them the
                folds are 5 runs of consecutive pairs, so list the pairs field by field.
            mpp: µm per pixel of the pairs (recorded; the MTF is rescaled when applied at another resolution).
            name: the profile's name.
            held_out: flag the profile as held-out (evaluation only; never a training view).
            source: where the pairs come from (recorded in the profile).
            ridge: ridge penalty of the colour fit.
            fit_region: the 8x8 blocks the colour map is fitted on (:data:`FIT_REGIONS`). ``"destination"``
                (default): tissue (L* < 85) in the destination, the region the metric judges. This selects blocks on
                the outcome: misregistration keeps light source blocks whose twin is tissue and drops tissue whose
                twin is light, so light colours are taught to become tissue (glass went pink). ``"either"``: blocks
                that are tissue in either scan of the pair. Cross-validation scores the destination's tissue either
                way. On the MITOS dev pairs (leave one slide out, default parts) ``"either"`` scored 0.04 CIEDE2000
                below ``"destination"`` Aperio -> Hamamatsu (95 % CI -0.05 to -0.03) and 0.09 below back (-0.26 to
                +0.08), light blocks 16.9 / 9.8 against 17.2 / 14.4 — but its Hamamatsu -> Aperio cubic is less
                lightness-monotone off the MITOS colours (0.23 % of Kather 2016 and 1.3 % of pen/IHC edge-case
                tissue pixels lighter when darker, against 0.00 % / 0.04 %), so it is an option
                (experiments/scanner_transfer/fit_region.py).
            background_weight: weight of the blocks outside ``fit_region`` (glass, light gaps: L* >= 85 in the
                destination, and in the source too for ``"either"``) in the colour fit, against 1 for tissue;
                cross-validation still scores tissue only. 0 (default): tissue only — light background is then
                extrapolated, and on the MITOS dev pairs (leave one slide out) the paired light blocks came out further from their twins than unchanged (CIEDE2000 17.1 Aperio ->
                Hamamatsu, 14.5 back, against 4.9). 1 brought them to 11.8 / 7.3 at a tissue cost of +0.28 Aperio ->
                Hamamatsu and a gain of 0.19 back (experiments/scanner_transfer/background_check.py). Raise it where
                background matters (simulated tiles with glass) and check your own pairs.
            colour_candidates: the ``(input space, output space, degree)`` maps to cross-validate, cheapest first
                (default :data:`COLOUR_CANDIDATES`). Leave out CIELAB (``"lab"``) for the fastest application: a
                CIELAB conversion costs about as much as a degree-3 map in sRGB (figures in docs/benchmarks.md).
            colour_losses: the losses each candidate is fitted with and cross-validated under, of
                :data:`shiftkit.functional.transfer.LOSSES`: ``"l2"`` (least squares, the default) and ``"l1"``
                (least Euclidean residual lengths, robust to blocks that misregistration or an artefact leaves far
                off; see :func:`shiftkit.functional.transfer.fit_colour_map`); both: chosen by cross-validation,
                equal scores to ``"l2"``. On the MITOS dev pairs (leave one slide out, CIEDE2000 against the affine
                baseline) ``"l1"`` helped Hamamatsu -> Aperio (-0.92 against -0.70) and hurt Aperio -> Hamamatsu
                (-0.24 against -0.43), and cross-validating both on two training slides did worse than either in one
                direction (-0.62, -0.39): few slides cannot tell the losses apart, so least squares stays the
                default (docs/real_scanner_shift.md).
            mtf_max_gain: cap on the relative MTF's gain (at least 1). By default it is chosen by cross-validation
                among :data:`MTF_MAX_GAINS`: the cap whose held-out outputs come closest to the twins' sharpness
                (geometric mean of Laplacian-variance ratios). A higher cap sharpens more, and amplifies noise more,
                towards a sharper scanner; towards a blurrier one the cap does not bind.
            mtf_mode: ``"relative"`` (default): one gain, the scanners' ratio of tissue spectra on the pairs, for
                every tile. ``"matched"``: each tile is filtered towards the destination's own tissue spectrum
                (:func:`~shiftkit.functional.transfer.tissue_power`, geometric mean over the destination tiles),
                by a gain measured on that tile when it is transformed, shaped and capped like the relative one.
                Choose it when the source scanner's sharpness varies from slide to slide (focus) and the
                destination's does not: on the MITOS dev pairs, Hamamatsu -> Aperio, leave one slide out, the
                relative gain gave 2.95 / 0.64 / 0.60 of the twins' sharpness on slides 03 / 04 / 05 and the matched
                one 1.22 / 1.30 / 0.85, at 0.02 less CIEDE2000; Aperio -> Hamamatsu, whose destination's focus
                varies, 0.60 / 1.34 / 1.04 and 0.61 / 1.52 / 0.90 (experiments/scanner_transfer/mtf_modes.py). The
                gain's cap is the one cross-validated for the relative gain. It costs a spectrum and a monotone fit
                per tile when applied (speed in docs/benchmarks.md).
            jpeg_quality: quality of the destination's JPEG compression when known (JPEG cannot be measured from
                decoded pixels reliably; without it the part is reported as not fitted).
            align: fit the colour map on each pair's overlap at its measured offset. Off by default: on the real
                MITOS dev pairs (leave one slide out) fitting on the pairs as registered scored 6.44 against 6.92
                CIEDE2000 aligned, because the judging metric compares block means of twins misregistered by a few
                pixels, which a map fitted on equally misregistered blocks predicts better. Turn it on for the
                physically exact map when your evaluation is pixel-aligned.
            kwargs: constructor arguments of the returned transform (``strength_range``, ``p``, ``seed``, ...).

        Returns:
            A fitted :class:`ScannerTransfer`.

        Raises:
            ScannerTransferError: no usable pair, or a fit no better than identity.
            InvalidArgumentError: an argument out of its range (named), or pairs that do not pair.
            InvalidImageError: an image off the image contract, or a pair of two sizes.
        """
        parts = _check_parts(parts)
        colour_candidates = _check_candidates(colour_candidates)
        colour_losses = _check_losses(colour_losses)
        _check_max_gain(mtf_max_gain)
        _check_mtf_mode(mtf_mode)
        if fit_region not in FIT_REGIONS:
            raise InvalidArgumentError(f"`fit_region` is invalid: expected one of {FIT_REGIONS}, got {fit_region!r}")
        if not (isinstance(background_weight, (int, float)) and math.isfinite(background_weight)
                and background_weight >= 0):
            raise InvalidArgumentError(f"`background_weight` is invalid: expected a finite number >= 0, got "
                                       f"{background_weight!r}")
        for arg, value, lo, hi in (("max_shift_px", max_shift_px, 0.0, math.inf), ("min_peak", min_peak, 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi \
                    or math.isnan(value):
                raise InvalidArgumentError(f"`{arg}` is invalid: expected a number in [{lo:g}, {hi:g}], got {value!r}")
        src, dst = _uint8_list(src_images, "src_images"), _uint8_list(dst_images, "dst_images")
        if len(src) != len(dst):
            raise InvalidArgumentError(f"`dst_images` does not pair with `src_images`: expected {len(src)} images, got {len(dst)}")
        if slides is not None and len(slides) != len(src):
            raise InvalidArgumentError(f"`slides` has the wrong length: expected one id per pair ({len(src)}), got {len(slides)}")
        for i, (a, b) in enumerate(zip(src, dst)):
            if a.shape != b.shape:
                raise InvalidImageError(f"pair {i} has two sizes: expected the same size for a registered pair, got "
                                        f"{a.shape[:2]} and {b.shape[:2]} (crop both to their common size first)")
        used, refused, offsets = _screen_pairs(src, dst, max_shift_px, min_peak)
        if not used:
            raise ScannerTransferError(f"no usable pair: expected registered H&E pairs with tissue, got {len(src)} pairs, all "
                                       f"refused ({_reasons(refused)})")
        groups = [slides[i] for i in used] if slides is not None else None
        s_used, d_used = [src[i] for i in used], [dst[i] for i in used]
        profile = {"format": PROFILE_FORMAT, "version": 1, "name": name, "held_out": bool(held_out), "parts": [],
                   "fit": {"paired": True, "pairs": len(src), "used": len(used), "refused": refused, "source": source,
                           "mpp": mpp, "offsets_px": offsets, "slides": sorted({str(g) for g in groups}) if groups else None,
                           "sizes": sorted({f"{a.shape[1]}x{a.shape[0]}" for a in s_used})}}
        if align:  # the colour map is fitted on the overlap of each pair at its measured offset
            s_col, d_col = (list(v) for v in zip(*[_aligned(src[i], dst[i], offsets[i]) for i in used]))
        else:
            s_col, d_col = s_used, d_used
        profile["fit"]["cv"] = "slides" if groups is not None and len(set(map(str, groups))) >= 2 else "consecutive pairs"
        if len(used) == 1:  # one pair: cross-validate over its 2x2 spatial blocks (leave one block out)
            if min(min(x.shape[:2]) for x in (s_used[0], s_col[0])) >= 2 * MIN_PAIR_SIDE:
                s_used, d_used = _quadrants(s_used[0]), _quadrants(d_used[0])
                s_col, d_col = _quadrants(s_col[0]), _quadrants(d_col[0])
                groups = [f"block {k}" for k in range(4)]
                profile["fit"]["cv"] = "2x2 spatial blocks of the one pair"
            else:
                profile["fit"]["cv"] = "none: one pair too small to split"
        if "colour" in parts:
            profile["colour"], profile["fit"]["colour"] = _fit_colour(list(s_col), list(d_col), groups, ridge,
                                                                      colour_candidates, colour_losses,
                                                                      float(background_weight), fit_region)
            profile["fit"]["colour"]["aligned"] = bool(align)
            profile["parts"].append("colour")
        if "mtf" in parts:
            # measured against the colour-mapped sources: the colour map changes contrast too, and the two together
            # must give the destination's spectrum
            mapped = s_used
            if "colour" in profile["parts"]:
                c = profile["colour"]
                w = torch.tensor(c["weights"], dtype=torch.float64)
                dom, beyond = _colour_domain(profile)
                mapped = [_u8(T.apply_colour_map(_float(x), w, c["space"], int(c["degree"]), torch.ones(1), _out_space(c),
                                                 dom, beyond)) for x in s_used]
            mtf, report = _fit_mtf(mapped, d_used, groups, mpp, raw=s_used, max_gain=mtf_max_gain, mode=mtf_mode)
            profile["fit"]["mtf"] = report
            if mtf is not None:
                profile["mtf"] = mtf
                profile["parts"].append("mtf")
        if "noise" in parts:
            sigma, report = _fit_noise(s_used, d_used)
            profile["fit"]["noise"] = report
            if sigma > 0:
                profile["noise"] = {"sigma": sigma}
                profile["parts"].append("noise")
        if "jpeg" in parts:
            profile["fit"]["jpeg"] = {"blockiness_src": float(np.median([T.blockiness(a) for a in s_used])),
                                      "blockiness_dst": float(np.median([T.blockiness(b) for b in d_used])),
                                      "quality": jpeg_quality}
            if jpeg_quality is not None:
                profile["jpeg"] = {"quality": float(check_range("jpeg_quality", (jpeg_quality, jpeg_quality), 1, 100)[0])}
                profile["parts"].append("jpeg")
        profile["parts"] = [p for p in PARTS if p in profile["parts"]]
        return cls(profile, mpp=mpp, **kwargs)

    @classmethod
    def fit_unpaired(cls, src_images: Any, dst_images: Any, *, parts: Sequence[str] = ("colour", "mtf", "noise"),
                     mpp: Optional[float] = None, name: str = "", held_out: bool = False, source: str = "",
                     mtf_max_gain: Optional[float] = None, mtf_mode: str = "relative", colour_space: str = "od",
                     **kwargs: Any) -> "ScannerTransfer":
        """The weaker option: a transfer from two *unpaired* sets of similar tissue (stain and sharpness statistics
        only). The colour map is the affine map that moves the source's tissue colour mean and covariance onto the
        destination's (a Monge map between Gaussians) in optical density by default — where Beer–Lambert makes a
        stain change linear; leave one slide out on the MITOS dev pairs it is 0.58 ΔE2000 closer to the twins than
        the same map in sRGB Aperio → Hamamatsu and 0.09 Hamamatsu → Aperio
        (``experiments/scanner_transfer/unpaired_space.py``); the MTF is the ratio of the sets' mean power
        spectra, its gain capped where the filtered source set's sharpness (geometric mean of Laplacian variances)
        comes closest to the destination set's (in-sample: there are no pairs to hold out); noise as in :meth:`fit`.
        Images smaller than :data:`MIN_PAIR_SIDE` px a side, with almost no tissue, or whose stains are not H&E are
        left out, named and counted in ``profile["fit"]["refused"]``; a set with none left is an error.

        Args:
            src_images: images of scanner A.
            dst_images: images of similar tissue on scanner B (any number, not the same fields).
            parts: the parts to fit, of ``("colour", "mtf", "noise")``.
            mpp: µm per pixel of both sets.
            name: the profile's name.
            held_out: flag the profile as held-out.
            source: where the images come from.
            mtf_max_gain: cap on the MTF's gain (default: chosen among :data:`MTF_MAX_GAINS` as above).
            mtf_mode: ``"relative"`` (the ratio of the sets' spectra) or ``"matched"`` (each tile towards the
                destination set's tissue spectrum, with the cap above; see :meth:`fit`).
            colour_space: the space of the colour map, one of ``("srgb", "od", "lab")`` (profiles fitted before this
                option have ``"srgb"`` and load unchanged).
            kwargs: constructor arguments of the returned transform.

        Returns:
            A fitted :class:`ScannerTransfer`.
        """
        parts = _check_parts(parts)
        _check_max_gain(mtf_max_gain)
        _check_mtf_mode(mtf_mode)
        if colour_space not in T.SPACES:
            raise InvalidArgumentError(f"`colour_space` is invalid: expected one of {T.SPACES}, got {colour_space!r}")
        if "jpeg" in parts:
            raise InvalidArgumentError("`parts` includes 'jpeg': expected colour, mtf or noise for an unpaired fit, got jpeg")
        src, dst = _uint8_list(src_images, "src_images"), _uint8_list(dst_images, "dst_images")
        refused = []
        for arg, images in (("src_images", src), ("dst_images", dst)):
            if not images:
                raise InvalidArgumentError(f"`{arg}` is empty: expected at least one image of tissue")
            bad = _screen_images(images)
            refused += [{"set": arg[:3], "image": i, "reason": r} for i, r in bad]
            if len(bad) == len(images):
                raise ScannerTransferError(f"no usable image in `{arg}`: expected H&E images with tissue, got "
                                           f"{len(images)}, all refused ({_reasons([{'reason': r} for _, r in bad])})")
        n_src, n_dst = len(src), len(dst)
        skip = {(r["set"], r["image"]) for r in refused}
        src = [x for i, x in enumerate(src) if ("src", i) not in skip]
        dst = [x for i, x in enumerate(dst) if ("dst", i) not in skip]
        profile = {"format": PROFILE_FORMAT, "version": 1, "name": name, "held_out": bool(held_out), "parts": [],
                   "fit": {"paired": False, "src_images": n_src, "dst_images": n_dst, "used": [len(src), len(dst)],
                           "refused": refused, "source": source, "mpp": mpp}}
        if "colour" in parts:
            a = np.concatenate([T.block_means(x).reshape(-1, 3) for x in src])
            b = np.concatenate([T.block_means(x).reshape(-1, 3) for x in dst])
            ta, tb = _lab(a[None])[0, :, 0] < 85, _lab(b[None])[0, :, 0] < 85
            if ta.sum() < 16 or tb.sum() < 16:
                raise ScannerTransferError("too little tissue: expected tissue blocks (L* < 85) in both sets, got "
                                           f"{int(ta.sum())} and {int(tb.sum())}")
            profile["colour"] = _gaussian_map(a[ta], b[tb], colour_space)
            profile["fit"]["colour"] = _unpaired_colour_report(a[ta], b[tb], profile["colour"])
            profile["parts"].append("colour")
        if "mtf" in parts:
            ps = np.mean([T.radial_power(x) for x in src], axis=0)
            pd = np.mean([T.radial_power(x) for x in dst], axis=0)
            caps = MTF_MAX_GAINS if mtf_max_gain is None else (float(mtf_max_gain),)
            target = _geomean([_laplacian_var(x) for x in dst])  # the destination set's sharpness
            gains = {cap: T.relative_mtf([ps], [pd], max_gain=cap) for cap in caps}
            ratios: Dict[float, List[float]] = {cap: [] for cap in caps}
            for a in src:  # one image at a time: the sets may mix sizes
                x = _float(a)
                for cap, g in gains.items():
                    y = _u8(T.mtf_filter(x, torch.tensor(g, dtype=torch.float32), torch.ones(1)))
                    ratios[cap].append(_laplacian_var(y) / max(target, 1e-9))
            cap = _closest_cap(ratios)
            profile["mtf"] = {"gain": gains[cap].tolist(), "mpp": mpp}
            if mtf_mode == "matched":
                profile["mtf"].update(mode="matched", max_gain=cap, reference_power=_reference_power(dst).tolist())
            profile["fit"]["mtf"] = {"fitted": True, "unpaired": True, "mode": mtf_mode, "max_gain": cap,
                                     "max_gain_chosen_by_cv": False,
                                     "sharpness_ratio_geomean_by_max_gain": {str(c): _geomean(r) for c, r in ratios.items()}}
            profile["parts"].append("mtf")
        if "noise" in parts:
            sigma = max(0.0, float(np.median([T.noise_sigma(x) for x in dst]) - np.median([T.noise_sigma(x) for x in src])))
            profile["fit"]["noise"] = {"sigma": sigma}
            if sigma > 1e-3:
                profile["noise"] = {"sigma": sigma}
                profile["parts"].append("noise")
        profile["parts"] = [p for p in PARTS if p in profile["parts"]]
        return cls(profile, mpp=mpp, **kwargs)


# ---------------------------------------------------------------------------------------------- helpers
def _out_space(colour: dict) -> str:
    """A colour part's output space; profiles written before output spaces existed map within ``space``."""
    return colour.get("out_space", colour.get("space"))


def _check_candidates(candidates: Any) -> Tuple[Tuple[str, str, int], ...]:
    try:
        out = tuple((str(i), str(o), int(d)) for i, o, d in candidates)
    except (TypeError, ValueError):
        out = ()
    if not out or any(i not in T.SPACES or o not in T.SPACES or not 1 <= d <= 5 for i, o, d in out):
        raise InvalidArgumentError(f"`colour_candidates` is invalid: expected (space, out_space, degree) triples with "
                                   f"spaces in {T.SPACES} and degree 1-5, got {candidates!r}")
    return out


def _check_mtf_mode(mode: Any) -> None:
    if mode not in MTF_MODES:
        raise InvalidArgumentError(f"`mtf_mode` is invalid: expected one of {MTF_MODES}, got {mode!r}")


def _check_losses(losses: Any) -> Tuple[str, ...]:
    out = tuple(losses) if isinstance(losses, (list, tuple)) else ()
    if not out or any(v not in T.LOSSES for v in out):
        raise InvalidArgumentError(f"`colour_losses` is invalid: expected a non-empty subset of {T.LOSSES}, got {losses!r}")
    return tuple(v for v in T.LOSSES if v in out)  # least squares first: equal scores go to it


def _check_parts(parts: Sequence[str]) -> Tuple[str, ...]:
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise InvalidArgumentError(f"`parts` is invalid: expected a non-empty subset of {PARTS}, got {list(parts)}")
    return tuple(parts)


def _check_profile(profile: Any) -> dict:
    if not isinstance(profile, dict) or profile.get("format") != PROFILE_FORMAT:
        got = profile.get("format") if isinstance(profile, dict) else type(profile).__name__
        raise InvalidArgumentError(f"`profile` is not a scanner-transfer profile: expected format {PROFILE_FORMAT!r}, got {got!r}")
    parts = profile.get("parts", [])
    for p in parts:
        if p not in PARTS or p not in profile:
            raise InvalidArgumentError(f"`profile` part {p!r} is missing or unknown: expected its values for parts {PARTS}")
    if "colour" in parts:
        c = profile["colour"]
        w = np.asarray(c.get("weights"), np.float64)
        if (c.get("space") not in T.SPACES or _out_space(c) not in T.SPACES
                or w.shape != (1 + 3 * int(c.get("degree", 0)), 3) or not np.isfinite(w).all()):
            raise InvalidArgumentError(f"`profile` colour part is invalid: expected space and out_space in {T.SPACES}, "
                                       "degree and a finite (1+3·degree, 3) weight table")
        if c.get("domain") is not None:
            d = np.asarray(c["domain"], np.float64)
            if d.shape != (2, 3) or not np.isfinite(d).all() or (d[0] > d[1]).any():
                raise InvalidArgumentError(f"`profile` colour domain is invalid: expected [[low x3], [high x3]] in the "
                                           f"map's input space with low <= high, got {c['domain']!r}")
        if c.get("beyond_slope") is not None:
            d = np.asarray(c["beyond_slope"], np.float64)
            if d.shape != (3, 3) or not np.isfinite(d).all() or c.get("domain") is None:
                raise InvalidArgumentError(f"`profile` colour beyond_slope is invalid: expected a finite 3x3 slope (rows: "
                                           f"input channels) beside a domain, got {c['beyond_slope']!r}")
    if "mtf" in parts:
        g = np.asarray(profile["mtf"].get("gain"), np.float64)
        if g.ndim != 1 or len(g) < 2 or not np.isfinite(g).all() or (g < 0).any():
            raise InvalidArgumentError("`profile` mtf part is invalid: expected a finite non-negative radial gain")
        mode = profile["mtf"].get("mode", "relative")
        if mode not in MTF_MODES:
            raise InvalidArgumentError(f"`profile` mtf mode is invalid: expected one of {MTF_MODES}, got {mode!r}")
        if mode == "matched":
            ref = np.asarray(profile["mtf"].get("reference_power"), np.float64)
            cap = profile["mtf"].get("max_gain")
            if (ref.shape != g.shape or not np.isfinite(ref).all() or (ref <= 0).any()
                    or not isinstance(cap, (int, float)) or not cap >= 1):
                raise InvalidArgumentError("`profile` matched mtf is invalid: expected a positive reference_power "
                                           "as long as the gain and a max_gain of at least 1")
    return profile


def _reasons(refused: List[dict]) -> str:
    counts: Dict[str, int] = {}
    for r in refused:
        key = r["reason"].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items())


#: The smallest side of a pair :meth:`ScannerTransfer.fit` uses (colour is fitted on 8x8 block means, the MTF on spectra).
MIN_PAIR_SIDE = 32


#: Least tissue fraction of an image (of both images of a pair) a fit uses.
MIN_TISSUE = 0.05
_BACKGROUND_ONLY = f"background only: less than {100 * MIN_TISSUE:g} % tissue"
_NOT_HE = "not H&E: the stain estimate is degenerate (IHC, ink or no stain)"


def _too_small(image: np.ndarray) -> str:
    return (f"too small: {image.shape[1]}x{image.shape[0]} px, expected at least {MIN_PAIR_SIDE} px a side (8x8 blocks "
            "and a spectrum)")


def _not_he(*images: np.ndarray) -> bool:
    """Whether the stain estimate of any of ``images`` (of one size) is degenerate: IHC, ink or no stain."""
    from ..stain import estimate_stains

    return any(s == "degenerate" for s in estimate_stains(np.stack(images), "macenko").status)


def _screen_images(images) -> List[Tuple[int, str]]:
    """``(index, reason)`` of the images an unpaired fit cannot use: the checks of :func:`_screen_pairs` that need
    no twin."""
    bad = []
    for i, x in enumerate(images):
        if min(x.shape[:2]) < MIN_PAIR_SIDE:
            bad.append((i, _too_small(x)))
        elif _tissue_fraction(x) < MIN_TISSUE:
            bad.append((i, _BACKGROUND_ONLY))
        elif _not_he(x):
            bad.append((i, _NOT_HE))
    return bad


def _screen_pairs(src, dst, max_shift_px, min_peak):
    used, refused, offsets = [], [], []
    for i, (a, b) in enumerate(zip(src, dst)):
        dx, dy, peak = T.pair_offset(a, b)
        offsets.append([round(dx, 2), round(dy, 2), round(peak, 3)])
        shift = math.hypot(dx, dy)
        if min(a.shape[:2]) < MIN_PAIR_SIDE:
            refused.append({"pair": i, "reason": _too_small(a)})
        elif min(_tissue_fraction(a), _tissue_fraction(b)) < MIN_TISSUE:
            refused.append({"pair": i, "reason": _BACKGROUND_ONLY})
        elif shift > max_shift_px:
            refused.append({"pair": i, "reason": f"misregistered: offset {shift:.1f} px > max_shift_px {max_shift_px}"})
        elif peak < min_peak:
            refused.append({"pair": i, "reason": f"not the same field: phase-correlation peak {peak:.3f} < {min_peak}"})
        elif _not_he(a, b):
            refused.append({"pair": i, "reason": _NOT_HE})
        else:
            used.append(i)
    return used, refused, offsets


def _aligned(a: np.ndarray, b: np.ndarray, offset) -> Tuple[np.ndarray, np.ndarray]:
    """The overlap of a pair at its integer offset: ``b[p + d] ≈ a[p]``."""
    dx, dy = int(round(offset[0])), int(round(offset[1]))
    h, w = a.shape[:2]
    y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
    return a[y0:y1, x0:x1], b[y0 + dy:y1 + dy, x0 + dx:x1 + dx]


def _candidate_name(space: str, out_space: str, degree: int, loss: str) -> str:
    return f"{space}-{out_space}-{degree}" + ("" if loss == "l2" else f"-{loss}")


def _colour_domain(profile: dict) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The colour part's input domain ``(2, 3)`` and its slope beyond it ``(3, 3)`` (absent in profiles written
    before they were recorded: the polynomial everywhere)."""
    c = profile.get("colour") if "colour" in profile.get("parts", []) else None
    get = lambda k: None if c is None or c.get(k) is None else torch.tensor(c[k], dtype=torch.float64)  # noqa: E731
    return get("domain"), get("beyond_slope")


#: Source pixels per pair that go into a colour map's input domain (a deterministic strided sample of its tissue).
DOMAIN_SAMPLE = 4096


def _tissue_pixels(image: np.ndarray, tissue_blocks: np.ndarray, block: int = 8) -> np.ndarray:
    """``(N, 3)`` floats in ``[0, 1]``: a strided sample (at most :data:`DOMAIN_SAMPLE`) of ``image``'s pixels inside the
    ``block × block`` blocks marked in ``tissue_blocks`` (the blocks the colour map is fitted on)."""
    mask = np.repeat(np.repeat(tissue_blocks, block, axis=0), block, axis=1)
    px = image[:mask.shape[0], :mask.shape[1]][mask]
    return px[::max(1, -(-len(px) // DOMAIN_SAMPLE))].astype(np.float64) / 255.0


#: The lightness check of a fitted colour map: a colour made darker by this factor on its optical density (15 % more
#: stain in every channel) should not come out lighter (see :func:`_lighter_when_darker`).
DARKER = 1.15


def _map_pixels(pixels: np.ndarray, colour: dict, dom=None, beyond=None) -> np.ndarray:
    """A profile's colour part applied to ``(N, 3)`` colours in ``[0, 1]`` (float64, as one ``(1, 3, N, 1)`` image):
    ``(N, 3)`` in ``[0, 1]``."""
    img = torch.from_numpy(np.ascontiguousarray(pixels.T, dtype=np.float64)).reshape(1, 3, -1, 1)
    out = T.apply_colour_map(img, torch.tensor(colour["weights"], dtype=torch.float64), colour["space"],
                             int(colour["degree"]), torch.ones(1, dtype=torch.float64), _out_space(colour), dom, beyond)
    return out[0, :, :, 0].T.numpy()


def _lighter_when_darker(pixels: np.ndarray, colour: dict, dom, beyond) -> float:
    """The share of ``pixels`` ``(N, 3)`` in ``[0, 1]`` (the training tissue's; those with L* < 85) whose mapped colour
    comes out more than 1 L* *lighter* when the pixel's optical density is multiplied by :data:`DARKER`: 0 for a map
    that keeps lightness order; a map that folds (darker in, lighter out) shows here."""
    lab = _lab(pixels[:, None])[:, 0]
    x = np.clip(pixels[lab[:, 0] < 85], 1.0 / 255.0, 1.0)
    if not len(x):
        return 0.0
    lightness = lambda v: _lab(_map_pixels(v, colour, dom, beyond)[:, None])[:, 0, 0]  # noqa: E731
    return float(np.mean(lightness(np.exp(np.log(x) * DARKER)) - lightness(x) > 1.0))


def _fit_colour(src, dst, groups, ridge, candidates=COLOUR_CANDIDATES, losses=("l2",), background_weight=0.0,
                region="destination"):
    sb, db = [T.block_means(x) for x in src], [T.block_means(x) for x in dst]
    tis = [_lab(d)[..., 0] < 85 for d in db]  # the region the metric judges (and the cross-validation scores)
    # the region the map is fitted on: the destination's tissue, or tissue in either scan
    fit = tis if region == "destination" else [t | (_lab(s)[..., 0] < 85) for t, s in zip(tis, sb)]
    pix = [_tissue_pixels(x, t | (background_weight > 0)) for x, t in zip(src, fit)]  # the blocks the fit sees
    flat = lambda idx, arr: np.concatenate([arr[i].reshape(-1, 3) for i in idx])  # noqa: E731
    wflat = lambda idx: np.concatenate([fit[i].reshape(-1) + background_weight * ~fit[i].reshape(-1)  # noqa: E731
                                        for i in idx]).astype(np.float64)
    domains: Dict[Tuple[Any, ...], np.ndarray] = {}
    slopes: Dict[Tuple[Any, ...], np.ndarray] = {}

    def domain(idx, space):  # the input range of the pairs a map is fitted on, per fold and space
        key = (tuple(int(i) for i in idx), space)
        if key not in domains:
            domains[key] = T.colour_domain(np.concatenate([pix[i] for i in idx]), space)
        return domains[key]

    def slope(idx, space, out_space, loss):  # beyond the domain: the affine map's slope, fitted on the same pairs
        key = (tuple(int(i) for i in idx), space, out_space, loss)
        if key not in slopes:
            slopes[key] = T.fit_colour_map(flat(idx, sb), flat(idx, db), wflat(idx), space, 1, ridge, out_space, loss)[1:]
        return slopes[key]

    folds = _folds(groups, len(src))
    scores = {}
    identity = []
    for tr, te in folds:
        identity += [_delta_e(sb[i], db[i], tis[i]) for i in te]
    fits = [(space, out_space, degree, loss) for space, out_space, degree in candidates for loss in losses]
    for space, out_space, degree, loss in fits:
        res = []
        for tr, te in folds:
            if wflat(tr).sum() <= 0:
                continue
            w = T.fit_colour_map(flat(tr, sb), flat(tr, db), wflat(tr), space, degree, ridge, out_space, loss)
            dom, beyond = domain(tr, space), slope(tr, space, out_space, loss)
            for i in te:
                pred = T.apply_colour_map(torch.from_numpy(sb[i]).permute(2, 0, 1)[None], torch.from_numpy(w), space,
                                          degree, torch.ones(1), out_space, dom, beyond)[0].permute(1, 2, 0).numpy()
                res.append(_delta_e(pred, db[i], tis[i]))
        scores[_candidate_name(space, out_space, degree, loss)] = _finite_mean(res)
    before = _finite_mean(identity)
    valid = {k: v for k, v in scores.items() if v is not None}
    if valid:
        best = min(valid, key=valid.get)  # the first of equal scores: candidates come in order of cost
        if before is not None and valid[best] >= before:
            raise ScannerTransferError(f"the colour fit is no better than identity: expected a cross-validated CIEDE2000 "
                                       f"below identity's {before:.2f}, got {valid[best]:.2f} (are the pairs the same fields, "
                                       "on two different scanners?)")
    else:  # too few pairs to cross-validate: the first candidate (by default the affine sRGB map, least squares)
        best = _candidate_name(*fits[0])
    space, out_space, degree, loss = dict((_candidate_name(*f), f) for f in fits)[best]
    allidx = list(range(len(src)))
    w = T.fit_colour_map(flat(allidx, sb), flat(allidx, db), wflat(allidx), space, degree, ridge, out_space, loss)
    dom, beyond = domain(allidx, space), slope(allidx, space, out_space, loss)
    report = {"cv_folds": len(folds), "cv_delta_e2000": scores, "identity_delta_e2000": before, "chosen": best,
              "cv_delta_e2000_after": valid.get(best) if valid else None}
    report["domain_quantiles"] = list(T.DOMAIN_QUANTILES)
    report["background_weight"] = background_weight
    report["fit_region"] = region
    colour = {"space": space, "out_space": out_space, "degree": degree, "loss": loss, "weights": w.tolist(),
              "domain": dom.tolist(), "beyond_slope": beyond.tolist()}
    report["lighter_when_darker"] = _lighter_when_darker(np.concatenate([pix[i] for i in allidx]), colour, dom, beyond)
    return colour, report


def _check_max_gain(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 1.0 <= value <= 1e3):
        raise InvalidArgumentError(f"`mtf_max_gain` is invalid: expected None (chosen by cross-validation) or a number "
                                   f"in [1, 1000], got {value!r}")


def _geomean(ratios: Sequence[float]) -> float:
    return float(np.exp(np.mean(np.log(np.maximum(ratios, 1e-9)))))


def _closest_cap(ratios: Dict[float, List[float]]) -> Optional[float]:
    """The cap whose sharpness ratios (output / destination) are closest to 1 in geometric mean; equal to three
    decimals, the smaller cap. None without ratios."""
    scores = {c: abs(math.log(_geomean(r))) for c, r in ratios.items() if r}
    return min(scores, key=lambda c: (round(scores[c], 3), c)) if scores else None


def _reference_power(images: Sequence[np.ndarray]) -> np.ndarray:
    """The destination's reference spectrum of a matched MTF: the geometric mean of the tiles' tissue_power."""
    logs = [np.log(np.maximum(T.tissue_power(_float(d))[0].double().numpy(), 1e-30)) for d in images]
    return np.exp(np.mean(logs, axis=0))


def _fit_mtf(src, dst, groups, mpp, raw=None, max_gain=None, mode="relative"):
    """The relative MTF and its report. The gain's cap is chosen by cross-validation among :data:`MTF_MAX_GAINS`
    (or fixed by ``max_gain``): the cap whose held-out outputs' Laplacian variance is, in geometric mean, closest to
    the twins' (equal to three decimals: the smaller cap). ``mode="matched"`` adds the destination's reference
    spectrum (each tile is then filtered towards it, with that cap) and cross-validates that too."""
    masks = [(_tissue(a), _tissue(b)) for a, b in zip(src, dst)]
    rich = [i for i, (ma, mb) in enumerate(masks) if min(ma.mean(), mb.mean()) >= 0.3]
    if not rich:
        return None, {"fitted": False, "reason": "no pair with at least 30 % tissue"}
    caps = MTF_MAX_GAINS if max_gain is None else (float(max_gain),)
    weights = [_tissue_weight(*masks[i]) for i in rich]  # tissue regions only, the same for both sides
    ps = [T.radial_power(src[i], weight=w) for i, w in zip(rich, weights)]
    pd = [T.radial_power(dst[i], weight=w) for i, w in zip(rich, weights)]
    raw = src if raw is None else raw  # "before" is the unmodified source's sharpness
    before = float(np.median([_laplacian_var(raw[i]) / max(_laplacian_var(dst[i]), 1e-9) for i in rich]))
    dst_var = [max(_laplacian_var(dst[i]), 1e-9) for i in rich]
    dst_blocks = [T.block_means(dst[i]) for i in rich]
    tissue = [_lab(b)[..., 0] < 85 for b in dst_blocks]
    de_before = [_delta_e(T.block_means(src[i]), b, t) for i, b, t in zip(rich, dst_blocks, tissue)]
    after: Dict[float, List[float]] = {c: [] for c in caps}
    de_after: Dict[float, List[float]] = {c: [] for c in caps}
    g_rich = [groups[i] for i in rich] if groups is not None else None
    for tr, te in _folds(g_rich, len(rich)):
        xs = [_float(src[rich[j]]) for j in te]  # pairs may differ in size
        done: List[Tuple[np.ndarray, List[float], List[float]]] = []
        for cap in caps:
            gtr = T.relative_mtf([ps[j] for j in tr], [pd[j] for j in tr], max_gain=cap)
            same = [(r, e) for g, r, e in done if np.array_equal(g, gtr)]  # a cap that does not bind changes nothing
            if same:
                ratios, des = same[0]
            else:
                g = torch.tensor(gtr, dtype=torch.float32)
                outs = [_u8(T.mtf_filter(x, g, torch.ones(1))) for x in xs]
                ratios = [_laplacian_var(o) / dst_var[j] for o, j in zip(outs, te)]
                des = [_delta_e(T.block_means(o), dst_blocks[j], tissue[j]) for o, j in zip(outs, te)]
                done.append((gtr, ratios, des))
            after[cap].extend(ratios)
            de_after[cap].extend(des)
    chosen = _closest_cap(after)
    cap = caps[0] if chosen is None else chosen
    gain = T.relative_mtf(ps, pd, max_gain=cap)
    mtf = {"gain": gain.tolist(), "mpp": mpp}
    matched = None
    if mode == "matched":
        mtf.update(mode="matched", max_gain=cap, reference_power=_reference_power([dst[i] for i in rich]).tolist())
        ratios, des = [], []
        for tr, te in _folds(g_rich, len(rich)):
            ref = _reference_power([dst[rich[j]] for j in tr])
            for j in te:
                x = _float(src[rich[j]])
                o = _u8(T.mtf_filter(x, T.matched_gains(T.tissue_power(x), ref, cap), torch.ones(1)))
                ratios.append(_laplacian_var(o) / dst_var[j])
                des.append(_delta_e(T.block_means(o), dst_blocks[j], tissue[j]))
        matched = {"sharpness_ratio_after_cv": float(np.median(ratios)) if ratios else None,
                   "sharpness_ratio_after_cv_geomean": _geomean(ratios) if ratios else None,
                   "delta_e2000_after_cv": _finite_mean(des)}
    return mtf, {
        "mode": mode, "matched_cv": matched,
        "fitted": True, "pairs": len(rich), "sharpness_ratio_before": before, "max_gain": cap,
        # CIEDE2000 of block means over tissue of the colour-mapped sources (map fitted on all pairs) against the
        # destinations, before the MTF and after it (the MTF cross-validated): what the MTF costs or gains in colour
        "delta_e2000_before": _finite_mean(de_before),
        "delta_e2000_after_cv": _finite_mean(de_after[cap]),
        "max_gain_chosen_by_cv": max_gain is None and chosen is not None, "max_gain_given": max_gain is not None,
        "sharpness_ratio_after_cv": float(np.median(after[cap])) if after[cap] else None,
        "sharpness_ratio_after_cv_geomean": _geomean(after[cap]) if after[cap] else None,
        "cv_sharpness_geomean_by_max_gain": {str(c): _geomean(r) for c, r in after.items() if r}}


def _fit_noise(src, dst):
    diffs = [T.noise_sigma(b) - T.noise_sigma(a) for a, b in zip(src, dst)]
    sigma = float(np.median(diffs))
    return (sigma if sigma > 1e-3 else 0.0), {"sigma_extra_median": sigma, "fitted": sigma > 1e-3}


def _unpaired_colour_report(a: np.ndarray, b: np.ndarray, colour: dict) -> dict:
    """What an unpaired colour map achieves on the sets it was fitted on (in-sample; no pairs to hold out): the tissue
    blocks' CIELAB mean and standard deviation of the source, the destination and the mapped source, and the
    CIEDE2000 between the mean colours before and after the map."""
    from skimage.color import deltaE_ciede2000

    mapped = _map_pixels(a, colour)
    la, lb, lm = (_lab(v[None])[0] for v in (a, b, mapped))
    de = lambda u, v: float(deltaE_ciede2000(u.mean(0), v.mean(0)))  # noqa: E731
    return {"unpaired": True, "tissue_blocks": [int(len(a)), int(len(b))],
            "lab_mean": {k: v.mean(0).round(3).tolist() for k, v in (("src", la), ("dst", lb), ("mapped", lm))},
            "lab_std": {k: v.std(0).round(3).tolist() for k, v in (("src", la), ("dst", lb), ("mapped", lm))},
            "delta_e2000_of_means_before": de(la, lb), "delta_e2000_of_means_after": de(lm, lb)}


def _gaussian_map(a: np.ndarray, b: np.ndarray, space: str = "srgb") -> dict:
    """The affine map moving N(μa, Σa) onto N(μb, Σb) (Monge map) of ``(N, 3)`` sRGB colours ``a``, ``b`` taken to
    ``space``, as a degree-1 colour map within that space."""
    a, b = (T.colour_features(torch.from_numpy(np.asarray(v, np.float64)), space, 1)[:, 1:].numpy() for v in (a, b))
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a.T) + 1e-6 * np.eye(3), np.cov(b.T) + 1e-6 * np.eye(3)

    def sqrtm(m):
        vals, vecs = np.linalg.eigh(m)
        return vecs @ np.diag(np.sqrt(np.maximum(vals, 0))) @ vecs.T

    ra = sqrtm(ca)
    ra_inv = np.linalg.inv(ra)
    m = ra_inv @ sqrtm(ra @ cb @ ra) @ ra_inv  # y = μb + M (x − μa)
    w = np.zeros((4, 3))
    w[0] = mu_b - m @ mu_a
    w[1:] = m.T
    return {"space": space, "out_space": space, "degree": 1, "weights": w.tolist()}


__all__ = ["ScannerTransfer", "ScannerTransferError", "PARTS", "PROFILE_FORMAT", "COLOUR_CANDIDATES", "MTF_MAX_GAINS",
           "MTF_MODES"]
