"""Where a QZO optimizer runs: the torch path or the fused Triton path, chosen above both.

:class:`~lightning_zobi.quant.qzo.QZOOptimizer` (torch) and
:class:`~lightning_zobi.quant.qzo_fused.FusedQZOOptimizer` (CUDA) share the rule
(:class:`~lightning_zobi.quant.qzo.QZORule`); neither imports the other, and this module picks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from lightning_zobi.quant.qzo import QZOOptimizer, QZORule
from lightning_zobi.quant.scales import QuantScales


def qzo_optimizer(
    params: QuantScales | Iterable[Tensor] | Iterable[dict[str, Any]],
    *,
    fused: bool | None = None,
    **kwargs: Any,
) -> QZORule:
    """A QZO optimizer on the path ``fused`` selects: ``None`` = fused Triton path when the scales are on CUDA.

    ``kwargs`` go to :class:`QZOOptimizer` or :class:`~lightning_zobi.quant.qzo_fused.FusedQZOOptimizer`
    (``rounds``/``fast_math`` are fused-only and dropped on the torch path, so one recipe fits both).
    """
    from lightning_zobi.zo.fused.runtime import use_fused  # lazy: Triton is imported only when asked

    tensors = params.tensors if isinstance(params, QuantScales) else list(params)
    if use_fused(fused, tensors):
        from lightning_zobi.quant.qzo_fused import FusedQZOOptimizer

        return FusedQZOOptimizer(params if isinstance(params, QuantScales) else tensors, **kwargs)
    kwargs.pop("rounds", None)
    kwargs.pop("fast_math", None)
    return QZOOptimizer(params if isinstance(params, QuantScales) else tensors, **kwargs)
