"""Routes of a shift: the batched float route (every device, autograd, any dtype) and the 8-bit CPU route
("uint8-cpu": uint8 tiles in and out, one OpenCV call or lookup table per tile; :mod:`shiftkit.functional.scanner_u8`).

:func:`shiftkit.data.shifted.shift_tiles` picks the route from the input (uint8 on CPU and a shift that has one →
"uint8-cpu"; anything else → "float"), so ``shiftkit simulate``, :class:`~shiftkit.data.ShiftedDataset` and the
stress test give the same pixels for the same tiles, seed and device. The route is recorded in every manifest.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from ..core.shift_registry import ShiftSpec
from ..functional.scanner_u8 import pointwise_lut

ROUTES = ("float", "uint8-cpu")


def has_u8_route(spec: ShiftSpec) -> bool:
    """Whether ``spec`` runs on 8-bit tiles without a float round trip. Composite profiles do not: rounding to 8 bits
    between their components moved pixels by 1.3–1.8 levels on average (up to 71 where a steep tone curve meets
    JPEG) against their float route, and was slower than it (float sensor noise and seams dominate)."""
    return spec.kernel_u8 is not None or spec.pointwise


def route_on(spec: ShiftSpec, device) -> str:
    """The route of uint8 tiles on ``device``: "uint8-cpu" on CPU for a shift with an 8-bit kernel, else "float"."""
    return "uint8-cpu" if torch.device(device).type == "cpu" and has_u8_route(spec) else "float"


def route_for(spec: ShiftSpec, images: torch.Tensor) -> str:
    """The route :func:`~shiftkit.data.shifted.shift_tiles` takes for ``images`` (float input: always "float")."""
    return route_on(spec, images.device) if images.dtype == torch.uint8 else "float"


def apply_u8(spec: ShiftSpec, tiles: np.ndarray, params: Dict[str, torch.Tensor]) -> np.ndarray:
    """Apply ``spec`` on the 8-bit route: uint8 numpy ``(B, H, W, 3)`` in and out, the float route's parameters.

    A pointwise shift runs as lookup tables, a shift with ``kernel_u8`` runs it; a shift with neither has no 8-bit
    route (:func:`~shiftkit.data.shifted.shift_tiles` sends it the float route) and is refused.
    """
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"`tiles` of {spec.name!r}: expected uint8 (B, H, W, 3), got {tiles.dtype} {tiles.shape}")
    if spec.pointwise:
        return pointwise_lut(spec.kernel, tiles, params)
    if spec.kernel_u8 is None:
        raise ValueError(f"`spec` {spec.name!r} has no 8-bit route: expected a shift with kernel_u8 or pointwise=True")
    return spec.kernel_u8(tiles, params)


__all__ = ["ROUTES", "apply_u8", "has_u8_route", "route_for", "route_on"]
