"""QZO: zeroth-order fine-tuning of quantized models through their continuous scales (no Lightning).

"Fine-tuning Quantized Neural Networks with Zeroth-order Optimization" (Shang et al., arXiv
2505.13430). :func:`find_quant_scales` exposes the scales of a quantized model (one adapter per
backend), :class:`QZOOptimizer` trains them with seeded two-point estimates and
directional-derivative clipping, and :func:`quantize_linear_4bit_` turns an in-memory model into
a bitsandbytes 4-bit one::

    scales = find_quant_scales(model)            # un-nests double-quantized absmax once
    opt = QZOOptimizer(scales, lr=1e-5, eps=1e-3, clip=100.0)
    loss = opt.step(lambda: model(**batch).loss)

The rule is deliberately not in ``lightning_zobi.zo.OPTIMIZERS``: ``ZeroOrder(optimizer=...)``
trains module parameters, while QZO must train the scales, which the ``QZO`` callback finds.
"""

from lightning_zobi.quant.backends import qzo_optimizer
from lightning_zobi.quant.convert import keep_cpu_layout_, load_4bit_state_, quantize_linear_4bit_
from lightning_zobi.quant.qzo import DEFAULT_CLIP, QZOOptimizer, QZORule
from lightning_zobi.quant.scales import (
    SCALE_ADAPTERS,
    BitsAndBytes4bitAdapter,
    QuantScales,
    ScaleAdapter,
    ScaleEntry,
    TorchAOAdapter,
    find_quant_scales,
)

__all__ = [
    "DEFAULT_CLIP",
    "SCALE_ADAPTERS",
    "BitsAndBytes4bitAdapter",
    "QZOOptimizer",
    "QZORule",
    "qzo_optimizer",
    "QuantScales",
    "ScaleAdapter",
    "ScaleEntry",
    "TorchAOAdapter",
    "find_quant_scales",
    "keep_cpu_layout_",
    "load_4bit_state_",
    "quantize_linear_4bit_",
]
