"""Forward-only diagnostics of the loss landscape: a Hutchinson estimate of the Hessian trace.

"Zeroth-Order Optimization Finds Flat Minima" (Zhang, Li, Thekumparampil, Oh, Muehlebach, He;
NeurIPS 2025, arXiv 2506.05454) shows that ZO-SGD with the two-point estimator implicitly minimises
``L(θ) + (ε²/2)·tr(∇²L(θ))``: among the minimisers it drifts towards the one with the smallest
Hessian trace. :func:`hessian_trace` measures that trace from forward passes only, with the
engine's own machinery: for seeded Gaussian directions ``z_k``

    ``v_k = (L(θ + εz_k) + L(θ − εz_k) − 2 L(θ)) / ε²  =  z_kᵀ ∇²L(θ) z_k + O(ε²)``

and ``E[zᵀHz] = tr(H)`` for ``z ~ N(0, I)`` (Hutchinson), so the mean of ``v_k`` estimates ``tr(H)``
and ``std(v)/√K`` is its sampling error (``Var(zᵀHz) = 2·tr(H²)`` for a Gaussian ``z``). On a
quadratic the second difference is exact (no ``O(ε²)`` term); elsewhere keep ``ε`` small but large
enough that ``ε²·tr(H)`` stays well above the loss's rounding (fp32: ``ε ≈ 1e-2..1e-3``).

θ is never written: ``θ ± εz`` reaches the forward through the optimizer's perturber
(:meth:`~lightning_zobi.zo.optim.ZOOptimizer.perturber`; exact mode materialises it per module), and
the forwards share one random state (dropout masks, noise) as a ZO step's do. The directions are
the optimizer's seeded ones, keyed apart from every training direction (a salted run seed), so a
diagnostic neither reuses nor disturbs the directions of a step.

Cost: ``2K + 1`` forwards for ``K`` probes. Memory: as one ZO step (no gradient, no direction kept).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_zobi.zo.directions import DirectionKey, Directions, GaussianDirections, derive_seed
from lightning_zobi.zo.estimators import _floats
from lightning_zobi.zo.forwards import StepForwards
from lightning_zobi.zo.perturbers import make_perturber

_TRACE_SALT = 0x4854  # "HT": separates diagnostic directions from a step's


@dataclass
class HessianTrace:
    """A Hutchinson estimate of ``tr(∇²L(θ))``.

    Attributes:
        value: the mean of the per-probe second differences ``v_k``.
        stderr: its sampling error ``std(v)/√K`` (``nan`` with one probe).
        samples: the ``v_k``.
        loss: ``L(θ)``.
        eps: the probe scale ε.
    """

    value: float
    stderr: float
    samples: list[float] = field(default_factory=list)
    loss: float = math.nan
    eps: float = math.nan


def hessian_trace(
    closure: Callable[[], Any],
    optimizer: Any | None = None,
    *,
    params: Sequence[Tensor] | None = None,
    module: nn.Module | None = None,
    probes: int = 8,
    eps: float = 1e-2,
    seed: int | None = None,
    step: int | None = None,
    rng: str = "shared",
) -> HessianTrace:
    """Hutchinson estimate of ``tr(∇²L(θ))`` over the optimizer's parameters from ``2·probes + 1`` forwards.

    Args:
        closure: runs a forward and returns the scalar loss (as for ``opt.step(closure)``).
        optimizer: a :class:`~lightning_zobi.zo.optim.ZOOptimizer`; its perturber applies ``θ ± εz``
            (exactly, unless it was built with ``perturbation="inplace"``), its run seed and step
            counter name the directions. Without it, pass ``params`` (and optionally ``module``).
        params: the parameters whose Hessian block is traced (when no optimizer is given).
        module: the model (only used to build an exact perturber without an optimizer).
        probes: ``K`` Gaussian directions (the error falls as ``1/√K``).
        eps: probe scale ε (the second difference has an ``O(ε²)`` bias off a quadratic).
        seed, step: name the directions; default the optimizer's run seed and ZO step (or 0, 0).
        rng: ``"shared"`` (every forward replays the same random state) or ``"independent"``.

    The directions are always dense Gaussian (Hutchinson needs ``E[zzᵀ] = I``), whatever family the
    optimizer trains with.
    """
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes={probes!r} is invalid: use an integer >= 1 (Gaussian directions averaged).")
    if not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps={eps!r} is invalid: the probe scale must be a finite float > 0 (e.g. 1e-2).")
    directions: Directions = GaussianDirections()
    no_grad: list[Tensor]
    if optimizer is not None:
        perturber = optimizer.perturber()
        saved_directions = perturber.directions
        perturber.directions = directions
        run_seed = optimizer.seed if seed is None else int(seed)
        step = optimizer.zo_step if step is None else int(step)
        forwards = StepForwards(
            closure, rng=rng, forward_mode=optimizer.forward_mode, module=optimizer.module
        )
        no_grad = [*optimizer._params(), *optimizer.no_grad_params]
    else:
        if params is None:
            raise ValueError(
                "hessian_trace needs an optimizer (its perturber and seed) or params=[...] to trace."
            )
        params = list(params)
        if not params:
            raise ValueError(
                "hessian_trace got an empty params list: pass the tensors whose Hessian trace to estimate."
            )
        perturber = make_perturber("exact", params, directions, None, module)
        saved_directions = directions
        run_seed = 0 if seed is None else int(seed)
        step = 0 if step is None else int(step)
        forwards = StepForwards(closure, rng=rng)
        no_grad = list(params)
    key_seed = derive_seed(run_seed, _TRACE_SALT)
    keys = [DirectionKey(key_seed, step, k) for k in range(probes)]
    flipped = [p for p in no_grad if p.requires_grad]
    for p in flipped:
        p.requires_grad_(False)
    raw: list[Any] = []
    try:
        with torch.no_grad():
            raw.append(perturber.loss_at(forwards, []))
            for key in keys:
                raw.append(perturber.loss_at(forwards, [(key, eps)]))
                raw.append(perturber.loss_at(forwards, [(key, -eps)]))
            pending = perturber.finish()
            if pending is not None:  # in-place perturber: put θ back
                pkey, scale = pending
                directions.perturb_(perturber.params, pkey, scale)
    finally:
        perturber.directions = saved_directions
        forwards.finish()
        for p in flipped:
            p.requires_grad_(True)
    losses = _floats(raw)
    base = losses[0]
    samples = [(losses[1 + 2 * k] + losses[2 + 2 * k] - 2.0 * base) / (eps * eps) for k in range(probes)]
    mean = sum(samples) / probes
    if probes > 1:
        var = sum((s - mean) ** 2 for s in samples) / (probes - 1)
        stderr = math.sqrt(var / probes)
    else:
        stderr = math.nan
    return HessianTrace(value=mean, stderr=stderr, samples=samples, loss=base, eps=float(eps))
