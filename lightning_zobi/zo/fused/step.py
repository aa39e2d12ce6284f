"""The step of the fused rules: one pass restores, decays and updates; in place, it can fold the next ``+εz`` in.

:class:`FusedStep` is mixed in before a rule (:class:`~lightning_zobi.zo.fused.sgd.FusedZOSGD`,
:class:`~lightning_zobi.zo.fused.lozo.FusedLOZO`, QZO's fused optimizer) whose directions have a
fused ``apply_``. Two directions per pass let it fold the restore, the update *and* (under
``perturbation="inplace"``, while a :meth:`~FusedStep.guard` makes it safe) the next step's
``+εz`` into a single pass, so a central-difference step costs 2 forwards + 2 parameter passes
(MeZO's code: 4 passes, each with a ``torch.normal``); under the default exact perturbation it
costs 2 materialisations + 1 update pass (:mod:`~lightning_zobi.zo.fused.just_in_time`). bf16/fp16
results are stochastically rounded in the kernel (:mod:`~lightning_zobi.zo.fused.rounding`), and a
step that changes nothing launches nothing (lr = 0 is bit-identical, ``−0.0`` included).

Memory: none (no direction tensor, no optimizer state); the hooks of :meth:`FusedStep.guard`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_zobi.zo.base import _ROUNDING_SALT
from lightning_zobi.zo.directions import DirectionKey
from lightning_zobi.zo.estimators import Closure, Estimate
from lightning_zobi.zo.fused.just_in_time import FusedJustInTime
from lightning_zobi.zo.fused.tables import Term, derive_seeds
from lightning_zobi.zo.perturbation import JustInTimePerturbation, Perturber


class FusedStep:
    """The step of a fused rule: restore + update in one pass, and the look-ahead fold (a mixin).

    Mixed in before a :class:`~lightning_zobi.zo.optim.ZOOptimizer` rule whose ``directions`` have
    a fused ``apply_(params, terms, beta)`` and a ``preapplied`` slot (:class:`FusedGaussianDirections`,
    :class:`~lightning_zobi.zo.fused.lowrank.FusedLowRankDirections`). A central step with one
    query is::

        (θ + εz_t already applied)  L+ ;  θ −= 2εz_t  L- ;
        θ ← (1 − lr·wd)(θ + εz_t) − lr·s·g·z_t + εz_{t+1}        (one pass: two directions)

    (``s`` = the rule's :meth:`_grad_scale`: 1 for ZO-SGD, ``1/r`` on LOZO's matrices), so the last
    pass also applies the *next* step's perturbation ("lookahead"). Between steps the parameters
    are then left at ``θ_{t+1} + εz_{t+1}``: :attr:`perturbed` says so and :meth:`unperturb` removes
    it (one pass). Validation and checkpoints must never see those weights, so folding only
    happens while it is safe:

    * ``lookahead=None`` (default): fold only while a module is guarded by :meth:`guard`, which
      registers forward pre-hooks on every submodule owning one of the parameters and a
      ``state_dict`` pre-hook on the module: any forward outside :meth:`step` (validation,
      generation) and any ``state_dict()`` (checkpoints, ``save_pretrained``, safetensors export)
      first calls :meth:`unperturb`. The optimizer's own ``state_dict``/``load_state_dict`` also
      unperturb first. Without a guard a step leaves clean weights and costs 3 passes.
    * ``lookahead=True``: always fold (you call :meth:`unperturb` before reading the weights).
    * ``lookahead=False``: never fold (3 passes, clean weights after every step).

    Folding needs central differences; forward differences make 2 passes per step anyway
    (``+εz``, restore+update). Several queries: the update pass takes two directions per pass.
    """

    directions: Any
    eps: float
    seed: int
    difference: str
    perturbation: str
    tensor_owners: dict[int, nn.Module]
    _perturbers: dict[str, Perturber]
    zo_step: int
    param_groups: list[dict[str, Any]]
    _params: Callable[[], list[Tensor]]
    keys_for_step: Callable[[int], list[DirectionKey]]

    def _init_lookahead(self, lookahead: bool | None) -> None:
        if lookahead not in (None, True, False):
            raise ValueError(
                f"lookahead={lookahead!r} is invalid: use None (fold when guarded), True or False."
            )
        self.lookahead = lookahead
        self.pending: tuple[DirectionKey, float] | None = None
        self._guards: list[RemovableHandle] = []
        self._in_step = False

    @property
    def fused_directions(self) -> Any:
        """The fused direction family (``apply_`` and the ``preapplied`` slot)."""
        return self.directions

    @property
    def perturbed(self) -> bool:
        """True while the parameters carry the next step's ``+εz`` (see :meth:`unperturb`)."""
        return self.pending is not None

    def _project_nonnegative(self) -> bool:
        """Whether the update pass projects onto ``θ ≥ 0`` (QZO's scales); folding is off then."""
        return False

    def _grad_scale(self) -> np.ndarray | float:
        """Per-parameter factor of ``g·z`` in the update (1: plain ZO-SGD)."""
        return 1.0

    def _fold_allowed(self) -> bool:
        if self.difference != "central" or self._project_nonnegative() or self.perturbation == "exact":
            return False
        return bool(self._guards) if self.lookahead is None else self.lookahead

    # ------------------------------------------------------------------ guard / unperturb
    def unperturb(self) -> None:
        """Remove a folded look-ahead perturbation (one pass); a no-op when the weights are clean."""
        if self.pending is None:
            return
        key, scale = self.pending
        self.pending = None
        self.fused_directions.preapplied = None
        with torch.no_grad():
            self.fused_directions.apply_(self._params(), [(key, -scale)])

    def _outside_use(self, *_: Any) -> None:
        if not self._in_step:
            self.unperturb()

    def guard(self, module: nn.Module) -> list[RemovableHandle]:
        """Make ``module`` unperturb this optimizer's parameters before any outside forward or state_dict.

        Returns the hook handles (``h.remove()`` undoes it; :meth:`unguard` removes all).
        Enables folding under ``lookahead=None``.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"guard(module=...) needs a torch.nn.Module, got {type(module).__name__}.")
        ids = {id(p) for p in self._params()}
        handles = []
        for sub in module.modules():
            if any(id(p) in ids for p in sub.parameters(recurse=False)):
                handles.append(sub.register_forward_pre_hook(self._outside_use))
        handles.append(module.register_state_dict_pre_hook(self._outside_use))
        self._guards += handles
        return handles

    def unguard(self) -> None:
        """Remove every hook :meth:`guard` installed (and the look-ahead, so weights are clean)."""
        self.unperturb()
        for h in self._guards:
            h.remove()
        self._guards.clear()

    # ------------------------------------------------------------------ the step
    def step(self, closure: Closure | None = None) -> float:
        if self.pending is not None:
            key, scale = self.pending
            expected = self.keys_for_step(self.zo_step)[0]
            if self.difference == "central" and key == expected and scale == self.eps:
                self.fused_directions.preapplied = (key, scale)
            else:  # the step counter, eps or estimator changed since the fold: undo it
                self.unperturb()
            self.pending = None
        self._in_step = True
        try:
            return super().step(closure)  # type: ignore[misc]
        finally:
            self._in_step = False
            if self.fused_directions.preapplied is not None:  # the step raised before using it
                self.pending, self.fused_directions.preapplied = self.fused_directions.preapplied, None

    def _restore(self, estimate: Estimate) -> None:
        if estimate.pending is not None:
            key, scale = estimate.pending
            self.fused_directions.apply_(self._params(), [(key, scale)])

    def _coefficients(self, estimate: Estimate) -> tuple[list[Term], np.ndarray]:
        """Per-parameter ``α`` of every direction of the step and ``β = 1 − lr·wd`` (restore folded in)."""
        sizes = [len(group["params"]) for group in self.param_groups]
        lr = np.repeat(np.asarray([group["lr"] for group in self.param_groups], dtype=np.float64), sizes)
        wd = np.repeat(
            np.asarray([group["weight_decay"] for group in self.param_groups], dtype=np.float64), sizes
        )
        beta = 1.0 - lr * wd
        rate = lr * self._grad_scale() / len(estimate.keys)
        coeff: dict[DirectionKey, np.ndarray] = {}
        if estimate.pending is not None:  # restore first, then decay: β·(θ + scale·z)
            key, scale = estimate.pending
            coeff[key] = beta * scale
        for key, g in zip(estimate.keys, estimate.projected_grads, strict=True):
            coeff[key] = coeff.get(key, np.zeros_like(lr)) - rate * g
        return list(coeff.items()), beta

    def _update(self, estimate: Estimate) -> None:
        """Restore, decay, update (and fold the next ``+εz``) in ``ceil(terms / 2)`` passes.

        bf16/fp16 results are stochastically rounded in the kernel (``stochastic_rounding``, on by
        default), seeded per tensor by ``derive_seed(run seed, step, 0x5352, index)`` as the torch
        path seeds its generator (other uniforms, the same determinism: a resumed run rounds as the
        uninterrupted one). A step that changes nothing (lr = 0, no decay, nothing to restore or
        fold) launches nothing, so every bit of θ stays, ``−0.0`` included.
        """
        terms, beta = self._coefficients(estimate)
        if self._fold_allowed():
            next_key = self.keys_for_step(estimate.keys[0].step + 1)[0]
            terms.append((next_key, self.eps))
            self.pending = (next_key, self.eps)
        if np.all(beta == 1.0) and all(np.all(np.asarray(alpha) == 0.0) for _, alpha in terms):
            return
        options: dict[str, Any] = {"nonnegative": True} if self._project_nonnegative() else {}
        if getattr(self, "stochastic_rounding", False):
            step = estimate.keys[0].step
            options["sr_seeds"] = derive_seeds((self.seed, step, _ROUNDING_SALT), np.arange(len(beta)))
        self.fused_directions.apply_(self._params(), terms, beta=beta, **options)

    def perturber(self) -> Perturber:
        """The base's perturber; under ``perturbation="exact"`` a :class:`FusedJustInTime` (fused materialisation)."""
        perturber = super().perturber()  # type: ignore[misc]
        if type(perturber) is JustInTimePerturbation:
            perturber = FusedJustInTime(perturber.params, self.directions, self.tensor_owners)
            self._perturbers[self.perturbation] = perturber
        return perturber

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        self.unperturb()
        return super().state_dict()  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unperturb()
        super().load_state_dict(state_dict)  # type: ignore[misc]


__all__ = ["FusedStep"]
