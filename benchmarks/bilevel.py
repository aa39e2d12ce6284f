"""Time and memory per step of each bilevel solver on a Llama-architecture model with a LoRA adapter.

Every row trains the same model (random weights from a config, seed 0) on the same batches; f is the
LM loss on the first half of a batch and g on the second half (``split_batch``-style):

* ``fo_lora``: reference, one AdamW step on ``f + g`` over the adapter (ordinary LoRA fine-tuning);
* ``penalty_k{K}``: value-function penalty, x = the whole model, y = the adapter, K inner Adam steps on z;
* ``vf_free``: value-function-free single loop on ``f + γ g``, x = the whole model, y = the adapter;
* ``zofo_k{K}``: Bilevel ZOFO, x = base weights by ZO-SGD, y = the adapter by AdamW, K inner steps;
* ``mezo``: reference, one ZO-SGD step on ``f + g`` over the base weights (no adapter training).

The safeguard ``keep_best_z`` is off so every step takes the full path (it can only save work).
Reported per row: median wall time per step, forwards per step (counted by a hook), the solver's
extra state (z and its inner optimizer, ZO state), the optimizer state, and the peak memory of the
step: ``torch.cuda.max_memory_allocated`` on CUDA, or the process's peak RSS on CPU (each row then
runs in its own subprocess so peaks do not mix). Writes ``benchmarks/results/bilevel_<device>.json``.

Run: ``python benchmarks/bilevel.py`` (CPU) or ``python benchmarks/bilevel.py --device cuda --hidden 1024
--layers 12 --batch 8 --seq 256``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_zobi.bilevel import BilevelProblem, BilevelZOFO, ValueFunctionFree, ValueFunctionPenalty
from lightning_zobi.bilevel.problem import half_batch, select_parameters
from lightning_zobi.zo import ZOSGD

ROWS = ["fo_lora", "penalty_k1", "penalty_k3", "vf_free", "zofo_k1", "zofo_k3", "mezo"]


def build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=max(args.seq, 128),
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, args.dtype))
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, lora)


def nbytes(tensors: Any) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(nbytes(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(nbytes(v) for v in tensors)
    return 0


def run_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model = build(args, device)
    gen = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, args.vocab, (2 * args.batch, args.seq), generator=gen).to(device)
        for _ in range(args.steps)
    ]
    forwards = [0]
    model.base_model.model.model.register_forward_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))

    def loss(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    names = dict(model.named_parameters())
    lora = [p for _, p in select_parameters(model, "lora")]
    base = [p for _, p in select_parameters(model, "base")]
    if name.startswith(("penalty", "vf_free")):
        for p in base:
            p.requires_grad_(True)  # first-order bilevel over the whole model
    problem = BilevelProblem(
        upper_loss=lambda b: loss(half_batch(b, 0)),
        lower_loss=lambda b: loss(half_batch(b, 1)),
        upper_params=list(names.values()) if not name.startswith(("zofo", "mezo")) else base,
        lower_params=lora,
    )
    trained = problem.joint_params
    solver_state: Any = None
    if name == "fo_lora":
        opt = torch.optim.AdamW(lora, lr=1e-3)

        def step(b: torch.Tensor) -> None:
            f, g = problem.losses(b)
            (f + g).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    elif name == "mezo":
        opt = ZOSGD(base, lr=1e-6, eps=1e-3)

        def step(b: torch.Tensor) -> None:
            opt.step(lambda: sum(problem.losses(b)))

    else:
        k = int(name.rsplit("_k", 1)[1]) if "_k" in name else 1
        params = lora if name.startswith("zofo") else trained
        opt = torch.optim.AdamW(params, lr=1e-3)
        if name.startswith("penalty"):
            solver = ValueFunctionPenalty(
                problem,
                opt,
                gamma=10.0,
                inner_steps=k,
                inner_lr=1e-3,
                inner_optimizer="adam",
                keep_best_z=False,
            )
        elif name == "vf_free":
            solver = ValueFunctionFree(problem, opt, gamma=1.0)
        else:
            solver = BilevelZOFO(
                problem,
                opt,
                gamma=1.0,
                inner_steps=k,
                inner_lr=1e-3,
                inner_optimizer="adam",
                zo_lr=1e-6,
                keep_best_z=False,
            )
        solver_state = solver

        def step(b: torch.Tensor) -> None:
            solver.step(b)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    before = (
        torch.cuda.memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    step(batches[0])  # warm-up (allocates optimizer state)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    forwards[0] = 0
    times = []
    for b in batches[1:]:
        sync()
        t0 = time.perf_counter()
        step(b)
        sync()
        times.append(time.perf_counter() - t0)
    weights = nbytes(list(names.values()))
    extra = 0
    if solver_state is not None and hasattr(solver_state, "inner"):
        extra += nbytes(solver_state.inner.state_dict())
    opt_state = nbytes([s for s in opt.state_dict()["state"].values()])
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "solver": name,
        "ms_per_step": 1e3 * statistics.median(times),
        "forwards_per_step": forwards[0] / len(times),
        "weights_mb": weights / 2**20,
        "fo_trained_mb": nbytes([p for p in params_for_fo(name, lora, trained)]) / 2**20,
        "solver_state_mb": extra / 2**20,
        "optimizer_state_mb": opt_state / 2**20,
        "peak_mb": peak / 2**20,
        "step_growth_mb": (peak - before) / 2**20,
        "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }


def params_for_fo(name: str, lora: list[torch.Tensor], trained: list[torch.Tensor]) -> list[torch.Tensor]:
    if name in ("fo_lora",) or name.startswith("zofo"):
        return lora
    if name == "mezo":
        return []
    return trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="samples per level (the batch holds 2x)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="steps timed (+1 warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: default)")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        print(json.dumps(run_row(args.only, args)))
        return
    rows = []
    for name in args.rows.split(","):
        if args.device == "cpu":  # one process per row: peak RSS must not mix
            cmd = [sys.executable, __file__, *sys.argv[1:], "--only", name]
            out = (
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            row = json.loads(out)
        else:
            row = run_row(name, args)
            torch.cuda.empty_cache()
        rows.append(row)
        print(
            f"{row['solver']:<11} {row['ms_per_step']:9.1f} ms/step  {row['forwards_per_step']:5.1f} fwd  "
            f"peak {row['peak_mb']:9.1f} MB (+{row['step_growth_mb']:8.1f} over set-up)  solver state {row['solver_state_mb']:7.2f} MB  "
            f"opt state {row['optimizer_state_mb']:8.2f} MB",
            flush=True,
        )
    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    )
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "args": {k: v for k, v in vars(args).items() if k != "only"},
        "command": "python benchmarks/bilevel.py " + " ".join(sys.argv[1:]),
    }
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"bilevel_{args.device.split(':')[0]}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
