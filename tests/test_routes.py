"""The 8-bit CPU route of the shifts ("uint8-cpu") against the float route: which shifts take it, how close the two
routes are (equal bytes for the codecs and the tone curves, within one level for the filters and saturation, a
stated small tolerance for resampling and for the composites), the 8-bit noise sampler against the exact
Poisson–Gaussian model, replay per route, and that simulate, ShiftedDataset and the stress test take the same
route for the same tiles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from shiftkit.data import ShiftedDataset, load_sample_tiles, read_image, simulate
from shiftkit.data.shifted import sample_seed, shift_route, shift_routes, shift_tiles
from shiftkit.functional import scanner_u8 as U
from shiftkit.shifts import get_spec, list_shifts
from shiftkit.shifts.routes import apply_u8, has_u8_route

#: the shifts with an 8-bit kernel and what the 8-bit route must match against round(255 · float route(x / 255)):
#: "equal" (every byte), "one" (no pixel off by more than one level), or "resample" (mean under 0.4 levels,
#: under 0.3 % of values off by more than one level, none by more than 8: the 8-bit route rounds the
#: down-sampled image to 8 bits before the bicubic up-sampling, which overshoots at edges)
TOLERANCE = {"jpeg": "equal", "jpeg-reencode": "equal", "jpeg2000": "equal", "exposure": "equal", "gamma": "equal",
             "white-balance": "equal", "section-thickness": "equal", "gaussian-defocus": "one", "disk-defocus": "one",
             "motion-blur": "one", "saturation": "one", "resample": "resample", "stitching-seam": "equal",
             "vignetting": "one", "sharpening": "one"}
#: shifts whose 8-bit route draws its own noise (the 8-bit sampler): tested by distribution, not pixel by pixel
RANDOM_U8 = {"sensor-noise", "scanner-profile-a"}
#: composites on the 8-bit route against the float route, noise switched off, in levels: (mean |difference| before
#: the final JPEG, max before it, mean |difference| after it). Profile A rounds after its blur and after its tone
#: curves (measured 0.29–0.32 mean, max 2, then 0.55–0.94 after JPEG, which turns sub-level differences into
#: block-level ones); profile B chains blur, vignetting, saturation and sharpening in float32 per tile and rounds
#: once (measured 0.000, max 1; 0.000–0.004 after its JPEG re-encoding)
COMPOSITES = {"scanner-profile-a": (0.4, 2, 1.2), "scanner-profile-b": (0.01, 1, 0.05)}


@pytest.fixture(scope="module")
def tiles_u8():
    t = load_sample_tiles()[[0, 3, 5, 9, 14]]
    return torch.from_numpy(np.ascontiguousarray(t)).permute(0, 3, 1, 2).contiguous()


def test_the_routed_shifts_are_the_ones_with_a_stated_tolerance():
    assert sorted(n for n in list_shifts() if has_u8_route(get_spec(n))) == sorted(
        set(TOLERANCE) | RANDOM_U8 | set(COMPOSITES))


@pytest.mark.parametrize("name", sorted(TOLERANCE))
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_the_8bit_route_matches_the_float_route(tiles_u8, name, severity):
    seeds = [sample_seed(3, name, severity, str(i)) for i in range(len(tiles_u8))]
    assert shift_route(name, tiles_u8) == "uint8-cpu"
    a, drawn_a = shift_tiles(tiles_u8, name, severity, seeds)
    f, drawn_f = shift_tiles(tiles_u8.float() / 255, name, severity, seeds)
    assert a.dtype == torch.uint8 and a.shape == tiles_u8.shape and drawn_a == drawn_f
    b = (f.clamp(0, 1) * 255).round().to(torch.uint8)
    d = (a.int() - b.int()).abs()
    if TOLERANCE[name] == "equal":
        assert int(d.max()) == 0
    elif TOLERANCE[name] == "one":
        assert int(d.max()) <= 1
    else:
        assert float(d.float().mean()) < 0.4 and float((d > 1).float().mean()) < 0.003 and int(d.max()) <= 8
    assert not torch.equal(a, tiles_u8)  # the shift did something


def test_the_saturation_closed_form_equals_kornias_hsv_round_trip():
    """Independent check of saturation_u8's formula on random colours, both directions, clamp at S = 1 included."""
    import kornia

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    factor = torch.tensor([0.5, 1.5, 2.0, 4.0])
    ours = U.saturation_u8(x, factor).astype(int)
    xf = torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255
    ref = kornia.enhance.adjust_saturation(xf, factor.double()).clamp(0, 1)
    ref = (ref * 255).round().permute(0, 2, 3, 1).numpy().astype(int)
    assert np.abs(ours - ref).max() <= 1


def test_the_lookup_table_route_is_the_float_kernel_on_every_level():
    """A pointwise kernel through pointwise_lut equals the kernel on k / 255 for all 256 levels of each channel."""
    levels = np.arange(256, dtype=np.uint8)
    x = np.stack([np.stack([levels, levels[::-1], levels], -1)[None]] * 2)  # (2, 1, 256, 3)
    params = {"gamma": torch.tensor([1.35, 1 / 1.8])}
    kernel = get_spec("gamma").kernel
    ours = U.pointwise_lut(kernel, x, params)
    ref = kernel(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, params)
    ref = (ref.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("name", sorted(COMPOSITES))
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_composites_on_the_8bit_route_stay_close_to_the_float_route_without_bias(tiles_u8, name, severity):
    """Same parameters, noise switched off (10⁹ photons, no read noise): before the final JPEG (the same
    composite without it) and after it, within the stated bounds and without bias; the shift itself is far larger."""
    from shiftkit.core.shift_registry import composite

    spec = get_spec(name)
    x8 = tiles_u8.permute(0, 2, 3, 1).contiguous().numpy()
    params = spec.sample({k: torch.full((len(x8),), v) for k, v in spec.values(severity).items()},
                         torch.Generator().manual_seed(severity), len(x8))
    if "sensor-noise.photons" in params:
        params["sensor-noise.photons"] = torch.full((len(x8),), 1e9)
        params["sensor-noise.read_sigma"] = torch.zeros(len(x8))
    pre = composite(name + "-before-jpeg", [c.name for c in spec.components[:-1]], "", spec.held_out)
    diffs = []
    for sp in (pre, spec):
        p = {k: v for k, v in params.items() if k.split(".", 1)[0] in {c.name for c in sp.components}}
        a = apply_u8(sp, x8, p).astype(float)
        b = (sp.kernel(tiles_u8.float() / 255, p).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy()
        diffs.append(a - b)
        assert abs((a - b).mean()) < 0.05
    pre_mean, pre_max, final_mean = COMPOSITES[name]
    assert np.abs(diffs[0]).mean() < pre_mean and np.abs(diffs[0]).max() <= pre_max
    assert np.abs(diffs[1]).mean() < final_mean
    assert np.abs(a - x8).mean() > 5  # the shift: profile A 8–45 levels from the clean tile, B 7–32


@pytest.mark.parametrize("name", sorted(set(TOLERANCE) | RANDOM_U8 | set(COMPOSITES)))
def test_the_8bit_route_takes_an_empty_batch(name):
    spec = get_spec(name)
    params = spec.sample({k: torch.zeros(0) for k in spec.table}, torch.Generator().manual_seed(0), 0)
    assert apply_u8(spec, np.zeros((0, 32, 32, 3), np.uint8), params).shape == (0, 32, 32, 3)


@pytest.mark.parametrize("name", ["sensor-noise", "scanner-profile-a", "scanner-profile-b"])
def test_the_8bit_route_gives_the_same_pixels_on_one_thread_and_on_two(tiles_u8, name):
    seeds = [sample_seed(1, name, 4, str(i)) for i in range(len(tiles_u8))]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a, _ = shift_tiles(tiles_u8, name, 4, seeds)
        torch.set_num_threads(1)
        b, _ = shift_tiles(tiles_u8, name, 4, seeds)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)


def test_vignetting_shortcut_equals_the_float_kernel_on_float_tiles_dark_values_and_large_drops():
    """vignetting_f32's power-branch shortcut ``(x + 0.055)·g^(1/2.4) − 0.055`` against the float kernel on float32
    tiles with values near black (the linear branch, fixed up exactly) and drops of 0.15 (shortcut) and 1.2 (gains
    below 0: the float formula everywhere): equal to float32 rounding."""
    from shiftkit.functional.scanner import vignetting

    rng = np.random.default_rng(1)
    x = rng.random((3, 64, 48, 3), dtype=np.float32)
    x[0, :16] *= 0.06  # many values on or near sRGB's linear branch
    for drop in (0.15, 0.999, 1.2):
        d = torch.full((3,), drop)
        ours = U.vignetting_f32(x, d)
        ref = vignetting(torch.from_numpy(x).permute(0, 3, 1, 2), d).permute(0, 2, 3, 1).numpy()
        assert np.abs(ours - ref).max() < 2e-6, drop


def test_tile_map_converts_and_rounds_tile_by_tile_as_the_float_route_does():
    """uint8 input reaches the function as k·(1/255) in float32 (the image contract's values) and u8_out is
    round(255·clamp(y, 0, 1)) half to even, checked against numpy, tile by tile."""
    x8 = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    seen = {}

    def fn(i, t):
        seen[i] = t.copy()
        return t * np.float32(1.7) - np.float32(0.3)  # leaves [0, 1] on both sides
    out = U.tile_map(x8, fn, u8_out=True)
    f = x8.astype(np.float32) * np.float32(1 / 255)
    assert np.array_equal(np.stack([seen[0], seen[1]]), f)
    y = f * np.float32(1.7) - np.float32(0.3)
    assert np.array_equal(out, np.rint(np.clip(y, 0, 1) * np.float32(255)).astype(np.uint8))
    assert np.array_equal(U.tile_map(f, lambda i, t: None, u8_out=False), f)
    with pytest.raises(ValueError, match="uint8 or float32"):
        U.tile_map(x8.astype(np.float64), fn, u8_out=True)


def _level_distribution(lam, read, exact_below=math.inf):
    """P(output level k | input level v), (256, 256), of round(255·sRGB(clip(y))) for the Poisson–Gaussian model
    y = Poisson(λx)/λ + σz, from scipy (Poisson pmf, normal CDF), independent of the sampler's quantile tables.
    ``exact_below``: at and above this many expected photons y is the variance-matched normal instead (sampler 2's
    model, which both routes draw from)."""
    from scipy.stats import norm, poisson

    from shiftkit.stain.mask import srgb_to_linear

    x = srgb_to_linear(torch.arange(256, dtype=torch.float32) / 255).double().numpy()
    # linear-light boundaries between output levels: sRGB (k + 0.5)/255 decoded
    t = srgb_to_linear(torch.tensor((np.arange(255) + 0.5) / 255)).numpy()
    dist = np.zeros((256, 256))
    for v in range(256):
        m = x[v] * lam
        if m >= exact_below:
            cdf = norm.cdf((t - x[v]) / math.sqrt(x[v] / lam + read**2))
        else:
            n = np.arange(max(0, int(m - 12 * math.sqrt(m + 1) - 5)), int(m + 12 * math.sqrt(m + 1) + 30))
            pmf = poisson.pmf(n, m)
            if read > 0:
                cdf = (pmf[:, None] * norm.cdf((t[None] - n[:, None] / lam) / read)).sum(0)
            else:
                cdf = (pmf[:, None] * (n[:, None] / lam < t[None])).sum(0)
        dist[v] = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    assert np.allclose(dist.sum(1), 1)
    return dist


def _moments(dist):
    k = np.arange(256)
    mean = dist @ k
    return mean, np.sqrt(np.maximum(dist @ k**2 - mean**2, 0))


@pytest.mark.parametrize("lam,read", [(1000.0, 0.002), (200.0, 0.008), (60.0, 0.02), (100.0, 0.0)])
def test_the_8bit_noise_sampler_has_the_models_mean_and_sd_per_level(lam, read):
    """Each input level's output distribution (its 4,096 equally likely table entries) against sampler 2's model
    computed by scipy (exact counts below SHOT_EXACT_BELOW photons, the variance-matched normal above): mean
    within 0.01 level and sd within 0.3 % or 0.02 level on every level (measured: 0.006 and 0.016 at most). Against the exact Poisson model on every
    level the normal above the switch costs at most 0.15 level of mean and 3 % of sd (0.05 level where the sd is
    under 2), the float route's approximation too."""
    from shiftkit.functional.scanner import SHOT_EXACT_BELOW

    tab = U._noise_tables(lam, read)[0].reshape(256, -1).astype(float)
    mean_t, sd_t = tab.mean(1), tab.std(1)
    mean_m, sd_m = _moments(_level_distribution(lam, read, SHOT_EXACT_BELOW))
    assert np.abs(mean_t - mean_m).max() < 0.01
    assert (np.abs(sd_t - sd_m) <= np.maximum(0.003 * sd_m, 0.02)).all(), np.abs(sd_t - sd_m).max()
    mean_x, sd_x = _moments(_level_distribution(lam, read))
    assert np.abs(mean_t - mean_x).max() < 0.15
    assert (np.abs(sd_t - sd_x) <= np.maximum(0.03 * sd_x, 0.05)).all()


def test_the_8bit_noise_sampler_draws_the_tables_entries_uniformly_and_replays(tiles_u8):
    """The 12-bit draws of a tile are uniform (chi-square over 4,096 cells), differ between seeds, and replay:
    the same seed gives the same pixels alone or in a batch."""
    from scipy.stats import chisquare

    r = U.noise_draws(7, (224, 224, 3)).ravel()
    assert r.max() < 4096 and chisquare(np.bincount(r, minlength=4096)).pvalue > 1e-3
    assert not np.array_equal(r, U.noise_draws(8, (224, 224, 3)).ravel())
    x8 = tiles_u8.permute(0, 2, 3, 1).contiguous().numpy()
    n = len(x8)
    args = torch.full((n,), 200.0), torch.full((n,), 0.008), torch.arange(n) + 11
    a = U.sensor_noise_u8(x8, *args)
    one = U.sensor_noise_u8(x8[2:3], *(v[2:3] for v in args))
    assert np.array_equal(a[2:3], one) and np.array_equal(a, U.sensor_noise_u8(x8, *args))
    # a flat tile: the drawn pixels follow the table (mean and sd of 150,528 draws within 4 standard errors)
    flat = np.full((1, 224, 224, 3), 120, np.uint8)
    y = U.sensor_noise_u8(flat, *(v[:1] for v in args)).astype(float)
    row = U._noise_tables(200.0, 0.008)[0].reshape(256, -1)[120].astype(float)
    assert abs(y.mean() - row.mean()) < 4 * row.std() / math.sqrt(y.size)


def test_tone_curves_fused_into_the_noise_sampler_equal_noise_then_curves_in_distribution():
    """post at 12 bits against the unfused chain (noise rounded to 8 bits, then the curves' table) on a ramp:
    per input level the means agree within 0.15 level (the fused one skips a rounding), and the fused route never
    leaves the range of the curves' outputs."""
    levels = np.repeat(np.arange(256, dtype=np.uint8), 3 * 512).reshape(1, 256, 512, 3)
    params = {"gamma": torch.tensor([1.35])}
    kernel = get_spec("gamma").kernel
    photons, read, seed = torch.tensor([200.0]), torch.tensor([0.008]), torch.tensor([5])
    fused = U.sensor_noise_u8(levels, photons, read, seed, post=U.post_tables(lambda r: kernel(r, params), 1))
    unfused = U.pointwise_lut(kernel, U.sensor_noise_u8(levels, photons, read, seed + 1), params)
    d = fused.reshape(256, -1).mean(1) - unfused.reshape(256, -1).mean(1).astype(float)
    se = np.sqrt(fused.reshape(256, -1).var(1) * 2 / (512 * 3)) + 1e-9
    assert (np.abs(d) < 0.15 + 4 * se).all()


def test_composites_with_a_float_only_component_stay_on_the_float_route_and_round_back(tiles_u8):
    for name in ("stain-hue",):
        assert shift_route(name, tiles_u8) == "float"
        seeds = list(range(len(tiles_u8)))
        a, _ = shift_tiles(tiles_u8, name, 3, seeds)
        f, _ = shift_tiles(tiles_u8.float() / 255, name, 3, seeds)
        assert a.dtype == torch.uint8 and torch.equal(a, (f.clamp(0, 1) * 255).round().to(torch.uint8))


def test_replay_per_route_is_exact_and_independent_of_batch_mates(tiles_u8):
    seeds = [sample_seed(0, "jpeg-reencode", 4, str(i)) for i in range(len(tiles_u8))]
    a, _ = shift_tiles(tiles_u8, "jpeg-reencode", 4, seeds)
    b, _ = shift_tiles(tiles_u8, "jpeg-reencode", 4, seeds)
    one, _ = shift_tiles(tiles_u8[2:3], "jpeg-reencode", 4, seeds[2:3])
    assert torch.equal(a, b) and torch.equal(a[2:3], one)


def test_apply_u8_refuses_float_tiles_and_shifts_without_an_8bit_kernel_by_name():
    with pytest.raises(ValueError, match="gamma.*expected uint8"):
        apply_u8(get_spec("gamma"), np.zeros((1, 8, 8, 3), np.float32), {"gamma": torch.tensor([1.2])})
    with pytest.raises(ValueError, match="stain-hue.*no 8-bit route"):
        apply_u8(get_spec("stain-hue"), np.zeros((1, 8, 8, 3), np.uint8), {})


def test_the_route_follows_device_and_dtype():
    assert shift_routes(["jpeg", "stain-hue"], "cpu") == {"jpeg": "uint8-cpu", "stain-hue": "float"}
    assert shift_routes(["jpeg", "sensor-noise"], "cuda") == {"jpeg": "float", "sensor-noise": "float"}
    assert shift_route("jpeg", torch.zeros(1, 3, 8, 8)) == "float"


@pytest.fixture()
def src(tmp_path):
    from shiftkit.data import write_image

    d = tmp_path / "src"
    for i, t in enumerate(load_sample_tiles()[:3]):
        write_image(d / f"t{i}.png", t)
    return d


def test_simulate_records_routes_and_shifted_dataset_gives_its_pixels(src, tmp_path):
    names = ["jpeg", "saturation", "resample", "sensor-noise", "stain-hue"]
    simulate(src, tmp_path / "out", names, [2], seed=4)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["routes"] == {"jpeg": "uint8-cpu", "saturation": "uint8-cpu", "resample": "uint8-cpu",
                                            "sensor-noise": "uint8-cpu", "stain-hue": "float"}
    for name in names:
        ds = ShiftedDataset(src, name, 2, seed=4)
        for i in range(len(ds)):
            y, rec = ds[i]
            row = next(r for r in manifest["outputs"] if r["source"] == rec.sample_id and r["shift"] == name)
            assert np.array_equal(y.permute(1, 2, 0).numpy(), read_image(tmp_path / "out" / row["output"]))


def test_simulate_refuses_to_resume_a_run_of_another_route(src, tmp_path):
    from shiftkit.data.shifted import ConfigMismatchError

    out = tmp_path / "out"
    simulate(src, out, ["jpeg"], [1], seed=0)
    state = out / ".shiftkit" / "simulate.json"
    config = json.loads(state.read_text())
    config["routes"] = {"jpeg": "float"}  # as a CUDA run would have written it
    state.write_text(json.dumps(config))
    with pytest.raises(ConfigMismatchError, match="route of 'jpeg' \\(float -> uint8-cpu"):
        simulate(src, out, ["jpeg"], [1], seed=0)


def test_the_stress_test_shifts_what_simulate_writes(src, tmp_path):
    """Same 224² tiles, seed and device: the shifted tiles of the stress test's gallery (written from the same
    shift_tiles call whose output it embeds) are simulate's files, byte for byte; and its run records the routes."""
    from shiftkit.stress import run_stress_test

    run_stress_test(data=src, out_dir=tmp_path / "run", shifts=["gaussian-defocus"], severities=[3], seed=7,
                    label_column=None, site_column=None)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["routes"] == {"gaussian-defocus": "uint8-cpu"}
    simulate(src, tmp_path / "out", ["gaussian-defocus"], [3], seed=7)
    items = run["gallery"]
    assert items
    for item in items:
        pair = read_image(tmp_path / "run" / "gallery" / item["file"])
        shifted = pair[:, pair.shape[1] - 224:]
        assert np.array_equal(shifted, read_image(tmp_path / "out" / "gaussian-defocus" / "3" / item["tile"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(TOLERANCE) + ["scanner-profile-b"])
def test_uint8_tiles_on_cuda_take_the_float_route_within_the_stated_tolerance(tiles_u8, name):
    """simulate --device cuda and the stress test on a GPU: uint8 tiles on the device, float route, uint8 back."""
    seeds = [sample_seed(0, name, 3, str(i)) for i in range(len(tiles_u8))]
    gpu = tiles_u8.cuda()
    assert shift_route(name, gpu) == "float"
    a, _ = shift_tiles(tiles_u8, name, 3, seeds)
    g, _ = shift_tiles(gpu, name, 3, seeds)
    assert g.dtype == torch.uint8 and g.device.type == "cuda"
    d = (a.int() - g.cpu().int()).abs()
    # CPU 8-bit route vs CUDA float route: the route tolerance plus a device's float rounding (one more level)
    if name in TOLERANCE:
        limit = {"equal": 1, "one": 2}.get(TOLERANCE[name], 9)
        assert int(d.max()) <= limit and float(d.float().mean()) < 0.4
    else:  # a deterministic composite: JPEG may move a few pixels of a block a long way
        assert float(d.float().mean()) < 0.2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(RANDOM_U8))
def test_random_shifts_on_cuda_match_the_cpu_8bit_route_in_distribution(tiles_u8, name):
    """Noise drawn by the 8-bit sampler on CPU and by the float route on CUDA: the same mean (0.2 level) and the
    same spread around the clean tile (3 %), pixel values differing as independent draws do."""
    seeds = [sample_seed(0, name, 3, str(i)) for i in range(len(tiles_u8))]
    a, _ = shift_tiles(tiles_u8, name, 3, seeds)
    g, _ = shift_tiles(tiles_u8.cuda(), name, 3, seeds)
    a, g, x = a.double(), g.cpu().double(), tiles_u8.double()
    assert abs(float(a.mean() - g.mean())) < 0.2
    assert abs(float((a - x).std() / (g - x).std()) - 1) < 0.03


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_jpeg2000_refuses_tiles_too_small_for_openjpeg_by_size_on_both_routes(dtype):
    x = torch.zeros(1, 3, 16, 64, dtype=torch.uint8)
    x = x if dtype == torch.uint8 else x.float()
    with pytest.raises(ValueError, match="at least 32 px.*got 16x64"):
        shift_tiles(x, "jpeg2000", 3, [0])
    ok = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    assert shift_tiles(ok if dtype == torch.uint8 else ok.float(), "jpeg2000", 3, [0])[0].shape == (1, 3, 32, 32)
