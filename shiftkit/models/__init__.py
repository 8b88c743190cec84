"""Encoders by spec and embedding extraction."""

from .encoders import Encoder, load_encoder

__all__ = ["Encoder", "load_encoder"]
