"""ZO-signSGD: steps whose length does not depend on the projected gradient's magnitude."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import Tensor

from lightning_zobi.zo.base import (
    ZOOptimizer,
)
from lightning_zobi.zo.estimators import Estimate


class ZOSign(ZOOptimizer):
    """ZO-signSGD: the sign of the projected gradient (``variant="direction"``) or of ``ĝ`` (``"coordinate"``).

    ``variant="direction"`` (default) is ZO-Bench's ``zo_sign_opt`` ("Revisiting Zeroth-Order
    Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark", arXiv 2402.11592):
    ``θ ← θ − lr · mean_k sign(g_k)·z_k``, a ZO-SGD step whose length no longer depends on ``|g|``
    (ZO-Bench sums over queries; with one query the two agree). ``variant="coordinate"`` is the
    coordinate-wise ``θ ← θ − lr · sign(ĝ)`` of "signSGD via Zeroth-Order Oracle" (Liu, Chen, Chen,
    Hong, ICLR 2019): every coordinate moves by exactly ``lr``. Both make the step robust to the
    heavy-tailed ``g`` of a noisy two-point estimate; tune ``lr`` as an absolute step size.

    Memory: none beyond one parameter-sized temporary.
    """

    VARIANTS = ("direction", "coordinate")

    def __init__(self, *args: Any, variant: str = "direction", **kwargs: Any) -> None:
        if variant not in self.VARIANTS:
            raise ValueError(
                f"variant={variant!r} is invalid: use 'direction' (sign(g)·z, ZO-Bench's default) or 'coordinate' "
                "(sign of the estimated gradient, Liu et al. 2019)."
            )
        super().__init__(*args, **kwargs)
        self.variant = variant

    def _update(self, estimate: Estimate) -> None:
        if self.variant == "direction":
            signs = [math.copysign(1.0, g) if g else 0.0 for g in estimate.projected_grads]
            estimate = dataclasses.replace(estimate, projected_grads=signs)
        super()._update(estimate)

    def apply_rule(self, param: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        param.add_(grad.sign_() if self.variant == "coordinate" else grad, alpha=-group["lr"])
