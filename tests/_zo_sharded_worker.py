"""Worker of tests/test_zo_ddp.py's sharded-ZO test: ``torchrun --nproc_per_node=2 _zo_sharded_worker.py OUT``.

Shards a tiny MLP with FSDP2 ``fully_shard`` over 2 CPU ranks (gloo; 7 output rows over 2 ranks
gives uneven shards, and a 5-element chunk makes every shard boundary unaligned), then records
the gathered parameters after one perturbation and after ZO-SGD steps, plus a ``Shard(1)``
DTensor's direction. The test compares them with one process running the same directions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from lightning_zobi.zo.directions import DirectionKey
from lightning_zobi.zo.distributed import ZODataParallel
from lightning_zobi.zo.optim import ZOSGD
from lightning_zobi.zo.sharded import ChunkedGaussianDirections

CHUNK = 5
STEPS = 4
ZO_ARGS = dict(lr=0.05, eps=1e-3, queries=2, seed=1)
PERTURB_KEY = DirectionKey(9, 0, 0)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8 * STEPS, 10, generator=gen, dtype=torch.float64)
    return x, torch.sin(x[:, :3])


def gathered(model: nn.Module) -> dict[str, list[float]]:
    return {n: p.full_tensor().flatten().tolist() for n, p in model.named_parameters()}


def main(out: str) -> None:
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    model = make_model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    directions = ChunkedGaussianDirections(CHUNK)
    result: dict = {"local_numel": {n: p.to_local().numel() for n, p in model.named_parameters()}}

    params = list(model.parameters())
    directions.perturb_(params, PERTURB_KEY, 0.5)
    result["perturbed"] = gathered(model)
    directions.perturb_(params, PERTURB_KEY, -0.5)

    opt = ZOSGD(model.parameters(), directions=directions, **ZO_ARGS).attach(model)  # exact, per FSDP unit
    ZODataParallel("shared").attach(opt)
    x, y = data()
    for step in range(STEPS):
        lo = 8 * step + 4 * rank  # rank r: its half of the step's 8 examples
        xb, yb = x[lo : lo + 4], y[lo : lo + 4]
        opt.step(lambda xb=xb, yb=yb: nn.functional.mse_loss(model(xb), yb))
    result["trained"] = gathered(model)
    result["perturber"] = type(opt.perturber()).__name__

    # bf16 shards, lr=0: exact perturbation per FSDP unit leaves every shard bit-identical
    half = make_model().bfloat16()
    fully_shard(half[0], mesh=mesh)
    fully_shard(half[2], mesh=mesh)
    fully_shard(half, mesh=mesh)
    start = {n: p.full_tensor().clone() for n, p in half.named_parameters()}
    opt = ZOSGD(half.parameters(), directions=ChunkedGaussianDirections(CHUNK), **{**ZO_ARGS, "lr": 0.0})
    opt.attach(half)
    for step in range(STEPS):
        xb = x[8 * step + 4 * rank : 8 * step + 4 * rank + 4].bfloat16()
        opt.step(lambda xb=xb: half(xb).float().pow(2).mean())
    result["bf16_lr0_identical"] = all(torch.equal(p.full_tensor(), start[n]) for n, p in half.named_parameters())
    result["bf16_lr0_grads"] = opt.last_estimate.projected_grads

    full = torch.arange(6 * 11, dtype=torch.float64).view(6, 11)
    column_sharded = distribute_tensor(full, mesh, [Shard(1)])
    result["shard1_direction"] = (
        directions.sample(column_sharded, 3, PERTURB_KEY).full_tensor().flatten().tolist()
    )
    Path(out, f"sharded_rank{rank}.json").write_text(json.dumps(result))
    if owns_group:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
