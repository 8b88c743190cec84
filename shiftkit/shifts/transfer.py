"""Learned scanner transfers as named shifts: ``scanner-transfer:<profile>``.

A profile is a bundled name (``shiftkit shifts 'scanner-transfer:*'`` lists them; the JSON files live in
``shiftkit/shifts/profiles``) or the path of a JSON file written by ``ScannerTransfer.save`` / ``shiftkit
fit-scanner``. Severity s applies the transfer at strength s/5. The profile's own ``held_out`` flag decides whether
it is a training view (``RandomScanner``, ``pretrain``) or an evaluation-only shift, so that what a model trains on
is never what the stress test reports as held-out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from ..core.shift_registry import REFERENCE_MPP, ShiftSpec, register_resolver, register_shift
from ..transforms.scanner_transfer import ScannerTransfer

PREFIX = "scanner-transfer:"
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


def _spec(name: str, profile: dict, origin: str) -> ShiftSpec:
    fit = profile.get("fit", {})
    transfers: dict = {}

    def transfer_at(mpp: float) -> ScannerTransfer:
        key = round(float(mpp), 6)
        if key not in transfers:  # the MTF is rescaled to the tile's µm/px (default: the profile's own)
            transfers[key] = ScannerTransfer(profile, mpp=mpp if profile.get("mtf", {}).get("mpp") else None, seed=0)
        return transfers[key]

    def kernel(x, params):
        mpp = REFERENCE_MPP / float(params["scale"][0]) if "scale" in params else REFERENCE_MPP
        t = transfer_at(mpp)
        b = x.shape[0]
        p = {"strength": params["strength"].float(), "seed": params["seed"].long()}
        return t.apply_batch(x, {k: v[:b] for k, v in p.items()})

    def sample(values, gen, batch):
        return {"strength": values["strength"], "scale": values["scale"],
                "seed": torch.randint(0, 2 ** 31 - 1, (batch,), generator=gen)}

    digest = hashlib.sha256(json.dumps(profile, sort_keys=True).encode()).hexdigest()[:12]
    source = (f"fitted by shiftkit from {fit.get('used', fit.get('src_images', '?'))} "
              f"{'registered pairs' if fit.get('paired') else 'unpaired images'}"
              + (f" ({fit['source']})" if fit.get("source") else "") + f"; parts {', '.join(profile['parts'])}; "
              f"profile {origin}, sha256 {digest}")
    return ShiftSpec(name, "scanner-transfer", f"Learned scanner transfer {profile.get('name') or name[len(PREFIX):]} "
                     f"({' + '.join(profile['parts']) or 'identity'} of a real scanner change), at strength severity/5.", {"strength": (0.2, 0.4, 0.6, 0.8, 1.0), "scale": (1.0, 1.0, 1.0, 1.0, 1.0)},
                     {"strength": "fraction of the fitted transfer", "scale": "px@0.5um"}, source,
                     bool(profile.get("held_out", False)), kernel, sample)


def _resolve(name: str) -> Optional[ShiftSpec]:
    ref = name[len(PREFIX):]
    path = Path(ref)
    if not (path.suffix.lower() == ".json" and path.is_file()):
        return None
    return _spec(name, ScannerTransfer.read_profile(path), str(path))


def bundled_profiles() -> list:
    """Names of the bundled scanner-transfer profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


for _p in sorted(PROFILES_DIR.glob("*.json")):
    register_shift(_spec(PREFIX + _p.stem, json.loads(_p.read_text()), f"bundled {_p.name}"))
register_resolver(PREFIX, _resolve)

__all__ = ["PREFIX", "PROFILES_DIR", "bundled_profiles"]
