"""Presets of known pathology foundation models: architecture (timm name and arguments), input size, normalisation
and pooling, so that ``--model uni2-h --weights local.safetensors`` stress-tests a local checkpoint without knowing
any of it by heart. Nothing is downloaded: without ``weights`` the architecture is built with random weights
(seed 0), which tests the pipeline, not the model.

Only models whose published loading code is a timm architecture are listed, with the arguments of their model
cards. Phikon-v2 and Hibou (Hugging Face transformers) and CONCH (open_clip) are not timm-native: load them through
``--model module:callable``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..core.errors import InvalidArgumentError, UnknownNameError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
POOLINGS = ("cls", "mean", "cls+mean")


@dataclass(frozen=True)
class ModelPreset:
    """One known encoder: how to build it and how to feed and pool it."""

    name: str
    timm_name: str
    timm_kwargs: Dict[str, object]
    embed_dim: int
    pooling: str = "cls"
    input_size: int = 224
    mean: Tuple[float, float, float] = IMAGENET[0]
    std: Tuple[float, float, float] = IMAGENET[1]
    source: str = ""
    params_m: float = 0.0
    aliases: Tuple[str, ...] = field(default=())

    @property
    def out_dim(self) -> int:
        """Dimension of the pooled embedding (``cls+mean`` concatenates two tokens)."""
        return self.embed_dim * (2 if self.pooling == "cls+mean" else 1)

    def kwargs(self) -> dict:
        """``timm.create_model`` keyword arguments, with the layer names resolved to classes."""
        from timm.layers import SwiGLUPacked

        layers = {"SwiGLUPacked": SwiGLUPacked, "SiLU": nn.SiLU}
        return {k: layers.get(v, v) if isinstance(v, str) else v for k, v in self.timm_kwargs.items()}


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}
PRESETS: Dict[str, ModelPreset] = {p.name: p for p in (
    ModelPreset("uni", "vit_large_patch16_224",
                {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
                1024, "cls", source="MahmoodLab/UNI (Chen et al. 2024), model card", params_m=303),
    ModelPreset("uni2-h", "vit_giant_patch14_224",
                {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
                 "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True, "reg_tokens": 8,
                 "dynamic_img_size": True, **_SWIGLU},
                1536, "cls", source="MahmoodLab/UNI2-h, model card", params_m=681),
    ModelPreset("virchow2", "vit_huge_patch14_224",
                {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375, "reg_tokens": 4,
                 "global_pool": "", "dynamic_img_size": True, **_SWIGLU},
                1280, "cls+mean", source="paige-ai/Virchow2 (Zimmermann et al. 2024), model card: class token "
                "concatenated with the mean of the patch tokens", params_m=632),
    ModelPreset("h-optimus-0", "vit_giant_patch14_reg4_dinov2",
                {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": False},
                1536, "cls", mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
                source="bioptimus/H-optimus-0, model card", params_m=1134),
    ModelPreset("h-optimus-1", "vit_giant_patch14_reg4_dinov2",
                {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": False},
                1536, "cls", mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
                source="bioptimus/H-optimus-1, model card", params_m=1134),
    ModelPreset("prov-gigapath", "vit_giant_patch14_dinov2",
                {"img_size": 224, "num_classes": 0}, 1536, "cls",
                source="prov-gigapath/prov-gigapath tile encoder (Xu et al. 2024), model card", params_m=1134),
    ModelPreset("kaiko-vits16", "vit_small_patch16_224", {"num_classes": 0, "dynamic_img_size": True}, 384, "cls",
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), source="kaiko-ai towards_large_pathology_fms, ViT-S/16",
                params_m=21.7),
    ModelPreset("kaiko-vits8", "vit_small_patch8_224", {"num_classes": 0, "dynamic_img_size": True}, 384, "cls",
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), source="kaiko-ai towards_large_pathology_fms, ViT-S/8",
                params_m=21.7),
    ModelPreset("kaiko-vitb16", "vit_base_patch16_224", {"num_classes": 0, "dynamic_img_size": True}, 768, "cls",
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), source="kaiko-ai towards_large_pathology_fms, ViT-B/16",
                params_m=86),
    ModelPreset("kaiko-vitb8", "vit_base_patch8_224", {"num_classes": 0, "dynamic_img_size": True}, 768, "cls",
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), source="kaiko-ai towards_large_pathology_fms, ViT-B/8",
                params_m=86),
    ModelPreset("kaiko-vitl14", "vit_large_patch14_reg4_dinov2", {"img_size": 224, "num_classes": 0, "dynamic_img_size": True},
                1024, "cls", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                source="kaiko-ai towards_large_pathology_fms, ViT-L/14 with registers", params_m=304),
)}


class PooledViT(nn.Module):
    """A timm ViT whose ``forward`` returns the pooled embedding: the class token, the mean of the patch tokens
    (register tokens excluded), or both concatenated."""

    def __init__(self, vit: nn.Module, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise UnknownNameError("pooling", pooling, POOLINGS)
        self.vit, self.pooling = vit, pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)  # (B, prefix + patches, D)
        prefix = int(getattr(self.vit, "num_prefix_tokens", 1))
        cls, patches = tokens[:, 0], tokens[:, prefix:].mean(1)
        if self.pooling == "cls":
            return cls
        if self.pooling == "mean":
            return patches
        return torch.cat([cls, patches], dim=-1)


def list_models(pattern: str = "*") -> List[str]:
    """Preset names matching a wildcard ``pattern``."""
    import fnmatch

    return sorted(n for n in PRESETS if fnmatch.fnmatch(n, pattern))


def get_preset(name: str) -> ModelPreset:
    key = str(name).lower()
    if key not in PRESETS:
        raise UnknownNameError("model", name, PRESETS)
    return PRESETS[key]


def build_preset(name: str, device: Optional[str] = None, input_size: Optional[int] = None) -> PooledViT:
    """The preset's architecture with random weights (seed 0, the caller's RNG untouched), wrapped to pool.

    ``device="meta"`` builds it without allocating memory (shapes only). ``input_size`` overrides the image size
    for presets built with ``dynamic_img_size`` (others refuse another size).
    """
    import timm

    p = get_preset(name)
    kw = p.kwargs()
    if input_size is not None and input_size != p.input_size:
        if not kw.get("dynamic_img_size", False):
            raise InvalidArgumentError(f"`input_size` is fixed for {p.name}: expected {p.input_size}, got {input_size}")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if device == "meta":
            with torch.device("meta"):
                vit = timm.create_model(p.timm_name, pretrained=False, **kw)
        else:
            vit = timm.create_model(p.timm_name, pretrained=False, **kw)
    return PooledViT(vit, p.pooling)


__all__ = ["ModelPreset", "PRESETS", "POOLINGS", "PooledViT", "list_models", "get_preset", "build_preset"]
