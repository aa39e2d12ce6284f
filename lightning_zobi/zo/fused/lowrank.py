"""LOZO's directions on the fused path: ``Z = U Vᵀ`` on 2-D weights, never materialised, applied by Triton.

LOZO ("Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank Structures", Chen et
al., ICLR 2025, arXiv 2410.07698) perturbs every ``m×n`` weight along ``U Vᵀ`` with ``U`` (``m×r``)
fresh per step and query and ``V`` (``n×r``) fresh per lazy period of ``nu`` steps. The torch path
(:class:`~lightning_zobi.zo.directions.LowRankDirections`) draws both factors with ``torch.randn``
and adds them with one ``addmm_`` per weight: two random launches, a GEMM and its bookkeeping for
every weight of every pass. :class:`FusedLowRankDirections` makes one launch of the tile kernel
(:mod:`~lightning_zobi.zo.fused.lowrank_kernel`) per group of 2-D weights instead; non-matrix
parameters take :class:`~lightning_zobi.zo.fused.directions.FusedGaussianDirections`' dense pass,
with the seeds the torch path uses.

Randomness: Philox-4x32-``rounds`` then Box-Muller
(:func:`~lightning_zobi.zo.fused.philox.philox_normals`), keyed by the factor's 64-bit seed,
derived exactly as :class:`LowRankDirections` derives it (``U``: ``key.seed_for(index, 0x55)``;
``V``: ``derive_seed(run_seed, step // nu, index, 0x56)``: :func:`u_seeds`, :func:`v_seeds`). The
first ``r`` columns of a rank-``r'`` factor (``r' > r``) are the rank-``r`` factor. The values
differ from ``torch.randn``'s, so switching between this and the torch path mid-run changes the
directions (not the algorithm); within this path they are bit-reproducible.

Memory: no factor and no direction tensor; per pass a table of 13 int64 per weight, and a cached
map of one int32 per tile (``1/8192`` of the weight's elements).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_zobi.zo.directions import DirectionKey, LowRankDirections, derive_seed
from lightning_zobi.zo.fused.directions import FusedGaussianDirections, FusedPerturb
from lightning_zobi.zo.fused.lowrank_kernel import _aligned, _TileGroup, launch_factor
from lightning_zobi.zo.fused.rounding import sr_mode
from lightning_zobi.zo.fused.runtime import check_dtype
from lightning_zobi.zo.fused.tables import (
    PlanCache,
    Term,
    derive_seeds,
    f64_bits,
    prepare_terms,
    scales_per_index,
    split_seeds,
)

MAX_RANK = 16
U_SALT = 0x55
V_SALT = 0x56
_MAX_DIM = 2**31 - 1
_SCAL = 13  # per weight: (U lo, U hi, V lo, V hi) × 2 streams, α_0, α_1, β, rounding seed lo, hi


def u_seeds(key: DirectionKey, indices: Sequence[int]) -> np.ndarray:
    """Seeds of ``U`` for parameters ``indices`` under ``key``: ``key.seed_for(i, 0x55)``, as the torch path."""
    return derive_seeds((key.run_seed, key.step, key.query), indices, U_SALT)


def v_seeds(run_seed: int, period: int, indices: Sequence[int]) -> np.ndarray:
    """Seeds of ``V`` for lazy period ``period``: ``derive_seed(run, period, i, 0x56)``, as the torch path."""
    return derive_seeds((run_seed, period), indices, V_SALT)


class _LowRankPlan:
    """How a parameter list is launched: 2-D weights grouped by (device, dtype, unit column stride, alignment); the rest.

    An odd-shaped weight (say a 768×2 head) thus never takes the vector loads away from the others.
    """

    def __init__(self, params: list[Tensor], key: tuple) -> None:
        self.key = key
        buckets: dict[tuple, list[int]] = {}
        dense: list[int] = []
        for pos, p in enumerate(params):
            FusedLowRankDirections.check(p)
            if not LowRankDirections.is_matrix(p):
                dense.append(pos)
            elif p.numel():
                buckets.setdefault((p.device, p.dtype, p.stride(1) == 1, _aligned(p)), []).append(pos)
        self.groups = [(np.asarray(pos), _TileGroup([params[i] for i in pos])) for pos in buckets.values()]
        self.dense = np.asarray(dense, dtype=np.int64)


def _plan_key(params: list[Tensor]) -> tuple:
    return tuple((id(p), p.data_ptr(), tuple(p.shape), p.stride(), p.dtype) for p in params)


class FusedLowRankDirections(FusedPerturb, LowRankDirections):
    """LOZO's directions (``U Vᵀ`` on 2-D weights, Gaussian elsewhere) drawn and applied by fused Triton kernels.

    Same contract, seeds and distribution as :class:`~lightning_zobi.zo.directions.LowRankDirections`
    (LOZO, Chen et al., ICLR 2025, arXiv 2410.07698): ``U`` per (run, step, query, index), ``V``
    per (run, ``step // nu``, index), dense Gaussian for non-matrix parameters; but the values come
    from the Philox generator of :mod:`lightning_zobi.zo.fused`, not ``torch.randn``, so they differ
    from the torch path's. :meth:`apply_` / :meth:`perturb_` never materialise ``U``, ``V`` or ``Z``;
    :meth:`factors` (and :meth:`sample`) do, with the exact float32 values the in-place passes use
    (cast to the parameter's dtype: exact for float32/float64, rounded for half types).

    Args:
        rank: ``r`` in 1..16 (a compile-time constant of the kernel).
        nu: lazy period of ``V`` in steps.
        rounds, fast_math: see :class:`~lightning_zobi.zo.fused.FusedGaussianDirections`; they are
            part of the direction (keep them fixed within a run).

    Memory: none per pass beyond a 104-byte-per-weight table; a cached int32 per tile.
    """

    def __init__(self, rank: int = 2, nu: int = 50, rounds: int = 10, fast_math: bool = True) -> None:
        super().__init__(rank, nu)
        if rank > MAX_RANK:
            raise ValueError(
                f"rank={rank} is too large for the fused LOZO kernel (at most {MAX_RANK}); use a smaller rank "
                "or the torch path (LOZO / LowRankDirections)."
            )
        self.dense = FusedGaussianDirections(rounds, fast_math)  # validates rounds, needs Triton
        self.rounds = rounds
        self.fast_math = bool(fast_math)
        self._plans = PlanCache()
        self._chunk_groups = PlanCache(limit=4096)

    # ------------------------------------------------------------------ checks and state
    @staticmethod
    def check(param: Tensor) -> None:
        """Refuse parameters the fused kernels cannot update, saying what to use instead."""
        check_dtype(param, "use LOZO (the torch path) or leave that parameter out of the optimizer")
        if param.device.type not in ("cuda", "cpu"):
            raise RuntimeError(
                f"The fused LOZO path runs on CUDA (compiled) or CPU (Triton's interpreter), got a parameter on "
                f"{param.device}; use LOZO (the torch path)."
            )
        if param.dim() == 2 and max(param.shape) > _MAX_DIM:
            raise ValueError(
                f"A {tuple(param.shape)} weight exceeds the fused LOZO kernel's 2**31-1 rows/columns; use LOZO."
            )

    def state_dict(self) -> dict:
        return {"rounds": self.rounds, "rank": self.rank, "nu": self.nu}

    def load_state_dict(self, state: dict) -> None:
        for name in ("rounds", "rank", "nu"):
            if name in state and int(state[name]) != getattr(self, name):
                raise ValueError(
                    f"The checkpoint's fused LOZO directions used {name}={state[name]}, this run "
                    f"{name}={getattr(self, name)}: pass the same {name} to resume the same directions."
                )

    def _plan(self, params: list[Tensor]) -> _LowRankPlan:
        """The cached launch plan of ``params``; rebuilt if a tensor moved or changed shape/strides."""
        key = _plan_key(params)
        return self._plans.get(params, key, lambda: _LowRankPlan(params, key))

    # ------------------------------------------------------------------ the passes
    def apply_(
        self,
        params: Sequence[Tensor],
        terms: Sequence[Term],
        beta: float | Sequence[float] = 1.0,
        indices: Sequence[int] | None = None,
        sr_seeds: np.ndarray | None = None,
    ) -> None:
        """``θ_i ← β_i·θ_i + Σ_terms α_i·Z(key, index_i)`` in place, two directions per launch.

        ``alpha``/``beta`` are a float or one float per parameter; ``indices`` are the direction
        indices of ``params`` (default ``0..len-1``). 2-D weights: one launch per (device, dtype)
        per two terms, ``β`` applied by the first; other parameters: the dense fused pass.
        ``sr_seeds`` (one per parameter) rounds the last launch's bf16/fp16 results stochastically.
        """
        params = list(params)
        if not params:
            return
        idx, betas, prepared = prepare_terms(len(params), terms, beta, indices)
        plan = self._plan(params)
        with torch.no_grad():
            for sel, group in plan.groups:
                for first in range(0, len(prepared), 2):
                    chunk = prepared[first : first + 2]
                    scal = self._table(chunk, idx[sel], sel, betas[sel] if first == 0 else np.ones(len(sel)))
                    last = first + 2 >= len(prepared)
                    sr = sr_mode(group.dtype) if sr_seeds is not None and last else 0
                    if sr:
                        scal[:, 11], scal[:, 12] = split_seeds(sr_seeds[sel])
                    group.launch(scal, len(chunk), self.rank, self.rounds, self.fast_math, sr)
            if plan.dense.size:
                d = plan.dense
                self.dense.apply_(
                    [params[i] for i in d],
                    [(key, a[d]) for key, a in prepared],
                    beta=betas[d],
                    indices=idx[d],
                    sr_seeds=None if sr_seeds is None else sr_seeds[d],
                )

    def materialize_chunk(
        self,
        params: Sequence[Tensor],
        indices: Sequence[int],
        terms: Sequence[tuple[DirectionKey, Any]],
        out: Tensor,
        offsets: Sequence[int],
    ) -> bool:
        """``out[o_k : o_k + n_k] = θ_k + Σ s·Z(key, index_k)`` (row-major) for same-dtype ``params``; θ untouched.

        The exact path's materialisation: one tile launch for the 2-D weights (``U Vᵀ`` in
        registers, float32 arithmetic, one rounding) and the dense fused launch for the others.
        Returns False (nothing written) for more than two terms.
        """
        if len(terms) > 2:
            return False
        params = list(params)
        idx = np.asarray(list(indices), dtype=np.int64)
        offs = np.asarray([int(o) for o in offsets], dtype=np.int64)
        matrix = np.array([self.is_matrix(p) for p in params], dtype=bool)
        if (~matrix).any():
            d = np.flatnonzero(~matrix)
            self.dense.materialize_chunk([params[i] for i in d], idx[d], terms, out, offs[d])
        if matrix.any():
            sel = np.flatnonzero(matrix)
            weights = [params[i] for i in sel]
            group = self._chunk_groups.get(
                weights,
                (_plan_key(weights), offs[sel].tolist()),
                lambda: _TileGroup(weights, offs[sel].tolist()),
            )
            prepared = scales_per_index(terms, idx)
            scal = self._table(prepared, idx[sel], sel, np.ones(len(sel)))
            with torch.no_grad():
                group.launch(scal, len(prepared), self.rank, self.rounds, self.fast_math, out=out)
        return True

    def _table(
        self, chunk: list[tuple[DirectionKey, np.ndarray]], idx: np.ndarray, sel: np.ndarray, beta: np.ndarray
    ) -> np.ndarray:
        """The kernel's per-weight table: split U/V seeds of each stream, α per stream, β."""
        scal = np.zeros((len(sel), _SCAL), dtype=np.int64)
        for s, (key, alpha) in enumerate(chunk):
            scal[:, 4 * s], scal[:, 4 * s + 1] = split_seeds(u_seeds(key, idx))
            scal[:, 4 * s + 2], scal[:, 4 * s + 3] = split_seeds(
                v_seeds(key.run_seed, self.period(key.step), idx)
            )
            scal[:, 8 + s] = f64_bits(alpha[sel])
        scal[:, 10] = f64_bits(beta)
        return scal

    def add_direction_(self, param: Tensor, index: int, key: DirectionKey, scale: float) -> None:
        """``param += scale · Z`` in place through the fused kernels (no factor or dense ``Z``)."""
        self.apply_([param], [(key, scale)], indices=[index])

    # ------------------------------------------------------------------ materialised factors
    def _factor(self, rows: int, seed: int, like: Tensor) -> Tensor:
        """The float32 factor (``rows×r``) under ``seed``: the values the tile kernel regenerates."""
        self.check(like)
        out = torch.empty(rows, self.rank, dtype=torch.float32, device=like.device)
        if rows == 0:
            return out
        launch_factor(out, seed, self.rank, self.rounds, self.fast_math)
        return out

    def _factors32(self, param: Tensor, index: int, key: DirectionKey) -> tuple[Tensor, Tensor]:
        """``(U, V)`` of a 2-D weight in float32, exactly as the in-place passes regenerate them."""
        u = self._factor(param.shape[0], key.seed_for(index, U_SALT), param)
        v_seed = derive_seed(key.run_seed, self.period(key.step), index, V_SALT)
        return u, self._factor(param.shape[1], v_seed, param)

    def u_factor(self, param: Tensor, index: int, key: DirectionKey) -> Tensor:
        """``U`` (``m×r``, in ``param``'s dtype) of parameter ``index`` for the step and query of ``key``."""
        return self._factor(param.shape[0], key.seed_for(index, U_SALT), param).to(param.dtype)

    def v_factor(self, param: Tensor, index: int, run_seed: int, period: int) -> Tensor:
        """``V`` (``n×r``, in ``param``'s dtype) of parameter ``index`` for lazy period ``period``."""
        seed = derive_seed(run_seed, period, index, V_SALT)
        return self._factor(param.shape[1], seed, param).to(param.dtype)

    def sample(self, param: Tensor, index: int, key: DirectionKey) -> Tensor:
        """``U Vᵀ`` for a 2-D weight (computed in float32, float64 for float64, then cast); dense fused Gaussian otherwise."""
        if not self.is_matrix(param):
            return self.dense.sample(param, index, key)
        u, v = self._factors32(param, index, key)
        if param.dtype == torch.float64:
            u, v = u.double(), v.double()
        return (u @ v.T).to(param.dtype)


__all__ = ["FusedLowRankDirections", "u_seeds", "v_seeds"]
