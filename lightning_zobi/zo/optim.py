"""Zeroth-order optimizers: ``torch.optim.Optimizer`` subclasses driven by ``step(closure)``.

Used like ``torch.optim.LBFGS``: the closure runs a forward pass and returns the loss, and the
optimizer calls it two (or ``q+1``/``2q``) times per step at perturbed parameters::

    opt = ZOSGD(model.parameters(), lr=1e-6, eps=1e-3)
    loss = opt.step(lambda: model(**batch).loss)

No ``.grad`` is ever allocated and no autograd graph is recorded: while the closure runs, the
optimizer's parameters (and :attr:`ZOOptimizer.no_grad_params`) have ``requires_grad`` switched
off, so even a closure that re-enables grad (Lightning's does) builds no graph.

A rule sees only ``(seed, g)`` pairs; a rule that needs past directions regenerates them.
"""

from __future__ import annotations

import dataclasses
import math
import re
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
    LowRankDirections,
    SparseDirections,
    derive_seed,
)
from lightning_zobi.zo.estimators import ESTIMATORS, Closure, Estimate, _floats, reduce_mean
from lightning_zobi.zo.forwards import StepForwards, check_modes
from lightning_zobi.zo.perturbation import PERTURBATIONS, Perturber, make_perturber
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
            perturber = make_perturber(
                self.perturbation, params, self.directions, self.tensor_owners, self.module
            )
            self._perturbers[self.perturbation] = perturber
        perturber.directions = self.directions
        return perturber

    def _writable(self, param: Tensor, index: int, step: int | None = None) -> Any:
        """Context yielding what the rule updates for ``param`` (an fp32 copy under stochastic rounding)."""
        enabled = self.stochastic_rounding and param.dtype in HALF_DTYPES
        generator = None
        if enabled:
            seed = derive_seed(self.seed, self.zo_step if step is None else step, _ROUNDING_SALT, index)
            generator = self.directions._pool.get(param.device, seed)
        return writable(param, generator, enabled)

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


OPTIMIZERS: dict[str, type[ZOOptimizer]] = {
    "zo_sgd": ZOSGD,
}
"""Rule names accepted by ``ZeroOrder(optimizer=...)`` and recipes."""


FUSED_RULES = ("zo_sgd", "lozo")
"""Rules with a fused CUDA path (``zo/fused.py``, ``zo/fused_lowrank.py``)."""
FUSED_ONLY_KWARGS = ("lookahead", "rounds", "fast_math")
"""Arguments only the fused classes take; the torch path of a fused rule drops them."""


def build_optimizer(
    name: str, params: Iterable[Any], *, fused: bool | None = None, **kwargs: Any
) -> ZOOptimizer:
    """Instantiate the rule registered as ``name`` with a clear error for unknown names.

    ``fused``: ``None`` picks the fused Triton path (``zo/fused.py``) for ``zo_sgd`` when every
    parameter is on CUDA; ``False`` keeps the torch reference path; ``True`` requires the fused one.
    """
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"optimizer={name!r} is not a known ZO rule; choose one of {sorted(OPTIMIZERS)}."
        ) from None
    if fused is not False:
        from lightning_zobi.zo.fused import select_optimizer  # lazy: Triton is imported only when asked

        cls, params = select_optimizer(cls, params, fused)
    elif name in FUSED_RULES:  # the torch path ignores the fused-only knobs, so one recipe fits both
        kwargs = {k: v for k, v in kwargs.items() if k not in FUSED_ONLY_KWARGS}
    return cls(params, **kwargs)


# ====================================================================== the rule family
# Every rule below is registered in OPTIMIZERS (end of file) and takes the base's keyword
# arguments (lr, eps, weight_decay, queries, difference, seed, max_nonfinite) plus its own.


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


class ZOSign(ZOOptimizer):
    """ZO-signSGD: the sign of the projected gradient (``variant="direction"``) or of ``ĝ`` (``"coordinate"``).

    ``variant="direction"`` (default) is ZO-Bench's ``zo_sign_opt`` ("Revisiting Zeroth-Order
    Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark", arXiv 2402.11592):
    ``θ ← θ − lr · mean_k sign(g_k)·z_k``, a ZO-SGD step whose length no longer depends on ``|g|``
    (ZO-Bench sums over queries; with one query the two agree). ``variant="coordinate"`` is the
    coordinate-wise ``θ ← θ − lr · sign(ĝ)`` of "signSGD via Zeroth-Order Oracle" (Liu, Chen, Chen,
    Hong, ICLR 2019): every coordinate moves by exactly ``lr``. Both make the step robust to the
    heavy-tailed ``g`` of a noisy two-point estimate; tune ``lr`` as an absolute step size.

    Memory: none beyond one parameter-sized temporary.
    """

    VARIANTS = ("direction", "coordinate")

    def __init__(self, *args: Any, variant: str = "direction", **kwargs: Any) -> None:
        if variant not in self.VARIANTS:
            raise ValueError(
                f"variant={variant!r} is invalid: use 'direction' (sign(g)·z, ZO-Bench's default) or 'coordinate' "
                "(sign of the estimated gradient, Liu et al. 2019)."
            )
        super().__init__(*args, **kwargs)
        self.variant = variant

    def _update(self, estimate: Estimate) -> None:
        if self.variant == "direction":
            signs = [math.copysign(1.0, g) if g else 0.0 for g in estimate.projected_grads]
            estimate = dataclasses.replace(estimate, projected_grads=signs)
        super()._update(estimate)

    def apply_rule(self, param: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        param.add_(grad.sign_() if self.variant == "coordinate" else grad, alpha=-group["lr"])


class ZOAdam(ZOOptimizer):
    """ZO-Adam: Adam's moments on the ZO estimate ``ĝ`` (ZO-AdaMM).

    From "ZO-AdaMM: Zeroth-Order Adaptive Momentum Method for Black-Box Optimization"
    (Chen et al., NeurIPS 2019, arXiv 1910.06513), as benchmarked for LLM fine-tuning in
    arXiv 2402.11592. ``m ← β₁m + (1−β₁)ĝ``, ``v ← β₂v + (1−β₂)ĝ²``, bias-corrected,
    ``θ ← θ − lr·m̂/(√v̂ + adam_eps)``. ``adam_eps`` is Adam's denominator guard, distinct from the
    perturbation scale ``eps``. ``betas`` default to (0.9, 0.999) unless a param group carries its
    own (e.g. from the AdamW the module configured); a value passed here applies to every group.

    Memory: two buffers per parameter, **2× the trainable parameters** (as first-order Adam; fp32
    for bf16/fp16 parameters under stochastic rounding), which removes much of ZO's memory
    advantage on full fine-tuning; prefer it with LoRA.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        betas: tuple[float, float] | list[float] | None = None,
        adam_eps: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr, eps, weight_decay, **kwargs)
        _set_group_hparams(
            self, betas=(tuple(betas) if betas is not None else None, (0.9, 0.999)), adam_eps=(adam_eps, 1e-8)
        )
        for group in self.param_groups:
            if len(group["betas"]) != 2:
                raise ValueError(
                    f"betas={group['betas']!r} is invalid: pass two floats (beta1, beta2), e.g. (0.9, 0.999)."
                )
            _check_beta("betas[0]", group["betas"][0])
            _check_beta("betas[1]", group["betas"][1])
            if not isinstance(group["adam_eps"], (int, float)) or not group["adam_eps"] > 0:
                raise ValueError(
                    f"adam_eps={group['adam_eps']!r} is invalid: use a float > 0 (1e-8 is Adam's default)."
                )

    def apply_rule(self, param: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        t = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (exp_avg_sq / (1.0 - beta2**t)).sqrt_().add_(group["adam_eps"])
        param.addcdiv_(exp_avg, denom, value=-group["lr"] / (1.0 - beta1**t))


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


def _split_fo_groups(
    params: Iterable[Any], fo_params: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Split param groups into (ZO groups, FO groups, FO names) by a ``fo`` flag or a name regex."""
    items = list(params)
    if not items:
        return [], [], []
    groups = [dict(g) for g in items] if isinstance(items[0], dict) else [{"params": items}]
    pattern = re.compile(fo_params) if fo_params is not None else None
    zo_groups, fo_groups, fo_names = [], [], []
    for group in groups:
        tensors = list(group.pop("params"))
        names = group.pop("param_names", None)
        if tensors and isinstance(tensors[0], tuple):
            names, tensors = [n for n, _ in tensors], [t for _, t in tensors]
        whole_group_fo = bool(group.pop("fo", False))
        if whole_group_fo:
            is_fo = [True] * len(tensors)
        elif pattern is not None:
            if names is None:
                raise ValueError(
                    f"fo_params={fo_params!r} needs parameter names: pass model.named_parameters() (or groups "
                    "with 'param_names'), or mark the first-order group with {'params': [...], 'fo': True}."
                )
            is_fo = [pattern.search(n) is not None for n in names]
        else:
            is_fo = [False] * len(tensors)
        fo_part = [t for t, f in zip(tensors, is_fo, strict=True) if f]
        zo_part = [t for t, f in zip(tensors, is_fo, strict=True) if not f]
        if names is not None:
            fo_names += [n for n, f in zip(names, is_fo, strict=True) if f]
        if fo_part:
            fo_groups.append({"params": fo_part})
        if zo_part:
            zo_groups.append({**group, "params": zo_part})
    return zo_groups, fo_groups, fo_names


class ZOFOHybrid(ZOOptimizer):
    """ZO on most parameters, first-order AdamW on a small chosen subset (head, LoRA, norms).

    In the spirit of the ZO/FO hybrids of "Revisiting Zeroth-Order Optimization for
    Memory-Efficient LLM Fine-Tuning: A Benchmark" (arXiv 2402.11592) and ZOFO-style fine-tuning:
    a step first runs **one** forward+backward with only the FO subset requiring grad and updates
    it with ``torch.optim.AdamW`` (``fo_lr``), then runs the usual ZO-SGD step (2 forwards, no
    graph) on the rest. Choose the subset with ``fo_params`` (a regex over parameter names; pass
    ``model.named_parameters()`` or groups with ``param_names``) or a group ``{"fo": True}``.
    LR schedulers act on the ZO groups (``param_groups``); the FO rate is ``fo_lr``.

    The first-order pass needs the loss *with* its autograd graph. A plain PyTorch closure returns
    it; Lightning's automatic-optimization closure returns a detached copy, so a wrapper sets
    :attr:`graph_loss_source` to a callable giving the graph-carrying loss of the latest closure
    call (e.g. captured from ``training_step``'s output). Without either, the step is refused with
    a clear error.

    Memory: the FO subset's gradients (during the step) and AdamW's two moments (2× the FO subset),
    plus the activations autograd keeps for the backward through that subset: little for a head at
    the end of the network (only its input), close to first-order training when the subset is
    spread over all layers (LoRA in every block). The ZO part costs nothing extra.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        fo_params: str | None = None,
        fo_lr: float = 1e-3,
        fo_weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if fo_params is not None and not isinstance(fo_params, str):
            raise TypeError(
                f"fo_params={fo_params!r} must be a regex string over parameter names (e.g. 'lm_head')."
            )
        if not isinstance(fo_lr, (int, float)) or fo_lr <= 0:
            raise ValueError(
                f"fo_lr={fo_lr!r} is invalid: the first-order AdamW rate must be > 0 (e.g. 1e-3)."
            )
        zo_groups, fo_groups, fo_names = _split_fo_groups(params, fo_params)
        if not fo_groups:
            raise ValueError(
                f"ZOFOHybrid got no first-order parameters (fo_params={fo_params!r}): give a regex that matches "
                "some parameter names, or a param group with 'fo': True. For pure ZO use 'zo_sgd'."
            )
        if not zo_groups:
            raise ValueError(
                f"fo_params={fo_params!r} matched every parameter, leaving nothing for ZO; use a narrower "
                "regex, or torch.optim.AdamW for pure first-order training."
            )
        super().__init__(zo_groups, lr, eps, weight_decay, **kwargs)
        self.fo_optimizer = torch.optim.AdamW(fo_groups, lr=fo_lr, weight_decay=fo_weight_decay)
        self.fo_names = fo_names
        self.last_fo_loss: float | None = None
        self.graph_loss_source: Callable[[], Tensor | None] | None = None

    def fo_parameters(self) -> list[Tensor]:
        return [p for g in self.fo_optimizer.param_groups for p in g["params"]]

    def _first_order_step(self, closure: Closure) -> None:
        fo = self.fo_parameters()
        fo_ids = {id(p) for p in fo}
        frozen = [
            p for p in (*self._params(), *self.no_grad_params) if p.requires_grad and id(p) not in fo_ids
        ]
        for p in frozen:
            p.requires_grad_(False)
        for p in fo:
            p.requires_grad_(True)
        try:
            self.fo_optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = closure()
                if (not isinstance(loss, Tensor) or not loss.requires_grad) and self.graph_loss_source:
                    loss = self.graph_loss_source()
                if not isinstance(loss, Tensor) or not loss.requires_grad:
                    raise TypeError(
                        "zo_fo_hybrid needs the loss with its autograd graph for the first-order subset, but "
                        "the closure returned a detached loss (Lightning's closure detaches it when backward "
                        "is skipped) and no graph_loss_source gave one. Call opt.step(closure) from plain "
                        "PyTorch, set opt.graph_loss_source, or use a pure ZO rule."
                    )
                self.last_fo_loss = float(loss.detach())
                if math.isfinite(self.last_fo_loss):
                    loss.backward()
            if math.isfinite(self.last_fo_loss):
                self.fo_optimizer.step()
        finally:
            self.fo_optimizer.zero_grad(set_to_none=True)
            for p in frozen:
                p.requires_grad_(True)

    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        if closure is None:
            return super().step(closure)  # raises the base's clear error
        self._first_order_step(closure)
        fo = [p for p in self.fo_parameters() if p.requires_grad]
        for p in fo:
            p.requires_grad_(False)
        try:
            return super().step(closure)
        finally:
            for p in fo:
                p.requires_grad_(True)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["fo_optimizer"] = self.fo_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        fo_state = state_dict.pop("fo_optimizer", None)
        super().load_state_dict(state_dict)
        if fo_state is not None:
            self.fo_optimizer.load_state_dict(fo_state)


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


OPTIMIZERS.update(
    {
        "zo_sgd_momentum": ZOSGDMomentum,
        "zo_sign": ZOSign,
        "zo_adam": ZOAdam,
        "zo_sgd_cons": ZOSGDCons,
        "lozo": LOZO,
        "lozo_m": LOZOM,
        "sparse_zo": SparseZO,
        "zo_fo_hybrid": ZOFOHybrid,
    }
)
