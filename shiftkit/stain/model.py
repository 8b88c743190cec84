"""The Beer–Lambert stain model shared by every part of shiftkit.

Conventions (cited by the rest of the library):

* Images are float ``(B, 3, H, W)`` RGB in ``[0, 1]`` (8-bit value / 255).
* Optical density uses the **natural log**: ``OD = -ln(I / I0)`` per channel, with the background
  intensity ``I0`` explicit and in the same ``[0, 1]`` units (``I0 = 1`` is 255 in 8-bit;
  torchstain's ``Io = 240`` is ``I0 = 240/255``). Intensities are clamped to
  ``[min_intensity, I0]`` first, so ``OD`` lies in ``[0, ln(I0 / min_intensity)]`` and pixels
  brighter than ``I0`` are background (``OD = 0``).
* OD thresholds are stated in natural-log units. Macenko's ``β = 0.15`` is in **log10** units,
  i.e. ``0.15 · ln 10 = 0.345`` here (:data:`MACENKO_BETA_LN`); torchstain and MONAI compare
  their natural-log OD with 0.15, a lower effective threshold.
* Stain matrices are ``(B, S, 3)``: rows are unit-norm RGB OD vectors, hematoxylin first, eosin
  second, optionally a residual third row (:func:`complete_stain_matrix`).
* Concentrations are ``(B, S, H, W)`` (or ``(B, S, N)`` on flattened pixels): ``OD = C^T S``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..core.errors import InvalidArgumentError, UnknownNameError
from ..core.image import lookup_uint8

LN10 = math.log(10.0)
#: Macenko et al.'s OD threshold 0.15 (log10) expressed in natural-log OD units.
MACENKO_BETA_LN = 0.15 * LN10
#: Smallest intensity used in the log: an 8-bit 0 is treated as 1/255 (as StainTools does).
MIN_INTENSITY = 1.0 / 255.0
#: log2(e): ``exp(x) = exp2(x·LOG2E)``. Kernels fold it into their small matrices because ``torch.exp2`` is
#: the cheaper call on CPU at the same accuracy (figures in docs/benchmarks.md, "Where the time goes").
LOG2E = 1.4426950408889634

_REFERENCES = {
    # Ruifrok & Johnston, "Quantification of histochemical staining by color deconvolution",
    # Anal Quant Cytol Histol 23(4):291-299, 2001 (H, E and DAB rows as published, normalised here).
    "ruifrok": [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]],
    "ruifrok-hdab": [[0.65, 0.70, 0.29], [0.27, 0.57, 0.78]],
    # Reference of the Macenko et al. (ISBI 2009) MATLAB implementation by M. Veta, as used by
    # HEnorm_python, torchstain, MONAI and cuCIM (HERef columns, transposed to rows).
    "macenko": [[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]],
}
#: 99th-percentile concentrations that go with the "macenko" reference (maxCRef, natural-log OD).
MACENKO_REFERENCE_MAX_CONCENTRATIONS = (1.9705, 1.0308)

#: Ruifrok & Johnston's DAB vector (for HED colour deconvolution).
RUIFROK_DAB = (0.27, 0.57, 0.78)


def reference_stain_matrix(name: str = "macenko", *, dtype: torch.dtype = torch.float32,
                           device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """A named reference stain matrix ``(2, 3)`` with unit-norm rows (H, E).

    Args:
        name: ``"macenko"`` (Veta's reference used by torchstain/MONAI/cuCIM), ``"ruifrok"`` (H&E of
            Ruifrok & Johnston 2001) or ``"ruifrok-hdab"`` (H and DAB).
        dtype: dtype of the returned matrix.
        device: device of the returned matrix.

    Returns:
        Tensor ``(2, 3)``.

    Examples:
        >>> reference_stain_matrix("ruifrok").shape
        torch.Size([2, 3])
    """
    if name not in _REFERENCES:
        raise UnknownNameError("name", name, _REFERENCES)
    m = torch.tensor(_REFERENCES[name], dtype=torch.float64)
    return (m / m.norm(dim=-1, keepdim=True)).to(dtype=dtype, device=device)


def list_reference_matrices() -> list[str]:
    """Names accepted by :func:`reference_stain_matrix`."""
    return sorted(_REFERENCES)


def _check_i0(i0: float) -> None:
    if not (isinstance(i0, (int, float)) and MIN_INTENSITY < float(i0) <= 1.0):
        raise InvalidArgumentError(
            f"`i0` out of range: expected the background intensity in (1/255, 1] in [0, 1] units "
            f"(e.g. 240/255), got {i0!r}"
        )


def rgb_to_od(images: torch.Tensor, i0: float = 1.0, min_intensity: float = MIN_INTENSITY) -> torch.Tensor:
    """RGB in ``[0, 1]`` to natural-log optical density.

    ``OD = -ln(clamp(I, min_intensity, I0) / I0)``. Computed in float32 (float64 for float64 input).

    Args:
        images: ``(*, 3, H, W)`` in ``[0, 1]``.
        i0: background (incident light) intensity in ``[0, 1]`` units.
        min_intensity: floor applied before the log (default 1/255).

    Returns:
        OD of the same shape, in ``[0, ln(i0 / min_intensity)]``.

    Examples:
        >>> rgb_to_od(torch.ones(1, 3, 2, 2)).abs().max().item()
        0.0
    """
    _check_i0(i0)
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    od = x.clamp(min_intensity, i0)  # new tensor: the in-place steps below never touch the input
    if i0 != 1.0:
        od = od / i0 if od.requires_grad else od.div_(i0)
    return -torch.log(od) if od.requires_grad else od.log_().neg_()


def uint8_lookup(u8: torch.Tensor, kind: str, i0: float = 1.0) -> torch.Tensor:
    """A per-pixel function of 8-bit images by a 256-entry lookup table, as float32 of ``u8``'s shape.

    ``kind``: ``"od"`` (:func:`rgb_to_od` of ``k / 255``) or ``"log"`` (``ln clamp(k / 255, 1/255, I0)``, the
    log-intensity the normalization kernels start from). The table holds those functions evaluated by the same
    float32 code on the 256 values the image contract gives uint8 pixels (``k · (1/255)``), so a pixel's value
    is the float path's to within the last bit of the vectorized log; one table read replaces a clamp and a
    logarithm per channel (:func:`shiftkit.core.image.lookup_uint8`).
    """
    _check_i0(i0)
    if kind == "od":
        return lookup_uint8(u8, ("od", float(i0)), lambda v: rgb_to_od(v, i0=i0))
    return lookup_uint8(u8, ("log", float(i0)), lambda v: v.clamp(MIN_INTENSITY, i0).log_())


def od_to_rgb(od: torch.Tensor, i0: float = 1.0) -> torch.Tensor:
    """Natural-log optical density back to RGB: ``I = clamp(I0 · exp(-OD), 0, 1)``."""
    _check_i0(i0)
    if od.requires_grad and torch.is_grad_enabled():
        return (i0 * torch.exp(-od)).clamp(0.0, 1.0)
    out = torch.mul(od, -LOG2E).exp2_()  # exp(−OD) by exp2 (see LOG2E); a new tensor, the steps below in place
    if i0 != 1.0:
        out.mul_(i0)
    return out.clamp_(0.0, 1.0)


def normalize_rows(matrix: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale the last dimension to unit L2 norm (zero rows stay zero)."""
    return matrix / matrix.norm(dim=-1, keepdim=True).clamp_min(eps)


def complete_stain_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """Append the residual row: the normalized cross product of H and E.

    Args:
        matrix: ``(*, 2, 3)`` stain matrix.

    Returns:
        ``(*, 3, 3)``; the third row is orthogonal to both stains. Its sign is chosen so that its
        component sum is non-negative.
    """
    if matrix.shape[-2:] != (2, 3):
        raise InvalidArgumentError(f"`matrix` has the wrong shape: expected (*, 2, 3), got {tuple(matrix.shape)}")
    r = torch.linalg.cross(matrix[..., 0, :], matrix[..., 1, :], dim=-1)
    r = normalize_rows(r)
    r = torch.where(r.sum(-1, keepdim=True) < 0, -r, r)
    return torch.cat([matrix, r.unsqueeze(-2)], dim=-2)


def stain_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angles in degrees between corresponding rows of two ``(*, S, 3)`` stain matrices."""
    cos = (normalize_rows(a.double()) * normalize_rows(b.double())).sum(-1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos)).to(a.dtype if a.is_floating_point() else torch.float32)


def validate_stain_matrix(matrix: torch.Tensor, arg: str = "matrix") -> torch.Tensor:
    """Check a user-given stain matrix ``(2, 3)`` or ``(B, 2, 3)``: finite, non-zero, not parallel.

    Returns the matrix with unit rows, as float32 (float64 kept); rows that are unit to within rounding are
    returned unchanged, so a saved and reloaded matrix is the same to the bit.
    """
    if not isinstance(matrix, torch.Tensor):
        matrix = torch.as_tensor(matrix, dtype=torch.float32)
    if matrix.shape[-2:] != (2, 3) or matrix.ndim not in (2, 3):
        raise InvalidArgumentError(f"`{arg}` has the wrong shape: expected (2, 3) or (B, 2, 3), got {tuple(matrix.shape)}")
    if not bool(torch.isfinite(matrix).all()):
        raise InvalidArgumentError(f"`{arg}` has non-finite values: expected finite stain vectors, got {matrix.tolist()}")
    norms = matrix.norm(dim=-1)
    if bool((norms < 1e-6).any()):
        raise InvalidArgumentError(f"`{arg}` has a zero row: expected non-zero stain vectors, got {matrix.tolist()}")
    m = matrix if matrix.dtype == torch.float64 else matrix.float()
    unit = ((m.norm(dim=-1, keepdim=True) - 1).abs() <= 4 * torch.finfo(m.dtype).eps)
    m = torch.where(unit, m, normalize_rows(m))  # rows already unit (e.g. saved ones) are kept bit for bit
    cos = (m[..., 0, :] * m[..., 1, :]).sum(-1).abs()
    if bool((cos > math.cos(math.radians(1.0))).any()):
        raise InvalidArgumentError(
            f"`{arg}` is degenerate: expected H and E vectors at least 1 degree apart, got {matrix.tolist()}"
        )
    return m
