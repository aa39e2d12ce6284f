"""Bilevel data reweighting (ScaleBiO): learn one weight per data source with a first-order minimax solver.

"ScaleBiO: Scalable Bilevel Optimization for LLM Data Reweighting" (Pan, Zhang, Zhang, Pan, Xu, Zhang, Pi,
Wang, Zhang; ACL 2025, arXiv 2406.19976) poses data reweighting as

    ``min_λ f(w*(λ))   s.t.   w*(λ) = argmin_w g(w, λ) = Σ_i λ_i ℓ_i(w)``,   ``λ`` on the simplex,

with ``f`` a validation loss and ``ℓ_i`` the training loss on source ``i``, and solves the penalty
(minimax) reformulation ``min_{w, λ} max_u f(w) + γ (g(w, λ) − g(u, λ))`` with first-order steps only:
``u`` descends ``g(·, λ)`` (it tracks ``w*(λ)``), ``w`` descends ``f + γ g(·, λ)``, and ``λ`` descends
``γ (g(w, λ) − g(u, λ))``, whose gradient in ``λ_i`` is ``γ (ℓ_i(w) − ℓ_i(u))``: a source that the
validation-aware model ``w`` fits worse than the pure training optimum ``u`` does is one the
validation loss pulls away from, and its weight falls. No Hessian, no unrolling; ``u`` is one copy
of the trained parameters (a LoRA adapter's size when only the adapter trains).

The weights are ``softmax(logits)`` (``parametrization="softmax"``: the λ-gradient is pulled back
through the softmax) or a point of the simplex updated by projected gradient
(``"simplex"``, Euclidean projection; a weight can reach exactly 0).

The lower level is trained first order (``lower="first_order"``: the caller's optimizer steps ``w``;
full fine-tuning or a LoRA adapter, whichever parameters are passed) or zeroth order
(``lower="zo"``: ``w`` and ``u`` are stepped by a ZO rule of :mod:`lightning_zobi.zo` from forward
passes, the λ-gradient read off the same forwards' per-source losses).

Memory: the copy ``u`` of the trained parameters (×3 with ``inner_optimizer="adam"``) and one float per
source; nothing else beyond the lower level's own training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_zobi.bilevel.penalty import InnerCopy
from lightning_zobi.bilevel.problem import BilevelProblem, BilevelSolver, GammaSchedule, clear_grads, swapped
from lightning_zobi.zo.optim import ZOOptimizer, build_optimizer

PARAMETRIZATIONS = ("softmax", "simplex")
LOWER_MODES = ("first_order", "zo")


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v`` onto the probability simplex (Duchi et al., 2008)."""
    n = v.numel()
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1.0
    ind = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    rho = int(torch.nonzero(u - css / ind > 0).max())
    theta = css[rho] / (rho + 1)
    return torch.clamp(v - theta, min=0.0)


class SourceWeights:
    """One weight per data source: ``softmax(logits)`` or a point of the simplex.

    Args:
        sources: source names (order = weight order).
        parametrization: ``"softmax"`` or ``"simplex"``.
        lr: step of the weight update (on the logits, or on λ before the projection).
        init: initial weights (a dict or list; normalised); default uniform.
    """

    def __init__(
        self,
        sources: Sequence[str],
        parametrization: str = "softmax",
        lr: float = 0.1,
        init: Sequence[float] | dict[str, float] | None = None,
    ) -> None:
        sources = list(sources)
        if len(sources) < 2 or len(set(sources)) != len(sources):
            raise ValueError(
                f"sources={sources!r} is invalid: name at least two distinct data sources to weight."
            )
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"parametrization={parametrization!r} is invalid: choose one of {list(PARAMETRIZATIONS)}."
            )
        if not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
            raise ValueError(
                f"weight_lr={lr!r} is invalid: the source-weight step must be a finite float > 0."
            )
        if init is None:
            start = torch.full((len(sources),), 1.0 / len(sources), dtype=torch.float64)
        else:
            values = [init[s] for s in sources] if isinstance(init, dict) else list(init)
            if len(values) != len(sources) or any(not v > 0 for v in values):
                raise ValueError(
                    f"init_weights={init!r} is invalid: give one positive weight per source ({sources})."
                )
            start = torch.tensor(values, dtype=torch.float64)
            start = start / start.sum()
        self.sources = sources
        self.parametrization = parametrization
        self.lr = float(lr)
        self.logits = start.log() if parametrization == "softmax" else start.clone()

    @property
    def weights(self) -> Tensor:
        """λ (float64, sums to 1)."""
        return torch.softmax(self.logits, 0) if self.parametrization == "softmax" else self.logits.clone()

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.sources, self.weights.tolist(), strict=True))

    def step(self, grad: Tensor) -> None:
        """One descent step along ``grad = ∂/∂λ`` of the outer objective."""
        grad = grad.to(torch.float64)
        if not torch.isfinite(grad).all():
            return
        if self.parametrization == "softmax":
            lam = self.weights
            self.logits = self.logits - self.lr * lam * (grad - (lam * grad).sum())
        else:
            self.logits = project_simplex(self.logits - self.lr * grad)

    def state_dict(self) -> dict[str, Any]:
        return {
            "sources": list(self.sources),
            "parametrization": self.parametrization,
            "logits": self.logits.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["sources"]) != self.sources or state["parametrization"] != self.parametrization:
            raise ValueError(
                f"The checkpoint weights sources {state['sources']} ({state['parametrization']}), not {self.sources} "
                f"({self.parametrization}): resume with the same sources and parametrization."
            )
        self.logits = torch.tensor(state["logits"], dtype=torch.float64)


class DataReweighting(BilevelSolver):
    """ScaleBiO's single-loop minimax solver for source weights λ over a model trained on the weighted mixture.

    Each step on a batch ``{source: sub-batch, ..., upper_key: validation sub-batch}``:

    1. ``u``: ``inner_steps`` steps on ``g(u, λ) = Σ λ_i ℓ_i(u)`` (first order: SGD/Adam on the copy;
       ``lower="zo"``: the ZO rule, from forwards);
    2. ``ℓ_i(u)`` for every source (forwards only);
    3. ``w``: one step of the optimizer (or the ZO rule) on ``f(w) + γ Σ λ_i ℓ_i(w)``;
    4. ``λ``: one step along ``γ (ℓ_i(w) − ℓ_i(u))`` (through the softmax, or projected on the simplex).

    With ``keep_best_z`` (default), when ``g(u, λ) > g(w, λ)`` the copy fell behind ``w`` and is reset
    to it (the λ-gradient is then zero for the step), as the package's penalty solver does.

    Args:
        sources: names of the training sources (keys of the batch).
        source_loss: ``(sub_batch, source_name) -> scalar`` loss of the model on a source's batch;
            also called with ``upper_key`` for the upper (validation) loss ``f``.
        params: the trained parameters ``w`` (full model, or a LoRA adapter).
        optimizer: the first-order optimizer over ``params`` (``lower="first_order"``).
        gamma: penalty constant γ (or a :class:`GammaSchedule`); the solution is ``O(1/γ)`` from the
            bilevel one.
        weight_lr, parametrization, init_weights: the source weights (:class:`SourceWeights`).
        upper_key: batch key of the validation sub-batch.
        inner_steps, inner_lr, inner_optimizer: the copy ``u``'s steps (first order).
        lower: ``"first_order"`` or ``"zo"``.
        zo_optimizer, zo_lr, eps, queries, seed, zo_kwargs: the ZO rule of ``lower="zo"`` (``w`` uses
            ``seed``, ``u`` uses ``seed + 1``: independent directions).
        keep_best_z, max_grad_norm: as :class:`~lightning_zobi.bilevel.ValueFunctionPenalty`.

    Cost per step (first order, ``S`` sources): ``K·S`` forward+backward passes for ``u``, ``S``
    forwards for ``ℓ_i(u)``, ``S + 1`` forward+backward passes for ``w``. ZO: ``2q(S + 1)`` forwards
    for ``w``, ``2q·S`` per inner step for ``u`` and ``S`` for ``ℓ_i(u)``.
    """

    name = "reweighting"

    def __init__(
        self,
        sources: Sequence[str],
        source_loss: Callable[[Any, str], Tensor],
        params: Sequence[Tensor],
        optimizer: torch.optim.Optimizer | None = None,
        gamma: float | GammaSchedule = 10.0,
        *,
        weight_lr: float = 0.1,
        parametrization: str = "softmax",
        init_weights: Sequence[float] | dict[str, float] | None = None,
        upper_key: str = "val",
        inner_steps: int = 1,
        inner_lr: float = 1e-2,
        inner_optimizer: str = "sgd",
        lower: str = "first_order",
        zo_optimizer: str = "zo_sgd",
        zo_lr: float = 1e-3,
        eps: float = 1e-3,
        queries: int = 1,
        seed: int = 0,
        zo_kwargs: dict[str, Any] | None = None,
        keep_best_z: bool = True,
        max_grad_norm: float | None = None,
        param_names: Sequence[str] | None = None,
    ) -> None:
        if lower not in LOWER_MODES:
            raise ValueError(f"lower={lower!r} is invalid: choose one of {list(LOWER_MODES)}.")
        if upper_key in sources:
            raise ValueError(
                f"upper_key={upper_key!r} is also a training source; the validation batch needs a key of its own."
            )
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(
                f"inner_steps={inner_steps!r} is invalid: the copy u needs K >= 1 steps per step."
            )
        self.weights = SourceWeights(sources, parametrization, weight_lr, init_weights)
        self.sources = list(sources)
        self.source_loss = source_loss
        self.upper_key = upper_key
        self.lower_mode = lower
        params = list(params)

        def upper(batch: Any) -> Tensor:
            return source_loss(_part(batch, upper_key), upper_key)

        def weighted(batch: Any) -> Tensor:
            lam = self.weights.weights.tolist()
            return sum(lam[i] * source_loss(_part(batch, s), s) for i, s in enumerate(self.sources))

        problem = BilevelProblem(
            upper_loss=upper,
            lower_loss=weighted,
            upper_params=[self.weights.logits],
            lower_params=params,
            upper_names=["source_logits"],
            lower_names=list(param_names) if param_names is not None else [],
        )
        super().__init__(problem, gamma, max_grad_norm)
        self.inner_steps = inner_steps
        self.keep_best_z = keep_best_z
        self.inner = InnerCopy(params, inner_optimizer, inner_lr)
        self.zo: ZOOptimizer | None = None
        self.zo_inner: ZOOptimizer | None = None
        if lower == "first_order":
            if optimizer is None:
                raise ValueError(
                    "lower='first_order' needs the optimizer over the trained parameters (e.g. the module's AdamW), "
                    "or use lower='zo'."
                )
            self._bind_optimizer(
                optimizer, params, "trained", "Unfreeze them, or pass the parameters that train."
            )
        else:
            common = dict(lr=zo_lr, eps=eps, queries=queries, **(zo_kwargs or {}))
            self.zo = build_optimizer(zo_optimizer, params, seed=seed, **common)
            self.zo_inner = build_optimizer(zo_optimizer, params, seed=seed + 1, **common)

    @property
    def z(self) -> list[Tensor]:
        """The copy ``u`` of the trained parameters (tracks ``argmin_w g(w, λ)``)."""
        return self.inner.z

    def attach(self, module: torch.nn.Module) -> DataReweighting:
        """Name the model for the ZO rules (exact perturbation per module, ``forward_mode``); returns ``self``."""
        for opt in (self.zo, self.zo_inner):
            if opt is not None:
                opt.attach(module)
        return self

    # ------------------------------------------------------------------ the step
    def _losses(self, batch: Any) -> list[Tensor]:
        return [self.source_loss(_part(batch, s), s) for s in self.sources]

    def _step(self, batch: Any, gamma: float) -> dict[str, float]:
        lam = self.weights.weights
        params = self.problem.lower_params
        if self.lower_mode == "first_order":
            self.inner.run(self.problem, batch, self.inner_steps)
        else:
            assert self.zo_inner is not None
            with swapped(params, self.z):
                for _ in range(self.inner_steps):
                    self.zo_inner.step(lambda: self.problem.lower(batch))
        with torch.no_grad(), swapped(params, self.z):
            loss_u = torch.tensor([float(v) for v in self._losses(batch)], dtype=torch.float64)

        if self.lower_mode == "first_order":
            clear_grads(params)
            f = self.problem.upper(batch)
            parts = self._losses(batch)
            g = sum(float(lam[i]) * parts[i] for i in range(len(parts)))
            (f + gamma * g).backward(inputs=params)
            self._clip(params)
            self.optimizer.step()
            clear_grads(params)
            f_value = float(f.detach())
            loss_w = torch.tensor([float(v.detach()) for v in parts], dtype=torch.float64)
        else:
            assert self.zo is not None
            seen: list[tuple[float, list[float]]] = []

            def closure() -> Tensor:
                f_val = self.problem.upper(batch)
                parts = self._losses(batch)
                seen.append((float(f_val), [float(v) for v in parts]))
                return f_val + gamma * sum(float(lam[i]) * parts[i] for i in range(len(parts)))

            self.zo.step(closure)
            f_value = sum(s[0] for s in seen) / len(seen)
            loss_w = torch.tensor(
                [sum(s[1][i] for s in seen) / len(seen) for i in range(len(self.sources))],
                dtype=torch.float64,
            )

        g_w, g_u = float((lam * loss_w).sum()), float((lam * loss_u).sum())
        if self.keep_best_z and g_u > g_w:
            self.inner.adopt()  # u fell behind w: u <- w, no λ-move this step
            loss_u = loss_w.clone()
            g_u = g_w
        self.weights.step(gamma * (loss_w - loss_u))
        logs = {
            "f": f_value,
            "g": g_w,
            "gap": g_w - g_u,
            "gamma": gamma,
            "objective": f_value + gamma * (g_w - g_u),
        }
        for name, value in self.weights.as_dict().items():
            logs[f"weight/{name}"] = value
        for name, lw, lu in zip(self.sources, loss_w.tolist(), loss_u.tolist(), strict=True):
            logs[f"loss/{name}"] = lw
            logs[f"gap/{name}"] = lw - lu
        return logs

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = {
            **super().state_dict(),
            "weights": self.weights.state_dict(),
            "inner": self.inner.state_dict(),
        }
        if self.zo is not None and self.zo_inner is not None:
            state["zo"] = self.zo.state_dict()
            state["zo_inner"] = self.zo_inner.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.weights.load_state_dict(state["weights"])
        self.inner.load_state_dict(state["inner"])
        if self.zo is not None and self.zo_inner is not None and "zo" in state:
            self.zo.load_state_dict(state["zo"])
            self.zo_inner.load_state_dict(state["zo_inner"])


def _part(batch: Any, key: str) -> Any:
    if isinstance(batch, (list, tuple)) and len(batch) == 3 and isinstance(batch[0], dict):
        batch = batch[0]  # CombinedLoader's (batch, batch_idx, dataloader_idx)
    if not isinstance(batch, dict) or key not in batch:
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise KeyError(
            f"The reweighting batch has no {key!r} part ({got}): feed a CombinedLoader with one loader per source "
            "plus the validation loader (e.g. a lightning_zobi sources datamodule)."
        )
    return batch[key]
