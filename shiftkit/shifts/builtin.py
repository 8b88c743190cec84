"""Built-in shifts. Severity tables from REFERENCES B3 (anchors: [S] Schömig-Markiefka, [W] Wang 2021,
[IC] ImageNet-C, [T] THUNDER, [R] real-device facts); values marked "proposed" are ours, to be validated."""

from __future__ import annotations

import math

import torch

from ..core.files import read_image, sample_path
from ..functional import artifacts as A
from ..functional import scanner as K
from ..functional import scanner_u8 as U
from ..functional.augment import hed_jitter, perturb_stains
from ..stain.estimate import estimator_config, estimate_batch
from .registry import ShiftSpec, composite, direction, register_shift


def _seeds(gen: torch.Generator, batch: int) -> torch.Tensor:
    return torch.randint(0, 2**62, (batch,), generator=gen, dtype=torch.int64)


def _none(values, gen, batch):
    return dict(values)


def _signed_factor(key: str):
    """A factor applied up or down: ``v`` or ``1/v`` with a random direction per sample."""
    def sample(values, gen, batch):
        d = direction(gen, batch)
        out = dict(values)
        out[key] = torch.where(d > 0, values[key], 1.0 / values[key])
        return out
    return sample


def _hue_kernel(x, p):
    est = estimate_batch(x, estimator_config("macenko", {}), None, "report")
    ones = torch.ones(x.shape[0], 2, device=x.device, dtype=x.dtype)
    return perturb_stains(x, est.matrix, ones, torch.zeros_like(ones), angle=p["angle"][:, None].expand(-1, 2).to(x),
                          azimuth=p["azimuth"].to(x), background_od=0.3)


def _hue_sample(values, gen, batch):
    return {"angle": values["angle"], "azimuth": 2 * math.pi * torch.rand(batch, 2, generator=gen)}


def _intensity_sample(values, gen, batch):
    sa = torch.where(torch.rand(batch, 2, generator=gen) < 0.5, -1.0, 1.0)
    sb = torch.where(torch.rand(batch, 2, generator=gen) < 0.5, -1.0, 1.0)
    alpha = torch.ones(batch, 3)
    beta = torch.zeros(batch, 3)
    alpha[:, :2] = 1.0 + sa * values["alpha_dev"][:, None]
    beta[:, :2] = sb * values["beta"][:, None]
    return {"alpha": alpha, "beta": beta}


def _wb_sample(values, gen, batch):
    ang = 2 * math.pi * torch.rand(batch, generator=gen)
    d = values["gain_dev"]
    gains = torch.stack([1 + d * torch.cos(ang), torch.ones(batch), 1 + d * torch.sin(ang)], -1)
    return {"gains": gains}


def _seam_sample(values, gen, batch):
    d = direction(gen, batch)
    pos = 0.25 + 0.5 * torch.rand(batch, generator=gen)
    return {"step": d * values["step"], "offset": values["offset"].round(), "position": pos}


def _noise_sample(values, gen, batch):
    return {**values, "seed": _seeds(gen, batch)}


def _reencode_sample(values, gen, batch):
    off = torch.randint(1, 8, (batch, 2), generator=gen)
    return {"quality": values["quality"], "offset": off}


def _reencode_kernel(x, p):
    first = K.jpeg(x, torch.full((x.shape[0],), 80))
    return K.jpeg(first, p["quality"], offset=p["offset"])


def _reencode_u8(t, p):
    first = U.jpeg_u8(t, torch.full((t.shape[0],), 80))
    return U.jpeg_u8(first, p["quality"], offset=p["offset"])


SPECS = [
    ShiftSpec("gaussian-defocus", "optics", "Autofocus error / uneven coverslip: Gaussian PSF of σ px.",
              {"sigma": (1.1, 1.7, 2.6, 3.5, 5.0)}, {"sigma": "px@0.5um"},
              "[S] k = 5/9/15/21/31; [IC] σ 1, 2, 3, 4, 6; [T] k = 15", False,
              lambda x, p: K.gaussian_blur(x, p["sigma"]), _none,
              kernel_u8=lambda t, p: U.gaussian_blur_u8(t, p["sigma"])),
    ShiftSpec("disk-defocus", "optics", "Geometric defocus of a high-NA objective: pillbox PSF of radius r px.",
              {"radius": (1, 2, 3, 4, 6)}, {"radius": "px@0.5um"},
              "[IC] r 3, 4, 6, 8, 10 (natural images), scaled to tissue", True,
              lambda x, p: K.disk_blur(x, p["radius"]), _none,
              kernel_u8=lambda t, p: U.disk_blur_u8(t, p["radius"]),
              tile_f32=lambda p, shape: U.disk_blur_fn(p["radius"], shape)),
    ShiftSpec("motion-blur", "optics", "Line-scan stage / TDI desync: 1-D box along the scan axis, length L px.",
              {"length": (3, 5, 7, 11, 15)}, {"length": "px@0.5um"},
              "[IC] radius 10–20 at a random angle (unphysical); here along the scan axis", True,
              lambda x, p: K.motion_blur(x, p["length"]), _none,
              kernel_u8=lambda t, p: U.motion_blur_u8(t, p["length"])),
    ShiftSpec("vignetting", "illumination", "Flat-field error: radial linear-light falloff, corner drop d.",
              {"drop": (0.02, 0.04, 0.07, 0.10, 0.15)}, {"drop": "fraction"},
              "[W] illumination map 0.8–1.1; [R] grid shading", True,
              lambda x, p: K.vignetting(x, p["drop"]), _none, kernel_u8=lambda t, p: U.vignetting_u8(t, p["drop"]),
              tile_f32=lambda p, shape: U.vignetting_fn(p["drop"], shape)),
    ShiftSpec("stitching-seam", "illumination", "Tile misregistration: intensity step Δ and offset o px at a random column.",
              {"step": (0.01, 0.02, 0.03, 0.05, 0.08), "offset": (0, 1, 1, 2, 4)}, {"step": "fraction", "offset": "px@0.5um"},
              "[R] Aperio stripe width 992–2040 px; values proposed", False,
              lambda x, p: K.stitching_seam(x, p["step"], p["offset"], p["position"]), _seam_sample, stage="stitching",
              kernel_u8=lambda t, p: U.stitching_seam_u8(t, p["step"], p["offset"], p["position"])),
    ShiftSpec("sensor-noise", "sensor", "Shot + read noise in linear light: Poisson(λx)/λ + N(0, σ_r²).",
              {"photons": (1000, 500, 200, 100, 60), "read_sigma": (0.002, 0.004, 0.008, 0.012, 0.02)},
              {"photons": "photons at white", "read_sigma": "linear"},
              "[IC] shot λ 60/25/12/5/3 (extreme); values proposed", False,
              lambda x, p: K.sensor_noise(x, p["photons"], p["read_sigma"], p["seed"]), _noise_sample,
              kernel_u8=lambda t, p, post=None: U.sensor_noise_u8(t, p["photons"], p["read_sigma"], p["seed"], post=post),
              u8_post=True),
    ShiftSpec("exposure", "sensor", "Lamp ageing / exposure: linear-light gain g (up or down).",
              {"gain": (1.05, 1.1, 1.2, 1.3, 1.45)}, {"gain": "factor (or 1/factor)"},
              "[S] PIL 1 ± 0.1…0.9; [IC] HSV V + .1….5", False,
              lambda x, p: K.exposure(x, p["gain"]), _signed_factor("gain"), pointwise=True),
    ShiftSpec("gamma", "isp", "Scanner encoding gamma / ignored profile: x^γ (or x^(1/γ)).",
              {"gamma": (1.1, 1.2, 1.35, 1.5, 1.8)}, {"gamma": "exponent"},
              "[T] γ U[0.5, 1.5]", False,
              lambda x, p: K.gamma_curve(x, p["gamma"]), _signed_factor("gamma"), pointwise=True),
    ShiftSpec("saturation", "isp", "ISP saturation / display profile: HSV S × a (or ÷ a).",
              {"factor": (1.15, 1.3, 1.5, 1.75, 2.0)}, {"factor": "factor (or 1/factor)"},
              "[IC] saturate; values of B3", True,
              lambda x, p: K.saturation(x, p["factor"]), _signed_factor("factor"),
              kernel_u8=lambda t, p: U.saturation_u8(t, p["factor"]),
              tile_f32=lambda p, shape: U.saturation_fn(p["factor"], shape)),
    ShiftSpec("white-balance", "isp", "Calibration differences: per-channel linear-light gains (luminance kept).",
              {"gain_dev": (0.01, 0.025, 0.05, 0.075, 0.10)}, {"gain_dev": "relative gain of R and B"},
              "proposed (B3 asks for a colour matrix fitted to ΔE2000 1–10; not yet fitted)", False,
              lambda x, p: K.white_balance(x, p["gains"]), _wb_sample, pointwise=True),
    ShiftSpec("sharpening", "isp", "Vendor unsharp masking: amount at radius 1 px.",
              {"amount": (0.3, 0.6, 1.0, 1.5, 2.0)}, {"amount": "factor"},
              "proposed", True,
              lambda x, p: K.unsharp_mask(x, p["amount"]), _none, kernel_u8=lambda t, p: U.unsharp_mask_u8(t, p["amount"]),
              tile_f32=lambda p, shape: U.unsharp_mask_fn(p["amount"], shape)),
    ShiftSpec("jpeg", "storage", "Vendor lossy tile storage: JPEG quality Q, 4:2:0 chroma (libjpeg via OpenCV).",
              {"quality": (90, 80, 70, 50, 30)}, {"quality": "JPEG quality"},
              "[R] SVS Q = 70 (also 30), NDPI 80; [S] Q 5–75", False,
              lambda x, p: K.jpeg(x, p["quality"]), _none,
              kernel_u8=lambda t, p: U.jpeg_u8(t, p["quality"])),
    ShiftSpec("jpeg-reencode", "storage", "Export pipelines re-tiling WSIs: Q₁ = 80, then Q₂ on a grid offset by 1–7 px.",
              {"quality": (90, 80, 70, 60, 50)}, {"quality": "JPEG quality of the second pass"},
              "proposed", True, _reencode_kernel, _reencode_sample, kernel_u8=_reencode_u8),
    ShiftSpec("resample", "storage", "Different scanner µm/px or pyramid level: down-sample by f and back.",
              {"factor": (0.95, 0.9, 0.8, 0.7, 0.5)}, {"factor": "scale"},
              "[IC] pixelate .6 … .25", True,
              lambda x, p: K.resample(x, p["factor"]), _none,
              kernel_u8=lambda t, p: U.resample_u8(t, p["factor"])),
    ShiftSpec("section-thickness", "stain", "Microtome setting: Beer–Lambert OD × t (thicker) or ÷ t (thinner).",
              {"scale": (1.15, 1.3, 1.5, 1.75, 2.0)}, {"scale": "OD factor (or 1/factor)"},
              "Beer–Lambert; [W] regional saturation ×0.5–0.8", False,
              lambda x, p: K.section_thickness(x, p["scale"]), _signed_factor("scale"), pointwise=True),
    ShiftSpec("stain-intensity", "stain", "Reagent batch / staining time: HED α and β of H and E (random signs).",
              {"alpha_dev": (0.05, 0.1, 0.2, 0.3, 0.5), "beta": (0.01, 0.02, 0.03, 0.05, 0.08)},
              {"alpha_dev": "|α − 1|", "beta": "natural-log OD"},
              "Tellez HED light 0.05 / strong 0.2; [T] σ 0.025; OpenMidnight ±0.05", False,
              lambda x, p: hed_jitter(x, p["alpha"].to(x), p["beta"].to(x), background_od=0.3), _intensity_sample),
    ShiftSpec("stain-hue", "stain", "Other H/E formulations: rotate both stain vectors (Macenko per tile) by an angle.",
              {"angle": (3, 6, 9, 12, 15)}, {"angle": "degrees"},
              "tables v2: severity 5 = the largest eosin-vector rotation between Aperio XT and Hamamatsu 2.0-HT scans "
              "of the same slides (MITOS slides 03/04, pooled Macenko: E 14.4-15.3 deg, H 6-7 deg; "
              "experiments/calibration/stain_angles.py), 1-4 linear below it (v1: 2, 4, 6, 9, 12)", True,
              _hue_kernel, _hue_sample),
]

for _spec in SPECS:
    register_shift(_spec)

def _angle_sample(values, gen, batch):
    return {**values, "angle": 2 * math.pi * torch.rand(batch, generator=gen)}


def _fading_sample(values, gen, batch):
    alpha = torch.ones(batch, 3)
    alpha[:, 0] = 1.0 - values["h_loss"]
    alpha[:, 1] = 1.0 - 0.5 * values["h_loss"]  # eosin fades less than hematoxylin
    return {"alpha": alpha, "beta": torch.zeros(batch, 3)}


MORE = [
    ShiftSpec("focal-tilt", "optics", "Focus-map interpolation error: σ ramps 0 → σ_max across the tile (random direction).",
              {"sigma_max": (1.1, 1.7, 2.6, 3.5, 5.0)}, {"sigma_max": "px@0.5um"},
              "[R] ConvFocus / FocusPath", True,
              lambda x, p: K.focal_tilt(x, p["sigma_max"], p["angle"]), _angle_sample),
    ShiftSpec("chromatic-aberration", "optics", "Objective dispersion: R and B radially scaled vs G; corner displacement px.",
              {"shift": (0.25, 0.5, 1.0, 1.5, 2.5)}, {"shift": "px@0.5um"},
              "proposed", True,
              lambda x, p: K.chromatic_aberration(x, p["shift"]), _none),
    ShiftSpec("jpeg2000", "storage", "Aperio J2K / archives: JPEG 2000 at a compression ratio (OpenJPEG via OpenCV).",
              {"ratio": (10, 20, 35, 60, 100)}, {"ratio": "compression ratio :1"},
              "[R] 35:1 common (Helin 2018); Chen 2020", True,
              lambda x, p: K.jpeg2000(x, p["ratio"]), _none,
              kernel_u8=lambda t, p: U.jpeg2000_u8(t, p["ratio"])),
    ShiftSpec("fading", "stain", "Ageing slides: hematoxylin concentration loss h (eosin h/2), HED deconvolution.",
              {"h_loss": (0.05, 0.1, 0.2, 0.3, 0.45)}, {"h_loss": "fraction"},
              "proposed", True,
              lambda x, p: hed_jitter(x, p["alpha"].to(x), p["beta"].to(x), background_od=0.3), _fading_sample),
    ShiftSpec("air-bubbles", "tissue", "Mounting-medium bubbles: smooth blobs, grey fill α 0.75, dark rim; area fraction.",
              {"area": (0.02, 0.05, 0.10, 0.20, 0.35)}, {"area": "fraction of the tile"},
              "[W] 25 blobs, max width 50", True,
              lambda x, p: A.air_bubbles(x, p["area"], p["seed"]), _noise_sample),
    ShiftSpec("tissue-fold", "tissue", "Section folded over itself: OD × (1 + layers) in a curved band of width px.",
              {"width": (8, 16, 24, 36, 56), "layers": (1, 1, 2, 2, 3)}, {"width": "px@0.5um", "layers": "count"},
              "[W] width 100 px, 2 layers (larger tiles)", True,
              lambda x, p: A.tissue_fold(x, p["width"], p["layers"], p["seed"]), _noise_sample),
    ShiftSpec("pen-ink", "tissue", "Pathologist's marker on the glass: dark-blue stroke along a curve; width px, opacity.",
              {"width": (3, 6, 10, 16, 24), "alpha": (0.3, 0.45, 0.6, 0.75, 0.9)}, {"width": "px@0.5um", "alpha": "opacity"},
              "[W] w = 50, alpha .75, dark-blue RGB", False,
              lambda x, p: A.pen_ink(x, p["width"], p["alpha"], p["seed"]), _noise_sample),
    ShiftSpec("dust", "tissue", "Debris on the slide or optics: blurred dark disks; radius px, opacity.",
              {"radius": (3, 6, 10, 16, 24), "opacity": (0.3, 0.4, 0.5, 0.65, 0.8)}, {"radius": "px@0.5um", "opacity": "opacity"},
              "[S] 4 sizes, 3 placements", False,
              lambda x, p: A.dust(x, p["radius"], p["opacity"], p["seed"]), _noise_sample),
    ShiftSpec("threads", "tissue", "Fibres above the focal plane: blurred dark curves; count and thickness px.",
              {"count": (1, 1, 2, 3, 5), "thickness": (1, 2, 2, 2, 2)}, {"count": "count", "thickness": "px@0.5um"},
              "[S] thread sprite + local blur", True,
              lambda x, p: A.threads(x, p["count"], p["thickness"], p["seed"]), _noise_sample),
    ShiftSpec("tears", "tissue", "Sectioning damage: white cracks along curves; total length in tile widths.",
              {"length": (0.25, 0.5, 1.0, 1.5, 2.0)}, {"length": "tile widths"},
              "[W] spline-guided point clusters with rims", True,
              lambda x, p: A.tears(x, p["length"], p["seed"]), _noise_sample),
]

for _spec in MORE:
    register_shift(_spec)

def _profile_sample(values, gen, batch):
    d = torch.randn(batch, 3, 3, generator=gen)
    d = d - d.mean(-1, keepdim=True)  # rows sum to 0: white stays white
    d = d / d.flatten(1).norm(dim=-1).view(-1, 1, 1)
    return {"direction": d, "delta_e": values["delta_e"]}


def _profile_kernel(x, p):
    from ..functional.color import color_profile

    return color_profile(x, p["direction"], p["delta_e"])


_PROTOCOL_TARGETS = {}


def _protocol_targets(device, dtype):
    """Macenko targets fitted once on the bundled real H&E images (three staining protocols)."""
    if "fitted" not in _PROTOCOL_TARGETS:
        from ..transforms.normalizer import StainNormalizer

        norms = [StainNormalizer("macenko").fit(read_image(sample_path(n))) for n in ("slideflow", "stardist", "wsidicom")]
        _PROTOCOL_TARGETS["fitted"] = (torch.stack([n.target_matrix for n in norms]),
                                       torch.stack([n.target_max_concentrations for n in norms]))
    m, c = _PROTOCOL_TARGETS["fitted"]
    return m.to(device, dtype), c.to(device, dtype)


def _protocol_sample(values, gen, batch):
    return {"fraction": values["fraction"], "target": torch.randint(0, 3, (batch,), generator=gen)}


def _protocol_kernel(x, p):
    from ..functional.stain import normalize_stains
    from ..stain.model import od_to_rgb, rgb_to_od

    mats, maxc = _protocol_targets(x.device, x.dtype)
    idx = p["target"].long().to(x.device)
    est = estimate_batch(x, estimator_config("macenko", {}), None, "report")
    y = normalize_stains(x, est.matrix, est.max_concentrations, mats[idx], maxc[idx])
    od, ody = rgb_to_od(x), rgb_to_od(y)
    f = p["fraction"].to(x).view(-1, 1, 1, 1)
    out = od_to_rgb((1 - f) * od + f * ody)
    glass = od.sum(1, keepdim=True) < 0.3
    return torch.where(glass, x, out)


EXTRA = [
    ShiftSpec("color-profile", "isp", "Scanner colour calibration / ICC: a white-preserving 3×3 matrix in linear light "
              "scaled so that the tile's mean ΔE2000 equals the target.",
              {"delta_e": (1.0, 2.5, 5.0, 7.5, 10.0)}, {"delta_e": "mean ΔE2000 over tissue"},
              "[R] UFS 10 → 3.5 ΔE, inter-scanner 1.2 ΔE", True, _profile_kernel, _profile_sample),
    ShiftSpec("line-scan-stripes", "illumination", "Line-scan sensor segments: 64-px bands along the scan axis, each "
              "with its own linear-light gain ±a.",
              {"amplitude": (0.005, 0.01, 0.02, 0.03, 0.05)}, {"amplitude": "relative gain"},
              "[R] Aperio stripe width 992–2040 px; values proposed", True,
              lambda x, p: K.line_stripes(x, p["amplitude"], p["seed"]), _noise_sample),
    ShiftSpec("stain-protocol", "stain", "Another lab's protocol: Macenko transfer towards one of three real bundled "
              "H&E targets, a fraction f of the way (in OD).",
              {"fraction": (0.2, 0.4, 0.6, 0.8, 1.0)}, {"fraction": "of the way to the target"},
              "[S] 15_stain_scheme; PLISM 13 stains (targets here: the bundled slideflow, stardist, wsidicom tiles)", True,
              _protocol_kernel, _protocol_sample),
]

for _spec in EXTRA:
    register_shift(_spec)

# Composite scanner profiles. The training profile uses training shifts only; the held-out one uses held-out
# shifts only, so evaluation profiles stay disjoint from what a model was trained on.
register_shift(composite("scanner-profile-a", ["white-balance", "gamma", "gaussian-defocus", "sensor-noise", "jpeg", "stitching-seam"],
                         "A generic line-scan scanner: colour calibration, tone curve, PSF, sensor noise, JPEG storage, seams.", False))
register_shift(composite("scanner-profile-b", ["saturation", "sharpening", "disk-defocus", "vignetting", "jpeg-reencode"],
                         "A held-out scanner: saturation and sharpening in the ISP, disk PSF, flat-field error, re-encoded JPEG.", True))
