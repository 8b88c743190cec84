"""Input contract, error types."""

from .errors import InvalidArgumentError, InvalidImageError, ShiftkitError, StainEstimationError, UnknownNameError
from .image import ImageSpec, as_float_batch, from_batch, to_batch

__all__ = [
    "ShiftkitError",
    "InvalidImageError",
    "InvalidArgumentError",
    "StainEstimationError",
    "UnknownNameError",
    "ImageSpec",
    "to_batch",
    "from_batch",
    "as_float_batch",
]
