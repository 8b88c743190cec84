"""Named scanner and slide-preparation shifts with calibrated severities (see docs/shifts.md)."""

from . import builtin  # noqa: F401  (registers the built-in shifts)
from . import transfer  # noqa: F401  (registers the bundled scanner-transfer profiles)
from .registry import FAMILIES, REFERENCE_MPP, ShiftSpec, get_spec, list_shifts, register_shift


def get_shift(name: str, severity: int = 3, *, mpp: float = REFERENCE_MPP, **kwargs):
    """A transform applying shift ``name`` at ``severity`` (1..5) to tiles of ``mpp`` µm/px.

    Examples:
        >>> t = get_shift("gaussian-defocus", 3, seed=0)
        >>> t.values
        {'sigma': 2.6}
    """
    from ..transforms.shift import Shift

    return Shift(name, severity=severity, mpp=mpp, **kwargs)


__all__ = ["FAMILIES", "REFERENCE_MPP", "ShiftSpec", "get_spec", "get_shift", "list_shifts", "register_shift"]
