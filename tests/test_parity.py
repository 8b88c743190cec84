"""Parity with peer libraries (the 'reference' extra) and the tiatoolbox oracle in ../shared/data.

Tolerances and why:
* Macenko vectors vs staintools: <= 3 degrees (the issue's bound). Our defaults differ in two deliberate
  ways, both checked here: estimation reads a strided subsample of at most 16384 pixels, and pixels with a
  channel clipped at 0 are not tissue (their OD is clipped at ln 255 and dominates the covariance).
* Output vs torchstain with the same Io (240) and beta (0.15 on natural-log OD), torchstain's conventions
  (no clamping of concentrations, all pixels): mean |difference| <= 2/255 on tiles that are mostly tissue.
  torchstain takes the 99th-percentile concentration over *all* pixels, background included; we take it over
  tissue (REFERENCES pitfall 6), so on tiles with much background the two differ by design.
* tiatoolbox oracle (stainnorm_oracle): tiatoolbox's own test accepts mean |ref/255 - out/255| < 1e-2; we use
  the same bound for Macenko and Vahadane, and for Reinhard with whole-image statistics
  (luminosity_threshold=1.0, as tiatoolbox computes them); our default masked Reinhard is checked to move
  the source towards the oracle.
"""

import numpy as np
import pytest

from shiftkit import StainNormalizer, estimate_stains
from shiftkit.data import read_image
from shiftkit.stain import stain_angles

from .conftest import shared

pytestmark = pytest.mark.reference

REAL_TILES = [
    ("pypi_stardist", "histo.jpg"),
    ("pypi_slideflow", "norm_tile.jpg"),
    ("pypi_wsidicom", "test_tile.png"),
    ("stainnorm_oracle", "source_image.png"),
    ("camelyon17_5centers", "center0_15018.png"),
    ("camelyon17_5centers", "center1_12919.png"),
    ("camelyon17_5centers", "center2_14011.png"),
    ("camelyon17_5centers", "center3_10995.png"),
    ("camelyon17_5centers", "center4_11631.png"),
    ("scanners5_same_region", "aperio.png"),
    ("scanners5_same_region", "3dhistech.png"),
    ("scanners5_same_region", "nz210.png"),
]


@pytest.mark.parametrize("parts", REAL_TILES, ids=lambda p: p[1])
def test_macenko_vectors_within_3_degrees_of_staintools(parts):
    staintools = pytest.importorskip("staintools")
    import torch

    img = read_image(shared(*parts))
    ref = torch.tensor(staintools.MacenkoStainExtractor.get_stain_matrix(img))[None]
    saturated = (img <= 1).any(-1).mean()  # our rule: a channel at or below 1/255 is clipped
    ours = estimate_stains(img, "macenko")
    assert ours.status == ["ok"]
    if saturated < 1e-3:
        assert stain_angles(ours.matrix.double(), ref).max() < 3.0
    # staintools' own pixel rule (clipped pixels kept, every pixel used) agrees closer still
    same_rule = estimate_stains(img, "macenko", exclude_saturated=False, max_pixels=None)
    assert stain_angles(same_rule.matrix.double(), ref).max() < 1.0


UNCLIPPED = [p for p in REAL_TILES if p[1] != "test_tile.png"]  # wsidicom's tile has 1 % clipped pixels


@pytest.mark.parametrize("parts", UNCLIPPED[:6], ids=lambda p: p[1])
def test_vahadane_vectors_close_to_staintools_spams(parts):
    staintools = pytest.importorskip("staintools")
    import torch

    img = read_image(shared(*parts))
    ref = torch.tensor(staintools.VahadaneStainExtractor.get_stain_matrix(img))[None]
    ours = estimate_stains(img, "vahadane")
    # SPAMS runs a time-budgeted, randomly initialised solver: 3 degrees covers its run-to-run spread
    assert stain_angles(ours.matrix.double(), ref).max() < 3.0


TORCHSTAIN_OPTS = dict(
    i0=240 / 255, tissue_method="od", od_threshold=0.15, max_pixels=None, exclude_saturated=False,
    clamp_concentrations=False, max_scale=1e6,
)


def test_macenko_output_matches_torchstain_on_tissue_tiles():
    torchstain = pytest.importorskip("torchstain")
    target = read_image(shared("pypi_stardist", "histo.jpg"))
    ts = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ts.fit(target)
    ours = StainNormalizer("macenko", **TORCHSTAIN_OPTS).fit(target)
    checked = 0
    camelyon = sorted(p.name for p in shared("camelyon17_5centers").glob("center*.png"))
    for parts in REAL_TILES + [("camelyon17_5centers", n) for n in camelyon]:
        tile = read_image(shared(*parts))[:224, :224]
        od = -np.log((tile.reshape(-1, 3).astype(float) + 1) / 240)
        if (od >= 0.15).all(-1).mean() < 0.85:
            continue  # mostly background: torchstain's all-pixel percentile differs by design (see module doc)
        ref = np.asarray(ts.normalize(I=tile, Io=240, alpha=1, beta=0.15)[0]).astype(float)
        mad = np.abs(ours(tile).astype(float) - ref).mean()
        assert mad <= 2.0, (parts, mad)
        assert np.abs(tile.astype(float) - ref).mean() > 2 * mad  # the comparison is not trivially small
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("method", ["macenko", "vahadane", "reinhard"])
def test_tiatoolbox_oracle(method):
    src = read_image(shared("stainnorm_oracle", "source_image.png"))
    tgt = read_image(shared("stainnorm_oracle", "target_image.png"))
    oracle = read_image(shared("stainnorm_oracle", f"norm_{method}.png")).astype(float) / 255
    opts = {"luminosity_threshold": 1.0} if method == "reinhard" else {}
    out = StainNormalizer(method, **opts).fit(tgt)(src).astype(float) / 255
    assert np.abs(out - oracle).mean() < 1e-2
    if method == "reinhard":
        masked = StainNormalizer("reinhard").fit(tgt)(src).astype(float) / 255
        assert np.abs(masked - oracle).mean() < 0.5 * np.abs(src / 255 - oracle).mean()
