"""The fused path's random numbers: Philox-4x32 and Box-Muller as Triton device functions.

Philox-4x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) with ``rounds``
rounds (10, as cuRAND's ``Philox4_32_10``) is counter-based: a normal is a pure function of (key,
counter), so a kernel regenerates any entry of a direction from the tensor's 64-bit seed and the
entry's position, in registers, and no direction tensor ever exists. The dense kernel
(:mod:`~lightning_zobi.zo.fused.dense_kernel`) cuts the four 32-bit words into eight 16-bit
uniforms (:func:`philox_normals8`: half the Philox work per normal, which is what bounds a
two-direction pass); the low-rank kernel (:mod:`~lightning_zobi.zo.fused.lowrank_kernel`) draws
its small factors at full 24-bit precision (:func:`philox_normals`). Box-Muller goes through the
GPU's approximate ``lg2/sqrt/sin/cos`` by default (``FAST``).

Each ``_*_src`` function is the source; the module-level name wraps it in
:class:`~lightning_zobi.zo.fused.runtime._DeviceFunction` so compiled and interpreted kernels can
both call it (``None`` without Triton).

Memory: registers only.
"""

from __future__ import annotations

from lightning_zobi.zo.fused.runtime import HAS_TRITON, tl

if HAS_TRITON:
    from lightning_zobi.zo.fused.runtime import _DeviceFunction


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


philox_normals = _DeviceFunction(_philox_normals_src) if HAS_TRITON else None
"""Device function: 4 normals per counter (``philox_normals(c0, c1, k0, k1, ROUNDS, FAST, WIDE)``)."""
philox_normals8 = _DeviceFunction(_philox_normals8_src) if HAS_TRITON else None
"""Device function: 8 normals per counter on 16-bit uniforms (the dense direction format)."""


__all__ = ["box_muller", "philox4x32", "philox_normals", "philox_normals8"]
