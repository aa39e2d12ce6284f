"""Benchmark: prune + distill + unlearn a class-conditional digits diffusion model, one phase vs two phases (CPU).

The embedded, offline version of "Efficient Fine-Tuning and Concept Suppression for Pruned Diffusion
Models" (Shirkavand et al., CVPR 2025, arXiv 2412.15341):

1. train the judge (``JudgeModule``) on scikit-learn's digits and report its held-out accuracy;
2. train the teacher (``DiffusionModule(objective="denoise")``, a class-conditional UNet2DModel);
3. prune it 50% (torch-pruning, magnitude) and measure params, MACs and seconds per denoising step of
   teacher and student (interleaved runs, median);
4. one phase: ``DiffusionModule(objective="bilevel")`` + ``Bilevel`` callback (upper = ESD suppression
   of the forget digit, lower = distillation + denoising on the retained digits);
5. two phases: ``objective="two_phase"`` (distill, then ESD) from the same pruned start;
6. score teacher and both students with the judge: forget_recognized (the erased digit's prompted
   samples the judge still calls that digit), retain_accuracy, Fréchet distance in the judge's
   features on retained classes, and wall time.

Prints a table and writes ``benchmarks/results/diffusion_unlearn.json``.
Run: ``python benchmarks/diffusion_unlearn.py`` (about 15-30 min on 2 CPU cores, depending on load).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers next to this script
from _common import quiet_trainer  # noqa: E402

warnings.filterwarnings("ignore")


def _trainer(max_steps: int = -1, max_epochs: int | None = None, callbacks=None):
    return quiet_trainer(
        accelerator="cpu", max_steps=max_steps, max_epochs=max_epochs, callbacks=callbacks or []
    )


def _evaluate(
    unet, judge, splits, forget: int, samples_per_class: int, steps: int, guidance: float, seed: int
):
    from diffusers import DDIMScheduler

    from lightning_zobi.diffusion.sampling import sample_class_conditional
    from lightning_zobi.unlearn.metrics_diffusion import evaluate_class_erasure

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    null = int(unet.config.num_class_embeds) - 1
    gen = torch.Generator().manual_seed(seed)

    def generate(labels):
        return sample_class_conditional(unet, labels, scheduler, steps, guidance, null, gen)

    scores, images, labels = evaluate_class_erasure(
        generate, judge, splits.test.images, splits.test.labels, [forget], samples_per_class=samples_per_class
    )
    return scores, images, labels


def _speed(teacher, student, batch: int, rounds: int) -> dict[str, float]:
    from lightning_zobi.diffusion.pruning import measure_unet

    t_costs, s_costs = [], []
    for _ in range(rounds):  # interleaved, so background load hits both alike
        t_costs.append(measure_unet(teacher, batch_size=batch, repeats=5, warmup=1))
        s_costs.append(measure_unet(student, batch_size=batch, repeats=5, warmup=1))
    t_sec = statistics.median(c.step_seconds for c in t_costs)
    s_sec = statistics.median(c.step_seconds for c in s_costs)
    return {
        "teacher_params": t_costs[0].params,
        "student_params": s_costs[0].params,
        "teacher_macs_per_sample": t_costs[0].macs,
        "student_macs_per_sample": s_costs[0].macs,
        "teacher_step_ms": 1e3 * t_sec,
        "student_step_ms": 1e3 * s_sec,
        "speedup": t_sec / s_sec,
        "batch": batch,
    }


def _save_grid(images, labels, path: Path) -> None:
    from PIL import Image

    from lightning_zobi.lightning.callbacks.samples import image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images[labels.argsort(stable=True)], labels.sort(stable=True).values, 4)).save(
        path
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/diffusion_bench")
    p.add_argument("--out", default="benchmarks/results/diffusion_unlearn.json")
    p.add_argument("--forget", type=int, default=3)
    p.add_argument("--judge-epochs", type=int, default=10)
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--student-steps", type=int, default=400, help="one-phase steps = two-phase distill steps")
    p.add_argument("--unlearn-steps", type=int, default=200, help="two-phase ESD steps after distillation")
    p.add_argument("--prune-ratio", type=float, default=0.5)
    p.add_argument("--solver", default="penalty", choices=["penalty", "vf_free"])
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--orientation", default="suppress_upper", choices=["suppress_upper", "suppress_lower"])
    p.add_argument("--negative-guidance", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples-per-class", type=int, default=32)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true", help="reuse a judge/teacher already in --workdir")
    p.add_argument("--stages", default="one,two", help="students to train: 'one', 'two' or 'one,two'")
    p.add_argument(
        "--two-phase-retain-weight",
        type=float,
        default=0.0,
        help="recovery loss added to ESD in phase 2 (0 = the unlearning method alone, as published)",
    )
    args = p.parse_args()

    import lightning.pytorch as pl

    from lightning_zobi.data.images import load_digits_splits
    from lightning_zobi.diffusion.judge import load_judge
    from lightning_zobi.diffusion.pruning import load_pruned_unet
    from lightning_zobi.lightning.callbacks.bilevel import Bilevel
    from lightning_zobi.lightning.datamodules.digits import DigitsDataModule
    from lightning_zobi.lightning.modules.diffusion import TINY_DIGITS_UNET, DiffusionModule, JudgeModule

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    splits = load_digits_splits()
    results: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}), torch threads={args.threads}",
        "args": vars(args),
    }
    eval_kw = dict(
        forget=args.forget,
        samples_per_class=args.samples_per_class,
        steps=args.sample_steps,
        guidance=args.guidance,
        seed=0,
    )

    # 1. judge
    judge_dir = work / "judge"
    start = time.perf_counter()
    if not (args.reuse and (judge_dir / "judge.safetensors").is_file()):
        pl.seed_everything(0)
        _trainer(max_epochs=args.judge_epochs).fit(
            JudgeModule(export_dir=str(judge_dir)), DigitsDataModule(batch_size=64)
        )
    judge = load_judge(judge_dir)
    with torch.no_grad():
        acc = float((judge(splits.test.images).argmax(1) == splits.test.labels).float().mean())
    results["judge"] = {"test_accuracy": acc, "seconds": time.perf_counter() - start}
    print(f"judge: test accuracy {acc:.3f} ({results['judge']['seconds']:.0f} s)", flush=True)

    # 2. teacher
    teacher_dir = work / "teacher"
    start = time.perf_counter()
    if not (args.reuse and (teacher_dir / "config.json").is_file()):
        pl.seed_everything(0)
        module = DiffusionModule(
            unet=TINY_DIGITS_UNET, objective="denoise", samples_per_class=0, export_dir=str(teacher_dir)
        )
        _trainer(max_steps=args.teacher_steps).fit(module, DigitsDataModule(batch_size=args.batch))
    train_s = time.perf_counter() - start
    teacher = load_pruned_unet(teacher_dir).eval()
    scores, images, labels = _evaluate(teacher, judge, splits, **eval_kw)
    _save_grid(images, labels, work / "teacher.png")
    results["teacher"] = {**scores, "train_seconds": train_s}
    print(f"teacher: {scores} ({train_s:.0f} s)", flush=True)

    def student_module(objective: str, **kw) -> DiffusionModule:
        pl.seed_everything(0)
        return DiffusionModule(
            teacher=str(teacher_dir),
            prune_ratio=args.prune_ratio,
            objective=objective,
            forget_class=args.forget,
            negative_guidance=args.negative_guidance,
            samples_per_class=0,
            lr=1e-3,
            **kw,
        )

    data = dict(batch_size=args.batch, forget_class=args.forget, forget_batch_size=args.batch)

    # 3. speed
    probe = student_module("distill")
    results["speed"] = _speed(
        teacher, probe.student.eval(), batch=2 * 10 * args.samples_per_class // 2, rounds=3
    )
    print(f"speed: {results['speed']}", flush=True)
    del probe

    # 4. one phase (bilevel); 5. two phases (distill, then ESD)
    stages = set(args.stages.split(","))
    if "one" in stages:
        _one_phase(
            args, student_module, data, judge, splits, eval_kw, work, results, Bilevel, DigitsDataModule
        )
    if "two" in stages:
        _two_phase(args, student_module, data, judge, splits, eval_kw, work, results, DigitsDataModule)
    _table_and_write(args, results)


def _one_phase(args, student_module, data, judge, splits, eval_kw, work, results, Bilevel, DigitsDataModule):
    start = time.perf_counter()
    one = student_module("bilevel", orientation=args.orientation, export_dir=str(work / "student_one_phase"))
    cb = Bilevel(solver=args.solver, gamma=args.gamma, inner_steps=1, inner_lr=1e-3, inner_optimizer="adam")
    _trainer(max_steps=args.student_steps, callbacks=[cb]).fit(one, DigitsDataModule(**data))
    one_s = time.perf_counter() - start
    scores, images, labels = _evaluate(one.student.eval(), judge, splits, **eval_kw)
    _save_grid(images, labels, work / "one_phase.png")
    results["one_phase"] = {
        **scores,
        "train_seconds": one_s,
        "steps": args.student_steps,
        "solver": args.solver,
        "orientation": args.orientation,
    }
    print(f"one phase: {scores} ({one_s:.0f} s)", flush=True)


def _two_phase(args, student_module, data, judge, splits, eval_kw, work, results, DigitsDataModule):
    start = time.perf_counter()
    dm = DigitsDataModule(**data)
    dm.setup()
    loader = dm.train_dataloader()
    iter(loader)
    steps_per_epoch = len(loader)
    switch = max(1, round(args.student_steps / steps_per_epoch))
    two = student_module(
        "two_phase",
        phase_switch_epoch=switch,
        retain_weight=args.two_phase_retain_weight,
        export_dir=str(work / "student_two_phase"),
    )
    total = switch * steps_per_epoch + args.unlearn_steps
    _trainer(max_steps=total).fit(two, dm)
    two_s = time.perf_counter() - start
    scores, images, labels = _evaluate(two.student.eval(), judge, splits, **eval_kw)
    _save_grid(images, labels, work / "two_phase.png")
    results["two_phase"] = {
        **scores,
        "train_seconds": two_s,
        "distill_steps": switch * steps_per_epoch,
        "unlearn_steps": args.unlearn_steps,
        "retain_weight": args.two_phase_retain_weight,
    }
    print(f"two phase: {scores} ({two_s:.0f} s)", flush=True)


def _table_and_write(args, results: dict) -> None:
    t_ra = results["teacher"]["retain_accuracy"]
    names = (("teacher", "teacher"), ("one-phase", "one_phase"), ("two-phase", "two_phase"))
    rows = [(name, results[key]) for name, key in names if key in results]
    print(
        "\n| model | forget digit recognized | retained accuracy | retained / teacher | FD (judge feats) | train s |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['forget_recognized']:.3f} | {r['retain_accuracy']:.3f} | {r['retain_accuracy'] / t_ra:.2f} "
            f"| {r['fd_retain']:.2f} | {r['train_seconds']:.0f} |"
        )
    s = results["speed"]
    print(
        f"\nparams {s['teacher_params']} -> {s['student_params']}, MACs/sample {s['teacher_macs_per_sample']:.3g} -> "
        f"{s['student_macs_per_sample']:.3g}, step {s['teacher_step_ms']:.1f} ms -> {s['student_step_ms']:.1f} ms "
        f"at batch {s['batch']} ({s['speedup']:.2f}x)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
