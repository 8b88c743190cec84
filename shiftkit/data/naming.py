"""Output names derived from input paths, never trusted.

Every command that writes one output per input (``simulate``, ``normalize``, ``tile``) names its outputs by
one rule, so that no output can land outside ``OUT_DIR``, on a source file, or on another output:

1. **Key.** A source's key is its path relative to the input root (the folder given, or the manifest's folder),
   with ``/`` separators. A source outside the root (an absolute manifest path elsewhere, or ``../``) gets
   ``_external/<its absolute path without root or drive>``: deterministic, unique per file, and never refused
   (such manifests are common).
2. **Suffix.** The output name is the key with its suffix replaced by the output format's (``a.jpg`` →
   ``a.png``), or kept (``--format same``).
3. **Collisions.** Where two keys would give one output name, compared case-insensitively (``a.png``,
   ``a.jpg``, ``A.tif`` → ``a.png``), every one of them keeps its source suffix: ``a.png.png``, ``a.jpg.png``,
   ``A.tif.png``. Any name still shared after that gets ``.<8 hex digits of the key's SHA-1>`` before its
   suffix. Two rows naming the same source are one source: the later rows are reported as duplicates.

:func:`ensure_inside` is the last check before any write: the output path must resolve inside ``OUT_DIR``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence, Union

from ..core.errors import InvalidArgumentError

PathLike = Union[str, os.PathLike]

#: The folder that holds outputs of sources outside the input root.
EXTERNAL = "_external"


class UnsafeOutputError(InvalidArgumentError):
    """An output path would resolve outside ``OUT_DIR`` (or onto an input)."""


def source_key(path: PathLike, root: PathLike) -> str:
    """The relative POSIX name of ``path`` under ``root`` (see the module docstring, rule 1).

    ``..`` components are folded lexically (symbolic links are not followed), so ``root/x/../a.png`` is
    ``a.png`` and ``root/../b.png`` is outside the root.
    """
    p = Path(os.path.abspath(os.fspath(path)))
    r = Path(os.path.abspath(os.fspath(root)))
    try:
        return PurePosixPath(*p.relative_to(r).parts).as_posix()
    except ValueError:
        drive = "".join(ch for ch in p.drive if ch.isalnum())  # 'C:' -> 'C', '\\\\srv\\share' -> 'srvshare'
        parts = [part for part in p.parts[1:] if part not in ("", ".", "..")]
        return PurePosixPath(EXTERNAL, *([drive] if drive else []), *parts).as_posix()


def _with_suffix(key: str, suffix: Optional[str]) -> str:
    k = PurePosixPath(key)
    return k.as_posix() if suffix is None else k.with_suffix(suffix).as_posix()


def plan_output_names(keys: Sequence[str], suffix: Optional[str]) -> List[Optional[str]]:
    """Unique output names for source ``keys`` by the rule of the module docstring.

    Args:
        keys: source keys from :func:`source_key`.
        suffix: the output suffix with its dot (``".png"``), or ``None`` to keep each source's suffix.

    Returns:
        One name per key; ``None`` for a key that repeats an earlier one (the same source listed twice).
    """
    first: Dict[str, int] = {}
    dup = [False] * len(keys)
    for i, k in enumerate(keys):
        if k in first:
            dup[i] = True
        else:
            first[k] = i
    live = [i for i in range(len(keys)) if not dup[i]]
    names: Dict[int, str] = {i: _with_suffix(keys[i], suffix) for i in live}

    def shared(cands: Dict[int, str]) -> set:
        seen: Dict[str, list] = {}
        for i, n in cands.items():
            seen.setdefault(n.lower(), []).append(i)
        return {i for group in seen.values() if len(group) > 1 for i in group}

    for i in shared(names):  # rule 3: keep the source suffix
        names[i] = keys[i] + (suffix or "")
    for i in shared(names):  # still shared: a short hash of the key
        digest = hashlib.sha1(keys[i].encode("utf-8")).hexdigest()[:8]
        stem = PurePosixPath(names[i])
        names[i] = stem.with_name(f"{stem.stem}.{digest}{stem.suffix}").as_posix()
    left = shared(names)
    if left:  # pragma: no cover - needs a SHA-1 prefix collision
        raise InvalidArgumentError(f"output names collide: expected unique names, got {sorted(names[i] for i in left)[:4]}")
    return [names.get(i) for i in range(len(keys))]


def shift_folder(shift: str) -> str:
    """The output folder of a shift name: the name itself when it is a plain kebab-case name; a parametrised name
    (``scanner-transfer:<profile or JSON path>``) becomes ``scanner-transfer_<profile stem>`` (plus 8 hex digits of
    the full name when it was a path), with no ``:`` or ``/``."""
    import re

    if re.fullmatch(r"[A-Za-z0-9._-]+", shift):
        return shift
    prefix, _, ref = shift.partition(":")
    stem = PurePosixPath(ref.replace("\\", "/")).stem if ref else ""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{prefix}_{stem}").strip("._") or "shift"
    if "/" in ref or "\\" in ref or ref.lower().endswith(".json"):
        safe += "-" + hashlib.sha1(shift.encode("utf-8")).hexdigest()[:8]
    return safe


def ensure_inside(out_dir: PathLike, path: PathLike) -> Path:
    """Return ``path`` if it resolves inside ``out_dir``, else raise :class:`UnsafeOutputError`."""
    root = Path(out_dir).resolve()
    target = Path(path).resolve()
    if target != root and root not in target.parents:
        raise UnsafeOutputError(f"output `{path}` is unsafe: expected a path inside {root}, got one that resolves to {target}")
    return Path(path)


def overlaps(a: PathLike, b: PathLike) -> bool:
    """True when folder ``a`` is folder ``b`` or lies inside it (after resolving links)."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return ra == rb or rb in ra.parents


__all__ = ["EXTERNAL", "UnsafeOutputError", "source_key", "plan_output_names", "shift_folder", "ensure_inside", "overlaps"]
