"""ScannerTransfer, the scanner-transfer shifts, pooled source normalization and fit-scanner, on synthetic pairs with
a known colour map, blur and misregistration (and the real dev pairs where ../shared/data has them)."""

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from skimage.color import deltaE_ciede2000, lab2rgb, rgb2lab

import shiftkit
from shiftkit import ScannerTransfer, StainNormalizer
from shiftkit.cli.main import cli
from shiftkit.core.errors import InvalidArgumentError, InvalidImageError
from shiftkit.data import load_sample, load_sample_tiles, write_image
from shiftkit.transforms.scanner_transfer import ScannerTransferError

from .conftest import devices, shared

#: The known scanner change of the synthetic pairs: a 3x4 affine colour map in sRGB.
M = np.array([[0.85, 0.05, 0.02], [0.03, 0.80, 0.04], [0.02, 0.06, 0.90]])
B = np.array([0.08, 0.05, 0.06])


def scanner_b(img, blur=1.2, shift=(3, -2)):
    """``img`` as scanner B sees it: colour map, Gaussian blur (sigma px), a few pixels of misregistration."""
    x = np.clip(img.reshape(-1, 3) / 255.0 @ M.T + B, 0, 1).reshape(img.shape)
    x = cv2.GaussianBlur(x, (0, 0), blur) if blur else x
    x = np.roll(x, shift, axis=(0, 1))
    return (x * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def pairs():
    src = load_sample_tiles()[:12]
    return src, np.stack([scanner_b(x) for x in src]), [i // 4 for i in range(12)]  # 3 "slides"


def mean_de(a, b):
    return float(np.mean([deltaE_ciede2000(rgb2lab(x / 255.0), rgb2lab(y / 255.0)).mean() for x, y in zip(a, b)]))


def test_identity_transfer_changes_nothing(pairs):
    x = torch.from_numpy(pairs[0][:2]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(ScannerTransfer(seed=0)(x), x)
    assert ScannerTransfer().parts == []


def test_fit_recovers_a_known_colour_map_and_blur(pairs):
    src, dst, slides = pairs
    t = ScannerTransfer.fit(src, dst, slides=slides, parts=("colour", "mtf"), mpp=0.5, align=True)
    fit = t.profile["fit"]
    assert fit["used"] == 12 and not fit["refused"]
    for dx, dy, peak in fit["offsets_px"]:  # np.roll by (3, -2) rows/columns: dst[p] = src[p - (3, -2)]
        assert abs(dx + 2) < 0.6 and abs(dy - 3) < 0.6 and peak > 0.3
    c = fit["colour"]
    assert c["cv_delta_e2000_after"] < 0.5 * c["identity_delta_e2000"]
    out = t.augment(src)
    aligned = np.stack([np.roll(x, (-3, 2), axis=(0, 1)) for x in dst])
    assert mean_de(out, aligned) < 0.5 * mean_de(src, aligned)
    # the MTF alone, against the true one of a Gaussian blur: exp(-2 pi^2 sigma^2 f^2), down to the 8-bit noise floor
    m = ScannerTransfer.fit(src, np.stack([(np.clip(cv2.GaussianBlur(x / 255.0, (0, 0), 1.2), 0, 1) * 255).round()
                                           .astype(np.uint8) for x in src]), parts=("mtf",))
    gain = np.asarray(m.profile["mtf"]["gain"])
    f = (np.arange(len(gain)) + 0.5) / len(gain) * 0.5
    true = np.exp(-2 * np.pi ** 2 * 1.2 ** 2 * f ** 2)
    keep = true > 0.15
    assert np.abs(gain[keep] - true[keep]).max() < 0.03, np.round(gain - true, 3)
    unaligned = ScannerTransfer.fit(src, dst, slides=slides, parts=("colour",))  # the default: pairs as registered
    assert not unaligned.profile["fit"]["colour"]["aligned"]
    assert unaligned.profile["fit"]["colour"]["cv_delta_e2000_after"] > c["cv_delta_e2000_after"]


def _space(x, space):  # (N, 3) sRGB in [0, 1] to a map space, independently of shiftkit (numpy, scikit-image)
    return {"srgb": lambda v: v, "od": lambda v: -np.log(np.maximum(v, 1 / 255)), "lab": lambda v: rgb2lab(v[None])[0] / 100}[space](x)


def _unspace(y, space):
    return {"srgb": lambda v: v, "od": lambda v: np.exp(-v), "lab": lambda v: lab2rgb(v[None] * 100)[0]}[space](y)


@pytest.mark.parametrize("space", ["srgb", "od", "lab"])
@pytest.mark.parametrize("out_space", ["srgb", "od", "lab"])
def test_colour_maps_between_spaces_recover_a_known_map(space, out_space):
    """A map defined as affine from one space to another (computed with numpy and scikit-image) is recovered by the
    degree-1 fit in those spaces and reproduced by apply_colour_map on images."""
    from shiftkit.functional import transfer as T

    rng = np.random.default_rng(3)
    x = rng.uniform(0.2, 0.9, (4000, 3))
    xs, ys0 = _space(x, space), _space(x, out_space)
    # a mild known map: the least-squares affine fit of the identity between the spaces, then perturbed
    a = np.linalg.lstsq(np.c_[np.ones(len(x)), xs], ys0, rcond=None)[0]
    a[1:] = a[1:] @ (np.eye(3) + 0.04 * rng.standard_normal((3, 3)))
    a[0] += 0.01 * rng.standard_normal(3) * np.abs(ys0).mean(0)
    y = np.clip(_unspace(np.c_[np.ones(len(x)), xs] @ a, out_space), 0, 1)
    ok = (y > 0.01).all(1) & (y < 0.99).all(1)  # inside the gamut, where the map is exactly affine
    x, y = x[ok], y[ok]
    w = T.fit_colour_map(x, y, np.ones(len(x)), space, 1, ridge=1e-12, out_space=out_space)
    assert np.abs(w - a).max() < 2e-4 * max(1.0, np.abs(a).max()), np.abs(w - a).max()
    assert len(x) > 1600
    img, want = (torch.from_numpy(v[:1600].T.reshape(1, 3, 40, 40)) for v in (x, y))
    out = T.apply_colour_map(img.float(), torch.from_numpy(w), space, 1, torch.ones(1), out_space)
    assert out.dtype == torch.float32 and out.shape == img.shape
    assert (out.double() - want).abs().max() < 2e-3
    half = T.apply_colour_map(img, torch.from_numpy(w), space, 1, torch.full((1,), 0.5), out_space)
    assert torch.allclose(half, 0.5 * (img + want), atol=1e-6)


@pytest.mark.parametrize("space", ["srgb", "od", "lab"])
@pytest.mark.parametrize("out_space", ["srgb", "lab"])
def test_colour_map_is_the_polynomial_inside_its_domain_and_linear_beyond(space, out_space):
    """colour_domain is the quantiles of the pixels in the input space (numpy, scikit-image); apply_colour_map with a
    domain and a slope equals the degree-3 polynomial of the input held inside the domain plus the slope times the
    excess, in that space (computed independently); with a domain only, the polynomial of the held input; inside
    the domain exactly the map without one; without a domain the polynomial everywhere."""
    from shiftkit.functional import transfer as T

    rng = np.random.default_rng(11)
    train = rng.uniform(0.35, 0.8, (3000, 3))
    dom = T.colour_domain(train, space)
    assert dom.shape == (2, 3)
    assert np.allclose(dom, np.quantile(_space(train, space), [0.001, 0.999], axis=0), atol=1e-9)
    w = rng.normal(0, 0.3, (10, 3))
    w[0] = _space(np.full((1, 3), 0.6), out_space)[0]
    x = rng.uniform(0.0, 1.0, (1600, 3))  # many inputs outside the domain, some inside
    feats = lambda v: np.c_[np.ones(len(v)), v, v ** 2, v ** 3]  # noqa: E731
    with warnings.catch_warnings():  # scikit-image clips the negative Z of out-of-gamut CIELAB, as shiftkit does
        warnings.simplefilter("ignore", UserWarning)
        v = _space(x, space)
        held = np.clip(v, dom[0], dom[1])
        want = np.clip(_unspace(feats(held) @ w, out_space), 0, 1)
        slope = rng.normal(0, 0.5, (3, 3))
        want_linear = np.clip(_unspace(feats(held) @ w + (v - held) @ slope, out_space), 0, 1)
        unclamped = np.clip(_unspace(feats(v) @ w, out_space), 0, 1)
    img = torch.from_numpy(x.T.reshape(1, 3, 40, 40))
    got = T.apply_colour_map(img.float(), torch.from_numpy(w), space, 3, torch.ones(1), out_space, domain=dom)
    got = got[0].reshape(3, -1).T.double().numpy()
    tol = 2e-3 if "lab" in (space, out_space) else 1e-4  # float32 and Kornia's CIELAB constants vs scikit-image
    assert np.abs(got - want).max() < tol
    linear = T.apply_colour_map(img.float(), torch.from_numpy(w), space, 3, torch.ones(1), out_space, domain=dom,
                                slope=slope)[0].reshape(3, -1).T.double().numpy()
    assert np.abs(linear - want_linear).max() < tol
    assert np.abs(linear - want).max() > 0.05  # the slope matters beyond the domain
    inside = ((_space(x, space) >= dom[0]) & (_space(x, space) <= dom[1])).all(1)
    assert 20 < inside.sum() < 1000
    free = T.apply_colour_map(img.float(), torch.from_numpy(w), space, 3, torch.ones(1), out_space)[0].reshape(3, -1).T
    assert torch.equal(free[torch.from_numpy(inside)], torch.from_numpy(got[inside]).float())
    # inside, the slope's two terms cancel (S^T v - S^T c) up to float32 rounding
    assert (free[torch.from_numpy(inside)].double() - torch.from_numpy(linear[inside])).abs().max() < 1e-4
    assert np.abs(free.double().numpy() - unclamped).max() < tol
    assert np.abs(got - unclamped).max() > 0.05  # the clamp changes the outside
    with pytest.raises(InvalidArgumentError, match="pixels"):
        T.colour_domain(np.zeros((0, 3)), space)


def test_fitted_profiles_record_their_domain_and_the_affine_slope_beyond_it(pairs, tmp_path):
    """A paired fit records its colour map's input domain (inside the source tissue's range) and, as the slope beyond
    it, the affine map fitted on the same pairs (the degree-1 fit through the public API); an input outside the
    domain maps to the polynomial at the edge plus that slope times the excess (numpy); domain and slope round-trip
    through JSON and malformed ones are refused by name."""
    src, dst, slides = pairs
    t = ScannerTransfer.fit(src, dst, slides=slides, parts=("colour",), colour_candidates=[("srgb", "srgb", 3)])
    c = t.profile["colour"]
    dom, slope, w = (np.asarray(c[k]) for k in ("domain", "beyond_slope", "weights"))
    assert t.profile["fit"]["colour"]["domain_quantiles"] == [0.001, 0.999]
    px = src.reshape(-1, 3) / 255.0
    assert (dom[0] >= px.min(0)).all() and (dom[1] <= px.max(0)).all() and (dom[0] < dom[1]).all()
    affine = ScannerTransfer.fit(src, dst, slides=slides, parts=("colour",), colour_candidates=[("srgb", "srgb", 1)])
    assert np.allclose(slope, np.asarray(affine.profile["colour"]["weights"])[1:], atol=1e-12)
    x = torch.rand(2, 3, 16, 16)
    v = x.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    held = np.clip(v, dom[0], dom[1])
    assert (held != v).any()
    want = np.clip(np.c_[np.ones(len(v)), held, held ** 2, held ** 3] @ w + (v - held) @ slope, 0, 1)
    got = t(x).permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    assert np.abs(got - want).max() < 1e-5
    back = ScannerTransfer.load(t.save(tmp_path / "p.json"))
    assert back.profile["colour"] == t.profile["colour"] and torch.equal(back(x), t(x))
    for key, bad in (("domain", [[0, 0, 0]]), ("domain", [[0.5, 0, 0], [0.4, 1, 1]]),
                     ("domain", [[0, 0, float("nan")], [1, 1, 1]]), ("beyond_slope", [[1, 0, 0], [0, 1, 0]])):
        with pytest.raises(InvalidArgumentError, match=f"colour {key}"):
            ScannerTransfer({**t.profile, "colour": {**c, key: bad}})
    with pytest.raises(InvalidArgumentError, match="beside a domain"):
        ScannerTransfer({**t.profile, "colour": {k: v for k, v in c.items() if k != "domain"}})


def test_background_weight_decides_whether_light_blocks_shape_the_colour_map(pairs):
    """Recolouring the destination's light blocks (L* >= 90, staying light; light in the source too) leaves a
    tissue-only fit (background_weight 0, the default) unchanged to the last bit and moves a fit that weights them;
    the weight is recorded and a bad one refused by name."""
    from shiftkit.functional.transfer import block_means

    src, dst, slides = pairs
    lab = lambda d: rgb2lab(block_means(d))[..., 0]  # noqa: E731
    light = [np.repeat(np.repeat((lab(d) >= 90) & (lab(x) >= 85), 8, 0), 8, 1) for x, d in zip(src, dst)]
    assert sum(m.sum() for m in light) > 64 * 20
    pink = dst.copy()
    for d, m in zip(pink, light):
        d[m] = np.clip(d[m].astype(int) + [0, -5, 2], 0, 255).astype(np.uint8)
    assert all(((lab(a) >= 85) == (lab(b) >= 85)).all() for a, b in zip(dst, pink))  # the same blocks are tissue
    fits = {(bw, k): ScannerTransfer.fit(src, d, slides=slides, parts=("colour",), background_weight=bw,
                                         colour_candidates=[("srgb", "srgb", 3)])
            for bw in (0.0, 1.0) for k, d in (("orig", dst), ("pink", pink))}
    w = {k: np.asarray(t.profile["colour"]["weights"]) for k, t in fits.items()}
    assert np.array_equal(w[0.0, "orig"], w[0.0, "pink"])
    assert np.abs(w[1.0, "orig"] - w[1.0, "pink"]).max() > 1e-3
    assert fits[1.0, "orig"].profile["fit"]["colour"]["background_weight"] == 1.0
    for bad in (-0.5, float("nan"), "1"):
        with pytest.raises(InvalidArgumentError, match="background_weight"):
            ScannerTransfer.fit(src, dst, slides=slides, parts=("colour",), background_weight=bad)


def test_fit_region_is_tissue_in_either_scan_or_the_destinations(pairs):
    """The colour map is fitted on the 8x8 blocks that are tissue (L* < 85, scikit-image CIELAB of block means) in the
    destination by default, or in either scan: recolouring the source where it is tissue and its twin is light moves
    an "either" fit and leaves the default fit unchanged to the last bit; recolouring it where both scans are light
    (and stay light) moves neither. The region is recorded; a bad one is refused by name."""
    src, dst, slides = pairs
    blocks = lambda x: rgb2lab(x.reshape(28, 8, 28, 8, 3).mean(axis=(1, 3)) / 255.0)[..., 0]  # noqa: E731
    ls, ld = [blocks(x) for x in src], [blocks(d) for d in dst]
    px = lambda m: np.repeat(np.repeat(m, 8, 0), 8, 1)  # noqa: E731

    def recolour(masks, delta):
        out = src.copy()
        for x, m in zip(out, masks):
            x[m] = np.clip(x[m].astype(int) + delta, 0, 255).astype(np.uint8)
        return out

    src_only = [px((a < 85) & (b >= 85)) for a, b in zip(ls, ld)]
    both_light = [px((a >= 90) & (b >= 85)) for a, b in zip(ls, ld)]
    assert sum(m.sum() for m in src_only) >= 64 * 30 and sum(m.sum() for m in both_light) >= 64 * 100
    moved, light = recolour(src_only, [12, -12, 0]), recolour(both_light, [0, -3, 2])
    assert all(((blocks(x) < 85) == (a < 85)).all() for x, a in zip(light, ls))  # the light blocks stay light
    assert all(((blocks(x) < 85) == (a < 85)).all() for x, a in zip(moved, ls))  # and tissue stays tissue

    def weights(s, **kw):
        t = ScannerTransfer.fit(s, dst, slides=slides, parts=("colour",), colour_candidates=[("srgb", "srgb", 3)], **kw)
        return t.profile["fit"]["colour"]["fit_region"], np.asarray(t.profile["colour"]["weights"])

    region, dest = weights(src)
    assert region == "destination"
    assert np.array_equal(weights(moved)[1], dest) and np.array_equal(weights(light)[1], dest)
    region, either = weights(src, fit_region="either")
    assert region == "either" and np.abs(either - dest).max() > 1e-6
    assert np.abs(weights(moved, fit_region="either")[1] - either).max() > 1e-3
    assert np.array_equal(weights(light, fit_region="either")[1], either)
    for bad in ("source", None, 1):
        with pytest.raises(InvalidArgumentError, match="fit_region"):
            ScannerTransfer.fit(src, dst, slides=slides, parts=("colour",), fit_region=bad)


def test_a_colour_map_that_folds_lightness_is_reported(pairs):
    """A fit records the share of its training tissue pixels that come out > 1 L* lighter when made 15 % darker:
    0 for the known (monotone) affine scanner of the synthetic pairs; for pairs whose destination folds every channel
    below 0.3 upwards (darker in, lighter out) it is over 1 %, the transfer applied to the source tiles and their
    darker versions shows the fold (scikit-image CIELAB), and the fit report warns."""
    src, dst, slides = pairs
    one = [("srgb", "srgb", 3)]
    ok = ScannerTransfer.fit(src, dst, slides=slides, parts=("colour",), colour_candidates=one)
    assert ok.profile["fit"]["colour"]["lighter_when_darker"] == 0.0
    folded = np.stack([(np.clip(0.3 + np.abs(x / 255.0 - 0.3), 0, 1) * 255).round().astype(np.uint8) for x in src])
    bad = ScannerTransfer.fit(src, folded, slides=slides, parts=("colour",), colour_candidates=one)
    assert bad.profile["fit"]["colour"]["lighter_when_darker"] > 0.01

    def lighter(t):
        darker = np.stack([(np.exp(np.log(np.clip(x / 255.0, 1 / 255, 1)) * 1.15) * 255).round().astype(np.uint8)
                           for x in src])
        lab_in, lab_out, lab_dark = (rgb2lab(v / 255.0)[..., 0] for v in (src, t.augment(src), t.augment(darker)))
        return float(((lab_dark - lab_out) > 1.0)[lab_in < 85].mean())

    assert lighter(ok) < 0.001 and lighter(bad) > 0.005
    from shiftkit.cli.main import scanner_fit_report

    assert "WARNING: the map folds" in scanner_fit_report(bad.profile)
    report = scanner_fit_report(ok.profile)
    assert "Lightness order: 0.00 % of the training tissue pixels" in report and "WARNING" not in report


def test_bundled_profiles_carry_a_domain_and_map_within_it_as_fitted():
    """The shipped scanners5 profiles record a domain and a slope beyond it (make_bundled_profiles.py --add-domain,
    their maps unchanged); inside the domain each applies its polynomial exactly as fitted (numpy)."""
    from shiftkit.shifts.transfer import PROFILES_DIR

    paths = sorted(PROFILES_DIR.glob("scanners5-*.json"))
    assert len(paths) == 4
    for path in paths:
        t = ScannerTransfer.load(path)
        c = t.profile["colour"]
        dom, w = np.asarray(c["domain"]), np.asarray(c["weights"])
        assert np.asarray(c["beyond_slope"]).shape == (3, 3) and (dom[0] < dom[1]).all()
        inside = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (1, 3, 8, 8)))
        inside = dom[0].reshape(1, 3, 1, 1) + inside.numpy() * (dom[1] - dom[0]).reshape(1, 3, 1, 1)
        v = torch.from_numpy(inside)
        rgb = torch.exp(-v) if c["space"] == "od" else v
        u = inside.transpose(0, 2, 3, 1).reshape(-1, 3)
        y = np.c_[np.ones(len(u)), u, u ** 2, u ** 3] @ w
        want = np.clip(np.exp(-y) if c["space"] == "od" else y, 0, 1)
        got = t(rgb.float()).permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
        assert np.abs(got - want).max() < 1e-4, path.name


def test_fitted_colour_map_keeps_darker_tissue_darker_on_another_cohort():
    """Fitted Hamamatsu -> Aperio on the 60 MITOS dev pairs (a cubic, chosen by cross-validation), the transfer keeps
    lightness monotone on Kather 2016 colorectal tiles, whose staining is darker than anything in the fit: at most
    1 % of tissue pixels get > 1 L* lighter when the input gets 15 % more optical density (0.00 % measured). Without
    the domain the same weights failed this on 13 % (experiments/scanner_transfer/domain_check.py)."""
    from PIL import Image

    folder = shared("mitos_scanner_pairs_dev")
    kather = shared("kather2016_8classes")
    a_files = sorted((folder / "aperio").glob("A*.png"))
    rd = lambda p: np.array(Image.open(p).convert("RGB"))  # noqa: E731
    a = np.stack([rd(p) for p in a_files])
    h = np.stack([rd(folder / "hamamatsu" / ("H" + p.name[1:])) for p in a_files])
    t = ScannerTransfer.fit(h, a, slides=[p.name[1:3] for p in a_files], parts=("colour",))
    tiles = [rd(p) for p in sorted(kather.glob("0[1-8]*/*.tif"))]
    assert len(tiles) >= 16
    px = np.concatenate([x.reshape(-1, 3) for x in tiles])[::3] / 255.0
    x = torch.tensor(px, dtype=torch.float32).T.reshape(1, 3, -1, 1).clamp(1 / 255, 1)
    darker = torch.exp(torch.log(x) * 1.15)
    lab = lambda v: rgb2lab(v[0, :, :, 0].T.numpy().reshape(-1, 1, 3))[:, 0, 0]  # noqa: E731
    tissue = lab(x) < 85
    lighter = ((lab(t(darker)) - lab(t(x))) > 1.0)[tissue].mean()
    assert tissue.sum() > 10000 and lighter < 0.01, lighter


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("spaces", [("srgb", "od"), ("od", "lab"), ("lab", "lab")])
def test_colour_map_gives_the_same_result_on_every_device(device, spaces):
    """A degree-3 map between spaces, in float32 on ``device`` and float64 on the CPU, without and with an input domain
    and a slope beyond it: within 1e-4, same device and dtype out (runs on CUDA as a gpu test where there is one)."""
    from shiftkit.functional import transfer as T

    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.uniform(0.1, 0.95, (2, 3, 32, 32)))
    w = T.fit_colour_map(x.permute(0, 2, 3, 1).reshape(-1, 3).numpy(),
                         np.clip(x.permute(0, 2, 3, 1).reshape(-1, 3).numpy() ** 1.1 * 0.95, 0, 1),
                         np.ones(2048), spaces[0], 3, out_space=spaces[1])
    s = torch.tensor([1.0, 0.6])
    ref = T.apply_colour_map(x, torch.from_numpy(w), spaces[0], 3, s, spaces[1])
    got = T.apply_colour_map(x.float().to(device), torch.from_numpy(w), spaces[0], 3, s.to(device), spaces[1])
    assert got.device.type == device and got.dtype == torch.float32
    assert (got.cpu().double() - ref).abs().max() < 1e-4
    # with a domain narrower than the inputs and a slope beyond it
    dom = T.colour_domain(rng.uniform(0.3, 0.8, (500, 3)), spaces[0])
    slope = torch.from_numpy(rng.normal(0, 0.2, (3, 3)))
    ref = T.apply_colour_map(x, torch.from_numpy(w), spaces[0], 3, s, spaces[1], dom, slope)
    got = T.apply_colour_map(x.float().to(device), torch.from_numpy(w), spaces[0], 3, s.to(device), spaces[1], dom,
                             slope.to(device))
    assert got.device.type == device and (got.cpu().double() - ref).abs().max() < 1e-4


def test_colour_space_is_chosen_by_cross_validation_and_old_profiles_still_load(pairs):
    """Every candidate of input space x output space x degree is cross-validated, cheapest first (the affine sRGB
    map first); the profile's map is the best; a profile written before output spaces existed maps within its one
    space; an unknown space or candidate list is refused."""
    from shiftkit.transforms.scanner_transfer import COLOUR_CANDIDATES

    src, dst, slides = pairs
    keys = [f"{i}-{o}-{d}" for i, o, d in COLOUR_CANDIDATES]
    assert len(set(keys)) == 27 and keys[0] == "srgb-srgb-1" and keys[-1] == "lab-lab-3"
    t = ScannerTransfer.fit(src, dst, slides=slides, parts=("colour",))
    c = t.profile["fit"]["colour"]
    cv = c["cv_delta_e2000"]
    assert sorted(cv) == sorted(keys)
    assert c["chosen"] == min(keys, key=cv.get) and c["cv_delta_e2000_after"] == min(cv.values())
    fast = ScannerTransfer.fit(src, dst, slides=slides, parts=("colour",), colour_candidates=[("srgb", "od", 2), ("od", "od", 1)])
    assert sorted(fast.profile["fit"]["colour"]["cv_delta_e2000"]) == ["od-od-1", "srgb-od-2"]
    assert fast.profile["fit"]["colour"]["cv_delta_e2000"]["srgb-od-2"] == pytest.approx(cv["srgb-od-2"], abs=1e-9)
    for bad in ([], [("srgb", "hsv", 1)], [("srgb", "od", 0)], ["srgb"]):
        with pytest.raises(InvalidArgumentError, match="colour_candidates"):
            ScannerTransfer.fit(src, dst, slides=slides, parts=("colour",), colour_candidates=bad)
    prof = t.profile["colour"]
    assert f"{prof['space']}-{prof['out_space']}-{prof['degree']}" == c["chosen"]
    old = {**t.profile, "parts": ["colour"], "colour": {"space": "od", "degree": 1,
                                                        "weights": [[0.1, 0.0, 0.0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]}}
    x = torch.from_numpy(src[:2]).permute(0, 3, 1, 2).float() / 255
    got = ScannerTransfer(old)(x)
    want = (x.clamp_min(1 / 255) * np.exp(-0.1)).where(torch.arange(3).view(1, 3, 1, 1) == 0, x.clamp_min(1 / 255))
    assert (got - want).abs().max() < 1e-5
    with pytest.raises(InvalidArgumentError, match="out_space"):
        ScannerTransfer({**old, "colour": {**old["colour"], "out_space": "hsv"}})


def test_l1_colour_fit_resists_outlying_blocks_where_least_squares_does_not():
    """A known affine sRGB map with a fifth of the rows pushed far off (as misregistered edges or a scanner's artefact
    would): the ``"l1"`` fit recovers the map and has a lower sum of Euclidean residual lengths than least squares,
    which the outliers pull away; without outliers the two agree; an unknown loss is refused."""
    from shiftkit.functional import transfer as T

    rng = np.random.default_rng(3)
    x = rng.uniform(0.2, 0.8, (4000, 3))
    a = np.r_[B[None], M.T]  # (4, 3): constant row, then the linear part
    y = np.c_[np.ones(len(x)), x] @ a + 0.003 * rng.standard_normal((len(x), 3))
    bad = rng.random(len(x)) < 0.2
    y_out = y.copy()
    y_out[bad] -= rng.uniform(0.15, 0.3, (bad.sum(), 3))  # one-sided: darker, as dust or a fold would be
    y_out = np.clip(y_out, 0, 1)
    w = np.ones(len(x))
    l2 = T.fit_colour_map(x, y_out, w, "srgb", 1, ridge=1e-9)
    l1 = T.fit_colour_map(x, y_out, w, "srgb", 1, ridge=1e-9, loss="l1")
    feats = np.c_[np.ones(len(x)), x]
    assert np.abs(l1 - a).max() < 0.01 and np.abs(l2 - a).max() > 0.03
    cost = lambda coef: np.linalg.norm(feats @ coef - y_out, axis=1).sum()  # noqa: E731
    assert cost(l1) < cost(l2)
    clean = T.fit_colour_map(x, y, w, "srgb", 1, ridge=1e-9, loss="l1")
    assert np.abs(clean - T.fit_colour_map(x, y, w, "srgb", 1, ridge=1e-9)).max() < 2e-3
    with pytest.raises(InvalidArgumentError, match="loss"):
        T.fit_colour_map(x, y, w, "srgb", 1, loss="huber")


def test_colour_losses_are_cross_validated_when_asked(pairs):
    """``colour_losses=("l2", "l1")`` cross-validates every candidate under both losses (the l1 ones named ``-l1``);
    the chosen one is the best and its loss is recorded; the default fits least squares only; bad lists are refused."""
    src, dst, slides = pairs
    cands = [("srgb", "srgb", 1), ("srgb", "srgb", 3)]
    both = ScannerTransfer.fit(src, dst, slides=slides, parts=("colour",), colour_candidates=cands, colour_losses=("l1", "l2"))
    cv = both.profile["fit"]["colour"]["cv_delta_e2000"]
    assert list(cv) == ["srgb-srgb-1", "srgb-srgb-1-l1", "srgb-srgb-3", "srgb-srgb-3-l1"]  # least squares first
    chosen = both.profile["fit"]["colour"]["chosen"]
    assert chosen == min(cv, key=cv.get)
    assert both.profile["colour"]["loss"] == ("l1" if chosen.endswith("-l1") else "l2")
    only = ScannerTransfer.fit(src, dst, slides=slides, parts=("colour",), colour_candidates=cands)
    assert list(only.profile["fit"]["colour"]["cv_delta_e2000"]) == ["srgb-srgb-1", "srgb-srgb-3"]
    assert only.profile["fit"]["colour"]["cv_delta_e2000"]["srgb-srgb-3"] == pytest.approx(cv["srgb-srgb-3"], abs=1e-9)
    for bad in ([], ["l3"], "l1"):
        with pytest.raises(InvalidArgumentError, match="colour_losses"):
            ScannerTransfer.fit(src, dst, slides=slides, parts=("colour",), colour_losses=bad)


def test_relative_mtf_is_monotone_from_one_and_keeps_a_monotone_ratio():
    """Towards a blurrier scanner the gain falls from g(0) = 1 and never exceeds 1, even when the measured ratio has a
    low-frequency excess (as the real pairs show after the colour map); towards a sharper one it rises and never
    drops below 1; a ratio that is already monotone (a Gaussian blur's MTF) is kept as measured."""
    from shiftkit.functional import transfer as T

    k = T.MTF_BINS
    f = (np.arange(k) + 0.5) / k * 0.5
    src = [np.exp(-f * 20.0) * c for c in (1.0, 2.0, 0.5)]
    blur = np.exp(-2 * np.pi ** 2 * 1.2 ** 2 * f ** 2)
    bump = 1 + 0.5 * np.exp(-((f - 0.04) / 0.02) ** 2)  # a low-frequency excess, peak 1.5
    g = T.relative_mtf(src, [p * (blur * bump) ** 2 for p in src])
    assert g[0] == 1.0 and (np.diff(g) <= 1e-12).all() and g.max() <= 1.0
    assert np.abs(g[f > 0.15] - blur[f > 0.15]).max() < 0.02  # the optical fall-off beyond the bump is the blur's
    keep = T.relative_mtf(src, [p * blur ** 2 for p in src])
    assert np.abs(keep[1:] - blur[1:]).max() < 0.02
    sharp = T.relative_mtf(src, [p * (1 + 2 * f) ** 2 * (2 - bump) ** 2 for p in src])  # rising, with a low-f dip
    assert sharp[0] == 1.0 and (np.diff(sharp) >= -1e-12).all() and sharp.min() >= 1.0 and sharp.max() <= 4.0
    assert np.isfinite(T.relative_mtf(src, [np.zeros(k) for _ in src])).all()


@pytest.mark.parametrize("device", devices())
def test_mtf_filter_at_full_strength_equals_the_per_sample_path(device):
    """Strength 1 everywhere takes a shortcut (no per-sample power of the gain): the same result as a batch that
    mixes strengths, and as a radial filter built independently with numpy (a gpu test on CUDA)."""
    from shiftkit.functional import transfer as T

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 48, generator=gen)
    gain = torch.linspace(1.0, 0.3, T.MTF_BINS)
    full = T.mtf_filter(x.to(device), gain, torch.ones(2)).cpu()
    mixed = T.mtf_filter(x.to(device), gain, torch.tensor([1.0, 0.5])).cpu()
    torch.testing.assert_close(mixed[0], full[0], atol=1e-6, rtol=0)
    fy, fx = np.fft.fftfreq(40)[:, None], np.fft.rfftfreq(48)[None, :]
    r = np.minimum(np.sqrt(fx ** 2 + fy ** 2), 0.5)
    centres = (np.arange(T.MTF_BINS) + 0.5) / T.MTF_BINS * 0.5
    filt = np.interp(r, centres, gain.numpy())
    ref = np.clip(np.fft.irfft2(np.fft.rfft2(x.numpy().astype(np.float64)) * filt, s=(40, 48)), 0, 1)
    np.testing.assert_allclose(full.numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("size", [(40, 48), (41, 47), (33, 32), (2, 3), (5, 4), (1, 1)])
def test_mtf_filter_matches_numpy_on_odd_and_even_sizes_at_any_strength(size):
    """The filter equals a radial filter built with numpy's FFT in float64 for odd and even sides and per-sample
    strengths; a non-contiguous ``out`` gets the same values; an empty batch passes through."""
    from shiftkit.functional import transfer as T

    h, w = size
    x = torch.rand(3, 3, h, w, generator=torch.Generator().manual_seed(1))
    gain = torch.linspace(1.0, 2.5, T.MTF_BINS)
    strength = torch.tensor([1.0, 0.5, 0.0])
    got = T.mtf_filter(x, gain, strength)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    r = np.minimum(np.sqrt(fx ** 2 + fy ** 2), 0.5)
    centres = (np.arange(T.MTF_BINS) + 0.5) / T.MTF_BINS * 0.5
    filt = np.maximum(np.interp(r, centres, gain.numpy()), 1e-6)
    for i, s in enumerate(strength.tolist()):
        ref = np.clip(np.fft.irfft2(np.fft.rfft2(x[i].numpy().astype(np.float64)) * filt ** s, s=(h, w)), 0, 1)
        np.testing.assert_allclose(got[i].numpy(), ref, atol=2e-6)
    out = torch.zeros(3, 3, h, 2 * w)[..., ::2]
    assert T.mtf_filter(x, gain, strength, out=out) is out and torch.equal(out, got)
    assert T.mtf_filter(x[:0], gain, strength[:0]).shape == (0, 3, h, w)
    assert torch.equal(got[2], x[2])  # strength 0: the input itself, not an FFT round trip of it


def test_a_rising_mtf_leaves_the_coarse_scales_alone_and_is_capped():
    """Towards a sharper scanner the gain is 1 below low_band[0], the measured (monotone) ratio beyond low_band[1],
    monotone in between, and never above max_gain; a falling gain ignores the band; a bad band is an error."""
    from shiftkit.functional import transfer as T

    k = T.MTF_BINS
    f = (np.arange(k) + 0.5) / k * 0.5
    src = [np.exp(-f * 20.0) * c for c in (1.0, 2.0, 0.5)]
    ratio = 1.3 + 6 * f  # 1.3 already at the lowest frequencies, like the colour map's contrast shrinkage
    g = T.relative_mtf(src, [p * ratio ** 2 for p in src], max_gain=10.0, low_band=(0.05, 0.15))
    assert (g[f < 0.05] == 1.0).all() and (np.diff(g) >= -1e-12).all()
    np.testing.assert_allclose(g[f > 0.15], ratio[f > 0.15], rtol=1e-6)
    capped = T.relative_mtf(src, [p * ratio ** 2 for p in src], max_gain=2.0, low_band=(0.05, 0.15))
    np.testing.assert_allclose(capped, np.minimum(g, 2.0), rtol=1e-6)
    blur = np.exp(-2 * np.pi ** 2 * 1.2 ** 2 * f ** 2)
    falling = T.relative_mtf(src, [p * blur ** 2 for p in src], low_band=(0.05, 0.15))
    assert np.abs(falling[1:] - blur[1:]).max() < 0.02  # the band does not apply to a blur
    with pytest.raises(InvalidArgumentError, match="low_band"):
        T.relative_mtf(src, src, low_band=(0.2, 0.1))


def test_the_mtf_cap_is_chosen_by_cross_validation_towards_a_sharper_scanner(pairs):
    """Towards a sharper scanner (an unsharp mask with a large gain at fine scales) the cross-validated cap brings the
    held-out outputs' sharpness (Laplacian variance, as score_pairs.py) nearer the twins' than the smallest cap does;
    a fixed cap is used as given; a bad cap is an error."""
    src = pairs[0]

    def sharpen(x):
        y = x / 255.0
        return (np.clip(y + 3.0 * (y - cv2.GaussianBlur(y, (0, 0), 1.0)), 0, 1) * 255).round().astype(np.uint8)

    def lapvar(x):
        return cv2.Laplacian(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float64), cv2.CV_64F).var()

    dst = np.stack([sharpen(x) for x in src])
    slides = [i // 4 for i in range(len(src))]
    t = ScannerTransfer.fit(src[:8], dst[:8], slides=slides[:8], parts=("mtf",))
    fixed = ScannerTransfer.fit(src[:8], dst[:8], slides=slides[:8], parts=("mtf",), mtf_max_gain=1.5)
    rep = t.profile["fit"]["mtf"]
    assert rep["max_gain_chosen_by_cv"] and rep["max_gain"] > 1.5
    assert fixed.profile["fit"]["mtf"]["max_gain"] == 1.5 and not fixed.profile["fit"]["mtf"]["max_gain_chosen_by_cv"]
    err = lambda m: abs(np.mean([np.log(lapvar(o) / lapvar(y)) for o, y in zip(m.augment(src[8:]), dst[8:])]))
    assert err(t) < 0.5 * err(fixed)
    for bad in (0.5, "4", float("nan")):
        with pytest.raises(InvalidArgumentError, match="mtf_max_gain"):
            ScannerTransfer.fit(src[:8], dst[:8], parts=("mtf",), mtf_max_gain=bad)


def test_the_mtf_is_measured_on_tissue_only():
    """A Gaussian blur between the scanners, and a background the two scanners fill with different noise (scanner B's
    8x noisier): the relative MTF measured over tissue only stays within 0.05 of the true blur's MTF down to the
    8-bit floor, where the whole-image spectra would be pulled towards the noise ratio (tested against
    exp(-2 pi^2 sigma^2 f^2))."""
    rng = np.random.default_rng(0)

    def scan(x, noise, blur):
        y = cv2.GaussianBlur(x / 255.0, (0, 0), blur) if blur else x / 255.0
        y[:, :100] = 0.92 + rng.normal(0, noise, y[:, :100].shape)  # background
        return (np.clip(y, 0, 1) * 255).round().astype(np.uint8)

    src = load_sample_tiles()[:12]
    a = np.stack([scan(x, 0.004, 0) for x in src])
    b = np.stack([scan(x, 0.03, 1.2) for x in src])
    gain = np.asarray(ScannerTransfer.fit(a, b, parts=("mtf",)).profile["mtf"]["gain"])
    f = (np.arange(len(gain)) + 0.5) / len(gain) * 0.5
    true = np.exp(-2 * np.pi ** 2 * 1.2 ** 2 * f ** 2)
    keep = true > 0.15
    assert np.abs(gain[keep] - true[keep]).max() < 0.05, np.round(gain - true, 3)


def test_pairs_of_different_sizes_fit_every_part(pairs):
    """Pairs need only match within a pair: a fit over pairs of two sizes (and the cross-validated MTF cap over them)
    gives the same kind of profile as one over equal sizes, and the size-cropped pairs' MTF stays a blur."""
    src, dst, slides = pairs
    a = [x if i % 2 else x[:160, :192] for i, x in enumerate(src)]
    b = [y if i % 2 else y[:160, :192] for i, y in enumerate(dst)]
    t = ScannerTransfer.fit(a, b, slides=slides, parts=("colour", "mtf", "noise"))
    assert t.profile["fit"]["sizes"] == ["192x160", "224x224"] and "mtf" in t.parts
    gain = np.asarray(t.profile["mtf"]["gain"])
    assert gain[0] == 1.0 and gain[-1] < 0.5 and (np.diff(gain) <= 1e-12).all()
    assert np.isfinite(t.profile["fit"]["mtf"]["delta_e2000_after_cv"])


def test_bad_pairs_are_refused_by_name_and_counted(pairs):
    src, dst, _ = pairs
    far = np.roll(dst[0], 40, axis=1)
    blank = np.full_like(src[0], 245)
    ihc = cv2.resize(np.array(__import__("PIL.Image", fromlist=["Image"]).open(
        __import__("skimage").data.__path__[0] + "/ihc.png").convert("RGB")), (224, 224))
    s = np.concatenate([src[:6], src[:1], blank[None], ihc[None]])
    d = np.concatenate([dst[:6], far[None], blank[None], ihc[None]])
    t = ScannerTransfer.fit(s, d, parts=("colour",))
    reasons = {r["pair"]: r["reason"] for r in t.profile["fit"]["refused"]}
    assert t.profile["fit"]["used"] == 6
    assert reasons[6].startswith("misregistered") and reasons[7].startswith("background only") and reasons[8].startswith("not H&E")
    with pytest.raises(InvalidImageError, match="pair 1"):
        ScannerTransfer.fit(src[:3], [dst[0], dst[1][:200], dst[2]])
    with pytest.raises(InvalidArgumentError, match="dst_images"):
        ScannerTransfer.fit(src[:3], dst[:2])
    with pytest.raises(ScannerTransferError, match="no usable pair"):
        ScannerTransfer.fit([blank] * 3, [blank] * 3)
    small = ScannerTransfer.fit(list(src[:6]) + [src[0][:24, :40]], list(dst[:6]) + [dst[0][:24, :40]], parts=("colour",))
    assert small.profile["fit"]["used"] == 6
    assert small.profile["fit"]["refused"] == [{"pair": 6, "reason": "too small: 40x24 px, expected at least 32 px a side "
                                                                     "(8x8 blocks and a spectrum)"}]
    for bad in ({"max_shift_px": -1.0}, {"max_shift_px": float("nan")}, {"min_peak": 1.5}, {"min_peak": True}):
        with pytest.raises(InvalidArgumentError, match=next(iter(bad))):
            ScannerTransfer.fit(src[:3], dst[:3], **bad)


def test_a_fit_no_better_than_identity_is_an_error(pairs):
    src = pairs[0][:8]
    with pytest.raises(ScannerTransferError, match="no better than identity"):
        ScannerTransfer.fit(src, src.copy(), parts=("colour",))


def test_strength_interpolates_from_identity_and_replays(pairs):
    src, dst, slides = pairs
    t = ScannerTransfer.fit(src, dst, slides=slides, parts=("colour", "mtf"), mpp=0.5, seed=1)
    x = torch.from_numpy(src[:3]).permute(0, 3, 1, 2).float() / 255
    p = t.draw_parameters(x.shape)
    for s, expect in ((0.0, 0.0), (1.0, None)):
        p["strength"] = torch.full((3,), s)
        y = t(x, params=p)
        if expect == 0.0:
            assert (y - x).abs().max() < 1e-5
    p["strength"] = torch.full((3,), 0.5)
    half = t(x, params=p)
    p["strength"] = torch.ones(3)
    full = t(x, params=p)
    d_half, d_full = (half - x).abs().mean(), (full - x).abs().mean()
    assert 0.3 * d_full < d_half < 0.8 * d_full
    ranged = ScannerTransfer(t.profile, strength_range=(0.2, 0.9), seed=3)
    a = ranged(x)
    assert torch.equal(ranged(x, params=ranged._params), a)  # replay
    assert a.shape == x.shape and a.dtype == x.dtype and 0 <= float(a.min()) and float(a.max()) <= 1


@pytest.mark.parametrize("parts,mode", [(("colour", "mtf"), "relative"), (("colour", "mtf", "noise"), "relative"),
                                        (("mtf",), "relative"), (("colour", "mtf"), "matched")])
def test_a_chunked_batch_equals_each_tile_on_its_own(pairs, parts, mode):
    """On CPU a batch runs in chunks of 8 tiles of 224², the MTF writing straight into the output when it is the
    last part: each tile comes out bit for bit as it does alone, with its own strength and noise seed (and, for a
    matched MTF, its own gain)."""
    src, dst, slides = pairs
    t = ScannerTransfer.fit(src, dst, slides=slides, parts=parts, mpp=0.5, strength_range=(0.3, 1.0), seed=2,
                            mtf_mode=mode)
    tiles = np.concatenate([src, src[:2]])[:10]  # 10 tiles: a chunk of 8 and a ragged one of 2
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    p = t.draw_parameters(x.shape)
    p["strength"][:5] = 1.0  # full strength (the shortcut) and mixed strengths in one batch
    whole = t(x, params=p)
    for i in range(10):
        one = {k: (v[i : i + 1] if v.ndim and v.shape[0] == 10 else v) for k, v in p.items()}
        assert torch.equal(t(x[i : i + 1], params=one), whole[i : i + 1]), i
    from shiftkit.functional import transfer as T

    gain = torch.as_tensor(t.profile["mtf"]["gain"], dtype=torch.float32)
    out = torch.full_like(x[:3], float("nan"))
    direct = T.mtf_filter(x[:3], gain, torch.tensor([1.0, 0.5, 0.2]), out=out)
    assert direct is out and torch.equal(out, T.mtf_filter(x[:3], gain, torch.tensor([1.0, 0.5, 0.2])))


def test_tissue_power_is_a_density_that_tiles_of_any_size_share():
    """White noise of variance σ² has a flat power spectral density σ² (Parseval): tissue_power measures that at two
    tile sizes, and a tile that is mostly background is measured on its tissue only."""
    from shiftkit.functional import transfer as T

    gen = torch.Generator().manual_seed(0)
    sigma = 0.05
    dens = {}
    for n in (96, 192):
        g = torch.randn(6, 1, n, n, generator=gen) * sigma + 0.5  # mid-grey: tissue everywhere
        dens[n] = T.tissue_power(g.expand(-1, 3, -1, -1))[:, 1:].mean().item()
        assert abs(dens[n] / sigma ** 2 - 1) < 0.12, dens
    assert abs(dens[96] / dens[192] - 1) < 0.1
    half = torch.ones(6, 1, 192, 192)  # white background on the left, the same noise on the right
    half[..., 96:] = torch.randn(6, 1, 192, 96, generator=gen) * sigma + 0.5
    assert abs(T.tissue_power(half.expand(-1, 3, -1, -1))[:, 1:].mean().item() / sigma ** 2 - 1) < 0.25
    blank = T.tissue_power(torch.ones(2, 3, 64, 64))  # no tissue at all: the whole tile, no NaN
    assert torch.isfinite(blank).all() and float(blank.abs().max()) == 0.0


def test_a_matched_mtf_adapts_to_how_blurred_each_tile_is():
    """Scanner A's focus varies from slide to slide (Gaussian blur σ 0.7, 1.2, 0.9 px), scanner B is sharp. One
    relative gain sharpens every tile alike; the matched MTF measures each tile against B's spectrum, so tiles
    blurred by σ 0.7 and 1.2 come out nearer B's sharpness and nearer each other (Laplacian variance)."""
    tiles = load_sample_tiles()
    train, test = tiles[:12], tiles[12:]

    def blur(x, s):
        return (np.clip(cv2.GaussianBlur(x / 255.0, (0, 0), s), 0, 1) * 255).round().astype(np.uint8)

    def lapvar(x):
        return cv2.Laplacian(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float64), cv2.CV_64F).var()

    src = np.stack([blur(x, (0.7, 1.2, 0.9)[i // 4]) for i, x in enumerate(train)])
    logs = {}
    for mode in ("relative", "matched"):
        t = ScannerTransfer.fit(src, train, slides=[i // 4 for i in range(12)], parts=("mtf",), mtf_mode=mode)
        logs[mode] = [np.mean(np.log([lapvar(a) / lapvar(b) for a, b in zip(t.augment(np.stack([blur(x, s) for x in test])), test)]))
                      for s in (0.7, 1.2)]
    assert t.profile["mtf"]["mode"] == "matched" and t.profile["fit"]["mtf"]["matched_cv"]["sharpness_ratio_after_cv"] > 0
    spread = {m: abs(v[0] - v[1]) for m, v in logs.items()}
    assert spread["matched"] < 0.7 * spread["relative"], logs
    assert sum(map(abs, logs["matched"])) < sum(map(abs, logs["relative"])), logs


@pytest.mark.parametrize("device", devices())
def test_a_matched_transfer_gives_the_same_result_on_every_device(pairs, device):
    """The matched MTF measures each tile's spectrum on the input's device (a gpu test on CUDA): the same gains and
    output as on the CPU, on the same device and dtype as the input."""
    src, dst, slides = pairs
    t = ScannerTransfer.fit(src, dst, slides=slides, parts=("colour", "mtf"), mpp=0.5, mtf_mode="matched", seed=0)
    x = torch.from_numpy(src[:3]).permute(0, 3, 1, 2).float() / 255
    p = t.draw_parameters(x.shape)
    ref = t(x, params=p)
    got = t(x.to(device), params=p)
    assert got.device.type == torch.device(device).type and got.dtype == x.dtype
    torch.testing.assert_close(got.cpu(), ref, atol=2e-5, rtol=0)


def test_matched_profiles_round_trip_rescale_and_are_checked(pairs, tmp_path):
    from shiftkit.functional import transfer as T

    src, dst, slides = pairs
    t = ScannerTransfer.fit(src, dst, slides=slides, parts=("colour", "mtf"), mpp=0.5, mtf_mode="matched")
    u = ScannerTransfer.load(t.save(tmp_path / "m.json"))
    assert np.array_equal(u.augment(src[:2]), t.augment(src[:2]))
    ref = np.asarray(t.profile["mtf"]["reference_power"])
    # at half the µm/px the same tissue spreads its variance over a quarter of the frequency area: 4x the density,
    # and the fit's frequency f sits at f / 2
    finer = ScannerTransfer(t.profile, mpp=0.25)
    k = len(ref)
    centres = (np.arange(k) + 0.5) / k * 0.5
    np.testing.assert_allclose(finer._reference[: k // 2], 4 * np.interp(2 * centres[: k // 2], centres, ref))
    np.testing.assert_allclose(T.resample_power(ref, 0.5, 0.5), ref)
    with pytest.raises(InvalidArgumentError, match="mtf_mode"):
        ScannerTransfer.fit(src, dst, parts=("mtf",), mtf_mode="adaptive")
    un = ScannerTransfer.fit_unpaired(list(src), list(dst), parts=("mtf",), mtf_mode="matched")
    assert un.profile["mtf"]["mode"] == "matched" and un.profile["fit"]["mtf"]["mode"] == "matched"
    np.testing.assert_allclose(un.profile["mtf"]["reference_power"], t.profile["mtf"]["reference_power"], rtol=1e-6)
    with pytest.raises(InvalidArgumentError, match="mtf_mode"):
        ScannerTransfer.fit_unpaired(list(src), list(dst), mtf_mode="adaptive")
    for bad in ({"mode": "sharp"}, {"reference_power": [1.0, -1.0]}, {"max_gain": 0.5}):
        with pytest.raises(InvalidArgumentError, match="mtf"):
            ScannerTransfer({**t.profile, "mtf": {**t.profile["mtf"], **bad}})


def test_profiles_round_trip_as_json_and_rescale_with_mpp(pairs, tmp_path):
    src, dst, slides = pairs
    t = ScannerTransfer.fit(src, dst, slides=slides, parts=("colour", "mtf"), mpp=0.5)
    path = t.save(tmp_path / "p.json")
    assert json.loads(path.read_text())["format"] == "shiftkit-scanner-transfer/1"
    u = ScannerTransfer.load(path)
    assert np.array_equal(u.augment(src[:2]), t.augment(src[:2]))
    finer = ScannerTransfer.load(path, mpp=0.25)  # the same blur in µm spans twice the pixels
    x = torch.from_numpy(src[:2]).permute(0, 3, 1, 2).float() / 255
    lap = lambda y: float(torch.nn.functional.conv2d(y.mean(1, keepdim=True), torch.tensor([[[[0., 1, 0], [1, -4, 1], [0, 1, 0]]]])).var())  # noqa: E731
    assert lap(finer(x)) < lap(u(x))
    with pytest.raises(InvalidArgumentError, match="mpp"):
        ScannerTransfer.load(path, mpp=2.0)
    with pytest.raises(InvalidArgumentError, match="profile"):
        ScannerTransfer({"format": "something else"})


def test_unpaired_fit_refuses_empty_and_tissueless_sets_by_name(pairs):
    src = pairs[0]
    for args, arg in ((([], src), "src_images"), ((src, []), "dst_images")):
        with pytest.raises(InvalidArgumentError, match=f"`{arg}` is empty"):
            ScannerTransfer.fit_unpaired(*args)
    with pytest.raises(ScannerTransferError, match=r"no usable image in `src_images`.*all refused \(3 background only\)"):
        ScannerTransfer.fit_unpaired(np.full((3, 64, 64, 3), 245, np.uint8), src)


def test_unpaired_fit_leaves_out_non_he_blank_and_tiny_images_by_name(pairs, tmp_path):
    """An IHC image, a blank tile or a sliver in an unpaired set is left out, named and counted — the profile is the one
    fitted without them — rather than bending the stain statistics silently."""
    src, dst, _ = pairs
    ihc = cv2.resize(np.array(__import__("PIL.Image", fromlist=["Image"]).open(
        __import__("skimage").data.__path__[0] + "/ihc.png").convert("RGB")), (224, 224))
    blank = np.full_like(src[0], 245)
    clean = ScannerTransfer.fit_unpaired(list(src[:6]), list(dst[6:12]), parts=("colour", "mtf"))
    mixed = ScannerTransfer.fit_unpaired(list(src[:6]) + [ihc, src[0][:20, :20]], [blank] + list(dst[6:12]),
                                         parts=("colour", "mtf"))
    fit = mixed.profile["fit"]
    assert fit["used"] == [6, 6] and (fit["src_images"], fit["dst_images"]) == (8, 7)
    assert [(r["set"], r["image"], r["reason"].split(":")[0]) for r in fit["refused"]] == [
        ("src", 6, "not H&E"), ("src", 7, "too small"), ("dst", 0, "background only")]
    assert mixed.profile["colour"] == clean.profile["colour"] and mixed.profile["mtf"] == clean.profile["mtf"]
    # the command line names the files behind the indexes
    for name, images in (("a", list(src[:3]) + [ihc]), ("b", list(dst[6:9]))):
        (tmp_path / name).mkdir()
        for i, x in enumerate(images):
            write_image(tmp_path / name / f"t{i}.png", x)
    res = CliRunner().invoke(cli, ["fit-scanner", "--src", str(tmp_path / "a"), "--dst", str(tmp_path / "b"), "--unpaired",
                                   "-o", str(tmp_path / "u.json")])
    assert res.exit_code == 0, res.output
    assert f"- refused source image 3 ({tmp_path / 'a' / 't3.png'}): not H&E" in res.output
    assert "4 source and 3 destination images, 3 and 3 used." in res.output
    (tmp_path / "c").mkdir()  # the same names as a/, registered twins and the IHC image: a paired fit names the pair
    for i, x in enumerate(list(dst[:3]) + [ihc]):
        write_image(tmp_path / "c" / f"t{i}.png", x)
    res = CliRunner().invoke(cli, ["fit-scanner", "--src", str(tmp_path / "a"), "--dst", str(tmp_path / "c"),
                                   "--parts", "colour", "-o", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    assert f"- refused pair 3 ({tmp_path / 'a' / 't3.png'} / {tmp_path / 'c' / 't3.png'}): not H&E" in res.output


def test_unpaired_fit_moves_colour_statistics_towards_the_destination(pairs):
    src, dst, _ = pairs
    other = load_sample_tiles()[12:]
    b_side = np.stack([scanner_b(x, shift=(0, 0)) for x in other])  # scanner B, other fields: no pairs
    t = ScannerTransfer.fit_unpaired(src, b_side, parts=("colour", "mtf"))
    out = t.augment(src)
    mean = lambda a: a.reshape(-1, 3).mean(0)  # noqa: E731
    assert np.abs(mean(out) - mean(b_side)).sum() < 0.5 * np.abs(mean(src) - mean(b_side)).sum()
    assert np.asarray(t.profile["mtf"]["gain"])[-8:].max() < 0.7
    assert t.profile["fit"]["mtf"]["max_gain"] == 1.5  # towards a blurrier scanner no cap binds: the smallest
    # the colour report (in-sample): the destination's tissue colour as skimage gives it, the mapped source's near it
    c = t.profile["fit"]["colour"]
    blocks = np.concatenate([cv2.resize(x / 255.0, (28, 28), interpolation=cv2.INTER_AREA).reshape(-1, 3) for x in b_side])
    lab = rgb2lab(blocks[None])[0]
    lab = lab[lab[:, 0] < 85]
    assert c["tissue_blocks"][1] == len(lab)
    np.testing.assert_allclose(c["lab_mean"]["dst"], lab.mean(0), atol=2e-3)
    np.testing.assert_allclose(c["lab_std"]["dst"], lab.std(0), atol=2e-3)
    assert c["delta_e2000_of_means_after"] < 0.25 * c["delta_e2000_of_means_before"]
    gap = lambda k: np.abs(np.subtract(c["lab_std"][k], c["lab_std"]["dst"])).sum()  # noqa: E731
    assert gap("mapped") < 0.5 * gap("src")

    def lapvar(x):
        return cv2.Laplacian(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float64), cv2.CV_64F).var()

    sharper = np.stack([(np.clip(y + 3.0 * (y - cv2.GaussianBlur(y, (0, 0), 1.0)), 0, 1) * 255).round().astype(np.uint8)
                        for y in other / 255.0])
    up = ScannerTransfer.fit_unpaired(src, sharper, parts=("mtf",))
    fixed = ScannerTransfer.fit_unpaired(src, sharper, parts=("mtf",), mtf_max_gain=1.5)
    err = lambda m: abs(np.mean([np.log(lapvar(o)) for o in m.augment(src)]) - np.mean([np.log(lapvar(o)) for o in sharper]))
    assert up.profile["fit"]["mtf"]["max_gain"] > 1.5 and err(up) < 0.5 * err(fixed)
    with pytest.raises(InvalidArgumentError, match="mtf_max_gain"):
        ScannerTransfer.fit_unpaired(src, sharper, parts=("mtf",), mtf_max_gain=0)


def test_registered_scanner_transfer_shifts(pairs, tmp_path):
    names = shiftkit.list_shifts("scanner-transfer:*")
    assert len(names) == 4
    flags = {n: shiftkit.shifts.get_spec(n).held_out for n in names}
    assert set(flags.values()) == {True, False}  # train profiles and held-out ones
    assert not set(n for n, h in flags.items() if h) & set(shiftkit.RandomScanner(seed=0).shifts)  # held-out never trains
    tiles = pairs[0][:2]
    d = [np.abs(shiftkit.get_shift(names[0], s, seed=0).augment(tiles).astype(int) - tiles).mean() for s in (1, 3, 5)]
    assert d[0] < d[1] < d[2]
    t = ScannerTransfer.fit(pairs[0], pairs[1], slides=pairs[2], parts=("colour",), name="mine")
    path = t.save(tmp_path / "mine.json")
    src = tmp_path / "tiles"
    for i, x in enumerate(tiles):
        write_image(src / f"t{i}.png", x)
    res = CliRunner().invoke(cli, ["simulate", str(src), str(tmp_path / "out"), "--shift", f"scanner-transfer:{path}",
                                   "--severity", "5"])
    assert res.exit_code == 0, res.output
    outs = json.loads((tmp_path / "out" / "manifest.json").read_text())["outputs"]
    assert len(outs) == 2 and all(":" not in o["output"] for o in outs)
    assert np.array_equal(shiftkit.data.read_image(tmp_path / "out" / outs[0]["output"]), t.augment(tiles[:1])[0])


def test_pooled_source_normalization(pairs):
    tiles = np.concatenate([pairs[0][:5], np.full((1, 224, 224, 3), 250, np.uint8)])
    for method in ("macenko", "vahadane", "reinhard"):
        norm = StainNormalizer(method).fit(load_sample("slideflow"))
        per_tile, st_tile = norm.normalize(tiles, return_status=True)
        pooled, st_pool = norm.normalize(tiles, source="pooled", return_status=True)
        again = norm.normalize(tiles, source=norm.pooled_source(tiles))
        assert np.array_equal(pooled, again)  # a slide's estimate reused across calls gives the same pixels
        assert st_pool[-1] == st_tile[-1] == "low-tissue" and np.array_equal(pooled[-1], per_tile[-1])
        assert not np.array_equal(pooled[:5], per_tile[:5])
    est = shiftkit.estimate_stains_pooled(list(tiles[:5]), "macenko")
    norm = StainNormalizer("macenko").fit(load_sample("slideflow"))
    small = norm.pooled_source(tiles[:5], max_pixels=50_000)  # a bounded sample: close to the full estimate
    assert shiftkit.stain.stain_angles(small.matrix, est.matrix).max() < 2.0
    with pytest.raises(InvalidArgumentError, match="B = 1"):
        norm.normalize(tiles, source=shiftkit.estimate_stains(tiles[:2]))


def test_cli_source_level_slide_pools_each_subfolder(pairs, tmp_path):
    src = tmp_path / "in"
    for slide, (lo, hi) in (("s1", (0, 4)), ("s2", (4, 8))):
        for i in range(lo, hi):
            write_image(src / slide / f"t{i}.png", pairs[0][i])
    target = tmp_path / "target.png"
    write_image(target, load_sample("slideflow"))
    res = CliRunner().invoke(cli, ["normalize", str(src), str(tmp_path / "out"), "--target", str(target),
                                   "--source-level", "slide"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "out" / "normalize.json").read_text())
    assert {g["group"] for g in summary["pooled_sources"]} == {"s1", "s2"} and summary["written"] == 8
    norm = StainNormalizer("macenko").fit(load_sample("slideflow"))
    expect = norm.normalize(pairs[0][:4], source=norm.pooled_source_from_files(sorted((src / "s1").glob("*.png")))[0])
    got = np.stack([shiftkit.data.read_image(tmp_path / "out" / "s1" / f"t{i}.png") for i in range(4)])
    assert np.array_equal(got, expect)


@pytest.mark.parametrize("space", ["srgb", "od", "lab"])
def test_unpaired_colour_map_is_the_gaussian_monge_map_in_its_space(pairs, space):
    """The unpaired colour map moves the source's tissue block colours (8x8 means, L* < 85 by scikit-image) so that
    their mean and covariance in ``space`` (numpy / scikit-image conversions) equal the destination's, and it is
    the symmetric-positive-definite (Monge) solution; optical density by default."""
    src = pairs[0]
    other = np.stack([scanner_b(x, blur=0, shift=(0, 0)) for x in load_sample_tiles()[12:]])
    t = ScannerTransfer.fit_unpaired(src, other, parts=("colour",), colour_space=space)
    if space == "od":
        assert ScannerTransfer.fit_unpaired(src, other, parts=("colour",)).profile["colour"] == t.profile["colour"]

    def blocks(x):
        return np.concatenate([cv2.resize(v, (28, 28), interpolation=cv2.INTER_AREA).reshape(-1, 3) for v in x])

    a, b = blocks(src / 255.0), blocks(other / 255.0)
    a, b = a[rgb2lab(a[None])[0, :, 0] < 85], b[rgb2lab(b[None])[0, :, 0] < 85]
    c = t.profile["colour"]
    assert c["space"] == c["out_space"] == space and c["degree"] == 1
    w = np.asarray(c["weights"])
    mapped = np.c_[np.ones(len(a)), _space(a, space)] @ w  # the map in its own space, unclipped
    np.testing.assert_allclose(mapped.mean(0), _space(b, space).mean(0), atol=1e-6)
    np.testing.assert_allclose(np.cov(mapped.T), np.cov(_space(b, space).T), rtol=1e-3, atol=1e-8)
    m = w[1:]
    np.testing.assert_allclose(m, m.T, atol=1e-9)  # symmetric ...
    assert np.linalg.eigvalsh(m).min() > 0  # ... positive definite: the Monge map, not any matching map
    with pytest.raises(InvalidArgumentError, match="colour_space"):
        ScannerTransfer.fit_unpaired(src, other, parts=("colour",), colour_space="hsv")


def test_fit_scanner_cli_unpaired_writes_profile_and_report(tmp_path):
    """--unpaired on two folders of different fields: the same profile as ScannerTransfer.fit_unpaired, and a report
    that names the MTF's cap chosen on the sets."""
    tiles = load_sample_tiles()
    src, other = tiles[:8], np.stack([scanner_b(x, shift=(0, 0)) for x in tiles[8:]])
    for i, a in enumerate(src):
        write_image(tmp_path / "a" / f"A{i}.png", a)
    for i, b in enumerate(other):
        write_image(tmp_path / "b" / f"B{i}.png", b)
    out = tmp_path / "unpaired.json"
    res = CliRunner().invoke(cli, ["fit-scanner", "--src", str(tmp_path / "a"), "--dst", str(tmp_path / "b"), "--unpaired",
                                   "-o", str(out), "--parts", "colour,mtf"])
    assert res.exit_code == 0, res.output
    prof = json.loads(out.read_text())
    ref = ScannerTransfer.fit_unpaired(list(src), list(other), parts=("colour", "mtf"))
    np.testing.assert_allclose(prof["mtf"]["gain"], ref.profile["mtf"]["gain"], rtol=1e-6)
    np.testing.assert_allclose(prof["colour"]["weights"], ref.profile["colour"]["weights"], rtol=1e-6)
    report = (tmp_path / "unpaired.report.md").read_text()
    assert f"gain cap {ref.profile['fit']['mtf']['max_gain']:g}" in report and "unpaired" in report
    after = f"after {ref.profile['fit']['colour']['delta_e2000_of_means_after']:.2f}"
    assert "| mapped source |" in report and after in report and "in optical density;" in report
    # without --parts: the unpaired parts (the paired default includes jpeg, which an unpaired fit refuses)
    res = CliRunner().invoke(cli, ["fit-scanner", "--src", str(tmp_path / "a"), "--dst", str(tmp_path / "b"), "--unpaired",
                                   "-o", str(tmp_path / "default.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "default.json").read_text())["fit"]["paired"] is False
    res = CliRunner().invoke(cli, ["fit-scanner", "--src", str(tmp_path / "a"), "--dst", str(tmp_path / "b"), "--unpaired",
                                   "-o", str(tmp_path / "jpeg.json"), "--parts", "colour,jpeg"])
    assert res.exit_code != 0 and "jpeg" in res.output


def test_fit_scanner_cli_pairs_folders_by_match_and_names_what_did_not_pair(pairs, tmp_path):
    """--src/--dst/--match pair files by the regex's first group on the name without extension, --slide-regex groups
    them; a file without a twin, a name the regex does not match and a second file with an id are listed with the id
    or name (exit 1), the rest are fitted: the same profile as ScannerTransfer.fit on the same pairs and slides."""
    src, dst, _ = pairs
    for i, (a, b) in enumerate(zip(src, dst)):
        write_image(tmp_path / "a" / f"A{i // 4}_{i % 4}.png", a)
        write_image(tmp_path / "b" / f"H{i // 4}_{i % 4}.png", b)
    write_image(tmp_path / "a" / "A9_9.png", src[0])  # no twin
    write_image(tmp_path / "a" / "notes.png", src[0])  # the regex does not match
    write_image(tmp_path / "b" / "H8_8.png", dst[0])  # no source
    write_image(tmp_path / "b" / "X0_0.png", dst[1])  # a second destination with id 0_0
    out = tmp_path / "m.json"
    res = CliRunner().invoke(cli, ["fit-scanner", "--src", str(tmp_path / "a"), "--dst", str(tmp_path / "b"), "--match",
                                   r"^[AHX](\d_\d)", "--slide-regex", r"^A(\d)", "-o", str(out), "--parts", "colour"])
    assert res.exit_code == 1, res.output
    assert "A9_9.png: no --dst file has its id '9_9'" in res.output and "'0_0'" in res.output
    assert "notes.png: --match" in res.output and "'notes'" in res.output
    assert "H8_8.png: no --src file has its id '8_8'" in res.output
    assert "X0_0.png: its id '0_0' is also H0_0.png's" in res.output
    prof = json.loads(out.read_text())
    ref = ScannerTransfer.fit(list(src), list(dst), slides=[str(i // 4) for i in range(len(src))], parts=("colour",))
    assert prof["fit"]["used"] == len(src) == ref.profile["fit"]["used"]
    np.testing.assert_allclose(prof["colour"]["weights"], ref.profile["colour"]["weights"], rtol=1e-6)
    assert prof["fit"]["colour"]["cv_folds"] == 3  # one per slide


def test_fit_scanner_cli_writes_profile_report_and_figure(pairs, tmp_path):
    src, dst, _ = pairs
    rows = ["src,dst,slide"]
    for i, (a, b) in enumerate(zip(src, dst)):
        write_image(tmp_path / "a" / f"A{i}.png", a)
        write_image(tmp_path / "b" / f"B{i}.png", b)
        rows.append(f"a/A{i}.png,b/B{i}.png,{i // 4}")
    write_image(tmp_path / "b" / "B_far.png", np.roll(dst[0], 40, axis=1))
    write_image(tmp_path / "a" / "A_far.png", src[0])
    rows.append("a/A_far.png,b/B_far.png,0")
    rows.append("a/missing.png,b/B0.png,0")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "profile.json"
    res = CliRunner().invoke(cli, ["fit-scanner", "--pairs", str(tmp_path / "pairs.csv"), "-o", str(out), "--parts", "colour,mtf",
                                   "--mpp", "0.5", "--colour-loss", "cv", "--background-weight", "0.5",
                                   "--fit-region", "either"])
    assert res.exit_code == 1, res.output  # one input could not be read
    assert "missing.png" in res.output and "misregistered" in res.output
    prof = json.loads(out.read_text())
    assert prof["parts"] == ["colour", "mtf"] and prof["fit"]["used"] == 12
    assert prof["fit"]["icc"] == {"applied": False, "src": ["none"], "dst": ["none"]}  # no embedded profiles here
    report = (tmp_path / "profile.report.md").read_text()
    assert report.count("(chosen)") == 1  # one colour map marked in the table
    assert prof["fit"]["colour"]["background_weight"] == 0.5 and "weighted 0.5 against tissue" in report
    assert prof["fit"]["colour"]["fit_region"] == "either" and "tissue (L* < 85) in either scan of a pair;" in report
    lo = "/".join(f"{v:.3f}" for v in prof["colour"]["domain"][0])
    assert "Input domain of the map (the 0.1 % and 99.9 % quantiles" in report and f"low {lo}" in report
    assert "beyond it the map goes on with the affine fit's slope" in report
    assert "srgb-srgb-3-l1 " in report and prof["colour"]["loss"] in ("l1", "l2")  # --colour-loss cv: both losses
    assert f"Gain cap {prof['fit']['mtf']['max_gain']:g} (chosen by cross-validation" in report
    m = prof["fit"]["mtf"]  # the MTF's effect on colour, cross-validated, in the report: a blur barely moves block means
    assert abs(m["delta_e2000_after_cv"] - m["delta_e2000_before"]) < 0.5 and "before the MTF" in report
    assert (tmp_path / "profile.report.png").read_bytes()[:4] == b"\x89PNG"
    assert "MTF (relative): fitted on" in report
    matched = tmp_path / "matched.json"
    res = CliRunner().invoke(cli, ["fit-scanner", "--pairs", str(tmp_path / "pairs.csv"), "-o", str(matched), "--parts",
                                   "mtf", "--mpp", "0.5", "--mtf-mode", "matched"])
    prof = json.loads(matched.read_text())
    assert prof["mtf"]["mode"] == "matched" and len(prof["mtf"]["reference_power"]) == len(prof["mtf"]["gain"])
    report = (tmp_path / "matched.report.md").read_text()
    assert "MTF (matched): fitted on" in report and "Matched MTF (each tile" in report, report


def test_cross_validation_folds_hold_out_whole_slides_or_runs_of_consecutive_pairs():
    """With slide ids: leave one slide out. Without: 5 folds of consecutive pairs, so neighbouring (often
    overlapping) crops of one field never score each other; every pair is held out exactly once."""
    from shiftkit.transforms.scanner_transfer import _folds

    folds = _folds(None, 12)
    assert len(folds) == 5
    held = np.concatenate([te for _, te in folds])
    np.testing.assert_array_equal(np.sort(held), np.arange(12))
    for tr, te in folds:
        assert np.all(np.diff(te) == 1) and not set(tr) & set(te) and len(tr) + len(te) == 12
    slides = ["b", "a", "b", "c", "a", "c"]
    by_slide = _folds(slides, 6)
    assert [sorted({slides[i] for i in te}) for _, te in by_slide] == [["a"], ["b"], ["c"]]
    assert all(not {slides[i] for i in tr} & {slides[i] for i in te} for tr, te in by_slide)
    assert _folds(None, 1) == [] and len(_folds(None, 3)) == 3


def test_a_single_pair_is_cross_validated_over_its_spatial_blocks(pairs, tmp_path):
    """One registered pair (a user's single scanned region): the fit holds out one of its 2x2 blocks at a time, so
    every figure of the report is a number and the map is checked against identity; a pair too small to split is
    fitted with the first candidate, said so, and still writes strict JSON (no NaN)."""
    from shiftkit.cli.main import scanner_fit_report

    src, dst, _ = pairs
    t = ScannerTransfer.fit(src[:1], dst[:1], parts=("colour", "mtf", "noise"), align=True)
    fit = t.profile["fit"]
    assert fit["cv"] == "2x2 spatial blocks of the one pair" and fit["used"] == 1 and fit["sizes"] == ["224x224"]
    c = fit["colour"]
    assert c["cv_folds"] == 4 and all(np.isfinite(v) for v in c["cv_delta_e2000"].values())
    assert c["cv_delta_e2000_after"] < 0.6 * c["identity_delta_e2000"]  # held-out blocks (1.97 against 3.83)
    assert fit["mtf"]["pairs"] == 4 and np.isfinite(fit["mtf"]["sharpness_ratio_after_cv"])
    aligned = np.roll(dst[1:4], (-3, 2), axis=(1, 2))  # other fields: the map carries over to them
    assert mean_de(t.augment(src[1:4]), aligned) < 0.5 * mean_de(src[1:4], aligned)
    json.dumps(t.profile, allow_nan=False)
    report = scanner_fit_report(t.profile)
    assert "2x2 spatial blocks out" in report and "fitted on 4 of the pair's 2x2 blocks" in report
    assert "nan" not in report.lower()

    small = ScannerTransfer.fit(src[:1, :48, :48], dst[:1, :48, :48], parts=("colour", "mtf"))
    fit = small.profile["fit"]
    assert fit["cv"] == "none: one pair too small to split" and fit["colour"]["cv_folds"] == 0
    assert fit["colour"]["chosen"] == "srgb-srgb-1" and fit["colour"]["identity_delta_e2000"] is None
    json.dumps(small.profile, allow_nan=False)
    report = scanner_fit_report(small.profile)
    assert "unchecked against identity" in report and "nothing to cross-validate" in report
    assert "nan" not in report.lower() and "| n/a |" in report
    from shiftkit.transforms.scanner_transfer import _finite_mean  # held-out pairs without tissue blocks score NaN

    assert _finite_mean([float("nan"), 1.0, 3.0]) == 2.0 and _finite_mean([float("nan")]) is None


def test_real_dev_pairs_cross_validated_by_slide():
    """On the real Aperio -> Hamamatsu pairs: leave one slide out, the learned transfer beats unnormalized colour by
    far and lands within 0.67-1.5x of the twins' sharpness (figures in experiments/scanner_transfer)."""
    from PIL import Image

    folder = shared("mitos_scanner_pairs_dev")
    a_files = sorted((folder / "aperio").glob("A*.png"))[::2]
    a = np.stack([np.array(Image.open(p).convert("RGB")) for p in a_files])
    h = np.stack([np.array(Image.open(folder / "hamamatsu" / ("H" + p.name[1:])).convert("RGB")) for p in a_files])
    slides = np.array([p.name[1:3] for p in a_files])
    held = slides == "04"
    t = ScannerTransfer.fit(a[~held], h[~held], slides=list(slides[~held]), mpp=0.25, parts=("colour", "mtf"))
    out = t.augment(a[held])
    sys_path = shared().parent / "eval" / "score_pairs.py"
    import importlib.util

    spec = importlib.util.spec_from_file_location("score_pairs", sys_path)
    sp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sp)
    before = np.mean([sp.tissue_delta_e(x, y) for x, y in zip(a[held], h[held])])
    after = np.mean([sp.tissue_delta_e(x, y) for x, y in zip(out, h[held])])
    sharp = np.mean([sp.sharpness(x) / sp.sharpness(y) for x, y in zip(out, h[held])])
    assert after < 0.6 * before and 0.67 < sharp < 1.5, (before, after, sharp)


def test_a_profile_given_by_path_is_resolved_but_not_listed(pairs, tmp_path):
    t = ScannerTransfer.fit(pairs[0], pairs[1], slides=pairs[2], parts=("colour",))
    path = t.save(tmp_path / "listed.json")
    before = shiftkit.list_shifts()
    spec = shiftkit.shifts.get_spec(f"scanner-transfer:{path}")
    assert spec.family == "scanner-transfer" and shiftkit.list_shifts() == before


# ----------------------------------------------------------------------------------------------- ICC profiles
def swapped_primaries_icc() -> bytes:
    """An RGB ICC profile whose red and blue primaries are swapped (sRGB's tags rearranged), described as
    'RB-swap test!' — so that converting to sRGB visibly swaps the channels."""
    import io
    import struct

    from PIL import ImageCms

    b = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    n = struct.unpack(">I", b[128:132])[0]
    tags = {struct.unpack(">4sII", b[132 + 12 * i:144 + 12 * i])[0]: struct.unpack(">4sII", b[132 + 12 * i:144 + 12 * i])[1:]
            for i in range(n)}
    (ro, _), (bo, _) = tags[b"rXYZ"], tags[b"bXYZ"]
    b[ro:ro + 20], b[bo:bo + 20] = bytes(b[bo:bo + 20]), bytes(b[ro:ro + 20])
    old = "sRGB built-in".encode("utf-16-be")
    i = bytes(b).index(old)
    b[i:i + len(old)] = "RB-swap test!".encode("utf-16-be")
    assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(bytes(b)))).strip() == "RB-swap test!"
    return bytes(b)


def test_embedded_icc_profiles_are_read_recorded_and_applied_on_request(pairs, tmp_path):
    from PIL import Image

    from shiftkit.data import read_image
    from shiftkit.data.io import icc_description, read_icc

    icc = swapped_primaries_icc()
    src = tmp_path / "in"
    src.mkdir()
    for i, x in enumerate(pairs[0][:3]):
        Image.fromarray(x).save(src / f"t{i}.png", icc_profile=icc)
    p = src / "t0.png"
    assert icc_description(read_icc(p)) == "RB-swap test!"
    raw, conv = read_image(p), read_image(p, apply_icc=True)
    assert np.array_equal(raw, pairs[0][0])
    assert np.abs(conv[..., 0].astype(int) - raw[..., 2]).mean() < 3 and np.abs(conv[..., 2].astype(int) - raw[..., 0]).mean() < 3
    # simulate records the profile, applies it on request and refuses to mix the two in one OUT_DIR
    res = CliRunner().invoke(cli, ["simulate", str(src), str(tmp_path / "sim"), "--shift", "jpeg", "--severity", "1"])
    assert res.exit_code == 0, res.output
    assert {e["icc"] for e in json.loads((tmp_path / "sim" / "manifest.json").read_text())["outputs"]} == {"RB-swap test!"}
    outs = json.loads((tmp_path / "sim" / "manifest.json").read_text())["outputs"]
    assert all(icc_description(read_icc(tmp_path / "sim" / e["output"])) == "RB-swap test!" for e in outs)  # kept
    res = CliRunner().invoke(cli, ["simulate", str(src), str(tmp_path / "sim"), "--shift", "jpeg", "--severity", "1", "--apply-icc"])
    assert res.exit_code == 2 and "apply_icc" in res.output
    res = CliRunner().invoke(cli, ["simulate", str(src), str(tmp_path / "sim2"), "--shift", "jpeg", "--severity", "1",
                                   "--apply-icc"])
    assert res.exit_code == 0, res.output
    outs = json.loads((tmp_path / "sim2" / "manifest.json").read_text())["outputs"]
    assert outs and all(read_icc(tmp_path / "sim2" / e["output"]) is None for e in outs)  # converted: none left
    res = CliRunner().invoke(cli, ["normalize", str(src), str(tmp_path / "norm"), "--apply-icc", "--target",
                                   str(shiftkit.data.sample_path("slideflow"))])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "norm" / "normalize.json").read_text())
    assert summary["apply_icc"] and {o["icc"] for o in summary["outputs"]} == {"RB-swap test!"}
    res = CliRunner().invoke(cli, ["tile", str(src), str(tmp_path / "tiles"), "--size", "112", "--min-tissue", "0", "--apply-icc"])
    assert res.exit_code == 0, res.output
    rows = (tmp_path / "tiles" / "tiles.csv").read_text().splitlines()
    assert rows[0].endswith(",icc") and all(r.endswith("RB-swap test! (applied)") for r in rows[1:])
    first = rows[1].split(",")[0]  # e.g. t0/0_112.png: the tile's folder is its source's stem
    y, x = (int(v) for v in Path(first).stem.split("_"))
    expect = read_image(src / (Path(first).parent.name + ".png"), apply_icc=True)[y:y + 112, x:x + 112]
    assert np.array_equal(read_image(tmp_path / "tiles" / first), expect)
    assert read_icc(tmp_path / "tiles" / first) is None  # converted: no profile left
    # without --apply-icc the tiles keep their source's pixels and profile, so that it can be applied later
    res = CliRunner().invoke(cli, ["tile", str(src), str(tmp_path / "kept"), "--size", "112", "--min-tissue", "0"])
    assert res.exit_code == 0, res.output
    assert icc_description(read_icc(tmp_path / "kept" / first)) == "RB-swap test!"
    assert np.array_equal(read_image(tmp_path / "kept" / first, apply_icc=True), expect)
    assert np.array_equal(read_image(tmp_path / "kept" / first),
                          read_image(src / (Path(first).parent.name + ".png"))[y:y + 112, x:x + 112])


def test_jpeg_quality_is_read_from_the_quantization_table(tmp_path):
    """Files written by Pillow and by OpenCV (libjpeg, the encoder the transfer's JPEG part uses) at known qualities
    come back at exactly those qualities with IJG tables; a table of one's own gets the nearest IJG quality, not
    exact; a PNG or a missing file gives None."""
    from PIL import Image

    from shiftkit.data.io import ijg_luminance_table, jpeg_quality

    img = load_sample_tiles()[0]
    for q in (5, 37, 50, 63, 90, 100):
        Image.fromarray(img).save(tmp_path / "p.jpg", quality=q)
        cv2.imwrite(str(tmp_path / "c.jpg"), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
        assert jpeg_quality(tmp_path / "p.jpg") == {"quality": q, "exact": True, "mean_abs_error": 0.0}
        assert jpeg_quality(tmp_path / "c.jpg")["quality"] == q
    assert list(ijg_luminance_table(50)[:8]) == [16, 11, 10, 16, 24, 40, 51, 61]  # T.81 table K.1
    own = [int(v) + (1 if i % 5 == 0 else 0) for i, v in enumerate(ijg_luminance_table(70))]
    Image.fromarray(img).save(tmp_path / "own.jpg", qtables=[own, own])
    got = jpeg_quality(tmp_path / "own.jpg")
    assert got["quality"] == 70 and not got["exact"] and 0 < got["mean_abs_error"] < 0.25
    write_image(tmp_path / "x.png", img)
    assert jpeg_quality(tmp_path / "x.png") is None and jpeg_quality(tmp_path / "missing.jpg") is None


def test_fit_scanner_cli_takes_the_jpeg_quality_from_destination_files(pairs, tmp_path):
    """Without --jpeg-quality, JPEG destination files give the part its quality (from their tables), unless the
    sources are JPEG at that quality or lower; --jpeg-quality overrides. The report says which."""
    from PIL import Image

    src, dst, _ = pairs

    def fit(src_q, dst_q, *extra):
        a, b, out = tmp_path / f"a{src_q}", tmp_path / f"b{dst_q}", tmp_path / f"p{src_q}_{dst_q}_{len(extra)}.json"
        a.mkdir(exist_ok=True)
        b.mkdir(exist_ok=True)
        for i, (x, y) in enumerate(zip(src, dst)):
            Image.fromarray(x).save(a / (f"A{i}.jpg" if src_q else f"A{i}.png"), **({"quality": src_q} if src_q else {}))
            Image.fromarray(y).save(b / f"B{i}.jpg", quality=dst_q)
        res = CliRunner().invoke(cli, ["fit-scanner", "--src", str(a), "--dst", str(b), "--match", r"^[AB](\d+)", "-o",
                                       str(out), "--parts", "colour,jpeg", *extra])
        assert res.exit_code == 0, res.output
        return json.loads(out.read_text()), out.with_name(out.stem + ".report.md").read_text()

    prof, report = fit(None, 70)
    assert prof["parts"] == ["colour", "jpeg"] and prof["jpeg"]["quality"] == 70
    assert prof["fit"]["jpeg"]["estimated"]["dst"]["quality_range"] == [70, 70]
    assert "quality 70 applied, estimated from the destination files' quantization tables" in report
    prof, report = fit(60, 70)  # the source is already more compressed
    assert "jpeg" not in prof["parts"] and "not applied: the source files are JPEG at quality 60" in report
    prof, report = fit(90, 70)  # a less compressed source: the destination's JPEG applies
    assert prof["jpeg"]["quality"] == 70
    prof, report = fit(None, 70, "--jpeg-quality", "40")
    assert prof["jpeg"]["quality"] == 40 and "estimated" not in prof["fit"]["jpeg"] and "quality 40 applied." in report


def test_parts_restrict_a_fitted_transfer(pairs):
    """``parts=`` applies a subset of the fitted parts: colour + MTF equals the full transfer with its noise set to
    zero (whatever the seed), the noise part differs by seed, and a part the profile lacks is refused by name."""
    src, dst, slides = pairs
    noisy_dst = np.clip(dst + np.random.default_rng(0).normal(0, 4, dst.shape), 0, 255).round().astype(np.uint8)
    t = ScannerTransfer.fit(src, noisy_dst, slides=slides, parts=("colour", "mtf", "noise"), mpp=0.5)
    x = torch.from_numpy(src[:3]).permute(0, 3, 1, 2).float() / 255
    quiet = json.loads(json.dumps(t.profile))
    quiet["noise"]["sigma"] = 0.0
    det = [ScannerTransfer(t.profile, parts=("colour", "mtf"), seed=s)(x) for s in (0, 1)]
    assert torch.equal(det[0], det[1])
    assert torch.allclose(det[0], ScannerTransfer(quiet, seed=3)(x), atol=1e-6)
    noisy = [ScannerTransfer(t.profile, seed=s)(x) for s in (0, 1)]
    assert not torch.equal(noisy[0], noisy[1])
    sub = ScannerTransfer(t.profile, parts=["mtf", "colour"])  # the fitted order is kept
    assert sub.parts == ["colour", "mtf"] and t.parts == ["colour", "mtf", "noise"]
    with pytest.raises(InvalidArgumentError, match=r"parts.*\['jpeg'\]"):
        ScannerTransfer(t.profile, parts=("colour", "jpeg"))
    with pytest.raises(InvalidArgumentError, match="parts"):
        ScannerTransfer(t.profile, parts=())


def test_cli_normalize_by_a_learned_transfer(pairs, tmp_path):
    """``normalize --transfer``: scanner-B tiles through the transfer fitted B -> A come out far closer to their
    scanner-A twins than they went in; the colour and MTF parts only (deterministic, any batch size); the profile
    and the parts left out are recorded; bundled names resolve; misuse is refused naming the option."""
    src, dst, slides = pairs
    profile = ScannerTransfer.fit(dst, src, slides=slides, parts=("colour", "mtf", "noise"), mpp=0.5, align=True).save(
        tmp_path / "b_to_a.json")
    for i, img in enumerate(dst):
        write_image(tmp_path / "b" / f"t{i:02d}.png", img)
    runner = CliRunner()
    outs = []
    for bs in (1, 5):
        res = runner.invoke(cli, ["normalize", str(tmp_path / "b"), str(tmp_path / f"out{bs}"), "--transfer",
                                  str(profile), "--batch-size", str(bs)])
        assert res.exit_code == 0, res.output
        outs.append(np.stack([shiftkit.data.read_image(tmp_path / f"out{bs}" / f"t{i:02d}.png") for i in range(12)]))
    assert np.array_equal(outs[0], outs[1])
    def on_a_grid(x):  # B's tiles back on A's grid (scanner_b rolled them by (3, -2)), away from the wrapped border,
        # as 8x8 block means (colour, as the scorer judges it; B's blur is not undone pixel for pixel)
        return np.stack([cv2.resize(np.roll(t, (-3, 2), axis=(0, 1))[8:-8, 8:-8], (26, 26), interpolation=cv2.INTER_AREA)
                         for t in x])

    a_side = on_a_grid(np.stack([np.roll(t, (3, -2), axis=(0, 1)) for t in src]))
    assert mean_de(on_a_grid(outs[0]), a_side) < 0.5 * mean_de(on_a_grid(dst), a_side)  # measured 1.55 vs 4.09
    expect = ScannerTransfer.load(profile, parts=("colour", "mtf")).augment(dst)
    assert np.array_equal(outs[0], expect)
    summary = json.loads((tmp_path / "out1" / "normalize.json").read_text())
    assert summary["method"] == "scanner-transfer" and summary["written"] == 12
    assert summary["transfer"]["applied_parts"] == ["colour", "mtf"] and summary["transfer"]["left_out_parts"] == ["noise"]
    assert summary["transfer"]["mpp"] == 0.5
    from shiftkit.shifts.transfer import PROFILES_DIR, bundled_profiles

    name = bundled_profiles()[0]
    res = runner.invoke(cli, ["normalize", str(tmp_path / "b"), str(tmp_path / "bundled"), "--transfer", name])
    assert res.exit_code == 0, res.output
    got = shiftkit.data.read_image(tmp_path / "bundled" / "t00.png")
    assert np.array_equal(got, ScannerTransfer.load(PROFILES_DIR / f"{name}.json").augment(dst[0]))
    for args, needle in ((["--transfer", str(profile), "--target", str(tmp_path / "b" / "t00.png")], "exactly one"),
                         ([], "exactly one"),
                         (["--transfer", str(profile), "--method", "vahadane"], "--method does not apply"),
                         (["--target", str(tmp_path / "b" / "t00.png"), "--mpp", "0.5"], "--mpp"),
                         (["--transfer", str(tmp_path / "missing.json")], "--transfer"),
                         (["--transfer", str(profile), "--mpp", "5"], "0.5-2x")):
        res = runner.invoke(cli, ["normalize", str(tmp_path / "b"), str(tmp_path / "bad"), *args])
        assert res.exit_code == 2 and needle in res.output, (args, res.output)
    assert not (tmp_path / "bad").exists()


def test_fit_scanner_cli_reverse_fits_dst_to_src(pairs, tmp_path):
    """``fit-scanner --reverse`` on a pairs manifest is ``ScannerTransfer.fit(dst, src)`` on the same pairs and
    slides (the normalization direction), for manifests and for --src/--dst folders alike."""
    src, dst, slides = pairs
    rows = ["src,dst,slide"]
    for i, (a, b) in enumerate(zip(src, dst)):
        write_image(tmp_path / "a" / f"A{i:02d}.png", a)  # zero-padded: the folders list in pair order
        write_image(tmp_path / "b" / f"B{i:02d}.png", b)
        rows.append(f"a/A{i:02d}.png,b/B{i:02d}.png,{slides[i]}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    expect = ScannerTransfer.fit(dst, src, slides=slides, parts=("colour", "mtf"), mpp=0.5).profile
    no_slides = ScannerTransfer.fit(dst, src, parts=("colour", "mtf"), mpp=0.5).profile  # folds of consecutive pairs
    forward = ScannerTransfer.fit(src, dst, slides=slides, parts=("colour", "mtf"), mpp=0.5).profile
    assert expect["colour"]["weights"] != forward["colour"]["weights"]
    for args in (["--pairs", str(tmp_path / "pairs.csv")],
                 ["--src", str(tmp_path / "a"), "--dst", str(tmp_path / "b"), "--match", r"^[AB](\d+)$"]):
        out = tmp_path / "rev.json"
        res = CliRunner().invoke(cli, ["fit-scanner", *args, "--reverse", "-o", str(out), "--parts", "colour,mtf",
                                       "--mpp", "0.5"])
        assert res.exit_code == 0, res.output
        got = json.loads(out.read_text())
        want = expect if "--pairs" in args else no_slides  # slide ids from the manifest: the same folds
        assert got["colour"] == want["colour"] and got["mtf"]["gain"] == want["mtf"]["gain"]
        assert got["fit"]["source"] == (f"{tmp_path / 'pairs.csv'} (dst -> src)" if "--pairs" in args
                                        else f"{tmp_path / 'b'} -> {tmp_path / 'a'}")


@pytest.mark.parametrize("device", devices())
def test_cli_normalize_by_a_transfer_on_every_device(pairs, tmp_path, device):
    """``normalize --transfer --device D`` (colour map + MTF) writes what the transfer gives on the CPU, to within one
    level (float32 FFTs and power planes differ by device)."""
    src, dst, slides = pairs
    profile = ScannerTransfer.fit(dst, src, slides=slides, parts=("colour", "mtf"), mpp=0.5).save(tmp_path / "p.json")
    for i, img in enumerate(dst[:4]):
        write_image(tmp_path / "b" / f"t{i}.png", img)
    res = CliRunner().invoke(cli, ["normalize", str(tmp_path / "b"), str(tmp_path / "out"), "--transfer", str(profile),
                                   "--device", device])
    assert res.exit_code == 0, res.output
    got = np.stack([shiftkit.data.read_image(tmp_path / "out" / f"t{i}.png") for i in range(4)]).astype(int)
    assert np.abs(got - ScannerTransfer.load(profile).augment(dst[:4]).astype(int)).max() <= 1


def test_cli_normalize_by_a_transfer_takes_each_tiles_mpp_from_a_manifest(pairs, tmp_path):
    """With a manifest SRC whose mpp column differs from the fit's, each tile's MTF is rescaled to its own µm/px (as
    ScannerTransfer(mpp=) does); a tile beyond 0.5-2x of the fit's fails alone, named, and the rest are written."""
    src, dst, slides = pairs
    profile = ScannerTransfer.fit(dst, src, slides=slides, parts=("colour", "mtf"), mpp=0.5).save(tmp_path / "p.json")
    rows = ["path,mpp"]
    for i, m in enumerate((0.5, 0.6, 2.0)):
        write_image(tmp_path / "b" / f"t{i}.png", dst[i])
        rows.append(f"b/t{i}.png,{m}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    res = CliRunner().invoke(cli, ["normalize", str(tmp_path / "m.csv"), str(tmp_path / "out"), "--transfer", str(profile)])
    assert res.exit_code == 1 and "t2.png" in res.output and "0.5-2x" in res.output, res.output
    got = [shiftkit.data.read_image(tmp_path / "out" / "b" / f"t{i}.png") for i in range(2)]
    assert np.array_equal(got[0], ScannerTransfer.load(profile).augment(dst[0]))
    at_06 = ScannerTransfer.load(profile, mpp=0.6).augment(dst[1])
    assert np.array_equal(got[1], at_06) and not np.array_equal(at_06, ScannerTransfer.load(profile).augment(dst[1]))
    assert not (tmp_path / "out" / "b" / "t2.png").exists()
    summary = json.loads((tmp_path / "out" / "normalize.json").read_text())
    assert summary["transfer"]["rescaled_to_mpp"] == [0.6] and len(summary["failed"]) == 1
