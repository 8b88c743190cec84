"""Self-supervised pretraining under controlled shift (DINO; needs the ``train`` extra: lightly)."""

from .dino import (RECIPES, PretrainConfig, TrainingDivergedError, checkpoint_config, knn_monitor, load_checkpoint, pretrain,
                   twin_index)
from .sampling import DiversitySampler, diversity_stats, entropy_bits
from .views import AUGMENT_PRESETS, MultiCropAugment, transfer_shift_names

__all__ = ["pretrain", "PretrainConfig", "checkpoint_config", "load_checkpoint", "RECIPES", "TrainingDivergedError", "knn_monitor", "DiversitySampler",
           "diversity_stats", "entropy_bits", "MultiCropAugment", "AUGMENT_PRESETS",
           "twin_index", "transfer_shift_names"]
