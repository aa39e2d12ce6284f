"""The dense fused kernel: ``θ ← β·θ + Σ α·z`` over many tensors in one launch, ``z`` drawn in registers.

One program covers ``8·SUB`` elements of one tensor; a launch covers every tensor of one dtype
(:class:`_Group`: offsets from the first tensor's storage and a block → tensor map). Element ``e``
of a tensor takes normal ``(e mod 4096) // 512`` of Philox counter
``c = 512·(e // 4096) + e mod 512`` (:func:`~lightning_zobi.zo.fused.philox.philox_normals8`), keyed
by the tensor's seed: the direction depends only on (seed, element position), never on the launch
or the other tensors; :attr:`FusedGaussianDirections.FORMAT
<lightning_zobi.zo.fused.directions.FusedGaussianDirections.FORMAT>` versions that mapping. Up to
two directions per launch (``NSTREAM``); the same kernel writes out of place (``OUT``, the exact
path's materialisation), projects onto ``θ ≥ 0`` (``NONNEG``, QZO's scales) and rounds bf16/fp16
stochastically (``SR``, :mod:`~lightning_zobi.zo.fused.rounding`).

Speed (H200, bf16, ``benchmarks/zo_step.py``): a one-direction pass is faster than a plain
read+write pass (7.5 vs 9.5 ms over 6.7 B parameters), a two-direction pass 1.2× one (11.7 ms).
:data:`NUM_WARPS` and :data:`WIDE_MUL` are speed knobs only (the benchmarks set them here);
:func:`_launch` drops fast math or the alignment hints, once and with a warning, where a Triton
rejects them.

Memory: per launch a table of 9 int64 per tensor; a cached int32 per 4096 elements.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_zobi.zo.fused.philox import philox_normals8
from lightning_zobi.zo.fused.rounding import round_bf16_rne, sr_hash, sr_mode, stochastic_round
from lightning_zobi.zo.fused.runtime import compiled_kernel, tl
from lightning_zobi.zo.fused.tables import f64_bits, split_seeds

SUB = 512
"""Philox counters per program; a program covers ``8 * SUB`` elements (part of the direction format)."""
BLOCK = 8 * SUB
NUM_WARPS = 4
"""Warps per program (a speed knob only: values do not depend on it; 4 beat 8 by 25 % on an H200)."""
WIDE_MUL = True
"""Philox products through one 32×32→64 multiply (a speed knob only: same values)."""
_ALIGNED_OK = True
_FAST_OK = True


def _zo_axpby_src(
    x0_ptr,
    out0_ptr,
    block_tensor_ptr,
    meta_ptr,
    scal_ptr,
    NSTREAM: tl.constexpr,
    LOAD_X: tl.constexpr,
    F64: tl.constexpr,
    CDT: tl.constexpr,
    ALIGNED: tl.constexpr,
    RNE_BF16: tl.constexpr,
    FAST: tl.constexpr,
    WIDE: tl.constexpr,
    NONNEG: tl.constexpr,
    OUT: tl.constexpr,
    SR: tl.constexpr,
    ROUNDS: tl.constexpr,
    SUB: tl.constexpr,
):
    """``x ← β·x + α_a·z(seed_a) [+ α_b·z(seed_b)]`` (NSTREAM directions) over many tensors, one program per 8·SUB elements.

    ``NONNEG`` projects the result onto ``x ≥ 0`` (QZO's scales) in the same pass. ``OUT`` writes
    the result to ``out0`` (at the tensor's out offset) instead of back into ``x``: the exact
    path's materialisation ``θ + Σ α·z``, computed in float32 and rounded once. ``SR`` (1 bf16,
    2 fp16) rounds the result stochastically with bits hashed from the tensor's rounding seed and
    the element's position. Where ``Σ α·z`` is exactly 0 the result is ``β·x`` (so ``−0.0`` stays).

    ``meta[t] = (offset of tensor t from x0 in elements, numel, first program, offset in out0)``;
    ``scal[t] = (seed_a lo, seed_a hi, seed_b lo, seed_b hi, α_a, α_b, β, rounding seed lo, hi)``
    (floats as float64 bits). Element ``blk·8·SUB + j·SUB + i`` of a tensor takes normal ``j`` of
    counter ``blk·SUB + i``.
    """
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid).to(tl.int64)
    base = tl.load(meta_ptr + t * 4)
    n = tl.load(meta_ptr + t * 4 + 1)
    blk = pid - tl.load(meta_ptr + t * 4 + 2)
    obase = tl.load(meta_ptr + t * 4 + 3)
    if ALIGNED:
        base = tl.multiple_of(base, 8)
        obase = tl.multiple_of(obase, 8)
        n = tl.multiple_of(n, 8)
    i = tl.arange(0, SUB)
    ctr = blk * SUB + i
    c0 = ctr.to(tl.uint32)
    c1 = (ctr >> 32).to(tl.uint32)
    acc0 = tl.full([SUB], 0, dtype=CDT)
    acc1 = tl.full([SUB], 0, dtype=CDT)
    acc2 = tl.full([SUB], 0, dtype=CDT)
    acc3 = tl.full([SUB], 0, dtype=CDT)
    acc4 = tl.full([SUB], 0, dtype=CDT)
    acc5 = tl.full([SUB], 0, dtype=CDT)
    acc6 = tl.full([SUB], 0, dtype=CDT)
    acc7 = tl.full([SUB], 0, dtype=CDT)
    for s in tl.static_range(NSTREAM):
        k0 = tl.load(scal_ptr + t * 9 + 2 * s).to(tl.uint32)
        k1 = tl.load(scal_ptr + t * 9 + 2 * s + 1).to(tl.uint32)
        alpha = tl.load(scal_ptr + t * 9 + 4 + s).to(tl.float64, bitcast=True)
        z0, z1, z2, z3, z4, z5, z6, z7 = philox_normals8(c0, c1, k0, k1, ROUNDS, FAST, WIDE)
        if F64:
            a = alpha
        else:
            a = alpha.to(tl.float32)
        acc0 = acc0 + a * z0.to(CDT)
        acc1 = acc1 + a * z1.to(CDT)
        acc2 = acc2 + a * z2.to(CDT)
        acc3 = acc3 + a * z3.to(CDT)
        acc4 = acc4 + a * z4.to(CDT)
        acc5 = acc5 + a * z5.to(CDT)
        acc6 = acc6 + a * z6.to(CDT)
        acc7 = acc7 + a * z7.to(CDT)
    beta = tl.load(scal_ptr + t * 9 + 6).to(tl.float64, bitcast=True)
    if not F64:
        beta = beta.to(tl.float32)
    r0 = tl.load(scal_ptr + t * 9 + 7).to(tl.uint32)
    r1 = tl.load(scal_ptr + t * 9 + 8).to(tl.uint32)
    start = base + blk * (8 * SUB)
    ostart = obase + blk * (8 * SUB)
    for j in tl.static_range(8):
        if j == 0:
            acc = acc0
        elif j == 1:
            acc = acc1
        elif j == 2:
            acc = acc2
        elif j == 3:
            acc = acc3
        elif j == 4:
            acc = acc4
        elif j == 5:
            acc = acc5
        elif j == 6:
            acc = acc6
        else:
            acc = acc7
        local = blk * (8 * SUB) + j * SUB + i
        mask = local < n
        ptrs = x0_ptr + (start + j * SUB) + i
        if LOAD_X:
            x = tl.load(ptrs, mask=mask, other=0.0).to(CDT)
            out = tl.where(acc == 0.0, beta * x, beta * x + acc)
        else:
            out = acc
        if NONNEG:
            out = tl.maximum(out, 0.0)
        if OUT:
            ptrs = out0_ptr + (ostart + j * SUB) + i
        if SR != 0:
            bits = sr_hash(local.to(tl.uint32), (local >> 32).to(tl.uint32), r0, r1)
            tl.store(ptrs, stochastic_round(out, bits, SR), mask=mask)
        else:
            if RNE_BF16:
                out = round_bf16_rne(out)
            tl.store(ptrs, out.to(x0_ptr.dtype.element_ty), mask=mask)


class _Group:
    """Static launch data of some same-dtype, same-device contiguous tensors (cached per pass target)."""

    def __init__(self, tensors: list[Tensor], out_offsets: Sequence[int] | None = None) -> None:
        x0 = tensors[0]
        self.device, self.dtype = x0.device, x0.dtype
        esize = x0.element_size()
        offsets, numels, firsts, blocks = [], [], [], []
        first = 0
        for t in tensors:
            delta = t.data_ptr() - x0.data_ptr()
            if delta % esize:
                raise AssertionError("tensors of one dtype must be element-aligned")
            nb = -(-t.numel() // BLOCK)
            offsets.append(delta // esize)
            numels.append(t.numel())
            firsts.append(first)
            blocks.append(nb)
            first += nb
        self.num_blocks = first
        outs = offsets if out_offsets is None else [int(o) for o in out_offsets]
        self.aligned = all(o % 8 == 0 for o in offsets + outs) and all(n % 8 == 0 for n in numels)
        meta = torch.tensor([offsets, numels, firsts, outs], dtype=torch.int64).T.contiguous()
        block_tensor = torch.repeat_interleave(
            torch.arange(len(tensors), dtype=torch.int32), torch.tensor(blocks, dtype=torch.int64)
        )
        self.meta = meta.to(self.device)
        self.block_tensor = block_tensor.to(self.device)
        self.x0 = x0
        self.tensors = tensors


def _launch(
    group: _Group,
    seeds_a: np.ndarray,
    alpha_a: np.ndarray,
    seeds_b: np.ndarray | None,
    alpha_b: np.ndarray | None,
    beta: np.ndarray,
    load_x: bool,
    rounds: int,
    fast: bool = True,
    nonnegative: bool = False,
    sr_seeds: np.ndarray | None = None,
    out: Tensor | None = None,
) -> Any:
    """Launch the kernel over ``group`` (per-tensor seeds and coefficients); returns Triton's launch result.

    ``sr_seeds`` (one rounding seed per tensor) turns on stochastic rounding for bf16/fp16 groups;
    ``out`` (a flat tensor of the group's dtype) receives the result at the group's out offsets.
    """
    n = len(seeds_a)
    scal = np.zeros((n, 9), dtype=np.int64)
    scal[:, 0], scal[:, 1] = split_seeds(seeds_a)
    if seeds_b is not None:
        scal[:, 2], scal[:, 3] = split_seeds(seeds_b)
        scal[:, 5] = f64_bits(alpha_b)
    scal[:, 4] = f64_bits(alpha_a)
    scal[:, 6] = f64_bits(beta)
    sr = sr_mode(group.dtype) if sr_seeds is not None and out is None else 0
    if sr:
        scal[:, 7], scal[:, 8] = split_seeds(sr_seeds)
    host = torch.from_numpy(scal)
    if group.device.type == "cuda":  # pinned + async: no host-device synchronisation per pass
        scal_t = host.pin_memory().to(group.device, non_blocking=True)
    else:
        scal_t = host
    global _ALIGNED_OK, _FAST_OK
    kernel = compiled_kernel(_zo_axpby_src, group.device, "use fused=False for the torch path")
    aligned = group.aligned and _ALIGNED_OK
    fast = fast and _FAST_OK and group.device.type == "cuda"
    while True:  # at most three tries: each failure drops one option or re-raises
        try:
            return kernel[(group.num_blocks,)](
                group.x0,
                group.x0 if out is None else out,
                group.block_tensor,
                group.meta,
                scal_t,
                NSTREAM=1 if seeds_b is None else 2,
                LOAD_X=load_x,
                F64=group.dtype == torch.float64,
                CDT=tl.float64 if group.dtype == torch.float64 else tl.float32,
                ALIGNED=aligned,
                RNE_BF16=group.dtype == torch.bfloat16 and group.device.type != "cuda",
                FAST=fast,
                WIDE=WIDE_MUL,
                NONNEG=nonnegative,
                OUT=out is not None,
                SR=sr,
                ROUNDS=rounds,
                SUB=SUB,
                num_warps=NUM_WARPS,
            )
        except Exception as err:  # a Triton rejecting the hints or the inline PTX: drop them, once each
            if fast:
                warnings.warn(f"fused ZO kernel: fast math failed ({err!r}); using exact math.", stacklevel=2)
                _FAST_OK = fast = False
            elif aligned:
                warnings.warn(f"fused ZO kernel: alignment hints rejected ({err!r}); dropped.", stacklevel=2)
                _ALIGNED_OK = aligned = False
            else:
                raise


__all__ = ["BLOCK", "NUM_WARPS", "SUB", "WIDE_MUL"]
