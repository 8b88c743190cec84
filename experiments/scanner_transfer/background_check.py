#!/usr/bin/env python3
"""Light background through a fitted colour map: tissue-only fits against fits that also see the light blocks.

    python experiments/scanner_transfer/background_check.py     # ~1 min on this project's 2-core CPU

ScannerTransfer's colour map is fitted, like the metric judges, on tissue: 8x8 blocks whose destination L* < 85
(``fit_region="destination"``, the default, named here; tissue in either scan is measured in fit_region.py).
Light blocks (glass, lumen, light gaps) are left out, so the map extrapolates there. This scores, leave one slide
out on the MITOS dev pairs, the colour part fitted with ``background_weight`` 0 (default), 0.25 and 1 (the weight
of the non-tissue blocks against 1 for tissue): the mean CIEDE2000 over tissue (shared/eval/score_pairs.py) and over
the blocks that are light in both scans (L* > 85 in both: glass and light gaps, where the twin is light too), each
against the unchanged source. Writes results/background_check.md and .json.

Also (not in the library; measured to decide whether to build it): a **white-point blend** after the default
tissue-only map. The scanners' glass colours are measured on the training pairs (medians of the blocks light in both
scans, source and destination) and, where the source is light, the output is blended from the map towards the source
times their per-channel ratio (a von Kries gain in encoded sRGB, exact for a power-law companding). The blend weight
rises linearly in the source's L* from a start to the source's glass L*: per pixel from L* 85, or per 8x8 block
mean (bilinearly upsampled) from L* 85 or from L* 88.
"""
import sys
from pathlib import Path

import cv2
import numpy as np
from skimage.color import deltaE_ciede2000, rgb2lab

from shiftkit import ScannerTransfer
from shiftkit.functional.transfer import block_means

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (loaders, scorer, bootstrap)

WEIGHTS = (0.0, 0.25, 1.0)
BLENDS = (("pixel", 85.0), ("block", 85.0), ("block", 88.0))  # (where the lightness is read, the ramp's start L*)


def glass_colours(src, dst):
    """The two scanners' glass: per-channel medians (sRGB in [0, 1]) of the 8x8 blocks light (L* > 85) in both scans."""
    s, d = (np.concatenate([block_means(x).reshape(-1, 3) for x in v]) for v in (src, dst))
    light = (rgb2lab(s)[:, 0] > 85) & (rgb2lab(d)[:, 0] > 85)
    return np.median(s[light], 0), np.median(d[light], 0), int(light.sum())


def white_blend(mapped, source, glass, where, start):
    """``mapped`` (uint8) blended towards ``source`` x the glass ratio where ``source`` is light (see the docstring)."""
    ws, wd, _ = glass
    x = source.astype(np.float64) / 255.0
    if where == "pixel":
        lum = rgb2lab(x)[..., 0]
    else:
        h, w = x.shape[:2]
        lum = cv2.resize(rgb2lab(block_means(source))[..., 0], (w, h), interpolation=cv2.INTER_LINEAR)
    end = float(rgb2lab(ws[None, None])[0, 0, 0])
    t = np.clip((lum - start) / max(end - start, 1e-6), 0.0, 1.0)[..., None]
    out = (1.0 - t) * mapped / 255.0 + t * np.clip(x * (wd / ws), 0.0, 1.0)
    return np.round(out * 255.0).astype(np.uint8)


def light_delta_e(image, twin, source):
    """Mean CIEDE2000 of 8x8 block means over the blocks light (L* > 85) in both the source and the twin."""
    b, t, s = (block_means(v) for v in (image, twin, source))
    light = (rgb2lab(s)[..., 0] > 85) & (rgb2lab(t)[..., 0] > 85)
    return float(deltaE_ciede2000(rgb2lab(b), rgb2lab(t))[light].mean()) if light.any() else None


def main():
    scorer = run.load_scorer(run.SHARED / "eval" / "score_pairs.py")
    data, lines = {}, ["# Light background through the colour map", "",
                       "Leave one slide out, MITOS dev pairs, colour part only. Tissue: mean CIEDE2000 of the scorer "
                       "(paired difference to background_weight 0 with bootstrap 95 % CI). Light: mean CIEDE2000 "
                       "over the blocks light in both scans (crops that have any). White-point blend rows (measured, not in the "
                       "library): the weight-0 output blended towards the source times the training pairs' glass "
                       "ratio (medians of blocks light in both scans), linearly in the source's L* from the start "
                       "named (per pixel or per 8x8 block mean) to the source glass's L*.", ""]
    for direction in ("a2h", "h2a"):
        src, dst, slides = run.load_pairs(run.SHARED / "data" / "mitos_scanner_pairs_dev", direction)
        rows = {"unchanged": {"tissue": [scorer.tissue_delta_e(x, y) for x, y in zip(src, dst)],
                              "light": [light_delta_e(x, y, x) for x, y in zip(src, dst)], "maps": []}}
        blends = {f"weight 0 + white-point blend, {w} L* {a:g} to glass": (w, a) for w, a in BLENDS}
        for name in blends:
            rows[name] = {"tissue": [None] * len(src), "light": [None] * len(src), "maps": [], "glass": []}
        for bw in WEIGHTS:
            rec = {"tissue": [None] * len(src), "light": [None] * len(src), "maps": []}
            for s in sorted(set(slides)):
                tr, te = slides != s, np.where(slides == s)[0]
                t = ScannerTransfer.fit(src[tr], dst[tr], slides=slides[tr], parts=("colour",), background_weight=bw,
                                        fit_region="destination")
                rec["maps"].append(t.profile["fit"]["colour"]["chosen"])
                outs = t.augment(src[te])
                for i, o in zip(te, outs):
                    rec["tissue"][i] = scorer.tissue_delta_e(o, dst[i])
                    rec["light"][i] = light_delta_e(o, dst[i], src[i])
                if bw == 0:
                    glass = glass_colours(src[tr], dst[tr])
                    for name, (where, start) in blends.items():
                        rows[name]["maps"].append(rec["maps"][-1])
                        rows[name]["glass"].append({"held_out": str(s), "source": (glass[0] * 255).tolist(),
                                                    "destination": (glass[1] * 255).tolist(), "blocks": glass[2]})
                        for i, o in zip(te, outs):
                            b = white_blend(o, src[i], glass, where, start)
                            rows[name]["tissue"][i] = scorer.tissue_delta_e(b, dst[i])
                            rows[name]["light"][i] = light_delta_e(b, dst[i], src[i])
            rows[f"background_weight {bw:g}"] = rec
        rows = {k: rows[k] for k in ["unchanged"] + [f"background_weight {bw:g}" for bw in WEIGHTS] + list(blends)}
        base = np.array(rows["background_weight 0"]["tissue"])
        lines += [f"## {direction}", "", "| colour fit | tissue ΔE2000 | Δ vs weight 0 [95 % CI] | light ΔE2000 | maps (per held-out slide) |",
                  "|---|---|---|---|---|"]
        for name, rec in rows.items():
            light = [v for v in rec["light"] if v is not None]
            d = run.bootstrap_diff(np.array(rec["tissue"]), base)
            rec["summary"] = {"tissue": float(np.mean(rec["tissue"])), "tissue_vs_weight0": list(d),
                              "light": float(np.mean(light)), "light_crops": len(light)}
            lines.append(f"| {name} | {np.mean(rec['tissue']):.2f} | {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] | "
                         f"{np.mean(light):.2f} ({len(light)} crops) | {', '.join(rec['maps'])} |")
        lines.append("")
        data[direction] = rows
    run.save_results("background_check", data, lines)


if __name__ == "__main__":
    main()
