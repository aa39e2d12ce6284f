"""Diffusion compression: torch-pruning channel pruning, BK-SDM block removal, distillation, sampling, judge.

Pure torch + diffusers (no Lightning); the Lightning wrapper is
:class:`lightning_zobi.lightning.modules.diffusion.DiffusionModule`.
"""

from lightning_zobi.diffusion.distill import (
    FeatureDistiller,
    denoising_loss,
    output_distillation_loss,
    record_features,
)
from lightning_zobi.diffusion.judge import DigitsCNN, load_judge, save_judge
from lightning_zobi.diffusion.pruning import (
    PruneResult,
    UNetCost,
    load_pruned_unet,
    measure_unet,
    prune_unet_channels,
    remove_unet_blocks,
    save_pruned_unet,
)
from lightning_zobi.diffusion.sampling import sample_class_conditional

__all__ = [
    "DigitsCNN",
    "FeatureDistiller",
    "PruneResult",
    "UNetCost",
    "denoising_loss",
    "load_judge",
    "load_pruned_unet",
    "measure_unet",
    "output_distillation_loss",
    "prune_unet_channels",
    "record_features",
    "remove_unet_blocks",
    "sample_class_conditional",
    "save_judge",
    "save_pruned_unet",
]
