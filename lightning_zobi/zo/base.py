"""The ZO optimizer base: seeded two-point estimates, exact perturbation, one update pass.

:class:`ZOOptimizer` is a ``torch.optim.Optimizer`` driven by ``step(closure)``, used like
``torch.optim.LBFGS``: the closure runs a forward pass and returns the loss, and the optimizer
calls it two (or ``q+1``/``2q``) times per step at perturbed parameters::

    opt = ZOSGD(model.parameters(), lr=1e-6, eps=1e-3)
    loss = opt.step(lambda: model(**batch).loss)

No ``.grad`` is ever allocated and no autograd graph is recorded: while the closure runs, the
optimizer's parameters (and :attr:`ZOOptimizer.no_grad_params`) have ``requires_grad`` switched
off, so even a closure that re-enables grad (Lightning's does) builds no graph.

A rule (``zo/rules/``) sees only ``(seed, g)`` pairs and overrides :meth:`ZOOptimizer._update`
or :meth:`ZOOptimizer.apply_rule`; a rule that needs past directions regenerates them. Which
execution backend (torch, fused Triton, sharded) runs a rule is decided in ``zo/backends.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_zobi.zo.directions import (
    DirectionKey,
    Directions,
    GaussianDirections,
    derive_seed,
)
from lightning_zobi.zo.estimators import ESTIMATORS, Closure, Estimate, reduce_mean
from lightning_zobi.zo.forwards import StepForwards, check_modes
from lightning_zobi.zo.perturbation import PERTURBATIONS, Perturber
from lightning_zobi.zo.perturbers import make_perturber
from lightning_zobi.zo.rounding import HALF_DTYPES, writable

_ROUNDING_SALT = 0x5352


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
        perturbation: ``"exact"`` (default): θ is never written by a perturbation; ``θ ± εz`` is
            materialised per module during its forward (:mod:`~lightning_zobi.zo.perturbation`),
            so a step with ``lr = 0`` leaves every parameter bit-identical in every dtype.
            ``"inplace"``: MeZO's in-place ``θ ± εz`` (each write rounds; in bf16 the weights drift).
        rng: ``"shared"`` (default): every forward of a step replays the same random state, so
            dropout masks, diffusion timesteps and noise drawn in the closure are the same for
            ``L+`` and ``L−``; ``"independent"``: each forward draws afresh.
        forward_mode: ``"train"`` (the module's own mode) or ``"eval"`` (the step's forwards run
            with the :meth:`attach` ed module in eval mode, as MeZO's code does).
        stochastic_rounding: round updates of bf16/fp16 parameters stochastically (seeded by run
            seed, step and parameter, so resume stays exact), keeping sub-ulp updates in
            expectation. ``None`` (default) = on; fp32/fp64 parameters round to nearest.
        projected_grad_clip: clamp each query's projected gradient ``g`` to ``[-c, c]`` before the
            update (``Trainer(gradient_clip_val=c)`` sets it through the callback); ``None``: off.

    Attributes:
        grad_reducer: optional callable averaging a float64 tensor of projected gradients across
            processes (set by ``ZODDPStrategy``); ``None`` on one process.
        no_grad_params: extra tensors whose ``requires_grad`` is switched off while the closure
            runs (the Lightning callback puts the whole module here).
        last_estimate: the :class:`Estimate` of the latest step (for logging).
        tensor_owners: ``{id(tensor): module}`` for perturbed tensors that are not parameters of a
            module (QZO's scales), so exact perturbation knows whose forward reads them.
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
        perturbation: str = "exact",
        rng: str = "shared",
        forward_mode: str = "train",
        stochastic_rounding: bool | None = None,
        projected_grad_clip: float | None = None,
    ) -> None:
        if perturbation not in PERTURBATIONS:
            make_perturber(perturbation, [], GaussianDirections())  # raises the clear error
        check_modes(rng, forward_mode)
        if projected_grad_clip is not None and (
            not isinstance(projected_grad_clip, (int, float)) or not projected_grad_clip > 0
        ):
            raise ValueError(
                f"projected_grad_clip={projected_grad_clip!r} is invalid: use a float > 0 (the bound on each "
                "query's projected gradient), or None for no clipping."
            )
        if not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(
                f"lr={lr!r} is invalid: a ZO learning rate must be a float >= 0 (MeZO uses 1e-7..1e-6)."
            )
        if not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
            raise ValueError(
                f"eps={eps!r} is invalid: the perturbation scale must be a finite float > 0 (e.g. 1e-3)."
            )
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay!r} is invalid: use a value >= 0.")
        if not isinstance(queries, int) or queries < 1:
            raise ValueError(
                f"queries={queries!r} is invalid: use an integer >= 1 (directions averaged per step)."
            )
        if difference not in ESTIMATORS:
            raise ValueError(f"difference={difference!r} is invalid: choose one of {sorted(ESTIMATORS)}.")
        if max_nonfinite < 1:
            raise ValueError(f"max_nonfinite={max_nonfinite!r} is invalid: use an integer >= 1.")
        params = list(params)
        if not params or all(isinstance(g, dict) and not list(g.get("params", [])) for g in params):
            raise ValueError(
                "The ZO optimizer got no trainable parameters (the parameter list is empty). Pass the "
                "parameters to tune, or unfreeze some (requires_grad=True) / add a LoRA adapter."
            )
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
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
        self.perturbation = perturbation
        self.rng = rng
        self.forward_mode = forward_mode
        self.stochastic_rounding = True if stochastic_rounding is None else bool(stochastic_rounding)
        self.projected_grad_clip = None if projected_grad_clip is None else float(projected_grad_clip)
        self.module: torch.nn.Module | None = None
        self.offload: Any = None  # a ParameterOffload (zo/offload.py): weights live on the host
        self.tensor_owners: dict[int, torch.nn.Module] = {}
        self._perturbers: dict[str, Perturber] = {}
        self._forwards: StepForwards | None = None

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

    def attach(self, module: torch.nn.Module) -> ZOOptimizer:
        """Name the model the closure runs (needed by ``forward_mode="eval"``); returns ``self``."""
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"attach(module=...) needs a torch.nn.Module, got {type(module).__name__}.")
        self.module = module
        self._perturbers.clear()  # exact perturbation of sharded parameters depends on the module
        return self

    def perturber(self) -> Perturber:
        """The object that applies ``θ + Σ s·z`` for the forwards (kept: exact mode learns once
        which tensors are read outside their module's forward)."""
        perturber = self._perturbers.get(self.perturbation)
        params = self._params()
        if perturber is None or len(perturber.params) != len(params) or any(
            a is not b for a, b in zip(perturber.params, params, strict=True)
        ):
            if self.offload is not None:
                from lightning_zobi.zo.offload import OffloadedJustInTime  # the offload backend

                perturber = OffloadedJustInTime(params, self.directions, self.offload, self.tensor_owners)
            else:
                perturber = make_perturber(
                    self.perturbation, params, self.directions, self.tensor_owners, self.module
                )
            self._perturbers[self.perturbation] = perturber
        perturber.directions = self.directions
        return perturber

    def _writable(self, param: Tensor, index: int, step: int | None = None) -> Any:
        """Context yielding what the rule updates for ``param`` (an fp32 copy under stochastic rounding).

        The rounding uniforms come from a generator seeded by (run seed, step, parameter index),
        drawn after the rule's own draws, so resume is bit-exact and paths agree.
        """
        seed = derive_seed(self.seed, self.zo_step if step is None else step, _ROUNDING_SALT, index)

        def generator(device: torch.device) -> torch.Generator:
            return self.directions._pool.get(device, seed)

        if self.offload is not None and self.offload.holds(param):
            from lightning_zobi.zo.offload import offloaded_writable

            return offloaded_writable(self.offload, param, generator, self.stochastic_rounding)
        return writable(param, generator, self.stochastic_rounding and param.dtype in HALF_DTYPES)

    def _step_forwards(self, closure: Closure) -> StepForwards:
        if self.forward_mode == "eval" and self.module is None:
            raise ValueError(
                "forward_mode='eval' needs the model: call opt.attach(model) once (the ZeroOrder callback does), "
                "or use forward_mode='train'."
            )
        return StepForwards(closure, rng=self.rng, forward_mode=self.forward_mode, module=self.module)

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
        forwards = self._forwards = self._step_forwards(closure)
        perturber = self.perturber()
        try:
            with _no_graph([*params, *self.no_grad_params]):
                estimate = estimator(params, forwards, self.directions, keys, self.eps, perturber=perturber)
            estimate.projected_grads = reduce_mean(estimate.projected_grads, self.grad_reducer)
            estimate.finite = estimate.finite and all(math.isfinite(g) for g in estimate.projected_grads)
            self._clip_projected(estimate)
            self.last_estimate = estimate
            if estimate.finite:
                self.nonfinite_streak = 0
                self._update(estimate)
        finally:
            forwards.finish()
            self._forwards = None
            if self.offload is not None:
                self.offload.end_forward()  # drop copies prefetched for the update
        if not estimate.finite:
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

    def _clip_projected(self, estimate: Estimate) -> None:
        """Clamp each query's projected gradient to ``[-c, c]`` (``projected_grad_clip``)."""
        c = self.projected_grad_clip
        if c is not None:
            estimate.projected_grads = [min(c, max(-c, g)) for g in estimate.projected_grads]

    def _restore(self, estimate: Estimate) -> None:
        """Undo a perturbation still applied in place (nothing to do under exact perturbation)."""
        if estimate.pending is not None:
            key, scale = estimate.pending
            self.directions.perturb_(self._params(), key, scale)
            estimate.pending = None

    def _restore_into(self, work: Tensor, p: Tensor, index: int, estimate: Estimate) -> None:
        """Add the in-place perturbation still on ``p`` back out of ``work`` (its writable copy)."""
        if estimate.pending is not None:
            key, scale = estimate.pending
            self.directions.accumulate_(work, p, index, key, scale)

    def _update(self, estimate: Estimate) -> None:
        """Restore ``θ`` (in-place mode) and apply the rule, one pass over the parameters."""
        q = len(estimate.keys)
        for index, p, group in self._indexed():
            with self._writable(p, index) as w:
                self._restore_into(w, p, index, estimate)
                grad = torch.zeros_like(w)
                for key, g in zip(estimate.keys, estimate.projected_grads, strict=True):
                    self.directions.accumulate_(grad, p, index, key, g / q)
                if group["weight_decay"]:
                    grad.add_(w, alpha=group["weight_decay"])
                self.apply_rule(w, grad, group, self.state[p])

    def apply_rule(self, param: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Update ``param`` (the parameter, or its fp32 working copy) from the estimate ``grad`` (SGD here)."""
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



def _set_group_hparams(opt: Optimizer, **given: tuple[Any, Any]) -> None:
    """Set rule hyper-parameters on the groups: ``name=(value passed or None, default)``.

    A value passed explicitly is set on every group; otherwise a group keeps its own value (a
    per-group setting, or one carried over from the module's optimizer, e.g. AdamW's ``betas``)
    and gets the default when it has none.
    """
    for name, (value, default) in given.items():
        opt.defaults[name] = default if value is None else value
        for group in opt.param_groups:
            if value is not None:
                group[name] = value
            else:
                group.setdefault(name, default)


def _check_beta(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} is invalid: use a float in [0, 1) (0.9 is the usual choice).")


def _reject_directions(rule: str, kwargs: dict[str, Any]) -> None:
    if kwargs.get("directions") is not None:
        raise TypeError(f"{rule} builds its own direction family; drop the directions= argument.")
    kwargs.pop("directions", None)


def extra_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of tensors an optimizer keeps between steps (its state; the FO part's for the hybrid)."""

    def tensors_bytes(obj: Any) -> int:
        if isinstance(obj, Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(tensors_bytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(tensors_bytes(v) for v in obj)
        return 0

    total = sum(tensors_bytes(s) for s in optimizer.state.values())
    fo = getattr(optimizer, "fo_optimizer", None)
    if isinstance(fo, Optimizer):
        total += extra_state_bytes(fo)
    return total
