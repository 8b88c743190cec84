"""The registry of named shifts (core owns the name registry, DESIGN layers): family, severity table 1–5 in
physical units with its source, train/held-out. The built-in shifts are registered by :mod:`shiftkit.shifts`."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from .errors import InvalidArgumentError, UnknownNameError

FAMILIES = ("stain", "optics", "illumination", "sensor", "isp", "storage", "tissue", "scanner", "scanner-transfer")
#: The fixed physical order of the acquisition chain (REFERENCES B3) in which composites apply components.
PHYSICAL_ORDER = ("stain", "tissue", "optics", "sensor", "isp", "stitching", "storage")
_DEFAULT_STAGE = {"stain": "stain", "tissue": "tissue", "optics": "optics", "illumination": "optics",
                  "sensor": "sensor", "isp": "isp", "storage": "storage", "scanner": "storage",
                  "scanner-transfer": "storage"}
#: Pixel-valued severities are given at this resolution and rescaled to the tile's µm/px.
REFERENCE_MPP = 0.5
#: Version of the severity tables and augmentation presets: bumped with any change of a shift's values per severity
#: or a preset's ranges (with the golden outputs in tests/golden), recorded in every manifest and report.
#: 1: the first tables. 2: stain-hue severities (3, 6, 9, 12, 15)° (were 2, 4, 6, 9, 12) and the StainAugment
#: "strong" preset's angle 0–15° (was 0–10°), calibrated on a real scanner change (experiments/calibration).
#: 3: the bundled scanner-transfer profiles' colour maps go on linearly beyond their input domain (same maps inside;
#: before, the cubic everywhere).
SEVERITY_TABLE_VERSION = 3


@dataclass(frozen=True)
class ShiftSpec:
    """One named shift.

    Attributes:
        name: kebab-case name.
        family: one of :data:`FAMILIES`.
        description: physical cause and simulation method.
        table: parameter name → 5 values (severities 1..5), in the units of ``units``.
        units: parameter name → unit (``"px@0.5um"`` values are rescaled with the tile's µm/px).
        source: where the severity values come from (REFERENCES B3 anchors; "proposed" when none).
        held_out: True = an evaluation shift, kept out of the default training families.
        kernel: ``kernel(x, params) -> x`` with ``params`` a dict of ``(B, ...)`` tensors.
        sample: ``sample(values, generator, batch) -> params``: ``values`` maps each table parameter to its
            ``(B,)`` values at the sample's severity; the sampler adds the random parts (directions, seeds).
        kernel_u8: optional 8-bit CPU twin of ``kernel``: ``kernel_u8(tiles, params) -> tiles`` on uint8 numpy
            ``(B, H, W, 3)``, same parameters (the "uint8-cpu" route, :func:`shiftkit.shifts.routes.apply_u8`).
        pointwise: ``kernel`` maps each channel value on its own (a tone curve), so the 8-bit route applies it as
            one 256-entry lookup table per sample and channel, computed by ``kernel`` itself.
        tile_f32: optional ``tile_f32(params, shape) -> fn`` with ``fn(i, tile)`` the kernel on sample ``i``'s float32
            numpy ``(H, W, 3)`` tile in ``[0, 1]`` (``None``: unchanged), for batches of ``shape`` (CPU): a composite on
            the 8-bit route chains consecutive components that have one tile by tile, rounding once at the end.
        u8_post: ``kernel_u8`` also takes ``post=``, per-sample tone curves it applies to its result before rounding
            to 8 bits (sensor noise: a composite fuses the tone curves that follow it).
        components: a composite's component specs in the order they apply (empty for a plain shift).
    """

    name: str
    family: str
    description: str
    table: Dict[str, Tuple[float, ...]]
    units: Dict[str, str]
    source: str
    held_out: bool
    kernel: Callable = field(repr=False, compare=False)
    sample: Callable = field(repr=False, compare=False)
    stage: str = ""  # position in PHYSICAL_ORDER; default from the family (flat-field errors act in the optics)
    kernel_u8: Optional[Callable] = field(default=None, repr=False, compare=False)
    pointwise: bool = False
    u8_post: bool = False
    tile_f32: Optional[Callable] = field(default=None, repr=False, compare=False)
    components: tuple[ShiftSpec, ...] = field(default=(), repr=False, compare=False)

    @property
    def order(self) -> int:
        return PHYSICAL_ORDER.index(self.stage or _DEFAULT_STAGE[self.family])

    def values(self, severity: int, mpp: float = REFERENCE_MPP) -> Dict[str, float]:
        """The table's values at ``severity`` (1..5; 0 = identity is not tabulated), pixel values rescaled."""
        if not (isinstance(severity, int) and 1 <= severity <= 5):
            raise InvalidArgumentError(f"`severity` out of range: expected an integer 1..5, got {severity!r}")
        out = {}
        for k, vals in self.table.items():
            v = float(vals[severity - 1])
            if self.units.get(k, "").startswith("px@"):
                v = v * REFERENCE_MPP / float(mpp)
            out[k] = v
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "family": self.family, "description": self.description,
                "held_out": self.held_out, "source": self.source,
                "table": {k: list(v) for k, v in self.table.items()}, "units": dict(self.units)}


_SHIFTS: Dict[str, ShiftSpec] = {}


def register_shift(spec: ShiftSpec) -> ShiftSpec:
    """Add a shift; registering a name twice is an error."""
    if spec.name in _SHIFTS:
        raise InvalidArgumentError(f"`name` already registered: expected a new shift name, got {spec.name!r}")
    if spec.family not in FAMILIES:
        raise UnknownNameError("family", spec.family, FAMILIES)
    if any(len(v) != 5 for v in spec.table.values()):
        raise InvalidArgumentError(f"`table` of {spec.name!r} is invalid: expected 5 values per parameter")
    _SHIFTS[spec.name] = spec
    return spec


def unregister_shift(name: str) -> ShiftSpec:
    """Remove a registered shift (for plug-ins and tests that register their own) and return its spec."""
    if name not in _SHIFTS:
        raise UnknownNameError("shift", name, _SHIFTS)
    return _SHIFTS.pop(name)


#: Resolvers of parametrised names (``"scanner-transfer:<profile>"``): prefix → ``fn(name) -> ShiftSpec or None``.
_RESOLVERS: Dict[str, Callable] = {}
#: Specs built by a resolver, cached by name; not listed by :func:`list_shifts` (they are not registered names).
_RESOLVED: Dict[str, ShiftSpec] = {}


def register_resolver(prefix: str, resolve: Callable) -> None:
    """Let names starting with ``prefix`` be built on first use (e.g. a profile given as a JSON path)."""
    _RESOLVERS[prefix] = resolve


def get_spec(name: str) -> ShiftSpec:
    """The registered shift ``name``; a parametrised name (``"scanner-transfer:<profile or JSON path>"``) is resolved
    on first use and cached (it is not listed by :func:`list_shifts`)."""
    if name in _SHIFTS:
        return _SHIFTS[name]
    if name in _RESOLVED:
        return _RESOLVED[name]
    for prefix, resolve in _RESOLVERS.items():
        if str(name).startswith(prefix):
            spec = resolve(name)
            if spec is not None:
                return _RESOLVED.setdefault(spec.name, spec)
    raise UnknownNameError("shift", name, _SHIFTS)


def list_shifts(pattern: str = "*", *, family: str | None = None, held_out: bool | None = None) -> list[str]:
    """Registered shift names matching a wildcard ``pattern`` (e.g. ``"*blur*"``), optionally filtered."""
    return sorted(
        n for n, s in _SHIFTS.items()
        if fnmatch.fnmatch(n, pattern) and (family is None or s.family == family) and (held_out is None or s.held_out == held_out)
    )


def direction(gen: torch.Generator, batch: int) -> torch.Tensor:
    """``(B,)`` of ±1 (for shifts that go both ways, e.g. brighter/darker)."""
    return torch.where(torch.rand(batch, generator=gen) < 0.5, -1.0, 1.0)


def composite(name: str, components: list, description: str, held_out: bool) -> ShiftSpec:
    """A scanner profile: several registered shifts at the same severity, applied in :data:`PHYSICAL_ORDER`.

    Its table holds each component's parameters as ``"<shift>.<param>"``.
    """
    specs = sorted((get_spec(c) for c in components), key=lambda sp: sp.order)
    table = {f"{sp.name}.{k}": v for sp in specs for k, v in sp.table.items()}
    units = {f"{sp.name}.{k}": u for sp in specs for k, u in sp.units.items()}

    def split(params, sp):
        pre = sp.name + "."
        return {k[len(pre):]: v for k, v in params.items() if k.startswith(pre)}

    def kernel(x, params):
        for sp in specs:
            x = sp.kernel(x, split(params, sp))
        return x

    def sample(values, gen, batch):
        out = {}
        for sp in specs:
            out.update({f"{sp.name}.{k}": v for k, v in sp.sample(split(values, sp), gen, batch).items()})
        return out

    return ShiftSpec(name, "scanner", description + " Components, in order: " + ", ".join(sp.name for sp in specs) + ".",
                     table, units, "composite of " + ", ".join(sp.name for sp in specs), held_out, kernel, sample,
                     components=tuple(specs))
