"""``shiftkit`` command line: thin click commands over the library.

Exit codes: 0 success, 1 some inputs failed (listed), 2 usage error; ``pretrain`` also 3 (the loss diverged; the
last checkpoint is kept) and 143 (stopped by SIGTERM after writing a checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import click

from shiftkit import __version__

from .progress import Progress, format_seconds


def input_options(command):
    """The options every command that reads image files shares: --max-pixels and --apply-icc."""
    command = click.option("--apply-icc", is_flag=True, help="Convert inputs with an embedded ICC colour profile to sRGB "
                           "first (the profile is recorded either way).")(command)
    return click.option("--max-pixels", default=None, type=click.IntRange(min=1),
                        help="Largest image accepted, in pixels (default 64,000,000 or SHIFTKIT_MAX_PIXELS); larger ones "
                             "fail alone.")(command)


def _device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter(f"expected an available device, got {device!r} but CUDA is not available", param_hint="--device")
    return device


def _load_target(target: str, method: str | None, on_failure: str, intensity: str = "pooled"):
    """A fitted StainNormalizer from an image, a folder of images or a saved JSON target."""
    from shiftkit import StainNormalizer
    from shiftkit.core.errors import ShiftkitError
    from shiftkit.data import list_images, read_image

    p = Path(target)
    if p.suffix.lower() == ".json":
        norm = StainNormalizer.load(p)
        if method is not None and method != norm.method:
            raise click.BadParameter(
                f"expected the method of the saved target ({norm.method!r}) or none, got {method!r}", param_hint="--method"
            )
        norm.on_failure = on_failure
        return norm
    files = list_images(p) if p.is_dir() else [p]
    if not files:
        raise click.BadParameter(f"expected an image, a folder of images or a .json target, got {target!r} with no images", param_hint="--target")
    try:
        images = [read_image(f) for f in files]
        return StainNormalizer(method or "macenko", on_failure=on_failure).fit(images, intensity=intensity)
    except ShiftkitError as exc:
        raise click.BadParameter(str(exc), param_hint="--target") from exc


class _TransferNormalizer:
    """``normalize --transfer``: a learned scanner transfer's colour and MTF parts at full strength (uint8 in and
    out; every tile "ok"), at each tile's µm/px."""

    method = "scanner-transfer"
    APPLIED = ("colour", "mtf")

    def __init__(self, ref: str, mpp, device: str):
        from shiftkit import ScannerTransfer
        from shiftkit.core.errors import ShiftkitError
        from shiftkit.shifts.transfer import PROFILES_DIR, bundled_profiles

        path = Path(ref)
        if not path.is_file() and ref in bundled_profiles():
            path = PROFILES_DIR / f"{ref}.json"
        if not path.is_file():
            raise click.BadParameter(f"expected a scanner-transfer JSON profile (from fit-scanner) or a bundled profile "
                                     f"name ({', '.join(bundled_profiles())}), got {ref!r}, which is neither",
                                     param_hint="--transfer")
        try:
            profile = ScannerTransfer.read_profile(path)
            parts = [p for p in self.APPLIED if p in profile.get("parts", [])]
            if not parts:
                raise click.BadParameter(f"expected a profile with a colour or MTF part, got {str(path)!r} with parts "
                                         f"{profile.get('parts')}", param_hint="--transfer")
            self.transfer = ScannerTransfer(profile, mpp=mpp, parts=parts).to(device)
        except ShiftkitError as exc:
            raise click.BadParameter(f"{path}: {exc}", param_hint="--transfer") from exc
        self.path, self.full_parts, self.device, self._by_mpp = path, list(profile["parts"]), device, {}

    def describe(self) -> dict:
        t = self.transfer
        used = sorted(k for k, v in self._by_mpp.items() if not isinstance(v, Exception))
        return {"profile": str(self.path), "name": t.profile.get("name", ""), "applied_parts": t.parts,
                "left_out_parts": [p for p in self.full_parts if p not in t.parts], "mpp": t.mpp,
                "rescaled_to_mpp": used}

    def at(self, mpp):
        """The transfer for tiles of ``mpp`` µm/px (None: as given by --mpp, else the profile's)."""
        from shiftkit import ScannerTransfer
        from shiftkit.core.errors import ShiftkitError

        if mpp is None or mpp == self.transfer.mpp or "mtf" not in self.transfer.parts:
            return self.transfer
        if mpp not in self._by_mpp:
            try:
                self._by_mpp[mpp] = ScannerTransfer(self.transfer.profile, mpp=mpp).to(self.device)
            except ShiftkitError as exc:  # e.g. beyond 0.5-2x of the fit's µm/px: these tiles fail, listed
                self._by_mpp[mpp] = exc
        t = self._by_mpp[mpp]
        if isinstance(t, Exception):
            raise t
        return t

    def apply(self, batch, mpp=None):
        """``(uint8 out, statuses)`` of a uint8 batch: strength 1, no random part; every tile "ok"."""
        out = self.at(mpp).augment(batch)
        return out, ["ok"] * len(out)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shiftkit")
def cli():
    """shiftkit: stain- and scanner-domain shift for H&E computational pathology."""


@cli.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path), required=False)
@click.option("--method", type=click.Choice(["reinhard", "macenko", "vahadane"]), default=None,
              help="Normalization method (default: the saved target's, else macenko).")
@click.option("--target", default=None, help="Target: an image, a folder of images (pooled) or a JSON file from "
              "fit-target. Required unless --transfer is given.")
@click.option("--transfer", default=None, help="Instead of stain normalization, apply a learned scanner transfer towards "
              "the scanner you normalize to: a JSON profile from fit-scanner (fitted from pairs of THIS scanner's "
              "tiles as the source and the target scanner's as the destination) or a bundled profile name (see "
              "`shiftkit shifts 'scanner-transfer:*'`). Its colour and MTF parts are applied at full strength "
              "(deterministic; the destination's noise and JPEG are simulation, see `simulate`).")
@click.option("--mpp", type=float, default=None, help="With --transfer: µm per pixel of the tiles, to which the MTF is "
              "rescaled (default: a manifest SRC's mpp column per tile, else the profile's; refused beyond 0.5-2x "
              "of it).")
@click.option("--target-intensity", type=click.Choice(["pooled", "median"]), default="pooled", show_default=True,
              help="A folder --target's intensity scale: from its pooled tissue, or the median tile's (see fit-target).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Tiles per batch (same-size tiles are batched).")
@click.option("--format", "fmt", type=click.Choice(["png", "same", "jpg", "tif"]), default="png", show_default=True,
              help="Output format; 'same' keeps each input's suffix.")
@click.option("--on-failure", type=click.Choice(["reference", "identity", "raise"]), default="reference", show_default=True,
              help="What to do with tiles whose stains cannot be estimated (blank, too little tissue, not H&E); "
                   "'raise' fails those tiles alone (listed), the others are written.")
@click.option("--source-level", type=click.Choice(["tile", "slide", "folder"]), default="tile", show_default=True,
              help="Where each tile's source stains are estimated: per tile; pooled per slide (the manifest's slide "
                   "column, else the immediate subfolder); or pooled over all of SRC (one scanner or cohort).")
@click.option("--in-place", is_flag=True, help="Replace the images in SRC with their normalized versions (no OUT; "
              "each file keeps its name and format). The only way to write into SRC.")
@input_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
def normalize(src, out, method, target, transfer, mpp, target_intensity, device, batch_size, fmt, on_failure, source_level,
              in_place, max_pixels, apply_icc, as_json):
    """Stain-normalize SRC (an image, a folder searched recursively, or a CSV manifest with a path column) into OUT,
    mirroring file names.

    --source-level slide or folder estimates the source stains once from all tiles of a slide (or of SRC), from a
    bounded pixel sample, and applies that estimate to each; tiles with too little tissue keep their own fallback.

    --transfer PROFILE normalizes by a learned scanner transfer instead (one global colour map and MTF for every
    tile, no stain estimation: see docs/real_scanner_shift.md); --method, --source-level and --target-intensity do
    not apply to it.

    Output names are derived from the input paths; two inputs that would give one name (a.png, a.jpg) both keep
    their suffix (a.png.png, a.jpg.png). OUT must not be SRC or lie inside it; use --in-place to replace the
    originals. Unreadable inputs, images over --max-pixels and tiles that fail are listed with the reason; the rest
    complete. Outputs are written atomically; OUT/normalize.json lists every output and failure. Exit code 1 if
    any input failed, 0 otherwise.
    """
    from shiftkit.core.errors import ShiftkitError
    from shiftkit.data.io import icc_description, read_icc
    from shiftkit.data.naming import overlaps, source_key
    from shiftkit.stain import STATUS_NAMES
    from shiftkit.data.runner import collect_inputs, map_images, plan_outputs

    if in_place:
        if out is not None and Path(out).resolve() != (Path(src) if Path(src).is_dir() else Path(src).parent).resolve():
            raise click.BadParameter(f"expected no OUT with --in-place (the images in SRC are replaced), got {str(out)!r}",
                                     param_hint="OUT")
        if fmt not in ("png", "same"):
            raise click.BadParameter(f"expected 'same' with --in-place (each file keeps its format), got {fmt!r}", param_hint="--format")
        fmt = "same"
    elif out is None:
        raise click.UsageError("missing argument OUT: expected an output folder (or --in-place to replace the images in SRC)")
    if (target is None) == (transfer is None):
        raise click.UsageError("expected exactly one of --target (stain normalization) and --transfer (a learned scanner "
                               f"transfer), got {'both' if target is not None else 'neither'}")
    if transfer is not None:
        given = [f"--{n}" for n, v, default in (("method", method, None), ("source-level", source_level, "tile"),
                                                ("target-intensity", target_intensity, "pooled")) if v != default]
        if given:
            verb = "does" if len(given) == 1 else "do"
            raise click.UsageError(f"{', '.join(given)} {verb} not apply to --transfer (one global map for every tile, "
                                   "no stain estimation): expected them left out")
    elif mpp is not None:
        raise click.BadParameter(f"expected --mpp only with --transfer (it rescales the transfer's MTF), got {mpp}",
                                 param_hint="--mpp")
    slide_of, mpp_of = {}, {}
    if Path(src).suffix.lower() == ".csv":
        from shiftkit.data.shifted import TileDataset

        ds = TileDataset(src)
        root, files = ds.root, [r.path for r in ds.records if not r.error]
        slide_of = {r.path: r.meta.get("slide", "") for r in ds.records}
        mpp_of = {r.path: r.mpp for r in ds.records if r.mpp is not None}
    else:
        root, files = collect_inputs(src)
    out = root if in_place else Path(out)
    if not in_place and (overlaps(out, root) if Path(src).is_dir() else out.resolve() == root.resolve() and fmt == "same"):
        raise click.BadParameter(f"expected a folder outside the input {str(src)!r}, got {str(out)!r}: writing there would "
                                 "replace or re-read the inputs (use --in-place to replace them on purpose)", param_hint="OUT")
    if not files:
        raise click.UsageError(f"SRC {str(src)!r} contains no images (expected {', '.join(('png', 'jpg', 'tif'))} files)")
    device = _device(device)
    if transfer is not None:
        norm = _TransferNormalizer(transfer, mpp, device)
    else:
        # the target is fitted with a fallback policy; "raise" then applies to the tiles (each failing tile fails alone)
        norm = _load_target(target, method, "reference" if on_failure == "raise" else on_failure, target_intensity).to(device)
        norm.on_failure = on_failure
    jobs, dups = plan_outputs(files, root, out, fmt)
    groups: dict = {}
    for job in jobs:  # slide: the manifest's slide column, else the immediate subfolder (sources outside the root too)
        parts = source_key(job[0], root).split("/")
        key = (slide_of.get(job[0]) or (parts[0] if len(parts) > 1 else "")) if source_level == "slide" else ""
        if transfer is not None and mpp is None:  # a manifest's mpp column: each tile's MTF at its own µm/px
            key = mpp_of.get(job[0])
        groups.setdefault(key, []).append(job)
    from shiftkit.data.runner import RunReport

    report, pooled_info = RunReport(), []
    label = f"scanner transfer {norm.path.name}" if transfer is not None else f"{norm.method}, source {source_level}"
    with Progress(len(files), f"normalize ({label})") as bar:
        for key, group in groups.items():
            source = "tile"
            if source_level != "tile":
                try:
                    source, _ = norm.pooled_source_from_files([j[0] for j in group])
                    status = STATUS_NAMES[int(source.status_code[0])]
                except ShiftkitError as exc:
                    source, status = "tile", f"no pooled source ({exc}); per-tile estimates used"
                pooled_info.append({"group": key or ".", "tiles": len(group), "status": status})

            def fn(batch, source=source, key=key):
                if transfer is not None:
                    return norm.apply(batch, mpp=key)
                return norm.normalize(batch, source=source, return_status=True)

            part = map_images(group, fn, out_dir=out, batch_size=batch_size, device=device, progress=bar.update,
                              in_place=in_place, max_pixels=max_pixels, apply_icc=apply_icc)
            report.written += part.written
            report.failed += part.failed
    report.failed += [(f, "listed twice: the first occurrence is used") for f in dups]
    summary = {"method": norm.method, "inputs": len(files), "out": str(out), "in_place": in_place,
               "source_level": source_level, "pooled_sources": pooled_info, **report.to_dict(),
               "target_intensity": (None if transfer is not None or str(target).lower().endswith(".json")
                                    else target_intensity),
               "transfer": norm.describe() if transfer is not None else None,
               "apply_icc": apply_icc,
               "outputs": [{"source": str(p), "output": str(o), "status": st, "icc": icc_description(read_icc(p))}
                           for p, o, st in report.written]}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".normalize.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "normalize.json")
    if as_json:
        click.echo(json.dumps({k: v for k, v in summary.items() if k != "outputs"}, indent=2))
    else:
        click.echo(f"normalized {len(report.written)}/{len(files)} images into {out} ({norm.method}); "
                   f"status: {report.status_counts}")
        for item in summary["not_ok"]:
            click.echo(f"  fallback ({on_failure}) for {item['path']}: {item['status']}")
        for p, reason in report.failed:
            click.echo(f"  FAILED {p}: {reason}", err=True)
    sys.exit(1 if report.failed else 0)


@cli.command("fit-target")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Where to write the JSON target.")
@click.option("--method", type=click.Choice(["reinhard", "macenko", "vahadane"]), default="macenko", show_default=True)
@click.option("--intensity", type=click.Choice(["pooled", "median"]), default="pooled", show_default=True,
              help="The target's intensity scale: from the pooled tissue, or the median tile's (safer when the images "
                   "differ in stain intensity: a pooled percentile follows the darkest).")
def fit_target(images, output, method, intensity):
    """Fit a normalization target on IMAGES (files or folders; pooled over all their tissue) and save it as JSON."""
    from shiftkit import StainNormalizer
    from shiftkit.core.errors import ShiftkitError
    from shiftkit.data import list_images, read_image

    files = []
    for p in images:
        files.extend(list_images(p) if p.is_dir() else [p])
    arrays, failed = [], []
    for f in files:
        try:
            arrays.append(read_image(f))
        except ShiftkitError as exc:
            failed.append((f, str(exc)))
    for f, reason in failed:
        click.echo(f"  FAILED {f}: {reason}", err=True)
    if not arrays:
        raise click.UsageError("no readable image among IMAGES")
    try:
        norm = StainNormalizer(method).fit(arrays, intensity=intensity)
    except ShiftkitError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    norm.save(output)
    click.echo(f"fitted a {method} target on {len(arrays)} images -> {output}")
    sys.exit(1 if failed else 0)


@cli.command("shifts")
@click.argument("pattern", default="*")
@click.option("--family", default=None, help="Only this family (stain, optics, illumination, sensor, isp, storage, tissue).")
@click.option("--held-out/--train", "held_out", default=None, help="Only held-out (evaluation) or only training shifts.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def shifts_cmd(pattern, family, held_out, as_json):
    """List registered shifts matching PATTERN (wildcards) with family, train/held-out flag and severity table."""
    from shiftkit.shifts import get_spec, list_shifts
    from shiftkit.shifts.routes import has_u8_route

    names = list_shifts(pattern, family=family, held_out=held_out)
    if as_json:  # cpu_uint8_route: uint8 tiles on CPU take the 8-bit route (docs/shifts.md)
        click.echo(json.dumps([{**get_spec(n).to_dict(), "cpu_uint8_route": has_u8_route(get_spec(n))} for n in names],
                              indent=2))
        return
    if not names:
        click.echo(f"no shift matches {pattern!r}")
        return
    for n in names:
        spec = get_spec(n)
        route = "  [8-bit CPU route]" if has_u8_route(spec) else ""
        click.echo(f"{n:20s} {spec.family:13s} {'held-out' if spec.held_out else 'train':8s} {spec.description}{route}")
        for k, vals in spec.table.items():
            click.echo(f"{'':43s}{k} [{spec.units.get(k, '')}]: " + "  ".join(f"S{i + 1}={v:g}" for i, v in enumerate(vals)))
        click.echo(f"{'':43s}source: {spec.source}")


@cli.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--shift", "shift_name", required=True, help="A shift name (see `shiftkit shifts`).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output PNG: clean + severities 1-5.")
@click.option("--mpp", default=0.5, show_default=True, type=float, help="µm per pixel of IMAGE.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--size", default=256, show_default=True, type=int, help="Centre crop side in pixels (0: whole image).")
def preview(image, shift_name, output, mpp, seed, size):
    """Write a strip: IMAGE (centre crop) clean, then at severities 1 to 5 of SHIFT, side by side."""
    import torch

    from shiftkit.core.errors import ShiftkitError
    from shiftkit.data import read_image, write_image
    from shiftkit.shifts import get_shift

    from shiftkit.shifts import get_spec

    try:
        get_spec(shift_name)
    except ShiftkitError as exc:
        raise click.BadParameter(str(exc), param_hint="--shift") from exc
    try:
        img = read_image(image)
    except ShiftkitError as exc:
        raise click.BadParameter(str(exc), param_hint="IMAGE") from exc
    if size:
        h, w = img.shape[:2]
        s = min(size, h, w)
        img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    try:
        panels = [x] + [get_shift(shift_name, sev, mpp=mpp, seed=seed)(x) for sev in range(1, 6)]
    except ShiftkitError as exc:
        raise click.BadParameter(str(exc), param_hint="--mpp/--seed") from exc
    labels = ["clean"] + [f"{shift_name} S{sev}" for sev in range(1, 6)]
    arrays = [(p[0].permute(1, 2, 0) * 255).round().byte().numpy() for p in panels]
    write_image(output, labelled_strip(arrays, labels))
    click.echo(f"wrote {output}: clean + {shift_name} severities 1-5, labelled")


def labelled_strip(panels: list, labels: list, gap: int = 4):
    """Panels side by side (uint8 ``(H, W, 3)``, white gaps) under a white band with each panel's label."""
    import cv2
    import numpy as np

    h = max(p.shape[0] for p in panels)
    band = max(18, h // 10)
    scale = band / 30
    cols = []
    for i, (p, text) in enumerate(zip(panels, labels)):
        head = np.full((band, p.shape[1], 3), 255, np.uint8)
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        while tw > p.shape[1] - 4 and scale > 0.2:
            scale *= 0.9
            (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.putText(head, text, (2, (band + th) // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
        body = np.full((h, p.shape[1], 3), 255, np.uint8)
        body[: p.shape[0]] = p
        cols.append(np.concatenate([head, body], axis=0))
        if i < len(panels) - 1:
            cols.append(np.full((band + h, gap, 3), 255, np.uint8))
    return np.concatenate(cols, axis=1)


def _severities(text: str) -> list:
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-", 1))
            out = list(range(lo, hi + 1))
        else:
            out = [int(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected a range like 1-5 or a list like 1,3,5, got {text!r}", param_hint="--severity")
    if not out or any(not 1 <= v <= 5 for v in out):
        raise click.BadParameter(f"expected severities within 1..5, got {text!r}", param_hint="--severity")
    return out


def _shard(text):
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected i/n (e.g. 0/4), got {text!r}", param_hint="--shard")
    if not 0 <= i < n:
        raise click.BadParameter(f"expected 0 <= i < n, got {text!r}", param_hint="--shard")
    return i, n


@cli.command()
@click.argument("input_", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--shift", "shifts", multiple=True, help="A shift name; repeat for several (see `shiftkit shifts`).")
@click.option("--profile", "profiles", multiple=True, help="A composite scanner profile name (a shift too).")
@click.option("--held-out", is_flag=True, help="Every held-out (evaluation) shift.")
@click.option("--severity", "severity", default="1-5", show_default=True, help="Severities: a range 1-5 or a list 1,3,5.")
@click.option("--seed", default=0, show_default=True, type=int, help="Base seed; per-output seeds derive from it.")
@click.option("--mpp", default=None, type=float, help="µm per pixel of the tiles (default: the manifest's mpp column, else 0.5).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--workers", default=None, type=click.IntRange(min=0),
              help="Threads that read, encode and write files (default: one per CPU core, at most 8; 0 = none). "
              "The pixels do not depend on it.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--format", "fmt", type=click.Choice(["png", "jpeg"]), default="png", show_default=True)
@click.option("--shard", default=None, help="Process only shard i/n of the samples (split by sample id).")
@click.option("--dry-run", is_flag=True, help="Print the plan and exit.")
@click.option("--force", is_flag=True, help="Regenerate every output even though OUT_DIR was made with another "
              "configuration (or is a non-empty folder not made by simulate).")
@input_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def simulate(input_, out_dir, shifts, profiles, held_out, severity, seed, mpp, device, workers, batch_size, fmt, shard,
             dry_run, force, max_pixels, apply_icc, as_json):
    """Write shifted copies of INPUT (folder or CSV manifest) as OUT_DIR/<shift>/<severity>/<name>.

    Deterministic (same command, same bytes, whatever the batch size or shard), atomic and resumable: a killed run
    restarted with the same command verifies what exists (seed, mpp, shift definition, source and output
    checksums) and finishes the rest; an OUT_DIR made with another configuration is refused, naming the
    differences (--force regenerates). Output names derive from the input paths and never leave OUT_DIR; OUT_DIR
    must not lie inside an input folder. Writes manifest.csv, manifest.json and README.txt, listing every failure
    with its reason. Exit code 1 if any input failed, 0 otherwise.
    """
    from shiftkit.core.errors import ShiftkitError
    from shiftkit.data.shifted import TileDataset, simulate as run_simulate
    from shiftkit.shifts import list_shifts

    device = _device(device)
    names = list(shifts) + list(profiles) + (list_shifts(held_out=True) if held_out else [])
    if not names:
        raise click.UsageError("give at least one --shift, --profile or --held-out")
    sevs = _severities(severity)
    shard_ij = _shard(shard)
    if shard_ij is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one shard per rank
        shard_ij = (int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"]))
    try:
        ds = TileDataset(input_, max_pixels=max_pixels, apply_icc=apply_icc)
        plan = run_simulate(ds, out_dir, names, sevs, seed, mpp=mpp, fmt=fmt, shard=shard_ij, dry_run=True)
        if dry_run:
            click.echo(f"plan: {len(ds)} tiles x {len(names)} shifts ({', '.join(names)}) x severities {sevs} "
                       f"= {plan.planned} outputs into {out_dir}" + (f" (shard {shard_ij[0]}/{shard_ij[1]})" if shard_ij else ""))
            return
        with Progress(plan.planned, "simulate") as bar:
            report = run_simulate(ds, out_dir, names, sevs, seed, mpp=mpp, batch_size=batch_size, device=device,
                                  fmt=fmt, shard=shard_ij, progress=bar.update, workers=workers, force=force)
    except ShiftkitError as exc:
        raise click.UsageError(str(exc))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"{report.written} outputs written, {report.verified} verified from an earlier run, "
                   f"{len(report.failed)} inputs failed -> {out_dir}")
        for p, reason in report.failed:
            click.echo(f"  FAILED {p}: {reason}", err=True)
    sys.exit(1 if report.failed else 0)


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--size", default=224, show_default=True, type=int, help="Tile side in pixels.")
@click.option("--stride", default=None, type=int, help="Step between tiles (default: --size).")
@click.option("--min-tissue", default=0.5, show_default=True, type=float, help="Keep tiles with at least this tissue fraction.")
@click.option("--level", default=0, show_default=True, type=int, help="Pyramid level of whole-slide images.")
@click.option("--mpp", default=None, type=float, help="µm per pixel (default: from the slide's metadata).")
@click.option("--max-pixels", default=None, type=click.IntRange(min=1),
              help="Largest plain image read whole, in pixels (default 64,000,000 or SHIFTKIT_MAX_PIXELS); whole-slide "
                   "images are read region by region.")
@click.option("--apply-icc", is_flag=True, help="Convert images and slides with an embedded ICC colour profile to sRGB "
              "(the profile is recorded in tiles.csv either way; without this flag the tiles keep it embedded).")
def tile(inputs, out_dir, size, stride, min_tissue, level, mpp, max_pixels, apply_icc):
    """Cut INPUTS (images, folders of images, whole-slide images such as .svs) into tiles with a tissue filter;
    writes OUT_DIR/<source path>/<y>_<x>.png and OUT_DIR/tiles.csv (a manifest for `shiftkit simulate`).

    Each source's tiles go to a folder named by its path relative to the common folder of INPUTS (a.svs ->
    a/, sub/a.png -> sub/a/; a.png and a.tif in one folder -> a.png/ and a.tif/), so tiles of different sources
    never share a file. A source that cannot be read fails alone (listed); tiles.csv is always written."""
    from shiftkit.core.errors import ShiftkitError
    from shiftkit.data import list_images
    from shiftkit.data.tiling import WSI_SUFFIXES, tile_sources

    sources = []
    for p in inputs:
        if p.is_dir():
            sources += list_images(p) + sorted(q for q in p.rglob("*") if q.suffix.lower() in WSI_SUFFIXES)
        else:
            sources.append(p)
    try:
        report = tile_sources(sources, out_dir, size=size, stride=stride, min_tissue=min_tissue, level=level, mpp=mpp,
                              max_pixels=max_pixels, apply_icc=apply_icc)
    except ShiftkitError as exc:
        raise click.UsageError(str(exc))
    click.echo(f"{report.written} tiles written, {report.rejected} rejected (tissue < {min_tissue}), "
               f"{len(report.failed)} sources failed -> {report.manifest}")
    for p, reason in report.failed:
        click.echo(f"  FAILED {p}: {reason}", err=True)
    sys.exit(1 if report.failed else 0)


@cli.command("pair-tiles")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for src/, dst/ and pairs.csv.")
@click.option("--size", default=256, show_default=True, type=int, help="Tile side in pixels (the source's).")
@click.option("--stride", default=None, type=int, help="Step between source tiles (default: --size).")
@click.option("--min-tissue", default=0.5, show_default=True, type=float, help="Keep source tiles with at least this tissue fraction.")
@click.option("--max-pairs", default=200, show_default=True, type=click.IntRange(min=1),
              help="At most this many pairs, evenly spread over the source's tissue tiles.")
@click.option("--search", "search_px", default=48, show_default=True, type=click.IntRange(min=1),
              help="Local search around the global registration, ± pixels.")
@click.option("--min-score", default=0.5, show_default=True, type=click.FloatRange(-1, 1),
              help="Smallest normalized cross-correlation of a pair (same field on two scanners: about 0.65-0.95 on "
                   "224-px tiles of the MITOS pairs; different fields: under 0.15).")
@click.option("--src-mpp", default=None, type=float, help="µm per pixel of SRC (default: a slide's metadata; plain images: as DST).")
@click.option("--dst-mpp", default=None, type=float, help="µm per pixel of DST (default: a slide's metadata; plain images: as SRC).")
@click.option("--min-peak", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="Smallest phase-correlation peak of the thumbnails' registration (below: not the same slide).")
@click.option("--slide", default=None, help="Slide id written to pairs.csv (default: SRC's file name without extension).")
@click.option("--max-pixels", default=None, type=click.IntRange(min=1),
              help="Largest plain image read whole, in pixels (default 64,000,000 or SHIFTKIT_MAX_PIXELS); whole-slide "
                   "images are read region by region.")
@click.option("--apply-icc", is_flag=True, help="Convert scans with an embedded ICC colour profile to sRGB (LittleCMS) "
              "before pairing; without it the tiles keep their scan's profile embedded (pairs.csv src_icc/dst_icc "
              "name it), for fit-scanner --apply-icc.")
def pair_tiles_cmd(src, dst, out_dir, size, stride, min_tissue, max_pairs, search_px, min_score, src_mpp, dst_mpp,
                   min_peak, slide, max_pixels, apply_icc):
    """Cut registered tile pairs from two scans SRC and DST of the same slide (plain images or whole-slide images),
    for `shiftkit fit-scanner --pairs OUT/pairs.csv`.

    The scans may lie on the glass differently (any multiple of 90°, a mirror, and a rotation of up to ±5°) and
    differ in pixel size: they are registered on thumbnails, the map is refitted at full resolution on a few tiles,
    then each source tile with tissue is matched locally. DST's tiles are written in SRC's orientation and pixel
    size (its own pixels turned exactly where the glass is not rotated, else warped bilinearly). Matches under
    --min-score are listed and skipped, tiles whose field lies beyond DST (a scan of part of the slide) counted;
    exit code 1 if any match was weak or none was written; pairs.csv is always written. OUT is new, empty or a
    previous pair-tiles output (whose pairs are replaced); a folder with other files in src/ or dst/ is refused
    untouched. For several slides, give each its own OUT and fit with one --pairs per slide (`fit-scanner --pairs
    s1/pairs.csv --pairs s2/pairs.csv`): cross-validation then holds out whole slides."""
    from shiftkit.core.errors import ShiftkitError
    from shiftkit.data.pairing import pair_tiles

    try:
        rep = pair_tiles(src, dst, out_dir, size=size, stride=stride, min_tissue=min_tissue, max_pairs=max_pairs,
                         search_px=search_px, min_score=min_score, src_mpp=src_mpp, dst_mpp=dst_mpp,
                         min_peak=min_peak, max_pixels=max_pixels, slide=slide, apply_icc=apply_icc)
    except ShiftkitError as exc:
        raise click.UsageError(str(exc))
    r = rep.registration
    turn = f"{r['k'] * 90}° counter-clockwise" + (", mirrored left-right first" if r["flip"] else "")
    refined = r.get("refined", [{}])[-1]
    fit = (f"; refined on {refined['inliers']} tiles at full resolution, rms {refined['rms_px']:.2f} px"
           if refined.get("refitted") else "; not refined at full resolution (fewer than 4 tiles matched)")
    click.echo(f"registration: DST turned {turn} to match SRC, glass rotated {r['glass_angle']:+.2f}°, scale "
               f"{r['scale']:.3f} DST px per SRC px, thumbnail {r['method']} peak {r['peak']:.3f} (next best "
               f"orientation {r['second_peak']:.3f}){fit}")
    if r.get("src_icc") or r.get("dst_icc"):
        click.echo(f"embedded ICC profiles: SRC {r.get('src_icc') or 'none'}, DST {r.get('dst_icc') or 'none'}"
                   + ("" if apply_icc else " (kept in the tiles; --apply-icc converts to sRGB)"))
    click.echo(f"{rep.written} pairs written, {rep.rejected} source tiles skipped (tissue < {min_tissue} or beyond "
               f"--max-pairs), {rep.beyond} beyond DST, {len(rep.unmatched)} unmatched -> {rep.manifest}")
    for name, reason in rep.unmatched:
        click.echo(f"  UNMATCHED {name}: {reason}", err=True)
    if not rep.written:
        click.echo(f"no pair written: expected source tiles of {size} px with at least {min_tissue} tissue that match "
                   "DST; lower --min-tissue or --size, or check that SRC and DST are scans of the same slide", err=True)
    sys.exit(1 if rep.unmatched or not rep.written else 0)


@cli.command("fit-scanner")
@click.option("--pairs", "pairs_csv", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with columns src,dst (registered pairs; paths relative to the CSV) and optional slide, e.g. "
                   "from `shiftkit pair-tiles`; repeat for several slides.")
@click.option("--src", "src_dir", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of scanner-A images (with --dst and --match instead of --pairs).")
@click.option("--dst", "dst_dir", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of scanner-B images of the same fields.")
@click.option("--match", default=r"(.*)", show_default=True,
              help="Regular expression searched in each file's name without its extension; its first group (else the "
              "whole match) is the file's id, and files of --src and --dst with equal ids pair, e.g. '^[AH](.*)' for "
              "A030_0.png / H030_0.png.")
@click.option("--slide-regex", default=None, help="Regular expression searched in a --src file's name without its "
              "extension; its first group is the slide id (cross-validation groups), e.g. '^A(\\d\\d)'.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Profile JSON to write.")
@click.option("--parts", default=None, help="Comma-separated parts to fit (default: colour,mtf,noise,jpeg; with "
              "--unpaired colour,mtf,noise).")
@click.option("--unpaired", is_flag=True, help="Fit from two unpaired sets (--src, --dst): stain and sharpness statistics only.")
@click.option("--reverse", is_flag=True, help="Fit the other way: from the dst scans (the manifests' dst column, or "
              "--dst) to the src scans — the transfer that normalizes the dst scanner's tiles towards src's "
              "(`normalize --transfer`).")
@click.option("--max-shift", default=16.0, show_default=True, type=float, help="Largest accepted misregistration (px).")
@click.option("--mpp", default=None, type=float, help="µm per pixel of the pairs (the MTF is rescaled when applied "
              "elsewhere; default: the --pairs manifests' mpp column when all its values agree, as pair-tiles writes).")
@click.option("--jpeg-quality", default=None, type=click.IntRange(1, 100), help="Quality of scanner B's JPEG (default: read from JPEG --dst files' quantization tables, applied "
              "unless the --src files are JPEG at that quality or lower).")
@click.option("--name", default=None, help="Profile name (default: the output file's stem).")
@click.option("--held-out", is_flag=True, help="Flag the profile held-out: an evaluation shift, never a training view.")
@click.option("--mtf-max-gain", default=None, type=click.FloatRange(1.0, 1000.0),
              help="Cap on the MTF's gain towards a sharper scanner (default: chosen by cross-validation, 1.5-8).")
@click.option("--mtf-mode", type=click.Choice(["relative", "matched"]), default="relative", show_default=True,
              help="relative: one gain, the scanners' ratio of tissue spectra on the pairs; matched: each tile filtered "
                   "towards the destination's own spectrum when transformed (for a source whose focus varies from slide "
                   "to slide; slower to apply).")
@click.option("--colour-loss", type=click.Choice(["l2", "l1", "cv"]), default="l2", show_default=True,
              help="Loss of the colour fit: least squares, least Euclidean residual lengths (robust to outlying "
                   "blocks), or both cross-validated (needs several slides to choose reliably). Paired fits only.")
@click.option("--fit-region", type=click.Choice(["destination", "either"]), default="destination", show_default=True,
              help="8x8 blocks the colour map is fitted on: tissue (L* < 85) in the destination (the metric's region; "
                   "where pairs are misregistered it teaches light colours to become tissue), or in either scan of a "
                   "pair (less of that cast; on the MITOS pairs a less monotone map off their colours). Paired fits.")
@click.option("--background-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of light, non-tissue blocks (outside --fit-region) in the colour fit against 1 for tissue: "
                   "0 fits tissue only (background is extrapolated); raise it where glass colour matters. Paired fits.")
@input_options
def fit_scanner(pairs_csv, src_dir, dst_dir, match, slide_regex, output, parts, unpaired, reverse, max_shift, mpp,
                jpeg_quality, name, held_out, mtf_max_gain, mtf_mode, colour_loss, fit_region, background_weight,
                max_pixels, apply_icc):
    """Learn a scanner transfer (colour map, relative MTF, noise, JPEG) from registered pairs of the same fields on two
    scanners, and write it as a profile usable as the shift scanner-transfer:PATH.

    Beside the profile it writes PROFILE.report.md (pairs used and refused with reasons, cross-validated residual
    CIEDE2000 and sharpness before and after each part) and PROFILE.report.png (the colour map and the MTF ratio).
    Pairs that cannot be read or differ in size, and files of --src/--dst that do not pair (no twin, or an id
    twice), are listed and skipped; exit code 1 if any was.

    A profile describes the scanner units and export settings of its pairs, not the scanner model: fit on scans
    from the instruments whose images you will transform (docs/real_scanner_shift.md).
    """
    import csv
    import re

    from shiftkit import ScannerTransfer
    from shiftkit.core.errors import ShiftkitError
    from shiftkit.data import list_images, read_image

    if parts is None:
        parts = "colour,mtf,noise" if unpaired else "colour,mtf,noise,jpeg"
    parts_t = tuple(x.strip() for x in parts.split(",") if x.strip())
    rows, failed = [], []
    csv_mpps: set = set()
    scan_icc: dict = {"src": set(), "dst": set()}
    if pairs_csv:
        if src_dir or dst_dir:
            raise click.UsageError("give --pairs or --src/--dst, not both")
        for csv_path in pairs_csv:
            with open(csv_path, newline="") as fh:
                reader = csv.DictReader(fh)
                if not {"src", "dst"} <= set(reader.fieldnames or []):
                    raise click.BadParameter(f"{csv_path}: expected columns src,dst, got {reader.fieldnames}",
                                             param_hint="--pairs")
                for line, r in enumerate(reader, start=2):
                    a, b = (Path(r[k]) if Path(r[k]).is_absolute() else csv_path.parent / r[k] for k in ("src", "dst"))
                    where = f"line {line}" if len(pairs_csv) == 1 else f"{csv_path} line {line}"
                    rows.append((a, b, r.get("slide") or None, where))
                    csv_mpps.add((r.get("mpp") or "").strip())
                    if r.get("src_icc") or r.get("dst_icc"):  # pair-tiles: the scans' profiles, tiles kept or converted
                        scan_icc["src"].add(r.get("src_icc") or "none")
                        scan_icc["dst"].add(r.get("dst_icc") or "none")
    elif src_dir and dst_dir:
        try:
            rx = re.compile(match)
            srx = re.compile(slide_regex) if slide_regex else None
        except re.error as exc:
            raise click.BadParameter(f"expected a regular expression, got {exc}", param_hint="--match/--slide-regex")

        def ident(p):
            m = rx.search(p.stem)
            return (m.group(1) if m.groups() else m.group(0)) if m else None

        if unpaired:
            rows = [(a, None, None, a.name) for a in list_images(src_dir)] + [(None, b, None, b.name) for b in list_images(dst_dir)]
        else:
            dst_by_id: dict = {}
            for b in list_images(dst_dir):
                i = ident(b)
                if i is None:
                    failed.append((str(b), f"--match {match!r} does not match its name without extension {b.stem!r}"))
                elif i in dst_by_id:
                    failed.append((str(b), f"its id {i!r} is also {dst_by_id[i].name}'s: expected one --dst file per id"))
                else:
                    dst_by_id[i] = b
            some = ", ".join(repr(k) for k in sorted(dst_by_id)[:3]) or "none: --match matched no --dst name"
            paired = set()
            for a in list_images(src_dir):
                i = ident(a)
                if i is None:
                    failed.append((str(a), f"--match {match!r} does not match its name without extension {a.stem!r}"))
                    continue
                if i not in dst_by_id:
                    failed.append((str(a), f"no --dst file has its id {i!r} (--dst ids, e.g.: {some})"))
                    continue
                if i in paired:
                    failed.append((str(a), f"its id {i!r} is another --src file's too: expected one --src file per id"))
                    continue
                paired.add(i)
                sm = srx.search(a.stem) if srx else None
                rows.append((a, dst_by_id[i], (sm.group(1) if sm and sm.groups() else None), i))
        if not unpaired:
            failed += [(str(b), f"no --src file has its id {i!r}") for i, b in dst_by_id.items() if i not in paired]
    else:
        raise click.UsageError("give --pairs CSV, or --src DIR and --dst DIR")
    if reverse:  # the pairs' (or sets') roles swapped; slide ids stay with their pairs
        rows = [(b, a, slide, where) for a, b, slide, where in rows]
        scan_icc = {"src": scan_icc["dst"], "dst": scan_icc["src"]}
    src_imgs, dst_imgs, slides, src_read, dst_read = [], [], [], [], []
    for a, b, slide, where in rows:
        try:
            ia = read_image(a, max_pixels=max_pixels, apply_icc=apply_icc) if a is not None else None
            ib = read_image(b, max_pixels=max_pixels, apply_icc=apply_icc) if b is not None else None
        except ShiftkitError as exc:
            failed.append((where, str(exc)))
            continue
        if ia is not None and ib is not None and ia.shape != ib.shape:
            failed.append((where, f"the pair differs in size: {ia.shape[1]}x{ia.shape[0]} and {ib.shape[1]}x{ib.shape[0]} "
                                  "(crop both to their common size)"))
            continue
        if ia is not None:
            src_imgs.append(ia)
            src_read.append(a)
        if ib is not None:
            dst_imgs.append(ib)
            dst_read.append(b)
        slides.append(slide)
    if not src_imgs or not dst_imgs:
        for w, reason in failed:
            click.echo(f"  FAILED {w}: {reason}", err=True)
        raise click.UsageError("no usable pair: every pair failed to read or match (listed above)")
    use_slides = slides if all(slides) and len(set(slides)) > 1 else None
    if mpp is None and len(csv_mpps) == 1 and "" not in csv_mpps:  # every pair's µm/px, from pair-tiles' manifests
        value = next(iter(csv_mpps))
        try:
            mpp = float(value)
        except ValueError:
            raise click.BadParameter(f"expected a number of µm per pixel in the mpp column, got {value!r}",
                                     param_hint="--pairs")
        click.echo(f"µm/px of the pairs: {mpp:g} (the mpp column of --pairs)")
    elif mpp is None and len(csv_mpps - {""}) > 1:
        click.echo(f"warning: the --pairs manifests' mpp columns differ ({', '.join(sorted(csv_mpps - {''}))}): no µm/px "
                   "recorded (give --mpp to rescale the MTF elsewhere)", err=True)
    jpeg_estimate = None
    if not unpaired and jpeg_quality is None and "jpeg" in parts_t:
        jpeg_estimate = _jpeg_estimate(src_read, dst_read)
        if jpeg_estimate["applied"]:
            jpeg_quality = jpeg_estimate["dst"]["quality_median"]
    if pairs_csv:
        source = ", ".join(map(str, pairs_csv)) + (" (dst -> src)" if reverse else "")
    else:
        source = f"{dst_dir} -> {src_dir}" if reverse else f"{src_dir} -> {dst_dir}"
    try:
        if unpaired:
            t = ScannerTransfer.fit_unpaired(src_imgs, dst_imgs, parts=parts_t, mpp=mpp, name=name or output.stem,
                                             held_out=held_out, source=source, mtf_max_gain=mtf_max_gain,
                                             mtf_mode=mtf_mode)
        else:
            t = ScannerTransfer.fit(src_imgs, dst_imgs, parts=parts_t, max_shift_px=max_shift, slides=use_slides, mpp=mpp,
                                    name=name or output.stem, held_out=held_out, jpeg_quality=jpeg_quality,
                                    source=source, mtf_max_gain=mtf_max_gain,
                                    colour_losses=("l2", "l1") if colour_loss == "cv" else (colour_loss,),
                                    background_weight=background_weight, fit_region=fit_region,
                                    mtf_mode=mtf_mode)
    except ShiftkitError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    t.profile["fit"]["failed_inputs"] = [{"input": w, "reason": r} for w, r in failed]
    for r in t.profile["fit"].get("refused", []):  # the files behind the indexes the fit refused
        if "pair" in r:
            r["files"] = [str(src_read[r["pair"]]), str(dst_read[r["pair"]])]
        else:
            r["file"] = str((src_read if r["set"] == "src" else dst_read)[r["image"]])
    if jpeg_estimate is not None and "jpeg" in t.profile["fit"]:
        t.profile["fit"]["jpeg"]["estimated"] = jpeg_estimate
    from shiftkit.data.io import icc_description, read_icc

    t.profile["fit"]["icc"] = {"applied": apply_icc,
                               "src": sorted({icc_description(read_icc(a)) or "none" for a, _, _, _ in rows if a is not None}),
                               "dst": sorted({icc_description(read_icc(b)) or "none" for _, b, _, _ in rows if b is not None})}
    if scan_icc["src"] or scan_icc["dst"]:
        t.profile["fit"]["icc"]["scans"] = {k: sorted(v) for k, v in scan_icc.items()}
    t.save(output)
    report = scanner_fit_report(t.profile)
    output.with_name(output.stem + ".report.md").write_text(report)
    scanner_fit_figure(t.profile, output.with_name(output.stem + ".report.png"))
    click.echo(report)
    for w, reason in failed:
        click.echo(f"  FAILED {w}: {reason}", err=True)
    click.echo(f"wrote {output} (use it as --shift scanner-transfer:{output})")
    sys.exit(1 if failed else 0)


_SPACE_NAMES = {"srgb": "sRGB", "od": "optical density", "lab": "CIELAB"}


def _cell(value) -> str:
    """A cross-validated figure for a report table: two decimals, or "n/a" where there was nothing to hold out."""
    return "n/a" if value is None else f"{value:.2f}"


def scanner_fit_report(profile: dict) -> str:
    """The fit report of a scanner-transfer profile, as Markdown."""
    fit = profile["fit"]
    lines = [f"# Scanner transfer {profile.get('name', '')}", "",
             f"Parts fitted: {', '.join(profile['parts']) or 'none'}; {'held-out' if profile.get('held_out') else 'train'} "
             f"profile; µm/px {fit.get('mpp') or 'not given'}.", ""]
    if fit.get("icc"):
        lines += [f"Embedded ICC profiles: source {fit['icc']['src']}, destination {fit['icc']['dst']}; "
                  f"{'converted to sRGB before fitting' if fit['icc']['applied'] else 'not applied (--apply-icc)'}.", ""]
        if fit["icc"].get("scans"):
            lines += [f"The scans the pairs were cut from (pairs.csv): source {fit['icc']['scans']['src']}, destination "
                      f"{fit['icc']['scans']['dst']}.", ""]
    if fit.get("paired"):
        cv = {"slides": "leave one slide out", "consecutive pairs": f"{min(5, fit['used'])} folds of consecutive pairs",
              "2x2 spatial blocks of the one pair": "leave one of the one pair's 2x2 spatial blocks out",
              "none: one pair too small to split": ("none (one pair under 64 px a side): the first candidate map is "
                                                    "used, unchecked against identity")}.get(fit.get("cv"))
        if cv is None:  # profiles fitted before the fit recorded its folds
            cv = "leave one slide out" if fit.get("slides") else "5 folds of consecutive pairs"
        lines += [f"Pairs: {fit['used']} used of {fit['pairs']}; slides {fit.get('slides') or 'not given (or one)'}; "
                  f"cross-validation: {cv}.", ""]
        for r in fit.get("refused", []):
            files = f" ({' / '.join(r['files'])})" if r.get("files") else ""
            lines.append(f"- refused pair {r['pair']}{files}: {r['reason']}")
    else:
        lines += [f"Unpaired: {fit.get('src_images')} source and {fit.get('dst_images')} destination images"
                  + (f", {fit['used'][0]} and {fit['used'][1]} used." if "used" in fit else "."), ""]
        for r in fit.get("refused", []):
            lines.append(f"- refused {'source' if r['set'] == 'src' else 'destination'} image {r['image']}"
                         + (f" ({r['file']})" if r.get("file") else "") + f": {r['reason']}")
    for r in fit.get("failed_inputs", []):
        lines.append(f"- failed input {r['input']}: {r['reason']}")
    c = fit.get("colour")
    if c and c.get("unpaired"):
        mean, std = c["lab_mean"], c["lab_std"]
        fmt = lambda v: "/".join(f"{x:.1f}" for x in v)  # noqa: E731
        lines += ["", ("Colour (unpaired: the affine map that moves the source's tissue colour mean and covariance onto "
                       f"the destination's, in {_SPACE_NAMES.get(profile['colour'].get('space'), 'sRGB')}; "
                       f"{c['tissue_blocks'][0]} and {c['tissue_blocks'][1]} tissue blocks of "
                       "8x8; in-sample, there are no pairs to hold out):"), "",
                  "| tissue blocks | CIELAB mean (L*/a*/b*) | CIELAB std |", "|---|---|---|"]
        lines += [f"| {label} | {fmt(mean[k])} | {fmt(std[k])} |"
                  for k, label in (("src", "source"), ("dst", "destination"), ("mapped", "mapped source"))]
        lines += ["", f"CIEDE2000 between the mean colours: before {c['delta_e2000_of_means_before']:.2f}, after "
                      f"{c['delta_e2000_of_means_after']:.2f}."]
    elif c:
        lines += ["", ("Colour (cross-validated mean CIEDE2000 of 8x8 block means over tissue; map = input space-output "
                       "space-degree[-loss: l1 = least residual lengths; none = least squares], cheapest first):"), "",
                  "| map | CV ΔE2000 |", "|---|---|", f"| identity (before) | {_cell(c['identity_delta_e2000'])} |"]
        lines += [f"| {k}{' (chosen)' if k == c['chosen'] else ''} | {_cell(v)} |" for k, v in c["cv_delta_e2000"].items()]
        region = c.get("fit_region", "destination")
        lines += ["", "Fitted on the 8x8 blocks that are tissue (L* < 85) " + ("in either scan of a pair" if region == "either"
                  else "in the destination") + "; the cross-validation scores the destination's tissue."]
        if c.get("background_weight"):
            lines += ["", f"Light blocks (outside that region) weighted {c['background_weight']:g} against tissue in the fit."]
        dom = profile.get("colour", {}).get("domain")
        if dom is not None:
            q = c.get("domain_quantiles", [0.001, 0.999])
            beyond = ("the map goes on with the affine fit's slope" if profile["colour"].get("beyond_slope") is not None
                      else "inputs are held at its edge")
            lines += ["", (f"Input domain of the map (the {100 * q[0]:g} % and {100 * q[1]:g} % quantiles of the training "
                           f"tissue pixels in its input space, {profile['colour']['space']}; beyond it {beyond}): "
                           f"low {'/'.join(f'{v:.3f}' for v in dom[0])}, high {'/'.join(f'{v:.3f}' for v in dom[1])}.")]
        if c.get("lighter_when_darker") is not None:
            share = c["lighter_when_darker"]
            lines += ["", (f"Lightness order: {100 * share:.2f} % of the training tissue pixels come out more than 1 L* "
                           "lighter when made 15 % darker (0 = the map keeps lightness order)"
                           + (". WARNING: the map folds — darker tissue comes out lighter; check that the pairs are "
                              "the same fields on two scanners (in Python, ScannerTransfer.fit(colour_candidates=...) "
                              "can keep to lower degrees)."
                              if share > 0.01 else "."))]
    m = fit.get("mtf")
    if m:
        if m.get("unpaired"):
            by_cap = ", ".join(f"{k}: {v:.2f}" for k, v in m.get("sharpness_ratio_geomean_by_max_gain", {}).items())
            lines += ["", (f"MTF: the ratio of the sets' mean spectra (unpaired), gain cap {m['max_gain']:g} (sharpness "
                           f"ratio of the sets, geometric mean, by cap: {by_cap}).")]
        else:
            unit = "of the pair's 2x2 blocks" if fit.get("cv", "").startswith("2x2") else "pairs"
            lines += ["", f"MTF ({m.get('mode', 'relative')}): "
                          f"{'fitted on %d %s' % (m['pairs'], unit) if m.get('fitted') else 'not fitted: ' + m.get('reason', '')}."]
        if m.get("fitted") and not m.get("unpaired"):
            lines.append(f"Sharpness (Laplacian variance of source / destination, median): before "
                         f"{m['sharpness_ratio_before']:.2f}, after, cross-validated, {_cell(m['sharpness_ratio_after_cv'])}.")
            if m.get("delta_e2000_after_cv") is not None:
                lines.append(f"CIEDE2000 of the colour-mapped pairs before the MTF {_cell(m['delta_e2000_before'])}, after it, "
                             f"cross-validated, {m['delta_e2000_after_cv']:.2f}.")
            if "max_gain" in m:  # profiles fitted before the cap was chosen have no such entry
                by_cap = ", ".join(f"{k}: {v:.2f}" for k, v in m.get("cv_sharpness_geomean_by_max_gain", {}).items())
                if m.get("max_gain_chosen_by_cv"):
                    how = "chosen by cross-validation"
                elif m.get("max_gain_given", bool(by_cap)):  # older profiles: a cap with CV figures was given
                    how = "as given"
                else:
                    how = "the smallest candidate: nothing to cross-validate"
                lines.append(f"Gain cap {m['max_gain']:g} ({how}"
                             + (f"; cross-validated sharpness ratio, geometric mean, by cap: {by_cap})." if by_cap else ")."))
            mc = m.get("matched_cv")
            if m.get("mode") == "matched" and mc and mc.get("sharpness_ratio_after_cv") is not None:
                lines.append(f"Matched MTF (each tile towards the destination's tissue spectrum, the cap above): sharpness "
                             f"ratio, cross-validated, median {mc['sharpness_ratio_after_cv']:.2f}, geometric mean "
                             f"{mc['sharpness_ratio_after_cv_geomean']:.2f}; CIEDE2000 after it {_cell(mc['delta_e2000_after_cv'])}.")
    n = fit.get("noise")
    if n:
        lines += ["", f"Noise: extra σ of the destination {n.get('sigma_extra_median', n.get('sigma', 0)):.4f} "
                      f"({'added' if 'noise' in profile['parts'] else 'not added: no extra noise'})."]
    j = fit.get("jpeg")
    if j:
        e = j.get("estimated")
        if e and e["applied"]:
            d = e["dst"]
            how = (f"quality {j['quality']} applied, estimated from the destination files' quantization tables (IJG "
                   f"scale; {d['jpeg_files']} files, qualities {d['quality_range'][0]}-{d['quality_range'][1]}"
                   + ("" if d["exact_ijg_tables"] else "; not all IJG tables: the nearest IJG quality") + ").")
        elif j.get("quality"):
            how = f"quality {j['quality']} applied."
        elif e:
            how = f"not applied: {e['why_not']} (give --jpeg-quality to apply one)."
        else:
            how = "not applied (give --jpeg-quality when known)."
        lines += ["", f"JPEG: blockiness source {j['blockiness_src']:.3f}, destination {j['blockiness_dst']:.3f}; " + how]
    return "\n".join(lines) + "\n"


def _jpeg_estimate(src_paths, dst_paths) -> dict:
    """The destination's JPEG quality from its files' quantization tables (IJG scale, see
    :func:`shiftkit.data.io.jpeg_quality`; the lower median), for fit-scanner without --jpeg-quality: applied when
    every destination file is a JPEG and the sources are not, or are at a higher quality (a source already as
    compressed as the destination needs no more)."""
    from shiftkit.data.io import jpeg_quality

    def side(paths):
        qs = [jpeg_quality(p) for p in paths]
        found = [q for q in qs if q is not None]
        if not found:
            return {"files": len(qs), "jpeg_files": 0}
        values = sorted(q["quality"] for q in found)
        return {"files": len(qs), "jpeg_files": len(found), "quality_median": values[(len(values) - 1) // 2],
                "quality_range": [values[0], values[-1]], "exact_ijg_tables": all(q["exact"] for q in found)}

    src, dst = side(src_paths), side(dst_paths)
    if dst["jpeg_files"] == 0:
        why = "the destination files are not JPEG"
    elif dst["jpeg_files"] < dst["files"]:
        why = f"only {dst['jpeg_files']} of {dst['files']} destination files are JPEG"
    elif src["jpeg_files"] == src["files"] and src["quality_median"] <= dst["quality_median"]:
        why = (f"the source files are JPEG at quality {src['quality_median']}, as compressed as the destination's "
               f"{dst['quality_median']} or more")
    else:
        why = ""
    return {"src": src, "dst": dst, "applied": not why, "why_not": why}


def scanner_fit_figure(profile: dict, path: Path) -> None:
    """The colour map on a grey ramp (each output channel) and the MTF ratio against frequency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from shiftkit import ScannerTransfer

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ramp = torch.linspace(0, 1, 64)
    x = ramp.view(1, 1, 1, -1).expand(1, 3, 1, 64).contiguous()
    colour_only = {**profile, "parts": [p for p in profile["parts"] if p == "colour"]}
    y = ScannerTransfer(colour_only, seed=0)(x)[0, :, 0]
    for ch, col in zip(range(3), ("tab:red", "tab:green", "tab:blue")):
        axes[0].plot(ramp, y[ch], color=col, label="RGB"[ch])
    axes[0].plot([0, 1], [0, 1], "k:", lw=0.8, label="identity")
    c = profile.get("colour", {})
    if c.get("domain") is not None and c.get("space") in ("srgb", "od"):  # where each channel leaves the fitted domain
        lo, hi = c["domain"]
        for ch, col in zip(range(3), ("tab:red", "tab:green", "tab:blue")):
            edges = (lo[ch], hi[ch]) if c["space"] == "srgb" else (math.exp(-hi[ch]), math.exp(-lo[ch]))
            for e in edges:
                if 0.0 < e < 1.0:
                    axes[0].axvline(e, color=col, lw=0.6, ls="--")
    axes[0].set(xlabel="input grey level", ylabel="output",
                title="colour map on a grey ramp" + ("\n(dashed: edges of the fitted domain)" if c.get("domain") else ""))
    axes[0].legend(fontsize=8)
    if "mtf" in profile:
        g = profile["mtf"]["gain"]
        f = [(i + 0.5) / len(g) * 0.5 for i in range(len(g))]
        mpp = profile["mtf"].get("mpp")
        axes[1].plot([v / mpp for v in f] if mpp else f, g)
        axes[1].axhline(1.0, color="k", lw=0.8, ls=":")
        matched = profile["mtf"].get("mode") == "matched"
        axes[1].set(xlabel="cycles/µm" if mpp else "cycles/px", ylabel="gain",
                    title="relative MTF (B / A)" + ("\nthe pairs' mean; matched: each tile its own" if matched else ""))
    else:
        axes[1].text(0.5, 0.5, "no MTF part", ha="center", va="center")
        axes[1].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@cli.command("models")
@click.argument("pattern", default="*")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_cmd(pattern, as_json):
    """List the foundation-model presets matching PATTERN (wildcards): architecture, embedding size, pooling,
    input size and normalisation. Use one as --model NAME --weights LOCAL_FILE (no download; without --weights the
    architecture has random weights)."""
    from shiftkit.models import get_preset, list_models

    names = list_models(pattern)
    rows = [{"name": n, "timm": get_preset(n).timm_name, "dim": get_preset(n).out_dim, "pooling": get_preset(n).pooling,
             "input_size": get_preset(n).input_size, "mean": list(get_preset(n).mean), "std": list(get_preset(n).std),
             "params_m": get_preset(n).params_m, "source": get_preset(n).source} for n in names]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no preset matches {pattern!r}")
        return
    for r in rows:
        click.echo(f"{r['name']:15s} {r['timm']:32s} {r['dim']:5d}-d {r['pooling']:9s} {r['input_size']}px "
                   f"{r['params_m']:6.0f}M  mean {tuple(round(v, 3) for v in r['mean'])}")
        click.echo(f"{'':15s} source: {r['source']}")


def _stress_dry_run(model, weights, data, reference_model, names, sevs, batch_size, device):
    """Units, forward passes and an estimated time from one timed batch of the clean pass."""
    import time

    import torch

    from shiftkit.data import sample_tiles_dir
    from shiftkit.data.shifted import TileDataset, shift_tiles
    from shiftkit.models import load_encoder

    ds = TileDataset(data if data is not None else sample_tiles_dir() / "manifest.csv")
    n = len(ds)
    encs = [load_encoder(model, weights)] + ([load_encoder(reference_model)] if reference_model else [])
    k = min(batch_size, n)
    x8 = torch.stack([torch.nn.functional.interpolate(ds[i][0][None].float(), size=(224, 224), mode="bilinear",
                                                      antialias=True)[0].clamp(0, 255).round().to(torch.uint8) for i in range(k)])
    x = x8.float() / 255
    t0 = time.perf_counter()
    for e in encs:
        e.embed(x, batch_size=batch_size, device=device)
    per_tile = (time.perf_counter() - t0) / k
    t0 = time.perf_counter()
    shift_tiles(x8.to(device), names[0], sevs[-1], list(range(k)))  # uint8 on the run's device: the run's route
    shift_per_tile = (time.perf_counter() - t0) / k
    units = 1 + len(names) * len(sevs)
    passes = units * n * len(encs)
    est = units * n * per_tile + (units - 1) * n * shift_per_tile
    click.echo(f"dry run: {n} tiles, {len(encs)} encoder(s), {units} units (clean + {len(names)} shifts x {len(sevs)} "
               f"severities) = {passes:,} forward passes; measured {per_tile * 1e3:.1f} ms per tile for the encoders and "
               f"{shift_per_tile * 1e3:.1f} ms per tile for a shift ({names[0]}) on {device}: about {format_seconds(est)}")


@cli.command("stress-test")
@click.option("--model", default="default", show_default=True,
              help="Encoder spec: default (bundled), a foundation-model preset (uni2-h, virchow2, ...: `shiftkit "
                   "models`; with --weights LOCAL_FILE), random, timm:NAME, a `shiftkit pretrain` run folder, a "
                   "TorchScript file, or module:callable.")
@click.option("--weights", default=None, help="Weights for --model (safetensors or a state dict).")
@click.option("--data", default=None, help="A folder of tiles or a CSV manifest (default: the bundled sample tiles).")
@click.option("--label-column", default="label", show_default=True)
@click.option("--site-column", default="site", show_default=True)
@click.option("--shifts", "shift_pattern", default="*", show_default=True, help="Wildcard pattern of shift names.")
@click.option("--severities", default="1-5", show_default=True)
@click.option("--reference-model", default="random", show_default=True,
              help="Reference encoder for corruption error (CE): the fixed untrained ResNet-18 (seed 0) by default, or "
                   "any encoder spec.")
@click.option("--no-reference", is_flag=True, help="Skip corruption error: no reference encoder runs (the bundled demo on 2 CPU cores: 40-50 s instead of "
              "110-130 s; CE is then 'not measured' in the report).")
@click.option("--out", "out_dir", default="shiftkit-report", show_default=True, type=click.Path(path_type=Path))
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Tiles per batch.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="DataLoader processes that read and decode tiles.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--no-gallery", is_flag=True, help="Keep no tile thumbnails (for data whose images must stay private).")
@click.option("--force", is_flag=True, help="Start over in an --out made with another configuration.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Encoder arithmetic: auto = bf16 autocast on CUDA, float32 on CPU; fp16 needs CUDA.")
@click.option("--input-size", default=None, type=click.IntRange(min=16), help="Override the encoders' input side (px).")
@click.option("--input-norm", default=None, type=click.Choice(["fixed", "per-image"]),
              help="Override the encoders' input standardization: fixed mean/std, or each image's own channel mean/std "
                   "(removes a global colour cast; default: each encoder's own).")
@click.option("--embed-grid", default=None, type=click.IntRange(min=1),
              help="Override the encoders' embedding: G > 1 pools the last feature map to G x G and flattens it (keeps "
                   "layout, G² times wider; CNNs only; default: each encoder's own).")
@click.option("--shard", default=None, help="Compute only shard i/n of the work units into --out (e.g. a SLURM array "
              "task); then rerun the same command without --shard to gather and report. Under torchrun each rank "
              "takes a shard and rank 0 reports.")
@click.option("--dry-run", is_flag=True, help="Print the number of units and forward passes and an estimate of the time "
              "from a short timing, then exit.")
def stress_test(model, weights, data, label_column, site_column, shift_pattern, severities, reference_model, no_reference,
                out_dir, device, batch_size, workers, seed, no_gallery, force, precision, input_size, input_norm,
                embed_grid, shard, dry_run):
    """Measure an encoder under every shift and severity; write records and an HTML report to --out.

    The report opens with a headline: what was measured, the encoder and its caveat, the most affected families and
    shifts, and what was not measured and why. Corruption error is computed against --reference-model (the fixed
    untrained ResNet-18 by default) unless --no-reference.
    """
    from shiftkit.core.errors import ShiftkitError
    from shiftkit.report import build_report
    from shiftkit.shifts import list_shifts
    from shiftkit.stress import run_stress_test

    import torch

    device = _device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    sevs = _severities(severities)
    if no_reference or reference_model == model:
        reference_model = None  # a model is not its own reference
    names = list_shifts(shift_pattern)
    if not names:
        raise click.BadParameter(f"expected a pattern matching registered shifts, got {shift_pattern!r}", param_hint="--shifts")
    if dry_run:
        _stress_dry_run(model, weights, data, reference_model, names, sevs, batch_size, device)
        return
    try:
        with Progress(len(names) * len(sevs), "stress-test units") as bar:
            run = run_stress_test(model, data, out_dir, shifts=[shift_pattern], severities=sevs, label_column=label_column,
                                  site_column=site_column, reference_model=reference_model, weights=weights, seed=seed,
                                  device=device, progress=bar.update, gallery=not no_gallery, batch_size=batch_size,
                                  workers=workers, force=force, precision=precision, input_size=input_size,
                                  shard=_shard(shard), input_norm=input_norm, embed_grid=embed_grid)
    except (ShiftkitError, ValueError) as exc:
        raise click.UsageError(str(exc))
    if "shard" in run:  # a shard, or a torchrun rank other than 0: its units are written, no report
        click.echo(f"shard {run['shard'][0]}/{run['shard'][1]}: {len(run['units'])} units in {run['out_dir']}")
        return
    html_path = build_report(out_dir)
    click.echo(f"stress test of {model} on {run['n_tiles']} tiles, {len(names)} shifts x {len(sevs)} severities "
               f"in {run['runtime_s']:.0f} s -> {html_path}")
    sys.exit(1 if run["failed_inputs"] else 0)


@cli.command()
@click.option("--data", required=True, help="A folder of tiles or a CSV manifest (path; optional slide/site/scanner/label columns).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Run folder (checkpoints, logs, encoder).")
@click.option("--model", default=None, help="Backbone as timm:NAME (default: the recipe's, ViT-S/16 on CUDA, ResNet-10t on CPU).")
@click.option("--recipe", default="auto", show_default=True, type=click.Choice(["auto", "vit-s16", "cpu-small"]),
              help="Defaults for sizes, head and optimisation (auto: vit-s16 on CUDA, cpu-small on CPU).")
@click.option("--steps", default=1000, show_default=True, type=int, help="Optimizer steps in the whole run.")
@click.option("--batch-size", default=None, type=int, help="Global batch per optimizer step (all processes and accumulation).")
@click.option("--accumulate", default=1, show_default=True, type=int, help="Gradient accumulation micro-steps per step.")
@click.option("--lr", default=None, type=float, help="Peak learning rate (default: the recipe's).")
@click.option("--augment", default="shiftkit", show_default=True,
              type=click.Choice(["shiftkit", "synthetic", "stain", "scanner", "dino"]),
              help="Domain shift in the views: stain + scanner (shiftkit), the same without the bundled learned scanner "
                   "transfers (synthetic), one of them, or none (dino).")
@click.option("--transfers", default="", help="Comma-separated learned scanner-transfer profiles (bundled names or JSON "
              "files from `shiftkit fit-scanner`; training profiles only) applied as a view step of their own "
              "(strength 0.6-1.0, p 0.5).")
@click.option("--pair-views", is_flag=True, help="Where the manifest pairs tiles (pair_id + scanner or condition), make "
              "the second global view from the registered twin under another scanner, cropped with its partner's box.")
@click.option("--input-norm", default=None, type=click.Choice(["fixed", "per-image"]),
              help="How views and, later, every embedded image are standardized: fixed ImageNet mean/std (default) or "
                   "each image's channels by their own mean and std (removes per-channel colour shifts).")
@click.option("--embed-grid", default=None, type=int, help="Embedding of the exported encoder: 1 = global (default); "
              "G > 1 = the last feature map pooled to G x G and flattened (keeps layout; CNNs only).")
@click.option("--embed-norm", default=None, type=click.Choice(["fixed", "per-image"]),
              help="Standardization of the exported encoder's embedding (and the kNN monitor) when it should differ "
                   "from --input-norm, which the training views keep (default: the same as --input-norm).")
@click.option("--max-per-slide", default=None, type=int, help="Keep at most N tiles per slide (slide column, else folder).")
@click.option("--balance-by", default="", help="Comma-separated manifest columns to balance, e.g. site,scanner.")
@click.option("--val", default=None, help="Labelled folder/CSV for the kNN monitor (needs --knn-every); default: the "
              "manifest rows with split=val, which are then not trained on.")
@click.option("--knn-every", default=0, show_default=True, type=int, help="Steps between kNN monitor evaluations.")
@click.option("--checkpoint-every", default=100, show_default=True, type=int)
@click.option("--export-dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="dtype of the exported encoder.safetensors.")
@click.option("--workers", default=2, show_default=True, type=int, help="Data-loading processes per rank.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--config", "config_file", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON file of PretrainConfig fields (command-line options win).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.pass_context
def pretrain(ctx, data, out_dir, model, recipe, steps, batch_size, accumulate, lr, augment, transfers, pair_views,
             input_norm, embed_grid, embed_norm, max_per_slide, balance_by, val, knn_every, checkpoint_every, export_dtype,
             workers, device, seed, config_file, resume):
    """Self-supervised DINO pretraining under controlled stain/scanner shift; writes RUN_DIR/encoder.safetensors.

    One process on CPU or GPU, or many under torchrun (NCCL on GPU, Gloo on CPU):

    \b
      torchrun --nproc-per-node 8 -m shiftkit.cli.main pretrain --data ... --out ...

    Stops cleanly on SIGTERM with a checkpoint (exit 143); --resume continues to the same result. A non-finite
    loss stops the run and keeps the last checkpoint (exit 3). Test the encoder with
    `shiftkit stress-test --model RUN_DIR`.
    """
    from shiftkit.core.errors import ShiftkitError
    from shiftkit.train import PretrainConfig, TrainingDivergedError
    from shiftkit.train import pretrain as run_pretrain

    from shiftkit.train import checkpoint_config

    def explicit(k):
        return ctx.get_parameter_source(k if k != "out" else "out_dir") != click.core.ParameterSource.DEFAULT

    # a fresh run: defaults fill what --config leaves open; a resumed run: the run's own configuration, and only
    # what the command line says explicitly is compared with it (a changed setting is refused, by name)
    given = {k: v for k, v in dict(data=data, out=str(out_dir), model=model, recipe=recipe, steps=steps,
                                    batch_size=batch_size, accumulate=accumulate, lr=lr, augment=augment,
                                    input_norm=input_norm, embed_grid=embed_grid, embed_norm=embed_norm,
                                    max_per_slide=max_per_slide, val=val, knn_every=knn_every,
                                    checkpoint_every=checkpoint_every, export_dtype=export_dtype, workers=workers,
                                    device=device, seed=seed).items()
             if v is not None and ((config_file is None and not resume) or explicit(k))}
    cols = tuple(c.strip() for c in balance_by.split(",") if c.strip())
    if cols:
        given["balance_by"] = cols
    profiles = tuple(t.strip() for t in transfers.split(",") if t.strip())
    if profiles:
        given["transfers"] = profiles
    if pair_views:
        given["pair_views"] = True
    try:
        if resume and (Path(out_dir) / "checkpoint.pt").is_file():
            base = checkpoint_config(out_dir)
            if config_file:
                base.update(json.loads(config_file.read_text()))
        else:
            base = json.loads(config_file.read_text()) if config_file else {}
        cfg = PretrainConfig.from_dict({**base, **given})
        if cfg.device.startswith("cuda"):
            _device(cfg.device)

        timer = Progress(cfg.steps, "pretrain", quiet=True)  # the rate and ETA; the lines are printed below

        def show(e):
            if "loss" in e:
                if timer.done == 0:
                    timer.done = e["step"]  # a resumed run starts at its checkpoint
                timer.update(1)
            if e["step"] % 10 == 0 or "knn_balanced_accuracy" in e:
                knn = f" knn {e['knn_balanced_accuracy']:.3f}" if "knn_balanced_accuracy" in e else ""
                eta = timer.eta_s()
                click.echo(f"step {e['step']:>6} loss {e['loss']:.4f} lr {e['lr']:.2e} {e['images_per_s']:.1f} img/s{knn} "
                           f"ETA {format_seconds(eta) if eta is not None else '…'}", err=True)

        summary = run_pretrain(cfg, resume=resume, progress=show)
    except TrainingDivergedError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(3)
    except ShiftkitError as exc:
        raise click.UsageError(str(exc))
    click.echo(f"{summary['status']} at step {summary.get('last_step', summary['start_step'] - 1) + 1} of "
               f"{summary['steps']} -> {out_dir / 'encoder.safetensors'}; bad tiles: {summary['bad_tiles']}")
    if summary["status"] == "interrupted":
        click.echo(f"resume with: shiftkit pretrain --data {data} --out {out_dir} --resume", err=True)
        sys.exit(143)
    sys.exit(1 if summary["bad_tiles"] else 0)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(run_dir):
    """Rebuild RUN_DIR/report.html and summary.md from the records of a stress test (no model needed)."""
    from shiftkit.report import build_report

    click.echo(f"wrote {build_report(run_dir)}")


def main():
    cli(prog_name="shiftkit")


if __name__ == "__main__":
    main()
