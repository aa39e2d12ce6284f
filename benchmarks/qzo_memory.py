"""Peak memory and step time of QZO (4-bit nf4 scales) against bf16 inference, bf16 ZO and bf16 FO AdamW.

"Fine-tuning Quantized Neural Networks with Zeroth-order Optimization" (Shang et al., arXiv
2505.13430) claims QZO fine-tunes a 4-bit LLM in a fraction of bf16 inference memory. For a
Llama-2-7B-shaped model with random weights (``LlamaConfig``, no hub), each mode runs in its own
process (so one mode's allocations cannot inflate another's peak) on one device:

* ``bf16_inference``: forward with the loss under ``torch.no_grad`` (the reference for ratios);
* ``bf16_zo``: ZO-SGD (MeZO) over every bf16 weight, 2 forwards a step, built by
  ``build_optimizer("zo_sgd")`` (the fused Triton path on CUDA, the torch path on CPU);
* ``bf16_fo_adamw``: forward + backward + fused ``torch.optim.AdamW`` over every bf16 weight;
* ``qzo``: the linear layers quantized to bitsandbytes nf4 (``quantize_linear_4bit_``, double
  quantization on, as QLoRA), scales un-nested by ``find_quant_scales`` and trained by
  :class:`lightning_zobi.quant.QZOOptimizer` on the torch path; embeddings, norms and ``lm_head`` stay bf16;
* ``qzo_fused``: the same on the fused Triton path (:class:`~lightning_zobi.quant.qzo_fused.FusedQZOOptimizer`,
  what ``qzo_optimizer`` picks on CUDA);
* ``nf4_inference``: one forward of that 4-bit model (the reference for a QZO step's 2 forwards).

Ratios: ``× 2 fwd`` is a ZO step's time over two forwards of its own model (nf4 for the QZO
modes, bf16 otherwise). Reported per mode: peak allocated memory during the timed steps (``torch.cuda.max_memory_allocated``
after a reset; on CPU, which has no allocator statistics: the bytes of the model, gradients and
optimizer state, without activations, plus the process's peak RSS), the model's
resident bytes, the median step time over ``--steps`` steps after ``--warmup``, and the first/last
loss. Ratios are to ``bf16_inference``; the issue's target is QZO peak ≤ 0.35× bf16 inference.

Run (GPU, one H200, < 4 min):  python benchmarks/qzo_memory.py --out $OUT/qzo.json
Run (CPU smoke test):          python benchmarks/qzo_memory.py --tiny
Needs bitsandbytes (``pip install bitsandbytes``) for the ``qzo`` mode; writes
benchmarks/results/qzo_memory.json (``--tiny``: qzo_memory_tiny.json) or ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers next to this script
from _common import LLAMA_6_7B, device_name, llama_on, sync  # noqa: E402

MODES = ("bf16_inference", "bf16_zo", "bf16_fo_adamw", "qzo", "qzo_fused", "nf4_inference")
QUANTIZED = ("qzo", "qzo_fused", "nf4_inference")

LLAMA_7B = dict(LLAMA_6_7B, max_position_embeddings=4096)
"""Llama-2-7B's architecture (6.7 B parameters)."""

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=256,
    max_position_embeddings=128,
)


def build_model(config: dict[str, Any], device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A random-weight bf16 Llama built directly on ``device``."""
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    model = llama_on(LlamaConfig(**config), device, torch.bfloat16)  # bf16 weights directly, no fp32 copy
    model.config.use_cache = False
    return model


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct tensor the model holds: parameters, buffers and bitsandbytes quant states."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor | None) -> None:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            add(state.absmax)
            add(state.code)
            if state.nested:
                add(state.state2.absmax)
                add(state.state2.code)
    return sum(seen.values())


def run_mode(
    mode: str, config: dict[str, Any], batch: tuple[int, int], steps: int, warmup: int, device: torch.device
) -> dict[str, Any]:
    """Build the model for ``mode``, time ``steps`` steps after ``warmup``, return the measurements."""
    model = build_model(config, device)
    scales_info: dict[str, Any] = {}
    if mode in QUANTIZED:
        from lightning_zobi.quant import find_quant_scales, quantize_linear_4bit_, qzo_optimizer

        quantize_linear_4bit_(model, compress_statistics=True, compute_dtype=torch.bfloat16)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        scales = find_quant_scales(model)
        scales_info = dict(
            quantized_layers=len(scales),
            trainable_scales=scales.numel(),
            unnest_extra_bytes=scales.extra_bytes,
        )
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config["vocab_size"], batch, generator=gen).to(device)

    def loss_fn() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    if mode in ("bf16_inference", "nf4_inference"):
        model.eval()

        def step() -> float:
            with torch.no_grad():
                return float(loss_fn())
    elif mode == "bf16_zo":
        from lightning_zobi.zo import build_optimizer

        for p in model.parameters():
            p.requires_grad_(False)
        # the project's default ZO-SGD: the fused Triton path on CUDA, the torch path on CPU
        opt = build_optimizer("zo_sgd", list(model.parameters()), lr=1e-7, eps=1e-3)
        scales_info = dict(optimizer=type(opt).__name__)

        def step() -> float:
            return opt.step(loss_fn)
    elif mode == "bf16_fo_adamw":
        model.train()
        fused = device.type == "cuda"
        adamw = torch.optim.AdamW(
            model.parameters(), lr=1e-5, fused=fused, foreach=False if not fused else None
        )

        def step() -> float:
            loss = loss_fn()
            loss.backward()
            adamw.step()
            adamw.zero_grad(set_to_none=True)
            return float(loss.detach())
    elif mode in ("qzo", "qzo_fused"):
        qzo = qzo_optimizer(scales, lr=1e-5, eps=1e-3, fused=mode == "qzo_fused")
        scales_info["optimizer"] = type(qzo).__name__

        def step() -> float:
            return qzo.step(loss_fn)
    else:
        raise ValueError(f"mode={mode!r} is unknown; choose from {MODES}.")

    resident = model_bytes(model)
    losses = [step() for _ in range(warmup)]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        losses.append(step())
        sync(device)
        times.append(time.perf_counter() - t0)
    out: dict[str, Any] = dict(
        mode=mode,
        model_bytes=resident,
        step_ms_median=1000 * statistics.median(times),
        step_ms=[round(1000 * t, 3) for t in times],
        loss_first=losses[0],
        loss_last=losses[-1],
        **scales_info,
    )
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["allocated_before_steps_bytes"] = base
    else:
        # CPU: no allocator statistics. Count what persists across steps: the model, gradients and
        # optimizer state (activations are not included), and report the process's peak RSS.
        grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
        opt_state = 0
        if mode == "bf16_fo_adamw":
            opt_state = sum(
                t.nbytes for st in adamw.state.values() for t in st.values() if torch.is_tensor(t)
            )
        out["peak_bytes"] = resident + grads + opt_state
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def run_isolated(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one mode in a fresh interpreter and parse its JSON line (peak memory per process)."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    cmd += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)] + (
        ["--tiny"] if args.tiny else []
    )
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return dict(mode=mode, error=(proc.stderr or proc.stdout)[-2000:])


def table(results: list[dict[str, Any]]) -> str:
    ref = next((r for r in results if r["mode"] == "bf16_inference" and "error" not in r), None)
    rows = [
        f"{'mode':<16}{'peak MiB':>11}{'× infer':>9}{'model MiB':>11}{'step ms':>10}{'× 2 fwd':>9}"
        f"{'loss first→last':>22}"
    ]
    for r in results:
        if "error" in r:
            rows.append(f"{r['mode']:<16} failed: {r['error'].strip().splitlines()[-1][:80]}")
            continue
        ratio = r["peak_bytes"] / ref["peak_bytes"] if ref else float("nan")
        rows.append(
            f"{r['mode']:<16}{r['peak_bytes'] / 2**20:>11.1f}{ratio:>9.3f}{r['model_bytes'] / 2**20:>11.1f}"
            f"{r['step_ms_median']:>10.1f}{r.get('step_ratio_to_2_forwards', float('nan')):>9.3f}"
            f"{r['loss_first']:>11.4f}→{r['loss_last']:<10.4f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on CPU (smoke test)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (tiny 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 256 (tiny 32)")
    parser.add_argument(
        "--in-process", action="store_true", help="run modes in this process (default on CPU)"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.tiny else 10)
    args.batch_size = args.batch_size or (4 if args.tiny else 8)
    args.seq_len = args.seq_len or (32 if args.tiny else 256)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    config = TINY if args.tiny else LLAMA_7B
    batch = (args.batch_size, args.seq_len)
    if args.child:
        print(json.dumps(run_mode(args.child, config, batch, args.steps, args.warmup, device)))
        return {}
    results = []
    for mode in args.modes:
        if args.in_process or device.type == "cpu":
            try:
                results.append(run_mode(mode, config, batch, args.steps, args.warmup, device))
            except Exception as err:  # report and keep measuring the other modes
                results.append(dict(mode=mode, error=f"{type(err).__name__}: {err}"))
            gc.collect()
        else:
            results.append(run_isolated(mode, args))
        last = results[-1]
        status = last.get("error", "").strip().splitlines()[-1:] or [f"{last['step_ms_median']:.1f} ms/step"]
        print(f"[qzo_memory] {mode}: {status[0][:120]}", flush=True)
    ref = next((r for r in results if r["mode"] == "bf16_inference" and "error" not in r), None)
    forwards = {
        r["mode"]: r["step_ms_median"]
        for r in results
        if r["mode"].endswith("_inference") and "error" not in r
    }
    for r in results:
        if ref and "error" not in r:
            r["peak_ratio_to_bf16_inference"] = r["peak_bytes"] / ref["peak_bytes"]
        forward = forwards.get("nf4_inference" if r["mode"].startswith("qzo") else "bf16_inference")
        if forward and "error" not in r and r["mode"] in ("bf16_zo", "qzo", "qzo_fused"):
            r["step_ratio_to_2_forwards"] = r["step_ms_median"] / (2 * forward)
    report = dict(
        benchmark="qzo_memory",
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        device=device_name(device),
        torch=torch.__version__,
        config=config,
        batch=list(batch),
        steps=args.steps,
        warmup=args.warmup,
        command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        results=results,
    )
    print("\n" + table(results))
    default = Path(__file__).parent / "results" / ("qzo_memory_tiny.json" if args.tiny else "qzo_memory.json")
    out = args.out or default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
