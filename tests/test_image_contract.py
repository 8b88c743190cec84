import numpy as np
import pytest
import torch

from shiftkit import StainNormalizer
from shiftkit.core import InvalidImageError, from_batch, to_batch

from .conftest import devices

DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _as(x_u8: torch.Tensor, dtype):
    return x_u8 if dtype == torch.uint8 else (x_u8.double() / 255).to(dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batched", [False, True])
def test_torch_roundtrip_keeps_dtype_device_layout(real_tile, dtype, device, batched):
    t = torch.from_numpy(real_tile).permute(2, 0, 1)
    x = _as(t if not batched else torch.stack([t, t.flip(-1)]), dtype).to(device)
    b, spec = to_batch(x)
    assert b.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert b.shape == ((2 if batched else 1), 3, 224, 224)
    y = from_batch(b, spec)
    assert y.dtype == dtype and y.device == x.device and y.shape == x.shape
    assert torch.equal(y, x)  # identity round trip is exact for every dtype


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.float64])
def test_numpy_roundtrip_hwc_and_bhwc(real_tile, dtype):
    for arr in (real_tile, np.stack([real_tile, real_tile[::-1]])):
        x = arr if dtype == np.uint8 else (arr / 255.0).astype(dtype)
        y = from_batch(*to_batch(x))
        assert isinstance(y, np.ndarray) and y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(y, x)


def test_rgba_opaque_accepted_and_alpha_restored(real_tile):
    rgba = np.concatenate([real_tile, np.full((*real_tile.shape[:2], 1), 255, np.uint8)], -1)
    norm = StainNormalizer("macenko")
    out = norm(rgba)
    assert out.shape == rgba.shape and (out[..., 3] == 255).all()
    np.testing.assert_array_equal(out[..., :3], norm(real_tile))


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (np.zeros((8, 8), np.uint8), InvalidImageError, "grayscale"),
        (np.zeros((8, 8, 1), np.uint8), InvalidImageError, "grayscale"),
        (np.zeros((8, 8, 2), np.uint8), InvalidImageError, "expected 3"),
        (np.concatenate([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 1), 7, np.uint8)], -1), InvalidImageError, "translucent"),
        (np.full((8, 8, 3), np.nan, np.float32), InvalidImageError, "non-finite"),
        (np.full((8, 8, 3), 2.0, np.float32), InvalidImageError, r"outside \[0, 1\]"),
        (np.full((8, 8, 3), -0.1, np.float64), InvalidImageError, r"outside \[0, 1\]"),
        (torch.zeros(5, 8, 8), InvalidImageError, "expected 3"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), InvalidImageError, "expected 3"),
        (torch.zeros(3, 8, 8, dtype=torch.int32), TypeError, "unsupported dtype"),
        (np.zeros((8, 8, 3), np.uint16), TypeError, "unsupported dtype"),
        ([[0, 0, 0]], TypeError, "wrong type"),
    ],
)
def test_bad_input_errors_name_argument_and_expectation(bad, exc, match):
    with pytest.raises(exc, match=match) as info:
        StainNormalizer("macenko")(bad)
    msg = str(info.value)
    assert "`images`" in msg and "expected" in msg and "got" in msg


@pytest.mark.parametrize("method", ["reinhard", "macenko", "vahadane"])
def test_empty_batch_and_no_inplace_change(real_tile, method):
    norm = StainNormalizer(method).fit(real_tile)
    empty = torch.zeros(0, 3, 16, 16)
    assert norm(empty).shape == (0, 3, 16, 16)
    assert norm(np.zeros((0, 16, 16, 3), np.uint8)).shape == (0, 16, 16, 3)
    for x in (torch.from_numpy(real_tile).permute(2, 0, 1).float() / 255, real_tile.copy()):
        before = x.clone() if isinstance(x, torch.Tensor) else x.copy()
        norm(x)
        assert (torch.equal(x, before) if isinstance(x, torch.Tensor) else np.array_equal(x, before))


def test_read_only_numpy_input_works(real_tile):
    ro = real_tile.copy()
    ro.setflags(write=False)
    out = StainNormalizer("macenko")(ro)
    assert out.shape == ro.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_half_precision_matches_float32(real_tile, dtype):
    norm = StainNormalizer("macenko")
    x = (torch.from_numpy(real_tile).permute(2, 0, 1)[None].float() / 255).to(dtype)
    ref = norm(x.float())  # same (quantised) input, computed and returned in float32
    out = norm(x)
    assert out.dtype == dtype
    # half inputs are computed in float32: only the final cast differs (half an ulp at 1.0)
    # (float64 is computed in float64: it differs from the float32 reference at float32 accuracy)
    ulp = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float64: 1e-4}.get(dtype, 1e-6)
    assert (out.float() - ref).abs().max() <= ulp + 1e-6


def _chunked_vs_whole(image, fn):
    from shiftkit.core.image import map_batch

    whole = map_batch(fn, image, chunk_pixels=10**12)  # one chunk
    small = map_batch(fn, image, chunk_pixels=2 * 224 * 224)  # 2 tiles per chunk, a ragged last chunk
    return whole, small


@pytest.mark.parametrize("kind", ["numpy-u8", "numpy-f32", "torch-u8", "torch-f16", "torch-f64", "rgba-u8"])
def test_map_batch_chunked_equals_whole_and_keeps_the_format(real_tile, kind):
    """map_batch's CPU chunking (OpenCV de-/interleave, reused buffers) gives what to_batch/from_batch give."""
    rng = np.random.default_rng(0)
    tiles = np.stack([real_tile, real_tile[::-1], real_tile[:, ::-1], rng.integers(0, 256, real_tile.shape, dtype=np.uint8), np.roll(real_tile, 7, axis=0)])
    if kind == "rgba-u8":
        image = np.concatenate([tiles, np.full(tiles.shape[:-1] + (1,), 255, np.uint8)], -1)
    elif kind.startswith("numpy"):
        image = tiles if kind.endswith("u8") else (tiles / 255.0).astype(np.float32)
    else:
        image = _as(torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous(), {"u8": torch.uint8, "f16": torch.float16, "f64": torch.float64}[kind.split("-")[1]])
    before = image.copy() if isinstance(image, np.ndarray) else image.clone()
    seen = []

    def fn(x, lo, hi):
        seen.append((lo, hi))
        return (1.0 - x) ** 1.5 + 0.1 * torch.arange(lo, hi, dtype=x.dtype)[:, None, None, None] / 5  # tile-dependent

    whole, small = _chunked_vs_whole(image, fn)
    assert seen == [(0, 5), (0, 2), (2, 4), (4, 5)]
    x, spec = to_batch(image)
    expected = from_batch(fn(x, 0, 5), spec)
    for got in (whole, small):
        assert type(got) is type(image) and got.dtype == image.dtype and got.shape == image.shape
        if isinstance(got, np.ndarray):
            np.testing.assert_array_equal(got, expected)
        else:
            assert torch.equal(got, expected)
    if isinstance(image, np.ndarray):
        np.testing.assert_array_equal(image, before)  # the input is never modified
    else:
        assert torch.equal(image, before)


def test_map_batch_validates_like_to_batch(real_tile):
    from shiftkit.core.image import map_batch

    ident = lambda x, lo, hi: x  # noqa: E731
    with pytest.raises(InvalidImageError, match="`tiles` has the wrong number of channels"):
        map_batch(ident, np.zeros((4, 8, 8, 2), np.uint8), "tiles", chunk_pixels=64)
    bad = np.stack([real_tile, real_tile]).astype(np.float32) / 255
    bad[1, 3, 3, 0] = 2.0
    with pytest.raises(InvalidImageError, match="`tiles` has floats outside"):
        map_batch(ident, bad, "tiles", chunk_pixels=224 * 224)
    bad[1, 3, 3, 0] = np.nan
    with pytest.raises(InvalidImageError, match="`tiles` has non-finite values"):
        map_batch(ident, bad, "tiles", chunk_pixels=224 * 224)
    empty = map_batch(ident, np.zeros((0, 8, 8, 3), np.uint8), "tiles")
    assert empty.shape == (0, 8, 8, 3)
    one = map_batch(ident, real_tile, "tiles", chunk_pixels=64)
    np.testing.assert_array_equal(one, real_tile)


def test_uint8_output_rounds_half_to_even_like_torch():
    from shiftkit.core.image import _to_u8

    v = torch.tensor([[k / 255.0 for k in range(256)] + [(k + 0.5) / 255.0 for k in range(255)] + [0.0, 1.0, 0.5]])
    for dtype in (torch.float32, torch.float64):
        y = v.to(dtype)
        assert torch.equal(_to_u8(y.clone()), y.mul(255.0).round().to(torch.uint8))


def test_select_equals_torch_where_and_keeps_gradients():
    from shiftkit.core.ops import select

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 3, 5, 6, generator=g), torch.rand(4, 3, 5, 6, generator=g)
    for mask in (torch.rand(4, 1, 5, 6, generator=g) > 0.5, torch.rand(4, 1, 1, 1, generator=g) > 0.5, torch.rand(4, 3, 5, 6, generator=g) > 0.5):
        assert torch.equal(select(mask, a, b), torch.where(mask, a, b))  # bit-identical on the blend path
    a64 = a.double().requires_grad_()
    out = select(mask, a64, b.double())
    out.sum().backward()
    assert torch.equal(a64.grad, mask.double())  # autograd path: torch.where's gradient
