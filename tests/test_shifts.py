"""Scanner and slide-preparation shifts: registry, severity monotonicity on real tiles, identities, references."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import structural_similarity

import shiftkit
from shiftkit.core import InvalidArgumentError, UnknownNameError
from shiftkit.data import load_sample_tiles
from shiftkit.functional import scanner as K
from shiftkit.shifts import get_spec, list_shifts

# Every registered shift appears here with the distance that fits its family (test_table_covers_registry).
DISTANCE = {
    "gaussian-defocus": "blur", "disk-defocus": "blur", "motion-blur": "blur", "resample": "blur",
    "sharpening": "ssim", "jpeg": "ssim", "jpeg-reencode": "ssim", "sensor-noise": "ssim", "stitching-seam": "ssim",
    "vignetting": "deltae", "exposure": "deltae", "gamma": "deltae", "saturation": "deltae",
    "white-balance": "deltae", "section-thickness": "deltae", "stain-intensity": "deltae", "stain-hue": "deltae",
    "scanner-profile-a": "ssim", "scanner-profile-b": "ssim",
    "focal-tilt": "blur", "chromatic-aberration": "ssim", "jpeg2000": "ssim", "fading": "deltae",
    "color-profile": "deltae", "line-scan-stripes": "deltae", "stain-protocol": "deltae",
    "air-bubbles": "ssim", "tissue-fold": "deltae", "pen-ink": "deltae", "dust": "deltae", "threads": "ssim", "tears": "ssim",
    # bundled learned transfers (colour only)
    "scanner-transfer:scanners5-aperio-to-nz210": "deltae", "scanner-transfer:scanners5-aperio-to-leica": "deltae",
    "scanner-transfer:scanners5-aperio-to-nz2": "deltae", "scanner-transfer:scanners5-aperio-to-3dhistech": "deltae",
}


@pytest.fixture(scope="module")
def tiles():
    return torch.from_numpy(load_sample_tiles()[[0, 5, 9, 14]]).permute(0, 3, 1, 2).float() / 255


def _np(x):
    return x.permute(0, 2, 3, 1).double().numpy()


def distance(kind, clean, out):
    a, b = _np(clean), _np(out)
    if kind == "ssim":
        return float(np.mean([1 - structural_similarity(p, q, channel_axis=-1, data_range=1.0) for p, q in zip(a, b)]))
    if kind == "deltae":
        return float(np.mean([deltaE_ciede2000(rgb2lab(p), rgb2lab(q)).mean() for p, q in zip(a, b)]))
    # blur energy: relative loss of the Laplacian's energy (high-frequency detail)
    lap = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float64)[None, None]
    g = lambda x: torch.nn.functional.conv2d(x.double().mean(1, keepdim=True), lap).pow(2).mean().item()  # noqa: E731
    return 1.0 - g(out) / g(clean)


def test_table_covers_registry():
    assert set(DISTANCE) == set(list_shifts())


def test_registry_metadata_and_errors():
    for name in list_shifts():
        spec = get_spec(name)
        assert spec.family in shiftkit.shifts.FAMILIES and spec.source and spec.description
        assert all(len(v) == 5 for v in spec.table.values())
    train, held = set(list_shifts(held_out=False)), set(list_shifts(held_out=True))
    assert train and held and not (train & held)
    assert "gaussian-defocus" in list_shifts("*defocus*")
    with pytest.raises(UnknownNameError, match="did you mean"):
        shiftkit.get_shift("gausian-defocus", 2)
    with pytest.raises(InvalidArgumentError, match="`severity` out of range"):
        shiftkit.get_shift("jpeg", 6)
    with pytest.raises(InvalidArgumentError, match="already registered"):
        shiftkit.shifts.register_shift(get_spec("jpeg"))


def test_pixel_severities_scale_with_mpp():
    assert shiftkit.get_shift("gaussian-defocus", 3, mpp=0.25).values["sigma"] == pytest.approx(5.2)
    assert shiftkit.get_shift("gaussian-defocus", 3, mpp=1.0).values["sigma"] == pytest.approx(1.3)
    assert shiftkit.get_shift("jpeg", 3, mpp=0.25).values["quality"] == 70  # not a pixel quantity


@pytest.mark.parametrize("name", sorted(DISTANCE))
def test_severity_is_strictly_monotone_on_real_tiles(name, tiles):
    d = [distance(DISTANCE[name], tiles, shiftkit.get_shift(name, s, seed=0)(tiles)) for s in range(1, 6)]
    assert d[0] > 0 and all(b > a for a, b in zip(d, d[1:])), d


@pytest.mark.parametrize("name", sorted(DISTANCE))
def test_deterministic_finite_and_device_independent_draws(name, tiles):
    a = shiftkit.get_shift(name, 3, seed=5)(tiles)
    b = shiftkit.get_shift(name, 3, seed=5)(tiles)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    edge = torch.cat([torch.ones(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)])
    assert torch.isfinite(shiftkit.get_shift(name, 5, seed=0)(edge)).all()


IDENTITY = [
    (K.gaussian_blur, {"sigma": 0.0}), (K.disk_blur, {"radius": 0.0}), (K.motion_blur, {"length": 1.0}),
    (K.vignetting, {"drop": 0.0}), (K.exposure, {"gain": 1.0}), (K.gamma_curve, {"gamma": 1.0}),
    (K.saturation, {"factor": 1.0}), (K.unsharp_mask, {"amount": 0.0}), (K.resample, {"factor": 1.0}),
    (K.section_thickness, {"scale": 1.0}), (K.chromatic_aberration, {"shift": 0.0}),
]


@pytest.mark.parametrize("fn, kw", IDENTITY, ids=[f.__name__ for f, _ in IDENTITY])
def test_identity_parameters_are_exact(fn, kw, tiles):
    b = tiles.shape[0]
    assert torch.equal(fn(tiles, *[torch.full((b,), v) for v in kw.values()]), tiles)


def test_artifacts_with_nothing_to_draw_are_exact_identities(tiles):
    from shiftkit.functional import artifacts as A

    b = tiles.shape[0]
    z, s = torch.zeros(b), torch.arange(b)
    for out in (A.air_bubbles(tiles, z, s), A.pen_ink(tiles, z, z, s), A.dust(tiles, z, z, s),
                A.tissue_fold(tiles, z, z, s), A.threads(tiles, z, z, s), A.tears(tiles, z, s)):
        assert torch.equal(out, tiles)


def test_identity_parameters_are_exact_for_multi_parameter_kernels(tiles):
    b = tiles.shape[0]
    assert torch.equal(K.white_balance(tiles, torch.ones(b, 3)), tiles)
    z = torch.zeros(b)
    assert torch.equal(K.stitching_seam(tiles, z, z, torch.full((b,), 0.5)), tiles)


@pytest.mark.parametrize("fn, kw", [(K.gaussian_blur, "sigma"), (K.disk_blur, "radius"), (K.motion_blur, "length")])
def test_blur_kernels_preserve_mean_intensity(fn, kw, tiles):
    out = fn(tiles, torch.tensor([1.0, 2.5, 4.0, 6.0]))
    assert (out.mean(dim=(1, 2, 3)) - tiles.mean(dim=(1, 2, 3))).abs().max() < 2e-3  # reflect padding at borders
    kern = K.disk_kernel(torch.tensor([0.0, 1.0, 3.5]))
    assert torch.allclose(kern.sum(dim=(-1, -2)), torch.ones(3, dtype=kern.dtype))


def test_gaussian_blur_matches_scipy_reference(tiles):
    from scipy.ndimage import gaussian_filter

    out = K.gaussian_blur(tiles[:1].double(), torch.tensor([2.0]))[0].numpy()
    ref = np.stack([gaussian_filter(c, 2.0, mode="mirror", truncate=3.0) for c in tiles[0].double().numpy()])
    assert np.abs(out - ref)[:, 8:-8, 8:-8].max() < 1e-6  # same kernel away from the border rule


def test_jpeg_matches_pillow_encoder_at_the_same_quality(tiles):
    # Both use libjpeg with 4:2:0 chroma at the same quality; stated tolerance: mean |diff| <= 0.5/255.
    u8 = (tiles * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for q in (90, 70, 30):
        ours = (K.jpeg(tiles, torch.full((tiles.shape[0],), q)) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        ref = []
        for im in u8:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="JPEG", quality=q)
            ref.append(np.array(Image.open(buf)))
        assert np.abs(ours.astype(int) - np.stack(ref)).mean() <= 0.5


def test_sensor_noise_statistics_in_linear_light():
    flat = torch.full((1, 3, 128, 128), 0.5)
    out = K.sensor_noise(flat, torch.tensor([200.0]), torch.tensor([0.0]), torch.tensor([1]))
    lin = K.srgb_to_linear(out)
    mu = K.srgb_to_linear(flat)[0, 0, 0, 0].item()
    assert abs(lin.mean().item() - mu) < 0.01  # Poisson noise is unbiased
    assert abs(lin.var().item() - mu / 200) / (mu / 200) < 0.15  # variance = x / λ


@pytest.mark.parametrize("lam", [0.05, 0.7, 3.0, 9.5, 15.99])
def test_poisson_inverse_cdf_equals_scipy_ppf(lam):
    """The exact low-count branch: the count is scipy's Poisson quantile of the pixel's uniform."""
    from scipy.stats import poisson

    u = torch.rand(200_000, generator=torch.Generator().manual_seed(3))
    k = K.poisson_inverse_cdf(torch.full_like(u, lam), u)
    ref = poisson.ppf(u.double().numpy(), lam)
    assert (k.numpy() != ref).mean() < 1e-4  # float32 CDF: a draw may differ only where u sits on a step


@pytest.mark.parametrize("lam,read", [(60.0, 0.004), (200.0, 0.0), (1000.0, 0.008)])
def test_sensor_noise_mean_and_variance_per_intensity_equal_the_exact_model(lam, read):
    """Sampler 2 (exact counts below SHOT_EXACT_BELOW photons, variance-matched normal above) against the exact
    Poisson-Gaussian model: mean x and variance x/λ + σ² per linear level, on both sides of the switch."""
    levels = torch.tensor([0.002, 0.01, 0.04, 0.1, 0.26, 0.27, 0.6])
    assert (levels * lam < K.SHOT_EXACT_BELOW).any() and (levels * lam >= K.SHOT_EXACT_BELOW).any()
    g = torch.Generator().manual_seed(int(lam))
    shape = (len(levels), 1, 256, 256)
    out = K.poisson_gaussian(levels.view(-1, 1, 1, 1).expand(shape).contiguous(), torch.full((len(levels),), lam),
                             torch.full((len(levels),), read), torch.rand(shape, generator=g), torch.randn(shape, generator=g))
    for i, x in enumerate(levels.tolist()):
        v, n = x / lam + read ** 2, out[i].numel()
        assert abs(out[i].mean().item() - x) < 4 * math.sqrt(v / n), (x, lam)
        assert abs(out[i].var().item() / v - 1) < 0.03, (x, lam)  # 4 SE of a variance at n = 65,536 is 2.2 %


def test_sensor_noise_draws_are_stable_under_tiny_input_changes(tiles):
    """One uniform and one normal per pixel: a 1e-6 change of the input (another device's rounding) moves few pixels'
    counts, instead of reshuffling every later draw as a rejection sampler does."""
    t = shiftkit.get_shift("sensor-noise", 5, seed=0)
    a = t(tiles)
    b = t((tiles + 1e-6 * torch.randn(tiles.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1),
          params=dict(t._params))
    assert ((a - b).abs() > 1e-4).float().mean() < 1e-3


def test_shift_transform_per_sample_draws_and_batch_independence(tiles):
    t = shiftkit.get_shift("sensor-noise", 3, seed=0)
    out = t(tiles)
    params = t._params  # each replay below records its own params
    assert not torch.equal(params["seed"][0], params["seed"][1])
    for i in range(tiles.shape[0]):
        p = {k: v[i : i + 1] for k, v in params.items() if k != "forward_input_shape"}
        assert torch.equal(t(tiles[i : i + 1], params=p), out[i : i + 1])


def test_composite_profiles_apply_components_in_physical_order(tiles):
    spec = get_spec("scanner-profile-a")
    assert spec.family == "scanner" and not spec.held_out and get_spec("scanner-profile-b").held_out
    t = shiftkit.get_shift("scanner-profile-a", 3, seed=0)
    out = t(tiles)
    # the same pipeline by hand, component by component, with the drawn parameters
    x = tiles
    for comp in ("gaussian-defocus", "sensor-noise", "white-balance", "gamma", "stitching-seam", "jpeg"):  # B3 order
        pre = comp + "."
        x = get_spec(comp).kernel(x, {k[len(pre):]: v for k, v in t._params.items() if k.startswith(pre)})
    assert torch.equal(out, x)
    comps = [c for c in spec.description.split("order: ")[1].rstrip(".").split(", ")]
    assert comps == ["gaussian-defocus", "sensor-noise", "white-balance", "gamma", "stitching-seam", "jpeg"]
    assert [get_spec(c).order for c in comps] == sorted(get_spec(c).order for c in comps)


def test_random_scanner_uses_training_shifts_per_tile_and_replays(tiles):
    t = shiftkit.RandomScanner(severity_range=(1, 3), seed=0)
    assert not any(get_spec(n).held_out for n in t.shifts) and len(t.shifts) >= 5
    x = tiles.repeat(4, 1, 1, 1)
    out = t(x)
    params = t._params
    assert len(set(params["choice"].tolist())) > 1 and set(params["severity"].tolist()) <= {1, 2, 3}
    assert torch.equal(t(x, params=params), out)
    for i in (0, 7):  # each tile equals its own shift applied alone
        spec = get_spec(t.shifts[int(params["choice"][i])])
        g = torch.Generator().manual_seed(int(params["seed"][i]))
        vals = spec.values(int(params["severity"][i]))
        p = spec.sample({k: torch.tensor([v]) for k, v in vals.items()}, g, 1)
        assert torch.equal(spec.kernel(x[i : i + 1], p), out[i : i + 1])


def test_delta_e2000_matches_skimage():
    g = np.random.default_rng(0)
    lab1 = np.stack([g.uniform(0, 100, 400), g.uniform(-80, 80, 400), g.uniform(-80, 80, 400)], -1)
    lab2 = lab1 + g.normal(0, 8, lab1.shape)
    from shiftkit.functional.color import delta_e2000

    ours = delta_e2000(torch.from_numpy(lab1.T[None]), torch.from_numpy(lab2.T[None]))[0].numpy()
    np.testing.assert_allclose(ours, deltaE_ciede2000(lab1, lab2), atol=1e-9)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_color_profile_reaches_its_target_delta_e2000(tiles, severity):
    t = shiftkit.get_shift("color-profile", severity, seed=2)
    out = t(tiles)
    target = t.values["delta_e"]
    for a, b in zip(_np(tiles), _np(out)):
        keep = a.min(-1) < 0.9
        de = deltaE_ciede2000(rgb2lab(a), rgb2lab(b))[keep].mean()
        assert abs(de - target) / target < 0.1, (de, target)  # fitted on a pixel sample; 10 %
    white = torch.ones(1, 3, 8, 8)
    assert torch.allclose(shiftkit.get_shift("color-profile", 5, seed=0)(white), white, atol=1e-5)  # white kept


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(DISTANCE))
def test_cpu_equals_cuda_for_the_same_parameters(name, tiles):
    t = shiftkit.get_shift(name, 3, seed=0)
    cpu = t(tiles)
    gpu = t.to("cuda")(tiles.cuda(), params={k: v for k, v in t._params.items()}).cpu()
    d = (cpu - gpu).abs()
    if name == "stain-hue" or name.startswith("scanner-profile"):
        # per-tile stain estimation (a percentile of the data) and noise drawn after device-rounded kernels: a
        # device's rounding may move a pixel across a percentile or a Poisson step (measured on CPU with 1e-6 input
        # noise: stain-hue 0.003 % of pixels beyond 1.5/255), so almost every pixel, not every one, agrees
        assert (d > 1.5 / 255).float().mean() < 1e-3 and d.mean() < 1e-3
    else:
        tol = 1.5 / 255 if name in ("jpeg", "jpeg-reencode", "jpeg2000") else 1e-4
        assert d.max() <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opencv_filters_on_cpu_equal_the_grouped_conv_route(dtype):
    """On CPU without gradients the PSF kernels run OpenCV's filter2D/sepFilter2D per plane; with gradients the
    grouped conv2d of every device. Same correlation, same reflect-101 border; identity samples kept exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 40, 48, generator=g, dtype=dtype)
    cases = [(K.gaussian_blur, torch.tensor([0.0, 0.7, 1.5, 3.0])), (K.disk_blur, torch.tensor([2.5, 0.0, 1.0, 4.0])),
             (K.motion_blur, torch.tensor([1.0, 3.0, 6.5, 12.0])), (K.unsharp_mask, torch.tensor([0.0, 0.5, 1.0, 2.0]))]
    for fn, p in cases:
        fast = fn(x, p)
        with torch.enable_grad():
            slow = fn(x.clone().requires_grad_(), p)
        assert slow.requires_grad and fast.dtype == dtype
        assert (fast - slow.detach()).abs().max() < (1e-6 if dtype == torch.float32 else 1e-12), fn.__name__
        same = (p <= 0) if fn is not K.motion_blur else (p <= 1)
        for i in torch.nonzero(same).flatten().tolist():
            assert torch.equal(fast[i], x[i]), fn.__name__  # the identity parameter returns the input bit for bit


def test_codec_quantisation_equals_torch_rounding():
    """The JPEG/JPEG 2000 kernels quantise with OpenCV (threshold + convertScaleAbs) and dequantise by a table:
    the same bytes and floats as torch's clamp · 255 · round (half to even) and k / 255."""
    k = torch.arange(256, dtype=torch.float32)
    x = torch.cat([k / 255, (k + 0.5) / 255, (k - 0.5) / 255, torch.tensor([-0.3, -1e-9, 1.0 + 1e-6, 7.0])])
    x = x.repeat(3).view(1, 3, 1, -1)
    ref = (x.clamp(0, 1) * 255).round().byte().numpy()
    assert np.array_equal(K._planar_u8(x), ref)
    assert np.array_equal(K._planar_u8(x[..., ::2]), ref[..., ::2])  # non-contiguous input
    planes = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16).repeat(3, 1)
    assert torch.equal(K._from_planar_u8(planes, "cpu", torch.float32), torch.from_numpy(planes).float() / 255.0)
    assert torch.equal(K._from_planar_u8(planes, "cpu", torch.float64), torch.from_numpy(planes).double() / 255.0)
