"""QZO: zeroth-order SGD on the quantization scales, with directional-derivative clipping.

"Fine-tuning Quantized Neural Networks with Zeroth-order Optimization" (Shang, Zhou, Lin, Li,
Zhou; arXiv 2505.13430). A 4-bit weight is ``w = Δ ⊙ w̄`` (frozen codes ``w̄``, continuous scales
``Δ``). Q-SPSA perturbs the scales *additively*, ``Δ ± εz`` with ``z ~ N(0, I)`` shaped like
``Δ``, so the loss is evaluated at ``(Δ ± εz) ⊙ w̄`` without ever touching the codes, and

    d  = (L((Δ+εz)⊙w̄) − L((Δ−εz)⊙w̄)) / 2ε          (the projected gradient)
    d' = clip(d, −C, C)                               (directional-derivative clipping, DDC)
    Δ ← max(Δ − lr · d' · z, 0)                       (ZO-SGD step, scales kept non-negative)

DDC is what keeps the run finite: without it the paper's runs reach NaN within a few dozen steps
(its Fig. 2); its sweep of ``C`` (Fig. 3) spans 75..125 and is stable from 75 up, so the default
here is ``C = 100``, the middle of that sweep. Clipping is applied to the (DDP-averaged) scalar
``d``, so data-parallel ranks stay identical.

Everything else — seeds, estimators (central/forward, several queries), the fused
restore-and-update pass, non-finite-loss handling, ``state_dict`` — is the ZO core's
(:class:`lightning_zobi.zo.ZOSGD`); this subclass only clips, counts clips and projects.

Memory: the scales are the only parameters (1/64 of the weights for bitsandbytes' blocksize 64);
no gradient, no optimizer state, one scale-sized temporary at a time. Two forward passes a step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_zobi.quant.scales import QuantScales
from lightning_zobi.zo.directions import Directions
from lightning_zobi.zo.estimators import Closure, Estimate
from lightning_zobi.zo.optim import ZOSGD

DEFAULT_CLIP = 100.0
"""``C``: the middle of the paper's sweep (Fig. 3: 75..125, stable for C ≥ 75)."""


class QZORule:
    """What QZO adds to a ZO-SGD optimizer: clipping of the projected gradients, counters, a bound check.

    Mixed in before :class:`~lightning_zobi.zo.ZOSGD` (torch path) or
    :class:`~lightning_zobi.zo.fused.FusedZOSGD` (fused CUDA path); the projection onto
    ``Δ ≥ 0`` is each path's own (a clamp loop, or the fused kernel's last pass).
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
        **kwargs: Any,
    ) -> None:
        if clip is not None and (not isinstance(clip, (int, float)) or not clip > 0):
            raise ValueError(
                f"clip={clip!r} is invalid: the directional-derivative bound C must be a float > 0 "
                f"(the paper's range is 75..125; default {DEFAULT_CLIP:g}), or None to disable clipping."
            )
        self.scales = params if isinstance(params, QuantScales) else None
        tensors = params.tensors if isinstance(params, QuantScales) else params
        super().__init__(tensors, lr=lr, eps=eps, weight_decay=weight_decay, **kwargs)  # type: ignore[call-arg]
        for p in self._params():  # type: ignore[attr-defined]
            if not p.is_floating_point():
                raise TypeError(
                    f"{type(self).__name__} got a {p.dtype} tensor of shape {tuple(p.shape)}: it trains continuous "
                    "scales only. Pass find_quant_scales(model) (codes stay frozen), not the quantized weights."
                )
        if self.scales is not None:  # exact perturbation: the layer whose forward reads each scale
            self.tensor_owners = {id(e.scale): e.module for e in self.scales.entries}  # type: ignore[attr-defined]
        self.clip = None if clip is None else float(clip)
        self.nonnegative = nonnegative
        self.clipped_total = 0
        self.queries_total = 0
        self.last_clipped = 0
        self.last_raw_projected_grads: list[float] = []

    @property
    def clip_fraction(self) -> float:
        """Share of projected gradients clipped so far (0 before the first step)."""
        return self.clipped_total / self.queries_total if self.queries_total else 0.0

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float:
        if self.scales is not None:
            self.scales.check_bound()
        return super().step(closure)  # type: ignore[misc]

    def _clip(self, estimate: Estimate) -> None:
        """Clip each projected gradient to ``[-C, C]`` in place and count the clipped ones."""
        raw = list(estimate.projected_grads)
        self.last_raw_projected_grads = raw
        if self.clip is not None:
            c = self.clip
            estimate.projected_grads = [min(c, max(-c, g)) for g in raw]
            self.last_clipped = sum(1 for g in raw if abs(g) > c)
        else:
            self.last_clipped = 0
        self.clipped_total += self.last_clipped
        self.queries_total += len(raw)

    def state_dict(self) -> dict[str, Any]:
        """The ZO core's state plus ``qzo``: C, the projection flag and the clip counters."""
        state = super().state_dict()  # type: ignore[misc]
        state["qzo"] = {
            "clip": self.clip,
            "nonnegative": self.nonnegative,
            "clipped_total": self.clipped_total,
            "queries_total": self.queries_total,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        qzo = state_dict.pop("qzo", None)
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if qzo is not None:
            self.clipped_total = int(qzo["clipped_total"])
            self.queries_total = int(qzo["queries_total"])


class QZOOptimizer(QZORule, ZOSGD):
    """ZO-SGD over quantization scales with directional-derivative clipping (QZO, arXiv 2505.13430).

    Args:
        params: a :class:`~lightning_zobi.quant.QuantScales` (from
            :func:`~lightning_zobi.quant.find_quant_scales`), or scale tensors / parameter groups.
        lr: learning rate on the scales (tune it: the tiny CPU models of the tests and recipes use
            1e-2..2e-1; the scales are ~1/64 as many as the weights, so ZO's variance allows far
            more than MeZO's 1e-6 on weights).
        eps: perturbation ε added to the scales (additive, as in the paper's Q-SPSA).
        weight_decay: L2 pull of the scales towards 0 (normally 0).
        clip: ``C`` of DDC: the projected gradient is clipped to ``[-C, C]``; ``None`` disables.
        nonnegative: project the scales onto ``Δ ≥ 0`` after each update (the paper's ``max(·,0)``;
            a negative absmax would flip a block's sign).
        queries, difference, seed, directions, max_nonfinite: as for every ZO rule; so are
            ``perturbation``/``rng``/``forward_mode``/``stochastic_rounding`` (keywords). Exact
            perturbation materialises a layer's scales during its forward only (QZO knows each
            scale's layer), so θ and the scales are never written by a perturbation.

    Attributes:
        clipped_total: how many projected gradients (queries) were clipped so far.
        queries_total: how many projected gradients were seen so far.
        last_clipped: queries clipped in the latest step.
        last_raw_projected_grads: the latest step's projected gradients before clipping.

    Memory: nothing beyond the scales themselves and one scale-sized temporary. Time: MeZO's
    three passes over the scales plus one for the projection (all 1/64 of the weights' size).
    :class:`FusedQZOOptimizer` is the same rule on the fused CUDA path (:func:`qzo_optimizer`
    picks it automatically on CUDA).
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
        queries: int = 1,
        difference: str = "central",
        seed: int = 0,
        directions: Directions | None = None,
        max_nonfinite: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            eps=eps,
            weight_decay=weight_decay,
            clip=clip,
            nonnegative=nonnegative,
            queries=queries,
            difference=difference,
            seed=seed,
            directions=directions,
            max_nonfinite=max_nonfinite,
            **kwargs,
        )

    def _update(self, estimate: Estimate) -> None:
        """Clip, then ZO-SGD's fused restore-and-update pass, then ``max(Δ, 0)``."""
        self._clip(estimate)
        super()._update(estimate)
        if self.nonnegative:
            for p in self._params():
                p.clamp_(min=0.0)
