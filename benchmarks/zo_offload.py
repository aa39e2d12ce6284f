"""ZO past the GPU's memory: offloaded ZO-SGD steps on a Llama shape whose bf16 weights exceed a cap.

The weights live in pinned host memory (``lightning_zobi.zo.offload``); each tensor is copied to
the GPU just before its module runs (prefetched on a side stream in forward order), perturbed
there, and dropped after; the update fetches each tensor, applies ZO-SGD with stochastic rounding
and writes it back. A step therefore moves the weights host→device three times (two forwards and
the update) and device→host once. Measured in the same run:

* ``step``: the offloaded exact ZO-SGD step (median over ``--steps``);
* ``floor``: the transfer floor of that scheme, 3 × (all weights host→device) + 1 × device→host,
  each timed as a plain tensor-by-tensor copy of the same pinned weights;
* ``forward``: one forward of the same model with its weights resident (only when they fit).

``--cap-gb`` caps the process's GPU memory (``torch.cuda.set_per_process_memory_fraction``) to
emulate a smaller card; peak GPU memory is reported. Writes JSON to ``--out``.

    python benchmarks/zo_offload.py --shape 13b --cap-gb 24 --out benchmarks/results/zo_offload.json
    python benchmarks/zo_offload.py --shape tiny --device cpu --steps 2      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_zobi.zo import build_optimizer, offload_parameters

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, vocab_size=32000),
}


def build(shape: str) -> LlamaForCausalLM:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, torch_dtype="bfloat16")
    with no_init_weights():
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.02, 0.02, generator=gen)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="13b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cap-gb", type=float, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prefetch", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if cuda and args.cap_gb:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * 2**30 / total, device)
    t0 = time.perf_counter()
    model = build(args.shape)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    build_s = time.perf_counter() - t0
    # buffers (rotary inv_freq) on the device; the weights stay on the host until offloaded
    for name, buf in model.named_buffers():
        module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        module._buffers[name.rsplit(".", 1)[-1]] = buf.to(device)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    opt = build_optimizer("zo_sgd", model.parameters(), lr=1e-7, eps=1e-3, seed=0, fused=False)
    offload = offload_parameters(opt, model, device=device, prefetch=args.prefetch)
    params = list(model.parameters())

    def h2d() -> None:
        for p in params:
            p.data.to(device, non_blocking=True)

    largest = max(p.numel() for p in params)
    dev_scratch = torch.empty(largest, dtype=torch.bfloat16, device=device)
    host_scratch = torch.empty(largest, dtype=torch.bfloat16, pin_memory=cuda)

    def d2h() -> None:  # the update's write-back: every weight's size, device→pinned host
        for p in params:
            host_scratch[: p.numel()].copy_(dev_scratch[: p.numel()], non_blocking=False)

    h2d_s = statistics.median(timed(h2d, device) for _ in range(2))
    d2h_s = timed(d2h, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    closure = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    times, losses = [], []
    for _ in range(args.steps + 1):
        times.append(timed(lambda: losses.append(opt.step(closure)), device))
    step_s = statistics.median(times[1:])
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    floor = 3 * h2d_s + d2h_s
    row = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "shape": args.shape,
        "params": sum(p.numel() for p in params),
        "weights_gb": weights_bytes / 2**30,
        "cap_gb": args.cap_gb,
        "batch": args.batch,
        "seq": args.seq,
        "step_s": step_s,
        "h2d_s": h2d_s,
        "d2h_s": d2h_s,
        "floor_s": floor,
        "step_over_floor": step_s / floor if floor else None,
        "peak_gpu_gb": peak / 2**30,
        "bytes_to_device_per_step": offload.bytes_to_device / (args.steps + 1),
        "losses": losses,
        "build_s": build_s,
    }
    print(f"{'shape':>6} {'weights GB':>10} {'cap GB':>7} {'step s':>8} {'floor s':>8} {'step/floor':>10} {'peak GPU GB':>11}")
    print(
        f"{args.shape:>6} {row['weights_gb']:>10.1f} {str(args.cap_gb):>7} {step_s:>8.3f} {floor:>8.3f} "
        f"{(row['step_over_floor'] or 0):>10.2f} {row['peak_gpu_gb']:>11.2f}"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
