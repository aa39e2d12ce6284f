"""Benchmark: text-conditioned concept erasure on a tiny SD-style UNet, one phase vs two phases vs UCE / MACE-CF (CPU).

A concept is a *word* of the prompt, not a class id. The set (:mod:`lightning_zobi.data.captions`) is
scikit-learn's 8x8 digits drawn in red/green/blue and captioned ``"a red digit three"`` (attributes
dropped in some captions, so ``"a red digit"`` / ``"a digit three"`` / ``""`` are learned too). The
model is the tiny SD parts of :func:`lightning_zobi.diffusion.sd.tiny_sd_components` — the frozen
CLIP text encoder (random weights, from its config) and a ``UNet2DConditionModel`` that reads it
through cross-attention — in **pixel space** (3x8x8, no VAE: the tiny VAE is untrained, and a random
decoder would hand the judge noise). Steps:

1. judge: a ``DigitsCNN`` on the grey digits (digit concepts); colour is judged exactly (the stroke's
   dominant channel);
2. teacher: the text-conditioned UNet trained with the DDPM loss on every caption (cached in
   ``--workdir``, reused with ``--reuse``);
3. erase the concept (default ``red``, a colour word; ``--concept three`` erases a digit name — but the
   1000-step teacher follows colour words (98% of its samples have the prompted colour) and not digit
   names (~10% recognized, chance), so only a colour concept gives a meaningful verdict at this budget) with
   * *one phase*: 50%-pruned student (torch-pruning), ``ValueFunctionPenalty`` (γ = 1), upper = ESD
     (negative guidance 2) on prompts naming the concept, lower = output KD + denoising on the rest;
   * *two phases*: the same student distilled (recovery loss), then ESD alone (as published);
   * *distilled + UCE* / *distilled + MACE-CF* / *distilled + UCE + MACE-CF*: the distilled student
     edited in closed form (:mod:`lightning_zobi.unlearn.closed_form`);
   * *teacher + UCE* / *teacher + MACE-CF*: erasure without compression;
4. score each model over ``--seeds`` (training noise/batches and sampling): prompts ``"a {colour}
   digit {name}"`` for every digit and colour; *forget recognized* = share of concept-prompted
   samples the judge still reads as the concept, *retained accuracy* = the same judge's accuracy on
   the other values of that attribute, *other attribute* = accuracy of the other attribute (colour
   when a digit is erased) over all prompts, *FD* = Fréchet distance in the digit judge's features
   (retained prompts vs held-out real digits), *CLIP score* = torchmetrics ``CLIPScore`` with a tiny
   ``CLIPModel`` built from a config. That CLIP model is **untrained**: its score measures nothing
   about alignment and is reported only to show the metric's plumbing; pass ``--clip
   openai/clip-vit-base-patch32`` (a hub name, needs the download) for a real CLIP score.

Prints a table (mean ± sd over seeds) and writes JSON (default
``benchmarks/results/diffusion_text_erasure.json``).
Run: ``python benchmarks/diffusion_text_erasure.py`` (about 10-15 min on a shared 2-core CPU, 1 torch
thread; ``--reuse`` skips the judge and teacher); ``--quick`` is a smoke run of every stage in seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
"""The text-conditioned pixel-space UNet: tiny SD's UNet shape (cross-attention dim 32) at 3x8x8."""


# ------------------------------------------------------------------------------------------------ setup
class Text:
    """The frozen tiny CLIP text encoder + caption tokenizer, with every caption's hidden states cached."""

    def __init__(self, seed: int = 0) -> None:
        from lightning_zobi.data.captions import all_captions, caption_tokenizer
        from lightning_zobi.diffusion.sd import tiny_sd_components

        captions = all_captions()
        parts = tiny_sd_components(sample_size=16, seed=seed, prompts=captions)
        self.encoder = parts["text_encoder"].eval().requires_grad_(False)
        self.tokenizer = caption_tokenizer(captions, max_length=16)
        self.cache: dict[str, torch.Tensor] = {}
        self.embed(captions)

    @torch.no_grad()
    def embed(self, prompts) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing:
            ids = self.tokenizer(
                missing, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
            ).input_ids
            hidden = self.encoder(ids)[0]
            self.cache.update(zip(missing, hidden, strict=True))
        return torch.stack([self.cache[p] for p in prompts])


def _schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    cfg = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    return DDPMScheduler(**cfg), DDIMScheduler(**cfg)


def _draw(split, idx, text, ddpm, gen, captions=None):
    x0 = split.images[idx]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, ddpm.config.num_train_timesteps, (len(idx),), generator=gen)
    caps = captions if captions is not None else [split.captions[i] for i in idx.tolist()]
    return {"x_t": ddpm.add_noise(x0, noise, t), "t": t, "noise": noise, "hidden": text.embed(caps)}


def _batches(split, batch, steps, seed, text, ddpm, captions_fn=None):
    """``steps`` pre-drawn batches (indices, noise, timesteps): every loss of one step sees the same draws."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(split), (batch,), generator=gen)
        caps = captions_fn(idx) if captions_fn else None
        yield _draw(split, idx, text, ddpm, gen, caps)


# ------------------------------------------------------------------------------------------------ losses
def _eps(unet, b, hidden=None):
    return unet(b["x_t"], b["t"], encoder_hidden_states=b["hidden"] if hidden is None else hidden).sample


def recovery_loss(student, teacher, b):
    """Denoising + output KD from the frozen teacher (the lower level / phase 1)."""
    pred = _eps(student, b)
    with torch.no_grad():
        t_pred = _eps(teacher, b)
    return F.mse_loss(pred, b["noise"]) + F.mse_loss(pred, t_pred)


def suppression_loss(student, teacher, b, uncond, eta):
    """ESD on the concept prompts: the student's prediction → ``eps(∅) − η (eps(c) − eps(∅))`` of the teacher."""
    from lightning_zobi.unlearn.diffusion import esd_loss

    pred = _eps(student, b)
    with torch.no_grad():
        t_c = _eps(teacher, b)
        t_u = _eps(teacher, b, uncond.expand(b["x_t"].shape[0], -1, -1))
    return esd_loss(pred, t_u, t_c, eta)


# ------------------------------------------------------------------------------------------------ training
def train_judge(splits, epochs: int, seed: int = 0):
    from lightning_zobi.data.captions import to_grey
    from lightning_zobi.diffusion.judge import DigitsCNN

    torch.manual_seed(seed)
    judge = DigitsCNN(in_channels=1)
    opt = torch.optim.Adam(judge.parameters(), lr=3e-3)
    x, y = to_grey(splits.train.images), splits.train.digits
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(judge(x[idx]), y[idx]).backward()
            opt.step()
    judge.eval().requires_grad_(False)
    with torch.no_grad():
        acc = float((judge(to_grey(splits.test.images)).argmax(1) == splits.test.digits).float().mean())
    return judge, acc


def train_teacher(splits, text, steps: int, batch: int, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    ddpm, _ = _schedulers()
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=1e-4)
    for b in _batches(splits.train, batch, steps, seed, text, ddpm):
        opt.zero_grad()
        F.mse_loss(_eps(unet, b), b["noise"]).backward()
        opt.step()
        sched.step()
    return unet.eval().requires_grad_(False)


def _prune(teacher, ratio: float):
    from lightning_zobi.diffusion.pruning import prune_unet_channels

    student = copy.deepcopy(teacher).train().requires_grad_(True)
    if ratio > 0:
        prune_unet_channels(student, ratio, "magnitude")
    return student


def one_phase(teacher, retain, forget, text, args, seed, uncond):
    from lightning_zobi.bilevel import BilevelProblem, ValueFunctionPenalty

    student = _prune(teacher, args.prune_ratio)
    params = list(student.parameters())
    problem = BilevelProblem(
        upper_loss=lambda b: suppression_loss(student, teacher, b["forget"], uncond, args.negative_guidance),
        lower_loss=lambda b: recovery_loss(student, teacher, b["retain"]),
        upper_params=params,
        lower_params=params,
    )
    solver = ValueFunctionPenalty(
        problem,
        torch.optim.AdamW(params, lr=1e-3),
        gamma=args.gamma,
        inner_steps=1,
        inner_lr=1e-3,
        inner_optimizer="adam",
    )
    ddpm, _ = _schedulers()
    r_it = _batches(retain, args.batch, args.student_steps, 1000 + seed, text, ddpm)
    f_it = _batches(forget, args.batch, args.student_steps, 2000 + seed, text, ddpm, args.forget_captions)
    for rb, fb in zip(r_it, f_it, strict=True):
        solver.step({"retain": rb, "forget": fb})
    return student.eval()


def distill(teacher, retain, text, args, seed):
    student = _prune(teacher, args.prune_ratio)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    ddpm, _ = _schedulers()
    for b in _batches(retain, args.batch, args.student_steps, 1000 + seed, text, ddpm):
        opt.zero_grad()
        recovery_loss(student, teacher, b).backward()
        opt.step()
    return student.eval()


def esd_phase(student, teacher, forget, text, args, seed, uncond):
    student = copy.deepcopy(student).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    ddpm, _ = _schedulers()
    for b in _batches(forget, args.batch, args.unlearn_steps, 3000 + seed, text, ddpm, args.forget_captions):
        opt.zero_grad()
        suppression_loss(student, teacher, b, uncond, args.negative_guidance).backward()
        opt.step()
    return student.eval()


# ------------------------------------------------------------------------------------------------ closed form
def closed_form_edits(unet, text, concept: str, method: str, lamb: float):
    """A copy of ``unet`` edited by ``uce``, ``mace`` or ``uce+mace`` for ``concept``."""
    from lightning_zobi.data.captions import all_captions, without_concept
    from lightning_zobi.unlearn.closed_form import (
        edit_projections_,
        mace_embeddings,
        preservation_embeddings,
        prompt_encoder,
        uce_embeddings,
    )

    unet = copy.deepcopy(unet)
    captions = [c for c in all_captions() if c]
    with_c = [c for c in captions if concept in c.split()]
    without_c = [c for c in captions if concept not in c.split()]
    encode = prompt_encoder(text.encoder, text.tokenizer)
    eos = text.tokenizer.eos_token_id
    # UCE with its prompt expansion: the bare word and the caption forms, each to the caption without it
    uce_edit = [concept, *with_c]
    uce_guide = [without_concept(c, concept) for c in uce_edit]
    uce_c, uce_g = uce_embeddings(encode, uce_edit, eos), uce_embeddings(encode, uce_guide, eos)
    uce_p = uce_embeddings(encode, without_c, eos)
    tokenize = lambda s: text.tokenizer(s).input_ids  # noqa: E731
    mace_c, mace_g = mace_embeddings(encode, tokenize, with_c, [without_concept(c, concept) for c in with_c])
    mace_p = preservation_embeddings(encode, without_c)
    if method == "uce":
        c, g, p = uce_c, uce_g, uce_p
    elif method == "mace":
        c, g, p = mace_c, mace_g, mace_p
    else:
        c, g, p = torch.cat([uce_c, mace_c]), torch.cat([uce_g, mace_g]), torch.cat([uce_p, mace_p])
    edit_projections_(unet, c, g, p, lamb=lamb, method=method)
    return unet.eval()


# ------------------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def sample(unet, hidden, uncond, steps: int, guidance: float, gen):
    _, ddim = _schedulers()
    ddim.set_timesteps(steps)
    x = torch.randn((hidden.shape[0], 3, 8, 8), generator=gen)
    cond = torch.cat([hidden, uncond.expand_as(hidden)])
    for t in ddim.timesteps:
        eps_c, eps_u = unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample.chunk(2)
        x = ddim.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return x.clamp(-1, 1)


def _tiny_clip(tokenizer):
    """A ``(CLIPModel, CLIPProcessor)`` built from configs (random weights) for torchmetrics' ``CLIPScore``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=64,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    size = {"shortest_edge": 32}
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size=size, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    return _tensor_features(CLIPModel(config).eval()), processor


def _tensor_features(model):
    """Make ``get_image_features``/``get_text_features`` return tensors.

    transformers 5 returns a ``BaseModelOutputWithPooling`` (the projected features in
    ``pooler_output``), which torchmetrics 1.9's ``CLIPScore`` cannot normalize.
    """
    for name in ("get_image_features", "get_text_features"):
        inner = getattr(model, name)

        def wrapped(*a, _inner=inner, **kw):
            out = _inner(*a, **kw)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        setattr(model, name, wrapped)
    return model


def make_clip_metric(name: str, tokenizer):
    """torchmetrics ``CLIPScore`` over the tiny config-built CLIP (``"tiny"``) or a hub / local CLIP checkpoint."""
    from torchmetrics.multimodal import CLIPScore

    if name == "tiny":
        return CLIPScore(model_name_or_path=lambda: _tiny_clip(tokenizer))
    from transformers import CLIPModel, CLIPProcessor

    return CLIPScore(
        model_name_or_path=lambda: (
            _tensor_features(CLIPModel.from_pretrained(name).eval()),
            CLIPProcessor.from_pretrained(name),
        )
    )


@torch.no_grad()
def evaluate(unet, judge, text, splits, args, seed: int, clip_metric) -> dict[str, float]:
    from lightning_zobi.data.captions import COLOURS, colour_of, concept_kind, prompts_for, to_grey
    from lightning_zobi.data.images import DIGIT_NAMES
    from lightning_zobi.unlearn.metrics_diffusion import JudgeFrechetDistance

    kind = concept_kind(args.concept)
    digits = torch.arange(10).repeat_interleave(len(COLOURS) * args.samples_per_prompt)
    colours = torch.arange(len(COLOURS)).repeat_interleave(args.samples_per_prompt).repeat(10)
    prompts = prompts_for(digits.tolist(), colours.tolist())
    if getattr(args, "anchor_reference", False):  # the concept word left out of every prompt that had it
        from lightning_zobi.data.captions import without_concept

        prompts = [without_concept(p, args.concept) for p in prompts]
    gen = torch.Generator().manual_seed(10_000 + seed)
    uncond = text.embed([""])
    images = torch.cat(
        [
            sample(unet, text.embed(prompts[i : i + 240]), uncond, args.sample_steps, args.guidance, gen)
            for i in range(0, len(prompts), 240)
        ]
    )
    pred_digit = judge(to_grey(images)).argmax(1)
    pred_colour = colour_of(images)
    if kind == "digit":
        target, pred, other_ok = digits, pred_digit, pred_colour == colours
        value = DIGIT_NAMES.index(args.concept)
    else:
        target, pred, other_ok = colours, pred_colour, pred_digit == digits
        value = COLOURS.index(args.concept)
    is_c = target == value
    real_keep = (
        splits.test.digits != value if kind == "digit" else torch.ones(len(splits.test), dtype=torch.bool)
    )
    fd = JudgeFrechetDistance(judge.features, judge.feature_dim)
    fd.update(to_grey(splits.test.images[real_keep]), real=True)
    fd.update(to_grey(images[~is_c]), real=False)
    clip_metric.reset()
    clip_metric.update(((images + 1) * 127.5).round().to(torch.uint8), prompts)
    return {
        "forget_recognized": float((pred[is_c] == value).float().mean()),
        "retain_accuracy": float((pred[~is_c] == target[~is_c]).float().mean()),
        "other_attribute_accuracy": float(other_ok.float().mean()),
        "fd_retain": float(fd.compute()),
        "clip_score": float(clip_metric.compute()),
    }


# ------------------------------------------------------------------------------------------------ main
ROWS = (
    ("teacher", "teacher"),
    ("teacher + UCE", "teacher_uce"),
    ("teacher + MACE-CF", "teacher_mace"),
    ("one phase (bilevel, pruned)", "one_phase"),
    ("two phases: distill, then ESD", "two_phase"),
    ("distilled + UCE", "distilled_uce"),
    ("distilled + MACE-CF", "distilled_mace"),
    ("distilled + UCE + MACE-CF", "distilled_uce_mace"),
    ("distilled (no erasure)", "distilled"),
)
METRICS = ("forget_recognized", "retain_accuracy", "other_attribute_accuracy", "fd_retain", "clip_score")


def _summary(runs: list[dict]) -> dict:
    out = {}
    for m in (*METRICS, "train_seconds"):
        vals = [r[m] for r in runs if m in r and r[m] is not None and not math.isnan(r[m])]
        if vals:
            out[m] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/diffusion_text_bench")
    p.add_argument("--out", default="benchmarks/results/diffusion_text_erasure.json")
    p.add_argument("--concept", default="red", help="a colour (red/green/blue) or a digit name (zero..nine)")
    p.add_argument("--seeds", type=int, default=3, help="training + sampling seeds for every row")
    p.add_argument("--judge-epochs", type=int, default=10)
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--student-steps", type=int, default=200, help="one-phase steps = two-phase distill steps")
    p.add_argument("--unlearn-steps", type=int, default=100, help="two-phase ESD steps")
    p.add_argument("--prune-ratio", type=float, default=0.5)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--negative-guidance", type=float, default=2.0)
    p.add_argument("--lamb", type=float, default=0.5, help="λ of UCE / MACE-CF (UCE's default)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples-per-prompt", type=int, default=4, help="samples per (digit, colour) prompt")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--clip", default="tiny", help="'tiny' (untrained, from a config) or a hub CLIP name")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true", help="reuse the judge/teacher in --workdir")
    p.add_argument(
        "--recover-on",
        default="retain",
        choices=["retain", "all"],
        help="data of the recovery loss (distillation): the images without the concept (the package's "
        "DiffusionModule) or all of them, the concept included (then only the erasure can remove it)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: every stage, a few steps, one seed")
    p.add_argument(
        "--anchor-reference",
        action="store_true",
        help="only score the teacher with the concept word removed from the prompts (what mapping the concept "
        "to its anchor can reach at best), then exit",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.judge_epochs, args.teacher_steps = 1, 1, 20
        args.student_steps, args.unlearn_steps, args.batch = 4, 3, 16
        args.samples_per_prompt, args.sample_steps = 1, 3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from lightning_zobi.data.captions import caption, concept_kind, load_caption_splits
    from lightning_zobi.data.images import DIGIT_NAMES
    from lightning_zobi.diffusion.judge import load_judge, save_judge

    torch.set_num_threads(args.threads)
    kind = concept_kind(args.concept)
    work = Path(args.workdir)
    splits = load_caption_splits()
    text = Text()
    results: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}), torch threads={args.threads}",
        "args": vars(args),
        "clip_note": "CLIP score from an untrained tiny CLIPModel (config only): no alignment meaning"
        if args.clip == "tiny"
        else f"CLIP score from {args.clip}",
    }

    start = time.perf_counter()
    if args.reuse and (work / "judge" / "judge.safetensors").is_file():
        judge = load_judge(work / "judge")
        from lightning_zobi.data.captions import to_grey

        with torch.no_grad():
            acc = float((judge(to_grey(splits.test.images)).argmax(1) == splits.test.digits).float().mean())
    else:
        judge, acc = train_judge(splits, args.judge_epochs)
        save_judge(judge, work / "judge")
    results["judge"] = {"test_accuracy": acc, "seconds": time.perf_counter() - start}
    print(f"judge: held-out accuracy {acc:.3f} ({results['judge']['seconds']:.0f} s)", flush=True)

    from diffusers import UNet2DConditionModel

    start = time.perf_counter()
    if args.reuse and (work / "teacher" / "config.json").is_file():
        teacher = UNet2DConditionModel.from_pretrained(work / "teacher").eval().requires_grad_(False)
    else:
        teacher = train_teacher(splits, text, args.teacher_steps, args.batch)
        teacher.save_pretrained(work / "teacher")
    results["teacher_seconds"] = time.perf_counter() - start
    print(f"teacher: {results['teacher_seconds']:.0f} s", flush=True)

    # forget = images showing the concept (captions naming it); retain = all others
    value = DIGIT_NAMES.index(args.concept) if kind == "digit" else None
    from lightning_zobi.data.captions import COLOURS

    attr = splits.train.digits if kind == "digit" else splits.train.colours
    value = value if kind == "digit" else COLOURS.index(args.concept)
    forget, retain = splits.train.subset(attr == value), splits.train.subset(attr != value)

    def forget_captions(idx):  # full captions of the forget images (they name the concept)
        return [caption(int(forget.digits[i]), int(forget.colours[i])) for i in idx.tolist()]

    args.forget_captions = forget_captions
    recover = splits.train if args.recover_on == "all" else retain
    uncond = text.embed([""])
    clip_metric = make_clip_metric(args.clip, text.tokenizer)
    runs: dict[str, list[dict]] = {key: [] for _, key in ROWS}
    if args.anchor_reference:
        runs_a = [
            evaluate(teacher, judge, text, splits, args, seed, clip_metric) for seed in range(args.seeds)
        ]
        results.update(
            runs={"teacher_anchor_prompts": runs_a}, summary={"teacher_anchor_prompts": _summary(runs_a)}
        )
        print(json.dumps(results["summary"], indent=2))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        results["args"] = {k: v for k, v in vars(args).items() if k != "forget_captions"}
        out.write_text(json.dumps(results, indent=2))
        return results
    static = {
        "teacher": teacher,
        "teacher_uce": closed_form_edits(teacher, text, args.concept, "uce", args.lamb),
        "teacher_mace": closed_form_edits(teacher, text, args.concept, "mace", args.lamb),
    }
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        for key, model in static.items():
            runs[key].append(evaluate(model, judge, text, splits, args, seed, clip_metric))
        t0 = time.perf_counter()
        one = one_phase(teacher, recover, forget, text, args, seed, uncond)
        t_one = time.perf_counter() - t0
        runs["one_phase"].append(
            {**evaluate(one, judge, text, splits, args, seed, clip_metric), "train_seconds": t_one}
        )
        t0 = time.perf_counter()
        distilled = distill(teacher, recover, text, args, seed)
        t_distill = time.perf_counter() - t0
        t0 = time.perf_counter()
        two = esd_phase(distilled, teacher, forget, text, args, seed, uncond)
        t_two = t_distill + time.perf_counter() - t0
        runs["two_phase"].append(
            {**evaluate(two, judge, text, splits, args, seed, clip_metric), "train_seconds": t_two}
        )
        runs["distilled"].append(
            {**evaluate(distilled, judge, text, splits, args, seed, clip_metric), "train_seconds": t_distill}
        )
        for method, key in (
            ("uce", "distilled_uce"),
            ("mace", "distilled_mace"),
            ("uce+mace", "distilled_uce_mace"),
        ):
            t0 = time.perf_counter()
            edited = closed_form_edits(distilled, text, args.concept, method, args.lamb)
            t_edit = t_distill + time.perf_counter() - t0
            runs[key].append(
                {**evaluate(edited, judge, text, splits, args, seed, clip_metric), "train_seconds": t_edit}
            )
        print(
            f"seed {seed}: one phase {runs['one_phase'][-1]}, two phases {runs['two_phase'][-1]}", flush=True
        )

    results["runs"] = runs
    results["summary"] = {key: _summary(r) for key, r in runs.items()}
    results["params"] = {
        "teacher": sum(p.numel() for p in teacher.parameters()),
        "student": sum(p.numel() for p in one.parameters()),
    }
    _table(args, results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    args_json = {k: v for k, v in vars(args).items() if k != "forget_captions"}
    results["args"] = args_json
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


def _table(args, results) -> None:
    kind = "digit" if args.concept not in ("red", "green", "blue") else "colour"
    other = "colour" if kind == "digit" else "digit"
    print(
        f"\nconcept '{args.concept}' ({kind}); {args.seeds} seed(s), mean ± sd\n"
        f"| model | '{args.concept}' recognized | retained {kind} acc. | {other} acc. | FD (judge feats) "
        "| CLIP score (untrained CLIP) | train s |"
    )
    print("|---|---|---|---|---|---|---|")

    def cell(s, m, fmt):
        if m not in s:
            return "—"
        return f"{s[m]['mean']:{fmt}} ± {s[m]['sd']:{fmt}}"

    for name, key in ROWS:
        s = results["summary"][key]
        print(
            f"| {name} | {cell(s, 'forget_recognized', '.3f')} | {cell(s, 'retain_accuracy', '.3f')} "
            f"| {cell(s, 'other_attribute_accuracy', '.3f')} | {cell(s, 'fd_retain', '.2f')} "
            f"| {cell(s, 'clip_score', '.2f')} | {cell(s, 'train_seconds', '.0f')} |"
        )
    p = results["params"]
    print(f"\nparams: teacher {p['teacher']}, pruned student {p['student']}")


if __name__ == "__main__":
    main()
