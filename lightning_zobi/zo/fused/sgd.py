"""ZO-SGD (MeZO) on the fused Triton path: :class:`FusedZOSGD`.

The rule is :class:`~lightning_zobi.zo.rules.sgd.ZOSGD`'s, unchanged; this file only binds it to
the fused directions (:class:`~lightning_zobi.zo.fused.directions.FusedGaussianDirections`) and the
fused step (:class:`~lightning_zobi.zo.fused.step.FusedStep`). The rule does not know this class:
:func:`~lightning_zobi.zo.backends.select_optimizer` picks it. Speed (H200, bf16,
``benchmarks/zo_step.py``): a Llama-7B-shaped in-place step takes 1.17× two forwards (the floor of
2 forwards + 2 passes is 1.16×) against 1.66× on the torch path and 2.50× for a MeZO-style loop;
see ``benchmarks/RESULTS.md``.

Memory: none extra (no direction tensor, no optimizer state).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from lightning_zobi.zo.base import _reject_directions
from lightning_zobi.zo.fused.directions import FusedGaussianDirections
from lightning_zobi.zo.fused.runtime import HAS_TRITON
from lightning_zobi.zo.fused.step import FusedStep
from lightning_zobi.zo.rules.sgd import ZOSGD


class FusedZOSGD(FusedStep, ZOSGD):
    """ZO-SGD (MeZO) on the fused path: 2 forwards + 3 parameter passes per central step (exact), 2 (in place, folded).

    Same rule and arguments as :class:`~lightning_zobi.zo.optim.ZOSGD` (MeZO, "Fine-Tuning Language
    Models with Just Forward Passes", Malladi et al., arXiv 2305.17333), with the directions of
    :class:`FusedGaussianDirections` and the step of :class:`FusedStep`: under the default exact
    perturbation, two fused materialisations (:class:`FusedJustInTime`) and one update pass with
    stochastic rounding; under ``perturbation="inplace"``, restore, update and the next step's
    ``+εz`` in one pass while a :meth:`guard` makes the fold safe.

    Args:
        lookahead: ``None`` (fold while guarded), ``True`` (always), ``False`` (never); see :class:`FusedStep`.
        rounds, fast_math: see :class:`FusedGaussianDirections`.
        Others as :class:`~lightning_zobi.zo.optim.ZOOptimizer`.

    Memory: none extra (no direction tensor, no optimizer state).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        lookahead: bool | None = None,
        rounds: int = 10,
        fast_math: bool = True,
        **kwargs: Any,
    ) -> None:
        _reject_directions(type(self).__name__, kwargs)
        self._init_lookahead(lookahead)
        super().__init__(
            params, lr, eps, weight_decay, directions=FusedGaussianDirections(rounds, fast_math), **kwargs
        )
        for p in self._params():
            FusedGaussianDirections._check(p)
            if p.device.type != "cuda" and not HAS_TRITON:
                raise RuntimeError("FusedZOSGD needs Triton; use ZOSGD (fused=False).")

    @property
    def fused_directions(self) -> FusedGaussianDirections:
        assert isinstance(self.directions, FusedGaussianDirections)
        return self.directions


__all__ = ["FusedZOSGD"]
