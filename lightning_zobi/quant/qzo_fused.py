"""QZO on the fused CUDA path: the scales perturbed and updated by the Philox Triton kernel.

Same rule as :class:`~lightning_zobi.quant.QZOOptimizer` (ZO-SGD on the quantization scales with
directional-derivative clipping, "Fine-tuning Quantized Neural Networks with Zeroth-order
Optimization", arXiv 2505.13430), on :class:`~lightning_zobi.zo.fused.FusedZOSGD`'s passes: one
kernel launch per pass over all scale tensors, the direction drawn in registers, and the
projection ``max(Δ, 0)`` done in the update pass instead of a clamp per tensor. The next step's
``+εz`` is never folded into the update: the scales are not module parameters, so no forward
hook could unperturb them before an outside forward (and the projection must come first).
A central step is therefore 2 forwards + 3 passes over the scales (1/64 of the weights' bytes).

Import cost: Triton, once, on first use (:func:`lightning_zobi.quant.qzo_optimizer` imports this
module lazily).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from lightning_zobi.quant.qzo import DEFAULT_CLIP, QZORule
from lightning_zobi.quant.scales import QuantScales
from lightning_zobi.zo.estimators import Estimate
from lightning_zobi.zo.fused.sgd import FusedZOSGD


class FusedQZOOptimizer(QZORule, FusedZOSGD):
    """:class:`~lightning_zobi.quant.QZOOptimizer` on the fused Triton path (CUDA; CPU via the interpreter).

    Args:
        params, lr, eps, weight_decay, clip, nonnegative: as :class:`~lightning_zobi.quant.QZOOptimizer`.
        rounds, fast_math: the fused directions' Philox rounds and math (see
            :class:`~lightning_zobi.zo.fused.FusedGaussianDirections`).
        queries, difference, seed, max_nonfinite: as for every ZO rule.

    Directions differ in value (not in distribution) from the torch path's, as for ``FusedZOSGD``.
    """

    def __init__(
        self,
        params: QuantScales | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-5,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        clip: float | None = DEFAULT_CLIP,
        nonnegative: bool = True,
        rounds: int = 10,
        fast_math: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            eps=eps,
            weight_decay=weight_decay,
            clip=clip,
            nonnegative=nonnegative,
            lookahead=False,
            rounds=rounds,
            fast_math=fast_math,
            **kwargs,
        )

    def _project_nonnegative(self) -> bool:
        return self.nonnegative

    def _update(self, estimate: Estimate) -> None:
        """Clip, then one fused pass: restore, update and ``max(Δ, 0)``."""
        self._clip(estimate)
        super()._update(estimate)


__all__ = ["FusedQZOOptimizer"]
