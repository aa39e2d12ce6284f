"""Two-point (SPSA) estimates of the projected gradient, evaluated in place.

``central_difference`` is MeZO's estimator (Malladi et al., "Fine-Tuning Language Models with Just
Forward Passes", arXiv 2305.17333): ``g = (L(θ+εz) − L(θ−εz)) / 2ε``; ``forward_difference`` uses
``g = (L(θ+εz) − L(θ)) / ε``. With ``q`` queries both average ``q`` independent directions, all
evaluated at the same ``θ``.

Both leave the last perturbation applied and report it in :attr:`Estimate.pending`, so that the
optimizer folds "restore" into its update pass: a central step over one query makes three passes
over the parameters (+εz, −2εz, restore+update), not MeZO's four.

Memory: none beyond one parameter-sized temporary (the regenerated direction of one tensor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_zobi.zo.directions import DirectionKey, Directions

Closure = Callable[[], "Tensor | float | None"]


@dataclass
class Estimate:
    """What one ZO estimate produced.

    Attributes:
        keys: the direction of each query.
        projected_grads: ``g_k``, one float per query (the only numbers DDP ranks exchange).
        loss: the loss at ``θ`` as best known (mean of ``L±`` for central, ``L(θ)`` for forward).
        pending: ``(key, scale)`` of a perturbation still applied to the parameters: the
            update pass must add ``scale · z(key)`` to restore ``θ``.
        finite: False when any evaluated loss was NaN/inf (the step must then only restore).
    """

    keys: list[DirectionKey]
    projected_grads: list[float]
    loss: float
    pending: tuple[DirectionKey, float] | None = None
    finite: bool = True
    losses: list[float] = field(default_factory=list)


def evaluate(closure: Closure) -> float:
    """Run a forward-only closure and return its loss as a Python float, with a clear error if none."""
    loss = closure()
    if loss is None:
        raise ValueError(
            "The closure returned no loss (None). A ZO step needs a scalar loss: make training_step/closure "
            "return the loss tensor (or a dict with a 'loss' key)."
        )
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"The closure returned a tensor of shape {tuple(loss.shape)}; a ZO step needs a scalar loss. "
                "Reduce it (e.g. loss.mean()) before returning."
            )
        return float(loss.detach())
    if isinstance(loss, (int, float)):
        return float(loss)
    raise TypeError(
        f"The closure returned {type(loss).__name__}; a ZO step needs a scalar loss (Tensor or float)."
    )


def central_difference(
    params: Sequence[Tensor],
    closure: Closure,
    directions: Directions,
    keys: Sequence[DirectionKey],
    eps: float,
) -> Estimate:
    """``g_k = (L(θ+εz_k) − L(θ−εz_k)) / 2ε`` for each key; leaves ``θ − εz_last`` applied."""
    grads, losses, mids = [], [], []
    for k, key in enumerate(keys):
        directions.perturb_(params, key, eps)
        plus = evaluate(closure)
        directions.perturb_(params, key, -2.0 * eps)
        minus = evaluate(closure)
        if k < len(keys) - 1:
            directions.perturb_(params, key, eps)
        grads.append((plus - minus) / (2.0 * eps))
        losses += [plus, minus]
        mids.append(0.5 * (plus + minus))
    return Estimate(
        keys=list(keys),
        projected_grads=grads,
        loss=sum(mids) / len(mids),
        pending=(keys[-1], eps),
        finite=all(math.isfinite(v) for v in losses),
        losses=losses,
    )


def forward_difference(
    params: Sequence[Tensor],
    closure: Closure,
    directions: Directions,
    keys: Sequence[DirectionKey],
    eps: float,
) -> Estimate:
    """``g_k = (L(θ+εz_k) − L(θ)) / ε``: ``q + 1`` forwards for ``q`` queries; leaves ``θ + εz_last``."""
    base = evaluate(closure)
    grads, losses = [], [base]
    for k, key in enumerate(keys):
        directions.perturb_(params, key, eps)
        plus = evaluate(closure)
        if k < len(keys) - 1:
            directions.perturb_(params, key, -eps)
        grads.append((plus - base) / eps)
        losses.append(plus)
    return Estimate(
        keys=list(keys),
        projected_grads=grads,
        loss=base,
        pending=(keys[-1], -eps),
        finite=all(math.isfinite(v) for v in losses),
        losses=losses,
    )


ESTIMATORS: dict[str, Callable[..., Estimate]] = {
    "central": central_difference,
    "forward": forward_difference,
}


def reduce_mean(values: list[float], reducer: Callable[[Tensor], Tensor] | None) -> list[float]:
    """Average a few floats across processes with ``reducer`` (an all-reduce mean); identity if None."""
    if reducer is None:
        return values
    out = reducer(torch.tensor(values, dtype=torch.float64))
    return [float(v) for v in out]
