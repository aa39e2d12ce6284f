"""Sharded ZO: directions keyed by global element offset, so every shard regenerates its own part.

For a model too large for one GPU the parameters are sharded (FSDP2 ``fully_shard``, tensor
parallelism): each rank holds a slice of every tensor as a ``DTensor``. A ZO step must perturb
each rank's slice by exactly the values the *unsharded* direction has there, or the gathered
parameters would not be ``θ + εz`` of any single direction. :class:`ChunkedGaussianDirections`
makes the direction a function of the global element index: the flattened global tensor is cut
into fixed chunks of ``chunk`` elements and chunk ``c`` of parameter ``i`` under key ``k`` is
``randn(size_c)`` from ``k.seed_for(i, SALT, c)``. A rank generates only the chunks covering its
slice and cuts them, so any shard boundary works (aligned boundaries cost nothing extra; an
unaligned one at most two partial chunks), and the same code on an unsharded tensor generates the
whole direction: a sharded run and a one-process run with this family step identically.

No paper introduces this; it is the sharded form of MeZO's seed trick ("Fine-Tuning Language
Models with Just Forward Passes", Malladi et al., arXiv 2305.17333).

Memory: the local slice's direction plus at most two chunks (``2·chunk`` elements); for a shard
that is not one contiguous run of the flattened tensor (e.g. ``Shard(1)``) the whole span from its
first to its last element.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_zobi.zo.directions import DirectionKey, Directions, _GeneratorPool

DEFAULT_CHUNK = 1 << 20
"""Elements per seeded chunk (1 Mi): large enough that reseeding costs nothing, small enough that
an unaligned shard wastes little."""

_SALT = 0x5A4B


def _contiguous_strides(shape: Sequence[int]) -> list[int]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return strides[::-1]


def chunked_normal(
    numel: int,
    start: int,
    stop: int,
    seed_of_chunk: Callable[[int], int],
    like: Tensor,
    chunk: int = DEFAULT_CHUNK,
    pool: _GeneratorPool | None = None,
) -> Tensor:
    """Elements ``[start, stop)`` of a ``numel``-long standard normal vector defined chunk by chunk.

    Chunk ``c`` covers ``[c·chunk, min((c+1)·chunk, numel))`` and is ``randn`` of that length from
    ``seed_of_chunk(c)``, always generated whole, so the result does not depend on which slice
    is asked for. Dtype and device follow ``like``.
    """
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"start={start}, stop={stop} must satisfy 0 <= start <= stop <= numel={numel}.")
    if start == stop:
        return torch.empty(0, dtype=like.dtype, device=like.device)
    pool = pool or _GeneratorPool()
    first, last = start // chunk, (stop - 1) // chunk
    pieces = []
    for c in range(first, last + 1):
        size = min(chunk, numel - c * chunk)
        gen = pool.get(like.device, seed_of_chunk(c))
        piece = torch.randn(size, generator=gen, device=like.device, dtype=like.dtype)
        lo = start - c * chunk if c == first else 0
        hi = stop - c * chunk if c == last else size
        pieces.append(piece[lo:hi])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def is_sharded(param: Tensor) -> bool:
    """True for a ``DTensor`` (an FSDP2 / tensor-parallel parameter)."""
    return hasattr(param, "device_mesh") and hasattr(param, "to_local")


def local_block(param: Tensor) -> tuple[Tensor, tuple[int, ...], tuple[int, ...]]:
    """``(local tensor, local shape, global offset)`` of a DTensor shard, or of a whole tensor."""
    if is_sharded(param):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            param.shape, param.device_mesh, param.placements
        )
        return param.to_local(), tuple(shape), tuple(offset)
    return param, tuple(param.shape), (0,) * param.dim()


class ChunkedGaussianDirections(Directions):
    """Dense Gaussian directions keyed by global element offset: shard-invariant (sharded ZO).

    ``sample`` on a ``DTensor`` parameter (FSDP2, tensor parallel) returns a ``DTensor`` whose
    local part is exactly the unsharded direction's values at this rank's elements; on a plain
    tensor it returns the whole direction. So ``θ_shard += ε z_shard`` on every rank gathers to
    ``θ + ε z`` of the one-process run with this family. The values differ from
    :class:`~lightning_zobi.zo.directions.GaussianDirections` (another generation scheme): compare
    a sharded run with a one-process run that also uses this family.

    Args:
        chunk: elements per seeded chunk. Ranks and the one-process reference must use the same.

    Memory: one local-shard-sized temporary plus at most two chunks (see the module docstring).
    """

    def __init__(self, chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__()
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk={chunk!r} is invalid: use an integer >= 1 (elements per seeded chunk).")
        self.chunk = chunk

    def sample(self, param: Tensor, index: int, key: DirectionKey) -> Tensor:
        local, shape, offset = local_block(param)
        numel = math.prod(param.shape)
        if math.prod(shape) == 0:
            z = torch.zeros(shape, dtype=local.dtype, device=local.device)
        else:
            strides = _contiguous_strides(param.shape)
            start = sum(o * s for o, s in zip(offset, strides, strict=True))
            stop = start + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1
            span = chunked_normal(
                numel, start, stop, lambda c: key.seed_for(index, _SALT, c), local, self.chunk, self._pool
            )
            z = span.as_strided(shape, strides) if len(shape) else span.view(())
        if local is param:
            return z
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            z.contiguous(),
            param.device_mesh,
            param.placements,
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )

    def state_dict(self) -> dict:
        return {"chunk": self.chunk}

    def load_state_dict(self, state: dict) -> None:
        if state and int(state.get("chunk", self.chunk)) != self.chunk:
            raise ValueError(
                f"The checkpoint was written with ChunkedGaussianDirections(chunk={state['chunk']}) but this run uses "
                f"chunk={self.chunk}: the directions would differ. Use chunk={state['chunk']}."
            )


def use_sharded_directions(optimizer: object, chunk: int = DEFAULT_CHUNK) -> None:
    """Switch a ZO optimizer with dense Gaussian directions to the shard-invariant family.

    Rules with their own direction family (LOZO's low-rank factors, sparse masks) are refused:
    their factors span whole rows/columns and are not defined per element.
    """
    from lightning_zobi.zo.directions import GaussianDirections

    directions = getattr(optimizer, "directions", None)
    if isinstance(directions, ChunkedGaussianDirections):
        return
    if type(directions) is not GaussianDirections:
        raise ValueError(
            f"{type(optimizer).__name__} uses {type(directions).__name__}, which cannot be generated per shard; sharded "
            "ZO supports the dense-Gaussian rules (zo_sgd, zo_sgd_momentum, zo_sign, zo_adam, qzo)."
        )
    optimizer.directions = ChunkedGaussianDirections(chunk)  # type: ignore[attr-defined]
