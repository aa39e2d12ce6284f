"""GPU benchmark: an SD-1.5-shaped UNet (random weights, bf16, 64x64 latents) — time and peak memory per step.

Built from its config (``UNet2DConditionModel``, block channels 320/640/1280/1280, 2 layers per block,
cross-attention dim 768: ~860 M parameters), no download. The text encoder is not part of a UNet step:
the conditioning is a fixed random ``(B, 77, 768)`` tensor (a precomputed prompt embedding), the
latents ``(B, 4, 64, 64)``, timesteps and noise are drawn once per step. Modes (each on a freshly built
model, peak = ``torch.cuda.max_memory_allocated`` over the timed steps, weights included):

* ``bf16_inference`` / ``nf4_inference``: one UNet forward (no grad), the memory reference;
* ``fo``: first-order fine-tuning, denoising loss, AdamW (fused on CUDA) on the bf16 weights;
* ``fo_student``: the same on the BK-SDM student (the step the bilevel one is compared with). The student
  is BK-SDM-Small-shaped: one (resnet, attention) pair per stage kept and the mid-block removed
  (``remove_unet_blocks(keep=1, drop_mid=True)``): 859.5 M → 482.3 M parameters (checked on the meta device;
  BK-SDM-Small: 0.49 B);
* ``bilevel``: the one-phase prune+distill+unlearn step of arXiv 2412.15341 on the BK-SDM student
  with the frozen teacher: ``ValueFunctionPenalty``
  (γ = 1, one inner Adam step on a copy of the student), upper = ESD (negative guidance 1) on a concept
  embedding, lower = output KD from the teacher + denoising; AdamW;
* ``zo``: ZO fine-tuning, ``build_optimizer("zo_sgd", ..., perturbation="exact")`` (the fused Triton
  path when the weights are on CUDA), forward-only;
* ``qzo``: QZO on the UNet with every ``nn.Linear`` in bitsandbytes nf4 (``quantize_linear_4bit_``,
  double quantization; convolutions stay bf16), ``qzo_optimizer`` on the scales (fused on CUDA);
* ``student_speed``: teacher vs student UNet forward (bf16, no grad): params and the speed-up.

Expect for ``qzo``/``nf4_inference``: bitsandbytes quantizes ``nn.Linear`` only, and 589.0 M of SD-1.5's
859.5 M UNet parameters are convolutions (270.0 M linear; counted on the meta device), so the resident
weights go from 1.72 GB (bf16) to about 1.32 GB, not to a quarter. Reaching the ≤ 0.35× target needs 4-bit
convolutions (a dequantize-then-``conv2d`` layer and a QZO scale adapter for it), which the package lacks.

Targets (issue 19): QZO peak ≤ 2.4 GB (ZOODiP: 2.37 GB) and ≤ 0.35× the bf16 inference peak; bilevel
step ≤ 3× a first-order step. A mode that fails is recorded with its error and the others still run.

Run (H200): ``python benchmarks/diffusion_sd15_gpu.py --out benchmarks/results/diffusion_sd15_h200.json``
(``--batch 4`` for a larger batch; ``--modes fo,zo`` for a subset).
CPU smoke test: ``python benchmarks/diffusion_sd15_gpu.py --tiny --out /tmp/sd15_tiny.json`` (seconds).
Needs: torch, diffusers, bitsandbytes, lightning_zobi.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
"""runwayml/stable-diffusion-v1-5's ``unet/config.json`` (the fields that shape it)."""

TINY_UNET: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=8,
    norm_num_groups=8,
)
"""The same layout in miniature (CPU smoke test)."""

MODES = ("bf16_inference", "nf4_inference", "fo", "fo_student", "bilevel", "zo", "qzo", "student_speed")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_unet(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight ``UNet2DConditionModel`` created on ``device`` in ``dtype`` (no fp32 copy)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return unet.to(device=device)


def bk_sdm_student(teacher):
    """BK-SDM-Small-style student: one (resnet, attention) pair per stage kept, mid-block removed."""
    from lightning_zobi.diffusion.pruning import remove_unet_blocks

    student = copy.deepcopy(teacher)
    remove_unet_blocks(student, keep=1, drop_mid=True)
    return student


class Inputs:
    """Per-step draws (latents, noise, timesteps) and the fixed prompt / concept / empty embeddings."""

    def __init__(self, config, batch: int, device, dtype, tokens: int) -> None:
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
        )
        self.shape = (batch, config["in_channels"], config["sample_size"], config["sample_size"])
        gen = torch.Generator().manual_seed(0)
        dim = config["cross_attention_dim"]
        self.prompt = torch.randn(batch, tokens, dim, generator=gen).to(device, dtype)
        self.concept = torch.randn(batch, tokens, dim, generator=gen).to(device, dtype)
        self.empty = torch.randn(1, tokens, dim, generator=gen).to(device, dtype).expand(batch, -1, -1)
        self.device, self.dtype, self.step = device, dtype, 0

    def draw(self) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(1000 + self.step)
        self.step += 1
        x0 = torch.randn(self.shape, generator=gen)
        noise = torch.randn(self.shape, generator=gen)
        t = torch.randint(0, 1000, (self.shape[0],), generator=gen)
        x_t = self.scheduler.add_noise(x0, noise, t)
        return {
            "x_t": x_t.to(self.device, self.dtype),
            "noise": noise.to(self.device, self.dtype),
            "t": t.to(self.device),
        }


def _denoise(unet, b, hidden):
    return F.mse_loss(unet(b["x_t"], b["t"], encoder_hidden_states=hidden).sample.float(), b["noise"].float())


def _fo_step(unet, inputs, fused: bool) -> Callable[[], float]:
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=fused or None, foreach=None if fused else False)

    def step() -> float:
        loss = _denoise(unet, inputs.draw(), inputs.prompt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _bilevel_step(teacher, inputs, fused: bool) -> tuple[Callable[[], float], int]:
    from lightning_zobi.bilevel import BilevelProblem, ValueFunctionPenalty
    from lightning_zobi.diffusion.distill import output_distillation_loss
    from lightning_zobi.unlearn.diffusion import esd_loss

    teacher.eval().requires_grad_(False)
    student = bk_sdm_student(teacher).train().requires_grad_(True)

    def upper(b):  # ESD on the concept embedding
        pred = student(b["x_t"], b["t"], encoder_hidden_states=inputs.concept).sample
        with torch.no_grad():
            t_c = teacher(b["x_t"], b["t"], encoder_hidden_states=inputs.concept).sample
            t_u = teacher(b["x_t"], b["t"], encoder_hidden_states=inputs.empty).sample
        return esd_loss(pred, t_u, t_c, 1.0)

    def lower(b):  # recovery: denoising + output KD
        pred = student(b["x_t"], b["t"], encoder_hidden_states=inputs.prompt).sample
        with torch.no_grad():
            t_pred = teacher(b["x_t"], b["t"], encoder_hidden_states=inputs.prompt).sample
        return F.mse_loss(pred.float(), b["noise"].float()) + output_distillation_loss(pred, t_pred)

    params = list(student.parameters())
    problem = BilevelProblem(upper_loss=upper, lower_loss=lower, upper_params=params, lower_params=params)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=fused or None, foreach=None if fused else False)
    solver = ValueFunctionPenalty(
        problem, opt, gamma=1.0, inner_steps=1, inner_lr=1e-5, inner_optimizer="adam"
    )

    def step() -> float:
        logs = solver.step(inputs.draw())
        return float(logs["f"] + logs["g"])

    return step, _params(student)


def _zo_step(unet, inputs) -> tuple[Callable[[], float], str]:
    from lightning_zobi.zo import build_optimizer

    unet.requires_grad_(False)
    opt = build_optimizer("zo_sgd", list(unet.parameters()), lr=1e-7, eps=1e-3, perturbation="exact")
    holder: dict[str, Any] = {}

    def loss_fn() -> torch.Tensor:
        return _denoise(unet, holder["b"], inputs.prompt)

    def step() -> float:
        holder["b"] = inputs.draw()  # both forwards of the query see the same draws
        with torch.no_grad():
            return float(opt.step(loss_fn))

    return step, type(opt).__name__


def _quantize(unet, device) -> dict[str, Any]:
    from lightning_zobi.quant import find_quant_scales, keep_cpu_layout_, quantize_linear_4bit_

    names = quantize_linear_4bit_(unet, skip=None, compress_statistics=True, compute_dtype=torch.bfloat16)
    if device.type == "cpu":
        keep_cpu_layout_(unet)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    scales = find_quant_scales(unet)
    return {"quantized_layers": len(names), "scales": scales}


def _qzo_step(unet, inputs, device) -> tuple[Callable[[], float], dict[str, Any]]:
    from lightning_zobi.quant import qzo_optimizer

    info = _quantize(unet, device)
    scales = info.pop("scales")
    for p in unet.parameters():
        p.requires_grad_(False)
    opt = qzo_optimizer(scales, lr=1e-5, eps=1e-3)
    info.update(trainable_scales=scales.numel(), optimizer=type(opt).__name__)
    holder: dict[str, Any] = {}

    def loss_fn() -> torch.Tensor:
        return _denoise(unet, holder["b"], inputs.prompt)

    def step() -> float:
        holder["b"] = inputs.draw()
        with torch.no_grad():
            return float(opt.step(loss_fn))

    return step, info


def _inference_step(unet, inputs) -> Callable[[], float]:
    unet.eval()

    def step() -> float:
        with torch.no_grad():
            return float(_denoise(unet, inputs.draw(), inputs.prompt))

    return step


def _timed(step: Callable[[], float], steps: int, warmup: int, device) -> dict[str, Any]:
    losses = [step() for _ in range(warmup)]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        losses.append(step())
        sync(device)
        times.append(time.perf_counter() - t0)
    out = {
        "step_ms_median": 1e3 * statistics.median(times),
        "step_ms": [round(1e3 * t, 3) for t in times],
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1],
        "finite": all(v == v and abs(v) != float("inf") for v in losses),
    }
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["allocated_before_steps_bytes"] = resident
    return out


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_mode(mode: str, config, args, device, dtype) -> dict[str, Any]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    unet = build_unet(config, device, dtype)
    inputs = Inputs(config, args.batch, device, dtype, args.tokens)
    fused = device.type == "cuda"
    extra: dict[str, Any] = {"params": _params(unet)}
    if mode == "bf16_inference":
        step = _inference_step(unet, inputs)
    elif mode == "nf4_inference":
        info = _quantize(unet, device)
        info.pop("scales")
        extra.update(info)
        step = _inference_step(unet, inputs)
    elif mode == "fo":
        step = _fo_step(unet, inputs, fused)
    elif mode == "fo_student":
        unet = bk_sdm_student(unet)
        extra["params"] = _params(unet)
        step = _fo_step(unet, inputs, fused)
    elif mode == "bilevel":
        step, extra["student_params"] = _bilevel_step(unet, inputs, fused)
    elif mode == "zo":
        step, name = _zo_step(unet, inputs)
        extra["optimizer"] = name
    elif mode == "qzo":
        step, info = _qzo_step(unet, inputs, device)
        extra.update(info)
    elif mode == "student_speed":
        return _student_speed(unet, inputs, args, device)
    else:
        raise ValueError(f"mode={mode!r} is unknown: choose from {MODES}.")
    return {"mode": mode, **extra, **_timed(step, args.steps, args.warmup, device)}


def _student_speed(teacher, inputs, args, device) -> dict[str, Any]:
    student = bk_sdm_student(teacher)
    t_step, s_step = _inference_step(teacher, inputs), _inference_step(student, inputs)
    t_ms, s_ms = [], []
    for _ in range(1 if args.tiny else 3):  # interleaved rounds: background load hits both alike
        t_ms.append(_timed(t_step, args.steps, args.warmup, device)["step_ms_median"])
        s_ms.append(_timed(s_step, args.steps, args.warmup, device)["step_ms_median"])
    t, s = statistics.median(t_ms), statistics.median(s_ms)
    return {
        "mode": "student_speed",
        "teacher_params": _params(teacher),
        "student_params": _params(student),
        "teacher_step_ms": t,
        "student_step_ms": s,
        "speedup": t / s,
    }


def _gb(v) -> str:
    return "—" if v is None else f"{v / 2**30:.2f}"


def table(results: dict[str, Any]) -> None:
    rows = results["modes"]
    print(f"\n{results['device']}, batch {results['args']['batch']}, {results['args']['size']} config\n")
    print("| mode | params | step ms (median) | peak GiB | loss first → last | note |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        r = rows.get(mode)
        if r is None:
            continue
        if "error" in r:
            print(f"| {mode} | — | — | — | — | error: {r['error'].splitlines()[-1][:80]} |")
            continue
        if mode == "student_speed":
            print(
                f"| {mode} | {r['teacher_params']:,} → {r['student_params']:,} | {r['teacher_step_ms']:.2f} → "
                f"{r['student_step_ms']:.2f} | — | — | {r['speedup']:.2f}× faster |"
            )
            continue
        note = r.get("optimizer", "")
        if "quantized_layers" in r:
            note += f" {r['quantized_layers']} nf4 layers"
        print(
            f"| {mode} | {r['params']:,} | {r['step_ms_median']:.2f} | {_gb(r.get('peak_bytes'))} "
            f"| {r['loss_first']:.4f} → {r['loss_last']:.4f} | {note.strip()} |"
        )
    for k, v in results.get("ratios", {}).items():
        print(f"{k}: {v:.3f}")


def ratios(rows: dict[str, Any]) -> dict[str, float]:
    def ok(m):
        return m in rows and "error" not in rows[m]

    out = {}
    if ok("bilevel") and ok("fo_student"):
        out["bilevel_step / fo_student_step"] = (
            rows["bilevel"]["step_ms_median"] / rows["fo_student"]["step_ms_median"]
        )
    if ok("bilevel") and ok("fo"):
        out["bilevel_step / fo_step (full UNet)"] = (
            rows["bilevel"]["step_ms_median"] / rows["fo"]["step_ms_median"]
        )
    peak = {m: rows[m].get("peak_bytes") for m in rows if ok(m) and rows[m].get("peak_bytes")}
    if "qzo" in peak and "bf16_inference" in peak:
        out["qzo_peak / bf16_inference_peak"] = peak["qzo"] / peak["bf16_inference"]
    if "qzo" in peak:
        out["qzo_peak_GB (1e9 bytes)"] = peak["qzo"] / 1e9
    return out


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="where the JSON goes")
    p.add_argument("--tiny", action="store_true", help="a tiny UNet of the same layout on CPU (smoke test)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=77, help="text tokens of the conditioning")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 10; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.size = "tiny" if args.tiny else "SD-1.5"
    if args.tiny:
        args.tokens = min(args.tokens, 8)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and device.type != "cuda":
        raise SystemExit(
            "no CUDA device visible: this benchmark is for a GPU; --tiny runs the CPU smoke test."
        )
    # bf16 on the GPU (the benchmark's point); fp32 for the CPU smoke test (bf16 CPU kernels are slow)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = TINY_UNET if args.tiny else SD15_UNET
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes {unknown} unknown: choose from {MODES}.")
    import diffusers

    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "dtype": str(dtype),
        "args": vars(args),
        "config": config,
        "modes": {},
    }
    for mode in modes:
        try:
            results["modes"][mode] = run_mode(mode, config, args, device, dtype)
        except Exception as err:  # record and go on: the lead runs this once on a borrowed GPU
            results["modes"][mode] = {"mode": mode, "error": "".join(traceback.format_exception(err))[-2000:]}
        print(json.dumps({k: v for k, v in results["modes"][mode].items() if k != "step_ms"}), flush=True)
    results["ratios"] = ratios(results["modes"])
    table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
