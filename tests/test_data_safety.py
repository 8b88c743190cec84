"""Data safety: every situation in which a command could lose, overwrite or falsify a user's data, run through the
CLI on temporary folders. Each test checks the source bytes, the output files, the manifest and the exit code."""

import base64
import hashlib
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from shiftkit.cli.main import cli
from shiftkit.data import read_image, sample_tiles_dir, write_image
from shiftkit.data.naming import plan_output_names, source_key


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def digest(folder: Path) -> dict:
    """SHA-256 of every file under ``folder`` (relative names)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def images(folder: Path) -> list:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png") if not p.name.startswith("."))


@pytest.fixture
def tiles(tmp_path):
    """Four bundled 224x224 H&E tiles in a folder."""
    src = tmp_path / "tiles"
    src.mkdir()
    for p in sorted(sample_tiles_dir().glob("*.png"))[:4]:
        shutil.copy(p, src / p.name)
    return src


def manifest(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------- naming rule
def test_naming_rule_is_relative_sanitised_and_collision_free(tmp_path):
    root = tmp_path / "root"
    assert source_key(root / "a" / "b.png", root) == "a/b.png"
    assert source_key(root / "x" / ".." / "c.png", root) == "c.png"
    outside = source_key(tmp_path / "elsewhere" / "d.png", root)
    assert outside.startswith("_external/") and ".." not in outside and not outside.startswith("/")
    assert outside.endswith("elsewhere/d.png")
    names = plan_output_names(["a.png", "a.jpg", "A.tif", "b.png", "a.png"], ".png")
    assert names == ["a.png.png", "a.jpg.png", "A.tif.png", "b.png", None]
    same = plan_output_names(["a.PNG", "a.png"], None)  # equal up to case with --format same
    assert len({n.lower() for n in same}) == 2


# ----------------------------------------------------------------------------------------------- manifest paths
def test_absolute_manifest_path_never_overwrites_its_source(tiles, tmp_path):
    before = digest(tiles)
    first = sorted(tiles.glob("*.png"))[0]
    (tmp_path / "lists").mkdir()
    m = tmp_path / "lists" / "m.csv"  # the image lies outside the manifest's folder
    m.write_text(f"path\n{first.resolve()}\n")
    out = tmp_path / "out"
    res = run("simulate", m, out, "--shift", "jpeg", "--severity", "2,4")
    assert res.exit_code == 0, res.output
    assert digest(tiles) == before  # the source is untouched
    outs = [e["output"] for e in manifest(out / "manifest.json")["outputs"]]
    assert len(outs) == 2 and all(o.split("/")[2] == "_external" for o in outs)
    for o in outs:
        assert (out / o).resolve().is_relative_to(out.resolve()) and (out / o).is_file()


def test_dotdot_manifest_path_stays_inside_out_dir_and_severities_get_their_own_files(tiles, tmp_path):
    sub = tmp_path / "manifests"
    sub.mkdir()
    name = sorted(tiles.glob("*.png"))[0].name
    (sub / "m.csv").write_text(f"path\n../tiles/{name}\n")
    out = tmp_path / "out"
    res = run("simulate", sub / "m.csv", out, "--shift", "jpeg", "--severity", "1,5")
    assert res.exit_code == 0, res.output
    outs = [e["output"] for e in manifest(out / "manifest.json")["outputs"]]
    assert len(set(outs)) == 2
    assert all((out / o).resolve().is_relative_to(out.resolve()) for o in outs)
    assert len({hashlib.sha256((out / o).read_bytes()).hexdigest() for o in outs}) == 2
    assert not (tmp_path / "jpeg").exists()  # nothing written beside OUT_DIR


# ----------------------------------------------------------------------------------------------- collisions
def test_same_stem_different_suffix_gives_separate_outputs_in_simulate_and_normalize(tiles, tmp_path):
    img = read_image(sorted(tiles.glob("*.png"))[0])
    src = tmp_path / "stems"
    src.mkdir()
    for suffix, flip in ((".png", 0), (".jpg", 1), (".tif", -1)):
        write_image(src / f"a{suffix}", np.ascontiguousarray(cv2.flip(img, flip)))
    res = run("simulate", src, tmp_path / "sim", "--shift", "gamma", "--severity", "3", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout[res.stdout.index("{"):])["written"] == 3
    assert images(tmp_path / "sim" / "gamma" / "3") == ["a.jpg.png", "a.png.png", "a.tif.png"]
    res = run("normalize", src, tmp_path / "norm", "--target", sorted(tiles.glob("*.png"))[1])
    assert res.exit_code == 0, res.output
    assert images(tmp_path / "norm") == ["a.jpg.png", "a.png.png", "a.tif.png"]
    summary = manifest(tmp_path / "norm" / "normalize.json")
    assert summary["written"] == 3 and len({o["output"] for o in summary["outputs"]}) == 3


def test_tile_names_tiles_by_the_source_relative_path(tiles, tmp_path):
    big = np.concatenate([read_image(p) for p in sorted(tiles.glob("*.png"))[:2]], axis=1)  # 224 x 448
    for sub, image in (("A", big), ("B", big[:, ::-1].copy())):
        (tmp_path / sub).mkdir()
        write_image(tmp_path / sub / "region.png", image)
    out = tmp_path / "tiled"
    res = run("tile", tmp_path / "A", tmp_path / "B", out, "--min-tissue", "0")
    assert res.exit_code == 0, res.output
    rows = [line.split(",") for line in (out / "tiles.csv").read_text().splitlines()[1:]]
    paths = [r[0] for r in rows]
    assert len(paths) == 4 and len(set(paths)) == 4
    assert {p.split("/")[0] for p in paths} == {"A", "B"}
    for r in rows:  # every manifest row points at its own file, cut from its own source
        tile = read_image(out / r[0])
        x, y = int(r[2]), int(r[3])
        assert np.array_equal(tile, read_image(r[1])[y:y + 224, x:x + 224])


# ----------------------------------------------------------------------------------------------- resume
def test_resume_with_another_configuration_is_refused_and_force_regenerates(tiles, tmp_path):
    out = tmp_path / "out"
    assert run("simulate", tiles, out, "--shift", "jpeg", "--severity", "3", "--seed", "1").exit_code == 0
    first = digest(out)
    for extra, field in ((["--seed", "2"], "seed"), (["--seed", "1", "--mpp", "0.25"], "mpp"),
                         (["--seed", "1", "--format", "jpeg"], "output_format")):
        res = run("simulate", tiles, out, "--shift", "jpeg", "--severity", "3", *extra)
        assert res.exit_code == 2 and field in res.output, res.output
    assert digest(out) == first  # a refused run changes nothing
    res = run("simulate", tiles, out, "--shift", "jpeg", "--severity", "3", "--seed", "2", "--force", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout[res.stdout.index("{"):])["written"] == 4
    m = manifest(out / "manifest.json")
    assert m["config"]["seed"] == 2
    for e in m["outputs"]:  # the manifest's checksums are those of the pixels on disk
        assert hashlib.sha256((out / e["output"]).read_bytes()).hexdigest() == e["output_sha256"]


def test_a_changed_source_is_regenerated_not_verified(tiles, tmp_path):
    out = tmp_path / "out"
    assert run("simulate", tiles, out, "--shift", "gaussian-defocus", "--severity", "3").exit_code == 0
    changed = sorted(tiles.glob("*.png"))[0]
    write_image(changed, read_image(changed)[::-1].copy())
    res = run("simulate", tiles, out, "--shift", "gaussian-defocus", "--severity", "3", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["written"] == 1 and summary["verified_existing"] == 3
    for e in manifest(out / "manifest.json")["outputs"]:
        assert hashlib.sha256((out / e["output"]).read_bytes()).hexdigest() == e["output_sha256"]
    fresh = tmp_path / "fresh"
    assert run("simulate", tiles, fresh, "--shift", "gaussian-defocus", "--severity", "3").exit_code == 0
    assert {k: v for k, v in digest(out).items() if k.endswith(".png")} == \
           {k: v for k, v in digest(fresh).items() if k.endswith(".png")}


def test_a_non_empty_folder_not_made_by_simulate_is_refused(tiles, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.docx").write_bytes(b"precious")
    res = run("simulate", tiles, out, "--shift", "jpeg", "--severity", "1")
    assert res.exit_code == 2 and "not made by" in res.output
    assert digest(out) == {"thesis.docx": hashlib.sha256(b"precious").hexdigest()}


# ----------------------------------------------------------------------------------------------- temp files
def test_only_simulates_own_temporary_files_are_removed(tiles, tmp_path):
    out = tmp_path / "out"
    assert run("simulate", tiles, out, "--shift", "jpeg", "--severity", "1").exit_code == 0
    (out / "notes.tmp").write_text("the user's")
    (out / "jpeg" / "1" / "draft.png.tmp").write_text("the user's too")
    shard_tmp = out / ".shiftkit" / "tmp" / "0-of-2"
    shard_tmp.mkdir(parents=True)
    (shard_tmp / ".shiftkit-0000000000000000.tmp").write_text("another shard, in flight")
    assert run("simulate", tiles, out, "--shift", "jpeg", "--severity", "1").exit_code == 0
    assert (out / "notes.tmp").read_text() == "the user's"
    assert (out / "jpeg" / "1" / "draft.png.tmp").is_file()
    assert (shard_tmp / ".shiftkit-0000000000000000.tmp").is_file()


# ----------------------------------------------------------------------------------------------- isolation
def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height, with a few bytes of data (a decompression bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_an_oversized_image_fails_alone_with_a_manifest(tiles, tmp_path):
    _png_header_only(tiles / "huge.png", 20000, 20000)
    out = tmp_path / "out"
    res = run("simulate", tiles, out, "--shift", "jpeg", "--severity", "1", "--json")
    assert res.exit_code == 1, res.output
    failed = manifest(out / "manifest.json")["failed"]
    assert [f["path"] for f in failed] == ["huge.png"] and "too large" in failed[0]["reason"]
    assert len(manifest(out / "manifest.json")["outputs"]) == 4
    res = run("normalize", tiles, tmp_path / "norm", "--target", sorted(tiles.glob("*.png"))[0], "--max-pixels", "40000")
    assert res.exit_code == 1 and "too large" in res.output  # 224 x 224 = 50,176 pixels > 40,000
    assert manifest(tmp_path / "norm" / "normalize.json")["written"] == 0


def test_a_bad_manifest_cell_fails_its_row_only(tiles, tmp_path):
    names = [p.name for p in sorted(tiles.glob("*.png"))]
    (tiles / "m.csv").write_text("path,mpp\n" + f"{names[0]},abc\n{names[1]},0.5\n,0.5\n{names[2]},\n")
    out = tmp_path / "out"
    res = run("simulate", tiles / "m.csv", out, "--shift", "jpeg", "--severity", "2")
    assert res.exit_code == 1, res.output
    m = manifest(out / "manifest.json")
    reasons = {f["path"]: f["reason"] for f in m["failed"]}
    assert "`mpp` cell is invalid" in reasons[names[0]] and "'abc'" in reasons[names[0]]
    assert any("`path` cell is empty" in r for r in reasons.values())
    assert sorted(e["source"] for e in m["outputs"]) == sorted(names[1:3])


def test_normalize_on_failure_raise_fails_the_blank_tile_alone(tiles, tmp_path):
    target = sorted(tiles.glob("*.png"))[0]
    write_image(tiles / "blank.png", np.full((224, 224, 3), 250, np.uint8))
    out = tmp_path / "out"
    res = run("normalize", tiles, out, "--target", target, "--on-failure", "raise")
    assert res.exit_code == 1, res.output
    summary = manifest(out / "normalize.json")
    assert [Path(f["path"]).name for f in summary["failed"]] == ["blank.png"]
    assert images(out) == sorted(p.name for p in tiles.glob("*.png") if p.name != "blank.png")


# ----------------------------------------------------------------------------------------------- input protection
def test_normalize_refuses_its_own_input_folder_and_in_place_is_explicit(tiles, tmp_path):
    before = digest(tiles)
    target = sorted(tiles.glob("*.png"))[0]
    for out in (tiles, tiles / "sub"):
        res = run("normalize", tiles, out, "--target", target, "--format", "same")
        assert res.exit_code == 2 and "OUT" in res.output, res.output
    assert digest(tiles) == before
    res = run("simulate", tiles, tiles / "shifted", "--shift", "jpeg", "--severity", "1")
    assert res.exit_code == 2 and "inside the input folder" in res.output
    assert digest(tiles) == before and not (tiles / "shifted").exists()
    res = run("normalize", tiles, "--in-place", "--target", target)
    assert res.exit_code == 0, res.output
    after = digest(tiles)
    assert set(after) == set(before) | {"normalize.json"}
    assert sum(after[k] != before[k] for k in before) >= 3  # the originals were replaced, on purpose


def test_dangling_links_are_failures_not_silence(tiles, tmp_path):
    target = sorted(tiles.glob("*.png"))[0]
    os.symlink(tiles / "gone.png", tiles / "dangling.png")
    res = run("simulate", tiles, tmp_path / "sim", "--shift", "jpeg", "--severity", "1")
    assert res.exit_code == 1 and "dangling" in res.output
    assert [f["path"] for f in manifest(tmp_path / "sim" / "manifest.json")["failed"]] == ["dangling.png"]
    res = run("normalize", tiles, tmp_path / "norm", "--target", target)
    assert res.exit_code == 1 and "dangling" in res.output


# ----------------------------------------------------------------------------------------------- report
@pytest.fixture(scope="module")
def stress_run(tmp_path_factory):
    from shiftkit.stress import run_stress_test

    out = tmp_path_factory.mktemp("stress") / "run"
    run_stress_test("random", None, out, shifts=["gamma"], severities=[5])
    return out


def test_report_embeds_only_images_inside_the_run_folder(stress_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(stress_run, run_dir)
    secret = tmp_path / "secret.png"
    write_image(secret, np.full((8, 8, 3), 7, np.uint8))
    (run_dir / "gallery" / "notes.png").write_text("not an image")
    meta = json.loads((run_dir / "run.json").read_text())
    meta["gallery"] = [{"file": f, "shift": "gamma", "severity": 5, "tile": "t", "cosine": 0.1}
                       for f in ("../../secret.png", str(secret), "notes.png")]
    (run_dir / "run.json").write_text(json.dumps(meta))
    res = run("report", run_dir)
    assert res.exit_code == 0, res.output
    page = (run_dir / "report.html").read_text()
    secret_b64 = base64.b64encode(secret.read_bytes()).decode()
    assert secret_b64 not in page and page.count("<figure") == 0


def test_markdown_summary_escapes_names(stress_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(stress_run, run_dir)
    evil = "<img src=x onerror=alert(1)> | *bold*"
    meta = json.loads((run_dir / "run.json").read_text())
    old = meta["config"]["model"]
    meta["config"]["model"] = evil
    (run_dir / "run.json").write_text(json.dumps(meta))
    recs = json.loads((run_dir / "records.json").read_text())
    for r in recs:
        r["model"] = evil if r["model"] == old else r["model"]
    (run_dir / "records.json").write_text(json.dumps(recs))
    assert run("report", run_dir).exit_code == 0
    md = (run_dir / "summary.md").read_text()
    assert "<img" not in md and "| *bold*" not in md and "\\*bold\\*" in md


# ----------------------------------------------------------------------------------------------- pretrain resume
@pytest.fixture
def tiny_run(tiles, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"global_size": 32, "local_size": 16, "n_local": 2, "out_dim": 64, "bottleneck_dim": 16,
                               "hidden_dim": 32, "load_size": 64, "recipe": "cpu-small", "augment": "dino"}))
    out = tmp_path / "run"
    args = ["pretrain", "--data", tiles, "--out", out, "--batch-size", "4", "--workers", "0", "--device", "cpu",
            "--config", cfg, "--checkpoint-every", "2"]
    res = run(*args, "--steps", "2")
    assert res.exit_code == 0, res.output
    return out, args


def test_resume_truncates_the_log_to_the_checkpoint(tiny_run):
    out, args = tiny_run
    log = out / "log.jsonl"
    lines = log.read_text().splitlines()
    extra = [json.dumps({**json.loads(lines[-1]), "step": s}) for s in (2, 3)]  # logged by a run killed before saving
    log.write_text("\n".join(lines + extra) + "\n" + '{"step": 4, "lo')
    res = run(*args, "--steps", "4", "--resume")
    assert res.exit_code == 0, res.output
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines() if "loss" in json.loads(x)]
    assert steps == [0, 1, 2, 3]


def test_resume_refuses_changed_options_naming_them(tiny_run):
    out, args = tiny_run
    before = digest(out)
    for opt, value, field in (("--lr", "0.5", "lr"), ("--batch-size", "8", "batch_size"), ("--augment", "stain", "augment")):
        a = list(args)
        if opt in a:
            a[a.index(opt) + 1] = value
        else:
            a += [opt, value]
        res = run(*a, "--steps", "4", "--resume")
        assert res.exit_code == 2 and field in res.output, res.output
    assert digest(out) == before


def test_bad_checkpoints_and_weights_give_one_line_errors(tiny_run, tmp_path):
    out, args = tiny_run
    ckpt = out / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 3])
    res = run(*args, "--steps", "4", "--resume")
    assert res.exit_code == 2 and str(ckpt) in res.output and "truncated or foreign" in res.output
    assert "weights_only" not in res.output and "Traceback" not in res.output
    torch.save({"something": torch.zeros(2)}, ckpt)
    res = run(*args, "--steps", "4", "--resume")
    assert res.exit_code == 2 and "not a shiftkit checkpoint" in res.output
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    res = run("stress-test", "--model", out, "--weights", bad, "--shifts", "gamma", "--severities", "1",
              "--out", tmp_path / "st")
    assert res.exit_code == 2 and str(bad) in res.output and "safetensors" in res.output
    assert "Traceback" not in res.output


def test_fit_on_an_empty_batch_names_the_argument():
    from shiftkit import StainNormalizer
    from shiftkit.core.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="`images` is empty"):
        StainNormalizer("macenko").fit(torch.empty(0, 3, 16, 16))


# ----------------------------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_honour_the_umask(tiles, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert run("simulate", tiles, tmp_path / "sim", "--shift", "jpeg", "--severity", "1").exit_code == 0
        assert run("normalize", tiles, tmp_path / "norm", "--target", sorted(tiles.glob("*.png"))[0]).exit_code == 0
        assert run("preview", sorted(tiles.glob("*.png"))[0], "--shift", "jpeg", "-o", tmp_path / "p.png").exit_code == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "sim").rglob("*.png")] + [p for p in (tmp_path / "norm").rglob("*.png")]
    files += [tmp_path / "sim" / "manifest.json", tmp_path / "norm" / "normalize.json", tmp_path / "p.png"]
    assert len(files) >= 10
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(mode)}


def test_write_image_embeds_an_icc_profile_that_pillow_and_opencv_read_back(tmp_path):
    """``write_image(..., icc=)``: Pillow reads the same profile bytes back from PNG (iCCP chunk), JPEG (APP2
    segments, also a profile longer than one segment's 65,519 bytes) and TIFF; OpenCV decodes the same pixels as
    without a profile (PNG exactly, JPEG byte for byte the same file otherwise); BMP goes without."""
    from PIL import Image, ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    long_icc = icc + bytes(150_000)  # three APP2 segments in a JPEG
    img = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    for ext in ("png", "jpg", "tif"):
        for prof in (icc, long_icc):
            path = tmp_path / f"p.{ext}"
            write_image(path, img, icc=prof)
            with Image.open(path) as im:
                assert im.info.get("icc_profile") == prof, (ext, len(prof))
            write_image(tmp_path / f"plain.{ext}", img)
            np.testing.assert_array_equal(cv2.imread(str(path)), cv2.imread(str(tmp_path / f"plain.{ext}")))
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), img)
    write_image(tmp_path / "p.bmp", img, icc=icc)
    np.testing.assert_array_equal(read_image(tmp_path / "p.bmp"), img)


def test_write_image_round_trips_rgb_and_refuses_what_is_not_an_rgb_tile(tmp_path):
    """The channel order on disk is OpenCV's BGR (checked with OpenCV itself), read back as the same RGB array; a
    wrong shape or dtype is refused by name before any file is made."""
    from shiftkit.core.errors import InvalidArgumentError

    img = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    write_image(tmp_path / "a.png", img[:, ::-1])  # a non-contiguous view is written as its values
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "a.png"))[..., ::-1], img[:, ::-1])
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), img[:, ::-1])
    for bad in (img[..., 0], np.dstack([img, img[..., :1]]), img.astype(np.float32)):
        with pytest.raises(InvalidArgumentError, match=r"b\.png.*expected \(H, W, 3\) uint8"):
            write_image(tmp_path / "b.png", bad)
    assert not (tmp_path / "b.png").exists()
    # an opaque RGBA file reads as its RGB; a translucent one is refused naming the file
    bgra = np.dstack([img[..., ::-1], np.full(img.shape[:2], 255, np.uint8)])
    cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), img)
    bgra[0, 0, 3] = 10
    cv2.imwrite(str(tmp_path / "glass.png"), bgra)
    with pytest.raises(Exception, match=r"glass\.png.*translucent"):
        read_image(tmp_path / "glass.png")
