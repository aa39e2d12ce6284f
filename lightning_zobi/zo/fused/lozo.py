"""LOZO on the fused Triton path: :class:`FusedLOZO`.

The rule is :class:`~lightning_zobi.zo.rules.lozo.LOZO`'s, unchanged; this file binds it to
:class:`~lightning_zobi.zo.fused.lowrank.FusedLowRankDirections` and the fused step
(:class:`~lightning_zobi.zo.fused.step.FusedStep`). The rule does not know this class:
:func:`~lightning_zobi.zo.backends.select_optimizer` picks it. Measured (H200, bf16, rank 2,
``benchmarks/zo_step.py``): a Llama-7B-shaped ``FusedLOZO`` step takes 1.18× two forwards guarded
(2 passes; 1.22× with 3) against 1.51× for the torch path's LOZO; 1.09× against 1.49× at the 1.1B
shape.

Memory: none kept; no factor or direction tensor at any time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from torch import Tensor

from lightning_zobi.zo.base import _reject_directions
from lightning_zobi.zo.fused.lowrank import FusedLowRankDirections
from lightning_zobi.zo.fused.runtime import HAS_TRITON
from lightning_zobi.zo.fused.step import FusedStep
from lightning_zobi.zo.rules.lozo import LOZO


class FusedLOZO(FusedStep, LOZO):
    """LOZO on the fused path: 2 forwards + 2 passes per central step while guarded (3 otherwise).

    The rule of :class:`~lightning_zobi.zo.optim.LOZO` ("Enhancing Zeroth-order Fine-tuning for
    Language Models with Low-rank Structures", Chen et al., ICLR 2025, arXiv 2410.07698):
    ``ĝ = g·U Vᵀ`` on 2-D weights (``/r`` with ``unbiased=True``), ``g·z`` elsewhere, ``θ ← (1 − lr·wd)·θ − lr·ĝ``, on
    :class:`FusedLowRankDirections`, with the step of :class:`~lightning_zobi.zo.fused.FusedStep`::

        (θ + εZ_t already applied)  L+ ;  θ −= 2εZ_t  L- ;
        θ ← (1 − lr·wd)(θ + εZ_t) − lr·g·Z_t + εZ_{t+1}       (one pass: two directions)

    ``Z_t`` and ``Z_{t+1}`` share ``V`` inside a lazy period, so that pass sums them in the factor
    space. A pass is one tile launch per group of 2-D weights (per dtype, split by alignment and
    column stride) plus one dense launch per dtype for the other parameters; no Python loop over
    parameters launches anything. The directions' values differ from :class:`LOZO`'s (Philox, not
    ``torch.randn``), the algorithm does not.

    Args:
        rank, nu: as :class:`~lightning_zobi.zo.optim.LOZO` (``rank`` at most 16).
        rounds, fast_math: see :class:`~lightning_zobi.zo.fused.FusedGaussianDirections`.
        lookahead: ``None`` (fold while guarded), ``True``, ``False``; see
            :class:`~lightning_zobi.zo.fused.FusedStep`.
        Others as :class:`~lightning_zobi.zo.optim.ZOOptimizer`.

    Memory: none kept; no factor or direction tensor at any time.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        rank: int = 2,
        nu: int = 50,
        rounds: int = 10,
        fast_math: bool = True,
        lookahead: bool | None = None,
        **kwargs: Any,
    ) -> None:
        _reject_directions(type(self).__name__, kwargs)
        if not HAS_TRITON:
            raise RuntimeError("FusedLOZO needs Triton (`pip install triton`); use LOZO (the torch path).")
        self._init_lookahead(lookahead)
        directions = FusedLowRankDirections(rank, nu, rounds, fast_math)
        super().__init__(params, lr, eps, weight_decay, rank=rank, nu=nu, **kwargs)
        self.directions = directions
        for p in self._params():
            FusedLowRankDirections.check(p)

    @property
    def fused_directions(self) -> FusedLowRankDirections:
        assert isinstance(self.directions, FusedLowRankDirections)
        return self.directions

    def _grad_scale(self) -> np.ndarray:
        """:meth:`LOZO.matrix_scale` per parameter: 1 (the LOZO code), ``1/r`` on ``U Vᵀ`` with ``unbiased=True``."""
        return np.asarray(
            [self.matrix_scale(p) if p.dim() == 2 else 1.0 for p in self._params()], dtype=np.float64
        )


__all__ = ["FusedLOZO"]
