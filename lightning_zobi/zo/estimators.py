"""Two-point (SPSA) estimates of the projected gradient, evaluated in place.

``central_difference`` is MeZO's estimator (Malladi et al., "Fine-Tuning Language Models with Just
Forward Passes", arXiv 2305.17333): ``g = (L(θ+εz) − L(θ−εz)) / 2ε``; ``forward_difference`` uses
``g = (L(θ+εz) − L(θ)) / ε``. With ``q`` queries both average ``q`` independent directions, all
evaluated at the same ``θ``.

How ``θ ± εz`` reaches the forward is a :class:`~lightning_zobi.zo.perturbation.Perturber`'s job:
exactly, materialised per module while θ is never written (the optimizers' default), or in place
(MeZO), which leaves the last perturbation applied and reports it in :attr:`Estimate.pending` so
that the optimizer folds "restore" into its update pass (three passes per central query, not
MeZO's four).

Memory: none beyond one parameter-sized temporary (the regenerated direction of one tensor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_zobi.zo.directions import DirectionKey, Directions
from lightning_zobi.zo.forwards import Closure, _loss_of
from lightning_zobi.zo.perturbation import InPlacePerturbation, Perturber


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


def _floats(losses: Sequence[Tensor | float]) -> list[float]:
    """Python floats of a step's losses, read from the device once, after all its forwards.

    Reading each loss as soon as it is computed would make the host wait for every forward
    before queueing the next perturbation pass; deferred, the pass is queued behind the forward
    and the device never idles between them (one synchronisation per step instead of 2q).
    """
    tensors = [v for v in losses if isinstance(v, Tensor)]
    if not tensors:
        return [float(v) for v in losses]
    values = iter(torch.stack([t.reshape(()).to(torch.float64) for t in tensors]).tolist())
    return [next(values) if isinstance(v, Tensor) else float(v) for v in losses]


def evaluate(closure: Closure) -> float:
    """Run a forward-only closure and return its loss as a Python float, with a clear error if none."""
    return _floats([_loss_of(closure)])[0]


def _perturber(params: Sequence[Tensor], directions: Directions, perturber: Perturber | None) -> Perturber:
    return perturber if perturber is not None else InPlacePerturbation(params, directions)


def central_difference(
    params: Sequence[Tensor],
    closure: Closure,
    directions: Directions,
    keys: Sequence[DirectionKey],
    eps: float,
    *,
    perturber: Perturber | None = None,
) -> Estimate:
    """``g_k = (L(θ+εz_k) − L(θ−εz_k)) / 2ε`` for each key.

    ``perturber`` decides how ``θ ± εz`` reaches the forward (default: in place, which leaves
    ``θ − εz_last`` applied and reports it in :attr:`Estimate.pending`).
    """
    perturber = _perturber(params, directions, perturber)
    raw: list[Tensor | float] = []
    for key in keys:
        raw.append(perturber.loss_at(closure, [(key, eps)]))
        raw.append(perturber.loss_at(closure, [(key, -eps)]))
    losses = _floats(raw)
    pluses, minuses = losses[0::2], losses[1::2]
    grads = [(plus - minus) / (2.0 * eps) for plus, minus in zip(pluses, minuses, strict=True)]
    mids = [0.5 * (plus + minus) for plus, minus in zip(pluses, minuses, strict=True)]
    return Estimate(
        keys=list(keys),
        projected_grads=grads,
        loss=sum(mids) / len(mids),
        pending=perturber.finish(),
        finite=all(math.isfinite(v) for v in losses),
        losses=losses,
    )


def forward_difference(
    params: Sequence[Tensor],
    closure: Closure,
    directions: Directions,
    keys: Sequence[DirectionKey],
    eps: float,
    *,
    perturber: Perturber | None = None,
) -> Estimate:
    """``g_k = (L(θ+εz_k) − L(θ)) / ε``: ``q + 1`` forwards for ``q`` queries."""
    perturber = _perturber(params, directions, perturber)
    raw: list[Tensor | float] = [perturber.loss_at(closure, [])]
    for key in keys:
        raw.append(perturber.loss_at(closure, [(key, eps)]))
    losses = _floats(raw)
    base = losses[0]
    return Estimate(
        keys=list(keys),
        projected_grads=[(plus - base) / eps for plus in losses[1:]],
        loss=base,
        pending=perturber.finish(),
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
