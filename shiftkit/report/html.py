"""The robustness report: one self-contained HTML file (plots and thumbnails embedded) plus a Markdown summary.

It reads only ``records.json``, ``run.json`` and the gallery thumbnails of a run directory, so it can be rebuilt
without the model (``shiftkit report RUN_DIR``). Every user-supplied string is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

SECTIONS = ("protocol", "scorecard", "severity-curves", "heatmap", "corruption-error", "real-shift", "gallery", "appendix")


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
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}th{background:#f3f3f3}.bad{color:#b00}"
             "img{max-width:100%}</style></head><body>",
             f"<h1>Robustness report: {e(main_model)}</h1>"]

    # protocol card
    mi = run.get("model_info", {})
    rows = [("model", main_model), ("architecture", mi.get("architecture", "")), ("weights", mi.get("weights", "")),
            ("weights SHA-256", mi.get("weights_sha256", "")), ("data", run["config"]["data"]), ("tiles", run["n_tiles"]),
            ("shifts × severities", f"{len(shifts)} × {len(sevs)}"), ("seed", run["config"]["seed"]),
            ("versions", json.dumps(run["versions"])), ("hardware", json.dumps(run["hardware"])),
            ("runtime", f"{run['runtime_s']:.0f} s"), ("failed inputs", len(run.get("failed_inputs", [])))]
    parts.append("<h2 id='protocol'>Protocol</h2><table>" + "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in rows) + "</table>")
    if "untrained" in str(mi.get("weights", "")):
        parts.append("<p><b>Note:</b> this is the untrained reference encoder (<code>--model random</code>); its figures "
                     "describe a random network.</p>")
    elif main_model == "default":
        parts.append("<p><b>Note:</b> this is shiftkit's bundled default encoder, a small ResNet-10t pretrained with DINO on "
                     "the 18 bundled tiles of one slide; it demonstrates the protocol, it is not a pathology foundation "
                     "model.</p>")

    # scorecard
    clean = {r["metric"]: r["value"] for r in main if r["shift"] == "none"}
    head = "".join(f"<th>S{s} cosine [95% CI]</th>" for s in sevs)
    body = []
    for s in shifts:
        cells = "".join(f"<td>{_fmt(cos[s][v]['value'])} [{_fmt(cos[s][v]['ci_low'], 2)}, {_fmt(cos[s][v]['ci_high'], 2)}]</td>"
                        if v in cos[s] else "<td>–</td>" for v in sevs)
        ret = [r["value"] for r in main if r["shift"] == s and r["metric"] == "knn_retention" and r["value"] is not None]
        pret = [r["value"] for r in main if r["shift"] == s and r["metric"] == "probe_retention" and r["value"] is not None]
        body.append(f"<tr><td>{e(s)}</td><td>{e(fam[s])}</td>{cells}<td>{_fmt(float(np.mean(ret)) if ret else None)}</td>"
                    f"<td>{_fmt(float(np.mean(pret)) if pret else None)}</td></tr>")
    parts.append("<h2 id='scorecard'>Scorecard</h2>"
                 f"<p>Embedding consistency cos(f(x) − μ, f(T x) − μ) (μ: mean clean embedding) per shift and severity (↑), bootstrap 95 % CI; mean kNN "
                 f"and linear-probe retention over severities (↑). Clean balanced accuracy: kNN {_fmt(clean.get('knn_ba'))}, "
                 f"probe {_fmt(clean.get('probe_ba'))}; clean probe ECE {_fmt(clean.get('ece'))}.</p>"
                 f"<table><tr><th>shift</th><th>family</th>{head}<th>mean kNN retention</th><th>mean probe retention</th></tr>{''.join(body)}</table>")
    if errors:
        parts.append("<p class='bad'>Failed: " + "; ".join(e(f"{r['shift']} S{r['severity']}: {r['error']}") for r in errors) + "</p>")

    # severity-response curves per family
    fams = sorted(set(fam.values()))
    if shifts:
        fig, axes = plt.subplots(1, len(fams), figsize=(3.2 * len(fams), 3), squeeze=False, sharey=True)
        for ax, f in zip(axes[0], fams):
            for s in [s for s in shifts if fam[s] == f]:
                xs = sorted(cos[s])
                ys = [cos[s][v]["value"] for v in xs]
                lo = [cos[s][v]["ci_low"] for v in xs]
                hi = [cos[s][v]["ci_high"] for v in xs]
                ax.plot(xs, ys, marker="o", label=s)
                ax.fill_between(xs, lo, hi, alpha=0.15)
            ax.set_title(f)
            ax.set_xlabel("severity")
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("cosine to clean")
        parts.append(f"<h2 id='severity-curves'>Severity-response curves</h2><img alt='severity curves' src='{_png(fig)}'>")

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
        parts.append("<p>No reference model was given (<code>--reference-model</code>) or no labels: CE not computed.</p>")

    # real shift
    real = [r for r in main if r["family"] == "real" or r["metric"] in ("site_auc", "robustness_index")]
    parts.append("<h2 id='real-shift'>Real shift</h2>")
    if real:
        parts.append("<table><tr><th>comparison</th><th>metric</th><th>value</th><th>95% CI</th><th>n</th></tr>" + "".join(
            f"<tr><td>{e(r['shift'])}</td><td>{e(r['metric'])}</td><td>{_fmt(r['value'])}</td><td>[{_fmt(r['ci_low'], 2)}, {_fmt(r['ci_high'], 2)}]</td><td>{r['n']}</td></tr>"
            for r in real) + "</table>")
    else:
        parts.append("<p>No site labels or paired conditions in the data.</p>")

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
    md = [f"# Robustness report: {_md(main_model)}", "", f"Tiles: {run['n_tiles']}; shifts: {len(shifts)}; severities: {sevs}; "
          f"seed {run['config']['seed']}.", "", "| shift | family | " + " | ".join(f"S{v}" for v in sevs) + " |",
          "|---|---|" + "---|" * len(sevs)]
    for s in shifts:
        md.append(f"| {_md(s)} | {_md(fam[s])} | " + " | ".join(_fmt(cos[s].get(v, {}).get("value")) for v in sevs) + " |")
    if clean.get("knn_ba") is not None:
        md += ["", f"Clean kNN balanced accuracy: {clean['knn_ba']:.3f}."]
    (run_dir / "summary.md").write_text("\n".join(md) + "\n")
    return out
