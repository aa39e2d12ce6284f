"""DeepZero's coordinate-wise gradient estimation (CGE) with a ZO-found sparsity prior: the ``zo_cge`` rule.

From "DeepZero: Scaling up Zeroth-Order Optimization for Deep Model Training" (Chen, Zhang, Jia, Zhang,
Wu, Liu, Liu; ICLR 2024, arXiv 2310.02025). Instead of random directions (RGE, MeZO's ZO-SGD), CGE
perturbs one coordinate at a time and reads its partial derivative off a finite difference,

    ``ĝ_i = (L(θ + μ e_i) − L(θ)) / μ``        (``difference="forward"``: ``c + 1`` forwards for ``c`` coordinates)
    ``ĝ_i = (L(θ + μ e_i) − L(θ − μ e_i)) / 2μ`` (``difference="central"``: ``2c`` forwards),

which has no dimension-dependent variance: it is the finite-difference gradient on those
coordinates. DeepZero makes this affordable for training from scratch with a *sparsity prior*: a
pruning mask found by ZO-GraSP (GraSP's score ``−θ ⊙ Hg`` with both ``g`` and the Hessian-gradient
product estimated by RGE from forward passes) fixes per-layer densities, and CGE only estimates
coordinates of the sparse model; the within-layer masks are redrawn at random with those densities
(DeepZero's dynamic sparsity). Here each step estimates a seeded subset of ``coordinates`` of the
allowed coordinates and updates only those (``θ_i ← θ_i − lr·ĝ_i``): DeepZero estimates all of the
allowed ones each step, which is ``coordinates = density·d``.

What is implemented, honestly:

* ``mask="zo_grasp"``: ZO-GraSP at the first step (``4·grasp_queries`` forwards, in place on θ with
  a bit-exact restore): global pruning of the ``1 − density`` fraction with the largest score, whose
  per-layer kept fractions become the layer densities; the within-layer mask is then a seeded random
  one, redrawn every ``mask_every`` steps (DeepZero's recipe). Feature reuse and forward
  parallelisation (DeepZero's system tricks) are not implemented: every coordinate costs whole forwards.
* ``mask="magnitude"``: the largest-``|θ|`` ``density`` fraction of each tensor, recomputed from the
  clean weights at every step (a cheap prior, no extra forwards).
* ``mask="none"``: every coordinate may be drawn.

The directions are seeded one-hot vectors (:class:`CoordinateDirections`): the step's subset is
regenerated from ``(run seed, step)`` (and the mask from ``(run seed, period)`` or the clean θ), so
DDP ranks agree without communicating and a resumed run continues exactly (the ZO-GraSP layer
densities are saved in the optimizer state).

``zo/backends.py`` registers it as ``"zo_cge"`` in :data:`lightning_zobi.zo.optim.OPTIMIZERS`
(the registry imports this module; this module imports only the base, so there is no import circle).

Memory: one int64 index per allowed coordinate (the mask, rebuilt per period or per step) and one
per chosen coordinate; ZO-GraSP at its one step: a copy of θ and two parameter-sized buffers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_zobi.zo.base import ZOOptimizer, _no_graph
from lightning_zobi.zo.directions import DirectionKey, Directions, derive_seed, seeded_randn
from lightning_zobi.zo.estimators import Closure, _floats, _loss_of

_SUBSET_SALT = 0x4347  # "CG": the step's coordinate subset
_MASK_SALT = 0x4D4B  # "MK": the within-layer random mask of a period
_GRASP_SALT = 0x4753  # "GS": ZO-GraSP's RGE directions

MASKS = ("zo_grasp", "magnitude", "none")


class CoordinateDirections(Directions):
    """Seeded one-hot directions ``e_i``: query ``k`` of a step is the ``k``-th coordinate of its subset.

    The subset of a step is drawn without replacement from the *allowed* coordinates (the mask) by
    :meth:`begin_step` and held until :meth:`end_step`; every ``sample``/``accumulate_`` of the step
    regenerates nothing else. ``accumulate_`` touches one entry of one tensor (no dense direction).

    Args:
        coordinates: coordinates per step (the step's queries).
        density: fraction of each tensor that may be drawn (``layer_density`` overrides it per tensor).
        mask: ``"random"`` (seeded within-layer mask, redrawn every ``mask_every`` steps),
            ``"magnitude"`` (largest ``|θ|``, recomputed at each step) or ``"none"``.
        mask_every: steps per random-mask period.
    """

    def __init__(
        self, coordinates: int = 64, density: float = 1.0, mask: str = "none", mask_every: int = 100
    ) -> None:
        super().__init__()
        if not isinstance(coordinates, int) or coordinates < 1:
            raise ValueError(
                f"coordinates={coordinates!r} is invalid: use an integer >= 1 (partial derivatives estimated per step)."
            )
        if not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"density={density!r} is invalid: the allowed fraction must be in (0, 1].")
        if mask not in ("random", "magnitude", "none"):
            raise ValueError(f"mask={mask!r} is invalid: choose 'random', 'magnitude' or 'none'.")
        if not isinstance(mask_every, int) or mask_every < 1:
            raise ValueError(
                f"mask_every={mask_every!r} is invalid: use an integer >= 1 (steps per mask period)."
            )
        self.coordinates = coordinates
        self.density = float(density)
        self.mask_mode = mask
        self.mask_every = mask_every
        self.layer_density: list[float] | None = None
        self._step: int | None = None
        self._chosen: list[tuple[int, int]] = []  # (parameter index, flat position) per query
        self._allowed_cache: tuple[Any, Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ the mask and the subset
    def _density_of(self, index: int) -> float:
        return self.layer_density[index] if self.layer_density is not None else self.density

    def allowed(self, params: Sequence[Tensor], run_seed: int, step: int) -> tuple[Tensor, Tensor]:
        """``(parameter index, flat position)`` of every coordinate the mask allows at ``step`` (two int64 tensors)."""
        period = step // self.mask_every
        cache_key = (run_seed, period, len(params)) if self.mask_mode != "magnitude" else None
        if cache_key is not None and self._allowed_cache is not None and self._allowed_cache[0] == cache_key:
            return self._allowed_cache[1], self._allowed_cache[2]
        which, where = [], []
        for index, p in enumerate(params):
            n = p.numel()
            density = self._density_of(index)
            k = n if density >= 1.0 or self.mask_mode == "none" else max(1, round(density * n))
            if k >= n:
                pos = torch.arange(n)
            elif self.mask_mode == "magnitude":
                pos = p.detach().abs().flatten().float().topk(k).indices.cpu()
            else:
                gen = self._pool.get(torch.device("cpu"), derive_seed(run_seed, period, index, _MASK_SALT))
                pos = torch.randperm(n, generator=gen)[:k]
            which.append(torch.full((pos.numel(),), index, dtype=torch.long))
            where.append(pos.long())
        out = torch.cat(which), torch.cat(where)
        if cache_key is not None:
            self._allowed_cache = (cache_key, *out)
        return out

    def begin_step(self, params: Sequence[Tensor], run_seed: int, step: int) -> None:
        """Draw the step's coordinate subset (from the clean θ for ``"magnitude"``)."""
        which, where = self.allowed(params, run_seed, step)
        c = min(self.coordinates, which.numel())
        gen = self._pool.get(torch.device("cpu"), derive_seed(run_seed, step, _SUBSET_SALT))
        pick = torch.randperm(which.numel(), generator=gen)[:c]
        self._chosen = list(zip(which[pick].tolist(), where[pick].tolist(), strict=True))
        self._step = step

    def end_step(self) -> None:
        self._chosen = []
        self._step = None

    @property
    def chosen(self) -> list[tuple[int, int]]:
        """The step's coordinates as ``(parameter index, flat position)``, query order."""
        return list(self._chosen)

    def coordinate(self, key: DirectionKey) -> tuple[int, int]:
        if self._step != key.step or not 0 <= key.query < len(self._chosen):
            raise RuntimeError(
                f"CoordinateDirections has no coordinate for step {key.step}, query {key.query}: call "
                "begin_step(params, run_seed, step) before the step (the 'zo_cge' rule does)."
            )
        return self._chosen[key.query]

    # ------------------------------------------------------------------ the Directions interface
    def sample(self, param: Tensor, index: int, key: DirectionKey) -> Tensor:
        z = torch.zeros_like(param)
        host, pos = self.coordinate(key)
        if host == index:
            z.view(-1)[pos] = 1.0
        return z

    def accumulate_(self, out: Tensor, param: Tensor, index: int, key: DirectionKey, scale: float) -> None:
        host, pos = self.coordinate(key)
        if host == index and scale:
            flat = out.view(-1) if out.is_contiguous() else None
            if flat is not None:
                flat[pos] += scale
            else:
                out[torch.unravel_index(torch.tensor(pos), out.shape)] += scale

    def perturb_(self, params: Iterable[Tensor], key: DirectionKey, scale: float) -> None:
        with torch.no_grad():
            for index, param in enumerate(params):
                self.accumulate_(param, param, index, key, scale)

    def state_dict(self) -> dict:
        return {"layer_density": None if self.layer_density is None else list(self.layer_density)}

    def load_state_dict(self, state: dict) -> None:
        density = state.get("layer_density")
        self.layer_density = None if density is None else [float(d) for d in density]
        self._allowed_cache = None


def zo_grasp_scores(
    params: Sequence[Tensor],
    closure: Closure,
    *,
    queries: int = 64,
    mu: float = 5e-3,
    delta: float = 1e-2,
    seed: int = 0,
) -> list[Tensor]:
    """ZO-GraSP scores ``−θ ⊙ Ĥĝ`` from ``4·queries`` forwards (DeepZero, arXiv 2310.02025, Sec. 4).

    ``ĝ = mean_k g_k u_k`` is the RGE gradient (central differences along seeded Gaussian ``u_k``);
    ``Ĥĝ = mean_k (g_k(θ + δĝ) − g_k(θ)) / δ · u_k`` reuses the same ``u_k`` at ``θ + δĝ`` (common
    random numbers, so the difference is not drowned in sampling noise). GraSP removes the weights
    with the *largest* score. θ is written in place for these forwards and restored bit-exactly
    from a copy. Memory: a copy of θ plus ``ĝ`` and ``Ĥĝ`` (three parameter-sized buffers).
    """
    directions = _GraspDirections()
    saved = [p.detach().clone() for p in params]

    def set_to(offsets: list[tuple[list[Tensor] | None, int | None, float]]) -> None:
        for i, p in enumerate(params):
            p.copy_(saved[i])
            for buffers, k, scale in offsets:
                if buffers is not None:
                    p.add_(buffers[i].to(p.dtype), alpha=scale)
                else:
                    p.add_(directions.u(p, i, seed, k), alpha=scale)

    def rge(base: list[tuple[list[Tensor] | None, int | None, float]]) -> list[float]:
        raw = []
        for k in range(queries):
            set_to([*base, (None, k, mu)])
            raw.append(_loss_of(closure))
            set_to([*base, (None, k, -mu)])
            raw.append(_loss_of(closure))
        losses = _floats(raw)
        return [(losses[2 * k] - losses[2 * k + 1]) / (2 * mu) for k in range(queries)]

    try:
        with torch.no_grad():
            g0 = rge([])
            g_hat = [torch.zeros_like(p, dtype=torch.float32) for p in params]
            for i, p in enumerate(params):
                for k in range(queries):
                    g_hat[i].add_(directions.u(p, i, seed, k).float(), alpha=g0[k] / queries)
            g1 = rge([(g_hat, None, delta)])
            hg = [torch.zeros_like(p, dtype=torch.float32) for p in params]
            for i, p in enumerate(params):
                for k in range(queries):
                    hg[i].add_(directions.u(p, i, seed, k).float(), alpha=(g1[k] - g0[k]) / (delta * queries))
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    return [-(s.float() * h) for s, h in zip(saved, hg, strict=True)]


class _GraspDirections(Directions):
    """ZO-GraSP's RGE directions, seeded apart from every training direction."""

    def u(self, param: Tensor, index: int, seed: int, k: int) -> Tensor:
        return seeded_randn(param.shape, derive_seed(seed, _GRASP_SALT, k, index), param, self._pool)

    def sample(self, param: Tensor, index: int, key: DirectionKey) -> Tensor:
        return self.u(param, index, key.run_seed, key.query)


def grasp_layer_density(scores: Sequence[Tensor], density: float) -> list[float]:
    """Per-tensor kept fractions after globally pruning the ``1 − density`` fraction with the largest score."""
    flat = torch.cat([s.flatten() for s in scores])
    keep = max(1, round(density * flat.numel()))
    if keep >= flat.numel():
        return [1.0] * len(scores)
    threshold = flat.kthvalue(keep).values
    return [max(1, int((s <= threshold).sum())) / s.numel() for s in scores]


class ZOCGE(ZOOptimizer):
    """``zo_cge``: DeepZero's coordinate-wise ZO (arXiv 2310.02025) on a seeded, mask-driven coordinate subset.

    Each step draws ``coordinates`` coordinates from the sparsity mask, estimates their partial
    derivatives by finite differences (``difference="forward"``, DeepZero's choice: ``coordinates + 1``
    forwards; ``"central"``: ``2·coordinates``) and updates only them: ``θ_i ← θ_i − lr·(ĝ_i + wd·θ_i)``.
    See the module docstring for the masks (``"zo_grasp"``, ``"magnitude"``, ``"none"``).

    Args:
        params, lr, eps (``μ``), weight_decay: as every ZO rule; DeepZero uses ``μ = 5e-3``.
        coordinates: coordinates per step (replaces ``queries``).
        density: fraction of the weights in the sparse model (ZO-GraSP's global density, or the
            per-tensor magnitude fraction); 1 = dense.
        mask: ``"zo_grasp"`` (default), ``"magnitude"`` or ``"none"``.
        mask_every: steps between redraws of the random within-layer mask (``"zo_grasp"``).
        grasp_queries: RGE directions of ZO-GraSP (``4·grasp_queries`` forwards, once).
        difference: ``"forward"`` (default) or ``"central"``.

    Memory: see the module docstring; no optimizer state.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        eps: float = 5e-3,
        weight_decay: float = 0.0,
        *,
        coordinates: int = 64,
        density: float = 1.0,
        mask: str = "zo_grasp",
        mask_every: int = 100,
        grasp_queries: int = 64,
        difference: str = "forward",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("directions") is not None:
            raise TypeError("zo_cge builds its own CoordinateDirections; drop the directions= argument.")
        kwargs.pop("directions", None)
        if kwargs.pop("queries", 1) != 1:  # ZeroOrder passes its default queries=1 to every rule
            raise TypeError("zo_cge takes coordinates= (partial derivatives per step), not queries=.")
        if mask not in MASKS:
            raise ValueError(f"mask={mask!r} is invalid: choose one of {list(MASKS)}.")
        if not isinstance(grasp_queries, int) or grasp_queries < 1:
            raise ValueError(f"grasp_queries={grasp_queries!r} is invalid: use an integer >= 1.")
        directions = CoordinateDirections(
            coordinates,
            density,
            {"zo_grasp": "random", "magnitude": "magnitude", "none": "none"}[mask],
            mask_every,
        )
        super().__init__(
            params,
            lr,
            eps,
            weight_decay,
            queries=coordinates,
            difference=difference,
            directions=directions,
            **kwargs,
        )
        self.mask = mask
        self.grasp_queries = grasp_queries

    @property
    def coordinate_directions(self) -> CoordinateDirections:
        assert isinstance(self.directions, CoordinateDirections)
        return self.directions

    def keys_for_step(self, step: int) -> list[DirectionKey]:
        d = self.coordinate_directions
        n = len(d._chosen) if d._step == step else self.queries
        return [DirectionKey(self.seed, step, k) for k in range(n)]

    def find_mask(self, closure: Closure) -> list[float]:
        """Run ZO-GraSP now and fix the per-tensor densities (done at the first step with ``mask="zo_grasp"``)."""
        d = self.coordinate_directions
        params = self._params()
        forwards = self._step_forwards(closure)
        try:
            with _no_graph([*params, *self.no_grad_params]):
                scores = zo_grasp_scores(
                    params, forwards, queries=self.grasp_queries, mu=self.eps, seed=self.seed
                )
        finally:
            forwards.finish()
        d.layer_density = grasp_layer_density(scores, d.density) if d.density < 1.0 else [1.0] * len(params)
        d._allowed_cache = None
        return list(d.layer_density)

    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        d = self.coordinate_directions
        if closure is not None and self.mask == "zo_grasp" and d.layer_density is None and d.density < 1.0:
            self.find_mask(closure)
        with torch.no_grad():
            d.begin_step(self._params(), self.seed, self.zo_step)
        try:
            return super().step(closure)
        finally:
            d.end_step()

    def _update(self, estimate: Any) -> None:
        d = self.coordinate_directions
        by_param: dict[int, list[tuple[int, float]]] = {}
        for key, g in zip(estimate.keys, estimate.projected_grads, strict=True):
            host, pos = d.coordinate(key)
            by_param.setdefault(host, []).append((pos, g))
        pending = estimate.pending
        for index, p, group in self._indexed():
            moves = by_param.get(index)
            touched = pending is not None and d.coordinate(pending[0])[0] == index
            if not moves and not touched:
                continue
            with self._writable(p, index) as w:
                self._restore_into(w, p, index, estimate)
                flat = w.view(-1)
                for pos, g in moves or []:
                    grad = g + group["weight_decay"] * float(flat[pos])
                    if grad:
                        flat[pos] -= group["lr"] * grad


