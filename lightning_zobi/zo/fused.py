"""Fused ZO perturbation: Gaussian directions drawn inside a Triton kernel and applied in place.

The torch path (:class:`~lightning_zobi.zo.directions.GaussianDirections`) regenerates ``z`` for
one tensor with ``torch.randn`` and then adds it: the direction is written to memory and read
back, and every parameter tensor costs a few kernel launches. Here one Triton kernel per pass
(over *all* parameter tensors of a dtype at once) draws ``z`` from a counter-based Philox-4x32
generator keyed by the tensor's seed and the element's position, and computes
``θ ← β·θ + a·z_a (+ b·z_b)`` in registers: ``z`` never exists in memory, a pass is one read and
one write of the parameters. Two directions in one pass let :class:`FusedZOSGD` fold the restore,
the update *and* the next step's ``+εz`` into a single pass, so a central-difference ZO-SGD step
costs 2 forwards + 2 parameter passes (MeZO's code: 4 passes, each with a ``torch.normal``).

Randomness: Philox-4x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) with
``rounds`` rounds (10, as cuRAND's ``Philox4_32_10``), key = the 64-bit seed that
``DirectionKey.seed_for(index)`` derives (:func:`~lightning_zobi.zo.directions.derive_seed`, as the
torch path), counter = (low and high 32 bits of ``c``, 0, 0). Its four 32-bit words are cut into
eight 16-bit uniforms in (0, 1), which Box-Muller turns into eight standard normals (through the
GPU's approximate ``lg2/sqrt/sin/cos`` by default): half the Philox work per normal of the usual
four-per-call, which is what bounds a two-direction pass. The uniforms' 2^-16 grid caps
``|z|`` at 4.85 (a true normal passes it once in ~800 000 draws) and moves no moment measurably.
Element ``e`` of a tensor takes normal ``(e mod 4096) // 512`` of counter
``c = 512·(e // 4096) + e mod 512``: the direction depends only on (seed, element position),
never on the launch or the other tensors. The values differ from ``torch.randn``'s, so switching
path mid-run changes the directions (not the algorithm); within a path they are bit-reproducible.

Exact perturbation (the default, ``perturbation="exact"``): θ is never written by a perturbation.
:class:`FusedJustInTime` materialises ``θ + Σ s·z`` out of place with the same kernel (``OUT``: the
same Philox directions, float32 arithmetic, one rounding into a scratch run of a few tensors, one
launch per run) while a module's forward reads it, and the update pass is the only write of θ; for
bf16/fp16 it rounds stochastically in the kernel (``SR``: bits hashed from a per-tensor seed
``derive_seed(run seed, step, 0x5352, index)`` and the element's position, so a resumed run rounds
the same), and a step that changes nothing launches nothing (lr = 0 is bit-identical, ``−0.0``
included). A central step is then 2 forwards + 2 materialisations + 1 update pass (H200, bf16,
Llama-7B shape: 1.31× two forwards, peak 1.001× inference; in place with the look-ahead fold 1.23×).
``perturbation="inplace"`` keeps MeZO's in-place passes and the look-ahead fold described above.

On CPU the same kernel runs in Triton's interpreter (slow, for tests); ``fused=None`` picks the
fused path only for CUDA parameters.

Speed (H200, bf16, ``benchmarks/zo_step.py``): a one-direction pass is faster than a plain
read+write pass (7.5 vs 9.5 ms over 6.7 B parameters), a two-direction pass 1.2× one (11.7 ms). A
Llama-7B-shaped step takes 1.17× two forwards (the floor of 2 forwards + 2 passes is 1.16×) against
1.66× on the torch path and 2.50× for a MeZO-style loop; see ``benchmarks/RESULTS.md``.

Memory: no direction tensor at all; per pass a table of 7 int64 per tensor, and a cached map of
one int32 per 4096 parameter elements (0.05 % of the parameter bytes in bf16).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_zobi.zo.base import _ROUNDING_SALT, _reject_directions
from lightning_zobi.zo.directions import DirectionKey, Directions, _splitmix64, derive_seed
from lightning_zobi.zo.estimators import Closure, Estimate
from lightning_zobi.zo.perturbation import JustInTimePerturbation, Perturber
from lightning_zobi.zo.rules.sgd import ZOSGD

try:  # Triton is optional: the torch path needs none of it.
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

SUB = 512
"""Philox counters per program; a program covers ``8 * SUB`` elements (part of the direction format)."""
BLOCK = 8 * SUB
NUM_WARPS = 4
"""Warps per program (a speed knob only: values do not depend on it; 4 beat 8 by 25 % on an H200)."""
WIDE_MUL = True
"""Philox products through one 32×32→64 multiply (a speed knob only: same values)."""
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
_ALIGNED_OK = True
_FAST_OK = True


# ---------------------------------------------------------------------------------------- kernel
if HAS_TRITON:

    class _DeviceFunction(JITFunction):
        """A ``@triton.jit`` device function that Triton's CPU interpreter can call too.

        Compiled kernels inline it as any ``JITFunction``; an interpreted kernel calls it as a
        Python function (``JITFunction.__call__`` refuses that), so one source serves both.
        """

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            from triton.runtime.interpreter import InterpretedFunction

            return InterpretedFunction(self.fn)(*args, **kwargs)


def _philox4x32_src(c0, c1, k0, k1, ROUNDS: tl.constexpr, WIDE: tl.constexpr):
    """Philox-4x32-``ROUNDS`` (Salmon et al., SC'11) of counter ``(c0, c1, 0, 0)`` under key ``(k0, k1)``: 4 words.

    ``WIDE`` takes each round's high and low product words from one 32×32→64 multiply instead of
    ``umulhi`` plus a low multiply (the same values; ~4 % faster on an H200).
    """
    r0 = c0
    r1 = c1
    r2 = c0 * 0
    r3 = c0 * 0
    for _ in tl.static_range(ROUNDS):
        p0 = r0
        p2 = r2
        if WIDE:
            w2 = p2.to(tl.uint64) * 0xCD9E8D57
            w0 = p0.to(tl.uint64) * 0xD2511F53
            r0 = (w2 >> 32).to(tl.uint32) ^ r1 ^ k0
            r2 = (w0 >> 32).to(tl.uint32) ^ r3 ^ k1
            r1 = w2.to(tl.uint32)
            r3 = w0.to(tl.uint32)
        else:
            r0 = tl.umulhi(p2, 0xCD9E8D57) ^ r1 ^ k0
            r2 = tl.umulhi(p0, 0xD2511F53) ^ r3 ^ k1
            r1 = p2 * 0xCD9E8D57
            r3 = p0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return r0, r1, r2, r3


def _box_muller_src(u_r, u_t, FAST: tl.constexpr):
    """Two independent standard normals from two uniforms strictly inside (0, 1).

    ``FAST``: the GPU's ``lg2/sqrt/sin/cos.approx`` (CUDA only, ~2^-21 error, one MUFU op each)
    instead of libdevice's exact functions; the angle is kept in [-π, π), their accurate range.
    """
    theta = 6.283185307179586 * (u_t - 0.5)
    if FAST:
        lg = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [u_r], tl.float32, True, 1)
        rad = tl.inline_asm_elementwise(
            "sqrt.approx.ftz.f32 $0, $1;", "=f,f", [-1.3862943611198906 * lg], tl.float32, True, 1
        )
        c = tl.inline_asm_elementwise("cos.approx.ftz.f32 $0, $1;", "=f,f", [theta], tl.float32, True, 1)
        s = tl.inline_asm_elementwise("sin.approx.ftz.f32 $0, $1;", "=f,f", [theta], tl.float32, True, 1)
    else:
        rad = tl.sqrt(-2.0 * tl.log(u_r))
        c = tl.cos(theta)
        s = tl.sin(theta)
    return rad * c, rad * s


philox4x32 = _DeviceFunction(_philox4x32_src) if HAS_TRITON else None
box_muller = _DeviceFunction(_box_muller_src) if HAS_TRITON else None


def _philox_normals_src(c0, c1, k0, k1, ROUNDS: tl.constexpr, FAST: tl.constexpr, WIDE: tl.constexpr):
    """Four float32 standard normals per counter: Box-Muller on the Philox words as 24-bit uniforms.

    Full-precision draws for small tensors (e.g. low-rank factors); the dense kernel uses
    :func:`philox_normals8`.
    """
    r0, r1, r2, r3 = philox4x32(c0, c1, k0, k1, ROUNDS, WIDE)
    u0 = ((r0 >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    u1 = ((r1 >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    u2 = ((r2 >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    u3 = ((r3 >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    z0, z1 = box_muller(u0, u1, FAST)
    z2, z3 = box_muller(u2, u3, FAST)
    return z0, z1, z2, z3


def _philox_normals8_src(c0, c1, k0, k1, ROUNDS: tl.constexpr, FAST: tl.constexpr, WIDE: tl.constexpr):
    """Eight float32 standard normals per counter: Box-Muller on the 16-bit halves of the Philox words.

    Half the Philox work per normal of :func:`philox_normals`; the price is uniforms on a 2^-16
    grid: ``|z| ≤ 4.85`` (a true normal exceeds that once in 800 000 draws) and the values sit
    on a fine grid, which moves no moment measurably and nothing a perturbation direction needs.
    Pairs (radius, angle) = (hi r0, hi r1), (lo r0, lo r1), (hi r2, hi r3), (lo r2, lo r3).
    """
    r0, r1, r2, r3 = philox4x32(c0, c1, k0, k1, ROUNDS, WIDE)
    h0 = ((r0 >> 16).to(tl.float32) + 0.5) * 1.52587890625e-05
    l0 = ((r0 & 0xFFFF).to(tl.float32) + 0.5) * 1.52587890625e-05
    h1 = ((r1 >> 16).to(tl.float32) + 0.5) * 1.52587890625e-05
    l1 = ((r1 & 0xFFFF).to(tl.float32) + 0.5) * 1.52587890625e-05
    h2 = ((r2 >> 16).to(tl.float32) + 0.5) * 1.52587890625e-05
    l2 = ((r2 & 0xFFFF).to(tl.float32) + 0.5) * 1.52587890625e-05
    h3 = ((r3 >> 16).to(tl.float32) + 0.5) * 1.52587890625e-05
    l3 = ((r3 & 0xFFFF).to(tl.float32) + 0.5) * 1.52587890625e-05
    z0, z1 = box_muller(h0, h1, FAST)
    z2, z3 = box_muller(l0, l1, FAST)
    z4, z5 = box_muller(h2, h3, FAST)
    z6, z7 = box_muller(l2, l3, FAST)
    return z0, z1, z2, z3, z4, z5, z6, z7


def _round_bf16_rne_src(x):
    """float32 ``x`` rounded to the nearest bf16 (ties to even), still as float32.

    Triton's CPU interpreter truncates float32 → bf16 where CUDA rounds to nearest even; the
    kernels round first under the interpreter, so both give the same bf16 values.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


round_bf16_rne = _DeviceFunction(_round_bf16_rne_src) if HAS_TRITON else None


def _sr_hash_src(a, b, k0, k1):
    """32 well-mixed bits of (position ``a``, ``b``; key ``k0``, ``k1``), all uint32: the uniforms of stochastic rounding.

    Two rounds of the "lowbias32" mixer (C. Wellons' hash-prospector), keyed by the rounding seed:
    ~12 integer operations per element, where a Philox call per element would make the update
    pass compute-bound. Rounding needs uniform, independent bits, not a cryptographic stream.
    """
    h = a ^ k0
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    h = h ^ (h >> 16)
    h = h ^ b ^ k1
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    h = h ^ (h >> 16)
    return h


def _stochastic_round_src(v, h, MODE: tl.constexpr):
    """float32 ``v`` stochastically rounded to bf16 (``MODE`` 1) or fp16 (``MODE`` 2) with random bits ``h`` (uint32).

    bf16: add 16 random bits below bf16's last mantissa bit and truncate: rounds away from zero
    with probability ``(|v| − |lo|)/ulp``, exactly (fp32 values between two bf16 neighbours are
    evenly spaced); a representable ``v`` (lr = 0) and ±0 keep their bits. fp16: between the
    neighbours ``lo`` (toward zero) and ``hi``, ``hi`` with probability ``(v − lo)/(hi − lo)``
    read against a 16-bit uniform (bias below 2^-16 ulp); a representable ``v`` is kept exactly.
    Returns the rounded value in the target dtype.
    """
    if MODE == 1:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (h >> 16)) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        n = v.to(tl.float16)
        nb = n.to(tl.int16, bitcast=True)
        away = tl.abs(n.to(tl.float32)) > tl.abs(v)
        lo = tl.where(away, nb - 1, nb)
        hi = lo + 1
        lo32 = lo.to(tl.float16, bitcast=True).to(tl.float32)
        hi32 = hi.to(tl.float16, bitcast=True).to(tl.float32)
        u = (h >> 16).to(tl.float32) * 1.52587890625e-05
        out = tl.where(u < (v - lo32) / (hi32 - lo32), hi, lo).to(tl.float16, bitcast=True)
    return out


sr_hash = _DeviceFunction(_sr_hash_src) if HAS_TRITON else None
stochastic_round = _DeviceFunction(_stochastic_round_src) if HAS_TRITON else None
"""Device function: ``stochastic_round(v, bits, MODE)`` (1: bf16, 2: fp16), shared by the dense and low-rank kernels."""


def sr_mode(dtype: torch.dtype) -> int:
    """The kernels' ``SR`` constant for a parameter dtype: 1 bf16, 2 fp16, 0 (round to nearest) otherwise."""
    return {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 0)


philox_normals = _DeviceFunction(_philox_normals_src) if HAS_TRITON else None
"""Device function: 4 normals per counter (``philox_normals(c0, c1, k0, k1, ROUNDS, FAST, WIDE)``)."""
philox_normals8 = _DeviceFunction(_philox_normals8_src) if HAS_TRITON else None
"""Device function: 8 normals per counter on 16-bit uniforms (the dense direction format)."""


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


_KERNELS: dict[tuple[Callable, str], Any] = {}


def compiled_kernel(source: Callable, device: torch.device, fallback: str) -> Any:
    """``source`` compiled by ``triton.jit`` for CUDA, or run by Triton's interpreter for CPU tensors (cached).

    ``fallback`` names the torch-path alternative in the error raised when Triton is missing.
    """
    if not HAS_TRITON:
        raise RuntimeError(f"The fused ZO path needs Triton (`pip install triton`); {fallback}.")
    kind = "cuda" if device.type == "cuda" else "interp"
    if (source, kind) not in _KERNELS:
        if kind == "cuda":
            _KERNELS[source, kind] = triton.jit(source)
        else:
            from triton.runtime.interpreter import InterpretedFunction

            _KERNELS[source, kind] = InterpretedFunction(source)
    return _KERNELS[source, kind]


def check_dtype(param: Tensor, fallback: str) -> None:
    """Refuse a parameter dtype the fused kernels cannot update, naming the torch-path ``fallback``."""
    if param.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"The fused ZO path supports {[str(d) for d in SUPPORTED_DTYPES]}, got a {param.dtype} parameter; "
            f"{fallback}."
        )


def fused_available(device: torch.device | str) -> bool:
    """True where the fused kernels run: CUDA devices with Triton (CPU only via the slow interpreter)."""
    device = torch.device(device)
    return HAS_TRITON and device.type == "cuda" and torch.cuda.is_available()


# ---------------------------------------------------------------------------------------- seeds
_SM_ADD, _SM_M1, _SM_M2 = (
    np.uint64(0x9E3779B97F4A7C15),
    np.uint64(0xBF58476D1CE4E5B9),
    np.uint64(0x94D049BB133111EB),
)
_SM_S30, _SM_S27, _SM_S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 over uint64 (wrapping), bit-identical to ``directions._splitmix64``."""
    x = np.atleast_1d(x) + _SM_ADD  # array arithmetic wraps modulo 2**64 silently
    x = (x ^ (x >> _SM_S30)) * _SM_M1
    x = (x ^ (x >> _SM_S27)) * _SM_M2
    return x ^ (x >> _SM_S31)


def derive_seeds(prefix: Sequence[int], indices: Sequence[int] | np.ndarray, *salt: int) -> np.ndarray:
    """``derive_seed(*prefix, i, *salt)`` for every ``i`` at once (uint64), bit-identical to it.

    ``derive_seed`` folds its parts left to right, so the prefix is hashed once (cached) and only
    the last rounds run per index, vectorised: ~300 seeds cost microseconds of host time instead
    of a millisecond.
    """
    h = np.uint64(_prefix_state(*prefix))
    x = _splitmix64_np(h ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))
    for part in salt:
        x = _splitmix64_np(x ^ np.uint64(int(part) & _MASK64))
    return x & np.uint64(_MASK63)


def tensor_seeds(key: DirectionKey, indices: Sequence[int]) -> np.ndarray:
    """``key.seed_for(i)`` for every ``i`` at once (uint64), as the torch path derives them."""
    return derive_seeds((key.run_seed, key.step, key.query), indices)


@functools.lru_cache(maxsize=64)
def _prefix_state(*parts: int) -> int:
    """The unmasked 64-bit state of ``derive_seed(*parts, ...)`` after ``parts`` (checked against it)."""
    h = 0x6A09E667F3BCC908
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    if h & _MASK63 != derive_seed(*parts):
        raise AssertionError("tensor_seeds is out of sync with directions.derive_seed")
    return h


# ---------------------------------------------------------------------------------------- launch
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


def f64_bits(values: np.ndarray) -> np.ndarray:
    """Float64 values as their int64 bit patterns (the kernels' coefficient tables bitcast them back)."""
    return np.ascontiguousarray(values, dtype=np.float64).view(np.int64)


def split_seeds(seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Low and high 32-bit words of uint64 seeds, as int64 (a Philox key)."""
    return (seeds & np.uint64(_MASK32)).astype(np.int64), (seeds >> np.uint64(32)).astype(np.int64)


def prepare_terms(
    n: int, terms: Sequence[Term], beta: float | Sequence[float], indices: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray, list[tuple[DirectionKey, np.ndarray]]]:
    """``(indices, β per parameter, [(key, α per parameter)])`` of an ``apply_`` over ``n`` parameters.

    A float or one float per parameter is accepted for ``α`` and ``β``; no term becomes one zero
    term, so ``β`` alone still makes a pass.
    """
    idx = np.arange(n, dtype=np.int64) if indices is None else np.asarray(list(indices), dtype=np.int64)
    if idx.shape != (n,):
        raise ValueError(f"indices has {idx.size} entries for {n} parameters; give one index per parameter.")

    def per_param(v: float | Sequence[float]) -> np.ndarray:
        return np.ascontiguousarray(np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)))

    prepared = [(key, per_param(alpha)) for key, alpha in terms] or [(DirectionKey(0, 0, 0), np.zeros(n))]
    return idx, per_param(beta), prepared


class PlanCache:
    """Launch plans of parameter lists, keyed by the tensors' identities and rebuilt when ``check`` changes.

    ``check`` is whatever invalidates a plan (data pointers; shapes and strides): a plan holds
    offsets into the tensors' storage, so it must not outlive a move.
    """

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._plans: dict[tuple, tuple[Any, Any]] = {}

    def get(self, params: Sequence[Tensor], check: Any, build: Callable[[], Any]) -> Any:
        ids = tuple(map(id, params))
        hit = self._plans.get(ids)
        if hit is not None and hit[0] == check:
            return hit[1]
        if len(self._plans) >= self.limit:
            self._plans.clear()
        plan = build()
        self._plans[ids] = (check, plan)
        return plan


Term = tuple[DirectionKey, "float | Sequence[float]"]


def _scale_of(scale: Any, index: int) -> float:
    """A term's scale for direction ``index``: one float for every tensor, or one per tensor."""
    return float(scale) if isinstance(scale, (int, float)) else float(scale[index])


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

    Memory: none per pass beyond a 56-byte-per-tensor table; a cached int32 per 4096 elements.
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
        prepared = [
            (key, np.asarray([_scale_of(scale, int(i)) for i in idx], dtype=np.float64))
            for key, scale in terms
        ] or [(DirectionKey(0, 0, 0), np.zeros(len(idx)))]
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


# ---------------------------------------------------------------------------------------- exact path
class FusedJustInTime(JustInTimePerturbation):
    """Exact perturbation with fused materialisation: ``θ + Σ s·z`` for a run of tensors in one launch.

    The :class:`~lightning_zobi.zo.perturbation.JustInTimePerturbation` of the fused rules: θ is
    never written; a module's forward reads ``θ + Σ s·z`` computed by the directions'
    ``materialize_chunk`` (the in-place kernel's directions, float32 arithmetic, one rounding).
    The first forward materialises tensor by tensor and records the order in which the forward
    asks for them; from then on a request materialises the next tensors of that order too (same
    dtype and device, contiguous, at most ``chunk_numel`` elements: by default the largest
    perturbed tensor) into one scratch buffer, so a Llama layer costs one to three launches
    instead of nine and the host's launch overhead stays small next to the forward's own.

    Memory: one scratch buffer of at most ``chunk_numel`` elements live per chunk (freed when the
    chunk's last tensor has been swapped back), plus whatever the base class keeps for tensors
    read outside their module.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        directions: Directions,
        owners: dict[int, nn.Module] | None = None,
        chunk_numel: int | None = None,
    ) -> None:
        super().__init__(params, directions, owners)
        numels = [p.numel() for p in self.params]
        self.chunk_numel = max(numels, default=0) if chunk_numel is None else int(chunk_numel)
        self._order: list[int] | None = None
        self._position: dict[int, int] = {}
        self._seen: list[int] = []
        self._ready: dict[int, Tensor] = {}

    def loss_at(self, closure: Callable[[], Any], terms: Any) -> Any:
        self._ready.clear()
        self._seen = []
        try:
            return super().loss_at(closure, terms)
        finally:
            self._ready.clear()
            if self._order is None and self.verified and self._seen:
                order = list(dict.fromkeys(self._seen))
                self._order, self._position = order, {i: k for k, i in enumerate(order)}

    def _chunk(self, index: int) -> list[int]:
        """``index`` and the tensors the recorded order asks for next (same dtype/device, within the budget)."""
        p = self.params[index]
        if self._order is None or index not in self._position or index in self.whole_forward:
            return [index]
        chunk, total = [index], p.numel()
        for j in self._order[self._position[index] + 1 :]:
            q = self.params[j]
            if j in self._ready or j in self._saved or j in self.whole_forward or j == index:
                continue
            if q.dtype != p.dtype or q.device != p.device or not q.is_contiguous():
                break
            if total + q.numel() > self.chunk_numel:
                break
            chunk.append(j)
            total += q.numel()
        return chunk

    def materialize(self, index: int) -> Tensor:
        ready = self._ready.pop(index, None)
        if ready is not None:
            return ready
        if self._order is None:
            self._seen.append(index)
        p = self.params[index]
        fused = getattr(self.directions, "materialize_chunk", None)
        if fused is None or not p.is_contiguous() or p.numel() == 0:
            return super().materialize(index)
        chunk = self._chunk(index)
        tensors = [self.params[i] for i in chunk]
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += -(-t.numel() // 8) * 8  # 8-element aligned views: vector loads in the next forward
        out = torch.empty(total, dtype=p.dtype, device=p.device)
        if not fused(tensors, chunk, self._terms, out, offsets):
            return super().materialize(index)
        views = [out[o : o + t.numel()].view(t.shape) for o, t in zip(offsets, tensors, strict=True)]
        for i, view in zip(chunk[1:], views[1:], strict=True):
            self._ready[i] = view
        return views[0]


# ---------------------------------------------------------------------------------------- ZO-SGD
class FusedStep:
    """The step of a fused rule: restore + update in one pass, and the look-ahead fold (a mixin).

    Mixed in before a :class:`~lightning_zobi.zo.optim.ZOOptimizer` rule whose ``directions`` have
    a fused ``apply_(params, terms, beta)`` and a ``preapplied`` slot (:class:`FusedGaussianDirections`,
    :class:`~lightning_zobi.zo.fused_lowrank.FusedLowRankDirections`). A central step with one
    query is::

        (θ + εz_t already applied)  L+ ;  θ −= 2εz_t  L- ;
        θ ← (1 − lr·wd)(θ + εz_t) − lr·s·g·z_t + εz_{t+1}        (one pass: two directions)

    (``s`` = the rule's :meth:`_grad_scale`: 1 for ZO-SGD, ``1/r`` on LOZO's matrices), so the last
    pass also applies the *next* step's perturbation ("lookahead"). Between steps the parameters
    are then left at ``θ_{t+1} + εz_{t+1}``: :attr:`perturbed` says so and :meth:`unperturb` removes
    it (one pass). Validation and checkpoints must never see those weights, so folding only
    happens while it is safe:

    * ``lookahead=None`` (default): fold only while a module is guarded by :meth:`guard`, which
      registers forward pre-hooks on every submodule owning one of the parameters and a
      ``state_dict`` pre-hook on the module: any forward outside :meth:`step` (validation,
      generation) and any ``state_dict()`` (checkpoints, ``save_pretrained``, safetensors export)
      first calls :meth:`unperturb`. The optimizer's own ``state_dict``/``load_state_dict`` also
      unperturb first. Without a guard a step leaves clean weights and costs 3 passes.
    * ``lookahead=True``: always fold (you call :meth:`unperturb` before reading the weights).
    * ``lookahead=False``: never fold (3 passes, clean weights after every step).

    Folding needs central differences; forward differences make 2 passes per step anyway
    (``+εz``, restore+update). Several queries: the update pass takes two directions per pass.
    """

    directions: Any
    eps: float
    seed: int
    difference: str
    perturbation: str
    tensor_owners: dict[int, nn.Module]
    _perturbers: dict[str, Perturber]
    zo_step: int
    param_groups: list[dict[str, Any]]
    _params: Callable[[], list[Tensor]]
    keys_for_step: Callable[[int], list[DirectionKey]]

    def _init_lookahead(self, lookahead: bool | None) -> None:
        if lookahead not in (None, True, False):
            raise ValueError(
                f"lookahead={lookahead!r} is invalid: use None (fold when guarded), True or False."
            )
        self.lookahead = lookahead
        self.pending: tuple[DirectionKey, float] | None = None
        self._guards: list[RemovableHandle] = []
        self._in_step = False

    @property
    def fused_directions(self) -> Any:
        """The fused direction family (``apply_`` and the ``preapplied`` slot)."""
        return self.directions

    @property
    def perturbed(self) -> bool:
        """True while the parameters carry the next step's ``+εz`` (see :meth:`unperturb`)."""
        return self.pending is not None

    def _project_nonnegative(self) -> bool:
        """Whether the update pass projects onto ``θ ≥ 0`` (QZO's scales); folding is off then."""
        return False

    def _grad_scale(self) -> np.ndarray | float:
        """Per-parameter factor of ``g·z`` in the update (1: plain ZO-SGD)."""
        return 1.0

    def _fold_allowed(self) -> bool:
        if self.difference != "central" or self._project_nonnegative() or self.perturbation == "exact":
            return False
        return bool(self._guards) if self.lookahead is None else self.lookahead

    # ------------------------------------------------------------------ guard / unperturb
    def unperturb(self) -> None:
        """Remove a folded look-ahead perturbation (one pass); a no-op when the weights are clean."""
        if self.pending is None:
            return
        key, scale = self.pending
        self.pending = None
        self.fused_directions.preapplied = None
        with torch.no_grad():
            self.fused_directions.apply_(self._params(), [(key, -scale)])

    def _outside_use(self, *_: Any) -> None:
        if not self._in_step:
            self.unperturb()

    def guard(self, module: nn.Module) -> list[RemovableHandle]:
        """Make ``module`` unperturb this optimizer's parameters before any outside forward or state_dict.

        Returns the hook handles (``h.remove()`` undoes it; :meth:`unguard` removes all).
        Enables folding under ``lookahead=None``.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"guard(module=...) needs a torch.nn.Module, got {type(module).__name__}.")
        ids = {id(p) for p in self._params()}
        handles = []
        for sub in module.modules():
            if any(id(p) in ids for p in sub.parameters(recurse=False)):
                handles.append(sub.register_forward_pre_hook(self._outside_use))
        handles.append(module.register_state_dict_pre_hook(self._outside_use))
        self._guards += handles
        return handles

    def unguard(self) -> None:
        """Remove every hook :meth:`guard` installed (and the look-ahead, so weights are clean)."""
        self.unperturb()
        for h in self._guards:
            h.remove()
        self._guards.clear()

    # ------------------------------------------------------------------ the step
    def step(self, closure: Closure | None = None) -> float:
        if self.pending is not None:
            key, scale = self.pending
            expected = self.keys_for_step(self.zo_step)[0]
            if self.difference == "central" and key == expected and scale == self.eps:
                self.fused_directions.preapplied = (key, scale)
            else:  # the step counter, eps or estimator changed since the fold: undo it
                self.unperturb()
            self.pending = None
        self._in_step = True
        try:
            return super().step(closure)  # type: ignore[misc]
        finally:
            self._in_step = False
            if self.fused_directions.preapplied is not None:  # the step raised before using it
                self.pending, self.fused_directions.preapplied = self.fused_directions.preapplied, None

    def _restore(self, estimate: Estimate) -> None:
        if estimate.pending is not None:
            key, scale = estimate.pending
            self.fused_directions.apply_(self._params(), [(key, scale)])

    def _coefficients(self, estimate: Estimate) -> tuple[list[Term], np.ndarray]:
        """Per-parameter ``α`` of every direction of the step and ``β = 1 − lr·wd`` (restore folded in)."""
        sizes = [len(group["params"]) for group in self.param_groups]
        lr = np.repeat(np.asarray([group["lr"] for group in self.param_groups], dtype=np.float64), sizes)
        wd = np.repeat(
            np.asarray([group["weight_decay"] for group in self.param_groups], dtype=np.float64), sizes
        )
        beta = 1.0 - lr * wd
        rate = lr * self._grad_scale() / len(estimate.keys)
        coeff: dict[DirectionKey, np.ndarray] = {}
        if estimate.pending is not None:  # restore first, then decay: β·(θ + scale·z)
            key, scale = estimate.pending
            coeff[key] = beta * scale
        for key, g in zip(estimate.keys, estimate.projected_grads, strict=True):
            coeff[key] = coeff.get(key, np.zeros_like(lr)) - rate * g
        return list(coeff.items()), beta

    def _update(self, estimate: Estimate) -> None:
        """Restore, decay, update (and fold the next ``+εz``) in ``ceil(terms / 2)`` passes.

        bf16/fp16 results are stochastically rounded in the kernel (``stochastic_rounding``, on by
        default), seeded per tensor by ``derive_seed(run seed, step, 0x5352, index)`` as the torch
        path seeds its generator (other uniforms, the same determinism: a resumed run rounds as the
        uninterrupted one). A step that changes nothing (lr = 0, no decay, nothing to restore or
        fold) launches nothing, so every bit of θ stays, ``−0.0`` included.
        """
        terms, beta = self._coefficients(estimate)
        if self._fold_allowed():
            next_key = self.keys_for_step(estimate.keys[0].step + 1)[0]
            terms.append((next_key, self.eps))
            self.pending = (next_key, self.eps)
        if np.all(beta == 1.0) and all(np.all(np.asarray(alpha) == 0.0) for _, alpha in terms):
            return
        options: dict[str, Any] = {"nonnegative": True} if self._project_nonnegative() else {}
        if getattr(self, "stochastic_rounding", False):
            step = estimate.keys[0].step
            options["sr_seeds"] = derive_seeds((self.seed, step, _ROUNDING_SALT), np.arange(len(beta)))
        self.fused_directions.apply_(self._params(), terms, beta=beta, **options)

    def perturber(self) -> Perturber:
        """The base's perturber; under ``perturbation="exact"`` a :class:`FusedJustInTime` (fused materialisation)."""
        perturber = super().perturber()  # type: ignore[misc]
        if type(perturber) is JustInTimePerturbation:
            perturber = FusedJustInTime(perturber.params, self.directions, self.tensor_owners)
            self._perturbers[self.perturbation] = perturber
        return perturber

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        self.unperturb()
        return super().state_dict()  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unperturb()
        super().load_state_dict(state_dict)  # type: ignore[misc]


class FusedZOSGD(FusedStep, ZOSGD):
    """ZO-SGD (MeZO) on the fused path: 2 forwards + 3 parameter passes per central step (exact), 2 (in place, folded).

    Same rule and arguments as :class:`~lightning_zobi.zo.optim.ZOSGD` (MeZO, "Fine-Tuning Language
    Models with Just Forward Passes", Malladi et al., arXiv 2305.17333), with the directions of
    :class:`FusedGaussianDirections` and the step of :class:`FusedStep`: under the default exact
    perturbation, two fused materialisations (:class:`FusedJustInTime`) and one update pass with
    stochastic rounding; under ``perturbation="inplace"``, restore, update and the next step's
    ``+εz`` in one pass while a :meth:`guard` makes the fold safe.

    Args:
        lookahead: ``None`` (fold while guarded), ``True`` (always), ``False`` (never); see :class:`FusedStep`.
        rounds, fast_math: see :class:`FusedGaussianDirections`.
        Others as :class:`~lightning_zobi.zo.optim.ZOOptimizer`.

    Memory: none extra (no direction tensor, no optimizer state).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        lookahead: bool | None = None,
        rounds: int = 10,
        fast_math: bool = True,
        **kwargs: Any,
    ) -> None:
        _reject_directions(type(self).__name__, kwargs)
        self._init_lookahead(lookahead)
        super().__init__(
            params, lr, eps, weight_decay, directions=FusedGaussianDirections(rounds, fast_math), **kwargs
        )
        for p in self._params():
            FusedGaussianDirections._check(p)
            if p.device.type != "cuda" and not HAS_TRITON:
                raise RuntimeError("FusedZOSGD needs Triton; use ZOSGD (fused=False).")

    @property
    def fused_directions(self) -> FusedGaussianDirections:
        assert isinstance(self.directions, FusedGaussianDirections)
        return self.directions


def use_fused(fused: bool | None, params: Iterable[Any]) -> bool:
    """Resolve the ``fused`` switch: ``None`` means "when every parameter is on CUDA and Triton is there"."""
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused={fused!r} must be True, False or None (automatic: fused on CUDA).")
    tensors = []
    for item in params:
        if isinstance(item, dict):
            tensors += [t[1] if isinstance(t, tuple) else t for t in item.get("params", [])]
        else:
            tensors.append(item[1] if isinstance(item, tuple) else item)
    on_cuda = bool(tensors) and all(isinstance(t, Tensor) and t.is_cuda for t in tensors)
    if fused is None:
        return HAS_TRITON and on_cuda and all(t.dtype in SUPPORTED_DTYPES for t in tensors)
    if fused and not HAS_TRITON:
        raise RuntimeError(
            "fused=True needs Triton (`pip install triton`); use fused=None/False for the torch path."
        )
    return fused


__all__ = [
    "BLOCK",
    "FusedGaussianDirections",
    "FusedStep",
    "FusedZOSGD",
    "HAS_TRITON",
    "fused_available",
    "derive_seeds",
    "tensor_seeds",
    "use_fused",
]
