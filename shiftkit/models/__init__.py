"""Encoders by spec (the bundled default, foundation-model presets, timm names, run folders, TorchScript, callables)
and embedding extraction."""

from .encoders import Encoder, load_encoder
from .presets import PRESETS, ModelPreset, build_preset, get_preset, list_models

__all__ = ["Encoder", "load_encoder", "PRESETS", "ModelPreset", "build_preset", "get_preset", "list_models"]
