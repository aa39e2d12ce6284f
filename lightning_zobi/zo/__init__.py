"""Zeroth-order core: seeded directions, two-point estimators and ZO optimizers (no Lightning)."""

from lightning_zobi.zo.directions import (
    DirectionKey,
    Directions,
    GaussianDirections,
    LowRankDirections,
    SparseDirections,
    derive_seed,
)
from lightning_zobi.zo.distributed import ParameterDivergenceError, ZODataParallel, tensor_checksum
from lightning_zobi.zo.estimators import Estimate, central_difference, forward_difference
from lightning_zobi.zo.fused import FusedGaussianDirections, FusedZOSGD, fused_available
from lightning_zobi.zo.offload import ParameterOffload, offload_parameters
from lightning_zobi.zo.optim import (
    LOZO,
    LOZOM,
    OPTIMIZERS,
    ZOSGD,
    NonFiniteLossError,
    SparseZO,
    ZOAdam,
    ZOFOHybrid,
    ZOOptimizer,
    ZOSGDCons,
    ZOSGDMomentum,
    ZOSign,
    build_optimizer,
    extra_state_bytes,
)
from lightning_zobi.zo.params import select_parameters
from lightning_zobi.zo.sharded import ChunkedGaussianDirections, chunked_normal, use_sharded_directions

__all__ = [
    "LOZO",
    "LOZOM",
    "OPTIMIZERS",
    "ZOSGD",
    "ChunkedGaussianDirections",
    "DirectionKey",
    "Directions",
    "Estimate",
    "FusedGaussianDirections",
    "FusedZOSGD",
    "GaussianDirections",
    "LowRankDirections",
    "NonFiniteLossError",
    "ParameterDivergenceError",
    "ParameterOffload",
    "SparseDirections",
    "SparseZO",
    "ZOAdam",
    "ZODataParallel",
    "ZOFOHybrid",
    "ZOOptimizer",
    "ZOSGDCons",
    "ZOSGDMomentum",
    "ZOSign",
    "build_optimizer",
    "central_difference",
    "chunked_normal",
    "derive_seed",
    "extra_state_bytes",
    "forward_difference",
    "offload_parameters",
    "fused_available",
    "select_parameters",
    "tensor_checksum",
    "use_sharded_directions",
]
