"""Data-parallel ZO without gradient traffic: ranks exchange projected gradients, one float per query.

Every ZO direction is regenerated from ``(run seed, step, query, parameter index)``, so ranks that
start from the same parameters and apply the same ``(key, g)`` pairs stay bit-identical without
ever sending a tensor ("Seeds, not tensors" in ``DESIGN.md``). :class:`ZODataParallel` attaches to
any :class:`~lightning_zobi.zo.ZOOptimizer` (and to plain first-order optimizers) and provides:

* ``query_seeds="shared"``: every rank perturbs along the same ``q`` directions and evaluates them
  on its own batch; the ``q`` projected gradients are all-reduced (mean). With a loss that is a
  mean over the batch and equal per-rank batches, the mean of the per-rank ``g`` *is* the projected
  gradient of the loss over the union of the batches, so N ranks at batch ``b`` step exactly like
  one process at batch ``N·b`` (MeZO, arXiv 2305.17333, with a larger batch).
* ``query_seeds="per_rank"``: rank ``r`` evaluates queries ``r·q .. r·q+q−1`` on its own batch and
  the ``q`` values are all-gathered (no seed is sent: the keys follow from the rank index), so N
  ranks give an ``N·q``-query estimate for the forward time of ``q`` (n-SPSA). Every rank still
  replays all ``N·q`` perturbations in the same order, which keeps the parameters bit-identical.
* a parameter checksum (integer sum of the bit patterns of every tensor) compared across ranks,
  naming the first parameter that differs;
* a first-order gradient average (inside the optimizer's ``step``) for the few tensors some rules
  train by backpropagation (the ZO/FO hybrid's head, the Bilevel ZOFO adapter);
* byte counters: what this rank hands to collectives.

Memory: nothing per parameter; ``8·q`` bytes per ZO step on the wire (``8·P`` for a checksum of
``P`` tensors, every ``check_every`` steps).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_zobi.zo.optim import ZOOptimizer, ZOSGDCons

QUERY_SEEDS = ("shared", "per_rank")

_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class ParameterDivergenceError(RuntimeError):
    """Raised when ranks that must hold identical parameters do not."""


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 / tensor parallel), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def tensor_checksum(t: Tensor) -> Tensor:
    """An int64 checksum of ``t``'s bits: the integer sum of its elements' bit patterns.

    Exact (no rounding), so any single changed element changes it; computed by one read of the
    tensor with no temporary copy (``sum(dtype=int64)`` over an integer view).
    """
    t = _local(t.detach())
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_floating_point():
        t = t.contiguous().view(_BITS_DTYPE[t.element_size()])
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.sum(dtype=torch.int64)


class ZODataParallel:
    """Keeps ZO optimizers identical across processes by exchanging scalars only.

    Args:
        query_seeds: ``"shared"`` (all-reduce the mean of ``q`` projected gradients; N ranks at
            batch ``b`` equal one process at batch ``N·b``) or ``"per_rank"`` (disjoint queries per
            rank, all-gathered: an ``N·q``-query estimate for the time of ``q``).
        group: the process group (default: the world).
        device: where the collectives' small tensors live (``cuda`` for NCCL; default: the current
            CUDA device under NCCL, else CPU).
        average_first_order: average the ``.grad`` of first-order optimizers in their ``step``
            (off under FSDP, which already reduce-scatters gradients in backward).

    Attributes:
        zo_bytes_total: payload bytes this rank handed to ZO exchanges (8 per local query).
        check_bytes_total: payload bytes of parameter checks.
        fo_bytes_total: payload bytes of first-order gradient averages.

    A plain-PyTorch (``torchrun``) use::

        ddp = ZODataParallel()
        ddp.broadcast_parameters(model)
        ddp.attach(opt)            # opt: any ZOOptimizer
        ...
        opt.step(closure)          # closure on this rank's batch
        ddp.check_parameters(model.named_parameters(), step)
    """

    def __init__(
        self,
        query_seeds: str = "shared",
        group: Any = None,
        device: torch.device | str | None = None,
        average_first_order: bool = True,
    ) -> None:
        if query_seeds not in QUERY_SEEDS:
            raise ValueError(f"query_seeds={query_seeds!r} is invalid: choose one of {list(QUERY_SEEDS)}.")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ZODataParallel needs an initialized torch.distributed process group: launch with torchrun / "
                "Lightning's strategy='zo_ddp', or call torch.distributed.init_process_group first."
            )
        self.query_seeds = query_seeds
        self.average_first_order = average_first_order
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if device is None:
            backend = dist.get_backend(group)
            on_cuda = "nccl" in str(backend) and torch.cuda.is_available()
            device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
        self.device = torch.device(device)
        self.zo_bytes_total = 0
        self.check_bytes_total = 0
        self.fo_bytes_total = 0
        self._attached: dict[int, Optimizer] = {}

    # ------------------------------------------------------------------ ZO exchange
    def all_reduce_mean(self, values: Tensor) -> Tensor:
        """Mean over ranks of a small float64 tensor (the ``grad_reducer`` of ``"shared"`` mode)."""
        buf = values.to(self.device, torch.float64).clone()
        self.zo_bytes_total += buf.numel() * buf.element_size()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        return (buf / self.world_size).cpu()

    def gather_own_queries(self, values: Tensor) -> Tensor:
        """``"per_rank"`` mode's ``grad_reducer``: fill every rank's slots of the ``N·q`` projected gradients.

        ``values`` holds this rank's ``q`` real values in slots ``r·q .. r·q+q−1`` (the other slots
        were not evaluated here); only those ``q`` floats are sent (all-gather).
        """
        q = values.numel() // self.world_size
        own = values[self.rank * q : (self.rank + 1) * q].to(self.device, torch.float64).contiguous()
        gathered = [torch.empty_like(own) for _ in range(self.world_size)]
        self.zo_bytes_total += own.numel() * own.element_size()
        dist.all_gather(gathered, own, group=self.group)
        return torch.cat(gathered).cpu()

    def _wrap_per_rank(self, optimizer: ZOOptimizer) -> None:
        """Make ``optimizer.step`` estimate over all ranks' ``N·q`` keys, evaluating only its own ``q``.

        Every rank runs the *same* sequence of in-place perturbations (all ``N·q`` keys, in rank
        order) so the parameters stay bit-identical: ``(θ + εz) − εz`` is not exactly ``θ`` in
        floating point, and ranks that perturbed along different directions would drift apart by
        rounding. The closure is skipped (it returns 0.0) for the other ranks' queries, whose
        projected gradients then arrive through :meth:`gather_own_queries`.

        Cost: ``2q`` forwards (as one process with ``q`` queries) but ``3·N·q`` in-place passes
        over the parameters (each ~2 ms for 1.1B bf16 parameters on an H100).
        """
        original = optimizer.step
        world, rank = self.world_size, self.rank
        leading = 1 if isinstance(getattr(optimizer, "fo_optimizer", None), Optimizer) else 0

        @functools.wraps(original)
        def step(closure: Any = None, **kwargs: Any) -> Any:
            if closure is None:
                return original(closure, **kwargs)
            q = optimizer.queries
            central = optimizer.difference == "central"
            estimator_calls = leading + (2 * world * q if central else 1 + world * q)
            calls = itertools.count()

            def own_queries_only() -> Any:
                i = next(calls)
                if i < leading or i >= estimator_calls:
                    return closure()  # a first-order pass or a later evaluation: always real
                i -= leading
                if central:
                    owner = (i // 2) // q
                elif i == 0:
                    return closure()  # forward differences: every rank needs L(θ) on its batch
                else:
                    owner = (i - 1) // q
                return closure() if owner == rank else 0.0

            optimizer.queries = world * q
            try:
                original(own_queries_only, **kwargs)
            finally:
                optimizer.queries = q
            estimate = optimizer.last_estimate
            assert estimate is not None
            if central:  # report this rank's loss, not a mean that includes the skipped slots
                own = estimate.losses[2 * rank * q : 2 * (rank + 1) * q]
                estimate.loss = sum(own) / len(own)
            return estimate.loss

        optimizer.step = step  # type: ignore[method-assign]

    def attach(self, optimizer: Optimizer) -> None:
        """Make ``optimizer`` rank-consistent: ZO rules exchange ``g``; others average ``.grad``.

        Idempotent. A ZO rule with a first-order part (``fo_optimizer``, the ZO/FO hybrid) gets
        both. Call it before the optimizer's first step.
        """
        if id(optimizer) in self._attached:
            return
        self._attached[id(optimizer)] = optimizer
        if isinstance(optimizer, ZOOptimizer):
            if isinstance(optimizer, ZOSGDCons):
                raise ValueError(
                    "optimizer='zo_sgd_cons' cannot run data-parallel: it accepts or rejects each step by "
                    "comparing rank-local losses, so ranks would take different steps. Use 'zo_sgd' (or "
                    "'zo_sgd_momentum') with strategy='zo_ddp'."
                )
            if self.query_seeds == "shared":
                optimizer.grad_reducer = self.all_reduce_mean
            else:
                optimizer.grad_reducer = self.gather_own_queries
                self._wrap_per_rank(optimizer)
            fo = getattr(optimizer, "fo_optimizer", None)
            if isinstance(fo, Optimizer):
                self.attach(fo)
        elif self.average_first_order:
            self._wrap_first_order(optimizer)

    def _wrap_first_order(self, optimizer: Optimizer) -> None:
        """``optimizer.step`` averages ``.grad`` over ranks first (after running a closure, if given).

        A closure computes the gradients inside ``step`` (Lightning's does), so the average must
        come after it and before the update; a step pre-hook would run too early.
        """
        original = optimizer.step

        @functools.wraps(original)
        def step(closure: Any = None, **kwargs: Any) -> Any:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.average_grads(
                [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            )
            original(**kwargs)
            return loss

        optimizer.step = step  # type: ignore[method-assign]

    def average_grads(self, grads: Iterable[Tensor]) -> None:
        """Mean of first-order gradients over ranks, in place (flattened per dtype and device)."""
        buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for g in grads:
            buckets.setdefault((g.dtype, g.device), []).append(g)
        for tensors in buckets.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            self.fo_bytes_total += flat.numel() * flat.element_size()
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat.div_(self.world_size)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    # ------------------------------------------------------------------ agreement
    @torch.no_grad()
    def broadcast_parameters(self, module: nn.Module, src: int = 0) -> None:
        """Copy rank ``src``'s parameters and buffers to every rank (once, at start)."""
        for t in [*module.parameters(), *module.buffers()]:
            if t is not _local(t):
                continue  # a shard: each rank holds a different part by design
            dist.broadcast(t.data, src=src, group=self.group)

    @torch.no_grad()
    def check_parameters(self, named: Iterable[tuple[str, Tensor]], step: int | None = None) -> None:
        """Raise :class:`ParameterDivergenceError` naming the first tensor whose checksum differs.

        Cost: one read of every tensor and an all-gather of ``8·P`` bytes for ``P`` tensors.
        Sharded tensors (DTensor) are skipped: their ranks hold different shards by design.
        """
        named = [(n, t) for n, t in named if t is _local(t)]
        if not named:
            return
        local = torch.stack([tensor_checksum(t).to(self.device) for _, t in named])
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        self.check_bytes_total += local.numel() * local.element_size()
        dist.all_gather(gathered, local, group=self.group)
        table = torch.stack([g.cpu() for g in gathered])  # ranks × tensors
        differs = (table != table[0]).any(dim=0)
        if bool(differs.any()):
            i = int(differs.nonzero()[0])
            name = named[i][0]
            sums = ", ".join(f"rank {r}: {int(table[r, i])}" for r in range(self.world_size))
            when = f" after step {step}" if step is not None else ""
            raise ParameterDivergenceError(
                f"ZO data parallel: parameters diverged across ranks{when}; the first differing tensor is {name!r} "
                f"(#{i} of {len(named)}; bit checksums {sums}; {int(differs.sum())} tensor(s) differ). Ranks "
                "must apply identical updates: look for something that updates parameters from rank-local values "
                "(a first-order optimizer stepping outside the strategy, rank-dependent code in training_step or "
                "a callback), or a different initialisation that was not broadcast."
            )
