"""Exploratory, after the fact: does the synthetic stress test rank encoders by real cross-scanner robustness when
their real robustness differs widely? (issue #16, item 5; NOT the pre-registered figure)

    python experiments/shift_pretraining/synthetic_vs_real_more.py      # ~5 min; needs work/runs/{f,g,h}_seed0-2

The pre-registered correlation (``run.py evaluate``: Spearman ρ over the 15 encoders of arms a-e, fixed before
looking) is −0.61 [−0.87, −0.10]; those encoders all find the held-out twins near chance, so their real robustness
spans a narrow range. This script repeats the same measurement, with the same functions, over the 12 encoders made
later for shipping, whose real robustness spans almost the whole scale: arms (f), (g), (h) × seeds 0-2 under their
own readouts, and (h)'s seeds under the per-image readout the bundled default now uses. It was written after both
the pre-registered ρ and the readout sweep were known; read it as a description of these 12 encoders, not as a test.

Per encoder: synthetic robustness (mean centred cosine over every registered synthetic shift at severities 3-5 on
the held-out Aperio crops and the Camelyon17 crops) and, on held-out MITOS slide 05, the real centred cosine between
each Aperio crop and its Hamamatsu twin and the twin's top-1 retrieval. Spearman ρ with a bootstrap over encoders.
Writes ``results/synthetic_vs_real_more/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as study

from shiftkit.models import load_encoder

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=str(study.WORK / "runs"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", default="fgh", help="Arms read under their own readouts.")
    ap.add_argument("--per-image-arm", default="h", help="The arm also read with per-image standardization.")
    ap.add_argument("--only-shifts", nargs="*", default=None, help="Restrict the synthetic shifts (smoke runs).")
    ap.add_argument("--out", default=str(HERE / "results" / "synthetic_vs_real_more"))
    args = ap.parse_args(argv)
    t0 = time.time()
    ev = study.eval_sets("05")
    syn = study.synthetic_sets(ev, only=args.only_shifts)
    loaded = {}

    def run_encoder(arm, seed):  # each run's weights loaded once, also when read two ways
        if (arm, seed) not in loaded:
            loaded[arm, seed] = load_encoder(str(Path(args.runs) / f"{arm}_seed{seed}"))
        return loaded[arm, seed]

    encoders = [(f"({arm}) seed {seed}", run_encoder(arm, seed)) for arm in args.arms for seed in args.seeds]
    encoders += [(f"({args.per_image_arm}) seed {seed}, per-image readout",
                  run_encoder(args.per_image_arm, seed).with_readout(input_norm="per-image")) for seed in args.seeds]
    rows = []
    for name, enc in encoders:
        r = study.synthetic_and_real(enc, ev, syn)
        ret = study.retrieval(enc.embed(study._t(ev["aperio"])), enc.embed(study._t(ev["hamamatsu"])))
        r.update(encoder=name, top1=float(np.mean(np.array(ret["rank"]) == 0)), readout=enc.describe_input())
        rows.append(r)
        print(json.dumps({k: r[k] for k in ("encoder", "synthetic_cosine", "real_centred_cosine", "top1")}), flush=True)
    syn_c = [r["synthetic_cosine"] for r in rows]
    res = {"note": "exploratory, after the fact; not the pre-registered correlation", "n_encoders": len(rows),
           "rows": rows,
           "spearman": {"synthetic vs real_centred_cosine": study.spearman_with_ci(syn_c, [r["real_centred_cosine"] for r in rows]),
                        "synthetic vs top1": study.spearman_with_ci(syn_c, [r["top1"] for r in rows])},
           "per_family_vs_real_centred_cosine": {
               fam: study.spearman_with_ci([r["per_family"][fam] for r in rows], [r["real_centred_cosine"] for r in rows])
               for fam in rows[0]["per_family"]},
           "wall_s": time.time() - t0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))

    def fmt(v):
        return f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"

    lines = ["# Synthetic vs real robustness over the 12 shippable encoders (exploratory, after the fact)", "",
             "Held-out MITOS slide 05; synthetic = mean centred cosine over the synthetic shifts at severities 3-5.", "",
             "| encoder | synthetic cosine | real centred cosine | top-1 (20 pairs) |", "|---|---|---|---|"]
    lines += [f"| {r['encoder']} | {r['synthetic_cosine']:.3f} | {r['real_centred_cosine']:.3f} | {r['top1']:.2f} |"
              for r in rows]
    lines += ["", "| Spearman ρ [bootstrap 95 % CI] | value |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in res["spearman"].items()]
    lines += [f"| {fam} family vs real centred cosine | {fmt(v)} |" for fam, v in res["per_family_vs_real_centred_cosine"].items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
