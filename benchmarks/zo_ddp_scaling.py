"""Throughput scaling of data-parallel ZO (scalar all-reduce) vs first-order DDP AdamW, 1 and N GPUs.

    python benchmarks/zo_ddp_scaling.py --out benchmarks/results/zo_ddp_scaling.json        # N = all GPUs, <= 2
    python benchmarks/zo_ddp_scaling.py --model tiny --nproc 2 --out /tmp/ddp.json          # CPU smoke test (gloo)

The script relaunches itself under ``torchrun --standalone --nproc_per_node=N`` (one launch, so
the whole run is one command of about a minute on 2×H200). In that one process group it measures,
per GPU batch ``batch × seq`` tokens (weak scaling: every rank gets its own batch):

* ``zo`` on 1 GPU: every rank runs ZO-SGD alone (no collective), reported from rank 0;
* ``zo`` on N GPUs: the same rule attached to :class:`~lightning_zobi.zo.distributed.ZODataParallel`
  (exactly what ``strategy="zo_ddp"`` attaches), ``query_seeds="shared"`` and ``"per_rank"``;
* ``fo_adamw`` on 1 GPU: forward + backward + ``torch.optim.AdamW`` (fused on CUDA);
* ``fo_adamw`` on N GPUs: the same under ``DistributedDataParallel``.

Model: a 1.1B Llama (TinyLlama-1.1B shape: hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP
5632, vocab 32000) with random weights in bf16, built from a config (no download). Tokens/s is
``N × batch × seq / step time``; scaling efficiency is ``tokens/s(N) / (N × tokens/s(1))``.
Written to ``--out`` (JSON) and printed as a table. Timing: CUDA-synchronised wall clock over
``--steps`` steps after ``--warmup``; memory: ``torch.cuda.max_memory_allocated`` per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers next to this script
from _common import LLAMA_1_1B, LLAMA_TINY  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "1.1b": dict(LLAMA_1_1B, max_position_embeddings=2048),
    "tiny": dict(LLAMA_TINY, max_position_embeddings=256),
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/zo_ddp_scaling.json"))
    ap.add_argument("--model", choices=sorted(MODELS), default="1.1b")
    ap.add_argument(
        "--nproc", type=int, default=None, help="processes (default: CUDA devices, at most 2; CPU: 2)"
    )
    ap.add_argument("--batch", type=int, default=16, help="sequences per GPU per step")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1)
    ap.add_argument("--optimizer", default="zo_sgd", help="a ZO rule name from lightning_zobi.zo.OPTIMIZERS")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---------------------------------------------------------------------- launcher
def _worker_args(argv: list[str]) -> list[str]:
    """The arguments the workers get: all but ``--worker`` and ``--nproc N`` (torchrun reads ``--nproc``
    after the script path as an ambiguous abbreviation of its own ``--nproc-per-node``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif a != "--worker" and not a.startswith("--nproc="):
            out.append(a)
    return out


def launch(args: argparse.Namespace) -> None:
    nproc = args.nproc or (min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        __file__,
        "--worker",
        *_worker_args(sys.argv[1:]),
    ]
    subprocess.run(cmd, env=env, check=True)
    result = json.loads(args.out.read_text())
    print_table(result)


def print_table(result: dict[str, Any]) -> None:
    meta = result["meta"]
    print(f"\n{meta['model']} ({meta['params'] / 1e9:.2f}B params), {meta['dtype']}, {meta['device']}")
    print(f"per-GPU batch {meta['batch']}x{meta['seq']}, queries {meta['queries']}, rule {meta['optimizer']}")
    print(
        f"{'run':<18}{'GPUs':>5}{'step ms':>10}{'tokens/s':>12}{'scaling':>9}{'bytes/step':>12}{'peak GiB':>10}"
    )
    for row in result["runs"]:
        scaling = f"{row['scaling']:.3f}" if row.get("scaling") is not None else "-"
        print(
            f"{row['run']:<18}{row['gpus']:>5}{row['step_ms']:>10.1f}{row['tokens_per_s']:>12.0f}{scaling:>9}"
            f"{row['bytes_per_step']:>12}{row['peak_gib']:>10.2f}"
        )


# ---------------------------------------------------------------------- worker
def build_model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODELS[name])
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def timed(step: Any, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step (mean over ``steps`` after ``warmup``), synchronised across ranks."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def worker(args: argparse.Namespace) -> None:
    from lightning_zobi.zo.distributed import ZODataParallel
    from lightning_zobi.zo.optim import build_optimizer

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(args.model, device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(1000 + rank)  # each rank its own batch
    vocab = MODELS[args.model]["vocab_size"]
    tokens = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    rows: list[dict[str, Any]] = []

    def record(run: str, gpus: int, seconds: float, bytes_per_step: int) -> None:
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
        rows.append(
            dict(
                run=run,
                gpus=gpus,
                step_ms=1e3 * seconds,
                tokens_per_s=gpus * args.batch * args.seq / seconds,
                bytes_per_step=bytes_per_step,
                peak_gib=peak,
            )
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        return m(input_ids=tokens, labels=tokens).loss

    # ZO, one GPU per rank (no collective), then N GPUs shared / per-rank query seeds.
    zo_kwargs = dict(lr=1e-7, eps=1e-3, queries=args.queries, seed=0)
    for run, mode in (("zo", None), ("zo", "shared"), ("zo_per_rank", "per_rank")):
        if mode is not None and world == 1:
            continue
        opt = build_optimizer(args.optimizer, model.parameters(), **zo_kwargs)
        sync = None
        if mode is not None:
            sync = ZODataParallel(mode)
            sync.broadcast_parameters(model)
            sync.attach(opt)
        before = sync.zo_bytes_total if sync else 0
        seconds = timed(lambda opt=opt: opt.step(lambda: loss_fn(model)), args.steps, args.warmup, device)
        sent = (sync.zo_bytes_total - before) // (args.steps + args.warmup) if sync else 0
        record(run, world if mode else 1, seconds, sent)
        rows[-1]["optimizer_class"] = type(opt).__name__
        del opt

    # First-order AdamW: one GPU, then DistributedDataParallel.
    for ddp in (False, True):
        if ddp and world == 1:
            continue
        net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)

        def fo_step(net: torch.nn.Module = net, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(net).backward()
            opt.step()

        seconds = timed(fo_step, args.steps, args.warmup, device)
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) if ddp else 0
        record("fo_adamw", world if ddp else 1, seconds, grad_bytes)
        del opt, net
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()

    one_gpu = {r["run"].replace("_per_rank", ""): r["tokens_per_s"] for r in rows if r["gpus"] == 1}
    for r in rows:
        base = one_gpu.get(r["run"].replace("_per_rank", ""))
        r["scaling"] = r["tokens_per_s"] / (r["gpus"] * base) if base and r["gpus"] > 1 else None
    all_rows = [None] * world
    dist.all_gather_object(all_rows, rows)
    if rank == 0:
        device_name = torch.cuda.get_device_name(device) if cuda else "CPU (gloo)"
        result = dict(
            meta=dict(
                model=f"Llama {args.model}",
                params=n_params,
                dtype=str(dtype).replace("torch.", ""),
                device=f"{world} x {device_name}",
                batch=args.batch,
                seq=args.seq,
                queries=args.queries,
                optimizer=args.optimizer,
                steps=args.steps,
                warmup=args.warmup,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                torch=torch.__version__,
            ),
            runs=rows,
            per_rank_runs=all_rows,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        worker(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
