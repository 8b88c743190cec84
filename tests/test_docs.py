"""The documentation site builds with warnings as errors, and the guides' Python examples run."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ["normalization.md", "augmentation.md", "transforms/stain_augment.md", "shifts.md", "simulate.md", "pretraining.md",
          "real_scanner_shift.md"]
PRELUDE = """
import numpy as np, torch
from shiftkit.data import load_sample_tiles
_t = load_sample_tiles()
tile = _t[0]                                                     # (224, 224, 3) uint8
images = torch.from_numpy(_t[:4]).permute(0, 3, 1, 2).float() / 255
"""


def test_docs_build_strict(tmp_path):
    # no -q: mkdocstrings' griffe warnings must be printed for --strict to count them
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    assert "WARNING" not in log, [line for line in log.splitlines() if "WARNING" in line]
    assert (tmp_path / "site" / "api" / "transforms" / "index.html").exists()


def test_documented_parameters_match_the_signatures():
    """Every public function, method and class whose docstring has an ``Args:`` section documents exactly the
    parameters of its signature, one per entry (``a, b: ...`` would document a parameter that does not exist)."""
    import griffe

    pkg = griffe.load("shiftkit", docstring_parser="google", resolve_aliases=False)
    problems, seen, checked = [], set(), 0

    def check(obj, fn):
        nonlocal checked
        if fn is None or obj.docstring is None:
            return
        sections = obj.docstring.parse("google", warnings=False)
        documented = [p.name.lstrip("*") for s in sections if s.kind.value == "parameters" for p in s.value]
        if not documented:
            return
        checked += 1
        variadic = {p.name for p in fn.parameters if p.kind is not None and "variadic" in p.kind.value}
        sig = [p.name for p in fn.parameters if p.name not in ("self", "cls")]
        problems.extend(f"{obj.path}: documents {d!r}, not in the signature" for d in documented if d not in sig)
        problems.extend(f"{obj.path}: {p!r} is not documented" for p in sig if p not in documented and p not in variadic)

    def walk(obj):
        for name, m in obj.members.items():
            if m.is_alias or name.startswith("_") or id(m) in seen:
                continue
            seen.add(id(m))
            if m.is_class:
                init = m.members.get("__init__")
                check(m, init if init is not None and not init.is_alias else None)
            elif m.is_function:
                check(m, m)
            if m.is_module or m.is_class:
                walk(m)

    walk(pkg)
    assert checked >= 25  # the walker reached the package (30 documented callables today)
    assert not problems, problems


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
