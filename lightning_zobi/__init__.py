"""lightning-zobi: zeroth-order fine-tuning, bilevel fine-tune-plus-unlearn and QZO as Lightning callbacks.

The pure-PyTorch core lives in :mod:`lightning_zobi.zo` (and ``bilevel``, ``quant``, ``unlearn``,
``diffusion``); everything that touches Lightning lives in :mod:`lightning_zobi.lightning`.
Importing this package registers the ``zo_ddp`` / ``zo_fsdp`` strategies with Lightning.
"""

from lightning_zobi.bilevel import (
    BilevelProblem,
    BilevelZOFO,
    GammaSchedule,
    ValueFunctionFree,
    ValueFunctionPenalty,
)
from lightning_zobi.lightning.callbacks import QZO, Bilevel, ZeroOrder
from lightning_zobi.lightning.checkpoint_io import AtomicCheckpointIO, export_safetensors
from lightning_zobi.lightning.strategies import ZODDPStrategy, ZOFSDPStrategy
from lightning_zobi.quant import QZOOptimizer, find_quant_scales, quantize_linear_4bit_
from lightning_zobi.zo import (
    LOZO,
    LOZOM,
    OPTIMIZERS,
    ZOSGD,
    FusedZOSGD,
    SparseZO,
    ZOAdam,
    ZOFOHybrid,
    ZOOptimizer,
    ZOSGDCons,
    ZOSGDMomentum,
    ZOSign,
    build_optimizer,
)

__version__ = "0.1.0"

__all__ = [
    "LOZO",
    "LOZOM",
    "OPTIMIZERS",
    "QZO",
    "ZOSGD",
    "AtomicCheckpointIO",
    "Bilevel",
    "BilevelProblem",
    "BilevelZOFO",
    "FusedZOSGD",
    "GammaSchedule",
    "QZOOptimizer",
    "SparseZO",
    "ValueFunctionFree",
    "ValueFunctionPenalty",
    "ZOAdam",
    "ZODDPStrategy",
    "ZOFOHybrid",
    "ZOFSDPStrategy",
    "ZOOptimizer",
    "ZOSGDCons",
    "ZOSGDMomentum",
    "ZOSign",
    "ZeroOrder",
    "__version__",
    "build_optimizer",
    "export_safetensors",
    "find_quant_scales",
    "quantize_linear_4bit_",
]
