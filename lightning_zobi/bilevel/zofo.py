"""Bilevel ZOFO: a first-order PEFT lower level under a zeroth-order base-model upper level.

The lower variable ``y`` is a peft adapter (LoRA) trained with backpropagation; the upper
variable ``x`` is the base model, updated by the seeded ZO engine (:mod:`lightning_zobi.zo`) from
forward passes only, so the backbone never gets a gradient or an optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_zobi.bilevel.penalty import _InnerCopySolver
from lightning_zobi.bilevel.problem import BilevelProblem, GammaSchedule, clear_grads, swapped
from lightning_zobi.zo.optim import ZOOptimizer, build_optimizer


class BilevelZOFO(_InnerCopySolver):
    """Double loop: ``K`` first-order inner steps on the adapter, then one ZO step on the base model.

    The bilevel problem is reformulated with the value-function penalty as the minimax problem
    ``min_{x, y} max_z f(x, y) + γ (g(x, y) − g(x, z))``. Each step:

    1. ``K`` times: ``z ← z − β ∇_z g(x, z)`` (plain SGD on a copy of the adapter) and one step of
       the given first-order optimizer on ``y`` with ``∇_y (f + γ g)(x, y)``; backpropagation
       reaches only the adapter tensors (``backward(inputs=y)``), never the base weights' ``.grad``.
    2. One ZO step on ``x`` (the base weights) with the two-point estimate of
       ``∇_x [f(x, y) + γ (g(x, y) − g(x, z))]`` under ``torch.no_grad``: perturb ``x`` in place
       by ``±εu`` from a seed, evaluate, restore and update (:class:`~lightning_zobi.zo.ZOOptimizer`).

    Paper: Shirkavand, Yu, He & Huang, "Bilevel ZOFO: Bridging Parameter-Efficient and Zeroth-Order
    Techniques for Efficient LLM Fine-Tuning and Meta-Training" (arXiv 2502.03604).

    Cost per step: ``K`` × (one forward+backward of ``g`` at ``z`` + one of ``f + γ g`` at ``y``,
    backward through the adapter path only) + ``3 × 2q`` forwards for the ZO step (``f``, ``g`` at
    ``y``, ``g`` at ``z``, for ``q`` central-difference queries) and 3 in-place passes over ``x``.
    The logged ``f``, ``g`` and ``gap`` are the means over the ZO evaluations (at ``x ± εu``).

    Memory: the copy ``z`` of the adapter (adapter-sized, ×3 with an Adam inner optimizer), the adapter's gradients and optimizer
    state, activations for the adapter backward; for the base model nothing beyond inference (no
    gradient, no optimizer state, directions regenerated from seeds).

    Args:
        problem: upper params = base weights (ZO), lower params = adapter (first order); disjoint.
        optimizer: first-order optimizer over (at least) the lower params.
        gamma: penalty constant (or a :class:`GammaSchedule`).
        inner_steps: ``K`` inner first-order steps per ZO step (``>= 1``).
        inner_lr: ``β``, step of the copy ``z``; inner_optimizer: ``"sgd"`` or ``"adam"`` for it.
        zo_optimizer: a ZO rule name from :data:`lightning_zobi.zo.OPTIMIZERS` or a built
            :class:`~lightning_zobi.zo.ZOOptimizer` over the upper params.
        zo_lr, eps, queries, difference, seed, max_nonfinite, zo_kwargs: passed to the ZO rule.
        reset_inner: re-copy ``z ← y`` before each inner loop instead of warm-starting.
        keep_best_z: before the ZO step, compare ``g(x, z)`` with ``g(x, y)`` (two forwards) and take
            ``z ← y`` when the copy fell behind (see :class:`~lightning_zobi.bilevel.ValueFunctionPenalty`).
        max_grad_norm: optional clipping of the adapter gradient norm.
    """

    name = "zofo"

    def __init__(
        self,
        problem: BilevelProblem,
        optimizer: torch.optim.Optimizer,
        gamma: float | GammaSchedule = 1.0,
        *,
        inner_steps: int = 1,
        inner_lr: float = 1e-2,
        inner_optimizer: str = "sgd",
        zo_optimizer: str | ZOOptimizer = "zo_sgd",
        zo_lr: float = 1e-6,
        eps: float = 1e-3,
        queries: int = 1,
        difference: str = "central",
        seed: int = 0,
        max_nonfinite: int = 5,
        zo_kwargs: dict[str, Any] | None = None,
        reset_inner: bool = False,
        keep_best_z: bool = True,
        max_grad_norm: float | None = None,
    ) -> None:
        super().__init__(problem, gamma, max_grad_norm)
        self._init_inner(inner_steps, inner_optimizer, inner_lr, reset_inner, keep_best_z, "Bilevel ZOFO")
        lower_ids = {id(p) for p in problem.lower_params}
        shared = [
            n for p, n in zip(problem.upper_params, problem.upper_names, strict=True) if id(p) in lower_ids
        ]
        if shared:
            raise ValueError(
                f"Bilevel ZOFO needs disjoint levels, but {len(shared)} tensor(s) are both upper (ZO) and lower "
                f"(first order): {shared[:4]}. Use upper_params='base' and lower_params='lora' on a peft model."
            )
        self._bind_optimizer(
            optimizer,
            problem.lower_params,
            "lower",
            "The lower level of Bilevel ZOFO is the adapter: add a peft LoRA and pick it with lower_params='lora'.",
        )
        if isinstance(zo_optimizer, ZOOptimizer):
            held = {id(p) for g in zo_optimizer.param_groups for p in g["params"]}
            if held != {id(p) for p in problem.upper_params}:
                raise ValueError("zo_optimizer must be built over exactly the problem's upper params.")
            self.zo = zo_optimizer
        else:
            self.zo = build_optimizer(
                zo_optimizer,
                problem.upper_params,
                lr=zo_lr,
                eps=eps,
                queries=queries,
                difference=difference,
                seed=seed,
                max_nonfinite=max_nonfinite,
                **(zo_kwargs or {}),
            )
        # No autograd graph through the adapter during the ZO forwards either.
        self.zo.no_grad_params = list(problem.lower_params)

    def _step(self, batch: Any, gamma: float) -> dict[str, float]:
        problem = self.problem
        lower = problem.lower_params
        for _ in range(self.inner_steps):
            self.inner.run(problem, batch, 1)
            clear_grads(lower)
            f, g = problem.losses(batch)
            (f + gamma * g).backward(inputs=lower)
            self._clip(lower)
            self.optimizer.step()
            clear_grads(lower)
        if self.keep_best_z:
            with torch.no_grad():
                g_y = float(problem.lower(batch))
                with swapped(lower, self.z):
                    g_z = float(problem.lower(batch))
            if g_z > g_y:
                self.inner.adopt()

        seen: list[tuple[float, float, float]] = []

        def closure() -> torch.Tensor:
            f_val, g_val = problem.losses(batch)
            with swapped(lower, self.z):
                g_z = problem.lower(batch)
            seen.append((float(f_val), float(g_val), float(g_z)))
            return f_val + gamma * (g_val - g_z)

        self.zo.step(closure)
        f_mean = sum(s[0] for s in seen) / len(seen)
        g_mean = sum(s[1] for s in seen) / len(seen)
        gap = sum(s[1] - s[2] for s in seen) / len(seen)
        return {"f": f_mean, "g": g_mean, "gap": gap, "gamma": gamma, "objective": f_mean + gamma * gap}

    def state_dict(self) -> dict[str, Any]:
        """Step counter, the adapter copy ``z`` and the ZO rule's state (run seed, ZO step)."""
        return {**super().state_dict(), "zo": self.zo.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.zo.load_state_dict(state["zo"])
