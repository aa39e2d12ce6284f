"""Writing an update into low-precision parameters without losing it: seeded stochastic rounding.

A ZO update ``lr·g·z`` (lr 1e-6) is far below a bf16 ulp (≈1.2e-4 at ``|θ| = 0.02``): rounded to
nearest it vanishes, and a bf16 run cannot follow the fp32 one. Stochastic rounding keeps it in
expectation: the exact fp32 result ``v`` between two neighbours ``lo < v < hi`` of the parameter
dtype becomes ``hi`` with probability ``(v − lo)/(hi − lo)``, so ``E[round(v)] = v`` ("Deep
Learning with Limited Numerical Precision", Gupta et al., ICML 2015, arXiv 1502.02551). The
uniforms come from a generator seeded by ``(run seed, step, parameter index)``, so a resumed run
rounds exactly as the uninterrupted one. A value that is already representable (lr = 0) is
returned bit for bit.

Memory: during the write of one tensor, an fp32 working copy and a uniform draw of its size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

HALF_DTYPES = (torch.bfloat16, torch.float16)


def stochastic_round(value: Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> Tensor:
    """``value`` (fp32/fp64) rounded to ``dtype`` up or down with probability by distance: unbiased."""
    nearest = value.to(dtype)
    back = nearest.to(value.dtype)
    error = value - back  # exact: the two are within one ulp of dtype (Sterbenz)
    inf = torch.full_like(nearest, float("inf"))
    other = torch.nextafter(nearest, torch.where(error > 0, inf, -inf))
    gap = other.to(value.dtype) - back
    prob = error / gap  # in [0, 0.5]; NaN for inf/NaN values, where `nearest` is kept
    u = torch.rand(value.shape, generator=generator, device=value.device, dtype=value.dtype)
    return torch.where(u < prob, other, nearest)


@contextmanager
def writable(
    param: Tensor, generator: Callable[[torch.device], torch.Generator] | None, enabled: bool
) -> Iterator[Tensor]:
    """Yield the tensor a rule should update for ``param``: ``param`` itself, or an fp32 copy.

    With ``enabled`` and a bf16/fp16 ``param`` the rule works on an fp32 copy, which is then
    stochastically rounded back into ``param``; ``generator(device)`` gives the seeded generator of
    the uniforms, asked for only at rounding time (the rule's own draws cannot disturb it).
    Otherwise the rule writes ``param`` in place with the dtype's round-to-nearest.
    """
    if not enabled or param.dtype not in HALF_DTYPES:
        yield param
        return
    work = param.float()
    yield work
    param.copy_(stochastic_round(work, param.dtype, generator(param.device) if generator else None))
