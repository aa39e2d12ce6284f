"""The bilevel problem: two losses over two named parameter sets of one model, plus shared solver parts.

A bilevel problem is ``min_{x, y} f(x, y)  s.t.  y ∈ argmin_y g(x, y)``: ``f`` is the upper loss
(e.g. the objective we care about, or a concept-suppression loss), ``g`` the lower loss (e.g. the
fine-tuning loss), ``x`` and ``y`` two parameter sets of the same model. The sets may overlap
(``y`` a subset such as a LoRA adapter or the cross-attention layers, ``x`` everything trainable);
when they are equal the problem is a *simple bilevel* one: among the minimizers of ``g`` pick the
one that is best for ``f``.

This module holds :class:`BilevelProblem` (the losses and parameter sets, built by hand or from an
``nn.Module`` with :meth:`BilevelProblem.from_module`), :func:`select_parameters` (the
``"trainable" | "lora" | "base" | "all" | <regex>`` grammar shared with the ``ZeroOrder`` callback),
:class:`GammaSchedule` (the penalty constant's ramp) and :class:`BilevelSolver`, the base of the
solvers in :mod:`lightning_zobi.bilevel.penalty` and :mod:`lightning_zobi.bilevel.zofo`.

Memory: none of its own; it holds references to the model's parameters.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_zobi.zo.params import select_parameters

LossFn = Callable[[Any], Tensor]

PARAM_KEYWORDS = ("trainable", "lora", "base", "all")
"""Keywords of the parameter-set grammar; anything else is a regex searched in parameter names."""


@dataclass
class BilevelProblem:
    """``min f(x, y) s.t. y ∈ argmin g(x, y)``: the two losses and the two parameter sets.

    Attributes:
        upper_loss: ``f(batch) -> scalar Tensor`` at the current parameters.
        lower_loss: ``g(batch) -> scalar Tensor`` at the current parameters.
        upper_params: ``x``, the upper-level parameter tensors.
        lower_params: ``y``, the lower-level parameter tensors (may overlap ``upper_params``).
        losses: optional ``batch -> (f, g)`` that computes both at once (e.g. one ``training_step``
            returning ``{"upper", "lower"}``); by default it calls the two losses in turn.
        upper_names / lower_names: parameter names, for messages.

    Memory: references only.
    """

    upper_loss: LossFn
    lower_loss: LossFn
    upper_params: list[Tensor]
    lower_params: list[Tensor]
    losses_fn: Callable[[Any], tuple[Tensor, Tensor]] | None = None
    upper_names: list[str] = field(default_factory=list)
    lower_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.upper_params = _unique(self.upper_params)
        self.lower_params = _unique(self.lower_params)
        for name, params in (("upper_params", self.upper_params), ("lower_params", self.lower_params)):
            if not params:
                raise ValueError(
                    f"{name} is empty: a bilevel problem needs at least one tensor on each level."
                )
            bad = [type(p).__name__ for p in params if not isinstance(p, Tensor)]
            if bad:
                raise TypeError(f"{name} must hold tensors; got {bad[:3]}.")
        if not callable(self.upper_loss) or not callable(self.lower_loss):
            raise TypeError("upper_loss and lower_loss must be callables batch -> scalar Tensor.")
        if not self.upper_names:
            self.upper_names = [f"upper[{i}]" for i in range(len(self.upper_params))]
        if not self.lower_names:
            self.lower_names = [f"lower[{i}]" for i in range(len(self.lower_params))]

    # ------------------------------------------------------------------ parameter views
    @property
    def upper_only_params(self) -> list[Tensor]:
        """``x ∖ y``: upper parameters that are not also lower parameters."""
        lower = {id(p) for p in self.lower_params}
        return [p for p in self.upper_params if id(p) not in lower]

    @property
    def joint_params(self) -> list[Tensor]:
        """``x ∪ y`` in a fixed order (upper first)."""
        return _unique([*self.upper_params, *self.lower_params])

    # ------------------------------------------------------------------ losses
    def losses(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(f, g)`` at the current parameters, each checked to be a scalar tensor."""
        if self.losses_fn is not None:
            f, g = self.losses_fn(batch)
        else:
            f, g = self.upper_loss(batch), self.lower_loss(batch)
        return _scalar(f, "upper loss f"), _scalar(g, "lower loss g")

    def upper(self, batch: Any) -> Tensor:
        """``f(batch)`` as a checked scalar."""
        return _scalar(self.upper_loss(batch), "upper loss f")

    def lower(self, batch: Any) -> Tensor:
        """``g(batch)`` as a checked scalar."""
        return _scalar(self.lower_loss(batch), "lower loss g")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        upper_params: str = "trainable",
        lower_params: str = "trainable",
        *,
        upper_key: str | None = None,
        lower_key: str | None = None,
        split_batch: bool = False,
        step_fn: Callable[..., Any] | None = None,
    ) -> BilevelProblem:
        """Build the problem from a model, in the first of these ways that applies.

        1. The module defines ``upper_loss(batch)`` and ``lower_loss(batch)``.
        2. ``upper_key``/``lower_key`` are given: the batch is a mapping (e.g. a Lightning
           ``CombinedLoader``) and ``f``/``g`` are the module's ordinary loss (``step_fn``, by default
           ``module.training_step``) on ``batch[upper_key]`` / ``batch[lower_key]``.
        3. ``split_batch=True``: ``f``/``g`` are the module's ordinary loss on the first/second half of
           each batch (split along dim 0): a held-out/train data split for any single-loss module.
        4. ``step_fn(batch)`` (by default ``module.training_step``) returns ``{"upper": f, "lower": g}``.

        The parameter sets come from ``module.bilevel_parameters() -> {"upper": ..., "lower": ...}``
        when the module defines it (it wins), else from ``upper_params``/``lower_params`` (see
        :func:`select_parameters`). ``step_fn`` is called as ``step_fn(batch, batch_idx)`` with the
        problem's :attr:`batch_idx` (the Lightning callback keeps it current).
        """
        names = {id(p): n for n, p in module.named_parameters()}
        custom = getattr(module, "bilevel_parameters", None)
        if callable(custom):
            sets = custom()
            if not isinstance(sets, dict) or set(sets) != {"upper", "lower"}:
                raise TypeError(
                    f"{type(module).__name__}.bilevel_parameters() returned {type(sets).__name__} "
                    f"{sorted(sets) if isinstance(sets, dict) else ''}; it must return "
                    "{'upper': iterable of parameters, 'lower': iterable of parameters}."
                )
            upper = _unique(list(sets["upper"]))
            lower = _unique(list(sets["lower"]))
        else:
            upper = [p for _, p in select_parameters(module, upper_params, argument="upper_params")]
            lower = [p for _, p in select_parameters(module, lower_params, argument="lower_params")]

        holder = _StepHolder(step_fn if step_fn is not None else getattr(module, "training_step", None))
        has_upper = callable(getattr(module, "upper_loss", None))
        has_lower = callable(getattr(module, "lower_loss", None))
        losses_fn: Callable[[Any], tuple[Tensor, Tensor]] | None = None
        if has_upper and has_lower:
            upper_loss: LossFn = module.upper_loss  # type: ignore[assignment]
            lower_loss: LossFn = module.lower_loss  # type: ignore[assignment]
        elif has_upper or has_lower:
            missing = "lower_loss" if has_upper else "upper_loss"
            raise TypeError(
                f"{type(module).__name__} defines only one of upper_loss/lower_loss; define {missing}(self, batch) too."
            )
        elif upper_key is not None or lower_key is not None:
            if upper_key is None or lower_key is None:
                raise ValueError(
                    f"upper_key={upper_key!r}, lower_key={lower_key!r}: give both keys of the combined batch, or none."
                )
            holder.require(type(module).__name__)

            def upper_loss(batch: Any) -> Tensor:
                return holder.loss(_sub_batch(batch, upper_key, "upper_key"))

            def lower_loss(batch: Any) -> Tensor:
                return holder.loss(_sub_batch(batch, lower_key, "lower_key"))

        elif split_batch:
            holder.require(type(module).__name__)

            def upper_loss(batch: Any) -> Tensor:
                return holder.loss(half_batch(batch, 0))

            def lower_loss(batch: Any) -> Tensor:
                return holder.loss(half_batch(batch, 1))

        else:
            holder.require(type(module).__name__)

            def losses_fn(batch: Any) -> tuple[Tensor, Tensor]:
                out = holder.call(batch)
                if not isinstance(out, dict) or "upper" not in out or "lower" not in out:
                    got = sorted(out) if isinstance(out, dict) else type(out).__name__
                    raise TypeError(
                        f"{type(module).__name__}.training_step returned {got}; a bilevel module must define "
                        "upper_loss(self, batch) and lower_loss(self, batch), or return {'upper': f, 'lower': g} "
                        "from training_step, or the Bilevel callback needs upper_key/lower_key for a combined batch."
                    )
                return out["upper"], out["lower"]

            def upper_loss(batch: Any) -> Tensor:
                return losses_fn(batch)[0]

            def lower_loss(batch: Any) -> Tensor:
                return losses_fn(batch)[1]

        problem = cls(
            upper_loss=upper_loss,
            lower_loss=lower_loss,
            upper_params=upper,
            lower_params=lower,
            losses_fn=losses_fn,
            upper_names=[names.get(id(p), "?") for p in _unique(upper)],
            lower_names=[names.get(id(p), "?") for p in _unique(lower)],
        )
        problem._step_holder = holder  # type: ignore[attr-defined]
        return problem

    @property
    def batch_idx(self) -> int:
        """Batch index passed to ``training_step`` when the losses come from it."""
        holder = getattr(self, "_step_holder", None)
        return holder.batch_idx if holder is not None else 0

    @batch_idx.setter
    def batch_idx(self, value: int) -> None:
        holder = getattr(self, "_step_holder", None)
        if holder is not None:
            holder.batch_idx = int(value)


class _StepHolder:
    """Calls ``training_step(batch, batch_idx)`` and extracts a loss from its output."""

    def __init__(self, fn: Callable[..., Any] | None) -> None:
        self.fn = fn
        self.batch_idx = 0

    def require(self, owner: str) -> None:
        if not callable(self.fn):
            raise TypeError(
                f"{owner} has no upper_loss/lower_loss and no training_step: define upper_loss(self, batch) and "
                "lower_loss(self, batch)."
            )

    def call(self, batch: Any) -> Any:
        assert self.fn is not None
        return self.fn(batch, self.batch_idx)

    def loss(self, batch: Any) -> Tensor:
        out = self.call(batch)
        if isinstance(out, dict):
            out = out.get("loss")
        if not isinstance(out, Tensor):
            raise TypeError(
                f"training_step returned {type(out).__name__}; with upper_key/lower_key it must return the loss "
                "tensor (or a dict with a 'loss' key)."
            )
        return out


def half_batch(batch: Any, which: int) -> Any:
    """The first (``which=0``) or second half of a batch along dim 0: tensors, or dicts/lists/tuples of them."""
    if isinstance(batch, Tensor):
        n = batch.shape[0] if batch.dim() else 0
        if n < 2:
            raise ValueError(
                f"split_batch needs batches of at least 2 samples, got a tensor of shape {tuple(batch.shape)}."
            )
        return batch[: n // 2] if which == 0 else batch[n // 2 :]
    if isinstance(batch, dict):
        return {k: half_batch(v, which) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(half_batch(v, which) for v in batch)
    return batch


def _sub_batch(batch: Any, key: str, argument: str) -> Any:
    if isinstance(batch, (list, tuple)) and len(batch) == 3 and isinstance(batch[0], dict):
        # CombinedLoader in "sequential"-like modes yields (batch, batch_idx, dataloader_idx)
        batch = batch[0]
    if not isinstance(batch, dict) or key not in batch:
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise KeyError(
            f"{argument}={key!r} is not in the batch ({got}). Feed a CombinedLoader({{...}}, 'max_size_cycle') whose "
            f"keys include {key!r}, or set {argument} to one of its keys."
        )
    return batch[key]


def _unique(params: Iterable[Tensor]) -> list[Tensor]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _scalar(value: Any, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"The {what} is a {type(value).__name__}; it must be a scalar torch.Tensor.")
    if value.numel() != 1:
        raise ValueError(f"The {what} has shape {tuple(value.shape)}; reduce it to a scalar (e.g. .mean()).")
    return value.reshape(())


# ---------------------------------------------------------------------- penalty constant
GAMMA_SCHEDULES = ("constant", "linear", "geometric")


class GammaSchedule:
    """The penalty constant ``γ_t``: constant, or ramped linearly/geometrically to ``gamma``.

    Penalty methods approximate the bilevel solution to ``O(1/γ)`` but a large ``γ`` from the
    first step makes the objective stiff (smoothness ``~γ L_g``); ramping ``γ`` from ``gamma_init``
    to ``gamma`` over ``ramp_steps`` steps is the usual remedy (Shen & Chen, arXiv 2302.05185, use an
    increasing ``γ``). ``linear``: ``γ_t = γ_0 + (γ − γ_0)·min(1, t/T)``; ``geometric``:
    ``γ_t = γ_0·(γ/γ_0)^min(1, t/T)``. Memory: none.
    """

    def __init__(
        self,
        gamma: float,
        schedule: str = "constant",
        gamma_init: float | None = None,
        ramp_steps: int = 1000,
    ) -> None:
        if not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma={gamma!r} is invalid: the penalty constant must be a finite float >= 0.")
        if schedule not in GAMMA_SCHEDULES:
            raise ValueError(
                f"gamma_schedule={schedule!r} is invalid: choose one of {list(GAMMA_SCHEDULES)}."
            )
        if not isinstance(ramp_steps, int) or ramp_steps < 1:
            raise ValueError(f"gamma_ramp_steps={ramp_steps!r} is invalid: use an integer >= 1.")
        if gamma_init is None:
            gamma_init = float(gamma) / 100.0
        if not math.isfinite(gamma_init) or gamma_init < 0:
            raise ValueError(f"gamma_init={gamma_init!r} is invalid: use a finite float >= 0.")
        if schedule == "geometric" and (gamma_init <= 0 or gamma <= 0):
            raise ValueError(
                f"gamma_schedule='geometric' needs gamma_init > 0 and gamma > 0 (got {gamma_init!r}, {gamma!r}); "
                "use 'linear' to ramp from 0."
            )
        self.gamma = float(gamma)
        self.schedule = schedule
        self.gamma_init = float(gamma_init)
        self.ramp_steps = ramp_steps

    def __call__(self, step: int) -> float:
        if self.schedule == "constant":
            return self.gamma
        frac = min(1.0, max(0, step) / self.ramp_steps)
        if self.schedule == "linear":
            return self.gamma_init + (self.gamma - self.gamma_init) * frac
        return self.gamma_init * (self.gamma / self.gamma_init) ** frac


# ---------------------------------------------------------------------- solver base
@contextmanager
def swapped(params: Sequence[Tensor], values: Sequence[Tensor]) -> Iterator[None]:
    """Temporarily point each parameter's storage at ``values`` (no copy), restoring on exit.

    Used to evaluate ``g(x, z)``: the lower parameters take the inner copy ``z`` while the forward
    runs; in-place updates of the parameter inside the block update ``z``.
    """
    saved = [p.data for p in params]
    for p, v in zip(params, values, strict=True):
        p.data = v
    try:
        yield
    finally:
        for p, s in zip(params, saved, strict=True):
            p.data = s


def clear_grads(params: Iterable[Tensor]) -> None:
    """Drop ``.grad`` of ``params`` (set to None)."""
    for p in params:
        p.grad = None


class BilevelSolver(ABC):
    """Base of the bilevel solvers: ``step(batch) -> {"f", "g", "gap"?, "gamma", "objective"}``.

    Subclasses implement :meth:`_step`; this base keeps the step counter and the γ schedule and
    checks the first-order optimizer covers the parameters it must update.
    """

    name: str = "bilevel"

    def __init__(
        self, problem: BilevelProblem, gamma: float | GammaSchedule, max_grad_norm: float | None
    ) -> None:
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"problem must be a BilevelProblem, got {type(problem).__name__}.")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r} is invalid: use a float > 0 or None.")
        self.problem = problem
        self.gamma_schedule = gamma if isinstance(gamma, GammaSchedule) else GammaSchedule(float(gamma))
        self.max_grad_norm = max_grad_norm
        self.step_count = 0

    @property
    def gamma(self) -> float:
        """γ for the next step."""
        return self.gamma_schedule(self.step_count)

    def step(self, batch: Any) -> dict[str, float]:
        """One solver step on ``batch``; returns the values to log (floats)."""
        logs = self._step(batch, self.gamma)
        self.step_count += 1
        return logs

    @abstractmethod
    def _step(self, batch: Any, gamma: float) -> dict[str, float]:
        """One step at penalty constant ``gamma``."""

    def state_dict(self) -> dict[str, Any]:
        """Solver-owned state (the step counter; subclasses add theirs). Not the caller's optimizer."""
        return {"solver": self.name, "step": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("solver", self.name) != self.name:
            raise ValueError(
                f"The checkpoint holds the state of solver {state.get('solver')!r}, not {self.name!r}: resume with "
                f"solver={state.get('solver')!r}."
            )
        self.step_count = int(state["step"])

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check_requires_grad(params: Sequence[Tensor], names: Sequence[str], what: str, fix: str) -> None:
        frozen = [n for p, n in zip(params, names, strict=True) if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"{len(frozen)} {what} parameter(s) have requires_grad=False ({frozen[:4]}); a first-order update "
                f"needs gradients. {fix}"
            )

    @staticmethod
    def _check_optimizer_covers(
        optimizer: torch.optim.Optimizer, params: Sequence[Tensor], names: Sequence[str]
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for p, n in zip(params, names, strict=True) if id(p) not in held]
        if missing:
            raise ValueError(
                f"The first-order optimizer {type(optimizer).__name__} does not hold {len(missing)} parameter(s) the "
                f"solver must update ({missing[:4]}). Build it over them (e.g. return torch.optim.AdamW(self.parameters()"
                ") from configure_optimizers) or narrow upper_params/lower_params."
            )

    def _bind_optimizer(
        self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], what: str, fix: str
    ) -> None:
        """Check ``params`` require grad and ``optimizer`` holds them all; keep it as ``self.optimizer``."""
        names = self._names_of(params)
        self._check_requires_grad(params, names, what, fix)
        self._check_optimizer_covers(optimizer, params, names)
        self.optimizer = optimizer

    def _clip(self, params: Sequence[Tensor]) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.max_grad_norm)

    def _names_of(self, params: Sequence[Tensor]) -> list[str]:
        lookup = {id(p): n for p, n in zip(self.problem.upper_params, self.problem.upper_names, strict=True)}
        lookup.update(
            {id(p): n for p, n in zip(self.problem.lower_params, self.problem.lower_names, strict=True)}
        )
        return [lookup.get(id(p), "?") for p in params]
