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
from ..functional.scanner_u8 import pointwise_lut, post_tables, tile_map

ROUTES = ("float", "uint8-cpu")


def has_u8_route(spec: ShiftSpec) -> bool:
    """Whether ``spec`` runs on 8-bit tiles without a float round trip: a shift with an 8-bit kernel or a pointwise
    one, or a composite whose every component has one (both scanner profiles; how close they stay to the float
    route is stated and tested in tests/test_routes.py)."""
    if spec.components:
        return all(has_u8_route(c) for c in spec.components)
    return spec.kernel_u8 is not None or spec.pointwise


def route_on(spec: ShiftSpec, device) -> str:
    """The route of uint8 tiles on ``device``: "uint8-cpu" on CPU for a shift with an 8-bit kernel, else "float"."""
    return "uint8-cpu" if torch.device(device).type == "cpu" and has_u8_route(spec) else "float"


def route_for(spec: ShiftSpec, images: torch.Tensor) -> str:
    """The route :func:`~shiftkit.data.shifted.shift_tiles` takes for ``images`` (float input: always "float")."""
    return route_on(spec, images.device) if images.dtype == torch.uint8 else "float"


def apply_u8(spec: ShiftSpec, tiles: np.ndarray, params: Dict[str, torch.Tensor]) -> np.ndarray:
    """Apply ``spec`` on the 8-bit route: uint8 numpy ``(B, H, W, 3)`` in and out, the float route's parameters.

    A pointwise shift runs as lookup tables, a shift with ``kernel_u8`` runs it, a composite runs its components'
    8-bit routes in order (:func:`_composite_u8`); a shift with none of these has no 8-bit route
    (:func:`~shiftkit.data.shifted.shift_tiles` sends it the float route) and is refused.
    """
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"`tiles` of {spec.name!r}: expected uint8 (B, H, W, 3), got {tiles.dtype} {tiles.shape}")
    if spec.pointwise:
        return pointwise_lut(spec.kernel, tiles, params)
    if spec.components and has_u8_route(spec):
        return _composite_u8(spec, tiles, params)
    if spec.kernel_u8 is None:
        raise ValueError(f"`spec` {spec.name!r} has no 8-bit route: expected a shift with kernel_u8 or pointwise=True")
    return spec.kernel_u8(tiles, params)


def _component_params(params: dict[str, torch.Tensor], sp: ShiftSpec) -> dict[str, torch.Tensor]:
    pre = sp.name + "."
    return {k[len(pre):]: v for k, v in params.items() if k.startswith(pre)}


def _chain(specs, params):
    """The float kernels of consecutive pointwise components as one function of a ``(B, 3, H, W)`` batch."""
    def kernel(x, _=None):
        for sp in specs:
            x = sp.kernel(x, _component_params(params, sp))
        return x
    return kernel


def _tile_chain(fns):
    """One per-tile function applying ``fns`` in order (``None`` from one: the tile unchanged)."""
    def chain(i, tile):
        for fn in fns:
            y = fn(i, tile)
            tile = tile if y is None else y
        return tile
    return chain


def _composite_u8(spec: ShiftSpec, tiles: np.ndarray, params: Dict[str, torch.Tensor]) -> np.ndarray:
    """A composite on 8-bit tiles, component by component in physical order, rounding to 8 bits only where it must:

    * two or more consecutive components with a float32 tile function (``tile_f32``: disk blur, vignetting,
      saturation, sharpening) run chained on each tile in float32 and round once at the end (a sharpening would
      otherwise amplify the roundings before it);
    * consecutive tone curves run as one table computed by their float kernels in sequence;
    * tone curves right after sensor noise are fused into the noise sampler at 12 bits (``post``);
    * every other component runs its own 8-bit route (a codec rounds anyway)."""
    comps, x, i = spec.components, tiles, 0

    def run_end(start: int, has) -> int:  # the end of the run of components from ``start`` that ``has``
        end = start
        while end < len(comps) and has(comps[end]):
            end += 1
        return end

    while i < len(comps):
        sp, f32_end, tones_end = comps[i], run_end(i, lambda c: c.tile_f32 is not None), run_end(i + 1, lambda c: c.pointwise)
        if f32_end - i >= 2:  # each tile through the whole group in float32 while it is in cache, then rounded
            fns = [c.tile_f32(_component_params(params, c), x.shape) for c in comps[i:f32_end]]
            x, i = tile_map(x, _tile_chain(fns), True), f32_end
        elif sp.pointwise:  # this tone curve and the ones after it, as one table
            x, i = pointwise_lut(_chain(comps[i:tones_end], params), x, {}), tones_end
        elif sp.u8_post and tones_end > i + 1:  # noise, then the tone curves after it fused into its tables
            post = post_tables(_chain(comps[i + 1:tones_end], params), x.shape[0])
            x, i = sp.kernel_u8(x, _component_params(params, sp), post=post), tones_end
        else:
            x, i = apply_u8(sp, x, _component_params(params, sp)), i + 1
    return x


__all__ = ["ROUTES", "apply_u8", "has_u8_route", "route_for", "route_on"]
