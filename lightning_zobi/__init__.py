"""lightning-zobi: zeroth-order fine-tuning, bilevel fine-tune-plus-unlearn and QZO as Lightning callbacks.

The pure-PyTorch core lives in :mod:`lightning_zobi.zo` (and ``bilevel``, ``quant``, ``unlearn``,
``diffusion``); everything that touches Lightning lives in :mod:`lightning_zobi.lightning`.
Importing this package registers the ``zo_ddp`` / ``zo_fsdp`` strategies with Lightning.
"""

from lightning_zobi.bilevel import (
    BilevelProblem,
    BilevelZOFO,
    DataReweighting,
    GammaSchedule,
    ValueFunctionFree,
    ValueFunctionPenalty,
)
from lightning_zobi.lightning.callbacks import QZO, Bilevel, FlatnessMonitor, Reweighting, ZeroOrder
from lightning_zobi.lightning.checkpoint_io import AtomicCheckpointIO, export_safetensors
from lightning_zobi.lightning.datamodules.facts import FactsDataModule
from lightning_zobi.lightning.datamodules.unlearning import UnlearningDataModule
from lightning_zobi.lightning.modules.causal_lm import CausalLMModule
from lightning_zobi.lightning.modules.unlearning import UnlearningModule
from lightning_zobi.lightning.strategies import ZODDPStrategy, ZOFSDPStrategy
from lightning_zobi.quant import QZOOptimizer, find_quant_scales, quantize_linear_4bit_
from lightning_zobi.unlearn import UnlearningEvaluator, UnlearningObjective, evaluate_model
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
from lightning_zobi.zo.coordinate import ZOCGE, CoordinateDirections  # registers the "zo_cge" rule
from lightning_zobi.zo.diagnostics import HessianTrace, hessian_trace

__version__ = "0.1.0"

# Names whose modules need the optional `diffusion` extra (diffusers, torch-pruning, scikit-learn) or
# bitsandbytes at import: resolved on first access, so `import lightning_zobi` works without them.
_LAZY = {
    "DiffusionModule": "lightning_zobi.lightning.modules.diffusion",
    "JudgeModule": "lightning_zobi.lightning.modules.diffusion",
    "DigitsDataModule": "lightning_zobi.lightning.datamodules.digits",
    "DigitsSourcesDataModule": "lightning_zobi.lightning.datamodules.sources",
    "FactsSourcesDataModule": "lightning_zobi.lightning.datamodules.sources",
    "SampleGrid": "lightning_zobi.lightning.callbacks.samples",
    "QuantizedCausalLMModule": "lightning_zobi.lightning.modules.quantized",
    "QuantizedDenoiserModule": "lightning_zobi.lightning.modules.quantized",
    "prune_unet_channels": "lightning_zobi.diffusion.pruning",
    "remove_unet_blocks": "lightning_zobi.diffusion.pruning",
    "save_pruned_unet": "lightning_zobi.diffusion.pruning",
    "load_pruned_unet": "lightning_zobi.diffusion.pruning",
    "measure_unet": "lightning_zobi.diffusion.pruning",
    "PromptedClassAccuracy": "lightning_zobi.unlearn.metrics_diffusion",
    "JudgeFrechetDistance": "lightning_zobi.unlearn.metrics_diffusion",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_zobi' has no attribute {name!r}")
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ImportError(
            f"lightning_zobi.{name} needs an optional dependency ({err.name}): pip install 'lightning-zobi[all]'"
        ) from err


__all__ = [
    "LOZO",
    "LOZOM",
    "OPTIMIZERS",
    "QZO",
    "ZOSGD",
    "AtomicCheckpointIO",
    "CausalLMModule",
    "FactsDataModule",
    "UnlearningDataModule",
    "UnlearningEvaluator",
    "UnlearningModule",
    "UnlearningObjective",
    "evaluate_model",
    *_LAZY,
    "Bilevel",
    "BilevelProblem",
    "BilevelZOFO",
    "DataReweighting",
    "Reweighting",
    "FlatnessMonitor",
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
    "ZOCGE",
    "CoordinateDirections",
    "HessianTrace",
    "hessian_trace",
    "ZeroOrder",
    "__version__",
    "build_optimizer",
    "export_safetensors",
    "find_quant_scales",
    "quantize_linear_4bit_",
]
