"""ZO strategies: ``"zo_ddp"`` sends one float per query instead of gradients; ``"zo_fsdp"`` shards.

How they hook into Lightning, and why there. Lightning's ``DDPStrategy`` launches the processes
(``torchrun``-style subprocesses, spawn or fork), sets up the process group and the distributed
sampler, then wraps the module in ``DistributedDataParallel`` so that ``backward`` all-reduces
gradients. A ZO step has no backward and no gradient: ranks stay identical when they start from
the same parameters and apply the same seeded directions with the same projected gradients. So
:class:`ZODDPStrategy` keeps everything of ``DDPStrategy`` but :meth:`~ZODDPStrategy.setup`, which

1. does **not** wrap the module (``self.model`` stays the LightningModule: no buckets, no hooks,
   no extra memory);
2. broadcasts rank 0's parameters and buffers once, and checks them;

and ``optimizer_step``, which before every step attaches each ZO optimizer (those of
``ZeroOrder`` / ``QZO``, and the Bilevel ZOFO upper level) to a
:class:`~lightning_zobi.zo.distributed.ZODataParallel`: its ``grad_reducer`` becomes an
all-reduce mean of the ``q`` projected gradients (``query_seeds="shared"``), or each rank
evaluates its own ``q`` of ``N·q`` queries and the values are all-gathered (``"per_rank"``).
First-order optimizers the module configured (the Bilevel ZOFO adapter's, the ZO/FO hybrid's
head) average their gradients inside their ``step``. Every ``check_every`` steps a bit checksum of
every parameter is compared across ranks and a divergence stops the run naming the first
differing parameter. (Bilevel ZOFO's inner copy ``z`` of the adapter is solver state, not a
parameter: each rank keeps its own, fitted to its own batches.)

:class:`ZOFSDPStrategy` does the same on Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor
parallel) for models larger than one GPU, with directions generated per shard from seeds keyed by
the global element offset (:mod:`lightning_zobi.zo.sharded`).

Paper: MeZO, "Fine-Tuning Language Models with Just Forward Passes" (Malladi et al., arXiv
2305.17333), whose seed trick makes the scalar exchange possible.
Memory: none beyond the single-process ZO step (no DDP buckets, no gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer

from lightning_zobi.zo.distributed import QUERY_SEEDS, ZODataParallel
from lightning_zobi.zo.optim import ZOOptimizer
from lightning_zobi.zo.sharded import DEFAULT_CHUNK, is_sharded, use_sharded_directions


def find_zo_optimizers(trainer: pl.Trainer) -> list[ZOOptimizer]:
    """Every ZO optimizer the strategy must keep rank-consistent.

    The strategy's own optimizers (after ``ZeroOrder``/``QZO`` swapped in their ZO rules; a
    wrapper's ``inner`` optimizer), the ``zo_optimizers`` a callback exposes, and the ZO rule of a
    callback's ``solver`` (the Bilevel ZOFO upper level). First-order optimizers are attached once
    in ``setup`` (before callbacks wrap them), not here.
    """
    found: dict[int, ZOOptimizer] = {}

    def add(opt: Any) -> None:
        if isinstance(opt, LightningOptimizer):
            opt = opt._optimizer
        if isinstance(opt, ZOOptimizer):
            found.setdefault(id(opt), opt)
        elif isinstance(opt, Optimizer):
            add(getattr(opt, "inner", None))

    for opt in trainer.strategy.optimizers:
        add(opt)
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        for opt in getattr(cb, "zo_optimizers", None) or []:
            add(opt)
        add(getattr(getattr(cb, "solver", None), "zo", None))
    return list(found.values())


def _register_once(
    registry: _StrategyRegistry, name: str, cls: type, description: str, **init_params: Any
) -> None:
    """Register ``name`` unless it is there already (the module may be imported more than once)."""
    if name not in registry:
        registry.register(name, cls, description=description, **init_params)


class _ScalarSyncMixin:
    """What ``zo_ddp`` and ``zo_fsdp`` share: attach ZO optimizers, count bytes, check agreement."""

    query_seeds: str
    check_every: int
    sync: ZODataParallel | None
    bytes_per_step: int
    steps_taken: int

    def _init_sync(self, query_seeds: str, check_every: int) -> None:
        if query_seeds not in QUERY_SEEDS:
            raise ValueError(f"query_seeds={query_seeds!r} is invalid: choose one of {list(QUERY_SEEDS)}.")
        if not isinstance(check_every, int) or check_every < 0:
            raise ValueError(
                f"check_every={check_every!r} is invalid: use an integer >= 0 (steps between parameter "
                "checks; 0 disables them)."
            )
        self.query_seeds = query_seeds
        self.check_every = check_every
        self.sync = None
        self.bytes_per_step = 0
        self.steps_taken = 0

    @property
    def check_bytes_total(self) -> int:
        return self.sync.check_bytes_total if self.sync else 0

    @property
    def fo_bytes_total(self) -> int:
        return self.sync.fo_bytes_total if self.sync else 0

    def _prepare_optimizer(self, optimizer: Optimizer) -> None:
        """Hook run on each optimizer before it is attached (the sharded strategy swaps directions)."""

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        """Attach new ZO optimizers, step, count the bytes sent, and check agreement every K steps."""
        assert self.sync is not None, f"{type(self).__name__}.setup() has not run"
        module = self.lightning_module  # type: ignore[attr-defined]
        found = find_zo_optimizers(module.trainer)
        for opt in found:
            self._prepare_optimizer(opt)
            self.sync.attach(opt)
        if not found and self.steps_taken == 0:
            rank_zero_warn(
                f"{type(self).__name__} found no ZO optimizer (add the ZeroOrder callback); first-order gradients "
                "are averaged inside optimizer.step, which is slower than Lightning's own DDP/FSDP."
            )
        before = self.sync.zo_bytes_total
        output = super().optimizer_step(optimizer, closure, model, **kwargs)  # type: ignore[misc]
        self.bytes_per_step = self.sync.zo_bytes_total - before
        self.steps_taken += 1
        if self.check_every and self.steps_taken % self.check_every == 0:
            self.sync.check_parameters(module.named_parameters(), step=self.steps_taken)
        return output

    def check_parameters(self) -> None:
        """Compare every (unsharded) parameter across ranks now (raises ``ParameterDivergenceError``)."""
        assert self.sync is not None
        self.sync.check_parameters(self.lightning_module.named_parameters(), step=self.steps_taken)  # type: ignore[attr-defined]


class ZODDPStrategy(_ScalarSyncMixin, DDPStrategy):
    """Multi-process ZO training that all-reduces projected gradients (one float per query).

    ``Trainer(strategy="zo_ddp", devices=N, callbacks=[ZeroOrder(...)])``, or
    ``zobi fit ... --trainer.strategy=zo_ddp``. Launches like ``"ddp"`` (also registered:
    ``"zo_ddp_spawn"``, ``"zo_ddp_fork"``, and ``"zo_ddp_per_rank"`` for per-rank query seeds), uses
    the distributed sampler, never wraps the module in ``DistributedDataParallel``.

    Args:
        query_seeds: ``"shared"``: all ranks use the same directions and average their ``g``
            (N ranks at per-rank batch ``b`` = one process at batch ``N·b``); ``"per_rank"``: rank
            ``r`` uses its own queries and the ``g`` are all-gathered (an ``N·q``-query estimate
            at the cost of ``q``).
        check_every: compare a bit checksum of all parameters across ranks every this many
            optimizer steps (``0`` disables; also checked once after the initial broadcast).
        start_method: ``"popen"`` (re-runs the script per rank, as ``torchrun``), ``"spawn"``,
            ``"fork"``.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
        process_group_backend, timeout: as for Lightning's ``DDPStrategy``.

    Attributes:
        bytes_per_step: payload bytes this rank sent in ZO exchanges during the latest optimizer
            step (``8 × queries`` per ZO optimizer).
        check_bytes_total / fo_bytes_total: bytes of parameter checks / first-order averages.

    Memory: none beyond single-process ZO. Communication: ``8·q`` bytes per step, plus ``8·P``
    bytes (``P`` tensors) every ``check_every`` steps.
    """

    def __init__(
        self,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        query_seeds: Literal["shared", "per_rank"] = "shared",
        check_every: int = 100,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        self._init_sync(query_seeds, check_every)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )

    def setup(self, trainer: pl.Trainer) -> None:
        """DDP's set-up without the ``DistributedDataParallel`` wrapper; parameters broadcast once."""
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and self._layer_sync:
            self.model = self._layer_sync.apply(self.model)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.sync = ZODataParallel(self.query_seeds)
        self.sync.broadcast_parameters(self.model)
        if self.check_every:
            self.sync.check_parameters(self.model.named_parameters(), step=0)
        if fitting:
            self.setup_optimizers(trainer)
            for opt in self.optimizers:  # module optimizers: FO ones average their grads
                self.sync.attach(opt)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    def configure_ddp(self) -> None:
        raise RuntimeError("ZODDPStrategy never wraps the module in DistributedDataParallel.")

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        entries = (("zo_ddp", "popen"), ("zo_ddp_spawn", "spawn"), ("zo_ddp_fork", "fork"))
        for name, start_method in entries:
            _register_once(
                strategy_registry,
                name,
                cls,
                f"ZO data parallel (scalar all-reduce), start_method={start_method!r}",
                start_method=start_method,
            )
        _register_once(
            strategy_registry,
            "zo_ddp_per_rank",
            cls,
            "ZO data parallel with per-rank query seeds (N ranks = N-query estimate)",
            query_seeds="per_rank",
        )


_NO_ZO_OPTIMIZER_CHECKPOINT = (
    "strategy='zo_fsdp' cannot save the ZO optimizer's state in a checkpoint yet: "
    "torch.distributed.checkpoint's get_optimizer_state_dict keeps only 'state'/'param_groups' (the ZO run seed and "
    "step would be lost) and initialises empty states by calling optimizer.step() without a closure. Save "
    "weights only: Trainer(callbacks=[ModelCheckpoint(save_weights_only=True)]) or enable_checkpointing=False "
    "(a run resumed from weights restarts the ZO step counter, i.e. draws fresh directions)."
)


class ZOFSDPStrategy(_ScalarSyncMixin, ModelParallelStrategy):
    """Sharded ZO for models larger than one GPU: FSDP2 / tensor-parallel shards, scalar all-reduce.

    ``Trainer(strategy="zo_fsdp", devices=N, callbacks=[ZeroOrder(...)])`` on a module whose
    ``configure_model`` shards itself with ``fully_shard`` (and/or tensor parallelism) over
    ``self.device_mesh``, exactly as for Lightning's ``ModelParallelStrategy``, which this
    extends. Each rank then holds a slice of every weight as a ``DTensor``; before the first step
    the ZO rules' dense Gaussian directions are replaced by
    :class:`~lightning_zobi.zo.sharded.ChunkedGaussianDirections`, which generate every rank's
    slice from seeds keyed by the global element offset, so the gathered parameters move exactly
    as in a one-process run with that family. The loss of every forward is a collective (FSDP
    all-gathers the weights), so all ranks evaluate every query: ``query_seeds`` is always
    ``"shared"``, and the ``q`` projected gradients are all-reduced over the world (a mean over
    tensor-parallel ranks that saw the same batch changes nothing).

    Rules: the dense-Gaussian ones (zo_sgd, zo_sgd_momentum, zo_sign, zo_adam, qzo); LOZO and
    sparse ZO are refused with a clear error. First-order parts (ZO/FO hybrid, Bilevel ZOFO's
    adapter) are left to FSDP's own gradient reduce-scatter.

    Args:
        data_parallel_size, tensor_parallel_size: the device mesh, as for ``ModelParallelStrategy``
            (pure FSDP over N devices: ``data_parallel_size=N, tensor_parallel_size=1``).
        chunk: elements per seeded chunk of the directions (all ranks and any one-process
            reference must use the same value; it is checked on resume).
        check_every: steps between cross-rank checks of the *unsharded* (replicated) parameters.
        save_distributed_checkpoint, process_group_backend, timeout: as for
            ``ModelParallelStrategy``.

    Checkpoints: weights only (``ModelCheckpoint(save_weights_only=True)``); a full checkpoint is
    refused at the first step with a clear error (the ZO state does not survive
    ``torch.distributed.checkpoint``'s optimizer-state helpers).

    Memory: the sharded model (1/N of the weights per rank) plus, during each forward, FSDP's
    all-gathered layer; the directions cost one local-shard temporary and at most two chunks.
    Communication per step: FSDP's weight all-gathers for the 2q forwards, plus ``8·q`` bytes.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = "auto",
        chunk: int = DEFAULT_CHUNK,
        check_every: int = 100,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk={chunk!r} is invalid: use an integer >= 1 (elements per seeded chunk).")
        self._init_sync("shared", check_every)
        self.chunk = chunk
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup(self, trainer: pl.Trainer) -> None:
        """``ModelParallelStrategy``'s set-up, then the scalar sync (replicated tensors broadcast once)."""
        super().setup(trainer)
        assert self.model is not None
        self.sync = ZODataParallel("shared", average_first_order=False)
        self.sync.broadcast_parameters(self.model)  # DTensor shards are skipped

    def _prepare_optimizer(self, optimizer: Optimizer) -> None:
        if isinstance(optimizer, ZOOptimizer) and any(is_sharded(p) for p in optimizer._params()):
            use_sharded_directions(optimizer, self.chunk)
        if isinstance(optimizer, ZOOptimizer) and self.steps_taken == 0:
            trainer = self.lightning_module.trainer
            full = [cb for cb in trainer.checkpoint_callbacks if not getattr(cb, "_save_weights_only", False)]
            if full:
                raise ValueError(_NO_ZO_OPTIMIZER_CHECKPOINT)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """Refuses ZO optimizers (see ``_NO_ZO_OPTIMIZER_CHECKPOINT``); others as ``ModelParallelStrategy``."""
        inner = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        if isinstance(inner, ZOOptimizer):
            raise RuntimeError(_NO_ZO_OPTIMIZER_CHECKPOINT)
        return super().optimizer_state(optimizer)

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        _register_once(
            strategy_registry,
            "zo_fsdp",
            cls,
            "Sharded ZO (FSDP2 / tensor parallel) with shard-invariant seeded directions",
        )


ZODDPStrategy.register_strategies(StrategyRegistry)
ZOFSDPStrategy.register_strategies(StrategyRegistry)
