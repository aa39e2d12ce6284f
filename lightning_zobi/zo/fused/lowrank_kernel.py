"""The low-rank fused kernels: ``X ← β·X + Σ α·U Vᵀ`` tile by tile with ``U`` and ``V`` drawn in registers.

One Triton launch per pass covers *all* 2-D weights of a dtype (split only by alignment and
column stride, which change the compiled code: :class:`_TileGroup`): each program owns one
``TILE_M×TILE_N`` tile of one weight, regenerates the ``TILE_M·r`` entries of ``U`` and the
``TILE_N·r`` entries of ``V`` it needs from Philox
(:func:`~lightning_zobi.zo.fused.philox.philox_normals`), and adds up to two directions as ``r``
broadcast outer products, so ``U``, ``V`` and ``Z`` never exist in memory and a pass is one read
and one write of the weights. Entry ``(i, k)`` of a factor is word ``k mod 4`` of the Philox block
at counter ``(i, k // 4, 0, 0)``: it depends only on the seed and the position, never on the tile
size or the launch. :func:`launch_factor` writes a factor out (for rules and tests that need it).

Cost of a tile: ``NSTREAM·ceil(r/4)·(TILE_M + TILE_N)`` Philox blocks (192 for one stream at
r ≤ 4 with the default 64×128 tile: one per 43 elements, where the dense fused pass needs one
per 8) and ``r`` multiply-adds per element per stream. Two streams that share ``V`` (two
queries of one lazy period) are summed in the factor space, ``(α_a·u_a + α_b·u_b)·vᵀ``: ``r``
multiply-adds per element and one ``V`` for both. On CUDA the factor vectors are "pinned"
(:func:`_pin_src`) so that each entry is drawn by one thread and shared through a few KiB of
shared memory. Static SASS counts (Triton 3.9, sm_90, bf16, one stream): 12, 14, 18, 25 and 40
instructions per element at r = 1, 2, 4, 8, 16, no spills; an H200 streams bf16 at roughly 28
per element, so up to r ≈ 8 a pass should stay memory-bound (counts from compiling without a
GPU). On CPU the same kernels run in Triton's interpreter (slow: for tests).

Memory: per launch a table of 13 int64 per weight; a cached int32 per tile (``1/8192`` of the
weight's elements).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_zobi.zo.fused.philox import philox_normals
from lightning_zobi.zo.fused.rounding import round_bf16_rne, sr_hash, stochastic_round
from lightning_zobi.zo.fused.runtime import HAS_TRITON, compiled_kernel, tl

if HAS_TRITON:
    from lightning_zobi.zo.fused.runtime import _DeviceFunction

TILE_M = 64
"""Rows per program, half for float64 (a speed knob only: the values do not depend on it)."""
TILE_N = 128
"""Columns per program (a speed knob only)."""
NUM_WARPS = 4
"""Warps per program of the tile kernel (a speed knob only)."""
WIDE_MUL = True
"""Philox products through one 32×32→64 multiply (a speed knob only: the same values)."""
FACTOR_ROWS = 256
"""Factor rows per program of the materialising kernel (:func:`launch_factor`)."""
_MASK32 = 0xFFFFFFFF
_DROPPED: set[str] = set()
"""Compile options Triton rejected once on this machine (``fast``, ``pin``, ``aligned``): not tried again."""


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

        ``sr``: stochastic rounding mode (:func:`~lightning_zobi.zo.fused.rounding.sr_mode`; 0 = nearest);
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


def launch_factor(out: Tensor, seed: int, rank: int, rounds: int, fast_math: bool) -> None:
    """Write into ``out`` (float32, ``rows×rank``, row-major) the factor the tile kernel regenerates under ``seed``."""
    rows = out.shape[0]
    seeds = torch.tensor([seed & _MASK32, seed >> 32], dtype=torch.int64, device=out.device)
    kernel = _kernel("factor", out.device)
    grid = (-(-rows // FACTOR_ROWS),)

    def run(fast: bool) -> Any:
        return kernel[grid](
            out,
            seeds,
            rows,
            RANK=rank,
            FAST=fast,
            WIDE=WIDE_MUL,
            ROUNDS=rounds,
            ROWS=FACTOR_ROWS,
        )

    _launch_with_fallback(run, fast=fast_math and out.device.type == "cuda")


__all__ = ["FACTOR_ROWS", "NUM_WARPS", "TILE_M", "TILE_N", "WIDE_MUL", "launch_factor"]
