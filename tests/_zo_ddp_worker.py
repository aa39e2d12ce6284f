"""Worker of tests/test_zo_ddp.py, launched as ``torchrun --nproc_per_node=2 _zo_ddp_worker.py OUT SCENARIO...``.

Each scenario fits a tiny regression module under ``ZODDPStrategy`` (gloo, CPU) and writes this
rank's final parameters and the strategy's counters to ``OUT/<scenario>_rank<r>.json``. The same
module, data and ZO settings are used by the test's single-process reference run.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_zobi.lightning.callbacks.bilevel import Bilevel
from lightning_zobi.lightning.callbacks.zero_order import ZeroOrder
from lightning_zobi.lightning.strategies import ZODDPStrategy, ZOFSDPStrategy
from lightning_zobi.zo.distributed import ParameterDivergenceError

warnings.filterwarnings("ignore")

STEPS = 6
PER_RANK_BATCH = 4
ZO_ARGS = dict(lr=0.05, eps=1e-3, queries=2, seed=3)
CHUNK = 7  # elements per seeded chunk under zo_fsdp: unaligned with every shard boundary


class Regression(pl.LightningModule):
    """MSE (a mean over the batch) of a 2-layer MLP; plain SGD as configured optimizer."""

    def __init__(self, init_seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(init_seed)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class AdaptedRegression(Regression):
    """Base MLP (the ZO upper level) plus a LoRA-named output adapter (the first-order lower level)."""

    def __init__(self, init_seed: int = 0) -> None:
        super().__init__(init_seed)
        self.lora_out = nn.Parameter(torch.zeros(1))

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x) + self.lora_out, y)

    def upper_loss(self, batch) -> torch.Tensor:
        return self._loss(batch)

    def lower_loss(self, batch) -> torch.Tensor:
        return self._loss(batch) + 0.1 * self.lora_out.pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD([self.lora_out], lr=0.05)


class ShardedRegression(Regression):
    """The same module sharded by FSDP2 over the data-parallel mesh (Lightning's configure_model)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        self.double()
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[2], mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def loader(batch_size: int) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(8, 1, generator=gen, dtype=torch.float64))
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(
    strategy: object, devices: int, callbacks: list, precision: str = "64-true", checkpointing: bool = False
) -> pl.Trainer:
    return pl.Trainer(
        accelerator=os.environ.get("ZO_DDP_TEST_ACCELERATOR", "cpu"),
        devices=devices,
        strategy=strategy,
        precision=precision,
        max_steps=STEPS,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpointing,
        default_root_dir=os.environ.get("ZO_DDP_TEST_ROOT"),
        num_sanity_val_steps=0,
    )


def params_of(module: nn.Module) -> dict[str, list[float]]:
    def full(p: torch.Tensor) -> torch.Tensor:
        return p.full_tensor() if hasattr(p, "full_tensor") else p

    return {n: full(p.detach()).double().flatten().tolist() for n, p in module.named_parameters()}


class _BreakRank1(pl.Callback):
    """Corrupts one parameter on rank 1 only, to prove the agreement check catches it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and batch_idx == 1:
            with torch.no_grad():
                pl_module.net[2].bias.add_(1e-3)


def run(scenario: str) -> dict:
    rank = int(os.environ["RANK"])
    # Rank 1 starts from other weights: the strategy's initial broadcast must fix that.
    module = Regression(init_seed=0 if rank == 0 else 123)
    callbacks: list = []
    if scenario in ("shared", "per_rank", "diverge"):
        callbacks.append(ZeroOrder(**ZO_ARGS))
    if scenario == "diverge":
        callbacks.append(_BreakRank1())
    if scenario == "bf16_lr0":  # exactness across ranks: bf16 weights, lr=0, per-rank queries
        callbacks.append(ZeroOrder(**{**ZO_ARGS, "lr": 0.0}))
    if scenario == "lozo_per_rank":  # low-rank directions with a lazily shared V, per-rank queries
        callbacks.append(ZeroOrder(optimizer="lozo", optimizer_kwargs={"rank": 2, "nu": 3}, **ZO_ARGS))
    if scenario == "zofo":  # Bilevel ZOFO: ZO base-model upper level, first-order adapter lower level
        module = AdaptedRegression(init_seed=0 if rank == 0 else 123)
        callbacks.append(
            Bilevel(
                solver="zofo",
                gamma=1.0,
                inner_steps=1,
                inner_lr=0.05,
                zo_lr=0.05,
                eps=1e-3,
                queries=2,
                seed=3,
            )
        )
    if scenario.startswith("fsdp"):
        module = ShardedRegression(init_seed=0)
        callbacks.append(ZeroOrder(**ZO_ARGS))
        strategy = ZOFSDPStrategy(data_parallel_size=2, tensor_parallel_size=1, chunk=CHUNK)
        # The module made itself float64. A full checkpoint must be refused before the first step.
        t = trainer(
            strategy, 2, callbacks, precision="32-true", checkpointing=scenario == "fsdp_full_checkpoint"
        )
    else:
        query_seeds = "per_rank" if scenario.endswith(("per_rank", "lr0")) else "shared"
        strategy = ZODDPStrategy(query_seeds=query_seeds, check_every=1 if scenario == "diverge" else 2)
        t = trainer(
            strategy,
            int(os.environ.get("WORLD_SIZE", "2")),
            callbacks,
            precision="bf16-true" if scenario == "bf16_lr0" else "64-true",
        )
    out: dict = {"scenario": scenario}
    try:
        t.fit(module, loader(PER_RANK_BATCH))
    except (ParameterDivergenceError, ValueError) as err:
        out["error"] = f"{type(err).__name__}: {err}"
    out["rank"] = rank
    out["params"] = params_of(module)
    out["bytes_per_step"] = strategy.bytes_per_step
    out["check_bytes_total"] = strategy.check_bytes_total
    out["fo_bytes_total"] = strategy.fo_bytes_total
    out["steps"] = strategy.steps_taken
    zo = [cb for cb in callbacks if isinstance(cb, ZeroOrder)]
    if zo and zo[0].zo_optimizers and zo[0].zo_optimizers[0].last_estimate is not None:
        out["last_queries"] = [k.query for k in zo[0].zo_optimizers[0].last_estimate.keys]
    solver = getattr(callbacks[0], "solver", None) if callbacks else None
    if solver is not None:
        out["zo_steps"] = solver.zo.zo_step
    return out


def main(out_dir: str, scenarios: list[str]) -> None:
    for scenario in scenarios:
        if scenario == "sharded":  # FSDP2 sharded ZO, pure torch, in the same process group
            from _zo_sharded_worker import main as sharded_main

            sharded_main(out_dir)
            continue
        result = run(scenario)
        Path(out_dir, f"{scenario}_rank{os.environ['RANK']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    # Every result is on disk. Leave without the interpreter's teardown: destroying a gloo process
    # group's threads at exit has aborted a rank now and then ("terminate called without an active
    # exception"), which failed the launch although every scenario had finished.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
