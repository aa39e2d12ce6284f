"""ZODDPStrategy and sharded ZO on CPU/gloo with 2 processes (torchrun): scalars cross the wire.

One torchrun launch (``_zo_ddp_worker.py``) runs four fits per rank and the FSDP2 sharded-ZO run; the assertions compare the
ranks with each other and with single-process references computed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).parent))
import _zo_ddp_worker as worker  # noqa: E402
import _zo_sharded_worker as sharded_worker  # noqa: E402

from lightning_zobi.lightning.callbacks.zero_order import ZeroOrder  # noqa: E402
from lightning_zobi.lightning.strategies import ZODDPStrategy  # noqa: E402
from lightning_zobi.zo.distributed import ZODataParallel, tensor_checksum  # noqa: E402
from lightning_zobi.zo.optim import ZOSGD, build_optimizer  # noqa: E402
from lightning_zobi.zo.sharded import (  # noqa: E402
    ChunkedGaussianDirections,
    chunked_normal,
    use_sharded_directions,
)

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = (
    "shared", "per_rank", "diverge", "fo", "fsdp", "zofo", "lozo_per_rank", "fsdp_full_checkpoint", "bf16_lr0",
)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One torchrun launch of 2 CPU ranks running every scenario (saves a process start-up per scenario)."""
    out = tmp_path_factory.mktemp("zo_ddp")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ZO_DDP_TEST_ROOT": str(out),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(__file__).parent / "_zo_ddp_worker.py"),
        str(out),
        *SCENARIOS,
        "sharded",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def ranks(launched: Path) -> dict[tuple[str, int], dict]:
    return {
        (s, r): json.loads((launched / f"{s}_rank{r}.json").read_text()) for s in SCENARIOS for r in (0, 1)
    }


def _tensors(result: dict) -> dict[str, torch.Tensor]:
    return {n: torch.tensor(v, dtype=torch.float64) for n, v in result["params"].items()}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("scenario", ["shared", "per_rank", "fo", "fsdp", "zofo", "lozo_per_rank"])
def test_ranks_end_bit_identical(ranks, scenario):
    r0, r1 = ranks[scenario, 0], ranks[scenario, 1]
    assert "error" not in r0 and "error" not in r1
    assert r0["steps"] == r1["steps"] == worker.STEPS
    assert r0["params"] == r1["params"]  # exact float equality, element by element


def _flat_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().flatten() for n, p in module.named_parameters()}


def _rank_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each rank's batch at ``step``, as Lightning's DistributedSampler (shuffled, seed 0) deals them."""
    dataset = worker.loader(worker.PER_RANK_BATCH).dataset
    b = worker.PER_RANK_BATCH
    out = []
    for rank in (0, 1):
        order = list(DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0))
        out.append(dataset[order[step * b : (step + 1) * b]])
    return out


def test_shared_seeds_two_ranks_equal_one_process_double_batch(ranks):
    """Mean over ranks of g(batch b) = g(batch 2b) when the loss is a batch mean: same parameters."""
    batches = [_rank_batches(step) for step in range(worker.STEPS)]
    union = [(torch.cat([b0[0], b1[0]]), torch.cat([b0[1], b1[1]])) for b0, b1 in batches]
    module = worker.Regression(init_seed=0)
    trainer = worker.trainer("auto", 1, [ZeroOrder(**worker.ZO_ARGS)])
    trainer.fit(module, DataLoader(union, batch_size=None))
    reference = _flat_params(module)
    start = _flat_params(worker.Regression(init_seed=0))
    _assert_close(_tensors(ranks["shared", 1]), reference, rtol=1e-9, atol=1e-12)
    assert any((reference[n] - start[n]).abs().max() > 1e-3 for n in start), "the run must actually train"


def test_per_rank_seeds_are_an_n_query_estimate(ranks):
    """Rank r's queries on rank r's half-batch, all applied: a 4-query step from 2 queries per rank."""
    assert ranks["per_rank", 0]["last_queries"] == [0, 1, 2, 3]
    module = worker.Regression(init_seed=0)
    args = {**worker.ZO_ARGS, "queries": 2 * worker.ZO_ARGS["queries"]}
    opt = ZOSGD(module.double().parameters(), **args)
    q = worker.ZO_ARGS["queries"]
    for step in range(worker.STEPS):
        batches = _rank_batches(step)
        calls = iter(range(4 * q))

        def closure(batches=batches, calls=calls):
            x, y = batches[(next(calls) // 2) // q]  # queries 2r, 2r+1 are evaluated by rank r
            return nn.functional.mse_loss(module.net(x), y)

        opt.step(closure)
    got = _tensors(ranks["per_rank", 0])
    _assert_close(got, _flat_params(module), rtol=1e-9, atol=1e-12)
    shared = _tensors(ranks["shared", 0])
    assert any(not torch.allclose(got[n], shared[n]) for n in got)


@pytest.mark.parametrize("scenario", ["shared", "per_rank", "fsdp", "zofo", "lozo_per_rank"])
def test_bytes_per_step_at_most_eight_per_query(ranks, scenario):
    for rank in (0, 1):
        sent = ranks[scenario, rank]["bytes_per_step"]
        assert 0 < sent <= 8 * worker.ZO_ARGS["queries"]
        fo_bytes = ranks[scenario, rank]["fo_bytes_total"]
        if scenario == "zofo":  # the adapter's gradient (1 float64) is averaged once per step
            assert fo_bytes == 8 * worker.STEPS and ranks[scenario, rank]["zo_steps"] == worker.STEPS
        else:
            assert fo_bytes == 0


def test_divergence_is_caught_and_names_the_parameter(ranks):
    for rank in (0, 1):
        err = ranks["diverge", rank]["error"]
        assert err.startswith("ParameterDivergenceError")
        assert "'net.2.bias'" in err and "after step 3" in err and "1 tensor(s) differ" in err


def test_first_order_optimizers_average_gradients(ranks):
    """Without ZeroOrder, optimizer.step averages .grad: 2 ranks at b = plain SGD at 2b."""
    module = worker.Regression(init_seed=0).double()
    opt = module.configure_optimizers()
    for step in range(worker.STEPS):
        opt.zero_grad()
        loss = sum(nn.functional.mse_loss(module.net(x), y) for x, y in _rank_batches(step)) / 2
        loss.backward()
        opt.step()
    _assert_close(_tensors(ranks["fo", 0]), _flat_params(module), rtol=1e-9, atol=1e-12)
    assert ranks["fo", 0]["bytes_per_step"] == 0 and ranks["fo", 0]["fo_bytes_total"] > 0


# ---------------------------------------------------------------------- in-process checks
def test_registered_and_selected_by_name():
    trainer = pl.Trainer(strategy="zo_ddp", accelerator="cpu", devices=2, logger=False)
    assert type(trainer.strategy) is ZODDPStrategy and trainer.strategy.query_seeds == "shared"
    per_rank = pl.Trainer(strategy="zo_ddp_per_rank", accelerator="cpu", devices=2, logger=False)
    assert per_rank.strategy.query_seeds == "per_rank"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="query_seeds='every'"):
        ZODDPStrategy(query_seeds="every")
    with pytest.raises(ValueError, match="check_every=-1"):
        ZODDPStrategy(check_every=-1)


def test_checksum_sees_one_ulp():
    t = torch.randn(1000)
    before = tensor_checksum(t)
    t[417] = torch.nextafter(t[417], torch.tensor(10.0))
    assert tensor_checksum(t) != before
    assert tensor_checksum(torch.ones(3, dtype=torch.bfloat16)).dtype == torch.int64


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_one_rank_per_rank_mode_is_plain_zo(world_of_one):
    """With one process the wrapper changes nothing: same parameters, 8 bytes per query."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 1), nn.Linear(4, 1)
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    plain = build_optimizer("zo_sgd", a.parameters(), lr=0.1, queries=3, seed=1)
    synced = build_optimizer("zo_sgd", b.parameters(), lr=0.1, queries=3, seed=1)
    sync = ZODataParallel(query_seeds="per_rank")
    sync.attach(synced)
    for _ in range(3):
        plain.step(lambda: nn.functional.mse_loss(a(x), y))
        synced.step(lambda: nn.functional.mse_loss(b(x), y))
    assert torch.equal(a.weight, b.weight) and sync.zo_bytes_total == 3 * 3 * 8


def test_conservative_rule_is_refused(world_of_one):
    opt = build_optimizer("zo_sgd_cons", nn.Linear(2, 1).parameters())
    with pytest.raises(ValueError, match="zo_sgd_cons"):
        ZODataParallel().attach(opt)


# ---------------------------------------------------------------------- sharded ZO (FSDP2)
@pytest.fixture(scope="module")
def sharded(launched: Path) -> list[dict]:
    return [json.loads((launched / f"sharded_rank{r}.json").read_text()) for r in (0, 1)]


def test_sharded_perturbation_gathers_to_the_unsharded_one(sharded):
    """FSDP2 shards (uneven, unaligned with the 5-element chunks) perturbed in place gather exactly."""
    assert sharded[0]["local_numel"]["0.weight"] == 40 and sharded[1]["local_numel"]["0.weight"] == 30
    model = sharded_worker.make_model()
    directions = ChunkedGaussianDirections(sharded_worker.CHUNK)
    directions.perturb_(list(model.parameters()), sharded_worker.PERTURB_KEY, 0.5)
    expected = {n: p.detach().flatten().tolist() for n, p in model.named_parameters()}
    assert sharded[0]["perturbed"] == sharded[1]["perturbed"] == expected  # bit-exact
    column_sharded = directions.sample(torch.zeros(6, 11, dtype=torch.float64), 3, sharded_worker.PERTURB_KEY)
    assert sharded[0]["shard1_direction"] == column_sharded.flatten().tolist()


def test_sharded_exact_perturbation_is_per_fsdp_unit_and_bit_identical_at_lr_zero(sharded):
    for rank in (0, 1):
        assert sharded[rank]["perturber"] == "FSDPJustInTimePerturbation"
        assert sharded[rank]["bf16_lr0_identical"]
        assert all(abs(g) > 0 for g in sharded[rank]["bf16_lr0_grads"])  # the perturbation reached the forward


def test_sharded_zo_steps_equal_one_process(sharded):
    model = sharded_worker.make_model()
    directions = ChunkedGaussianDirections(sharded_worker.CHUNK)
    params = list(model.parameters())
    directions.perturb_(params, sharded_worker.PERTURB_KEY, 0.5)
    directions.perturb_(params, sharded_worker.PERTURB_KEY, -0.5)
    opt = ZOSGD(params, directions=directions, **sharded_worker.ZO_ARGS)
    x, y = sharded_worker.data()
    for step in range(sharded_worker.STEPS):
        xb, yb = x[8 * step : 8 * step + 8], y[8 * step : 8 * step + 8]
        opt.step(lambda xb=xb, yb=yb: nn.functional.mse_loss(model(xb), yb))
    got = {n: torch.tensor(v, dtype=torch.float64) for n, v in sharded[0]["trained"].items()}
    _assert_close(got, _flat_params(model), rtol=1e-10, atol=1e-12)


def test_zo_fsdp_strategy_equals_one_process_with_chunked_directions(ranks):
    """Lightning + FSDP2 (zo_fsdp): gathered parameters follow the one-process run at batch 2b."""
    module = worker.Regression(init_seed=0).double()
    opt = ZOSGD(module.parameters(), directions=ChunkedGaussianDirections(worker.CHUNK), **worker.ZO_ARGS)
    for step in range(worker.STEPS):
        (x0, y0), (x1, y1) = _rank_batches(step)
        x, y = torch.cat([x0, x1]), torch.cat([y0, y1])
        opt.step(lambda x=x, y=y: nn.functional.mse_loss(module.net(x), y))
    _assert_close(_tensors(ranks["fsdp", 0]), _flat_params(module), rtol=1e-9, atol=1e-12)


def test_sharded_rules_without_per_element_directions_are_refused():
    opt = build_optimizer("lozo", nn.Linear(4, 4).parameters())
    with pytest.raises(ValueError, match="LowRankDirections.*zo_sgd"):
        use_sharded_directions(opt)
    dense = build_optimizer("zo_sgd", nn.Linear(4, 4).parameters())
    use_sharded_directions(dense, chunk=3)
    assert isinstance(dense.directions, ChunkedGaussianDirections) and dense.directions.chunk == 3


@pytest.mark.parametrize("start,stop", [(0, 23), (3, 4), (4, 16), (5, 23), (22, 23), (7, 7)])
def test_chunked_normal_slices_agree_with_the_whole(start, stop):
    whole = chunked_normal(23, 0, 23, lambda c: 100 + c, torch.empty(0), chunk=5)
    part = chunked_normal(23, start, stop, lambda c: 100 + c, torch.empty(0), chunk=5)
    assert torch.equal(part, whole[start:stop])
    with pytest.raises(ValueError, match="start=4, stop=30"):
        chunked_normal(23, 4, 30, lambda c: c, torch.empty(0))


@pytest.mark.slow
def test_recipe_runs_with_the_subprocess_launcher(tmp_path):
    """`zobi fit --config recipes/zo_ddp.yaml`: Lightning's popen launcher starts rank 1, a checkpoint is written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "lightning_zobi.cli",
        "fit",
        "--config",
        str(ROOT / "recipes" / "zo_ddp.yaml"),
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=3",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    assert list(tmp_path.rglob("*.ckpt"))


def test_zo_fsdp_refuses_full_checkpoints_before_training(ranks):
    for rank in (0, 1):
        result = ranks["fsdp_full_checkpoint", rank]
        assert result["error"].startswith("ValueError") and "save_weights_only=True" in result["error"]
        assert result["steps"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_two_gpus_over_nccl_stay_identical_and_send_scalars(tmp_path):
    env = {
        **os.environ,
        "ZO_DDP_TEST_ACCELERATOR": "gpu",
        "ZO_DDP_TEST_ROOT": str(tmp_path),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    scenarios = ["shared", "per_rank", "diverge", "zofo"]
    worker_path = str(Path(__file__).parent / "_zo_ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker_path]
    proc = subprocess.run(
        [*cmd, str(tmp_path), *scenarios], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = {
        (s, r): json.loads((tmp_path / f"{s}_rank{r}.json").read_text()) for s in scenarios for r in (0, 1)
    }
    for s in ("shared", "per_rank", "zofo"):
        assert got[s, 0]["params"] == got[s, 1]["params"] and got[s, 0]["steps"] == worker.STEPS
        assert 0 < got[s, 0]["bytes_per_step"] <= 8 * worker.ZO_ARGS["queries"]
    assert "'net.2.bias'" in got["diverge", 0]["error"]


def test_zo_ddp_bf16_lr_zero_leaves_both_ranks_bit_identical_to_the_start(ranks):
    """Exact perturbation under zo_ddp: bf16 weights, lr=0, per-rank queries: nothing moves, on any rank."""
    start = {n: p.detach().bfloat16().double() for n, p in worker.Regression(init_seed=0).named_parameters()}
    for rank in (0, 1):
        result = ranks["bf16_lr0", rank]
        assert "error" not in result and result["steps"] == worker.STEPS
        for name, values in result["params"].items():
            assert torch.equal(torch.tensor(values, dtype=torch.float64).view_as(start[name]), start[name]), name


@pytest.mark.slow
def test_zo_ddp_four_ranks_bf16_lr_zero_bit_identical(tmp_path: Path) -> None:
    """Issue 20's CPU part: four gloo ranks, bf16, lr=0, per-rank queries: every rank ends where it started."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ZO_DDP_TEST_ROOT": str(tmp_path),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        str(Path(__file__).parent / "_zo_ddp_worker.py"), str(tmp_path), "bf16_lr0",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    start = {n: p.detach().bfloat16().double() for n, p in worker.Regression(init_seed=0).named_parameters()}
    for rank in range(4):
        result = json.loads((tmp_path / f"bf16_lr0_rank{rank}.json").read_text())
        assert "error" not in result and result["steps"] == worker.STEPS
        for name, values in result["params"].items():
            assert torch.equal(torch.tensor(values, dtype=torch.float64).view_as(start[name]), start[name]), name
