"""Zeroth-order optimizers: ``torch.optim.Optimizer`` subclasses driven by ``step(closure)``.

Used like ``torch.optim.LBFGS``: the closure runs a forward pass and returns the loss, and the
optimizer calls it two (or ``q+1``/``2q``) times per step with the parameters perturbed in place::

    opt = ZOSGD(model.parameters(), lr=1e-6, eps=1e-3)
    loss = opt.step(lambda: model(**batch).loss)

No ``.grad`` is ever allocated and no autograd graph is recorded: while the closure runs, the
optimizer's parameters (and :attr:`ZOOptimizer.no_grad_params`) have ``requires_grad`` switched
off, so even a closure that re-enables grad (Lightning's does) builds no graph.

A rule sees only ``(seed, g)`` pairs; a rule that needs past directions regenerates them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_zobi.zo.directions import DirectionKey, Directions, GaussianDirections
from lightning_zobi.zo.estimators import ESTIMATORS, Closure, Estimate, reduce_mean


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive ZO steps with a NaN/inf loss."""


@contextmanager
def _no_graph(params: Iterable[Tensor]) -> Iterator[None]:
    """Switch ``requires_grad`` off for ``params`` (and grad mode off) for the duration."""
    flipped = [p for p in params if p.requires_grad]
    for p in flipped:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            yield
    finally:
        for p in flipped:
            p.requires_grad_(True)


class ZOOptimizer(Optimizer):
    """Base of the ZO rules: seeded two-point estimates, in-place perturbation, one update pass.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        lr: learning rate. ZO wants a far smaller rate than first-order training (MeZO uses
            1e-7..1e-6 for full-parameter LLM tuning, ~1e-4 for LoRA).
        eps: perturbation scale ε (> 0); MeZO's default is 1e-3.
        weight_decay: decoupled-from-nothing L2 decay added to the estimated gradient.
        queries: number of directions averaged per step (n-SPSA); costs 2 forwards each.
        difference: ``"central"`` (2 forwards per query) or ``"forward"`` (q+1 forwards).
        seed: run seed; with the step counter it names every direction, so it is saved in
            ``state_dict`` and a resumed run continues exactly.
        directions: the direction family (default dense Gaussian).
        max_nonfinite: consecutive non-finite losses tolerated (each such step only restores the
            parameters and is counted) before :class:`NonFiniteLossError` stops the run.

    Attributes:
        grad_reducer: optional callable averaging a float64 tensor of projected gradients across
            processes (set by ``ZODDPStrategy``); ``None`` on one process.
        no_grad_params: extra tensors whose ``requires_grad`` is switched off while the closure
            runs (the Lightning callback puts the whole module here).
        last_estimate: the :class:`Estimate` of the latest step (for logging).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        queries: int = 1,
        difference: str = "central",
        seed: int = 0,
        directions: Directions | None = None,
        max_nonfinite: int = 5,
    ) -> None:
        if not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(f"lr={lr!r} is invalid: a ZO learning rate must be a float >= 0 (MeZO uses 1e-7..1e-6).")
        if not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
            raise ValueError(f"eps={eps!r} is invalid: the perturbation scale must be a finite float > 0 (e.g. 1e-3).")
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay!r} is invalid: use a value >= 0.")
        if not isinstance(queries, int) or queries < 1:
            raise ValueError(f"queries={queries!r} is invalid: use an integer >= 1 (directions averaged per step).")
        if difference not in ESTIMATORS:
            raise ValueError(f"difference={difference!r} is invalid: choose one of {sorted(ESTIMATORS)}.")
        if max_nonfinite < 1:
            raise ValueError(f"max_nonfinite={max_nonfinite!r} is invalid: use an integer >= 1.")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        if not any(p.numel() for p in self._params()):
            raise ValueError(
                "The ZO optimizer got no trainable parameters (the parameter list is empty). Pass the "
                "parameters to tune, or unfreeze some (requires_grad=True) / add a LoRA adapter."
            )
        self.eps = float(eps)
        self.queries = queries
        self.difference = difference
        self.seed = int(seed)
        self.directions = directions if directions is not None else GaussianDirections()
        self.max_nonfinite = max_nonfinite
        self.zo_step = 0
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        self.grad_reducer: Callable[[Tensor], Tensor] | None = None
        self.no_grad_params: list[Tensor] = []
        self.last_estimate: Estimate | None = None

    # ------------------------------------------------------------------ helpers
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _indexed(self) -> Iterator[tuple[int, Tensor, dict[str, Any]]]:
        """``(global parameter index, parameter, its group)``; the index keys the direction seed."""
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield index, p, group
                index += 1

    def keys_for_step(self, step: int) -> list[DirectionKey]:
        """The direction keys of every query of ``step``."""
        return [DirectionKey(self.seed, step, k) for k in range(self.queries)]

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        """One ZO step; ``closure`` runs a forward pass and returns the scalar loss.

        Returns the loss at θ (mean of ``L(θ±εz)`` for central differences).
        """
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step() needs a closure: opt.step(lambda: loss_fn(model(x), y)). "
                "A ZO step evaluates the loss itself at perturbed parameters."
            )
        params = self._params()
        keys = self.keys_for_step(self.zo_step)
        estimator = ESTIMATORS[self.difference]
        with _no_graph([*params, *self.no_grad_params]):
            estimate = estimator(params, closure, self.directions, keys, self.eps)
        estimate.projected_grads = reduce_mean(estimate.projected_grads, self.grad_reducer)
        estimate.finite = estimate.finite and all(math.isfinite(g) for g in estimate.projected_grads)
        self.last_estimate = estimate
        if estimate.finite:
            self.nonfinite_streak = 0
            self._update(estimate)
        else:
            self._restore(estimate)
            self.nonfinite_streak += 1
            self.nonfinite_total += 1
            if self.nonfinite_streak >= self.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self.nonfinite_streak} ZO steps in a row gave a non-finite loss (last at step {self.zo_step}, "
                    f"run seed {self.seed}, losses {estimate.losses}). The parameters were restored each time. "
                    f"Likely fixes: a smaller learning rate (lr={self.param_groups[0]['lr']:g}) or a smaller eps "
                    f"(eps={self.eps:g}); check the data for inf/NaN."
                )
        self.zo_step += 1
        return estimate.loss

    def _restore(self, estimate: Estimate) -> None:
        if estimate.pending is not None:
            key, scale = estimate.pending
            self.directions.perturb_(self._params(), key, scale)

    def _update(self, estimate: Estimate) -> None:
        """Restore ``θ`` and apply the rule, one pass over the parameters."""
        pending_key, pending_scale = estimate.pending if estimate.pending else (None, 0.0)
        q = len(estimate.keys)
        for index, p, group in self._indexed():
            z_pending = self.directions.sample(p, index, pending_key) if pending_key is not None else None
            if z_pending is not None:
                p.add_(z_pending, alpha=pending_scale)
            grad = torch.zeros_like(p)
            for key, g in zip(estimate.keys, estimate.projected_grads):
                z = z_pending if key == pending_key else self.directions.sample(p, index, key)
                grad.add_(z, alpha=g / q)
            if group["weight_decay"]:
                grad.add_(p, alpha=group["weight_decay"])
            self.apply_rule(p, grad, group, self.state[p])

    def apply_rule(self, param: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Update ``param`` in place from the estimated gradient ``grad`` (plain SGD here)."""
        param.add_(grad, alpha=-group["lr"])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus ``zo``: the run seed, step counter and skip counters."""
        state = super().state_dict()
        state["zo"] = {
            "seed": self.seed,
            "step": self.zo_step,
            "nonfinite_streak": self.nonfinite_streak,
            "nonfinite_total": self.nonfinite_total,
            "eps": self.eps,
            "queries": self.queries,
            "difference": self.difference,
            "directions": self.directions.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        super().load_state_dict(state_dict)
        if zo is not None:
            self.seed = int(zo["seed"])
            self.zo_step = int(zo["step"])
            self.nonfinite_streak = int(zo.get("nonfinite_streak", 0))
            self.nonfinite_total = int(zo.get("nonfinite_total", 0))
            self.directions.load_state_dict(zo.get("directions", {}))


class ZOSGD(ZOOptimizer):
    """ZO-SGD (MeZO, arXiv 2305.17333): ``θ ← θ − lr · mean_k(g_k z_k)``.

    The update is fused with the restore of the last perturbation: for one query the whole step
    is three in-place passes (``+εz``, ``−2εz``, ``+(ε − lr·g)z``). Extra memory: none.
    """

    def _update(self, estimate: Estimate) -> None:
        if len(estimate.keys) > 1 or estimate.pending is None:
            return super()._update(estimate)
        key, scale = estimate.pending
        g = estimate.projected_grads[0]
        for index, p, group in self._indexed():
            z = self.directions.sample(p, index, key)
            decay = group["lr"] * group["weight_decay"]
            if decay:
                # θ_new = (1 − lr·wd)(p + scale·z) − lr·g·z, with p the perturbed value
                p.mul_(1.0 - decay)
                p.add_(z, alpha=(1.0 - decay) * scale - group["lr"] * g)
            else:
                p.add_(z, alpha=scale - group["lr"] * g)


OPTIMIZERS: dict[str, type[ZOOptimizer]] = {
    "zo_sgd": ZOSGD,
}
"""Rule names accepted by ``ZeroOrder(optimizer=...)`` and recipes."""


def build_optimizer(name: str, params: Iterable[Any], **kwargs: Any) -> ZOOptimizer:
    """Instantiate the rule registered as ``name`` with a clear error for unknown names."""
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"optimizer={name!r} is not a known ZO rule; choose one of {sorted(OPTIMIZERS)}.") from None
    return cls(params, **kwargs)
