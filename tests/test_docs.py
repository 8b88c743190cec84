"""The documentation site builds with warnings as errors, and the guides' Python examples run."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ["normalization.md", "augmentation.md", "transforms/stain_augment.md", "shifts.md", "simulate.md", "pretraining.md"]
PRELUDE = """
import numpy as np, torch
from shiftkit.data import load_sample_tiles
_t = load_sample_tiles()
tile = _t[0]                                                     # (224, 224, 3) uint8
images = torch.from_numpy(_t[:4]).permute(0, 3, 1, 2).float() / 255
"""


def test_docs_build_strict(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "site" / "api" / "transforms" / "index.html").exists()


@pytest.mark.parametrize("page", GUIDES)
def test_guide_examples_run(page, tmp_path, monkeypatch):
    from shiftkit.data import sample_tiles_dir

    shutil.copytree(sample_tiles_dir(), tmp_path / "tiles")  # the guides' example folder
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), flags=re.S)
    assert blocks
    ns: dict = {}
    exec(PRELUDE, ns)  # noqa: S102
    for code in blocks:
        exec(compile(code, page, "exec"), ns)  # noqa: S102 - our own documentation
