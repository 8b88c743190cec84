"""Stain model, estimators and normalizers against independent references and known ground truth."""

import json

import numpy as np
import pytest
import torch
from skimage.color import rgb2lab

from shiftkit import StainNormalizer, StainEstimationError, estimate_stains, estimate_stains_pooled
from shiftkit.core import InvalidArgumentError, UnknownNameError
from shiftkit.data import random_stain_matrix, read_image, synthetic_he
from shiftkit.functional import normalize_stains
from shiftkit.stain import (
    complete_stain_matrix,
    masked_quantile,
    od_to_concentrations,
    od_to_rgb,
    reference_stain_matrix,
    rgb_to_od,
    stain_angles,
    tissue_mask,
)

from .conftest import devices, shared


def _u8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------- model


def test_rgb_to_od_matches_formula_and_inverts():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    i0 = 240 / 255
    od = rgb_to_od(x, i0=i0)
    ref = -np.log(np.clip(x.numpy(), 1 / 255, i0) / i0)
    np.testing.assert_allclose(od.numpy(), ref, rtol=1e-12)
    back = od_to_rgb(od, i0=i0)
    np.testing.assert_allclose(back.numpy(), np.clip(x.numpy(), 1 / 255, i0), rtol=1e-12)
    assert od.min() >= 0


def test_reference_matrices_and_residual():
    for name in ("macenko", "ruifrok", "ruifrok-hdab"):
        m = reference_stain_matrix(name)
        assert torch.allclose(m.norm(dim=-1), torch.ones(2))
    full = complete_stain_matrix(reference_stain_matrix("ruifrok")[None].double())
    assert full.shape == (1, 3, 3)
    assert torch.allclose(full[0] @ full[0, 2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-12)
    with pytest.raises(UnknownNameError, match="did you mean 'macenko'"):
        reference_stain_matrix("macenk")


def test_concentrations_match_numpy_lstsq():
    g = torch.Generator().manual_seed(0)
    m = random_stain_matrix(3, 10.0, g).double()
    od = torch.rand(3, 3, 500, generator=g, dtype=torch.float64)
    c = od_to_concentrations(od, m, clamp=False)
    for b in range(3):
        ref = np.linalg.lstsq(m[b].numpy().T, od[b].numpy(), rcond=None)[0]
        np.testing.assert_allclose(c[b].numpy(), ref, atol=1e-10)
    assert od_to_concentrations(od, m, clamp=True).min() >= 0


def test_nonnegative_concentrations_match_scipy_nnls_and_sklearn_positive_lasso():
    """The closed-form 2-stain solve against independent iterative solvers, pixel by pixel."""
    from scipy.optimize import nnls
    from sklearn.linear_model import Lasso

    from shiftkit.stain.solve import positive_lasso_2

    g = torch.Generator().manual_seed(1)
    m = random_stain_matrix(2, 10.0, g).double()
    od = torch.rand(2, 3, 300, generator=g, dtype=torch.float64) * 1.5 - 0.2  # some pixels need a zero stain
    c = od_to_concentrations(od, m, clamp=True)
    zeros = 0
    for b in range(2):
        for i in range(od.shape[-1]):
            ref, _ = nnls(m[b].numpy().T, od[b, :, i].numpy())
            np.testing.assert_allclose(c[b, :, i].numpy(), ref, atol=1e-9)
            zeros += int((ref == 0).any())
    assert zeros > 30  # the active-set branches were exercised
    lam = 0.05
    dtx = m @ od
    a = positive_lasso_2(dtx, m @ m.transpose(1, 2), lam)
    for b in range(2):
        for i in range(0, od.shape[-1], 10):
            las = Lasso(alpha=lam / 3, fit_intercept=False, positive=True, tol=1e-12, max_iter=100000)
            las.fit(m[b].numpy().T, od[b, :, i].numpy())
            np.testing.assert_allclose(a[b, :, i].numpy(), las.coef_, atol=1e-6)


def test_nonnegative_concentrations_with_obtuse_stain_pairs_match_scipy_nnls():
    """Stain vectors with a negative dot product (a user-given matrix may have negative entries) flip the
    two-atom choice from a minimum to a maximum; a batch mixing both signs takes the per-tile route."""
    from scipy.optimize import nnls

    from shiftkit.stain.solve import nnls_2_projection, positive_lasso_2, select_nnls_2

    g = torch.Generator().manual_seed(3)
    acute = reference_stain_matrix("macenko", dtype=torch.float64)
    obtuse = torch.tensor([[0.9, 0.4, -0.2], [-0.5, 0.8, 0.3]], dtype=torch.float64)
    obtuse = obtuse / obtuse.norm(dim=-1, keepdim=True)
    assert (obtuse[0] @ obtuse[1]) < 0 < (acute[0] @ acute[1])
    for m in (obtuse[None].expand(2, 2, 3), torch.stack([acute, obtuse])):
        od = torch.randn(2, 3, 400, generator=g, dtype=torch.float64)
        c = od_to_concentrations(od, m, clamp=True)
        c2 = positive_lasso_2(m @ od, m @ m.transpose(1, 2), 0.0)
        y = nnls_2_projection(m) @ od  # the GPU route (no host look at the signs), run here on CPU
        c3 = select_nnls_2(y[:, :2], y[:, 2:], (m[:, 0] * m[:, 1]).sum(-1), host_checks=False)
        zeros = 0
        for b in range(2):
            for i in range(od.shape[-1]):
                ref, _ = nnls(m[b].numpy().T, od[b, :, i].numpy())
                np.testing.assert_allclose(c[b, :, i].numpy(), ref, atol=1e-9)
                np.testing.assert_allclose(c2[b, :, i].numpy(), ref, atol=1e-9)
                np.testing.assert_allclose(c3[b, :, i].numpy(), ref, atol=1e-9)
                zeros += int(((ref == 0).sum() == 1))
        assert zeros > 100  # one stain at zero, the other refitted: the branch that differs


@pytest.mark.parametrize("seed", range(5))
def test_masked_quantile_equals_numpy(seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(4, 1000, generator=g)
    w = (torch.rand(4, 1000, generator=g) > 0.3).float()
    w[3] = 0  # an empty row gives 0
    q = [0.0, 0.01, 0.25, 0.5, 0.99, 1.0]
    out = masked_quantile(v, w, q)
    for b in range(3):
        np.testing.assert_allclose(out[b].numpy(), np.quantile(v[b][w[b] > 0].numpy(), q), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[3], torch.zeros(len(q)))


def test_luminosity_mask_equals_skimage_lab_threshold(real_tile):
    x = torch.from_numpy(real_tile).permute(2, 0, 1)[None].float() / 255
    m = tissue_mask(x)[0, 0].numpy() > 0
    lab = rgb2lab(real_tile)
    ref = (lab[..., 0] / 100 < 0.8) & (real_tile > 1).all(-1)
    assert (m != ref).mean() < 1e-3  # float32 vs float64 ties at the threshold only


# ----------------------------------------------------------------------------- estimators


def _spectra_batch(spectrum, n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, dtype=torch.float64, generator=g))
    lam = torch.tensor(spectrum, dtype=torch.float64)
    return q @ torch.diag_embed(lam.expand(n, 3)) @ q.transpose(1, 2)


@pytest.mark.parametrize("spectrum", [
    (0.0, 1e-4, 1.0), (0.001, 0.2, 1.0), (0.0, 0.9999, 1.0), (0.0, 1e-8, 1.0), (1.0, 1.0 + 1e-9, 2.0),
    (-3.0, -1e-7, 0.0), (-1.0, 0.0, 1.0), (1e-30, 2e-30, 3e-30), (1e-5, 1.0, 1e5), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0),
])
def test_closed_form_eigh3_matches_numpy_eigh(spectrum):
    from shiftkit.core.ops import eigh3

    a = _spectra_batch(spectrum)
    vals, vecs = eigh3(a)
    ref_vals, ref_vecs = np.linalg.eigh(a.numpy())  # LAPACK, the independent reference
    scale = max(abs(v) for v in spectrum) or 1.0
    np.testing.assert_allclose(vals.numpy(), ref_vals, atol=1e-13 * scale, rtol=0)
    eye = np.eye(3)
    np.testing.assert_allclose((vecs.transpose(1, 2) @ vecs).numpy(), np.broadcast_to(eye, a.shape), atol=1e-13)
    resid = (a @ vecs - vecs * vals[:, None, :]).norm(dim=1)  # A v = λ v for every column
    assert float(resid.max()) <= 1e-13 * scale
    gaps = np.diff(np.asarray(spectrum)) / scale
    for k in range(3):  # eigenvectors of eigenvalues separated by more than 1e-6 of the scale agree with LAPACK's
        sep = (k == 0 or gaps[k - 1] > 1e-6) and (k == 2 or gaps[k] > 1e-6)
        if sep:
            dots = np.abs((vecs[..., k].numpy() * ref_vecs[..., k]).sum(-1))
            assert (1 - dots).max() < 1e-10, (k, (1 - dots).max())


def test_closed_form_eigh3_on_random_symmetric_matrices():
    from shiftkit.core.ops import eigh3, eigh_sym3

    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, 3, 3, dtype=torch.float64, generator=g)
    for a in (x @ x.transpose(1, 2), (x + x.transpose(1, 2)) / 2, 1e-12 * (x + x.transpose(1, 2))):
        vals, vecs = eigh3(a)
        np.testing.assert_allclose(vals.numpy(), np.linalg.eigvalsh(a.numpy()), atol=1e-12 * float(a.abs().max()))
        assert float((a @ vecs - vecs * vals[:, None, :]).norm(dim=1).max()) <= 1e-12 * float(a.abs().max())
    assert torch.equal(eigh_sym3(a, closed_form=False)[0], torch.linalg.eigh(a)[0])
    assert torch.equal(eigh_sym3(a, closed_form=True)[0], eigh3(a)[0])
    with pytest.raises(ValueError, match="3, 3"):
        eigh3(torch.zeros(2, 2, 2))


def test_macenko_with_the_closed_form_eigh_equals_the_lapack_route(monkeypatch, real_tile):
    """The GPU route of the Macenko estimator (closed-form 3×3 eigh), run here on CPU, against the CPU route."""
    import shiftkit.stain.estimate as est_mod
    from shiftkit.core.ops import eigh3
    from shiftkit.data import load_sample_tiles

    tiles = [load_sample_tiles()]
    for name in ("no-tissue-green-pen.png", "tcga-red-pen.png", "almost-white-2.png", "low-nuclei-score-level0.png"):
        tiles.append(read_image(shared("edge_cases_histolab", name))[:224, :224])
    tiles.append(read_image(shared("pypi_skimage_ihc_not_he", "ihc.png"))[:224, :224])
    lapack = [estimate_stains(t, "macenko") for t in tiles]
    monkeypatch.setattr(est_mod, "eigh_sym3", lambda a: eigh3(a))
    closed = [estimate_stains(t, "macenko") for t in tiles]
    for a, b in zip(lapack, closed):
        assert a.status == b.status
        torch.testing.assert_close(b.matrix, a.matrix, atol=1e-6, rtol=0)
        torch.testing.assert_close(b.max_concentrations, a.max_concentrations, atol=1e-5, rtol=1e-6)



@pytest.mark.parametrize("method", ["macenko", "vahadane"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_known_stain_vectors_within_3_degrees(method, seed):
    g = torch.Generator().manual_seed(100 + seed)
    truth = random_stain_matrix(8, 12.0, g)
    x, _, truth = synthetic_he(8, 224, stain_matrix=truth, noise=0.002, seed=seed)
    est = estimate_stains(_u8(x), method)  # 8-bit quantised, as real tiles are
    assert est.status == ["ok"] * 8
    ang = stain_angles(est.matrix, truth)
    assert ang.max() < 3.0, ang


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_a_median_intensity_target_follows_the_typical_tile_not_the_darkest(method):
    """Five synthetic tiles of one known stain matrix at stain intensities x0.5 ... x2.5: the pooled target's
    maximum concentrations follow the darkest tiles, the median target's the middle tile (reference: numpy
    percentiles of the true concentrations); the stain matrix is the same pooled estimate either way."""
    tiles, true99 = [], []
    for i, f in enumerate([0.5, 0.8, 1.0, 1.3, 2.5]):
        x, conc, _ = synthetic_he(1, 224, h_max=1.6 * f, e_max=0.9 * f, noise=0.002, seed=i)
        tiles.append(_u8(x))
        c = conc[0].flatten(1).numpy()
        true99.append(np.percentile(c[:, c.sum(0) > 0], 99, axis=1))
    pooled = StainNormalizer(method).fit(tiles)
    median = StainNormalizer(method).fit(tiles, intensity="median")
    torch.testing.assert_close(median.target_matrix, pooled.target_matrix)
    ref = np.median(true99, axis=0)
    np.testing.assert_allclose(median.target_max_concentrations.numpy(), ref, rtol=0.1)
    assert (pooled.target_max_concentrations.numpy() > 1.3 * ref).all()
    single = StainNormalizer(method).fit(tiles[2])  # one image: both are the same
    torch.testing.assert_close(StainNormalizer(method).fit(tiles[2], intensity="median").target_max_concentrations,
                               single.target_max_concentrations)
    with pytest.raises(UnknownNameError, match="intensity"):
        StainNormalizer(method).fit(tiles, intensity="mean")


def test_a_median_intensity_reinhard_target_is_the_median_of_single_tile_targets():
    tiles = [_u8(synthetic_he(1, 224, h_max=1.6 * f, e_max=0.9 * f, seed=i)[0]) for i, f in enumerate([0.5, 1.0, 2.5])]
    singles = [StainNormalizer("reinhard").fit(t) for t in tiles]
    median = StainNormalizer("reinhard").fit(tiles, intensity="median")
    for attr in ("target_mean", "target_std"):
        ref = np.median([getattr(n, attr).numpy() for n in singles], axis=0)
        np.testing.assert_allclose(getattr(median, attr).numpy(), ref, rtol=1e-5, atol=1e-4)
    pooled = StainNormalizer("reinhard").fit(tiles)
    assert not torch.allclose(pooled.target_std, median.target_std, atol=0.1)


def test_vahadane_is_deterministic_and_seeded(real_tile):
    a = estimate_stains(real_tile, "vahadane")
    b = estimate_stains(real_tile, "vahadane")
    assert torch.equal(a.matrix, b.matrix) and torch.equal(a.max_concentrations, b.max_concentrations)
    c = estimate_stains(real_tile, "vahadane", seed=1, max_pixels=None, vahadane_max_pixels=1024)
    assert stain_angles(a.matrix, c.matrix).max() < 3.0  # another subsample, same answer within 3 degrees


def test_estimate_fields_and_shapes(real_tile):
    est = estimate_stains(np.stack([real_tile] * 3), "macenko")
    assert est.matrix.shape == (3, 2, 3) and est.max_concentrations.shape == (3, 2)
    assert est.tissue_fraction.shape == (3,) and len(est.status) == 3
    assert torch.allclose(est.matrix.norm(dim=-1), torch.ones(3, 2), atol=1e-6)
    assert (est.max_concentrations > 0).all() and (est.matrix >= 0).all()
    with pytest.raises(InvalidArgumentError, match="unknown keywords"):
        estimate_stains(real_tile, "macenko", alpha=1)
    with pytest.raises(UnknownNameError):
        estimate_stains(real_tile, "pca")


def _edge_batch(edge_tiles):
    ihc = read_image(shared("pypi_skimage_ihc_not_he", "ihc.png"))[:224, :224]
    pen = read_image(shared("edge_cases_histolab", "no-tissue-green-pen.png"))[:224, :224]
    names = ["white", "black", "five", "ihc", "pen"]
    return names, [edge_tiles["white"], edge_tiles["black"], edge_tiles["five"], ihc, pen]


EXPECTED = {"white": "low-tissue", "black": "low-tissue", "five": "ok", "ihc": "degenerate", "pen": "degenerate"}


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_edge_tiles_status_alone_and_in_mixed_batch(edge_tiles, real_tile, method):
    names, tiles = _edge_batch(edge_tiles)
    for n, t in zip(names, tiles):
        est = estimate_stains(t, method)
        assert est.status == [EXPECTED[n]], n
        assert torch.isfinite(est.matrix).all() and torch.isfinite(est.max_concentrations).all()
    batch = np.stack([real_tile] + tiles + [real_tile[::-1]])
    est = estimate_stains(batch, method)
    assert est.status == ["ok"] + [EXPECTED[n] for n in names] + ["ok"]
    alone = estimate_stains(real_tile, method)
    assert torch.allclose(est.matrix[0], alone.matrix[0], atol=1e-6)
    with pytest.raises(StainEstimationError, match="low-tissue"):
        estimate_stains(batch, method, on_failure="raise")


def test_pooled_estimate_reports_or_raises_on_unusable_pools(edge_tiles, real_tile):
    blank = [edge_tiles["white"], edge_tiles["black"]]
    est = estimate_stains_pooled(blank)  # default: reported, with the finite reference fallback
    assert est.status == ["low-tissue"] and torch.isfinite(est.matrix).all()
    with pytest.raises(StainEstimationError, match="low-tissue.*tissue fraction 0.000"):
        estimate_stains_pooled(blank, on_failure="raise")
    ok = estimate_stains_pooled([real_tile] + blank, on_failure="raise")  # one tissue tile makes the pool usable
    assert ok.status == ["ok"]
    with pytest.raises(UnknownNameError, match="on_failure"):
        estimate_stains_pooled([real_tile], on_failure="ignore")


@pytest.mark.parametrize("method", ["reinhard", "macenko", "vahadane"])
@pytest.mark.parametrize("policy", ["reference", "identity"])
def test_normalizer_bad_tiles_never_abort_or_nan_and_good_tiles_are_batch_independent(edge_tiles, real_tile, method, policy):
    names, tiles = _edge_batch(edge_tiles)
    norm = StainNormalizer(method, on_failure=policy).fit(read_image(shared("pypi_slideflow", "norm_tile.jpg")))
    good2 = real_tile[::-1].copy()
    batch = np.stack([real_tile] + tiles + [good2])
    out, status = norm.normalize(batch, return_status=True)
    assert out.dtype == np.uint8 and out.shape == batch.shape
    np.testing.assert_array_equal(out[0], norm(real_tile))  # identical to the single-tile output
    np.testing.assert_array_equal(out[-1], norm(good2))
    assert status[0] == "ok" and status[-1] == "ok"
    f = norm(torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255)
    assert torch.isfinite(f).all()
    for i, n in enumerate(names, start=1):
        if status[i] != "ok" and (policy == "identity" or method == "reinhard"):
            np.testing.assert_array_equal(out[i], batch[i])
    with pytest.raises(StainEstimationError):
        StainNormalizer.from_dict({**norm.to_dict(), "on_failure": "raise"})(batch)


def test_white_and_black_stay_white_and_black_under_reference_policy(edge_tiles):
    norm = StainNormalizer("macenko")
    assert np.abs(norm(edge_tiles["white"]).astype(int) - 255).max() <= 1
    assert norm(edge_tiles["black"]).max() <= 1


# ----------------------------------------------------------------------------- normalization physics


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_normalizing_to_synthetic_target_reproduces_target_stains_and_concentrations(method):
    g = torch.Generator().manual_seed(7)
    mats = random_stain_matrix(2, 12.0, g)
    src, _, _ = synthetic_he(1, 256, stain_matrix=mats[:1], h_max=1.2, e_max=0.6, seed=1)
    tgt, _, tgt_m = synthetic_he(1, 256, stain_matrix=mats[1:], h_max=1.8, e_max=1.1, seed=2)
    norm = StainNormalizer(method).fit(tgt)
    out = norm(src)
    est_out = estimate_stains(out, method)
    est_tgt = estimate_stains(tgt, method)
    assert stain_angles(est_out.matrix, tgt_m).max() < 3.0  # output carries the target's stain vectors
    rel = (est_out.max_concentrations - est_tgt.max_concentrations).abs() / est_tgt.max_concentrations
    assert rel.max() < 0.05, rel  # and the target's robust maximum concentrations
    assert not torch.allclose(estimate_stains(src, method).max_concentrations, est_tgt.max_concentrations, rtol=0.2)


def test_reinhard_output_has_target_lab_statistics(real_tile):
    target = read_image(shared("targets_histoqc", "template1.png"))
    norm = StainNormalizer("reinhard").fit(target)
    x = torch.from_numpy(real_tile).permute(2, 0, 1)[None].double() / 255
    out = norm(x)
    from shiftkit.functional import rgb_to_lab
    from shiftkit.stain.stats import weighted_mean_std

    w = tissue_mask(x).flatten(1)
    mean, std = weighted_mean_std(rgb_to_lab(out).flatten(2), w)
    assert torch.allclose(mean[0].float(), norm.target_mean, atol=1.5)  # LAB units; gamut clipping
    assert torch.allclose(std[0].float(), norm.target_std, rtol=0.1, atol=0.5)


def _lab_cases(real_tile):
    """Real tissue, uniform random colours and the corners of the cube (black, white, saturated primaries)."""
    g = torch.Generator().manual_seed(5)
    u8 = torch.cat([
        torch.from_numpy(real_tile).permute(2, 0, 1)[None],
        torch.randint(0, 256, (1, 3, 224, 224), generator=g, dtype=torch.uint8),
        torch.tensor([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3]], dtype=torch.uint8)
        .T[None, :, :, None].repeat(1, 1, 224 * 224 // 6 + 1, 1)[:, :, : 224 * 224].reshape(1, 3, 224, 224),
    ]).contiguous()
    return u8, u8 * (1.0 / 255.0)


def test_companded_lab_equals_kornia_and_skimage_lab(real_tile):
    """L*a*b* = A·f + c with f from lab_companded (exp2/log2 cube root, masks replaced by min/max): equal to
    Kornia's rgb_to_lab, which it restates, and to scikit-image's rgb2lab, an independent implementation."""
    from shiftkit.functional.stain import _F_TO_LAB, _LAB_OFFSET, lab_companded, rgb_to_lab
    from shiftkit.stain.mask import srgb_to_linear

    u8, x = _lab_cases(real_tile)
    f = lab_companded(x)
    lab = torch.einsum("ij,bjm->bim", torch.tensor(_F_TO_LAB, dtype=torch.float64), f.double()) + torch.tensor(_LAB_OFFSET, dtype=torch.float64)[:, None]
    assert (lab.float() - rgb_to_lab(x).flatten(2)).abs().max() < 5e-4  # LAB units (L in 0..100), float32
    sk = np.stack([rgb2lab(im.permute(1, 2, 0).numpy().astype(np.float64)) for im in x])  # (B, H, W, 3)
    assert np.abs(lab.reshape(3, 3, 224, 224).permute(0, 2, 3, 1).numpy() - sk).max() < 0.02
    # the uint8 table equals the float code for all 256 values, and so does f
    v = torch.arange(256, dtype=torch.uint8).repeat(3, 1)[None].contiguous()
    assert torch.equal(srgb_to_linear(v * (1.0 / 255.0), v), srgb_to_linear(v * (1.0 / 255.0)))
    assert torch.equal(lab_companded(x, u8), f)
    import kornia

    assert (srgb_to_linear(x) - kornia.color.rgb_to_linear_rgb(x)).abs().max() < 1e-6


def test_fast_lab_conversions_equal_skimage_in_both_directions(real_tile):
    """rgb_to_lab_fast and lab_to_rgb_fast (the colour maps' CIELAB) against scikit-image, float32 and float64,
    including out-of-gamut L*a*b* (clipped to [0, 1], as scikit-image and Kornia clip)."""
    from skimage.color import lab2rgb

    from shiftkit.functional.stain import lab_to_rgb_fast, rgb_to_lab_fast

    _, x = _lab_cases(real_tile)
    sk = np.stack([rgb2lab(im.permute(1, 2, 0).numpy().astype(np.float64)) for im in x])
    for dt in (torch.float32, torch.float64):
        lab = rgb_to_lab_fast(x.to(dt))
        assert lab.dtype == dt and lab.shape == x.shape
        assert np.abs(lab.permute(0, 2, 3, 1).double().numpy() - sk).max() < 0.02
        wide = lab.clone()
        wide[:, 1:] *= 1.6  # pushes saturated colours out of the sRGB gamut
        back = lab_to_rgb_fast(wide)
        ref = np.stack([np.clip(lab2rgb(w.permute(1, 2, 0).double().numpy()), 0, 1) for w in wide])
        assert back.dtype == dt and (back.min() >= 0) and (back.max() <= 1)
        assert np.abs(back.permute(0, 2, 3, 1).double().numpy() - ref).max() < 2e-3
        assert (lab_to_rgb_fast(lab) - x.to(dt)).abs().max() < 1e-3  # round trip


def test_reinhard_without_lab_tensor_equals_kornia_lab_transfer(real_tile):
    """The transfer as one affine map of f per tile, then Kornia's lab_to_rgb steps restated, against the
    textbook route: Kornia LAB, per-channel affine, Kornia lab_to_rgb (gamut clipping included)."""
    import kornia

    from shiftkit.functional.stain import lab_companded, lab_moments, reinhard_from_companded
    from shiftkit.stain.stats import weighted_mean_std

    u8, x = _lab_cases(real_tile)
    w = tissue_mask(x).flatten(1)
    w[2] = 1.0  # the colour-cube tile has no tissue under the luminosity rule: use every pixel
    f = lab_companded(x, u8)
    mean, std = lab_moments(f, w, binary=True)
    m64, s64 = weighted_mean_std(kornia.color.rgb_to_lab(x.double()).flatten(2), w.double())  # float64 reference
    torch.testing.assert_close(mean, m64, rtol=0, atol=1e-3)
    torch.testing.assert_close(std, s64, rtol=5e-5, atol=1e-4)
    lab = kornia.color.rgb_to_lab(x).flatten(2)
    m2, s2 = weighted_mean_std(lab, w)
    for tm, ts in [([62.0, 25.0, -12.0], [14.0, 9.0, 6.0]), ([30.0, 0.0, 110.0], [30.0, 60.0, 60.0])]:  # 2nd: out of gamut
        tm, ts = torch.tensor(tm), torch.tensor(ts)
        out = reinhard_from_companded(f.clone(), m2, s2, tm, ts, x.shape)
        lab_t = (lab - m2[..., None]) / s2[..., None] * ts[:, None] + tm[:, None]
        ref = kornia.color.lab_to_rgb(lab_t.reshape(x.shape))
        assert (out - ref).abs().max() < 2e-4
        assert ((out * 255).round() != (ref * 255).round()).float().mean() < 1e-3
    assert ((lab_t[:, 0] + 16) / 116 - lab_t[:, 2] / 200 < 0).float().mean() > 0.05  # f_z < 0 was clamped
    same = reinhard_from_companded(f.clone(), mean, std, mean[0], std[0], x.shape)  # tile 0 onto its own moments
    assert (same[0] - x[0]).abs().max() < 1e-5
    # the public kernel takes this route without gradients, Kornia's with them
    from shiftkit.functional import reinhard_normalize

    fast = reinhard_normalize(x, m2, s2, tm, ts)
    slow = reinhard_normalize(x.clone().requires_grad_(), m2, s2, tm, ts).detach()
    assert (fast - slow).abs().max() < 2e-4


def test_tissue_mask_from_shared_linear_rgb_equals_its_own(real_tile):
    from shiftkit.stain.mask import srgb_to_linear

    u8, x = _lab_cases(real_tile)
    own = tissue_mask(x)
    shared_lin = tissue_mask(x, linear=srgb_to_linear(x, u8))
    assert (own != shared_lin).float().mean() < 1e-4  # pixels on the threshold may round either way
    assert own.sum() > 1000


def test_own_target_equals_numpy_projection_onto_own_stain_plane(real_tile):
    # With its own stains as target, normalization keeps each pixel's stain part: the least-squares
    # projection of its OD onto the H/E plane (the 2-stain model drops the residual), computed here by numpy.
    norm = StainNormalizer("macenko", max_pixels=None, clamp_concentrations=False)
    est = estimate_stains(real_tile, "macenko", max_pixels=None)
    norm.set_target(est.matrix[0], est.max_concentrations[0])
    out = norm(real_tile).astype(int)
    s = est.matrix[0].double().numpy()
    od = -np.log(np.clip(real_tile.reshape(-1, 3) / 255.0, 1 / 255, 1.0))
    c = np.linalg.lstsq(s.T, od.T, rcond=None)[0]
    ref = np.clip(np.round(255 * np.exp(-(s.T @ c).T)), 0, 255).reshape(real_tile.shape)
    assert np.abs(out - ref).max() <= 1


def test_pooled_fit_save_load_state_dict_roundtrip(tmp_path, real_tile):
    tiles = [real_tile, read_image(shared("pypi_stardist", "histo.jpg"))]
    for method in ("reinhard", "macenko", "vahadane"):
        norm = StainNormalizer(method).fit(tiles)
        path = tmp_path / f"{method}.json"
        norm.save(path)
        json.loads(path.read_text())
        loaded = StainNormalizer.load(path)
        np.testing.assert_array_equal(loaded(real_tile), norm(real_tile))
        sd = norm.state_dict()
        assert {"target_matrix", "target_max_concentrations", "target_mean", "target_std"} <= set(sd)
        fresh = StainNormalizer(method)
        fresh.load_state_dict(sd)
        np.testing.assert_array_equal(fresh(real_tile), norm(real_tile))
    pooled = estimate_stains_pooled(tiles, "macenko")
    assert pooled.matrix.shape == (1, 2, 3) and pooled.status == ["ok"]


def test_gradcheck_apply_step_with_fixed_matrices():
    g = torch.Generator().manual_seed(0)
    x = (0.2 + 0.6 * torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64)).requires_grad_()
    src = random_stain_matrix(1, 5.0, g).double()
    tgt = reference_stain_matrix("ruifrok", dtype=torch.float64)[None]
    smax = torch.tensor([[1.5, 0.8]], dtype=torch.float64)
    tmax = torch.tensor([[1.9, 1.0]], dtype=torch.float64)

    def f(img, s):
        return normalize_stains(img, s, smax, tgt, tmax, clamp_concentrations=False)

    assert torch.autograd.gradcheck(f, (x, src.requires_grad_()), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_device_kept_and_cpu_equals_device(real_tile, device):
    norm = StainNormalizer("macenko").to(device)
    x = (torch.from_numpy(np.stack([real_tile, real_tile[::-1]])).permute(0, 3, 1, 2).float() / 255).to(device)
    out = norm(x)
    assert out.device == x.device
    cpu = StainNormalizer("macenko")(x.cpu())
    assert (out.cpu() - cpu).abs().max() < 2e-3


@pytest.mark.parametrize("i0", [1.0, 0.94])
def test_uint8_lookup_equals_the_float_path(i0):
    """The lookup tables give what the float code gives on the image contract's uint8 values, for every byte."""
    from shiftkit.stain.model import MIN_INTENSITY, uint8_lookup

    u8 = torch.arange(256, dtype=torch.uint8).repeat(2, 3, 7, 1)  # (2, 3, 7, 256): every value, many positions
    x = u8 * (1.0 / 255.0)
    assert torch.equal(uint8_lookup(u8, "od", i0), rgb_to_od(x, i0=i0))
    assert torch.equal(uint8_lookup(u8, "log", i0), x.clamp(MIN_INTENSITY, i0).log())
    assert torch.equal(uint8_lookup(u8[..., ::2].contiguous(), "od", i0), rgb_to_od(x[..., ::2], i0=i0))


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
@pytest.mark.parametrize("tissue_method", ["luminosity", "od"])
def test_estimation_from_uint8_lookup_tables_equals_the_float_path(real_tile, method, tissue_method):
    """With the uint8 pixels at hand, the estimator reads OD and linear RGB from tables: the same estimate."""
    from shiftkit.stain.estimate import estimator_config, estimate_batch

    u8 = torch.from_numpy(np.stack([real_tile, real_tile[::-1].copy(), np.full_like(real_tile, 250)])).permute(0, 3, 1, 2).contiguous()
    x = u8 * (1.0 / 255.0)
    cfg = estimator_config(method, {"tissue_method": tissue_method})
    a = estimate_batch(x, cfg, None, "report")
    b = estimate_batch(x, cfg, None, "report", u8)
    assert a.status == b.status and a.status[:2] == ["ok", "ok"] and a.status[2] == "low-tissue"
    assert torch.equal(a.matrix, b.matrix) and torch.equal(a.max_concentrations, b.max_concentrations)


def test_srgb_codec_equals_kornia_with_and_without_gradients():
    import kornia

    from shiftkit.stain.mask import linear_to_srgb, srgb_to_linear

    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.rand(3999, generator=g), torch.linspace(0, 0.06, 3999), torch.tensor([0.0, 1.0, 0.04045])])
    x = x.view(1, 3, 2667, 1).double()
    lin = srgb_to_linear(x)
    assert (lin - kornia.color.rgb_to_linear_rgb(x)).abs().max() < 3e-9  # the branches meet to 2.3e-9
    enc = linear_to_srgb(lin * 1.3 - 0.01)  # out of range both ways: clamped
    ref = kornia.color.linear_rgb_to_rgb((lin * 1.3 - 0.01).clamp(0, 1))
    assert (enc - ref).abs().max() < 1e-5 and enc.min() >= 0 and enc.max() <= 1
    assert (linear_to_srgb(lin) - x).abs().max() < 1e-5  # round trip
    xg = x.clone().requires_grad_()
    out = linear_to_srgb(srgb_to_linear(xg) * 0.8)
    torch.testing.assert_close(out.detach(), linear_to_srgb(srgb_to_linear(x) * 0.8), rtol=0, atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(xg.grad).all() and (xg.grad >= 0).all() and xg.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ marker ink
def _ink_strokes(colour, seed):
    """Blurred marker strokes of one colour on glass."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.full((256, 256, 3), 245, np.uint8)
    for _ in range(3):
        p = rng.integers(0, 256, (2, 2))
        cv2.line(img, tuple(int(v) for v in p[0]), tuple(int(v) for v in p[1]), colour, int(rng.integers(15, 40)))
    return cv2.GaussianBlur(img, (0, 0), 3)


INKS = {"red": (200, 30, 40), "green": (40, 150, 110), "blue": (40, 60, 190), "black": (40, 40, 50), "pink": (230, 90, 160)}


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
@pytest.mark.parametrize("colour", sorted(INKS))
def test_synthetic_marker_ink_alone_is_not_ok(method, colour):
    tiles = np.stack([_ink_strokes(INKS[colour], s) for s in range(2)])
    est = estimate_stains(tiles, method)
    assert est.status == ["degenerate", "degenerate"], (colour, est.status)


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_real_pen_ink_tiles_are_not_ok(method):
    from PIL import Image

    folder = shared("edge_cases_histolab")
    for name in ("no-tissue-red-pen.png", "no-tissue-green-pen.png"):
        img = np.array(Image.open(folder / name).convert("RGB"))
        assert estimate_stains(img, method).status == ["degenerate"], name


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_real_he_stays_ok_under_the_ink_checks(method):
    from PIL import Image

    from shiftkit.data import load_sample_tiles

    assert estimate_stains(load_sample_tiles(), method).status.count("ok") == len(load_sample_tiles())
    root = shared()
    files = sorted((root / "camelyon17_5centers").glob("*.png")) + sorted((root / "mitos_scanner_pairs_dev").rglob("*_0.png"))
    files += sorted((root / "edge_cases_histolab").glob("tissue-level*.png")) + sorted((root / "scanners5_same_region").glob("*.png"))
    for f in files:
        img = np.array(Image.open(f).convert("RGB"))
        assert estimate_stains(img, method).status == ["ok"], f.name
