"""Shared suite every shiftkit transform must pass, plus the physics of the stain augmentations."""

import json

import numpy as np
import pytest
import torch
from skimage.color import rgb2hed

import shiftkit
from shiftkit import HEDJitter, StainAugment, StainNormalize, StainNormalizer, StainTemplateSample, estimate_stains
from shiftkit.core import InvalidArgumentError, InvalidImageError, UnknownNameError
from shiftkit.data import list_images, load_sample, load_sample_tiles, random_stain_matrix, read_image, synthetic_he
from shiftkit.stain import reference_stain_matrix, stain_angles, tissue_mask
from shiftkit.transforms import list_transforms, to_albumentations, to_torchvision, transform_from_dict

from .conftest import devices


@pytest.fixture(scope="module")
def tiles():
    return torch.from_numpy(load_sample_tiles()[:6]).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def stats():
    return shiftkit.fit_stain_statistics(list(load_sample_tiles()))


# Every registered transform has a factory here (enforced by test_every_registered_transform_is_in_the_table).
# factory(seed, **kw) -> transform; "random" says whether it draws parameters.
FACTORIES = {
    "StainAugment": (lambda seed, stats, **kw: StainAugment(preset="strong", seed=seed, **kw), True),
    "StainAugment[vahadane]": (lambda seed, stats, **kw: StainAugment(method="vahadane", preset="medium", seed=seed, **kw), True),
    "StainAugment[fixed]": (
        lambda seed, stats, **kw: StainAugment(method="fixed", matrix=reference_stain_matrix("macenko"), preset="strong", beta_units="relative", seed=seed, **kw),
        True,
    ),
    "HEDJitter": (lambda seed, stats, **kw: HEDJitter(preset="strong", seed=seed, **kw), True),
    "StainTemplateSample": (lambda seed, stats, **kw: StainTemplateSample(stats, preset="medium", seed=seed, **kw), True),
    "StainNormalize": (
        lambda seed, stats, **kw: StainNormalize(StainNormalizer("macenko").fit(load_sample("slideflow")), **{k: v for k, v in kw.items() if k == "keepdim"}),
        False,
    ),
}
def _transfer_profile():
    """A bundled colour profile with an MTF and noise added, so that every part of the kernel runs."""
    from shiftkit.shifts.transfer import PROFILES_DIR

    prof = json.loads((PROFILES_DIR / "scanners5-aperio-to-nz2.json").read_text())
    prof["mtf"] = {"gain": np.linspace(1.0, 0.4, 32).tolist(), "mpp": 0.5}
    prof["noise"] = {"sigma": 0.01}
    prof["parts"] = ["colour", "mtf", "noise"]
    return prof


FACTORIES["ScannerTransfer"] = (lambda seed, stats, **kw: shiftkit.ScannerTransfer(_transfer_profile(), strength_range=(0.3, 1.0),
                                                                               seed=seed, **kw), True)
# every registered shift, at severity 3 (shifts leave blank tiles blank only in some families: not tested here)
for _name in shiftkit.list_shifts():
    FACTORIES[f"Shift[{_name}]"] = ((lambda n: lambda seed, stats, **kw: shiftkit.get_shift(n, 3, seed=seed, **kw))(_name), None)
FACTORIES["RandomScanner"] = (lambda seed, stats, **kw: shiftkit.RandomScanner(seed=seed, **kw), None)
NAMES = sorted(FACTORIES)


def make(name, stats, seed=0, **kw):
    return FACTORIES[name][0](seed, stats, **kw)


def test_every_registered_transform_is_in_the_table():
    covered = {n.split("[")[0] for n in FACTORIES}
    assert set(list_transforms()) <= covered, set(list_transforms()) - covered


@pytest.mark.parametrize("name", [n for n in NAMES if FACTORIES[n][1] is not False])  # StainNormalize is p = 1
def test_p0_is_identity(name, tiles, stats):
    assert torch.equal(make(name, stats, p=0.0)(tiles), tiles)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_keepdim_replay_and_no_inplace(name, tiles, stats):
    t = make(name, stats, keepdim=True)
    x = tiles[0].clone()
    before = x.clone()
    y = t(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(x, before)
    assert make(name, stats, keepdim=False)(x).shape == (1, *x.shape)
    out = t(tiles)
    assert torch.equal(t(tiles, params=t._params), out)  # exact replay
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_output_and_serialization_roundtrip(name, tiles, stats):
    a = make(name, stats, seed=3)
    b = transform_from_dict(json.loads(json.dumps(a.to_dict())))
    assert torch.equal(a(tiles), b(tiles))
    c = type(a).from_yaml(a.to_yaml())
    assert torch.equal(make(name, stats, seed=3)(tiles), c(tiles))
    if FACTORIES[name][1]:
        assert not torch.equal(make(name, stats, seed=4)(tiles), make(name, stats, seed=3)(tiles))


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_per_sample_and_draws_differ_per_tile(name, tiles, stats):
    t = make(name, stats, seed=1)
    out = t(tiles)
    params = t._params
    for i in range(tiles.shape[0]):
        p_i = {k: (v[i : i + 1] if torch.is_tensor(v) and v.ndim and v.shape[0] == tiles.shape[0] else v) for k, v in params.items()}
        assert (t(tiles[i : i + 1], params=p_i) - out[i : i + 1]).abs().max() < 1e-5
    if FACTORIES[name][1]:
        drawn = [v for k, v in params.items() if k not in ("batch_prob", "forward_input_shape")]
        assert all(not torch.equal(v[0], v[1]) for v in drawn)  # per-sample, not one draw per batch


@pytest.mark.parametrize("name", [n for n in NAMES if FACTORIES[n][1] is not False])
def test_same_on_batch(name, tiles, stats):
    t = make(name, stats, same_on_batch=True)
    same = tiles[:1].expand(4, -1, -1, -1).contiguous()
    out = t(same)
    assert all(torch.equal(out[0], out[i]) for i in range(1, 4))
    for k, v in t._params.items():
        if k != "forward_input_shape":
            assert torch.equal(v[0], v[-1]), k


@pytest.mark.parametrize("name", NAMES)
def test_blank_and_black_tiles_no_nan(name, stats):
    x = torch.cat([torch.ones(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)])
    out = make(name, stats)(x)
    assert torch.isfinite(out).all()
    if not (name.startswith("Shift[") or name in ("RandomScanner", "ScannerTransfer")):  # stain transforms keep blank tiles blank
        assert (out[0] - 1).abs().max() < 2 / 255


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("device", devices())
def test_device_and_empty_batch(name, device, tiles, stats):
    t = make(name, stats).to(device)
    out = t(tiles[:2].to(device))
    assert out.device.type == torch.device(device).type
    assert t(torch.zeros(0, 3, 8, 8, device=device)).shape == (0, 3, 8, 8)


def test_invalid_arguments_name_the_argument(stats):
    with pytest.raises(InvalidArgumentError, match="`alpha_range` is not ordered"):
        StainAugment(alpha_range=(1.2, 0.8))
    with pytest.raises(InvalidArgumentError, match="`angle_range` out of range"):
        StainAugment(angle_range=(0, 90))
    with pytest.raises(UnknownNameError, match="preset"):
        HEDJitter(preset="extreme")
    with pytest.raises(InvalidArgumentError, match="`p` out of range"):
        HEDJitter(p=1.5)
    with pytest.raises(InvalidArgumentError, match="`matrix` is missing"):
        StainAugment(method="fixed")
    with pytest.raises(InvalidArgumentError, match="unknown keywords"):
        StainAugment(colour="pink")
    with pytest.raises(InvalidImageError, match="float tensor"):
        StainAugment()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(InvalidImageError, match=r"outside \[0, 1\]"):
        StainAugment()(torch.full((1, 3, 8, 8), 2.0))


# ----------------------------------------------------------------------------- physics


def _identity_params(t, x):
    p = t.draw_parameters(tuple(x.shape))
    p["alpha"][:] = 1.0
    p["beta"][:] = 0.0
    p["angle"][:] = 0.0
    return p


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_identity_parameters_reproduce_the_tile_within_1_over_255(tiles, method):
    t = StainAugment(method=method, preset="strong", seed=0)
    out = t(tiles, params=_identity_params(t, tiles))
    w = tissue_mask(tiles) > 0
    diff = (out - tiles).abs().amax(1, keepdim=True)
    assert diff[w].max() <= 1 / 255


def _synthetic(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, _, m = synthetic_he(2, 224, stain_matrix=random_stain_matrix(2, 8.0, g), seed=seed)
    return x, m


def test_scaling_only_h_changes_only_the_h_concentration():
    x, _ = _synthetic()
    t = StainAugment(seed=0)
    p = _identity_params(t, x)
    p["alpha"][:, 0] = 1.5
    out = t(x, params=p)
    before = estimate_stains(x, "macenko", max_pixels=None)
    after = estimate_stains(out, "macenko", max_pixels=None)
    ratio = after.max_concentrations / before.max_concentrations
    assert torch.allclose(ratio[:, 0], torch.full((2,), 1.5), rtol=0.03), ratio
    assert torch.allclose(ratio[:, 1], torch.ones(2), rtol=0.02), ratio
    assert stain_angles(after.matrix, before.matrix).max() < 1.0


@pytest.mark.parametrize("angle", [5.0, 10.0])
def test_hue_rotation_moves_the_h_vector_by_the_requested_angle(angle):
    x, _ = _synthetic(1)
    t = StainAugment(seed=0)
    p = _identity_params(t, x)
    p["angle"][:, 0] = angle
    out = t(x, params=p)
    before = estimate_stains(x, "macenko", max_pixels=None).matrix
    after = estimate_stains(out, "macenko", max_pixels=None).matrix
    ang = stain_angles(after, before)
    assert ((ang[:, 0] - angle).abs() <= 1.0).all(), ang
    assert (ang[:, 1] <= 1.0).all(), ang


def test_from_images_fits_the_matrix_once_and_serializes_as_fixed():
    g = torch.Generator().manual_seed(3)
    truth = random_stain_matrix(1, 8.0, g)
    x, _, _ = synthetic_he(4, 128, stain_matrix=truth.expand(4, 2, 3), seed=3)
    t = StainAugment.from_images(list(x), preset="medium", seed=0)  # pooled over four tiles
    assert t.method == "fixed" and stain_angles(t.matrix[None], truth).max() < 1.0
    # scaling H alone with the fitted matrix scales only H, as with per-tile estimation
    p = _identity_params(t, x)
    p["alpha"][:, 0] = 1.5
    before = estimate_stains(x, "macenko", max_pixels=None)
    after = estimate_stains(t(x, params=p), "macenko", max_pixels=None)
    ratio = after.max_concentrations / before.max_concentrations
    assert torch.allclose(ratio[:, 0], torch.full((4,), 1.5), rtol=0.03), ratio
    assert torch.allclose(ratio[:, 1], torch.ones(4), rtol=0.02), ratio
    d = t.to_dict()
    assert d["args"]["method"] == "fixed"
    assert torch.equal(transform_from_dict(json.loads(json.dumps(d)))(x, params=t._params), t(x, params=t._params))
    with pytest.raises(shiftkit.core.StainEstimationError, match="images"):
        StainAugment.from_images(torch.ones(1, 3, 64, 64))
    from shiftkit.data import sample_tiles_dir  # a folder: the same as its images in a list

    folder = StainAugment.from_images(sample_tiles_dir(), seed=0)
    listed = StainAugment.from_images([read_image(p) for p in list_images(sample_tiles_dir())], seed=0)
    assert torch.equal(folder.matrix, listed.matrix)
    with pytest.raises(UnknownNameError, match="estimator"):
        StainAugment.from_images(x, estimator="pca")
    with pytest.raises(InvalidArgumentError, match="matrix"):
        StainAugment.from_images(x, matrix=truth[0])


def test_hed_jitter_agrees_with_skimage_colour_deconvolution(tiles):
    t = HEDJitter(seed=0, augment_background=True)  # the kernel alone; background handling is tested below
    p = t.draw_parameters(tuple(tiles[:2].shape))
    p["alpha"][:] = torch.tensor([1.3, 1.0, 1.0])
    p["beta"][:] = 0.0
    out = t(tiles[:2].double(), params=p)
    x_np = tiles[:2].double().permute(0, 2, 3, 1).numpy()
    o_np = out.permute(0, 2, 3, 1).numpy()
    hed_in = np.stack([rgb2hed(im) for im in x_np])
    hed_out = np.stack([rgb2hed(im) for im in o_np])
    ok = (o_np > 1.5 / 255).all(-1) & (o_np < 1).all(-1) & (x_np > 1.5 / 255).all(-1)  # not clipped
    np.testing.assert_allclose(hed_out[..., 1][ok], hed_in[..., 1][ok], atol=2e-4)  # E unchanged
    np.testing.assert_allclose(hed_out[..., 2][ok], hed_in[..., 2][ok], atol=2e-4)  # DAB unchanged
    np.testing.assert_allclose(hed_out[..., 0][ok], 1.3 * hed_in[..., 0][ok], atol=2e-3)  # H scaled by 1.3


@pytest.mark.parametrize("make_t", [lambda: HEDJitter(preset="strong", seed=0), lambda: StainAugment(preset="strong", seed=0)])
def test_background_glass_is_kept_unless_asked(tiles, make_t):
    t = make_t()
    out = t(tiles)
    od_sum = -torch.log(tiles.clamp_min(1 / 255)).sum(1, keepdim=True)
    glass = (od_sum < 0.3).expand_as(tiles)
    assert glass.any() and torch.equal(out[glass], tiles[glass])
    t.augment_background = True
    assert not torch.equal(t(tiles, params=t._params)[glass], tiles[glass])


def test_hed_dab_is_only_jittered_when_asked():
    t = HEDJitter(preset="strong", seed=0)
    p = t.draw_parameters((8, 3, 4, 4))
    assert torch.equal(p["alpha"][:, 2], torch.ones(8)) and torch.equal(p["beta"][:, 2], torch.zeros(8))
    p = HEDJitter(preset="strong", jitter_dab=True, seed=0).draw_parameters((8, 3, 4, 4))
    assert not torch.equal(p["alpha"][:, 2], torch.ones(8))


def test_hed_cutoff_skips_tiles_outside_the_range(tiles):
    x = torch.cat([tiles[:1], torch.full((1, 3, 224, 224), 0.97)])
    out = HEDJitter(preset="strong", cutoff_range=(0.05, 0.95), seed=0)(x)
    assert not torch.equal(out[0], x[0]) and torch.equal(out[1], x[1])


def test_template_statistics_match_skimage_and_sampled_std_is_never_negative(tiles):
    from skimage.color import rgb2lab

    imgs = list(load_sample_tiles()[:4])
    st = shiftkit.fit_stain_statistics(imgs, "lab")
    means = []
    for im in imgs:
        lab = rgb2lab(im)
        w = tissue_mask(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255)[0, 0].numpy() > 0
        means.append(lab[w].mean(0))
    np.testing.assert_allclose(st["mean"]["mean"], np.mean(means, 0), atol=0.05)
    np.testing.assert_allclose(st["mean"]["std"], np.std(means, 0, ddof=1), atol=0.05)
    wide = StainTemplateSample(st, std_hyper=10.0, seed=0)
    assert (wide.draw_parameters((4096, 3, 8, 8))["target_std"] > 0).all()


def test_template_sample_moves_tile_statistics_to_the_drawn_template(tiles):
    from shiftkit.functional import rgb_to_lab
    from shiftkit.stain.stats import weighted_mean_std

    t = StainTemplateSample(shiftkit.fit_stain_statistics(list(load_sample_tiles())), seed=0)
    out = t(tiles)
    w = tissue_mask(tiles).flatten(1)
    m, s = weighted_mean_std(rgb_to_lab(out).flatten(2), w)
    assert (m - t._params["target_mean"]).abs().max() < 3.0  # LAB units; gamut clipping and mask drift


# ----------------------------------------------------------------------------- adapters


def test_albumentations_adapter_seeded_per_image_and_serializable():
    import albumentations as A

    imgs = load_sample_tiles()[:4]

    def run(seed):
        pipe = A.Compose([to_albumentations(StainAugment(preset="strong", seed=0))], seed=seed)
        return [pipe(image=im)["image"] for im in imgs], pipe

    a, pipe = run(7)
    b, _ = run(7)
    c, _ = run(8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert a[0].dtype == np.uint8 and a[0].shape == imgs[0].shape
    pipe2 = A.Compose([to_albumentations(HEDJitter(preset="strong"))], seed=1)
    draws = [pipe2(image=imgs[0])["image"] for _ in range(3)]
    assert not np.array_equal(draws[0], draws[1])  # a new draw per call on the same image
    again = A.from_dict(A.to_dict(pipe))
    again.set_random_seed(7)
    assert all(np.array_equal(x, again(image=im)["image"]) for x, im in zip(a, imgs))
    f32 = (imgs[0] / 255).astype(np.float32)
    assert pipe(image=f32)["image"].dtype == np.float32


def test_albumentations_adapter_matches_batched_path_with_same_parameters():
    im = load_sample_tiles()[0]
    aug = StainAugment(preset="strong", seed=0)
    out = to_albumentations(aug).apply(im, torch_seed=123)
    from shiftkit.core import from_batch, to_batch

    x, spec = to_batch(im)  # the same uint8 -> float conversion as the adapter
    ref = aug(x, params=aug.draw_parameters(tuple(x.shape), torch.Generator().manual_seed(123)))
    assert np.array_equal(out, from_batch(ref, spec))


class _Tiles(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.tile = torch.from_numpy(load_sample_tiles()[0]).permute(2, 0, 1)
        self.transform = transform

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.transform(self.tile)


def test_torchvision_adapter_in_dataloader_workers_draws_differently():
    ds = _Tiles(to_torchvision(StainAugment(preset="strong", seed=0)))
    out = torch.cat(list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2,
                                                     generator=torch.Generator().manual_seed(0))))
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 224, 224)
    assert not torch.equal(out[0], out[2])  # first item of worker 0 vs worker 1
    again = torch.cat(list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2,
                                                       generator=torch.Generator().manual_seed(0))))
    assert torch.equal(out, again)  # reproducible given the DataLoader's seed


def test_kornia_augmentation_sequential_composes(tiles):
    import kornia.augmentation as K

    seq = K.AugmentationSequential(StainAugment(preset="light", seed=0), HEDJitter(preset="light", seed=0), K.RandomHorizontalFlip())
    out = seq(tiles)
    assert out.shape == tiles.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("keep_residual", [True, False])
@pytest.mark.parametrize("background_od", [None, 0.3])
@pytest.mark.parametrize("i0", [1.0, 0.9])
def test_in_place_kernels_equal_their_autograd_path(keep_residual, background_od, i0):
    """perturb_stains / hed_jitter without gradients take a shorter route (in place, I·exp(−Δ), exp2); with
    gradients the textbook one. Black pixels, glass and glass brighter than I0 included."""
    from shiftkit.functional.augment import hed_jitter, perturb_stains
    from shiftkit.stain import reference_stain_matrix, rgb_to_od

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g, dtype=torch.float64) * 0.8 + 0.1
    x[:, :, :3] = 0.97  # glass, brighter than I0 = 0.9
    x[:, :, 3:5] = 0.0  # black: clamped at 1/255 before the log
    x[:, 1, 5:7] = 0.0
    m = reference_stain_matrix("macenko").double().expand(4, 2, 3)
    al, be = torch.rand(4, 2, generator=g, dtype=torch.float64) + 0.5, torch.rand(4, 2, generator=g, dtype=torch.float64) * 0.1
    an, az = torch.rand(4, 2, generator=g, dtype=torch.float64) * 5, torch.rand(4, 2, generator=g, dtype=torch.float64) * 6
    before = x.clone()
    kw = dict(angle=an, azimuth=az, keep_residual=keep_residual, background_od=background_od, i0=i0)
    fast = perturb_stains(x, m, al, be, **kw)
    slow = perturb_stains(x.clone().requires_grad_(), m, al, be, **kw).detach()
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    a3, b3 = torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.5, torch.rand(4, 3, generator=g, dtype=torch.float64) * 0.1
    hed = hed_jitter(x, a3, b3, background_od=background_od, i0=i0)
    torch.testing.assert_close(hed, hed_jitter(x.clone().requires_grad_(), a3, b3, background_od=background_od, i0=i0).detach(),
                               rtol=0, atol=1e-12)
    assert torch.equal(x, before)  # the input is never written
    if background_od is not None:  # glass keeps its input value to the bit
        glass = (rgb_to_od(x, i0=i0).sum(1, keepdim=True) < background_od).expand_as(x)
        assert glass.sum() >= 4 * 3 * 3 * 32
        assert torch.equal(fast[glass], x[glass]) and torch.equal(hed[glass], x[glass])


def _augment_cases():
    from shiftkit.stain import reference_stain_matrix

    return [
        HEDJitter(preset="strong", seed=1),
        StainAugment(method="fixed", matrix=reference_stain_matrix("macenko"), preset="strong", seed=2),
        StainAugment(method="macenko", preset="strong", seed=3, p=0.5),  # a per-tile gate
        StainAugment(method="vahadane", preset="medium", seed=4, beta_units="relative"),
        StainTemplateSample(_sample_statistics(), preset="strong", seed=5),
        StainNormalize(StainNormalizer("reinhard").fit(load_sample_tiles()[:2])),
        StainNormalize(StainNormalizer("macenko")),
    ]


def _sample_statistics():
    from shiftkit import fit_stain_statistics

    return fit_stain_statistics(load_sample_tiles()[:6], "lab")


@pytest.mark.parametrize("idx", range(7))
def test_augment_on_uint8_batches_equals_the_float_tensor_path(idx):
    """augment(numpy uint8 batch) = from_batch(forward(to_batch(batch)), ...) with the same parameters, although it
    converts and transforms in chunks (10 tiles of 224² = 2 chunks, the last one ragged)."""
    from shiftkit.core import from_batch, to_batch

    t = _augment_cases()[idx]
    tiles = load_sample_tiles()[:10]
    params = t.forward_parameters((10, 3, 224, 224))
    got = t.augment(tiles, params=params)
    x, spec = to_batch(tiles)
    expected = from_batch(t(x, params=params), spec)
    assert got.dtype == np.uint8 and got.shape == tiles.shape
    np.testing.assert_array_equal(got, expected)
    if t.p < 1:
        skipped = (params["batch_prob"] <= 0.5).numpy()
        assert 0 < skipped.sum() < 10
        np.testing.assert_array_equal(got[skipped], tiles[skipped])  # gated tiles come back unchanged
    one = t.augment(tiles[0])  # a single (H, W, 3) image keeps its rank
    assert one.shape == tiles[0].shape and one.dtype == np.uint8
    ten = t.augment(torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous(), params=params)  # uint8 tensors too
    assert ten.dtype == torch.uint8
    np.testing.assert_array_equal(ten.permute(0, 2, 3, 1).numpy(), expected)


def test_augment_rejects_bad_input_by_name():
    with pytest.raises(InvalidImageError, match="`images` has the wrong shape"):
        HEDJitter(seed=0).augment(np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError, match="`images` has the wrong type"):
        HEDJitter(seed=0).augment([[1, 2, 3]])


@pytest.mark.parametrize("cls", [shiftkit.StainAugment, shiftkit.HEDJitter])
def test_no_argument_transforms_are_the_medium_preset_not_an_identity(cls, real_tile):
    tiles = np.stack([real_tile] * 4)
    plain, medium = cls(seed=3), cls(preset="medium", seed=3)
    assert plain.to_dict()["args"] == medium.to_dict()["args"]
    out = plain.augment(tiles)
    assert np.array_equal(out, medium.augment(tiles))
    assert np.abs(out.astype(int) - tiles).mean() > 2.0  # a visible change, not the 0.003/255 of identity ranges


def test_old_configs_replay_as_they_were_and_newer_ones_are_refused(real_tile):
    from shiftkit.transforms import transform_from_dict

    old = {"transform": "HEDJitter", "version": 1,
           "args": {**shiftkit.HEDJitter(seed=0).to_dict()["args"], "alpha_range": [1.0, 1.0], "beta_range": [0.0, 0.0]}}
    replay = transform_from_dict(old)
    assert replay.alpha_range == (1.0, 1.0) and replay.beta_range == (0.0, 0.0)
    assert np.abs(replay.augment(real_tile[None]).astype(int) - real_tile[None]).max() <= 1
    with pytest.raises(InvalidArgumentError, match="config version"):
        transform_from_dict({**old, "version": 99})


# ----------------------------------------------------------------------------- Reinhard, 8-bit OpenCV route
def _reinhard_reference_8bit(img, tm, ts, thr=0.8):
    """Reinhard by hand in OpenCV's 8-bit LAB, float arithmetic, no lookup table: the parity reference."""
    import cv2

    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB).astype(np.float64)
    tissue = lab[..., 0] < thr * 255
    scale, off = np.array([255 / 100, 1, 1]), np.array([0, 128, 128])
    m, s = lab[tissue].mean(0), lab[tissue].std(0)
    t_m, t_s = np.asarray(tm) * scale + off, np.asarray(ts) * scale
    out = np.clip(np.rint((lab - m) / s * t_s + t_m), 0, 255).astype(np.uint8)
    return cv2.cvtColor(out, cv2.COLOR_LAB2RGB)


def test_reinhard_opencv8_route_equals_a_hand_written_opencv_lab_transfer():
    tiles = load_sample_tiles()[:6]
    norm = StainNormalizer("reinhard", route="opencv8").fit(load_sample("slideflow"))
    out, status = norm.normalize(tiles, return_status=True)
    assert out.dtype == np.uint8 and out.shape == tiles.shape and status == ["ok"] * 6
    tm, ts = norm.target_mean.tolist(), norm.target_std.tolist()
    for a, t in zip(out, tiles):
        ref = _reinhard_reference_8bit(t, tm, ts)
        d = np.abs(a.astype(int) - ref.astype(int))
        assert (d <= 1).mean() > 0.999 and d.max() <= 2  # cv2.meanStdDev vs numpy moments: rounding at a LUT step
    # torch (B, 3, H, W) uint8 on the CPU takes the same route and layout
    t = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(norm(t), torch.from_numpy(out).permute(0, 3, 1, 2))
    # one image (H, W, 3)
    np.testing.assert_array_equal(norm(tiles[0]), out[0])


def test_reinhard_opencv8_route_stays_near_the_float_route_and_keeps_blank_tiles():
    tiles = load_sample_tiles()[:6]
    target = load_sample("slideflow")
    f = StainNormalizer("reinhard").fit(target)
    o = StainNormalizer("reinhard", route="opencv8").fit(target)
    d = np.abs(f(tiles).astype(int) - o(tiles).astype(int))
    assert d.mean() < 2.0 and np.percentile(d, 99) <= 8  # 8-bit LAB quantisation and clipping, not another method
    blank = np.full((2, 64, 64, 3), 245, np.uint8)
    out, status = o.normalize(blank, return_status=True)
    assert status == ["low-tissue", "low-tissue"] and np.array_equal(out, blank)
    # float input takes the float route (the same numbers as a float-route normalizer)
    xf = torch.from_numpy(tiles[:2]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(o(xf), f(xf))
    with pytest.raises(InvalidArgumentError, match="reinhard"):
        StainNormalizer("macenko", route="opencv8")
    with pytest.raises(UnknownNameError):
        StainNormalizer("reinhard", route="uint8")
