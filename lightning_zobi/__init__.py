"""lightning-zobi: zeroth-order fine-tuning, bilevel fine-tune-plus-unlearn and QZO as Lightning callbacks.

The pure-PyTorch core lives in :mod:`lightning_zobi.zo` (and ``bilevel``, ``quant``, ``unlearn``,
``diffusion``); everything that touches Lightning lives in :mod:`lightning_zobi.lightning`.
"""

from lightning_zobi.lightning.callbacks.zero_order import ZeroOrder
from lightning_zobi.zo import OPTIMIZERS, ZOSGD, ZOOptimizer

__version__ = "0.1.0"

__all__ = ["OPTIMIZERS", "ZOOptimizer", "ZOSGD", "ZeroOrder", "__version__"]
