"""Transforms as ``nn.Module``s."""

from .normalizer import StainNormalizer

__all__ = ["StainNormalizer"]
