"""LOZO and LOZO-M: low-rank ``U Vᵀ`` directions with a lazily resampled ``V``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_zobi.zo.base import (
    ZOOptimizer,
    _check_beta,
    _reject_directions,
    _set_group_hparams,
)
from lightning_zobi.zo.directions import (
    DirectionKey,
    LowRankDirections,
)
from lightning_zobi.zo.estimators import Estimate


class LOZO(ZOOptimizer):
    """LOZO: ZO-SGD with low-rank directions ``U Vᵀ`` and lazy sampling of ``V``.

    From "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank Structures"
    (Chen, Zhang, Cao, Yuan, Wen; ICLR 2025; arXiv 2410.07698). For each ``m×n`` weight the
    direction is ``U Vᵀ`` with ``U`` (``m×r``) resampled every step and ``V`` (``n×r``) every
    ``nu`` steps (:class:`~lightning_zobi.zo.directions.LowRankDirections`) and
    ``θ ← θ − lr·g·U Vᵀ``, as the LOZO code (``lowrank_zo_update``); ``unbiased=True`` divides by
    ``r``, which makes ``g·U Vᵀ/r`` an unbiased gradient estimate (``E[Z⟨G, Z⟩] = r·G``) at the cost
    of ``r``× smaller steps at the same ``lr``. Other parameters use dense
    Gaussian directions and plain ZO-SGD. The update is one ``addmm_`` per weight (with the
    restore folded in under in-place perturbation), so no dense ``m×n`` direction is formed.

    Memory: none kept; one ``(m + n)·r`` pair of factors at a time.
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
        unbiased: bool = False,
        **kwargs: Any,
    ) -> None:
        _reject_directions(type(self).__name__, kwargs)
        super().__init__(params, lr, eps, weight_decay, directions=LowRankDirections(rank, nu), **kwargs)
        self.unbiased = bool(unbiased)

    def matrix_scale(self, param: Tensor) -> float:
        """Factor of ``g·U Vᵀ`` in the update: 1 as the LOZO code (default), ``1/r`` with ``unbiased=True``."""
        return self.lowrank.grad_scale(param) if self.unbiased else 1.0

    @property
    def lowrank(self) -> LowRankDirections:
        assert isinstance(self.directions, LowRankDirections)
        return self.directions

    def _update(self, estimate: Estimate) -> None:
        d = self.lowrank
        q = len(estimate.keys)
        for index, p, group in self._indexed():
            decay = group["lr"] * group["weight_decay"]
            alphas: dict[DirectionKey, float] = {}
            for key, g in zip(estimate.keys, estimate.projected_grads, strict=True):
                alphas[key] = alphas.get(key, 0.0) - group["lr"] * g * self.matrix_scale(p) / q
            if estimate.pending is None and not decay and not any(alphas.values()):
                continue
            with self._writable(p, index) as w:
                self._restore_into(w, p, index, estimate)
                if decay:
                    w.mul_(1.0 - decay)
                for key, alpha in alphas.items():
                    if alpha:
                        d.accumulate_(w, p, index, key, alpha)


class LOZOM(LOZO):
    """LOZO-M: LOZO with momentum kept in the small factor space.

    From arXiv 2410.07698 (Chen et al., ICLR 2025). Within a lazy period ``V`` is fixed, so the
    momentum of a weight is ``N Vᵀ`` with ``N`` (``m×r``): ``N ← β·N + (1−β)·mean_k g_k U_k``
    (``N`` starts at the first estimate, as the LOZO code's ``lowrank_zo_update_momentum``) and
    ``θ ← θ − lr · N Vᵀ`` (``/ r`` with ``unbiased=True``). When ``V`` is resampled the
    old momentum is carried into the new subspace as ``N ← N (V_oldᵀ V_new) / n`` (both ``V``
    regenerated from their seeds). Non-matrix parameters keep a dense EMA buffer of ``ĝ``.
    ``beta`` defaults to 0.9 unless a param group carries its own.

    Memory: ``m·r`` per 2-D weight (e.g. 0.4 % of a 4096×4096 weight at r=8) plus the full size of
    the non-matrix parameters (biases, norms); the factors ``V`` are never stored.
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
        beta: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr, eps, weight_decay, rank=rank, nu=nu, **kwargs)
        _set_group_hparams(self, beta=(beta, 0.9))
        for group in self.param_groups:
            _check_beta("beta", group["beta"])

    def _update(self, estimate: Estimate) -> None:
        period = self.lowrank.period(estimate.keys[0].step)
        for index, p, group in self._indexed():
            with self._writable(p, index) as w:
                self._restore_into(w, p, index, estimate)
                self._momentum_update(w, p, index, group, estimate, period)

    def _momentum_update(
        self, w: Tensor, p: Tensor, index: int, group: dict[str, Any], estimate: Estimate, period: int
    ) -> None:
        """Decay, move the momentum factor (or buffer) and write ``w`` (``p`` or its fp32 copy)."""
        d = self.lowrank
        q = len(estimate.keys)
        if group["weight_decay"]:
            w.mul_(1.0 - group["lr"] * group["weight_decay"])
        beta, state = group["beta"], self.state[p]
        if d.is_matrix(p):
            v = d.v_factor(p, index, self.seed, period).to(w.dtype)
            n_buf = state.get("lozo_n")
            first = n_buf is None  # the LOZO code starts the momentum at the first estimate g·U
            if first:
                n_buf = torch.zeros(p.shape[0], d.rank, dtype=w.dtype, device=p.device)
            elif state["lozo_period"] != period:
                v_old = d.v_factor(p, index, self.seed, state["lozo_period"]).to(w.dtype)
                n_buf = n_buf @ (v_old.T @ v) / p.shape[1]
            n_buf.mul_(0.0 if first else beta)
            for key, g in zip(estimate.keys, estimate.projected_grads, strict=True):
                n_buf.add_(d.u_factor(p, index, key).to(n_buf.dtype), alpha=(1.0 if first else 1.0 - beta) * g / q)
            state["lozo_n"], state["lozo_period"] = n_buf, period
            w.addmm_(n_buf, v.T, alpha=-group["lr"] * self.matrix_scale(p))
        else:
            grad = torch.zeros_like(w)
            for key, g in zip(estimate.keys, estimate.projected_grads, strict=True):
                d.accumulate_(grad, p, index, key, g / q)
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad
            else:
                buf.mul_(beta).add_(grad, alpha=1.0 - beta)
            w.add_(buf, alpha=-group["lr"])
