"""Smoke tests of the experiment scripts that are not part of CI themselves (the study runs for hours)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lightly")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SHIFTKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "mitos_scanner_pairs_dev").is_dir(), reason="needs ../shared/data (the MITOS pairs)")
def test_shift_pretraining_study_runs_end_to_end_in_smoke_mode(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    cmd = [sys.executable, str(REPO / "experiments" / "shift_pretraining" / "run.py"), "all", "--smoke",
           "--work", str(work), "--results", str(results)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    prepared = json.loads((work / "prepared.json").read_text())
    assert prepared["heldout"] == "05" and "05" not in prepared["train_slides"]
    rows = list(csv.DictReader((work / "manifest.csv").read_text().splitlines()))
    paired = [row for row in rows if row["pair_id"]]
    assert paired and {row["scanner"] for row in paired} == {"aperio", "hamamatsu"}
    assert not any(row["slide"] == "mitos/05" for row in rows)  # the held-out slide is never a training tile
    profile = json.loads((work / "mitos_transfer.json").read_text())
    assert profile["held_out"] is False
    res = json.loads((results / "results.json").read_text())
    names = list(res["rows"])
    assert {"(a) plain DINO", "(c) + stain + synthetic scanner", "(e) + real twins"} <= set(names)
    assert "reference: grayscale pixels (NCC)" in names and "bundled encoder (today)" in names
    for row in res["rows"].values():
        assert row["n_pairs"] == 20 and 0 <= row["top1"][0] <= 1 and 0 <= row["knn_ba"][0] <= 1
        lo, hi = row["bootstrap_over_pairs"]["top1"]
        assert lo <= row["top1"][0] <= hi
    # registered crops of the same tissue: structure alone finds most twins (the sanity ceiling of the study)
    assert res["rows"]["reference: grayscale pixels (NCC)"]["top1"][0] >= 0.8
    assert len(res["encoders"]) == 3 and all(np.isfinite(e["synthetic_cosine"]) for e in res["encoders"])
    assert "synthetic vs real_centred_cosine" in res["spearman"]
    cfg = json.loads((work / "runs" / "e_seed0" / "config.json").read_text())
    assert cfg["pair_views"] is True and any(t.endswith("mitos_transfer.json") for t in cfg["transfers"])
    assert (results / "results.md").is_file() and (results / "shift_pretraining.png").is_file()
    # the readout sweep over a smoke run's weights: every candidate scored, the choice eligible, the rotation complete
    r = subprocess.run([sys.executable, str(REPO / "experiments" / "shift_pretraining" / "readout.py"), "--arm", "a",
                        "--seeds", "0", "--runs", str(work / "runs"), "--results", str(results), "--out",
                        str(tmp_path / "readout")], capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    ro = json.loads((tmp_path / "readout" / "readout.json").read_text())
    assert len(ro["rows"]) == 20 and all(0 <= x["top1_05"] <= 1 and 0 <= x["knn_ba"] <= 1 for x in ro["rows"])
    issue = ro["issue_rule_after_first_run"]
    assert ro["chosen"] in ro["eligible"] and issue["chosen"] in issue["eligible"]
    assert issue["knn_ba_floor"] == pytest.approx(res["rows"]["(a) plain DINO"]["knn_ba"][0] - 0.02)
    assert len(issue["rotation"]) == 6 and {x["test_slide"] for x in issue["rotation"]} == {"03", "04", "05"}
    assert [u["seed"] for u in issue["untrained_resnet10t"]] == [0] and 0 <= issue["untrained_resnet10t"][0]["top1_05"] <= 1
    # the exploratory synthetic-vs-real script over a smoke run's arm (f), own and per-image readout
    r = subprocess.run([sys.executable, str(REPO / "experiments" / "shift_pretraining" / "synthetic_vs_real_more.py"),
                        "--arms", "f", "--per-image-arm", "a", "--seeds", "0", "--runs", str(work / "runs"),
                        "--only-shifts", "jpeg", "gaussian-defocus", "--out", str(tmp_path / "more")],
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    more = json.loads((tmp_path / "more" / "results.json").read_text())
    assert more["n_encoders"] == 2 and {x["encoder"] for x in more["rows"]} == {"(f) seed 0", "(a) seed 0, per-image readout"}
    assert all(-1 <= x["synthetic_cosine"] <= 1 and -1 <= x["real_centred_cosine"] <= 1 and 0 <= x["top1"] <= 1
               for x in more["rows"])
    assert set(more["rows"][0]["per_family"]) == {"optics", "storage"}  # the two shifts asked for
