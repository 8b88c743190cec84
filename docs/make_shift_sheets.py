"""Contact sheets and pages of every shift: one page per family (docs/shifts/<family>.md) with each shift's
physical cause, simulation method, severity table and source, and a contact sheet on a real tile (a row per
shift: clean, severities 1–5). Generated from the registry, so the pages never drift from the code.

    python docs/make_shift_sheets.py
"""

from __future__ import annotations

from pathlib import Path

import torch

import shiftkit
from shiftkit.data import load_sample_tiles, write_image
from shiftkit.shifts import FAMILIES, get_spec, list_shifts

OUT = Path(__file__).resolve().parent / "img"


def main(tile_index: int = 9, size: int = 160) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tiles = load_sample_tiles()
    x = torch.from_numpy(tiles[tile_index]).permute(2, 0, 1)[None].float() / 255
    x = x[..., :size, :size]
    pad = 4
    for family in FAMILIES:
        names = list_shifts(family=family)
        if not names:
            continue
        rows = []
        for n in names:
            panels = [x] + [shiftkit.get_shift(n, s, seed=0)(x) for s in range(1, 6)]
            gap = torch.ones(1, 3, size, pad)
            rows.append(torch.cat([t for p in panels for t in (p, gap)][:-1], -1))
        hgap = torch.ones(1, 3, pad, rows[0].shape[-1])
        sheet = torch.cat([t for r in rows for t in (r, hgap)][:-1], -2)
        path = OUT / f"shifts_{family}.png"
        write_image(path, (sheet[0].permute(1, 2, 0) * 255).round().byte().numpy())
        print("wrote", path, "rows:", ", ".join(names))
        write_page(family, names)


def write_page(family: str, names: list) -> None:
    pages = OUT.parent / "shifts"
    pages.mkdir(exist_ok=True)
    lines = [f"# {family} shifts", "",
             f"Contact sheet: one row per shift ({', '.join(names)}), clean tile then severities 1–5 "
             "(bundled ovarian-carcinoma stroma tile, 0.5 µm/px assumed, seed 0).", "",
             f"![{family}](../img/shifts_{family}.png)", ""]
    for n in names:
        sp = get_spec(n)
        lines += [f"## `{n}` ({'held out for evaluation' if sp.held_out else 'training family'})", "",
                  sp.description, "",
                  "| parameter | unit | S1 | S2 | S3 | S4 | S5 |", "|---|---|---|---|---|---|---|"]
        for k, vals in sp.table.items():
            lines.append(f"| {k} | {sp.units.get(k, '')} | " + " | ".join(f"{v:g}" for v in vals) + " |")
        lines += ["", f"Source: {sp.source}. Pixel values (`px@0.5um`) are rescaled to the tile's µm/px "
                  "(`get_shift(name, severity, mpp=...)`).", ""]
    (pages / f"{family}.md").write_text("\n".join(lines))
    print("wrote", pages / f"{family}.md")


if __name__ == "__main__":
    main()
