"""Write the golden outputs of every registered shift: ``python tests/golden/make_golden.py``.

One bundled tile (a 64² centre crop) x every registered shift x severities 1, 3 and 5, each tile with the
simulate seed of ``(0, shift, severity, tile id)``, as uint8 (what ``simulate`` writes), per route: the float route
(float tiles in, every shift) and the 8-bit CPU route (uint8 tiles in, the shifts that have one). The files are
named by the sampler and severity-table versions: a deliberate change of any shift's pixels bumps one of them and
regenerates these files in the same commit (tests/test_golden.py fails otherwise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SEVERITIES = (1, 3, 5)


ROUTES = ("float", "uint8-cpu")


def golden_path(route: str = "float") -> Path:
    from shiftkit.core.shift_registry import SEVERITY_TABLE_VERSION
    from shiftkit.data.shifted import SAMPLER_VERSION

    suffix = "" if route == "float" else "_" + route
    return HERE / f"shifts_sampler{SAMPLER_VERSION}_tables{SEVERITY_TABLE_VERSION}{suffix}.npz"


def golden_tiles() -> torch.Tensor:
    from shiftkit.data import load_sample_tiles

    t = load_sample_tiles()[[9]]
    h, w = t.shape[1:3]
    t = t[:, (h - 64) // 2:(h - 64) // 2 + 64, (w - 64) // 2:(w - 64) // 2 + 64]
    return torch.from_numpy(np.ascontiguousarray(t)).permute(0, 3, 1, 2).float() / 255


def outputs(route: str = "float") -> dict:
    from shiftkit.data.shifted import sample_seed, shift_route, shift_tiles
    from shiftkit.shifts import list_shifts

    x = golden_tiles()
    if route == "uint8-cpu":
        x = (x * 255).round().to(torch.uint8)
    out = {}
    for name in list_shifts():
        if shift_route(name, x) != route:
            continue
        for sev in SEVERITIES:
            y, _ = shift_tiles(x, name, sev, [sample_seed(0, name, sev, f"golden{i}") for i in range(len(x))])
            if y.dtype != torch.uint8:
                y = (y.clamp(0, 1) * 255).round().byte()
            out[f"{name}|{sev}"] = y.permute(0, 2, 3, 1).contiguous().numpy()
    return out


if __name__ == "__main__":
    for route in ROUTES:
        p = golden_path(route)
        np.savez_compressed(p, **outputs(route))
        print(f"wrote {p} ({p.stat().st_size / 1024:.0f} KiB)")
