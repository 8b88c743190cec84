"""albumentations wrapper of shiftkit transforms (see :func:`shiftkit.transforms.to_albumentations`)."""

from __future__ import annotations

from typing import Union

import albumentations as A
import torch

from ..core.rng import derive_seed
from .base import ShiftkitAugmentation, apply_to_image, as_transform


class AlbumentationsStainTransform(A.ImageOnlyTransform):
    """Runs a shiftkit transform on numpy ``(H, W, 3)`` uint8/float32 images inside ``A.Compose``.

    Args:
        transform: a shiftkit transform or its ``to_dict()``.
        p: albumentations' probability (the wrapped transform's own ``p`` applies too).
    """

    def __init__(self, transform: Union[ShiftkitAugmentation, dict], p: float = 1.0):
        super().__init__(p=p)
        self.transform = as_transform(transform)

    def get_params(self) -> dict:
        seed = int(self.random_generator.integers(0, 2**62))
        info = torch.utils.data.get_worker_info()
        if info is not None:  # albumentations 2.0 does not re-seed per DataLoader worker: mix the worker's seed in
            seed = derive_seed(seed, info.seed)
        return {"torch_seed": seed}

    def apply(self, img, torch_seed: int = 0, **params):
        return apply_to_image(self.transform, img, torch.Generator().manual_seed(torch_seed))

    def get_transform_init_args(self) -> dict:
        return {"transform": self.transform.to_dict()}

    def get_transform_init_args_names(self):
        return ("transform",)
