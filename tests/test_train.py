"""Pretraining (shiftkit.train): learning, diversity sampling, exact resume, SIGTERM, NaN guard, DDP equivalence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lightly")

from shiftkit.data.io import write_image  # noqa: E402
from shiftkit.data.shifted import TileDataset, TileRecord  # noqa: E402
from shiftkit.data.synthetic import synthetic_he  # noqa: E402
from shiftkit.train import (  # noqa: E402
    DiversitySampler,
    MultiCropAugment,
    PretrainConfig,
    TrainingDivergedError,
    diversity_stats,
    entropy_bits,
    pretrain,
)

CLASSES = {"nuclei": dict(h_max=2.0, e_max=0.3, tissue_fraction=0.9),
           "stroma": dict(h_max=0.3, e_max=1.2, tissue_fraction=0.5)}


def _tiles(root: Path, n: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Two visibly different classes of synthetic H&E tiles and a manifest with label/slide/site columns."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for ci, (lab, kw) in enumerate(CLASSES.items()):
        x = synthetic_he(n, size, seed=seed * 10 + ci, **kw)[0]
        for i, t in enumerate(x):
            p = f"{lab}_{i}.png"
            write_image(root / p, (t.permute(1, 2, 0) * 255).round().byte().numpy())
            rows.append(f"{p},{lab},slide{i % 4},site{i % 2}")
    (root / "manifest.csv").write_text("path,label,slide,site\n" + "\n".join(rows) + "\n")
    return root / "manifest.csv"


def _cfg(data, out, **kw) -> PretrainConfig:
    base = dict(data=str(data), out=str(out), recipe="cpu-small", steps=6, batch_size=8, checkpoint_every=0,
                workers=0, global_size=32, local_size=16, n_local=2, load_size=64, out_dim=256, bottleneck_dim=32,
                hidden_dim=64, augment="dino", device="cpu")
    base.update(kw)
    return PretrainConfig(**base)


def _losses(run: Path):
    return [e["loss"] for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in e]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _tiles(tmp_path_factory.mktemp("tiles"))


@pytest.mark.slow
def test_training_lowers_the_loss_below_an_untrained_control_and_knn_beats_chance(data, tmp_path):
    """The DINO loss of a frozen network *rises* as the centre warms up (the teacher's targets decorrelate from the
    student's bias), so "the loss went down" is measured against a control run on identical batches, views and
    seeds whose optimizer does nothing (lr 1e-12, teacher momentum 1)."""
    val = _tiles(tmp_path / "val", n=12, seed=7)
    kw = dict(steps=40, batch_size=16, global_size=48, local_size=24, teacher_temp=(0.04, 0.04), lr=1e-3,
              momentum=(0.99, 1.0), val=str(val), knn_every=40)
    trained = pretrain(_cfg(data, tmp_path / "trained", **kw))
    pretrain(_cfg(data, tmp_path / "control", **{**kw, "lr": 1e-12, "momentum": (1.0, 1.0)}))
    lt, lc = _losses(tmp_path / "trained"), _losses(tmp_path / "control")
    assert trained["status"] == "finished" and len(lt) == len(lc) == 40
    assert lt[0] == pytest.approx(lc[0], rel=1e-6)  # same first batch, same views, same initial weights
    assert np.mean(lt[-10:]) < np.mean(lc[-10:]) - 0.3, (np.mean(lt[-10:]), np.mean(lc[-10:]))
    log = [json.loads(l) for l in (tmp_path / "trained" / "log.jsonl").read_text().splitlines()]
    assert all(0 <= e["teacher_entropy"] <= np.log(256) + 1e-4 for e in log if "loss" in e)
    acc = [e["knn_balanced_accuracy"] for e in log if "knn_balanced_accuracy" in e]
    assert len(acc) == 2 and acc[0] is not None  # step 0 and the end
    # 24 validation tiles, two classes: P(BA >= 0.8 | chance) < 0.01
    assert acc[-1] >= 0.8


def test_run_folder_is_a_stress_test_model(data, tmp_path):
    from shiftkit.models import load_encoder

    run = tmp_path / "run"
    pretrain(_cfg(data, run, steps=2))
    enc = load_encoder(str(run))
    meta = json.loads((run / "encoder.json").read_text())
    assert enc.input_size == 32 and meta["spec"] == "timm:resnet10t" and meta["step"] == 2
    from shiftkit.core.shift_registry import SEVERITY_TABLE_VERSION  # the presets' version travels with the weights
    assert meta["severity_table_version"] == SEVERITY_TABLE_VERSION
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    teacher_bb = {k[len("backbone."):]: v for k, v in ck["teacher"].items() if k.startswith("backbone.")}
    for k, v in enc.module.state_dict().items():
        torch.testing.assert_close(v, teacher_bb[k], rtol=0, atol=0)
    emb = enc.embed(torch.rand(3, 3, 64, 64))
    assert emb.shape == (3, 512) and np.isfinite(emb).all()


def test_resume_after_sigterm_matches_an_uninterrupted_run(data, tmp_path):
    full = tmp_path / "full"
    pretrain(_cfg(data, full, steps=6, checkpoint_every=2))

    part = tmp_path / "part"

    def term_at_3(e):
        if e["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    s = pretrain(_cfg(data, part, steps=6, checkpoint_every=100), progress=term_at_3)
    assert s["status"] == "interrupted"
    assert torch.load(part / "checkpoint.pt", weights_only=True)["step"] == 3
    with pytest.raises(Exception, match="already holds a run"):
        pretrain(_cfg(data, part, steps=6))
    s2 = pretrain(_cfg(data, part, steps=6), resume=True)
    assert s2["start_step"] == 3 and s2["status"] == "finished"
    a = torch.load(full / "checkpoint.pt", weights_only=True)
    b = torch.load(part / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in ("student", "teacher", "loss"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=0, atol=0, msg=f"{key}.{k}")
    assert _losses(full) == _losses(part)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    import lightly.loss

    run = tmp_path / "run"
    original = lightly.loss.DINOLoss.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        out = original(self, *a, **k)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(lightly.loss.DINOLoss, "forward", poisoned)
    with pytest.raises(TrainingDivergedError, match=r"not finite at step 3.*checkpoint.pt \(step 2\)"):
        pretrain(_cfg(data, run, steps=6, checkpoint_every=2))
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["student"].values() if v.is_floating_point())
    assert len(_losses(run)) == 3  # steps 0..2 logged, the NaN step not
    assert not list(run.glob(".*.tmp"))


def test_cli_pretrain_then_stress_test(data, tmp_path):
    from click.testing import CliRunner

    from shiftkit.cli.main import cli

    run = tmp_path / "run"
    args = ["pretrain", "--data", str(data), "--out", str(run), "--recipe", "cpu-small", "--steps", "2",
            "--batch-size", "8", "--workers", "0", "--augment", "shiftkit", "--balance-by", "site",
            "--max-per-slide", "6", "--device", "cpu", "--input-norm", "per-image", "--embed-grid", "2"]
    cfgf = tmp_path / "c.json"
    cfgf.write_text(json.dumps({"global_size": 32, "local_size": 16, "n_local": 2, "out_dim": 128, "bottleneck_dim": 32,
                                "hidden_dim": 64, "load_size": 64}))
    r = CliRunner().invoke(cli, args + ["--config", str(cfgf)])
    assert r.exit_code == 0, r.output
    div = json.loads((run / "diversity.json").read_text())
    assert div["patches"] == 24 and div["dataset_patches"] == 32 and div["slide"]["count"] == 4
    assert div["site"]["sampled_entropy_bits"] == pytest.approx(1.0)
    r = CliRunner().invoke(cli, args + ["--config", str(cfgf)])
    assert r.exit_code == 2 and "already holds a run" in r.output
    out = tmp_path / "report"
    r = CliRunner().invoke(cli, ["stress-test", "--model", str(run), "--data", str(data), "--shifts", "jpeg",
                                 "--severities", "1", "--out", str(out), "--no-gallery"])
    assert r.exit_code == 0, r.output
    html = (out / "report.html").read_text()
    # the report names the encoder and how images reach its embedding
    assert "resnet10t (timm)" in html and "per-image channel standardization, 2 x 2 grid" in html


def test_unreadable_tiles_are_replaced_and_listed(data, tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    for p in data.parent.glob("*.png"):
        (root / p.name).write_bytes(p.read_bytes())
    (root / "broken.png").write_bytes(b"not a png")
    s = pretrain(_cfg(root, tmp_path / "run", steps=4, batch_size=16))
    assert s["status"] == "finished" and s["bad_tiles"] == 1
    assert "broken.png" in (tmp_path / "run" / "bad_tiles.txt").read_text()


def test_bad_configuration_is_rejected_naming_the_argument(data, tmp_path):
    with pytest.raises(Exception, match="batch_size"):
        pretrain(_cfg(data, tmp_path / "a", batch_size=9, accumulate=2))
    with pytest.raises(Exception, match="augment"):
        pretrain(_cfg(data, tmp_path / "b", augment="heavy"))
    with pytest.raises(Exception, match="timm"):
        pretrain(_cfg(data, tmp_path / "c", model="resnet18"))
    with pytest.raises(Exception, match="nothing to resume"):
        pretrain(_cfg(data, tmp_path / "d"), resume=True)
    with pytest.raises(Exception, match="unknown keys"):
        PretrainConfig.from_dict({"stepz": 3})


# --------------------------------------------------------------------------------------------- sampling
def _records(slides, sites):
    return [TileRecord(Path(f"{i}.png"), f"{i}.png", {"slide": sl, "site": st}) for i, (sl, st) in enumerate(zip(slides, sites))]


def test_cap_per_slide_and_balanced_sites():
    # site A: 3 slides x 50 tiles; site B: 1 slide x 10 tiles
    slides = [f"a{i // 50}" for i in range(150)] + ["b0"] * 10
    sites = ["A"] * 150 + ["B"] * 10
    s = DiversitySampler(_records(slides, sites), max_per_slide=20, balance_by=["site"], seed=3)
    kept = [slides[i] for i in s.indices]
    assert {k: kept.count(k) for k in set(kept)} == {"a0": 20, "a1": 20, "a2": 20, "b0": 10}
    draws = np.concatenate([s.global_batch(step, 256) for step in range(40)])
    frac_b = np.mean([sites[i] == "B" for i in draws])
    assert abs(frac_b - 0.5) < 0.03  # balanced: half the draws from site B's 10 tiles
    assert s.stats["site"]["sampled_entropy_bits"] == pytest.approx(1.0)
    assert s.stats["slide"]["count"] == 4 and s.stats["patches_per_slide"] == {"min": 10, "median": 20.0, "mean": 17.5, "max": 20}
    # stateless in the step, independent of instance; different seeds differ
    s2 = DiversitySampler(_records(slides, sites), max_per_slide=20, balance_by=["site"], seed=3)
    assert (s.global_batch(7, 64) == s2.global_batch(7, 64)).all()
    assert not (s.global_batch(7, 64) == s.global_batch(8, 64)).all()


def test_diversity_statistics_against_scipy():
    from scipy.stats import entropy

    recs = _records(["s1"] * 5 + ["s2"] * 3 + ["s3"] * 2, ["A"] * 8 + ["B"] * 2)
    st = diversity_stats(recs)
    assert st["slide"]["entropy_bits"] == pytest.approx(entropy([5, 3, 2], base=2), abs=1e-4)
    assert st["slide"]["hill"] == pytest.approx(2 ** entropy([5, 3, 2], base=2), abs=1e-3)
    assert st["site"]["count"] == 2 and st["scanner"] is None
    assert entropy_bits([1, 1, 1, 1]) == pytest.approx(2.0) and entropy_bits([7]) == 0.0
    with pytest.raises(Exception, match="balance_by"):
        DiversitySampler(recs, balance_by=["scanner"])


# --------------------------------------------------------------------------------------------- views
def test_views_do_not_depend_on_the_batch_split():
    aug = MultiCropAugment(2, 3, 32, 16, augment="shiftkit", seed=5)
    x = synthetic_he(6, 48, seed=1)[0]
    whole = aug(x, step=4)
    halves = [aug(x[:3], step=4, offset=0, global_batch=6), aug(x[3:], step=4, offset=3, global_batch=6)]
    assert [tuple(v.shape) for v in whole] == [(6, 3, 32, 32)] * 2 + [(6, 3, 16, 16)] * 3
    for v, a, b in zip(whole, *halves):
        torch.testing.assert_close(v, torch.cat([a, b]), rtol=0, atol=1e-3)  # float reduction order; < 1/4 uint8 step
        assert torch.isfinite(v).all() and v.min() >= 0 and v.max() <= 1
    other = aug(x, step=5)
    assert not torch.allclose(whole[0], other[0])
    assert not torch.allclose(whole[0], whole[1])  # two global views differ


def test_views_rotate_and_flip_exactly():
    x = torch.rand(1, 3, 16, 16)
    p = {"area": torch.ones(1), "ratio": torch.ones(1), "x": torch.zeros(1), "y": torch.zeros(1),
         "hflip": torch.tensor([True]), "vflip": torch.tensor([False]), "rot": torch.tensor([1]),
         "jitter": torch.tensor([False]), "brightness": torch.ones(1), "contrast": torch.ones(1),
         "saturation": torch.ones(1), "hue": torch.zeros(1), "gray": torch.tensor([False]),
         "blur": torch.tensor([False]), "sigma": torch.ones(1)}
    y = MultiCropAugment._make_view(x, p, 16)
    torch.testing.assert_close(y, x.flip(-1).rot90(1, (-2, -1)), rtol=0, atol=1e-5)


def test_twin_index_pairs_rows_of_one_pair_id_under_other_scanners():
    from shiftkit.train import twin_index

    rec = lambda pid, sc: TileRecord(Path(f"{pid}_{sc}.png"), f"{pid}_{sc}", {"pair_id": pid, "scanner": sc})
    recs = [rec("a", "aperio"), rec("a", "hamamatsu"), rec("b", "aperio"), rec("c", "aperio"), rec("c", "leica"),
            rec("c", "hamamatsu"), TileRecord(Path("x.png"), "x", {})]
    assert twin_index(recs) == {0: [1], 1: [0], 3: [4, 5], 4: [3, 5], 5: [3, 4]}  # b has no twin, x no pair_id


def _pair_views(aug, x, twin, has, step=3):
    return aug(x, step=step, twin=twin, has_twin=has)


def test_pair_views_make_the_second_global_view_from_the_twin_with_the_partners_box():
    """With geometry-only views (augment dino, colour jitter and blur off by construction below), the second global
    view of a paired row is the twin cut with the first view's box: equal to the first view's crop of the twin up to
    the view's own flips/rotation; an unpaired row keeps an independent crop of itself."""
    aug = MultiCropAugment(2, 2, 24, 12, global_scale=(0.3, 0.6), augment="dino", seed=2)
    g = torch.Generator().manual_seed(0)
    x, twin = torch.rand(4, 3, 48, 48, generator=g), torch.rand(4, 3, 48, 48, generator=g)
    has = torch.tensor([True, False, True, False])
    plain = aug(x, step=3)
    paired = _pair_views(aug, x, twin, has)
    torch.testing.assert_close(paired[0], plain[0])  # the first global view is untouched
    torch.testing.assert_close(paired[1][~has], plain[1][~has])  # rows without a twin: as before
    # the twin's view uses view 0's box: cut the twin by view 0's parameters with view 1's flips and colour
    p0 = aug._draw(aug._gen(3, "view", 0), 4, aug.global_scale, 1.0)
    p1 = aug._draw(aug._gen(3, "view", 1), 4, aug.global_scale, 0.1)
    for k in ("area", "ratio", "x", "y"):
        p1[k] = torch.where(has, p0[k], p1[k])
    ref = MultiCropAugment._make_view(twin, p1, 24)
    torch.testing.assert_close(paired[1][has], ref[has])
    # and the twin's tissue, not the tile's, is what the view shows
    assert (paired[1][has] - plain[1][has]).abs().mean() > 0.05
    # a twin of the wrong shape is refused
    with pytest.raises(Exception, match="twin"):
        aug(x, step=3, twin=twin[:, :, :40], has_twin=has)


def test_pretrain_pair_views_reads_twins_and_refuses_data_without_pairs(tmp_path):
    root = tmp_path / "pairs"
    root.mkdir()
    a = synthetic_he(4, 64, seed=1)[0]
    rows = []
    for i, t in enumerate(a):
        for sc, im in (("aperio", t), ("hamamatsu", (t * 0.9).clamp(0, 1))):
            write_image(root / f"{sc}_{i}.png", (im.permute(1, 2, 0) * 255).round().byte().numpy())
            rows.append(f"{sc}_{i}.png,p{i},{sc},s{i % 2}")
    (root / "m.csv").write_text("path,pair_id,scanner,slide\n" + "\n".join(rows) + "\n")
    s = pretrain(_cfg(root / "m.csv", tmp_path / "run", steps=2, pair_views=True))
    assert s["status"] == "finished" and np.isfinite(_losses(tmp_path / "run")).all()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["pair_views"] is True
    from shiftkit.core import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="pair_id"):
        pretrain(_cfg(_tiles(tmp_path / "nopairs", n=4), tmp_path / "run2", steps=1, pair_views=True))


def test_transfer_views_use_training_profiles_and_refuse_held_out_ones(tmp_path):
    from shiftkit.core import InvalidArgumentError
    from shiftkit.shifts.transfer import bundled_profiles
    from shiftkit.shifts import get_spec

    train = [p for p in bundled_profiles() if not get_spec(f"scanner-transfer:{p}").held_out]
    held = [p for p in bundled_profiles() if get_spec(f"scanner-transfer:{p}").held_out]
    assert train and held
    aug = MultiCropAugment(2, 2, 32, 16, augment="dino", seed=1, transfers=train)
    assert aug.domain[-1].shifts == [f"scanner-transfer:{p}" for p in train]
    x = synthetic_he(8, 48, seed=3)[0]
    shifted = aug(x, step=1)
    assert not torch.allclose(shifted[0], MultiCropAugment(2, 2, 32, 16, augment="dino", seed=1)(x, step=1)[0])
    with pytest.raises(InvalidArgumentError, match="held-out"):
        MultiCropAugment(2, 2, 32, 16, augment="dino", transfers=held[:1])
    with pytest.raises(InvalidArgumentError, match="held-out"):
        PretrainConfig(data="x", out=str(tmp_path), transfers=(held[0],)).resolved()
    # 'synthetic' leaves the learned transfers out of the scanner step; 'shiftkit' keeps them
    fams = lambda a: {get_spec(n).family for n in a.domain[-1].shifts}
    assert "scanner-transfer" not in fams(MultiCropAugment(augment="synthetic"))
    assert "scanner-transfer" in fams(MultiCropAugment(augment="shiftkit"))


# --------------------------------------------------------------------------------------------- distributed
def _torchrun(args, nproc, cwd, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "shiftkit.cli.main", "pretrain"] + args
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(data, tmp_path):
    """2 ranks x 4 tiles vs 1 rank x 8 tiles, same global batch: DDP averages gradients, lightly's DINO centre is
    all-reduced, views are drawn for the global batch — the weights agree to float reduction order."""
    cfgf = tmp_path / "c.json"
    cfgf.write_text(json.dumps({"global_size": 32, "local_size": 16, "n_local": 2, "out_dim": 128, "bottleneck_dim": 32,
                                "hidden_dim": 64, "load_size": 64, "drop_path": 0.0, "head_batch_norm": False}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--data", str(data), "--model", "timm:vit_tiny_patch16_224", "--recipe", "cpu-small", "--steps", "3",
              "--batch-size", "8", "--workers", "0", "--device", "cpu", "--augment", "shiftkit", "--config", str(cfgf)]
    one = _torchrun(common + ["--out", str(tmp_path / "one")], 1, tmp_path, env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(common + ["--out", str(tmp_path / "two")], 2, tmp_path, env)
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert a["world_size"] == 1 and b["world_size"] == 2
    worst = max(float((a["teacher"][k] - b["teacher"][k]).abs().max()) for k in a["teacher"])
    assert worst < 1e-4, worst
    torch.testing.assert_close(a["loss"]["center"], b["loss"]["center"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_losses(tmp_path / "one"), _losses(tmp_path / "two"), rtol=1e-4)


@pytest.mark.gpu
def test_cuda_bf16_run_is_finite(data, tmp_path):
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs CUDA")
    s = pretrain(_cfg(data, tmp_path / "run", steps=3, device="cuda", augment="shiftkit"))
    assert s["status"] == "finished" and np.isfinite(_losses(tmp_path / "run")).all()



def test_micro_batches_of_all_ranks_tile_the_global_batch(data):
    from shiftkit.train.dino import _StepBatches

    ds = TileDataset(data)
    sampler = DiversitySampler(ds.records, seed=1)
    gb = 16
    seen = []
    for rank in range(2):
        sb = _StepBatches(ds, sampler, gb, accumulate=2, rank=rank, world=2, load_size=64)
        x, bad, twins = sb[5]
        assert x.shape == (2, 4, 3, 64, 64) and x.dtype == torch.uint8 and not bad and twins is None
        for k in range(2):
            lo, hi = sb.positions(k)
            seen.extend(range(lo, hi))
            idx = sampler.global_batch(5, gb)[lo:hi]
            for j, i in enumerate(idx):  # the tile at each position is the sampler's tile (64² tiles: no resize)
                ref = torch.from_numpy(np.ascontiguousarray(__import__("shiftkit").data.read_image(ds.records[i].path))).permute(2, 0, 1)
                assert torch.equal(x[k, j], ref)
    assert sorted(seen) == list(range(gb))


def test_gradient_accumulation_equals_one_big_batch_when_the_centre_is_held(data, tmp_path, monkeypatch):
    """Accumulation averages micro-batch losses and gradients. The one intended difference to a big batch is the
    DINO centre, updated after each micro-batch; holding it fixed (and using a backbone and head without batch
    norm) the two runs must agree to float rounding. With the centre live the first-step loss differed by 1.6 %
    (ViT-Ti, teacher temperature 0.02)."""
    import lightly.loss

    monkeypatch.setattr(lightly.loss.DINOLoss, "update_center", lambda self, t: None)
    kw = dict(steps=2, batch_size=16, model="timm:vit_tiny_patch16_224", head_batch_norm=False)
    pretrain(_cfg(data, tmp_path / "a1", **kw))
    pretrain(_cfg(data, tmp_path / "a2", accumulate=2, **kw))
    pretrain(_cfg(data, tmp_path / "a4", accumulate=4, **kw))
    l1, l2, l4 = (_losses(tmp_path / n) for n in ("a1", "a2", "a4"))
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    a = torch.load(tmp_path / "a1" / "checkpoint.pt", weights_only=True)["student"]
    for other in ("a2", "a4"):
        b = torch.load(tmp_path / other / "checkpoint.pt", weights_only=True)["student"]
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a if a[k].is_floating_point()])
        # two AdamW steps move weights by ~2e-3; measured: mean |diff| 6e-11 (x2) and 5e-9 (x4), and >= 99.99 %
        # of weights within 1e-5 (Adam magnifies rounding where a gradient is near zero)
        assert float(diff.mean()) < 1e-7 and float((diff < 1e-5).float().mean()) > 0.999


@pytest.mark.slow
def test_cli_sigterm_writes_a_checkpoint_exits_143_and_resumes(data, tmp_path):
    import time

    cfgf = tmp_path / "c.json"
    cfgf.write_text(json.dumps({"global_size": 32, "local_size": 16, "n_local": 2, "out_dim": 128, "bottleneck_dim": 32,
                                "hidden_dim": 64, "load_size": 64}))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "shiftkit.cli.main", "pretrain", "--data", str(data), "--out", str(run), "--steps",
           "400", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--config", str(cfgf),
           "--checkpoint-every", "1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "log.jsonl").exists() and (run / "log.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "--resume" in err
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= step < 400 and len(_losses(run)) == step
    r = subprocess.run(cmd[:cmd.index("--steps") + 1] + [str(step + 2)] + cmd[cmd.index("--steps") + 2:] + ["--resume"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == step + 2


def test_split_column_holds_out_a_validation_set_for_the_knn_monitor(tmp_path):
    root = tmp_path / "d"
    m = _tiles(root, n=8)
    rows = m.read_text().splitlines()
    # every 4th tile of each class is validation
    m.write_text("\n".join([rows[0] + ",split"] + [r + ("," + ("val" if i % 4 == 0 else "train")) for i, r in enumerate(rows[1:])]) + "\n")
    val_paths = {r.split(",")[0] for i, r in enumerate(rows[1:]) if i % 4 == 0}
    s = pretrain(_cfg(m, tmp_path / "run", steps=2, knn_every=1))
    assert s["diversity"]["patches"] == 12 and s["diversity"]["dataset_patches"] == 12
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert sum("knn_balanced_accuracy" in e for e in log) == 3  # step 0 and after each of 2 steps
    from shiftkit.train.dino import split_validation

    train, val = split_validation(TileDataset(m).records)
    assert {r.sample_id for r in val} == val_paths and not ({r.sample_id for r in train} & val_paths)


@pytest.mark.gpu
def test_cuda_pair_views_and_transfers_run_is_finite(tmp_path):
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs CUDA")
    from shiftkit.shifts import get_spec
    from shiftkit.shifts.transfer import bundled_profiles

    root = tmp_path / "pairs"
    root.mkdir()
    rows = []
    for i, t in enumerate(synthetic_he(4, 64, seed=1)[0]):
        for sc, im in (("aperio", t), ("hamamatsu", (t * 0.9).clamp(0, 1))):
            write_image(root / f"{sc}_{i}.png", (im.permute(1, 2, 0) * 255).round().byte().numpy())
            rows.append(f"{sc}_{i}.png,p{i},{sc}")
    (root / "m.csv").write_text("path,pair_id,scanner\n" + "\n".join(rows) + "\n")
    train = [p for p in bundled_profiles() if not get_spec(f"scanner-transfer:{p}").held_out]
    s = pretrain(_cfg(root / "m.csv", tmp_path / "run", steps=3, device="cuda", augment="synthetic",
                      pair_views=True, transfers=tuple(train)))
    assert s["status"] == "finished" and np.isfinite(_losses(tmp_path / "run")).all()


# --------------------------------------------------------------------------------------------- input and readout
def test_per_image_input_is_a_per_channel_z_score_and_removes_affine_colour_shifts(monkeypatch):
    from shiftkit.models import encoders

    x = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    got = encoders.standardize_input(x, "per-image")
    a = x.numpy().astype(np.float64)  # independent reference: numpy's z-score with the same std floor
    mu, sd = a.mean(axis=(2, 3), keepdims=True), a.std(axis=(2, 3), ddof=1, keepdims=True)
    np.testing.assert_allclose(got.numpy(), (a - mu) / (sd + encoders.PER_IMAGE_STD_FLOOR), rtol=1e-5, atol=1e-5)
    # a per-channel gain and offset (a scanner's or a lab's colour cast, to first order) leaves nothing behind once
    # the floor is out of the way; with the floor, the residue is a scale near 1
    gain, offset = torch.tensor([0.7, 1.2, 0.9]).view(1, 3, 1, 1), torch.tensor([0.1, -0.05, 0.02]).view(1, 3, 1, 1)
    monkeypatch.setattr(encoders, "PER_IMAGE_STD_FLOOR", 0.0)
    torch.testing.assert_close(encoders.standardize_input(x * gain + offset, "per-image"),
                               encoders.standardize_input(x, "per-image"), rtol=1e-4, atol=1e-4)
    # the fixed route is ImageNet's mean/std, and a flat image stays finite under the per-image one
    m, s = torch.tensor(encoders.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(encoders.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(encoders.standardize_input(x, "fixed"), (x - m) / s)
    monkeypatch.setattr(encoders, "PER_IMAGE_STD_FLOOR", 1e-2)
    assert torch.isfinite(encoders.standardize_input(torch.full((1, 3, 8, 8), 0.9), "per-image")).all()
    with pytest.raises(Exception, match="input_norm"):
        encoders.standardize_input(x, "lab")


def test_grid_embedding_is_the_pooled_feature_map_and_refines_the_global_one():
    import timm

    from shiftkit.core.errors import InvalidArgumentError
    from shiftkit.models.encoders import Encoder, standardize_input

    torch.manual_seed(0)
    m = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    x = torch.rand(5, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    glob = Encoder(m, "r", 112).embed(x)
    grid = Encoder(m, "r", 112, grid=4).embed(x)
    assert glob.shape == (5, 512) and grid.shape == (5, 512 * 16)
    with torch.no_grad():  # at 112² a ResNet's last map is 4 x 4: the grid readout is that map, flattened
        xs = torch.nn.functional.interpolate(x, size=(112, 112), mode="bilinear", antialias=True, align_corners=False)
        fmap = m.forward_features(standardize_input(xs))
    assert fmap.shape[-2:] == (4, 4)
    np.testing.assert_allclose(grid, fmap.flatten(1).numpy(), rtol=1e-5, atol=1e-6)
    # the mean of the 16 cells of each channel is the global embedding
    np.testing.assert_allclose(grid.reshape(5, 512, 16).mean(-1), glob, rtol=1e-4, atol=1e-5)
    # per-image statistics: an image embeds the same whatever it is batched with
    per = Encoder(m, "r", 112, input_norm="per-image", grid=2)
    np.testing.assert_allclose(per.embed(x)[:1], per.embed(x[:1]), rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="grid"):
        Encoder(torch.nn.Identity(), "plain module", 112, grid=2)
    with pytest.raises(InvalidArgumentError, match="grid"):
        Encoder(m, "r", 112, grid=0)
    with pytest.raises(InvalidArgumentError, match="input_norm"):
        Encoder(m, "r", 112, input_norm="lab")


def test_pretrain_with_per_image_input_and_a_grid_exports_both_and_refuses_bad_values(data, tmp_path):
    from shiftkit.models import load_encoder

    run = tmp_path / "run"
    pretrain(_cfg(data, run, steps=2, input_norm="per-image", embed_grid=2, val=str(data), knn_every=2))
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["input_norm"] == "per-image" and meta["embed_grid"] == 2
    enc = load_encoder(str(run))
    assert enc.input_norm == "per-image" and enc.grid == 2 and "per-image" in enc.info["architecture"]
    emb = enc.embed(torch.rand(3, 3, 64, 64))
    assert emb.shape == (3, 512 * 4) and np.isfinite(emb).all()
    knn = [e for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "knn_balanced_accuracy" in e]
    assert knn and 0 <= knn[-1]["knn_balanced_accuracy"] <= 1
    with pytest.raises(Exception, match="input_norm"):
        pretrain(_cfg(data, tmp_path / "a", input_norm="lab"))
    with pytest.raises(Exception, match="embed_grid"):
        pretrain(_cfg(data, tmp_path / "b", embed_grid=0))
    with pytest.raises(Exception, match="embed_grid"):
        pretrain(_cfg(data, tmp_path / "c", embed_grid=2, model="timm:vit_tiny_patch16_224"))


def test_embed_norm_changes_the_exported_readout_and_not_the_training(data, tmp_path):
    """``embed_norm`` reads the weights out another way: the same losses and the same exported weights as a run
    without it, while ``encoder.json`` (and so every later embedding) and the kNN monitor use per-image input."""
    from safetensors.torch import load_file

    from shiftkit.models import load_encoder
    from shiftkit.models.encoders import Encoder

    plain, other = tmp_path / "plain", tmp_path / "readout"
    pretrain(_cfg(data, plain, steps=3, embed_grid=2, val=str(data), knn_every=3))
    pretrain(_cfg(data, other, steps=3, embed_grid=2, embed_norm="per-image", val=str(data), knn_every=3))
    assert _losses(plain) == _losses(other)
    wa, wb = load_file(str(plain / "encoder.safetensors")), load_file(str(other / "encoder.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((r / "encoder.json").read_text()) for r in (plain, other))
    assert (ma["input_norm"], ma["train_input_norm"]) == ("fixed", "fixed")
    assert (mb["input_norm"], mb["train_input_norm"]) == ("per-image", "fixed")
    enc = load_encoder(str(other))
    assert enc.input_norm == "per-image" and "trained on fixed standardized views" in enc.info["weights"]
    x = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    ref = Encoder(load_encoder(str(plain)).module, "ref", enc.input_size, input_norm="per-image", grid=2).embed(x)
    np.testing.assert_allclose(enc.embed(x), ref, rtol=1e-5, atol=1e-6)
    knn = lambda r: [e["knn_balanced_accuracy"] for e in map(json.loads, (r / "log.jsonl").read_text().splitlines())
                     if "knn_balanced_accuracy" in e]
    assert len(knn(plain)) == len(knn(other)) == 2  # step 0 and the last step, each under its own readout
    with pytest.raises(Exception, match="embed_norm"):
        pretrain(_cfg(data, tmp_path / "d", embed_norm="lab"))
