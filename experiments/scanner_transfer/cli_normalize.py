#!/usr/bin/env python3
"""The user's path end to end: `fit-scanner --reverse` on the training slides' pairs, `normalize --transfer` on the
held-out slide's tiles, scored by ../shared/eval/score_pairs.py itself (its command line), leave one slide out.

    python experiments/scanner_transfer/cli_normalize.py     # ~1.5 min on this project's 2-core CPU

For each direction (a2h: Aperio tiles normalized towards Hamamatsu; h2a the reverse) and held-out slide: a pairs
manifest of the two training slides written with the Aperio crops as src and the Hamamatsu ones as dst (as
`pair-tiles` would write them for an Aperio -> Hamamatsu pairing), `shiftkit fit-scanner --pairs ... --mpp 0.25`
(a2h) or with `--reverse` (h2a), then `shiftkit normalize <held-out source crops> OUT --transfer profile.json` and
`score_pairs.py OUT --direction D --slides S`. Compared with run.py's in-Python rows: the CLI applies colour + MTF
(no noise), so it should land between run.py's "colour only" and "colour+MTF+noise" rows. Writes
results/cli_normalize.md and .json.
"""
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (paths, save_results)

PAIRS = run.SHARED / "data" / "mitos_scanner_pairs_dev"
SCORER = run.SHARED / "eval" / "score_pairs.py"
CLI = [sys.executable, "-c", "from shiftkit.cli.main import main; main()"]


def sh(cmd):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.stdout


def scored(text):
    """(mean CIEDE2000, mean sharpness ratio) from score_pairs.py's last line, 'all: n=.. dE2000 x sharpness ratio y'."""
    m = re.search(r"^all: n=\d+ dE2000 ([\d.]+) sharpness ratio ([\d.]+)", text, re.M)
    if not m:
        raise SystemExit(f"no 'all:' line in score_pairs.py's output:\n{text}")
    return float(m.group(1)), float(m.group(2))


def main():
    crops = sorted((PAIRS / "aperio").glob("A*.png"))
    slides = sorted({c.name[1:3] for c in crops})
    data, lines = {}, ["# normalize --transfer through the command line, leave one slide out", "",
                       "fit-scanner on the training slides' pairs (h2a: `--reverse`), normalize on the held-out slide's "
                       "source crops, scored by score_pairs.py's command line. Colour + MTF applied (noise and JPEG are "
                       "left out by normalize).", "", "| direction | held-out slide | ΔE2000 | sharpness | map | parts "
                       "applied |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for direction in ("a2h", "h2a"):
            rows = []
            for s in slides:
                work = tmp / f"{direction}_{s}"
                manifest = work / "pairs.csv"
                work.mkdir(parents=True)
                manifest.write_text("src,dst,slide\n" + "".join(
                    f"{c},{PAIRS / 'hamamatsu' / ('H' + c.name[1:])},{c.name[1:3]}\n" for c in crops if c.name[1:3] != s))
                profile = work / "profile.json"
                sh(CLI + ["fit-scanner", "--pairs", manifest, "-o", profile, "--mpp", "0.25"]
                   + (["--reverse"] if direction == "h2a" else []))
                src_dir = work / "src"
                src_dir.mkdir()
                folder, prefix = ("aperio", "A") if direction == "a2h" else ("hamamatsu", "H")
                for c in sorted((PAIRS / folder).glob(f"{prefix}{s}*.png")):
                    shutil.copy(c, src_dir / c.name)
                sh(CLI + ["normalize", src_dir, work / "out", "--transfer", profile])
                de, sharp = scored(sh([sys.executable, SCORER, work / "out", "--pairs", PAIRS, "--direction", direction,
                                       "--slides", s]))
                prof = json.loads(profile.read_text())
                applied = json.loads((work / "out" / "normalize.json").read_text())["transfer"]["applied_parts"]
                rows.append({"slide": s, "delta_e2000": de, "sharpness": sharp, "map": prof["fit"]["colour"]["chosen"],
                             "applied": applied, "tiles": len(list(src_dir.glob("*.png")))})
                lines.append(f"| {direction} | {s} | {de:.2f} | {sharp:.2f} | {rows[-1]['map']} | {', '.join(applied)} |")
                print(lines[-1], flush=True)
            n = sum(r["tiles"] for r in rows)
            mean_de = sum(r["delta_e2000"] * r["tiles"] for r in rows) / n
            mean_sharp = sum(r["sharpness"] * r["tiles"] for r in rows) / n
            lines.append(f"| {direction} | all ({n} crops) | {mean_de:.2f} | {mean_sharp:.2f} | | |")
            data[direction] = {"slides": rows, "delta_e2000": mean_de, "sharpness": mean_sharp}
    lines.append("")
    run.save_results("cli_normalize", data, lines)


if __name__ == "__main__":
    main()
