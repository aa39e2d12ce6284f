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

import math
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


def seeded_randn(
    shape: torch.Size | tuple[int, ...], seed: int, like: Tensor, pool: _GeneratorPool
) -> Tensor:
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

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - an optional hook: seed-only families keep nothing
        """Restore what :meth:`state_dict` returned."""

    def accumulate_(self, out: Tensor, param: Tensor, index: int, key: DirectionKey, scale: float) -> None:
        """``out += scale · z`` with ``z`` the direction of ``param`` (sampled in ``param``'s dtype).

        ``out`` may be ``param`` itself or a working copy in another dtype (fp32 for a bf16
        parameter): the direction is always the one ``param`` gets, cast to ``out``'s dtype.
        """
        z = self.sample(param, index, key)
        out.add_(z if z.dtype == out.dtype else z.to(out.dtype), alpha=scale)

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


class LowRankDirections(Directions):
    """LOZO's low-rank directions: ``Z = U Vᵀ`` for every 2-D weight, Gaussian elsewhere.

    From "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank Structures"
    (Chen et al., ICLR 2025, arXiv 2410.07698). For an ``m×n`` weight, ``U`` (``m×r``) is drawn
    afresh for every step and query, while ``V`` (``n×r``) is drawn once per *lazy period* of
    ``nu`` steps (``period = step // nu``) and shared by all queries of the period, so successive
    updates stay inside one ``r``-dimensional row space until it is refreshed. Both factors are
    regenerated from seeds (``U`` from ``(run, step, query, index)``, ``V`` from
    ``(run, period, index)``) and never stored.

    :meth:`perturb_` adds ``scale · U Vᵀ`` with one ``addmm_``, so the dense ``m×n`` direction is
    never materialised on that path. Non-matrix parameters (biases, norms, 3-D+ tensors) get the
    dense Gaussian direction of :class:`GaussianDirections`.

    Memory: the two factors of one weight at a time, ``(m + n)·r`` elements; nothing kept.
    """

    def __init__(self, rank: int = 2, nu: int = 50) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(
                f"rank={rank!r} is invalid: the LOZO rank must be an integer >= 1 (the paper uses 1..8)."
            )
        if not isinstance(nu, int) or nu < 1:
            raise ValueError(
                f"nu={nu!r} is invalid: the lazy period must be an integer >= 1 steps (the paper uses 50)."
            )
        self.rank = rank
        self.nu = nu

    @staticmethod
    def is_matrix(param: Tensor) -> bool:
        """True for the 2-D weights that get low-rank directions."""
        return param.dim() == 2

    def period(self, step: int) -> int:
        """The lazy-sampling period that ``step`` belongs to (``V`` is constant within it)."""
        return step // self.nu

    def u_factor(self, param: Tensor, index: int, key: DirectionKey) -> Tensor:
        """``U`` (``m×r``) of parameter ``index`` for the step and query of ``key``."""
        return seeded_randn((param.shape[0], self.rank), key.seed_for(index, 0x55), param, self._pool)

    def v_factor(self, param: Tensor, index: int, run_seed: int, period: int) -> Tensor:
        """``V`` (``n×r``) of parameter ``index`` for lazy period ``period`` (shared by its queries)."""
        seed = derive_seed(run_seed, period, index, 0x56)
        return seeded_randn((param.shape[1], self.rank), seed, param, self._pool)

    def factors(self, param: Tensor, index: int, key: DirectionKey) -> tuple[Tensor, Tensor]:
        """``(U, V)`` with ``Z = U Vᵀ`` for a 2-D parameter under ``key``."""
        v = self.v_factor(param, index, key.run_seed, self.period(key.step))
        return self.u_factor(param, index, key), v

    def grad_scale(self, param: Tensor) -> float:
        """Factor making ``g·Z`` unbiased: ``E[Z⟨G, Z⟩] = r·G`` for ``Z = U Vᵀ``, so ``1/r`` on matrices."""
        return 1.0 / self.rank if self.is_matrix(param) else 1.0

    def sample(self, param: Tensor, index: int, key: DirectionKey) -> Tensor:
        if not self.is_matrix(param):
            return seeded_randn(param.shape, key.seed_for(index), param, self._pool)
        u, v = self.factors(param, index, key)
        return u @ v.T

    def add_direction_(self, param: Tensor, index: int, key: DirectionKey, scale: float) -> None:
        """``param += scale · Z`` in place, through ``addmm_`` for matrices (no dense ``Z``)."""
        self.accumulate_(param, param, index, key, scale)

    def accumulate_(self, out: Tensor, param: Tensor, index: int, key: DirectionKey, scale: float) -> None:
        """``out += scale · Z(param)``; ``addmm_`` for matrices, so the dense ``Z`` is never formed."""
        if self.is_matrix(param):
            u, v = self.factors(param, index, key)
            if u.dtype != out.dtype:
                u, v = u.to(out.dtype), v.to(out.dtype)
            out.addmm_(u, v.T, alpha=scale)
        else:
            super().accumulate_(out, param, index, key, scale)

    def perturb_(self, params: Iterable[Tensor], key: DirectionKey, scale: float) -> None:
        with torch.no_grad():
            for index, param in enumerate(params):
                self.add_direction_(param, index, key, scale)


def _pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor packed 8 entries per byte (uint8), flattened and zero-padded."""
    flat = mask.flatten()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return (flat.view(-1, 8).to(torch.uint8) << shifts).sum(dim=1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_pack_bits`: the boolean tensor of ``shape``."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    numel = math.prod(shape)
    return bits.flatten()[:numel].view(shape).bool()


class SparseDirections(Directions):
    """Gaussian directions restricted to a sparse mask of each parameter tensor.

    ``mask="magnitude"`` follows Sparse-MeZO ("Sparse MeZO: Less Parameters for Better Performance
    in Zeroth-Order LLM Fine-Tuning", Liu et al., arXiv 2402.15751): only the ``density`` fraction
    of smallest-magnitude entries of each tensor is perturbed and updated; the per-tensor
    threshold is recomputed from the clean weights at every step (:meth:`begin_step`), so the mask
    follows training and is never kept between steps. Inside a step the parameters are perturbed,
    so the mask cannot be recomputed from them; it is held bit-packed (1 bit per entry, 1/32 of
    fp32 weights) from :meth:`begin_step` to :meth:`end_step` and then freed.

    ``mask="random"`` draws a fresh Bernoulli(``density``) mask per step, query and tensor from the
    direction's seed (as in layer/coordinate-sparse ZO such as LeZO, arXiv 2410.09823): no mask is
    ever stored, at any time.

    Memory: "random": none beyond one parameter-sized temporary; "magnitude": ``numel/8`` bytes
    during a step (none between steps) plus a ``|θ|`` temporary of one tensor for the threshold.
    """

    MODES = ("magnitude", "random")

    def __init__(self, density: float = 0.25, mask: str = "magnitude") -> None:
        super().__init__()
        if not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(
                f"density={density!r} is invalid: the perturbed fraction must be in (0, 1] (Sparse-MeZO uses 0.2..0.25)."
            )
        if mask not in self.MODES:
            raise ValueError(f"mask={mask!r} is invalid: choose one of {list(self.MODES)}.")
        self.density = float(density)
        self.mask_mode = mask
        self._packed: dict[int, tuple[Tensor, torch.Size]] = {}
        self._step: int | None = None

    def magnitude_mask(self, param: Tensor) -> Tensor:
        """Boolean mask of the ``density`` fraction of smallest-|θ| entries of ``param`` (ties included)."""
        flat = param.detach().abs().flatten()
        k = max(1, round(self.density * flat.numel()))
        if k >= flat.numel():
            return torch.ones_like(param, dtype=torch.bool)
        threshold = flat.float().kthvalue(k).values
        return param.detach().abs() <= threshold.to(param.dtype)

    def begin_step(self, params: Iterable[Tensor], step: int) -> None:
        """Compute this step's magnitude masks from the clean parameters (no-op for ``"random"``)."""
        self._packed.clear()
        self._step = step
        if self.mask_mode != "magnitude" or self.density >= 1.0:
            return
        for index, param in enumerate(params):
            self._packed[index] = (_pack_bits(self.magnitude_mask(param)), param.shape)

    def end_step(self) -> None:
        """Free the step's packed masks."""
        self._packed.clear()
        self._step = None

    def mask_for(self, param: Tensor, index: int, key: DirectionKey) -> Tensor | None:
        """The boolean mask of parameter ``index`` under ``key``; ``None`` means dense."""
        if self.density >= 1.0:
            return None
        if self.mask_mode == "random":
            gen = self._pool.get(param.device, key.seed_for(index, 0x4D))
            return torch.rand(param.shape, generator=gen, device=param.device) < self.density
        if self._step != key.step or index not in self._packed:
            raise RuntimeError(
                f"SparseDirections(mask='magnitude') has no mask for step {key.step}, parameter {index}: call "
                "begin_step(params, step) on the clean parameters before the step (the 'sparse_zo' rule does)."
            )
        packed, shape = self._packed[index]
        return _unpack_bits(packed, shape)

    def sample(self, param: Tensor, index: int, key: DirectionKey) -> Tensor:
        z = seeded_randn(param.shape, key.seed_for(index), param, self._pool)
        mask = self.mask_for(param, index, key)
        return z if mask is None else z.mul_(mask)
