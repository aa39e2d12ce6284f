"""Zeroth-order core: seeded directions, two-point estimators and ZO optimizers (no Lightning)."""

from lightning_zobi.zo.directions import DirectionKey, Directions, GaussianDirections, derive_seed
from lightning_zobi.zo.estimators import Estimate, central_difference, forward_difference
from lightning_zobi.zo.optim import OPTIMIZERS, ZOSGD, NonFiniteLossError, ZOOptimizer, build_optimizer

__all__ = [
    "DirectionKey",
    "Directions",
    "Estimate",
    "GaussianDirections",
    "NonFiniteLossError",
    "OPTIMIZERS",
    "ZOOptimizer",
    "ZOSGD",
    "build_optimizer",
    "central_difference",
    "derive_seed",
    "forward_difference",
]
