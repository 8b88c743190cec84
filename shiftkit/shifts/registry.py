"""The shift registry's public names (the machinery lives in :mod:`shiftkit.core.shift_registry`, where the
transforms layer can import it too)."""

from ..core.shift_registry import (  # noqa: F401
    FAMILIES,
    PHYSICAL_ORDER,
    REFERENCE_MPP,
    ShiftSpec,
    composite,
    direction,
    get_spec,
    list_shifts,
    register_shift,
    unregister_shift,
)

__all__ = ["FAMILIES", "PHYSICAL_ORDER", "REFERENCE_MPP", "ShiftSpec", "composite", "direction", "get_spec",
           "list_shifts", "register_shift", "unregister_shift"]
