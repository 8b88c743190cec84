"""Golden outputs: every registered shift at severities 1, 3 and 5 on a fixed tile gives the stored pixels, so no
release silently changes a "reproducible" shifted set. A deliberate change bumps SAMPLER_VERSION or
SEVERITY_TABLE_VERSION and regenerates the file with ``python tests/golden/make_golden.py`` in the same commit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("make_golden", HERE / "golden" / "make_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)


@pytest.fixture(scope="module", params=make_golden.ROUTES)
def route(request):
    return request.param


@pytest.fixture(scope="module")
def golden(route):
    path = make_golden.golden_path(route)
    if not path.is_file():
        pytest.fail(f"no golden outputs for this sampler/severity-table version: expected {path.name} (a version was "
                    "bumped: run python tests/golden/make_golden.py and commit the file with the change)")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def current(route):
    return make_golden.outputs(route)


def test_every_registered_shift_has_golden_outputs(golden, current):
    assert sorted(current) == sorted(golden), "shifts added or removed: regenerate the golden file and bump a version"


def test_shift_outputs_equal_the_golden_pixels(golden, current):
    """Equal bytes on the machine that wrote them; elsewhere at most 0.2 % of pixels may differ by more than one
    level (another CPU's float rounding can move a JPEG block or a Poisson count), and the mean difference stays
    below a tenth of a level."""
    bad = []
    for key, ref in golden.items():
        d = np.abs(current[key].astype(np.int16) - ref.astype(np.int16))
        if (d > 1).mean() > 0.002 or d.mean() > 0.1:
            bad.append(f"{key}: {(d > 1).mean():.2%} of pixels differ by > 1 level (max {d.max()})")
    assert not bad, "shift outputs changed without a version bump:\n" + "\n".join(bad)


def test_golden_check_catches_a_one_level_severity_change(golden):  # gamma is in both routes' files
    """The tolerance is tight enough to see a real change: gamma one severity step off is caught."""
    a, b = golden["gamma|3"].astype(np.int16), golden["gamma|5"].astype(np.int16)
    d = np.abs(a - b)
    assert (d > 1).mean() > 0.002 or d.mean() > 0.1
