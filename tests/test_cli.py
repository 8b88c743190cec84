import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from shiftkit import StainNormalizer
from shiftkit.cli.main import cli
from shiftkit.data import read_image, sample_path, sample_tiles_dir


@pytest.fixture
def tile_folder(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    tiles = sorted(sample_tiles_dir().glob("*.png"))[:4]
    for t in tiles[:3]:
        shutil.copy(t, src / t.name)
    shutil.copy(tiles[3], src / "sub" / tiles[3].name)
    (src / "empty.png").write_bytes(b"")
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    import cv2

    cv2.imwrite(str(src / "gray.png"), np.full((32, 32), 128, np.uint8))
    cv2.imwrite(str(src / "blank.png"), np.full((64, 64, 3), 255, np.uint8))
    return src, tiles


def test_normalize_folder_skips_bad_files_and_exits_1(tile_folder, tmp_path):
    src, tiles = tile_folder
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["normalize", str(src), str(out), "--target", str(sample_path("slideflow")), "--json"])
    assert res.exit_code == 1, res.output
    summary = json.loads(res.stdout)
    failed = {f["path"].split("/")[-1]: f["reason"] for f in summary["failed"]}
    assert set(failed) == {"empty.png", "corrupt.jpg", "gray.png"}
    assert "empty" in failed["empty.png"] and "grayscale" in failed["gray.png"] and "decode" in failed["corrupt.jpg"]
    assert summary["written"] == 5
    assert summary["status_counts"] == {"ok": 4, "low-tissue": 1}
    # outputs mirror input names (png), equal the library's output, and no temporary file is left
    expected = StainNormalizer("macenko").fit(read_image(sample_path("slideflow")))
    for t in tiles[:3]:
        np.testing.assert_array_equal(read_image(out / t.name), expected(read_image(t)))
    assert (out / "sub" / tiles[3].name).exists()
    assert not list(out.rglob("*.tmp"))


def test_fit_target_then_normalize_with_json_target(tmp_path):
    tgt = tmp_path / "target.json"
    runner = CliRunner()
    res = runner.invoke(cli, ["fit-target", str(sample_path("slideflow")), str(sample_path("stardist")), "-o", str(tgt), "--method", "vahadane"])
    assert res.exit_code == 0, res.output
    data = json.loads(tgt.read_text())
    assert data["method"] == "vahadane" and len(data["target"]["matrix"]) == 2
    out = tmp_path / "out"
    src = sorted(sample_tiles_dir().glob("*.png"))[0]
    res = runner.invoke(cli, ["normalize", str(src), str(out), "--target", str(tgt), "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(read_image(out / src.name), StainNormalizer.load(tgt)(read_image(src)))
    res = runner.invoke(cli, ["normalize", str(src), str(out), "--target", str(tgt), "--method", "reinhard"])
    assert res.exit_code == 2 and "saved target" in res.output
    images = [sample_path("slideflow"), sample_path("stardist")]
    res = runner.invoke(cli, ["fit-target", *map(str, images), "-o", str(tmp_path / "median.json"), "--intensity", "median"])
    assert res.exit_code == 0, res.output
    expected = StainNormalizer("macenko").fit([read_image(p) for p in images], intensity="median")
    np.testing.assert_allclose(StainNormalizer.load(tmp_path / "median.json").target_max_concentrations,
                               expected.target_max_concentrations, rtol=1e-6)
    res = runner.invoke(cli, ["normalize", str(src), str(tmp_path / "o2"), "--target", str(sample_path("slideflow").parent),
                              "--target-intensity", "median", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o2" / "normalize.json").read_text())["target_intensity"] == "median"


def test_usage_errors_exit_2(tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["normalize", str(tmp_path / "missing"), str(tmp_path / "o"), "--target", "x.png"]).exit_code == 2
    res = runner.invoke(cli, ["normalize", str(sample_path("stardist")), str(tmp_path / "o"), "--target", str(sample_path("stardist")), "--device", "cuda:7"])
    if res.exit_code != 0:  # no such GPU here
        assert res.exit_code == 2 and "--device" in res.output
    res = runner.invoke(cli, ["normalize", "--help"])
    assert res.exit_code == 0 and "--on-failure" in res.output


def test_shifts_lists_registry_and_preview_writes_strip(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["shifts", "--json"])
    assert res.exit_code == 0
    listed = json.loads(res.stdout)
    from shiftkit.shifts import list_shifts

    assert [d["name"] for d in listed] == list_shifts()
    routed = {d["name"] for d in listed if d["cpu_uint8_route"]}
    assert {"jpeg", "gamma", "resample", "sensor-noise"} <= routed and "stain-hue" not in routed
    res = runner.invoke(cli, ["shifts", "*defocus*"])
    assert "gaussian-defocus" in res.output and "S3=2.6" in res.output and "jpeg" not in res.output
    out = tmp_path / "strip.png"
    res = runner.invoke(cli, ["preview", str(sample_path("stardist")), "--shift", "jpeg", "-o", str(out), "--size", "128"])
    assert res.exit_code == 0, res.output
    strip = read_image(out)
    assert strip.shape == (128 + 18, 6 * 128 + 5 * 4, 3)  # an 18-px label band above the panels
    np.testing.assert_array_equal(strip[18:, :128], read_image(sample_path("stardist"))[86:214, 186:314])
    res = runner.invoke(cli, ["preview", str(sample_path("stardist")), "--shift", "nope", "-o", str(out)])
    assert res.exit_code == 2 and "unknown name" in res.output


def test_eta_ignores_start_up_and_follows_the_current_rate():
    import io

    from shiftkit.cli.progress import Progress

    t = [0.0]
    p = Progress(100, "x", file=io.StringIO(), clock=lambda: t[0], half_life_s=2.0)
    t[0] = 30.0  # 30 s of start-up (loading a model) before the first item
    p.update(1)
    assert p.eta_s() is None  # no rate yet: nothing extrapolated from start-up
    for _ in range(19):  # then 10 items per second
        t[0] += 0.1
        p.update(1)
    assert abs(p.rate - 10.0) < 1e-6 and abs(p.eta_s() - 8.0) < 1e-6  # 80 left at 10/s; click would say ~120 s
    for _ in range(40):  # the rate halves; after 8 s = 4 half-lives the gap has shrunk to 2^-4 of itself
        t[0] += 0.2
        p.update(1)
    assert abs(p.rate - (5.0 + 5.0 * 0.5 ** 4)) < 1e-9 and abs(p.eta_s() - 40 / p.rate) < 1e-9


def test_preview_labels_its_panels_and_blames_the_right_argument(tmp_path):
    from shiftkit.data import read_image, sample_tiles_dir

    tile = sorted(sample_tiles_dir().glob("*.png"))[0]
    out = tmp_path / "strip.png"
    res = CliRunner().invoke(cli, ["preview", str(tile), "--shift", "jpeg", "-o", str(out), "--size", "128"])
    assert res.exit_code == 0, res.output
    strip = read_image(out)
    assert strip.shape[0] > 128 and strip.shape[1] == 6 * 128 + 5 * 4  # a label band above six panels
    band = strip[: strip.shape[0] - 128]
    for i in range(6):  # every panel has dark label text in its band
        assert (band[:, i * 132 : i * 132 + 128] < 128).any()
    res = CliRunner().invoke(cli, ["preview", str(tile), "--shift", "nope", "-o", str(out)])
    assert res.exit_code == 2 and "--shift" in res.output and "IMAGE" not in res.output.split("Error:")[1]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    res = CliRunner().invoke(cli, ["preview", str(bad), "--shift", "jpeg", "-o", str(out)])
    assert res.exit_code == 2 and "IMAGE" in res.output.split("Error:")[1]


def test_an_early_failure_leaves_no_empty_output_folder(tmp_path):
    res = CliRunner().invoke(cli, ["stress-test", "--model", "missing", "--out", str(tmp_path / "st")])
    assert res.exit_code == 2 and not (tmp_path / "st").exists()
    res = CliRunner().invoke(cli, ["stress-test", "--reference-model", "missing", "--out", str(tmp_path / "st2"),
                                   "--shifts", "jpeg", "--severities", "1"])
    assert res.exit_code == 2 and not (tmp_path / "st2").exists()
    res = CliRunner().invoke(cli, ["simulate", str(tmp_path), str(tmp_path / "sim"), "--severity", "1"])
    assert res.exit_code == 2 and not (tmp_path / "sim").exists()
