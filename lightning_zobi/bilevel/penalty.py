"""First-order penalty solvers: the value-function penalty and the value-function-free single loop.

Both replace ``min f(x, y) s.t. y ∈ argmin g(x, y)`` by a penalized single-level problem:

* :class:`ValueFunctionPenalty` minimizes ``f(x, y) + γ (g(x, y) − v(x))`` with the value function
  ``v(x) = min_z g(x, z)`` approximated by ``g(x, z)``, ``z`` a copy of the lower parameters that
  tracks ``argmin g(x, ·)`` with ``K`` inner gradient steps per outer step (warm-started).
* :class:`ValueFunctionFree` drops ``v`` and its inner loop: one update per step on ``f + γ g``.

The penalty gap ``g(x, y) − g(x, z) ≥ 0`` measures how far ``y`` is from lower-level optimal.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_zobi.bilevel.problem import BilevelProblem, BilevelSolver, GammaSchedule, clear_grads, swapped


class _InnerCopySolver(BilevelSolver):
    """A solver that tracks ``argmin_z g(x, z)`` with an inner copy ``z`` (the penalty and ZOFO solvers).

    Holds ``K`` (``inner_steps``), ``keep_best_z`` and the :class:`InnerCopy`, and adds ``z`` and its
    optimizer state to the solver's checkpoint state.
    """

    def _init_inner(
        self,
        inner_steps: int,
        inner_optimizer: str,
        inner_lr: float,
        reset_inner: bool,
        keep_best_z: bool,
        needs: str,
    ) -> None:
        """Validate ``inner_steps`` (``needs``: who needs K >= 1, for the message) and build ``z``."""
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps={inner_steps!r} is invalid: {needs} needs K >= 1 inner steps.")
        self.keep_best_z = keep_best_z
        self.inner_steps = inner_steps
        self.inner = InnerCopy(self.problem.lower_params, inner_optimizer, inner_lr, reset_inner)

    @property
    def z(self) -> list[Tensor]:
        """The inner copy of the lower parameters."""
        return self.inner.z

    def state_dict(self) -> dict[str, Any]:
        """Step counter, the inner copy ``z`` (one tensor per lower parameter) and its optimizer state."""
        return {**super().state_dict(), "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.inner.load_state_dict(state["inner"])


class ValueFunctionPenalty(_InnerCopySolver):
    """Value-function penalty with an inner copy ``z``: one outer step = ``K`` inner steps + 1 update.

    Each step: (1) ``K`` gradient steps ``z ← z − β ∇_z g(x, z)`` on a copy of the lower
    parameters only (warm-started from the previous step's ``z``); (2) one step of the given
    first-order optimizer on ``x ∪ y`` with the gradient of
    ``F_γ(x, y) = f(x, y) + γ (g(x, y) − g(x, z))``, ``z`` held fixed (Danskin: ``∇v(x) = ∇_x g(x, z*)``).
    Where ``x`` and ``y`` overlap, a shared tensor is a lower variable inside ``g(x, z)`` and gets
    no gradient from that term. With ``x = y`` (simple bilevel) the ``g(x, z)`` term has no
    gradient and ``z`` only measures the gap.

    Papers: Shen & Chen, "On Penalty-based Bilevel Gradient Descent Method" (PBGD, ICML 2023,
    arXiv 2302.05185); Kwon, Kwon, Wright & Nowak, "On Penalty Methods for Nonconvex Bilevel
    Optimization and First-Order Stochastic Approximation" (ICLR 2024, arXiv 2309.01753), whose
    ``σ f + g − g(x, z)`` with ``σ = 1/γ`` is the same objective scaled by ``σ``. The solution of
    ``F_γ`` is ``O(1/γ)`` from the bilevel one; the objective is ``~γ L_g``-smooth, so an SGD rate
    must shrink like ``1/γ`` (Adam-type rates need not); ramp γ with :class:`GammaSchedule`.

    Cost per step: ``K + 1`` forward+backward passes of ``g`` at ``(x, z)`` (the last one only
    backpropagates into ``x ∖ y``) plus one of ``f + γ g`` at ``(x, y)``.
    Memory: the copy ``z`` (one tensor per lower parameter, e.g. a LoRA adapter's size; twice more
    with ``inner_optimizer="adam"``) and the optimizer's own state; gradients of ``x ∪ y`` as in
    ordinary training (accumulated in place through ``backward(inputs=...)``, no second gradient
    buffer). The ``x``-gradient reads ``γ ∇_x g(x, z)``, so ``z`` must track ``argmin g(x, ·)`` to
    about ``1/γ``: too few or too small inner steps make the update wrong, even unstable.

    Args:
        problem: the bilevel problem.
        optimizer: first-order optimizer over (at least) ``x ∪ y``; its groups and rates are used.
        gamma: penalty constant (or a :class:`GammaSchedule`).
        inner_steps: ``K``, inner steps on ``z`` per outer step (``>= 1``).
        inner_lr: ``β``, the inner step on ``z`` (SGD: about ``1/L_g``).
        inner_optimizer: ``"sgd"`` or ``"adam"`` for ``z`` (see :class:`InnerCopy`).
        reset_inner: re-copy ``z ← y`` before each inner loop instead of warm-starting.
        keep_best_z: when ``g(x, z) > g(x, y)`` (the inner copy fell behind ``y``; checked with the
            inner loop's last value, at no extra cost), take ``z ← y``: the ``x``-terms of the
            penalty then cancel for this step. ``v(x) ≤ g(x, y)`` always holds, so ``y`` is
            the better estimate of the value function then; without this, ``x`` is pushed to make
            ``g(x, z)`` worse (the penalty rewards a negative gap). A safeguard of this package,
            not of the papers; it never triggers when ``z`` is accurate. The logged gap is then ``≥ 0``.
        max_grad_norm: optional clipping of the ``x ∪ y`` gradient norm before the update.
    """

    name = "penalty"

    def __init__(
        self,
        problem: BilevelProblem,
        optimizer: torch.optim.Optimizer,
        gamma: float | GammaSchedule = 10.0,
        *,
        inner_steps: int = 1,
        inner_lr: float = 1e-2,
        inner_optimizer: str = "sgd",
        reset_inner: bool = False,
        keep_best_z: bool = True,
        max_grad_norm: float | None = None,
    ) -> None:
        super().__init__(problem, gamma, max_grad_norm)
        self._init_inner(
            inner_steps, inner_optimizer, inner_lr, reset_inner, keep_best_z, "the value-function penalty"
        )
        self._bind_optimizer(
            optimizer,
            problem.joint_params,
            "upper/lower",
            "Unfreeze them, or narrow upper_params/lower_params.",
        )

    def _step(self, batch: Any, gamma: float) -> dict[str, float]:
        problem = self.problem
        joint = problem.joint_params
        clear_grads(joint)
        g_z_before = self.inner.run(problem, batch, self.inner_steps)  # g(x, z) before the last inner step
        f, g = problem.losses(batch)
        f_value, g_value = float(f.detach()), float(g.detach())
        if self.keep_best_z and g_z_before > g_value:
            # The copy fell behind y: z ← y. Then γ(∇ₓg(x, y) − ∇ₓg(x, z)) = 0 and only y feels γ g.
            self.inner.adopt()
            f.backward(inputs=joint, retain_graph=True)
            (gamma * g).backward(inputs=problem.lower_params)
            g_z_value = g_value
        else:
            (f + gamma * g).backward(inputs=joint)
            del f, g
            # −γ ∇_{x∖y} g(x, z): accumulated straight into .grad of the upper-only tensors.
            x_only = problem.upper_only_params
            with swapped(problem.lower_params, self.z):
                g_z = problem.lower(batch)
                if x_only and gamma:
                    (-gamma * g_z).backward(inputs=x_only)
            g_z_value = float(g_z.detach())
            del g_z
        self._clip(joint)
        self.optimizer.step()
        clear_grads(joint)
        gap = g_value - g_z_value
        return {"f": f_value, "g": g_value, "gap": gap, "gamma": gamma, "objective": f_value + gamma * gap}


class ValueFunctionFree(BilevelSolver):
    """Value-function-free single loop (PBGD-Free): one update per step on ``f(x, y) + γ g(x, y)``.

    Drops the value-function term ``−γ g(x, z)`` of the penalty and with it the inner loop and the
    copy ``z``. Exact when ``∇_x v(x) = 0`` (e.g. simple bilevel, or ``v`` constant in ``x``);
    otherwise it is biased by ``γ ∇v(x)``, which Jiang et al. show is negligible when the upper
    objective is *flat* in the lower variable (their Hölder-type flatness condition, observed in
    representation-learning LLM fine-tuning), so a small γ suffices.

    Paper: Jiang, Xiao, Chen & Chen, "Beyond Value Functions: Single-Loop Bilevel Optimization
    under Flatness Conditions" (NeurIPS 2025, arXiv 2507.20400).

    Cost per step: one forward of ``f`` and ``g`` and one backward of ``f + γ g``: the cost of one
    ordinary training step on two losses. Memory: nothing beyond first-order training (no ``z``).
    The logged dict has no ``gap`` (there is no ``z`` to measure it).
    """

    name = "vf_free"

    def __init__(
        self,
        problem: BilevelProblem,
        optimizer: torch.optim.Optimizer,
        gamma: float | GammaSchedule = 1.0,
        *,
        max_grad_norm: float | None = None,
    ) -> None:
        super().__init__(problem, gamma, max_grad_norm)
        self._bind_optimizer(
            optimizer,
            problem.joint_params,
            "upper/lower",
            "Unfreeze them, or narrow upper_params/lower_params.",
        )

    def _step(self, batch: Any, gamma: float) -> dict[str, float]:
        joint = self.problem.joint_params
        clear_grads(joint)
        f, g = self.problem.losses(batch)
        objective = f + gamma * g
        objective.backward(inputs=joint)
        self._clip(joint)
        self.optimizer.step()
        clear_grads(joint)
        f_value, g_value = float(f.detach()), float(g.detach())
        return {"f": f_value, "g": g_value, "gamma": gamma, "objective": f_value + gamma * g_value}


# ---------------------------------------------------------------------- shared by penalty and ZOFO
INNER_OPTIMIZERS = ("sgd", "adam")


class InnerCopy:
    """The copy ``z`` of the lower parameters and its inner optimizer: ``z`` tracks ``argmin_z g(x, z)``.

    ``inner_optimizer="sgd"``: ``z ← z − β ∇_z g(x, z)``, no extra state. ``"adam"``: torch's Adam
    on ``z`` (two more lower-sized buffers), the better match when the lower level itself is trained
    with Adam: with a weaker inner optimizer ``z`` falls behind ``y`` and the logged gap goes negative.
    The gradient is taken by swapping ``z`` into the model (:func:`swapped`), so the model's own
    forward is used. Memory: ``|y|`` for ``z`` (+ ``2|y|`` with Adam).
    """

    def __init__(
        self, lower: list[Tensor], optimizer: str = "sgd", lr: float = 1e-2, reset: bool = False
    ) -> None:
        if optimizer not in INNER_OPTIMIZERS:
            raise ValueError(
                f"inner_optimizer={optimizer!r} is invalid: choose one of {list(INNER_OPTIMIZERS)}."
            )
        if not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(
                f"inner_lr={lr!r} is invalid: use a float > 0 (SGD: about 1/L of the lower loss)."
            )
        self.lower = lower
        self.reset = reset
        self.z = [p.detach().clone() for p in lower]
        opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
        self.optimizer = opt_cls(self.z, lr=float(lr))

    def run(self, problem: BilevelProblem, batch: Any, steps: int) -> float:
        """``steps`` inner steps on ``z`` for ``g(x, ·)``; returns the last ``g(x, z)`` evaluated."""
        lower = self.lower
        if self.reset:
            with torch.no_grad():
                for t, p in zip(self.z, lower, strict=True):
                    t.copy_(p)
        value = float("nan")
        with swapped(lower, self.z):
            for _ in range(steps):
                clear_grads(lower)
                g_z = problem.lower(batch)
                g_z.backward(inputs=lower)
                value = float(g_z.detach())
                for t, p in zip(self.z, lower, strict=True):
                    t.grad = p.grad  # p's storage is z here
                self.optimizer.step()
                clear_grads(self.z)
            clear_grads(lower)
        return value

    def adopt(self) -> None:
        """``z ← y``: take the current lower parameters as the inner solution (optimizer state kept)."""
        with torch.no_grad():
            for t, p in zip(self.z, self.lower, strict=True):
                t.copy_(p)

    def state_dict(self) -> dict[str, Any]:
        return {"z": [t.detach().clone() for t in self.z], "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["z"]
        if len(saved) != len(self.z):
            raise ValueError(
                f"The checkpoint's inner copy z has {len(saved)} tensors but the lower level has {len(self.z)}: "
                "resume with the same lower_params (and adapter) as the run that wrote it."
            )
        with torch.no_grad():
            for t, s in zip(self.z, saved, strict=True):
                if t.shape != s.shape:
                    raise ValueError(
                        f"The checkpoint's z tensor has shape {tuple(s.shape)}, expected {tuple(t.shape)}."
                    )
                t.copy_(s.to(device=t.device, dtype=t.dtype))
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
