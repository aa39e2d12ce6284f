"""Dense Gaussian directions on the fused path: drawn by the Philox kernel, applied in place or materialised.

The torch path (:class:`~lightning_zobi.zo.directions.GaussianDirections`) regenerates ``z`` for
one tensor with ``torch.randn`` and then adds it: the direction is written to memory and read
back, and every parameter tensor costs a few kernel launches. :class:`FusedGaussianDirections`
instead makes one launch of :mod:`~lightning_zobi.zo.fused.dense_kernel` per pass over *all*
parameter tensors of a dtype, computing ``θ ← β·θ + a·z_a (+ b·z_b)`` in registers: ``z`` never
exists in memory and a pass is one read and one write of the parameters. It also materialises
``θ + Σ s·z`` out of place for the exact path (:meth:`FusedGaussianDirections.materialize_chunk`,
used by :class:`~lightning_zobi.zo.fused.just_in_time.FusedJustInTime`). The values differ from
``torch.randn``'s, so switching path mid-run changes the directions (not the algorithm); within a
path they are bit-reproducible. :class:`FusedPerturb` is the ``perturb_`` both fused families
share (it honours a perturbation the look-ahead fold already applied).

Memory: no direction tensor; per pass a table of 9 int64 per tensor, and a cached map of one
int32 per 4096 parameter elements (0.05 % of the parameter bytes in bf16).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_zobi.zo.directions import DirectionKey, Directions
from lightning_zobi.zo.fused.dense_kernel import _Group, _launch
from lightning_zobi.zo.fused.runtime import HAS_TRITON, check_dtype
from lightning_zobi.zo.fused.tables import PlanCache, Term, prepare_terms, scales_per_index, tensor_seeds


class _Plan:
    """How one parameter list is launched: contiguous tensors grouped by (device, dtype), cached."""

    def __init__(self, params: list[Tensor], ptrs: list[int]) -> None:
        self.ptrs = ptrs
        buckets: dict[tuple, list[int]] = {}
        for pos, p in enumerate(params):
            FusedGaussianDirections._check(p)
            if p.numel():
                buckets.setdefault((p.device, p.dtype, p.is_contiguous()), []).append(pos)
        self._params = params
        self._static = [
            (np.asarray(pos), _Group([params[i] for i in pos]) if contiguous else None, pos)
            for (_, _, contiguous), pos in buckets.items()
        ]

    def buckets(self) -> Iterator[tuple[np.ndarray, _Group, list[int] | None]]:
        """``(positions array, launch group, positions to copy back or None)`` per bucket."""
        for sel, group, pos in self._static:
            if group is not None:
                yield sel, group, None
            else:  # rare: strided parameters go through contiguous copies, two extra passes
                yield sel, _Group([self._params[i].contiguous() for i in pos]), pos


class FusedPerturb:
    """``perturb_`` through a fused ``apply_``, skipping once the perturbation a fused step already applied (mixin).

    :class:`FusedStep` folds the next step's ``+εz`` into its update pass and marks it in
    :attr:`preapplied`, so the estimator's first ``perturb_`` of that step finds it done.
    """

    preapplied: tuple[DirectionKey, float] | None = None
    apply_: Callable[..., None]

    def perturb_(self, params: Iterable[Tensor], key: DirectionKey, scale: float) -> None:
        """``θ += scale · z`` in one fused pass; a no-op once if that exact perturbation is pre-applied."""
        if self.preapplied is not None and self.preapplied == (key, scale):
            self.preapplied = None
            return
        self.apply_(list(params), [(key, scale)])


class FusedGaussianDirections(FusedPerturb, Directions):
    """Dense N(0, I) directions drawn by a fused Philox Triton kernel and applied in place.

    Same contract as :class:`~lightning_zobi.zo.directions.GaussianDirections` (the same
    ``(index, key)`` always gives the same tensor; seeds from ``key.seed_for(index)``) and the same
    distribution, but other values. :meth:`perturb_` and :meth:`apply_` never materialise ``z``;
    :meth:`sample` does (for rules that need the tensor), in the parameter's dtype, while the
    in-place passes add the float32 ``z`` before rounding once (so in bf16 ``sample`` is ``z``
    rounded to bf16).

    Args:
        rounds: Philox rounds (10 by default, as cuRAND; 7 already passes BigCrush per Salmon et
            al. 2011 and is cheaper). Part of the direction: keep it fixed within a run.
        fast_math: on CUDA, Box-Muller through the hardware approximations (``lg2/sqrt/sin/cos
            .approx``, absolute error ~1e-6 on ``z``) instead of libdevice's exact functions, which
            made the kernel compute-bound (2× a plain pass on an H200). The interpreter always uses
            the exact functions. Changes ``z`` only at the 1e-6 level.

    Memory: none per pass beyond a 72-byte-per-tensor table; a cached int32 per 4096 elements.
    """

    def __init__(self, rounds: int = 10, fast_math: bool = True) -> None:
        super().__init__()
        if not isinstance(rounds, int) or not 1 <= rounds <= 16:
            raise ValueError(
                f"rounds={rounds!r} is invalid: use an integer Philox round count in [1, 16] (10 is standard)."
            )
        if not HAS_TRITON:
            raise RuntimeError(
                "FusedGaussianDirections needs Triton (`pip install triton`; it ships with CUDA builds of torch). "
                "Use GaussianDirections / fused=False for the torch path."
            )
        self.rounds = rounds
        self.fast_math = bool(fast_math)
        self._plans = PlanCache()
        self._chunk_groups = PlanCache(limit=4096)

    FORMAT = 2
    """Version of the element → Philox mapping (1: four 24-bit normals per counter; 2: eight 16-bit)."""

    def state_dict(self) -> dict:
        return {"rounds": self.rounds, "format": self.FORMAT}

    def load_state_dict(self, state: dict) -> None:
        if "rounds" in state and int(state["rounds"]) != self.rounds:
            raise ValueError(
                f"The checkpoint's fused directions used rounds={state['rounds']}, this run rounds={self.rounds}: "
                "pass the same rounds to resume the same directions."
            )
        if "rounds" in state and int(state.get("format", 1)) != self.FORMAT:
            warnings.warn(
                f"The checkpoint was written with fused direction format {state.get('format', 1)}; this version "
                f"draws format {self.FORMAT}. Training continues correctly (checkpoints hold unperturbed weights), "
                "but the directions from here on differ from the ones the older version would have drawn.",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ launch plans
    def _plan(self, params: list[Tensor]) -> _Plan:
        """Buckets by (device, dtype) with their cached launch groups; rebuilt if storage moved."""
        ptrs = [p.data_ptr() for p in params]
        return self._plans.get(params, ptrs, lambda: _Plan(params, ptrs))

    @staticmethod
    def _check(param: Tensor) -> None:
        check_dtype(param, "use fused=False for other dtypes")

    # ------------------------------------------------------------------ the passes
    def apply_(
        self,
        params: Sequence[Tensor],
        terms: Sequence[Term],
        beta: float | Sequence[float] = 1.0,
        indices: Sequence[int] | None = None,
        nonnegative: bool = False,
        sr_seeds: np.ndarray | None = None,
    ) -> None:
        """``θ_i ← β_i·θ_i + Σ_terms α_i·z(key, index_i)`` in place, two directions per pass.

        ``alpha``/``beta`` are a float or one float per parameter (per-group rates); ``indices``
        are the direction indices of ``params`` (default ``0..len-1``). One pass (one kernel launch
        per dtype) for up to two terms; ``β`` is applied in the first pass; ``nonnegative``
        projects onto ``θ ≥ 0`` in the last pass. ``sr_seeds`` (one uint64 per parameter, in
        ``params``' order) rounds the last pass's bf16/fp16 results stochastically, seeded per
        tensor (round to nearest without it).
        """
        params = list(params)
        if not params:
            return
        idx, betas, prepared = prepare_terms(len(params), terms, beta, indices)
        seeds = [tensor_seeds(key, idx) for key, _ in prepared]
        with torch.no_grad():
            for sel, group, positions in self._plan(params).buckets():
                for first in range(0, len(prepared), 2):
                    two = len(prepared) - first > 1
                    _launch(
                        group,
                        seeds[first][sel],
                        prepared[first][1][sel],
                        seeds[first + 1][sel] if two else None,
                        prepared[first + 1][1][sel] if two else None,
                        betas[sel] if first == 0 else np.ones(len(sel)),
                        True,
                        self.rounds,
                        self.fast_math,
                        nonnegative and first + 2 >= len(prepared),
                        sr_seeds[sel] if sr_seeds is not None and first + 2 >= len(prepared) else None,
                    )
                if positions is not None:  # non-contiguous parameters were updated on copies
                    for i, t in zip(positions, group.tensors, strict=True):
                        params[i].copy_(t)

    def materialize_chunk(
        self,
        params: Sequence[Tensor],
        indices: Sequence[int],
        terms: Sequence[tuple[DirectionKey, Any]],
        out: Tensor,
        offsets: Sequence[int],
    ) -> bool:
        """``out[o_k : o_k + n_k] = θ_k + Σ s·z(key, index_k)`` for same-dtype contiguous ``params``; θ untouched.

        The exact path's materialisation (:class:`FusedJustInTime`): one launch, each element
        computed in float32 (float64 for float64) from the direction the in-place passes use and
        rounded once to the parameter dtype. ``terms`` holds ``(key, scale)`` with a float or one
        scale per direction index. Returns False (nothing written) for more than two terms.
        """
        if len(terms) > 2:
            return False
        params = list(params)
        idx = np.asarray(list(indices), dtype=np.int64)
        prepared = scales_per_index(terms, idx)
        offsets = [int(o) for o in offsets]
        check = ([(p.data_ptr(), p.numel()) for p in params], offsets)
        group = self._chunk_groups.get(params, check, lambda: _Group(params, offsets))
        two = len(prepared) == 2
        with torch.no_grad():
            _launch(
                group,
                tensor_seeds(prepared[0][0], idx),
                prepared[0][1],
                tensor_seeds(prepared[1][0], idx) if two else None,
                prepared[1][1] if two else None,
                np.ones(len(idx)),
                True,
                self.rounds,
                self.fast_math,
                out=out,
            )
        return True

    def sample(self, param: Tensor, index: int, key: DirectionKey) -> Tensor:
        self._check(param)
        out = torch.empty(param.shape, dtype=param.dtype, device=param.device)
        if out.numel() == 0:
            return out
        group = _Group([out])
        _launch(group, tensor_seeds(key, [index]), np.ones(1), None, None, np.ones(1), False, self.rounds)
        return out


__all__ = ["FusedGaussianDirections", "FusedPerturb"]
