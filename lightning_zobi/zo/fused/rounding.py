"""Rounding inside the fused kernels: stochastic rounding of bf16/fp16 results and bf16 ties-to-even.

A ZO update ``lr·g·z`` is far below a bf16 ulp: rounded to nearest it vanishes. The fused update
pass therefore rounds its float32 result stochastically (up with probability by distance, so the
update survives in expectation), as the torch path does in :mod:`lightning_zobi.zo.rounding`, but
with its own uniform bits: :func:`sr_hash` mixes the element's position with a per-tensor rounding
seed ``derive_seed(run seed, step, 0x5352, index)``, so a resumed run rounds exactly as the
uninterrupted one. A value that is already representable (lr = 0) keeps its bits.
:func:`round_bf16_rne` makes Triton's CPU interpreter round float32 → bf16 as CUDA does.

Device functions (wrapped as in :mod:`~lightning_zobi.zo.fused.philox`), shared by the dense and the
low-rank kernels; :func:`sr_mode` is the host-side choice of the kernels' ``SR`` constant.

Memory: registers only.
"""

from __future__ import annotations

import torch

from lightning_zobi.zo.fused.runtime import HAS_TRITON, tl

if HAS_TRITON:
    from lightning_zobi.zo.fused.runtime import _DeviceFunction


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


__all__ = ["round_bf16_rne", "sr_hash", "sr_mode", "stochastic_round"]
