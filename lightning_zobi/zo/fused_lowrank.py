"""Fused LOZO: low-rank directions ``Z = U Vᵀ`` generated inside a Triton kernel and applied in place.

LOZO ("Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank Structures", Chen et
al., ICLR 2025, arXiv 2410.07698) perturbs every ``m×n`` weight along ``U Vᵀ`` with ``U`` (``m×r``)
fresh per step and query and ``V`` (``n×r``) fresh per lazy period of ``nu`` steps. The torch path
(:class:`~lightning_zobi.zo.directions.LowRankDirections`) draws both factors with ``torch.randn``
and adds them with one ``addmm_`` per weight: two random launches, a GEMM and its bookkeeping for
every weight of every pass. Here one Triton launch per pass covers *all* 2-D weights of a dtype
(split only by alignment and column stride, which change the compiled code): each program owns
one ``TILE_M×TILE_N`` tile of one weight, regenerates the ``TILE_M·r`` entries of ``U`` and the
``TILE_N·r`` entries of ``V`` it needs from Philox in registers, and computes
``θ ← β·θ + Σ_s α_s·U_s V_sᵀ`` (up to two directions ``s`` per pass) as ``r`` broadcast outer
products, so ``U``, ``V`` and ``Z`` never exist in memory and a pass is one read and one write of
the weights. Non-matrix parameters take :class:`~lightning_zobi.zo.fused.FusedGaussianDirections`'
dense pass, with the seeds the torch path uses.

Randomness: the generator of :mod:`lightning_zobi.zo.fused` (Philox-4x32-``rounds`` then
Box-Muller, :func:`~lightning_zobi.zo.fused.philox_normals`), keyed by the factor's 64-bit seed,
derived exactly as :class:`LowRankDirections` derives it (``U``: ``key.seed_for(index, 0x55)``;
``V``: ``derive_seed(run_seed, step // nu, index, 0x56)``). Entry ``(i, k)`` of a factor (row ``i``,
rank column ``k``) is word ``k mod 4`` of the Philox block at counter ``(i, k // 4, 0, 0)``: it
depends only on the seed and the position, never on the tile size, the launch or the other
weights, and the first ``r`` columns of a rank-``r'`` factor (``r' > r``) are the rank-``r`` factor.
The values differ from ``torch.randn``'s, so switching between this and the torch path mid-run
changes the directions (not the algorithm); within this path they are bit-reproducible.

On CPU the same kernels run in Triton's interpreter (slow: for tests); the compiled kernels need
CUDA.

Cost of a tile: ``NSTREAM·ceil(r/4)·(TILE_M + TILE_N)`` Philox blocks (192 for one stream at
r ≤ 4 with the default 64×128 tile: one per 43 elements, where the dense fused pass needs one
per 8) and ``r`` multiply-adds per element per stream. Two streams that share ``V`` (two
queries of one lazy period) are summed in the factor space, ``(α_a·u_a + α_b·u_b)·vᵀ``: ``r``
multiply-adds per element and one ``V`` for both. On CUDA the factor vectors are "pinned"
(:func:`_pin_src`) so that each entry is drawn by one thread and shared through a few KiB of
shared memory. Static SASS counts (Triton 3.9, sm_90, bf16, one stream): 12, 14, 18, 25 and 40
instructions per element at r = 1, 2, 4, 8, 16, no spills; an H200 streams bf16 at roughly 28
per element, so up to r ≈ 8 a pass should stay memory-bound (counts from compiling
without a GPU). Measured (H200, bf16, rank 2, ``benchmarks/zo_step.py``): a Llama-7B-shaped
``FusedLOZO`` step takes 1.18× two forwards guarded (2 passes; 1.22× with 3) against 1.51× for
the torch path's :class:`~lightning_zobi.zo.optim.LOZO`; 1.09× against 1.49× at the 1.1B shape.

Memory: no factor and no direction tensor; per pass a table of 11 int64 per weight, and a cached
map of one int32 per tile (``1/8192`` of the weight's elements).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_zobi.zo.base import _reject_directions
from lightning_zobi.zo.directions import DirectionKey, LowRankDirections, derive_seed
from lightning_zobi.zo.fused import (
    HAS_TRITON,
    FusedGaussianDirections,
    FusedPerturb,
    FusedStep,
    PlanCache,
    Term,
    _DeviceFunction,
    _scale_of,
    check_dtype,
    compiled_kernel,
    derive_seeds,
    f64_bits,
    philox_normals,
    prepare_terms,
    round_bf16_rne,
    split_seeds,
    sr_hash,
    sr_mode,
    stochastic_round,
)
from lightning_zobi.zo.rules.lozo import LOZO

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised on machines without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

TILE_M = 64
"""Rows per program, half for float64 (a speed knob only: the values do not depend on it)."""
TILE_N = 128
"""Columns per program (a speed knob only)."""
NUM_WARPS = 4
"""Warps per program of the tile kernel (a speed knob only)."""
WIDE_MUL = True
"""Philox products through one 32×32→64 multiply (a speed knob only: the same values)."""
FACTOR_ROWS = 256
"""Factor rows per program of the materialising kernel used by :meth:`FusedLowRankDirections.factors`."""
MAX_RANK = 16
U_SALT = 0x55
V_SALT = 0x56
_MASK32 = 0xFFFFFFFF
_MAX_DIM = 2**31 - 1
_SCAL = 13  # per weight: (U lo, U hi, V lo, V hi) × 2 streams, α_0, α_1, β, rounding seed lo, hi
_DROPPED: set[str] = set()
"""Compile options Triton rejected once on this machine (``fast``, ``pin``, ``aligned``): not tried again."""


# ---------------------------------------------------------------------------------------- kernels
def _pick_src(W: tl.constexpr, a0, a1, a2, a3):
    """``(a0, a1, a2, a3)[W]`` for a compile-time ``W`` (a rank column's word of a Philox block)."""
    out = a3
    if W == 0:
        out = a0
    elif W == 1:
        out = a1
    elif W == 2:
        out = a2
    return out


_pick = _DeviceFunction(_pick_src) if HAS_TRITON else None


def _pin_src(x, PIN: tl.constexpr):
    """``x`` unchanged; with ``PIN`` (CUDA only) through an opaque move Triton's layout pass cannot duplicate.

    Without it Triton's layout pass either recomputes every factor entry in each thread holding its
    row or column of the tile (Philox repeated 8-16×) or moves the whole float32 tile through
    shared memory. A pinned factor is drawn once, spread over the program's threads, and only the
    ``U`` and ``V`` vectors go through shared memory: static SASS counts for sm_90 (bf16, 64×128
    tile, 4 warps) drop from 24 to 14 instructions per element at r = 2 and from 43 (with
    register spills) to 25 at r = 8.
    """
    if PIN:
        x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=False, pack=1)
    return x


_pin = _DeviceFunction(_pin_src) if HAS_TRITON else None


def _zo_lowrank_src(
    x0_ptr,
    out0_ptr,
    tile_tensor_ptr,
    meta_ptr,
    scal_ptr,
    NSTREAM: tl.constexpr,
    SHARED_V: tl.constexpr,
    RANK: tl.constexpr,
    F64: tl.constexpr,
    CDT: tl.constexpr,
    CONTIG: tl.constexpr,
    ALIGNED: tl.constexpr,
    RNE_BF16: tl.constexpr,
    FAST: tl.constexpr,
    PIN: tl.constexpr,
    WIDE: tl.constexpr,
    OUT: tl.constexpr,
    SR: tl.constexpr,
    ROUNDS: tl.constexpr,
    TILE_M: tl.constexpr,
    TILE_N: tl.constexpr,
):
    """``X ← β·X + Σ_s α_s·U_s V_sᵀ`` (NSTREAM = 1 or 2) over many 2-D tensors, one program per ``TILE_M×TILE_N`` tile.

    ``meta[t] = (offset of tensor t from x0 in elements, rows, cols, row stride, col stride,
    first tile, tiles per row, offset in out0)``; ``scal[t] = (U_a seed lo, hi, V_a seed lo, hi,
    U_b lo, hi, V_b lo, hi, α_a, α_b, β, rounding seed lo, hi)`` (floats as float64 bits).
    ``OUT`` writes ``X + Σ_s α_s·U_s V_sᵀ`` row-major into ``out0`` (the exact path's
    materialisation, one rounding) and leaves ``X``; ``SR`` (1 bf16, 2 fp16) rounds stochastically
    with bits hashed from the rounding seed and (row, column). Where the sum is exactly 0 the
    result is ``β·X`` (``−0.0`` stays). ``U[i, k]`` is word ``k % 4`` of
    Philox((i, k // 4, 0, 0), seed_U) after Box-Muller, ``V[j, k]`` likewise under seed_V.
    ``SHARED_V`` (both streams have the same ``V``: two queries of one lazy period) sums the
    streams in the factor space, ``(α_a·u_a + α_b·u_b) vᵀ``: one outer product per rank column.
    """
    pid = tl.program_id(0)
    t = tl.load(tile_tensor_ptr + pid).to(tl.int64)
    base = tl.load(meta_ptr + t * 8)
    m = tl.load(meta_ptr + t * 8 + 1)
    n = tl.load(meta_ptr + t * 8 + 2)
    s0 = tl.load(meta_ptr + t * 8 + 3)
    s1 = tl.load(meta_ptr + t * 8 + 4)
    tile = pid - tl.load(meta_ptr + t * 8 + 5)
    per_row = tl.load(meta_ptr + t * 8 + 6)
    obase = tl.load(meta_ptr + t * 8 + 7)
    if ALIGNED:
        base = tl.multiple_of(base, 8)
        obase = tl.multiple_of(obase, 8)
        s0 = tl.multiple_of(s0, 8)
        n = tl.multiple_of(n, 8)
    rows = (tile // per_row) * TILE_M + tl.arange(0, TILE_M)
    cols = (tile % per_row) * TILE_N + tl.arange(0, TILE_N)
    ru = rows.to(tl.uint32)
    cu = cols.to(tl.uint32)
    sc = scal_ptr + t * 13
    ua0 = tl.load(sc).to(tl.uint32)
    ua1 = tl.load(sc + 1).to(tl.uint32)
    va0 = tl.load(sc + 2).to(tl.uint32)
    va1 = tl.load(sc + 3).to(tl.uint32)
    ub0 = tl.load(sc + 4).to(tl.uint32)
    ub1 = tl.load(sc + 5).to(tl.uint32)
    vb0 = tl.load(sc + 6).to(tl.uint32)
    vb1 = tl.load(sc + 7).to(tl.uint32)
    alpha_a = tl.load(sc + 8).to(tl.float64, bitcast=True)
    alpha_b = tl.load(sc + 9).to(tl.float64, bitcast=True)
    beta = tl.load(sc + 10).to(tl.float64, bitcast=True)
    if not F64:
        alpha_a = alpha_a.to(tl.float32)
        alpha_b = alpha_b.to(tl.float32)
        beta = beta.to(tl.float32)
    acc = tl.full([TILE_M, TILE_N], 0, dtype=CDT)
    for g in tl.static_range((RANK + 3) // 4):  # one Philox block gives 4 rank columns
        gu = ru * 0 + g
        gv = cu * 0 + g
        a0, a1, a2, a3 = philox_normals(ru, gu, ua0, ua1, ROUNDS, FAST, WIDE)
        p0, p1, p2, p3 = philox_normals(cu, gv, va0, va1, ROUNDS, FAST, WIDE)
        b0, b1, b2, b3 = a0, a1, a2, a3
        q0, q1, q2, q3 = p0, p1, p2, p3
        if NSTREAM == 2:
            b0, b1, b2, b3 = philox_normals(ru, gu, ub0, ub1, ROUNDS, FAST, WIDE)
            if not SHARED_V:
                q0, q1, q2, q3 = philox_normals(cu, gv, vb0, vb1, ROUNDS, FAST, WIDE)
        for w in tl.static_range(4):
            if 4 * g + w < RANK:
                ua = alpha_a * _pin(_pick(w, a0, a1, a2, a3), PIN).to(CDT)
                va = _pin(_pick(w, p0, p1, p2, p3), PIN).to(CDT)
                if NSTREAM == 1:
                    acc += ua[:, None] * va[None, :]
                elif SHARED_V:
                    ub = alpha_b * _pin(_pick(w, b0, b1, b2, b3), PIN).to(CDT)
                    acc += (ua + ub)[:, None] * va[None, :]
                else:
                    ub = alpha_b * _pin(_pick(w, b0, b1, b2, b3), PIN).to(CDT)
                    vb = _pin(_pick(w, q0, q1, q2, q3), PIN).to(CDT)
                    acc += ua[:, None] * va[None, :] + ub[:, None] * vb[None, :]
    if CONTIG:
        offs = base + rows[:, None] * s0 + cols[None, :]
    else:
        offs = base + rows[:, None] * s0 + cols[None, :] * s1
    mask = (rows < m)[:, None] & (cols < n)[None, :]
    x = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(CDT)
    out = tl.where(acc == 0.0, beta * x, beta * x + acc)
    ptrs = x0_ptr + offs
    if OUT:
        ptrs = out0_ptr + (obase + rows[:, None] * n + cols[None, :])
    if SR != 0:
        r0 = tl.load(sc + 11).to(tl.uint32)
        r1 = tl.load(sc + 12).to(tl.uint32)
        bits = sr_hash(ru[:, None] + cu[None, :] * 0, cu[None, :] + ru[:, None] * 0, r0, r1)
        tl.store(ptrs, stochastic_round(out, bits, SR), mask=mask)
    else:
        if RNE_BF16:
            out = round_bf16_rne(out)
        tl.store(ptrs, out.to(x0_ptr.dtype.element_ty), mask=mask)


def _zo_factor_src(
    out_ptr,
    seed_ptr,
    nrows,
    RANK: tl.constexpr,
    FAST: tl.constexpr,
    WIDE: tl.constexpr,
    ROUNDS: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Write the float32 factor ``F`` (``nrows×RANK``, row-major) the tile kernel regenerates under ``seed``."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask = rows < nrows
    ru = rows.to(tl.uint32)
    k0 = tl.load(seed_ptr).to(tl.uint32)
    k1 = tl.load(seed_ptr + 1).to(tl.uint32)
    for g in tl.static_range((RANK + 3) // 4):
        z0, z1, z2, z3 = philox_normals(ru, ru * 0 + g, k0, k1, ROUNDS, FAST, WIDE)
        for w in tl.static_range(4):
            if 4 * g + w < RANK:
                tl.store(out_ptr + rows * RANK + (4 * g + w), _pick(w, z0, z1, z2, z3), mask=mask)


_SOURCES = {"tiles": _zo_lowrank_src, "factor": _zo_factor_src}


def _kernel(name: str, device: torch.device) -> Any:
    """Kernel ``name`` compiled for CUDA, or wrapped by Triton's interpreter for CPU tensors."""
    return compiled_kernel(_SOURCES[name], device, "use LOZO / LowRankDirections (the torch path) instead")


def _launch_with_fallback(run: Any, **options: bool) -> Any:
    """``run(**options)``; an option Triton rejects (fast math, pinning, alignment hints) is dropped, with a warning.

    The options are speed knobs of the compiled kernel only (the interpreter gets them all off),
    so dropping one never changes the directions beyond fast math's ~1e-6.
    """
    options = {name: on and name not in _DROPPED for name, on in options.items()}
    while True:
        try:
            return run(**options)
        except Exception as err:
            name = next((n for n, on in options.items() if on), None)
            if name is None:
                raise
            warnings.warn(f"fused LOZO kernel: option {name!r} failed ({err!r}); dropped.", stacklevel=3)
            _DROPPED.add(name)
            options[name] = False


# ---------------------------------------------------------------------------------------- seeds
def u_seeds(key: DirectionKey, indices: Sequence[int]) -> np.ndarray:
    """Seeds of ``U`` for parameters ``indices`` under ``key``: ``key.seed_for(i, 0x55)``, as the torch path."""
    return derive_seeds((key.run_seed, key.step, key.query), indices, U_SALT)


def v_seeds(run_seed: int, period: int, indices: Sequence[int]) -> np.ndarray:
    """Seeds of ``V`` for lazy period ``period``: ``derive_seed(run, period, i, 0x56)``, as the torch path."""
    return derive_seeds((run_seed, period), indices, V_SALT)


# ---------------------------------------------------------------------------------------- launch
def _aligned(p: Tensor) -> bool:
    """True when 16-byte vector accesses fit every row of ``p`` (8-element aligned start, columns and row stride)."""
    return (
        p.stride(1) == 1
        and p.shape[1] % 8 == 0
        and p.stride(0) % 8 == 0
        and p.data_ptr() % (8 * p.element_size()) == 0
    )


class _TileGroup:
    """Static launch data of same-device, same-dtype 2-D tensors: per-tensor geometry and tile map."""

    def __init__(self, tensors: list[Tensor], out_offsets: Sequence[int] | None = None) -> None:
        x0 = tensors[0]
        self.device, self.dtype, self.tensors, self.x0 = x0.device, x0.dtype, tensors, x0
        self.contiguous = all(t.stride(1) == 1 for t in tensors)
        self.aligned = all(_aligned(t) for t in tensors) and all(int(o) % 8 == 0 for o in out_offsets or [])
        # half-height tiles where a thread holds more registers (float64) or loads element by
        # element (unaligned): they keep the kernel free of register spills on sm_90
        half = self.dtype == torch.float64 or not self.aligned
        self.tile_m, self.tile_n = (max(1, TILE_M // 2) if half else TILE_M), TILE_N
        esize = x0.element_size()
        rows, tiles, first = [], [], 0
        for pos, t in enumerate(tensors):
            delta = t.data_ptr() - x0.data_ptr()
            if delta % esize:
                raise AssertionError("tensors of one dtype must be element-aligned")
            m, n = t.shape
            per_row = -(-n // self.tile_n)
            count = -(-m // self.tile_m) * per_row
            out = delta // esize if out_offsets is None else int(out_offsets[pos])
            rows.append([delta // esize, m, n, t.stride(0), t.stride(1), first, per_row, out])
            tiles.append(count)
            first += count
        self.num_tiles = first
        meta = torch.tensor(rows, dtype=torch.int64)
        tile_tensor = torch.repeat_interleave(
            torch.arange(len(tensors), dtype=torch.int32), torch.tensor(tiles, dtype=torch.int64)
        )
        self.meta = meta.to(self.device)
        self.tile_tensor = tile_tensor.to(self.device)

    def launch(
        self,
        scal: np.ndarray,
        nstream: int,
        rank: int,
        rounds: int,
        fast: bool,
        sr: int = 0,
        out: Tensor | None = None,
    ) -> Any:
        """One launch over every tile of the group with the per-tensor table ``scal`` (n×13 int64).

        ``sr``: stochastic rounding mode (:func:`~lightning_zobi.zo.fused.sr_mode`; 0 = nearest);
        ``out``: write ``X + Σ α·U Vᵀ`` there (row-major at the out offsets) instead of into ``X``.
        """
        host = torch.from_numpy(np.ascontiguousarray(scal))
        on_cuda = self.device.type == "cuda"
        scal_t = host.pin_memory().to(self.device, non_blocking=True) if on_cuda else host
        kernel = _kernel("tiles", self.device)

        def run(fast: bool, pin: bool, aligned: bool) -> Any:
            return kernel[(self.num_tiles,)](
                self.x0,
                self.x0 if out is None else out,
                self.tile_tensor,
                self.meta,
                scal_t,
                NSTREAM=nstream,
                SHARED_V=nstream == 2 and bool(np.array_equal(scal[:, 2:4], scal[:, 6:8])),
                RANK=rank,
                F64=self.dtype == torch.float64,
                CDT=tl.float64 if self.dtype == torch.float64 else tl.float32,
                CONTIG=self.contiguous,
                ALIGNED=aligned,
                RNE_BF16=self.dtype == torch.bfloat16 and not on_cuda,
                FAST=fast,
                PIN=pin,
                WIDE=WIDE_MUL,
                OUT=out is not None,
                SR=sr,
                ROUNDS=rounds,
                TILE_M=self.tile_m,
                TILE_N=self.tile_n,
                num_warps=NUM_WARPS,
            )

        return _launch_with_fallback(run, fast=fast and on_cuda, pin=on_cuda, aligned=self.aligned)


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


# ---------------------------------------------------------------------------------------- directions
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

    Memory: none per pass beyond an 88-byte-per-weight table; a cached int32 per tile.
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
            prepared = [
                (key, np.asarray([_scale_of(scale, int(i)) for i in idx], dtype=np.float64))
                for key, scale in terms
            ] or [(DirectionKey(0, 0, 0), np.zeros(len(idx)))]
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
        seeds = torch.tensor([seed & _MASK32, seed >> 32], dtype=torch.int64, device=like.device)
        kernel = _kernel("factor", like.device)
        grid = (-(-rows // FACTOR_ROWS),)

        def run(fast: bool) -> Any:
            return kernel[grid](
                out,
                seeds,
                rows,
                RANK=self.rank,
                FAST=fast,
                WIDE=WIDE_MUL,
                ROUNDS=self.rounds,
                ROWS=FACTOR_ROWS,
            )

        _launch_with_fallback(run, fast=self.fast_math and like.device.type == "cuda")
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


# ---------------------------------------------------------------------------------------- LOZO
class FusedLOZO(FusedStep, LOZO):
    """LOZO on the fused path: 2 forwards + 2 passes per central step while guarded (3 otherwise).

    The rule of :class:`~lightning_zobi.zo.optim.LOZO` ("Enhancing Zeroth-order Fine-tuning for
    Language Models with Low-rank Structures", Chen et al., ICLR 2025, arXiv 2410.07698):
    ``ĝ = g·U Vᵀ`` on 2-D weights (``/r`` with ``unbiased=True``), ``g·z`` elsewhere, ``θ ← (1 − lr·wd)·θ − lr·ĝ``, on
    :class:`FusedLowRankDirections`, with the step of :class:`~lightning_zobi.zo.fused.FusedStep`::

        (θ + εZ_t already applied)  L+ ;  θ −= 2εZ_t  L- ;
        θ ← (1 − lr·wd)(θ + εZ_t) − lr·g·Z_t + εZ_{t+1}       (one pass: two directions)

    ``Z_t`` and ``Z_{t+1}`` share ``V`` inside a lazy period, so that pass sums them in the factor
    space. A pass is one tile launch per group of 2-D weights (per dtype, split by alignment and
    column stride) plus one dense launch per dtype for the other parameters; no Python loop over
    parameters launches anything. The directions' values differ from :class:`LOZO`'s (Philox, not
    ``torch.randn``), the algorithm does not.

    Args:
        rank, nu: as :class:`~lightning_zobi.zo.optim.LOZO` (``rank`` at most 16).
        rounds, fast_math: see :class:`~lightning_zobi.zo.fused.FusedGaussianDirections`.
        lookahead: ``None`` (fold while guarded), ``True``, ``False``; see
            :class:`~lightning_zobi.zo.fused.FusedStep`.
        Others as :class:`~lightning_zobi.zo.optim.ZOOptimizer`.

    Memory: none kept; no factor or direction tensor at any time.
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
        rounds: int = 10,
        fast_math: bool = True,
        lookahead: bool | None = None,
        **kwargs: Any,
    ) -> None:
        _reject_directions(type(self).__name__, kwargs)
        if not HAS_TRITON:
            raise RuntimeError("FusedLOZO needs Triton (`pip install triton`); use LOZO (the torch path).")
        self._init_lookahead(lookahead)
        directions = FusedLowRankDirections(rank, nu, rounds, fast_math)
        super().__init__(params, lr, eps, weight_decay, rank=rank, nu=nu, **kwargs)
        self.directions = directions
        for p in self._params():
            FusedLowRankDirections.check(p)

    @property
    def fused_directions(self) -> FusedLowRankDirections:
        assert isinstance(self.directions, FusedLowRankDirections)
        return self.directions

    def _grad_scale(self) -> np.ndarray:
        """:meth:`LOZO.matrix_scale` per parameter: 1 (the LOZO code), ``1/r`` on ``U Vᵀ`` with ``unbiased=True``."""
        return np.asarray(
            [self.matrix_scale(p) if p.dim() == 2 else 1.0 for p in self._params()], dtype=np.float64
        )


__all__ = ["FusedLOZO", "FusedLowRankDirections", "u_seeds", "v_seeds"]
