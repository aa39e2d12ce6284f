"""GPU smoke run of the Stable Diffusion path: tiny SD from configs, BK-SDM student, bf16, one-phase bilevel, sampling.

What it checks on a GPU (in about a minute, no downloads): ``DiffusionModule(stable_diffusion="tiny")``
builds the tiny SD parts (UNet2DConditionModel + CLIP text encoder + VAE from configs), removes blocks
from the student UNet in the BK-SDM manner, and fine-tunes it with the ``Bilevel`` callback
(upper = ESD suppression of the prompt "a handwritten digit three", lower = distillation from the
unpruned UNet + denoising) under ``precision="bf16-mixed"``; then the student and the teacher run
in a ``StableDiffusionPipeline`` in bfloat16 and their per-step UNet time is measured (CUDA events).

Prints a JSON summary and writes it to ``benchmarks/results/diffusion_sd_smoke.json``.
Run: ``python benchmarks/diffusion_sd_smoke.py`` (``--device cpu`` runs the same path on a CPU).
Needs: torch (CUDA), lightning, transformers, diffusers, torch-pruning, scikit-learn, scipy, pillow.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers next to this script
from _common import quiet_trainer  # noqa: E402

warnings.filterwarnings("ignore")


def _unet_step_ms(unet, latents, t, hidden, repeats: int, device: str) -> float:
    with torch.no_grad():
        for _ in range(3):
            unet(latents, t, encoder_hidden_states=hidden)
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                unet(latents, t, encoder_hidden_states=hidden)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / repeats
        begin = time.perf_counter()
        for _ in range(repeats):
            unet(latents, t, encoder_hidden_states=hidden)
        return 1e3 * (time.perf_counter() - begin) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--steps", type=int, default=20, help="bilevel training steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results/diffusion_sd_smoke.json")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible; run with --device cpu for the CPU path.")

    import lightning.pytorch as pl

    from lightning_zobi.diffusion.sd import sd_pipeline
    from lightning_zobi.lightning.callbacks.bilevel import Bilevel
    from lightning_zobi.lightning.datamodules.digits import DigitsDataModule
    from lightning_zobi.lightning.modules.diffusion import DiffusionModule

    pl.seed_everything(0)
    module = DiffusionModule(
        stable_diffusion="tiny",
        remove_blocks=1,
        objective="bilevel",
        forget_class=3,
        upper_scope="esd_x",
        feature_weight=0.5,
        samples_per_class=0,
        sample_steps=10,
    )
    data = DigitsDataModule(
        size=32, channels=3, batch_size=args.batch, forget_class=3, forget_batch_size=args.batch
    )
    callback = Bilevel(solver="penalty", gamma=1.0, inner_steps=1, inner_optimizer="adam", inner_lr=1e-3)
    trainer = quiet_trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=args.steps,
        callbacks=[callback],
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    fit_s = time.perf_counter() - start
    logs = {k: float(v) for k, v in callback.last_logs.items()}

    device, dtype = torch.device(args.device), torch.bfloat16
    student = copy.deepcopy(module.student).to(device, dtype).eval()
    teacher = copy.deepcopy(module.teacher).to(device, dtype).eval()
    vae = copy.deepcopy(module.vae).to(device, dtype)
    text = copy.deepcopy(module.text_encoder).to(device, dtype)
    pipe = sd_pipeline(student, vae, text, module.tokenizer, copy.deepcopy(module.sample_scheduler))
    gen = torch.Generator(device="cpu").manual_seed(0)
    start = time.perf_counter()
    images = pipe(
        ["a handwritten digit three", "a handwritten digit five"],
        height=32,
        width=32,
        num_inference_steps=10,
        generator=gen,
        output_type="pt",
    ).images
    sample_s = time.perf_counter() - start
    latents = torch.randn(args.batch, 4, 16, 16, device=device, dtype=dtype)
    t = torch.full((args.batch,), 500, device=device)
    hidden = torch.randn(args.batch, 16, 32, device=device, dtype=dtype)
    teacher_ms = _unet_step_ms(teacher, latents, t, hidden, 20, args.device)
    student_ms = _unet_step_ms(student, latents, t, hidden, 20, args.device)
    result = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "precision": "bf16-mixed training, bf16 pipeline",
        "fit_seconds": fit_s,
        "bilevel_last": logs,
        "finite": all(v == v and abs(v) != float("inf") for v in logs.values()),
        "images_shape": list(images.shape),
        "images_finite": bool(torch.isfinite(images).all()),
        "sample_seconds_10_steps": sample_s,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_unet_step_ms": teacher_ms,
        "student_unet_step_ms": student_ms,
        "max_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if not (result["finite"] and result["images_finite"]):
        raise SystemExit("non-finite losses or images: the SD smoke run failed.")


if __name__ == "__main__":
    main()
