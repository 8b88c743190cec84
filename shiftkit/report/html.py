"""The robustness report: one self-contained HTML file (plots and thumbnails embedded) plus a Markdown summary.

It reads only ``records.json``, ``run.json`` and the gallery thumbnails of a run directory, so it can be rebuilt
without the model (``shiftkit report RUN_DIR``). Every user-supplied string is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

#: What the synthetic stress test is known to predict about real scanner shift (issue #16's study,
#: ``experiments/shift_pretraining``; tests/test_stress.py keeps it equal to the committed results.json). Every
#: report cites it, so a reader does not silently assume that synthetic robustness means real robustness.
STUDY_SYNTHETIC_VS_REAL = {
    "rho": -0.611, "ci": (-0.866, -0.104), "n_encoders": 15,
    "encoders": "ResNet-10t, DINO, 150 steps, 5 augmentation arms x 3 seeds",
    "real": "centred cosine between held-out Aperio XT crops and their Hamamatsu 2.0-HT twins (MITOS slide 05)",
    "source": "experiments/shift_pretraining/results/results.md",
}
#: The exploratory check made afterwards (not pre-registered) over 12 encoders whose real robustness differs widely.
STUDY_SYNTHETIC_VS_REAL_EXPLORATORY = {
    "rho": 0.510, "ci": (-0.146, 0.920), "n_encoders": 12,
    "families": {"isp": 0.895, "stain": 0.867, "sensor": 0.825, "tissue": -0.664, "storage": -0.552},
    "source": "experiments/shift_pretraining/results/synthetic_vs_real_more/results.md",
}


def study_citation() -> str:
    """One sentence: the study's rank correlation between synthetic and real robustness, with its interval."""
    s, x = STUDY_SYNTHETIC_VS_REAL, STUDY_SYNTHETIC_VS_REAL_EXPLORATORY
    tracked = ", ".join(f"{x['families'][f]:.2f}" for f in ("isp", "stain", "sensor"))
    verdict = ("did not predict real scanner robustness (it ranked them the other way)" if s["ci"][1] < 0
               else "predicted real scanner robustness" if s["ci"][0] > 0 else "was not shown to predict real scanner robustness")
    return (f"In shiftkit's study ({s['source']}), across {s['n_encoders']} encoders ({s['encoders']}), the mean cosine "
            f"under the synthetic shifts at severities 3–5 {verdict}: Spearman ρ = {s['rho']:.2f} "
            f"[{s['ci'][0]:.2f}, {s['ci'][1]:.2f}] with the {s['real']}. An exploratory check made afterwards over "
            f"{x['n_encoders']} encoders whose real robustness differs widely ({x['source']}) found ρ = {x['rho']:.2f} "
            f"[{x['ci'][0]:.2f}, {x['ci'][1]:.2f}]; there the isp, stain and sensor families tracked the real change "
            f"({tracked}) and the tissue and storage families ran against it. Read the synthetic scores as robustness to these simulated "
            "shifts; where the data has registered twins, the real-shift section measures the real one.")


SECTIONS = ("headline", "protocol", "scorecard", "severity-curves", "heatmap", "corruption-error", "real-shift", "gallery", "appendix")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img_file(run_dir: Path, name: str) -> str:
    """A gallery thumbnail as a PNG data URI, or '' unless ``name`` is a file inside ``run_dir/gallery`` that
    decodes as an image (what is embedded is the decoded pixels, re-encoded; never the file's bytes)."""
    import cv2

    folder = (run_dir / "gallery").resolve()
    path = (folder / str(name)).resolve()
    if folder not in path.parents or not path.is_file():
        return ""
    img = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return ""
    ok, buf = cv2.imencode(".png", img)
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode() if ok else ""


_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]{}()#+!|<>"})


def _md(text) -> str:
    """``text`` safe in Markdown: HTML and Markdown syntax characters escaped, one line."""
    return html.escape(" ".join(str(text).split()), quote=False).translate(_MD_SPECIAL)


def _fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def _fmt_ci(r: dict, digits: int = 3) -> str:
    """``value [low, high]`` with the interval printed at the value's precision."""
    if r.get("ci_low") is None or r.get("ci_high") is None:
        return _fmt(r.get("value"), digits)
    return f"{_fmt(r['value'], digits)} [{_fmt(r['ci_low'], digits)}, {_fmt(r['ci_high'], digits)}]"


METRIC_WORDS = ("embedding consistency: the cosine similarity between each tile's embedding and the embedding of its "
                "shifted copy (both centred on the mean clean embedding), averaged over tiles; 1 = the encoder does not "
                "see the shift, lower = the shift moves its representation more")


def _encoder_caveat(model: str, info: dict) -> str:
    if "untrained" in str(info.get("weights", "")):
        return "the untrained reference network (--model random): its figures describe a random network, not a trained model"
    if model == "default":
        return ("shiftkit's bundled default, a small ResNet-10t pretrained with DINO for 600 CPU steps on 486 tiles "
                "(Camelyon17 and permissively licensed example images); it embeds a 4 x 4 grid of its last feature map "
                "after standardizing each image's channels by their own mean and std, so a global colour cast is removed "
                "before the network sees it: it demonstrates the protocol, it is not a pathology foundation model")
    return ""


def severity_to_match_real(records: list, model: str) -> list:
    """Per family, the synthetic severity whose mean cosine equals the run's real paired shift (the first real pair
    comparison): linear interpolation between severities; ``None`` with ``beyond`` when even the highest severity
    moves embeddings less than the real change. Empty without real pairs."""
    main = [r for r in records if r["model"] == model]
    real = [r for r in main if r["metric"] == "paired_cosine" and r["value"] is not None]
    if not real:
        return []
    target = real[0]["value"]
    by = defaultdict(lambda: defaultdict(list))
    for r in main:
        if r["metric"] == "cosine" and r["value"] is not None and r["family"] not in ("real", "none"):
            by[r["family"]][r["severity"]].append(r["value"])
    out = []
    for fam, d in sorted(by.items()):
        sevs = sorted(d)
        curve = [(sv, float(np.mean(d[sv]))) for sv in sevs]
        match, prev = None, (0, 1.0)  # severity 0 = the clean tile, cosine 1
        for sv, c in curve:
            if c <= target:
                s0, c0 = prev
                match = s0 + (sv - s0) * (c0 - target) / (c0 - c) if c0 != c else sv
                break
            prev = (sv, c)
        out.append({"family": fam, "severity": None if match is None else round(float(match), 2),
                    "beyond": match is None, "cosine_at_max": curve[-1][1], "max_severity": curve[-1][0],
                    "real_comparison": real[0]["shift"], "real_cosine": target})
    return out


def real_shift_facts(records: list, model: str):
    """What the run measured of real shift for ``model``, in a few numbers (``None`` when nothing): the registered
    twins' centred paired cosine over the real comparisons (median, range), how often the twin ranks first (mean over
    comparisons) and the site predictability AUC."""
    main = [r for r in records if r["model"] == model and r["value"] is not None]
    cos = [r["value"] for r in main if r["metric"] == "paired_cosine"]
    top1 = [r["value"] for r in main if r["metric"] == "paired_top1"]
    chance = [1.0 / r["n"] for r in main if r["metric"] == "paired_top1" and r.get("n")]
    auc = [r["value"] for r in main if r["metric"] == "site_auc"]
    if not (cos or auc):
        return None
    return {"n_comparisons": len(cos),
            "paired_cosine_median": float(np.median(cos)) if cos else None,
            "paired_cosine_range": [float(min(cos)), float(max(cos))] if cos else None,
            "paired_top1_mean": float(np.mean(top1)) if top1 else None,
            "paired_top1_chance": float(np.mean(chance)) if chance else None,
            "site_auc": float(auc[0]) if auc else None}


def _matched_severity(m: dict) -> str:
    """A family's severity matching the real shift, or '> max' when even the highest falls short (plain text)."""
    return f"> {m['max_severity']}" if m["beyond"] else str(m["severity"])


def _real_text(h: dict) -> str:
    """The headline's real-shift sentence (plain text; the caller escapes it)."""
    rs = h.get("real_shift")
    if not rs:
        return ""
    parts = []
    if rs["paired_cosine_median"] is not None:
        lo, hi = rs["paired_cosine_range"]
        parts.append(f"across {rs['n_comparisons']} comparison{'s' if rs['n_comparisons'] != 1 else ''} of registered "
                     f"twins, centred paired cosine median {rs['paired_cosine_median']:.3f} (range {lo:.3f}–{hi:.3f})")
    if rs["paired_top1_mean"] is not None:
        chance = f" (chance {rs['paired_top1_chance']:.0%})" if rs.get("paired_top1_chance") else ""
        parts.append(f"the twin ranks first for {rs['paired_top1_mean']:.0%} of queries{chance}")
    if rs["site_auc"] is not None:
        parts.append(f"site predictable at AUC {rs['site_auc']:.3f} (0.5 = not at all)")
    text = "; ".join(parts)
    match = h.get("severity_to_match_real") or []
    if match:
        text += ". Synthetic severity that moves embeddings as far as the first comparison: " + ", ".join(
            f"{m['family']} {_matched_severity(m)}" for m in match)
    return text[:1].upper() + text[1:] + "."


def headline(run: dict, records: list) -> dict:
    """The report's opening facts, from the records alone: what was measured, the encoder and its caveat, the most
    affected families and shifts (with their numbers), retention, and what was not measured and why."""
    model = run["config"]["model"]
    main = [r for r in records if r["model"] == model]
    cos = defaultdict(dict)
    fam = {}
    for r in main:
        if r["metric"] == "cosine" and r["value"] is not None:
            cos[r["shift"]][r["severity"]] = r
            fam[r["shift"]] = r["family"]
    sevs = sorted({v for d in cos.values() for v in d})
    high = [v for v in sevs if v >= 3] or sevs
    fam_vals = defaultdict(list)
    for sh, d in cos.items():
        fam_vals[fam[sh]] += [d[v]["value"] for v in high if v in d]
    families = sorted(({"family": f, "mean_cosine": float(np.mean(v)), "n_cells": len(v)} for f, v in fam_vals.items() if v),
                      key=lambda d: d["mean_cosine"])
    top = max(sevs) if sevs else None
    worst = sorted(({"shift": sh, "family": fam[sh], "severity": top, "cosine": d[top]["value"], "ci_low": d[top]["ci_low"],
                     "ci_high": d[top]["ci_high"]} for sh, d in cos.items() if top in d), key=lambda d: d["cosine"])
    clean = {r["metric"]: r["value"] for r in main if r["shift"] == "none"}
    ret = defaultdict(list)
    for r in main:
        if r["metric"] == "knn_retention" and r["value"] is not None:
            ret[r["shift"]].append(r["value"])
    retention = sorted(({"shift": sh, "mean_knn_retention": float(np.mean(v))} for sh, v in ret.items()),
                       key=lambda d: d["mean_knn_retention"])
    not_measured = []
    if not any(r["family"] == "real" or r["metric"] in ("site_auc", "robustness_index") for r in main):
        not_measured.append("real scanner or site shift: the data has no registered twins (manifest columns `pair_id` + "
                            "`condition`) and no `site` column; add them to a `--data` manifest to measure it")
    if not any(r["metric"] == "ce" for r in main):
        why = ("no reference encoder (--no-reference)" if not run["config"].get("reference_model")
               else "no class labels in the data (a `label` column)")
        not_measured.append(f"corruption error: {why}")
    if clean.get("knn_ba") is None:
        not_measured.append("task retention (kNN and probe accuracy under shift): no class labels (a `label` column)")
    failed = sorted({f"{r['shift']} S{r['severity']}" for r in main if r["error"]})
    if failed:
        not_measured.append(f"{len(failed)} shift × severity cells failed: {', '.join(failed[:6])}" + (" …" if len(failed) > 6 else ""))
    info = run.get("model_info", {})
    return {"metric": METRIC_WORDS, "model": model, "architecture": info.get("architecture", ""),
            "weights": info.get("weights", ""), "caveat": _encoder_caveat(model, info), "n_tiles": run["n_tiles"], "n_shifts": len(cos), "severities": sevs,
            "worst_families": families[:3], "worst_shifts": worst[:3], "clean_knn_balanced_accuracy": clean.get("knn_ba"),
            "worst_retention": retention[:3], "severity_to_match_real": severity_to_match_real(records, model),
            "real_shift": real_shift_facts(records, model),
            "not_measured": not_measured, "synthetic_vs_real": {**STUDY_SYNTHETIC_VS_REAL, "text": study_citation()}}


def _code(escaped: str) -> str:
    """Backtick spans of already-escaped text as ``<code>``."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _headline_html(h: dict, e) -> str:
    fams = "; ".join(f"<b>{e(f['family'])}</b> {f['mean_cosine']:.3f}" for f in h["worst_families"]) or "–"
    worst = "; ".join(f"<b>{e(w['shift'])}</b> ({e(w['family'])}) {_fmt_ci({'value': w['cosine'], 'ci_low': w['ci_low'], 'ci_high': w['ci_high']})}"
                      for w in h["worst_shifts"]) or "–"
    sev_top = h["worst_shifts"][0]["severity"] if h["worst_shifts"] else "–"
    enc = e(h["model"]) + (f", {e(h['architecture'])}" if h["architecture"] else "") \
        + (f"; weights {e(h['weights'])}" if h.get("weights") else "")
    items = [
        f"<li id='headline-metric'><b>Measured:</b> {e(h['metric'])}. {h['n_tiles']} tiles, {h['n_shifts']} shifts, "
        f"severities {', '.join(map(str, h['severities']))}.</li>",
        f"<li id='headline-encoder'><b>Encoder:</b> {enc}" + (f" — {e(h['caveat'])}." if h["caveat"] else ".") + "</li>",
        f"<li id='headline-families'><b>Most affected families</b> (mean cosine at severities 3–5): {fams}.</li>",
        f"<li id='headline-shifts'><b>Worst shifts</b> at severity {sev_top} (cosine, 95 % CI): {worst}.</li>",
    ]
    if h["clean_knn_balanced_accuracy"] is not None and h["worst_retention"]:
        r = h["worst_retention"][0]
        items.append(f"<li id='headline-retention'><b>Task:</b> clean kNN balanced accuracy {h['clean_knn_balanced_accuracy']:.3f}; "
                     f"lowest mean retention under <b>{e(r['shift'])}</b> ({r['mean_knn_retention']:.3f} of clean).</li>")
    real_text = _real_text(h)
    if real_text:
        items.append(f"<li id='headline-real'><b>Real shift:</b> {e(real_text)}</li>")
    items.append(f"<li id='headline-validity'><b>Synthetic vs real:</b> {e(h['synthetic_vs_real']['text'])}</li>")
    nm = "".join(f"<li>{_code(e(x))}</li>" for x in h["not_measured"]) or "<li>nothing left out</li>"
    items.append(f"<li id='headline-not-measured'><b>Not measured:</b><ul>{nm}</ul></li>")
    return "<section id='headline' class='headline'><h2>In short</h2><ul>" + "".join(items) + "</ul></section>"


def _headline_md(h: dict) -> list:
    fams = "; ".join(f"{_md(f['family'])} {f['mean_cosine']:.3f}" for f in h["worst_families"]) or "–"
    worst = "; ".join(f"{_md(w['shift'])} {_fmt_ci({'value': w['cosine'], 'ci_low': w['ci_low'], 'ci_high': w['ci_high']})}"
                      for w in h["worst_shifts"]) or "–"
    out = [f"**Measured.** {_md(h['metric'])}. {h['n_tiles']} tiles, {h['n_shifts']} shifts, severities "
           f"{', '.join(map(str, h['severities']))}.", "",
           f"**Encoder.** {_md(h['model'])}" + (f" ({_md(h['architecture'])})" if h["architecture"] else "")
           + (f"; weights {_md(h['weights'])}" if h.get("weights") else "")
           + (f": {_md(h['caveat'])}." if h["caveat"] else "."), "",
           f"**Most affected families** (mean cosine at severities 3–5): {fams}.", "",
           f"**Worst shifts** at the highest severity (cosine, 95 % CI): {worst}.", ""]
    if h["clean_knn_balanced_accuracy"] is not None and h["worst_retention"]:
        r = h["worst_retention"][0]
        out += [f"**Task.** Clean kNN balanced accuracy {h['clean_knn_balanced_accuracy']:.3f}; lowest mean retention under "
                f"{_md(r['shift'])} ({r['mean_knn_retention']:.3f} of clean).", ""]
    real_text = _real_text(h)
    if real_text:
        out += [f"**Real shift.** {_md(real_text)}", ""]
    out += [f"**Synthetic vs real.** {_md(h['synthetic_vs_real']['text'])}", ""]
    out += ["**Not measured.** " + ("; ".join(_md(x) for x in h["not_measured"]) or "nothing left out") + ".", ""]
    return out


def build_report(run_dir) -> Path:
    """Write ``report.html`` and ``summary.md`` in ``run_dir`` from its records; return the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = json.loads((run_dir / "records.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    e = html.escape
    model = run["config"]["model"]
    main_model = model  # the evaluated encoder (a reference model's records are kept apart)
    main = [r for r in records if r["model"] == main_model]
    cos = defaultdict(dict)
    fam = {}
    errors = []
    for r in main:
        if r["error"]:
            errors.append(r)
        if r["metric"] == "cosine" and r["value"] is not None:
            cos[r["shift"]][r["severity"]] = r
            fam[r["shift"]] = r["family"]
    sevs = sorted({s for d in cos.values() for s in d})
    shifts = sorted(cos, key=lambda s: (fam[s], s))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>shiftkit robustness report — {e(main_model)}</title>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>"
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}"
             "table{border-collapse:collapse}.scroll{overflow-x:auto}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}th{background:#f3f3f3;text-align:left}.bad{color:#b00}"
             ".headline{background:#f6f8fa;border-left:4px solid #36c;padding:.4em 1em;margin:1em 0}"
             ".headline li{margin:.3em 0}img{max-width:100%}</style></head><body>",
             f"<h1>Robustness report: {e(main_model)}</h1>"]
    head_facts = headline(run, records)
    (run_dir / "headline.json").write_text(json.dumps(head_facts, indent=2))
    parts.append(_headline_html(head_facts, e))

    # protocol card
    mi = run.get("model_info", {})
    rows = [("model", main_model), ("architecture", mi.get("architecture", "")), ("weights", mi.get("weights", "")),
            ("weights SHA-256", mi.get("weights_sha256", "")), ("data", run["config"]["data"]), ("tiles", run["n_tiles"]),
            ("shifts × severities", f"{len(shifts)} × {len(sevs)}"), ("seed", run["config"]["seed"]),
            ("versions", " · ".join(f"{k} {v}" for k, v in run["versions"].items())),
            ("hardware", f"{run['hardware'].get('cpu') or 'CPU'}, {run['hardware'].get('cores')} cores"
                         + (f"; GPU {run['hardware']['gpu']}" if run["hardware"].get("gpu") else "; no GPU used")),
            ("reference encoder (corruption error)", run["config"].get("reference_model") or "none"),
            ("runtime", f"{run['runtime_s']:.0f} s"), ("failed inputs", len(run.get("failed_inputs", [])))]
    parts.append("<h2 id='protocol'>Protocol</h2><div class='scroll'><table>"
                 + "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in rows) + "</table></div>")

    # scorecard
    clean = {r["metric"]: r["value"] for r in main if r["shift"] == "none"}
    head = "".join(f"<th>S{s} cosine [95% CI]</th>" for s in sevs)
    body = []
    for s in shifts:
        cells = "".join(f"<td>{_fmt_ci(cos[s][v])}</td>" if v in cos[s] else "<td>–</td>" for v in sevs)
        ret = [r["value"] for r in main if r["shift"] == s and r["metric"] == "knn_retention" and r["value"] is not None]
        pret = [r["value"] for r in main if r["shift"] == s and r["metric"] == "probe_retention" and r["value"] is not None]
        body.append(f"<tr><td>{e(s)}</td><td>{e(fam[s])}</td>{cells}<td>{_fmt(float(np.mean(ret)) if ret else None)}</td>"
                    f"<td>{_fmt(float(np.mean(pret)) if pret else None)}</td></tr>")
    parts.append("<h2 id='scorecard'>Scorecard</h2>"
                 f"<p>Embedding consistency cos(f(x) − μ, f(T x) − μ) (μ: mean clean embedding) per shift and severity (↑), bootstrap 95 % CI; mean kNN "
                 f"and linear-probe retention over severities (↑). Clean balanced accuracy: kNN {_fmt(clean.get('knn_ba'))}, "
                 f"probe {_fmt(clean.get('probe_ba'))}; clean probe ECE {_fmt(clean.get('ece'))}.</p>"
                 f"<div class='scroll'><table><tr><th>shift</th><th>family</th>{head}<th>mean kNN retention</th><th>mean probe retention</th></tr>{''.join(body)}</table></div>")
    if errors:
        parts.append("<p class='bad'>Failed: " + "; ".join(e(f"{r['shift']} S{r['severity']}: {r['error']}") for r in errors) + "</p>")

    # severity-response curves per family
    fams = sorted(set(fam.values()))
    if shifts:
        ncols = min(4, len(fams))
        nrows = -(-len(fams) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 3.0 * nrows), squeeze=False, sharey=True)
        for ax in axes.flat[len(fams):]:
            ax.axis("off")
        for ax, f in zip(axes.flat, fams):
            for s in [s for s in shifts if fam[s] == f]:
                xs = sorted(cos[s])
                ys = [cos[s][v]["value"] for v in xs]
                lo = [cos[s][v]["ci_low"] for v in xs]
                hi = [cos[s][v]["ci_high"] for v in xs]
                ax.plot(xs, ys, marker="o", label=s)
                ax.fill_between(xs, lo, hi, alpha=0.15)
            ax.set_title(f, fontsize=12)
            ax.set_xlabel("severity", fontsize=10)
            ax.set_xticks(sevs)
            ax.tick_params(labelsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower left")
        for row in axes:
            row[0].set_ylabel("cosine to clean", fontsize=10)
        fig.tight_layout()
        parts.append("<h2 id='severity-curves'>Severity-response curves</h2><p>One panel per family: cosine to the clean "
                     f"embedding (↑) against severity, with the 95 % bootstrap band.</p><img alt='severity curves' src='{_png(fig)}'>")

        # heatmap
        mat = np.array([[cos[s].get(v, {}).get("value", np.nan) for v in sevs] for s in shifts])
        fig, ax = plt.subplots(figsize=(1.2 * len(sevs) + 3, 0.28 * len(shifts) + 1))
        im = ax.imshow(mat, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(shifts)), shifts, fontsize=7)
        ax.set_xticks(range(len(sevs)), [f"S{v}" for v in sevs])
        fig.colorbar(im, ax=ax, label="cosine")
        parts.append(f"<h2 id='heatmap'>Shift × severity</h2><img alt='heatmap' src='{_png(fig)}'>")

    # corruption error
    ce = [r for r in main if r["metric"] == "ce" and r["value"] is not None]
    parts.append("<h2 id='corruption-error'>Corruption error</h2>")
    if ce:
        fig, ax = plt.subplots(figsize=(6, 0.25 * len(ce) + 1))
        ax.barh([r["shift"] for r in ce], [r["value"] for r in ce])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel(f"CE vs {run['config']['reference_model']} (↓)")
        parts.append(f"<img alt='corruption error' src='{_png(fig)}'><p>mCE = {np.mean([r['value'] for r in ce]):.3f}</p>")
    else:
        parts.append("<p>Not computed: " + ("the run had no reference encoder (<code>--no-reference</code>)."
                     if not run["config"].get("reference_model") else "the data has no class labels.") + "</p>")

    # real shift
    real = [r for r in main if r["family"] == "real" or r["metric"] in ("site_auc", "robustness_index")]
    parts.append("<h2 id='real-shift'>Real shift</h2>")
    if real:
        parts.append("<div class='scroll'><table><tr><th>comparison</th><th>metric</th><th>value [95% CI]</th><th>n</th></tr>" + "".join(
            f"<tr><td>{e(r['shift'])}</td><td>{e(r['metric'])}</td><td>{_fmt_ci(r)}</td><td>{r['n']}</td></tr>"
            for r in real) + "</table></div>")
        match = severity_to_match_real(records, main_model)
        if match:
            parts.append(f"<p>Synthetic severity each family needs to move embeddings as far as the real shift "
                         f"({e(match[0]['real_comparison'])}, centred cosine {match[0]['real_cosine']:.3f}); "
                         "interpolated between severities, &gt; when even the highest falls short:</p>"
                         "<div class='scroll'><table><tr><th>family</th><th>severity matching the real shift</th>"
                         "<th>cosine at the highest severity</th></tr>" + "".join(
                             f"<tr><td>{e(m['family'])}</td><td>{e(_matched_severity(m))}</td>"
                             f"<td>{m['cosine_at_max']:.3f}</td></tr>" for m in match) + "</table></div>")
    else:
        parts.append("<p>Not measured: the data has no registered twins and no site labels. Add <code>pair_id</code> and "
                     "<code>condition</code> columns (the same tissue under two scanners or stains) or a <code>site</code> "
                     "column to a <code>--data</code> manifest to measure real shift.</p>")

    # failure gallery
    parts.append("<h2 id='gallery'>Failure gallery</h2><p>Clean | shifted, at the highest severity, the tiles whose embeddings moved most.</p>")
    for g in sorted(run.get("gallery", []), key=lambda g: g["cosine"])[:12]:
        uri = _img_file(run_dir, g.get("file", ""))
        if uri:
            parts.append(f"<figure style='display:inline-block;margin:4px'><img alt='{e(g['shift'])}' style='width:260px' src='{uri}'>"
                         f"<figcaption>{e(g['shift'])} S{g['severity']} · {e(g['tile'])} · cos {g['cosine']:.3f}</figcaption></figure>")

    # appendix
    parts.append("<h2 id='appendix'>Reproducibility appendix</h2><pre>" + e(json.dumps(run["config"], indent=2)) + "</pre>"
                 "<p>Records: records.json / records.csv (model, shift, family, severity, metric, value, ci_low, ci_high, n, seed, error). "
                 "Rebuild this page with <code>shiftkit report RUN_DIR</code>.</p></body></html>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts))

    # markdown summary
    md = [f"# Robustness report: {_md(main_model)}", "", *_headline_md(head_facts),
          "## Embedding consistency per shift and severity", "",
          f"Each cell: the mean over {run['n_tiles']} tiles of the cosine similarity between a tile's clean and shifted "
          "embeddings (centred on the mean clean embedding); 1 = unchanged, lower = moved more; 95 % bootstrap CI in "
          f"brackets. Seed {run['config']['seed']}. Full records: records.csv; the HTML report has the plots.", "",
          "| shift | family | " + " | ".join(f"severity {v}" for v in sevs) + " |", "|---|---|" + "---|" * len(sevs)]
    for s in shifts:
        md.append(f"| {_md(s)} | {_md(fam[s])} | " + " | ".join(_fmt_ci(cos[s][v]) if v in cos[s] else "–" for v in sevs) + " |")
    if clean.get("knn_ba") is not None:
        md += ["", f"Clean kNN balanced accuracy: {clean['knn_ba']:.3f}."]
    if real:
        md += ["", "## Real shift", "", "| comparison | metric | value [95% CI] | n |", "|---|---|---|---|"]
        md += [f"| {_md(r['shift'])} | {_md(r['metric'])} | {_fmt_ci(r)} | {r['n']} |" for r in real]
        if match:
            md += ["", (f"Synthetic severity each family needs to move embeddings as far as the real shift "
                        f"({_md(match[0]['real_comparison'])}, centred cosine {match[0]['real_cosine']:.3f}); "
                        "interpolated between severities, > when even the highest falls short:"), "",
                   "| family | severity matching the real shift | cosine at the highest severity |", "|---|---|---|"]
            md += [f"| {_md(m['family'])} | {_matched_severity(m)} | "
                   f"{m['cosine_at_max']:.3f} |" for m in match]
    (run_dir / "summary.md").write_text("\n".join(md) + "\n")
    return out
