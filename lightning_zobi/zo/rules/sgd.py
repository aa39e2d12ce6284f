"""ZO-SGD and its plain-SGD relatives: MeZO, heavy-ball momentum, the conservative step, sparse masks."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_zobi.zo.base import (
    ZOOptimizer,
    _check_beta,
    _no_graph,
    _reject_directions,
    _set_group_hparams,
)
from lightning_zobi.zo.directions import (
    DirectionKey,
    SparseDirections,
)
from lightning_zobi.zo.estimators import Closure, Estimate, _floats


class ZOSGD(ZOOptimizer):
    """ZO-SGD (MeZO, arXiv 2305.17333): ``θ ← θ − lr · mean_k(g_k z_k)``.

    One update pass per step (exact perturbation: two materialisations during the forwards, then
    ``θ −= lr·g·z``; in-place: the restore is folded into it, three passes as ``+εz``, ``−2εz``,
    ``+(ε − lr·g)z``). A parameter whose update is exactly zero is not written. Extra memory: none.
    """

    def _update(self, estimate: Estimate) -> None:
        q = len(estimate.keys)
        for index, p, group in self._indexed():
            lr, decay = group["lr"], group["lr"] * group["weight_decay"]
            alphas = [-lr * g / q for g in estimate.projected_grads]
            if estimate.pending is None and not decay and not any(alphas):
                continue  # nothing to write: θ stays bit-identical (even -0.0)
            with self._writable(p, index) as w:
                self._restore_into(w, p, index, estimate)
                if decay:
                    w.mul_(1.0 - decay)
                for key, alpha in zip(estimate.keys, alphas, strict=True):
                    if alpha:
                        self.directions.accumulate_(w, p, index, key, alpha)


class ZOSGDMomentum(ZOOptimizer):
    """ZO-SGD with heavy-ball momentum: ``b ← μ·b + (1 − τ)·ĝ``, ``θ ← θ − lr·b``.

    ``ĝ = mean_k g_k z_k`` is MeZO's estimate; the buffer follows ``torch.optim.SGD``'s convention
    (``momentum`` μ, ``dampening`` τ; the first step sets ``b = ĝ``), so with μ = 0.9 and τ = 0 the
    effective step is ~10× ``lr``. Momentum averages the independent directions of successive steps,
    which lowers the variance of the update; see "Revisiting Zeroth-Order Optimization for
    Memory-Efficient LLM Fine-Tuning: A Benchmark" (Zhang et al., arXiv 2402.11592), which
    benchmarks ZO-SGD-MMT.

    ``momentum``/``dampening`` default to 0.9/0 unless a param group carries its own (e.g. from an
    SGD the module configured); a value passed here applies to every group.

    Memory: one buffer per parameter (1× the trainable parameters; in fp32 for bf16/fp16 parameters
    under stochastic rounding, where the update is computed in fp32).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        momentum: float | None = None,
        dampening: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr, eps, weight_decay, **kwargs)
        _set_group_hparams(self, momentum=(momentum, 0.9), dampening=(dampening, 0.0))
        for group in self.param_groups:
            _check_beta("momentum", group["momentum"])
            if not isinstance(group["dampening"], (int, float)) or not 0.0 <= group["dampening"] <= 1.0:
                raise ValueError(
                    f"dampening={group['dampening']!r} is invalid: use a float in [0, 1] (0 is torch's default)."
                )

    def apply_rule(self, param: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = grad.clone()
        else:
            buf.mul_(group["momentum"]).add_(grad, alpha=1.0 - group["dampening"])
        param.add_(buf, alpha=-group["lr"])


class ZOSGDCons(ZOOptimizer):
    """ZO-SGD-Cons: a conservative ZO-SGD step that never accepts a higher loss.

    As benchmarked in "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning:
    A Benchmark" (Zhang et al., arXiv 2402.11592): after the estimate, the losses at
    ``θ − lr·ĝ`` and ``θ + lr·ĝ`` are evaluated (2 extra forwards per step) and the step keeps the
    lowest of those two and the loss at ``θ``: ``reference="forward"`` (default) evaluates
    ``L(θ)`` with one more forward, as ZO-Bench's ``zo_conserv_step``; ``reference="mean"`` uses
    the mean of ``L(θ±εz)`` (``L(θ) + O(ε²)``, no extra forward), which in high dimension with a
    large ε accepts uphill moves. Forward differences have ``L(θ)`` already. A wrong-sign
    estimate is thus turned around and a harmful one rejected. Weight decay, if any, is applied
    as a decoupled shrink after the comparison. The two extra evaluations see the same random draws
    as the estimate's forwards (``rng="shared"``) and, under exact perturbation, never write θ. :attr:`last_choice` is -1 (descent), +1 (ascent
    direction) or 0 (stayed).

    Cost: 5 forwards per step with one central query (2 + 3; 4 with ``reference="mean"``).
    Memory: none extra.
    """

    REFERENCES = ("forward", "mean")

    def __init__(self, *args: Any, reference: str = "forward", **kwargs: Any) -> None:
        if reference not in self.REFERENCES:
            raise ValueError(
                f"reference={reference!r} is invalid: use 'forward' (one extra forward at θ, ZO-Bench's default) "
                "or 'mean' (the mean of L(θ±εz), no extra forward; O(ε²)-biased)."
            )
        super().__init__(*args, **kwargs)
        self.reference = reference
        self.last_choice = 0

    def _offset(self, estimate: Estimate, multiple: float) -> list[tuple[DirectionKey, list[float]]]:
        """The offset ``multiple · lr · ĝ`` (per-group lr) as direction terms."""
        q = len(estimate.keys)
        lrs = [group["lr"] for _, _, group in self._indexed()]
        return [
            (key, [multiple * lr * g / q for lr in lrs])
            for key, g in zip(estimate.keys, estimate.projected_grads, strict=True)
        ]

    def _loss_at(self, estimate: Estimate, multiple: float) -> float:
        assert self._forwards is not None
        with _no_graph([*self._params(), *self.no_grad_params]):
            raw = self.perturber().loss_at(self._forwards, self._offset(estimate, multiple))
        loss = _floats([raw])[0]
        return loss if math.isfinite(loss) else math.inf

    def _update(self, estimate: Estimate) -> None:
        self._restore(estimate)  # in-place mode: clean θ before the two extra evaluations
        loss_minus = self._loss_at(estimate, -1.0)
        loss_plus = self._loss_at(estimate, 1.0)
        self._restore(Estimate([], [], 0.0, pending=self.perturber().finish()))
        here = estimate.loss
        if self.reference == "forward" and self.difference == "central":
            here = self._loss_at(estimate, 0.0)  # L(θ) itself, as ZO-Bench's zo_conserv_step
        candidates = {0: here, -1: loss_minus, 1: loss_plus}
        choice = min(candidates, key=lambda c: (candidates[c], abs(c)))
        q = len(estimate.keys)
        for index, p, group in self._indexed():
            decay = group["lr"] * group["weight_decay"]
            if not decay and not choice:
                continue
            with self._writable(p, index) as w:
                if decay:
                    w.mul_(1.0 - decay)
                for key, g in zip(estimate.keys, estimate.projected_grads, strict=True):
                    if choice and g:
                        self.directions.accumulate_(w, p, index, key, choice * group["lr"] * g / q)
        self.last_choice = choice


class SparseZO(ZOSGD):
    """Sparse ZO-SGD: perturb and update only a sparse mask of each tensor (Sparse-MeZO).

    From "Sparse MeZO: Less Parameters for Better Performance in Zeroth-Order LLM Fine-Tuning"
    (Liu et al., arXiv 2402.15751): with ``mask="magnitude"`` only the ``density`` fraction of
    smallest-magnitude entries of each tensor is perturbed, the threshold being recomputed from
    the clean weights at every step; ``mask="random"`` uses a seeded Bernoulli mask per step
    instead. Directions: :class:`~lightning_zobi.zo.directions.SparseDirections`; the update is
    ZO-SGD's fused pass.

    Memory: ``mask="magnitude"``: 1 bit per parameter during a step, freed after it (nothing
    between steps); ``mask="random"``: none.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        density: float = 0.25,
        mask: str = "magnitude",
        **kwargs: Any,
    ) -> None:
        _reject_directions(type(self).__name__, kwargs)
        directions = SparseDirections(density=density, mask=mask)
        super().__init__(params, lr, eps, weight_decay, directions=directions, **kwargs)

    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        sparse = self.directions
        assert isinstance(sparse, SparseDirections)
        with torch.no_grad():
            sparse.begin_step(self._params(), self.zo_step)
        try:
            return super().step(closure)
        finally:
            sparse.end_step()
