"""Adapters that run shiftkit transforms inside albumentations and torchvision pipelines.

Both use the same kernels and the same parameter draws (``ShiftkitAugmentation.draw_parameters``) as the
batched Kornia path; they only convert the image format (numpy HWC uint8/float32, or a ``(3, H, W)`` tensor)
at the boundary, keeping the caller's dtype and layout.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from .base import ShiftkitAugmentation, apply_to_image, as_transform


def to_albumentations(transform: Union[ShiftkitAugmentation, dict], p: float = 1.0):
    """An albumentations ``ImageOnlyTransform`` running ``transform`` on numpy ``(H, W, 3)`` uint8/float32 images.

    Its parameters are drawn from a torch generator seeded by the albumentations transform's own
    ``random_generator``, so ``A.Compose([...], seed=...)`` makes runs reproducible, every image gets its own draw,
    and DataLoader workers (which albumentations re-seeds) draw differently. The class lives in
    :mod:`shiftkit.transforms.albumentations_adapter` (imported here, so albumentations loads only when used).
    """
    from .albumentations_adapter import AlbumentationsStainTransform

    return AlbumentationsStainTransform(as_transform(transform), p=p)


class TorchvisionStainTransform(nn.Module):
    """A torchvision(v2)-style module for one image ``(3, H, W)`` (or a batch) of any dtype, e.g. in a Dataset.

    Draws its parameters from the wrapped transform's generator (re-seeded per DataLoader worker).
    """

    def __init__(self, transform: Union[ShiftkitAugmentation, dict]):
        super().__init__()
        self.transform = as_transform(transform)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return apply_to_image(self.transform, img, self.transform.generator)

    def extra_repr(self) -> str:
        return repr(self.transform)


def to_torchvision(transform: Union[ShiftkitAugmentation, dict]) -> TorchvisionStainTransform:
    """Wrap ``transform`` for torchvision ``v2.Compose`` pipelines and Dataset workers."""
    return TorchvisionStainTransform(as_transform(transform))
