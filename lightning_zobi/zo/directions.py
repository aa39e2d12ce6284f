"""Seeded perturbation directions, regenerated on demand and applied in place.

A ZO step never stores its direction ``z``: every tensor of it is regenerated from
``(run seed, step, query, parameter index)``. That is what keeps a ZO step at inference memory,
makes runs bit-reproducible and resumable, and lets data-parallel ranks agree on a direction
without communicating (see ``DESIGN.md``, "Seeds, not tensors").

This module holds the seed derivation (:func:`derive_seed`), the :class:`Directions` interface
and the dense Gaussian family used by MeZO (:class:`GaussianDirections`). Estimators and rules
only talk to a :class:`Directions`, so low-rank (LOZO) or sparse directions slot in unchanged.

Memory: one parameter-sized temporary at a time (the regenerated ``z`` of one tensor).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def _splitmix64(x: int) -> int:
    """One round of SplitMix64: a cheap bijective 64-bit mixer with good avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """Hash integers into a 63-bit seed for ``torch.Generator.manual_seed``.

    Deterministic across processes, platforms and Python versions (unlike ``hash``); distinct
    tuples give independent-looking seeds, so ``derive_seed(run, step, query, index)`` names one
    direction tensor for good.
    """
    h = 0x6A09E667F3BCC908
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h & _MASK63


@dataclass(frozen=True)
class DirectionKey:
    """Names one perturbation direction over all parameters: (run seed, step, query)."""

    run_seed: int
    step: int
    query: int

    def seed_for(self, index: int, *salt: int) -> int:
        """Seed of the direction tensor of parameter ``index`` (``salt`` separates sub-streams)."""
        return derive_seed(self.run_seed, self.step, self.query, index, *salt)


class _GeneratorPool:
    """One reusable ``torch.Generator`` per device, reseeded for every tensor."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, torch.Generator] = {}

    def get(self, device: torch.device, seed: int) -> torch.Generator:
        gen = self._by_device.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._by_device[device] = gen
        gen.manual_seed(seed)
        return gen


def seeded_randn(shape: torch.Size | tuple[int, ...], seed: int, like: Tensor, pool: _GeneratorPool) -> Tensor:
    """A standard normal tensor shaped ``shape`` on ``like``'s device and dtype, from ``seed``."""
    gen = pool.get(like.device, seed)
    return torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)


class Directions(ABC):
    """A family of seeded directions: ``sample(param, index, key)`` regenerates one tensor of ``z``.

    Subclasses must return the same tensor for the same ``(index, key)`` every time they are
    asked, whatever happened in between; that is the whole contract the ZO engine relies on.
    """

    def __init__(self) -> None:
        self._pool = _GeneratorPool()

    @abstractmethod
    def sample(self, param: Tensor, index: int, key: DirectionKey) -> Tensor:
        """The direction tensor of parameter number ``index`` (shaped like ``param``) under ``key``."""

    def state_dict(self) -> dict:
        """Extra state a stateful family needs on resume (none for seed-only families)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def perturb_(self, params: Iterable[Tensor], key: DirectionKey, scale: float) -> None:
        """``θ += scale · z`` for every parameter, one regenerated tensor at a time (one pass)."""
        with torch.no_grad():
            for index, param in enumerate(params):
                param.add_(self.sample(param, index, key), alpha=scale)


class GaussianDirections(Directions):
    """Dense i.i.d. standard normal directions, as in MeZO (arXiv 2305.17333).

    Generated in the parameter's dtype and device with a generator reseeded per tensor from
    ``key.seed_for(index)``. Extra memory: none beyond one parameter-sized temporary.
    """

    def sample(self, param: Tensor, index: int, key: DirectionKey) -> Tensor:
        return seeded_randn(param.shape, key.seed_for(index), param, self._pool)
