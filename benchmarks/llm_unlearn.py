"""Memory-frugal LLM unlearning against first-order, over seeds, with controls and robustness attacks (issue 23).

The chain, all on CPU:

1. **Learn** the fictitious facts (``lightning_zobi.data.facts``; forget ≥ 200 questions) into a
   several-million-parameter Llama built from a config with an *untied* head, first-order AdamW,
   and a **retain-only** model the same way on the retain people (the forget-quality reference).
   Both are cached under ``runs/llm_unlearn_cache/<config>-<hash>/`` (gitignored) and reused.
2. **Unlearn** each method of ``--methods`` once per seed through the library's Lightning path
   (``UnlearningModule`` + ``UnlearningDataModule``, plus ``ZeroOrder`` for ZO rows: what the
   recipes run), each run in a fresh forked process whose **peak RSS above its start** is the
   run's memory (module, reference copy, optimizer state, gradients and activations; CPU has no
   ``max_memory_allocated``).
3. **Score** every model with :func:`lightning_zobi.unlearn.metrics.evaluate_model` (forget EM,
   retain EM, forget quality = KS p against the retain-only model, MIA AUC, ...), then attack it:
   **relearning** (20 first-order AdamW steps on 10 % of the forget questions, then forget EM on the
   other 90 %) and **4-bit quantization** (every linear layer but ``lm_head`` to bitsandbytes nf4 through
   ``lightning_zobi.quant.convert.quantize_linear_4bit_``, then re-scored). The learned and retain-only
   models get the same attacks (what the attack can reveal at most / at least).

Acceptance (issue 23, on the means over seeds): a ``"mode": "ZO"`` row with ≥ 90 % of its parameters
forward-only has forget EM within ±5 points of the retain-only model's, retain EM ≥ 90 % of the
learned model's, forget quality ≥ 0.05, peak memory ≤ 0.5× the FO row's; and its control (the same
run with the forward-only part switched off) does not pass.

Determinism: one process per run, ``torch.use_deterministic_algorithms(True)``, ``--threads``
intra-op threads (default 1) and seeds for data order (``seed_everything``) and ZO directions
(``ZeroOrder(seed=...)``). Two runs of the same seeds on the same machine and library versions give
bit-identical models; across CPUs / library builds the float kernels differ (vector width, oneDNN
paths), training amplifies that, and only the spread over seeds, reported here, is comparable.

Usage::

    python benchmarks/llm_unlearn.py                  # the CPU chain, 3 seeds (not yet timed in full; see below)
    python benchmarks/llm_unlearn.py --config quick   # smoke test (42 s on 2 cores)

Cost measured per part on the shared 2-core machine (one thread per process): learning the two cached
models ran 1 050 s side by side under load (≈ 330 s of CPU each); one 120-150-step unlearning run of the
``cpu`` configuration is 67 s (head-only control), 160 s (FO) and 190 s (hybrid) of wall at load ≈ 5,
plus its scoring; with the attacks and 4 methods x 3 seeds the whole chain is estimated at 25-30 min
on 2 idle cores, more when the cores are shared.
    python benchmarks/llm_unlearn.py --methods npo_fo npo_zo_head --seeds 0

Writes ``benchmarks/results/llm_unlearn.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import hashlib
import json
import math
import multiprocessing as mp
import os
import pickle
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import peft  # noqa: F401 - imported before any run's memory mark, so its import is not counted as the run's
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_zobi import ZeroOrder  # noqa: E402
from lightning_zobi.data.facts import FactsSplits, make_splits  # noqa: E402
from lightning_zobi.lightning.datamodules.facts import QADataset, load_tokenizer  # noqa: E402
from lightning_zobi.lightning.datamodules.unlearning import UnlearningDataModule  # noqa: E402
from lightning_zobi.lightning.modules.causal_lm import build_causal_lm  # noqa: E402
from lightning_zobi.lightning.modules.unlearning import UnlearningModule  # noqa: E402
from lightning_zobi.unlearn.llm import forward_only_fraction  # noqa: E402
from lightning_zobi.unlearn.metrics import evaluate_model  # noqa: E402
from lightning_zobi.zo import backends as _zo_backends  # noqa: E402,F401 - ZO rules imported up front, as peft


# ---------------------------------------------------------------------------- configurations
def llama(hidden: int, layers: int, intermediate: int, heads: int = 4) -> dict[str, Any]:
    """A Llama config dict for the byte tokenizer, head untied from the input embedding."""
    return dict(
        model_type="llama",
        vocab_size=259,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )


@dataclass
class Config:
    model: dict[str, Any]
    num_people: int
    forget_fraction: float
    holdout_fraction: float
    learn_steps: int
    learn_lr: float = 3e-3
    learn_batch: int = 32
    forget_batch: int = 8
    retain_batch: int = 16
    max_length: int = 64
    retain_eval: int = 200
    unlearn_steps: int = 300
    seeds: tuple[int, ...] = (0, 1, 2)
    relearn_steps: int = 20
    relearn_fraction: float = 0.1
    relearn_lr: float = 1e-3
    data_seed: int = 0
    attacks: bool = True
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


CONFIGS: dict[str, Config] = {
    # 2.69 M parameters (head 2.5 %), 200 people: 50 forget (200 questions), 130 retain (520), 20 hold-out (80)
    "cpu": Config(
        model=llama(256, 3, 768),
        num_people=200,
        forget_fraction=0.25,
        holdout_fraction=0.1,
        learn_steps=700,  # under-trains (final loss 0.17, retain EM 0.49): raise it, see RESULTS.md
        unlearn_steps=120,
    ),
    # 0.47 M parameters, 200 people: 50 forget (200 questions), 130 retain (520), 20 hold-out (80);
    # learned to retain EM 1.0 so that unlearning starts from a model that knows its facts
    "mid": Config(
        model=llama(128, 2, 384),
        num_people=200,
        forget_fraction=0.25,
        holdout_fraction=0.1,
        learn_steps=12000,
        unlearn_steps=300,
    ),
    # smoke test: 0.2 M parameters, 40 people, short runs, 2 seeds
    "quick": Config(
        model=llama(64, 2, 128),
        num_people=40,
        forget_fraction=0.25,
        holdout_fraction=0.1,
        learn_steps=300,
        retain_eval=40,
        unlearn_steps=30,
        seeds=(0, 1),
        relearn_steps=5,
    ),
}

# Unlearning methods: NPO + α·retain NLL (Zhang et al., arXiv 2404.05868), trained these ways.
#   npo_fo:        first-order AdamW on every weight (backward through the whole network): the bar.
#   npo_fo_ia3:    first-order AdamW on a peft IA3 adapter (backward through the whole network): what the
#                  adapter can express, so that a ZO failure is read as optimisation, not capacity.
#   npo_zo_ia3:    ZeroOrder(zo_sign) on the IA3 adapter: forward passes only; the NPO reference is the
#                  adapter-disabled model (no copy). The adapter is merged into the weights before scoring.
#   npo_zo_ia3_control: the same run with its forward-only part switched off (ZO lr 0; bit-identical to
#                  the learned model, tests/test_unlearn_zo_method.py), so a few steps stand for all.
#   npo_zo_head / _control: the first-order-head + ZO-body hybrid of the earlier sweep (cpu config).
METHODS: dict[str, dict[str, Any]] = {
    "npo_fo": dict(mode="FO", lr=1e-4),
    "npo_fo_ia3": dict(mode="FO", lr=1e-2, module=dict(ia3=True)),
    "npo_zo_ia3": dict(
        mode="ZO",
        lr=1e-2,
        steps=3000,
        module=dict(ia3=True),
        zo=dict(optimizer="zo_sign", lr=1e-2, eps=1e-3),
        control="npo_zo_ia3_control",
    ),
    "npo_zo_ia3_control": dict(
        mode="control",
        lr=0.0,
        steps=30,
        module=dict(ia3=True),
        zo=dict(optimizer="zo_sign", lr=0.0, eps=1e-3),
    ),
    "npo_zo_head": dict(
        mode="ZO",
        lr=1e-4,
        zo=dict(
            optimizer="zo_fo_hybrid",
            lr=1e-5,
            eps=1e-3,
            optimizer_kwargs=dict(fo_params=r"(^|\.)lm_head\.", fo_lr=1e-4),
        ),
        control="npo_zo_head_control",
    ),
    "npo_zo_head_control": dict(mode="control", lr=1e-4, trainable=r"(^|\.)lm_head\."),
}
"""Rates: the probe of ``benchmarks/llm_unlearn_probe.py`` on the learned ``quick`` model (RESULTS.md, issue 23)."""
DEFAULT_METHODS = ("npo_fo", "npo_fo_ia3", "npo_zo_ia3", "npo_zo_ia3_control")
OBJECTIVE = dict(objective="npo", alpha=30.0, beta=0.1)


def cache_dir(name: str, cfg: Config) -> Path:
    key = json.dumps(
        [
            cfg.model,
            cfg.num_people,
            cfg.forget_fraction,
            cfg.holdout_fraction,
            cfg.learn_steps,
            cfg.learn_lr,
            cfg.learn_batch,
            cfg.max_length,
            cfg.data_seed,
        ],
        sort_keys=True,
    )
    return ROOT / "runs" / "llm_unlearn_cache" / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def splits_of(cfg: Config) -> FactsSplits:
    return make_splits(cfg.num_people, cfg.forget_fraction, cfg.holdout_fraction, cfg.data_seed)


# ---------------------------------------------------------------------------- process hygiene
def set_determinism(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def reset_peak_rss() -> int:
    """Release free heap, reset the peak-RSS mark (VmHWM) and return the current RSS in KiB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_kib("VmRSS")


def peak_rss_kib() -> int:
    return _rss_kib("VmHWM")


def _run_to_file(fn: Any, args: tuple, path: str) -> None:
    try:
        result: Any = ("ok", fn(*args))
    except BaseException as err:  # reported by the parent, with the run's other rows kept
        result = ("error", f"{type(err).__name__}: {err}")
    with open(path, "wb") as f:
        pickle.dump(result, f)


def run_tasks(
    tasks: list[tuple[Any, tuple]], jobs: int, done: Any = None, start_method: str = "fork"
) -> list[Any]:
    """Run ``fn(*args)`` of each task in its own forked process (own peak RSS), ``jobs`` at a time.

    Returns the results in order; a task that raised gives an ``Exception`` in its place.
    ``done(index, result)`` is called as each task finishes (progress output).
    """
    ctx = mp.get_context(start_method)  # "spawn" for CUDA runs: a forked child cannot initialise CUDA
    results: list[Any] = [None] * len(tasks)
    with tempfile.TemporaryDirectory() as tmp:
        pending, running = list(enumerate(tasks)), []
        while pending or running:
            while pending and len(running) < jobs:
                i, (fn, args) = pending.pop(0)
                proc = ctx.Process(target=_run_to_file, args=(fn, args, f"{tmp}/{i}.pkl"))
                proc.start()
                running.append((i, proc))
            time.sleep(0.2)
            for i, proc in list(running):
                if proc.exitcode is None:
                    continue
                running.remove((i, proc))
                try:
                    with open(f"{tmp}/{i}.pkl", "rb") as f:
                        status, value = pickle.load(f)
                except FileNotFoundError:
                    status, value = "error", f"process died with exit code {proc.exitcode}"
                results[i] = value if status == "ok" else RuntimeError(value)
                if done is not None:
                    done(i, results[i])
    return results


# ---------------------------------------------------------------------------- stage 1: learn
def learn(cfg: Config, split: str, path: Path, threads: int, device: str = "cpu") -> dict[str, Any]:
    """First-order AdamW on ``split`` ("train" = forget + retain, or "retain"), saved to ``path``."""
    set_determinism(threads)
    torch.manual_seed(cfg.data_seed)
    splits, tok = splits_of(cfg), load_tokenizer("bytes")
    pairs = splits.train if split == "train" else splits.retain
    model = build_causal_lm(cfg.model, seed=cfg.data_seed).to(device).train()
    data = QADataset(pairs, tok, cfg.max_length)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learn_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1.0 - s / cfg.learn_steps)
    )
    gen = torch.Generator().manual_seed(cfg.data_seed)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.learn_batch, shuffle=True, generator=gen)
    step, start, loss = 0, time.perf_counter(), float("nan")
    while step < cfg.learn_steps:
        for batch in loader:
            loss_t = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss_t.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step, loss = step + 1, float(loss_t)
            if step >= cfg.learn_steps:
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return {"split": split, "steps": step, "final_loss": loss, "wall_s": time.perf_counter() - start}


def load_model(cfg: Config, path: Path) -> torch.nn.Module:
    model = build_causal_lm(cfg.model, seed=cfg.data_seed)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


# ---------------------------------------------------------------------------- attacks
def relearn_attack(model: torch.nn.Module, cfg: Config, splits: FactsSplits, tok: Any, seed: int) -> dict:
    """``relearn_steps`` AdamW steps on a random ``relearn_fraction`` of the forget questions; EM on the rest."""
    pairs = list(splits.forget)
    random.Random(seed).shuffle(pairs)
    k = max(1, round(cfg.relearn_fraction * len(pairs)))
    attack, rest = pairs[:k], pairs[k:]
    m = copy.deepcopy(model).train().requires_grad_(True)
    batch = next(iter(torch.utils.data.DataLoader(QADataset(attack, tok, cfg.max_length), batch_size=k)))
    opt = torch.optim.AdamW(m.parameters(), lr=cfg.relearn_lr)
    torch.manual_seed(seed)
    for _ in range(cfg.relearn_steps):
        m(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    metrics, _ = evaluate_model(m.eval(), tok, FactsSplits(forget=rest, retain=[], holdout=[]))
    return {"relearn/forget_em_rest": metrics["forget/em"], "relearn/questions": len(attack)}


def quant_attack(
    model: torch.nn.Module, cfg: Config, splits: FactsSplits, tok: Any, reference: torch.Tensor
) -> dict:
    """Every linear layer but ``lm_head`` to bitsandbytes nf4 (the package's quant path), re-scored."""
    from lightning_zobi.quant.convert import keep_cpu_layout_, quantize_linear_4bit_

    m = copy.deepcopy(model).float()
    quantize_linear_4bit_(m, quant_type="nf4")
    keep_cpu_layout_(m)
    metrics, _ = evaluate_model(m.eval(), tok, splits, reference, retain_limit=cfg.retain_eval)
    return {f"nf4/{k}": metrics[k] for k in ("forget/em", "retain/em", "forget_quality")}


def score_all(
    model: torch.nn.Module,
    cfg: Config,
    splits: FactsSplits,
    tok: Any,
    reference: torch.Tensor | None,
    seed: int,
) -> tuple[dict, torch.Tensor]:
    metrics, ratios = evaluate_model(model, tok, splits, reference, retain_limit=cfg.retain_eval)
    if reference is not None and cfg.attacks:
        metrics.update(relearn_attack(model, cfg, splits, tok, seed))
        metrics.update(quant_attack(model, cfg, splits, tok, reference))
    return metrics, ratios


def score_fixed(cfg: Config, path: Path, reference: torch.Tensor | None, threads: int, seeds: tuple) -> Any:
    """Score a cached model (learned / retain-only); attacks once per seed (their random split)."""
    set_determinism(threads)
    splits, tok = splits_of(cfg), load_tokenizer("bytes")
    model = load_model(cfg, path)
    metrics, ratios = evaluate_model(model, tok, splits, reference, retain_limit=cfg.retain_eval)
    if reference is None or not cfg.attacks:
        return metrics, ratios
    attacks = [relearn_attack(model, cfg, splits, tok, s) for s in seeds]
    metrics["relearn/forget_em_rest"] = sum(a["relearn/forget_em_rest"] for a in attacks) / len(attacks)
    metrics["relearn/questions"] = attacks[0]["relearn/questions"]
    metrics.update(quant_attack(model, cfg, splits, tok, reference))
    return metrics, ratios


# ---------------------------------------------------------------------------- stage 2: unlearn
def unlearn(
    name: str,
    spec: dict[str, Any],
    cfg: Config,
    learned: Path,
    seed: int,
    reference: torch.Tensor,
    threads: int,
    accelerator: str = "cpu",
) -> dict[str, Any]:
    """One unlearning run (peak memory of the fit measured in this process), then its scores and attacks.

    CPU: the peak RSS above the process's start (everything the fit allocates, Lightning's own objects
    included); GPU: ``torch.cuda.max_memory_allocated`` over the fit (tensors only: weights, reference,
    gradients, optimizer state, activations), the figure that compares methods on a small model.
    """
    set_determinism(threads)
    base_kib = reset_peak_rss()
    pl.seed_everything(seed, verbose=False)
    module = UnlearningModule(
        model=cfg.model,
        lr=spec["lr"],
        init_from=str(learned),
        trainable=spec.get("trainable"),
        seed=cfg.data_seed,
        **{**OBJECTIVE, **spec.get("objective", {})},
        **spec.get("module", {}),
    )
    data = UnlearningDataModule(
        num_people=cfg.num_people,
        forget_fraction=cfg.forget_fraction,
        holdout_fraction=cfg.holdout_fraction,
        forget_batch_size=cfg.forget_batch,
        retain_batch_size=cfg.retain_batch,
        max_length=cfg.max_length,
        seed=cfg.data_seed,
    )
    callbacks = []
    zo = spec.get("zo")
    if zo is not None:
        callbacks.append(ZeroOrder(seed=seed, **zo))
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=spec.get("steps", cfg.unlearn_steps),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    if accelerator == "gpu":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(module, data)
    wall = time.perf_counter() - start
    if accelerator == "gpu":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (peak_rss_kib() - base_kib) / 1024
    fo_regex = None
    if zo is not None and zo["optimizer"] == "zo_fo_hybrid":
        fo_regex = zo["optimizer_kwargs"]["fo_params"]
    elif spec["mode"] == "FO" or (spec["mode"] == "control" and zo is None):
        fo_regex = spec.get("trainable") or ""
    model = module.model
    if hasattr(model, "merge_and_unload"):  # a peft adapter: fold it into the weights the attacks then see
        model = model.merge_and_unload()
    model = model.eval()
    splits, tok = splits_of(cfg), load_tokenizer("bytes")
    metrics, _ = score_all(model, cfg, splits, tok, reference, seed)
    return {
        "method": name,
        "mode": spec["mode"],
        "seed": seed,
        "steps": trainer.global_step,
        "wall_s": round(wall, 1),
        "peak_mib": round(peak_mib, 1),
        "forward_only_fraction": round(forward_only_fraction(model, fo_regex), 4),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
    }


# ---------------------------------------------------------------------------- aggregation
def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean and the half-width of its 95 % Student-t confidence interval."""
    from scipy.stats import t

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": float("nan"), "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": round(mean, 4), "ci95": round(float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n), 4), "n": n}


KEYS = (
    "forget/em",
    "retain/em",
    "forget_quality",
    "mia_auc",
    "forget/truth_ratio",
    "model_utility",
    "peak_mib",
    "wall_s",
    "relearn/forget_em_rest",
    "nf4/forget/em",
    "nf4/retain/em",
    "nf4/forget_quality",
)


def summarize(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["method"] for r in rows if "error" not in r):
        group = [r for r in rows if r["method"] == name and "error" not in r]
        out[name] = {
            "mode": group[0]["mode"],
            "seeds": [r["seed"] for r in group],
            "forward_only_fraction": group[0]["forward_only_fraction"],
            **{k: mean_ci([r[k] for r in group]) for k in KEYS if all(k in r for r in group)},
        }
    return out


def checks(s: dict, retain_only_forget: float, learned_retain: float, fo_peak: float | None) -> dict:
    c = {
        "forget_em_mean": s["forget/em"]["mean"],
        "forget_within_5pts_of_retain_only": abs(s["forget/em"]["mean"] - retain_only_forget) <= 0.05 + 1e-9,
        "retain_em_mean": s["retain/em"]["mean"],
        "retain_at_least_90pct_of_learned": s["retain/em"]["mean"] >= 0.9 * learned_retain - 1e-9,
        "forget_quality_mean": s["forget_quality"]["mean"],
        "forget_quality_at_least_0.05": s["forget_quality"]["mean"] >= 0.05,
        "peak_mib_mean": s["peak_mib"]["mean"],
        "forward_only_fraction": s["forward_only_fraction"],
    }
    quality = [k for k in c if k.startswith(("forget_within", "retain_at", "forget_quality_at"))]
    c["quality_passes"] = all(c[k] for k in quality)
    if fo_peak is not None:
        c["fo_peak_mib_mean"] = fo_peak
        c["peak_at_most_half_of_fo"] = s["peak_mib"]["mean"] <= 0.5 * fo_peak
        c["forward_only_at_least_90pct"] = s["forward_only_fraction"] >= 0.9
        c["passes"] = (
            c["quality_passes"] and c["peak_at_most_half_of_fo"] and c["forward_only_at_least_90pct"]
        )
    return c


def acceptance(summary: dict, retain_only_forget: float, learned_retain: float) -> dict:
    fo = summary.get("npo_fo")
    fo_peak = fo["peak_mib"]["mean"] if fo else None
    block: dict[str, Any] = {
        "bar": "means over seeds: forget EM within ±0.05 of retain-only; retain EM >= 0.9 x learned; forget "
        "quality (KS p) >= 0.05; ZO peak memory <= 0.5 x FO's; >= 90 % of parameters forward-only; the control "
        "(forward-only part switched off) must not pass",
        "retain_only_forget_em": retain_only_forget,
        "learned_retain_em": learned_retain,
    }
    if fo:
        block["npo_fo"] = checks(fo, retain_only_forget, learned_retain, None)
    candidates = {}
    for name, s in summary.items():
        if s["mode"] != "ZO":
            continue
        entry = checks(s, retain_only_forget, learned_retain, fo_peak)
        control = METHODS.get(name, {}).get("control")
        if control and control in summary:
            cc = checks(summary[control], retain_only_forget, learned_retain, fo_peak)
            entry["control"] = {"method": control, **cc}
            entry["control_does_not_pass"] = not cc["quality_passes"]
        else:
            entry["control"] = None
            entry["control_does_not_pass"] = None
        entry["accepted"] = bool(entry.get("passes") and entry["control_does_not_pass"])
        candidates[name] = entry
    block["zo_rows"] = candidates
    block["accepted_by"] = [n for n, e in candidates.items() if e["accepted"]]
    block["passed"] = bool(block["accepted_by"])
    return block


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mid", choices=sorted(CONFIGS))
    parser.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHODS), help=f"of {sorted(METHODS)} (or --set ones)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the config's")
    parser.add_argument("--steps", type=int, default=None, help="override every method's unlearning steps")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.KEY=JSON",
        help="override a method field, e.g. npo_zo_head.zo.lr=2e-5 (repeatable)",
    )
    parser.add_argument("--no-attacks", action="store_true", help="skip the relearning and nf4 attacks")
    parser.add_argument("--learn-only", action="store_true", help="only learn and cache the two models")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--accelerator",
        default="cpu",
        choices=["cpu", "gpu"],
        help="where the unlearning runs (learning: CPU)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="processes run side by side")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_unlearn.json"))
    args = parser.parse_args()
    cfg = CONFIGS[args.config]
    if args.seeds:
        cfg.seeds = tuple(args.seeds)
    if args.steps:  # every method, also those with steps of their own
        cfg.unlearn_steps = args.steps
        for spec in METHODS.values():
            spec.pop("steps", None)
    cfg.attacks = not args.no_attacks
    for item in args.set:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        target = METHODS
        for part in path:
            target = target.setdefault(part, {})
        target[last] = json.loads(value)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}: choose from {sorted(METHODS)} or define them with --set")
    set_determinism(args.threads)
    t0 = time.perf_counter()
    splits = splits_of(cfg)
    cache = cache_dir(args.config, cfg)
    learned, retain_only = cache / "learned.pt", cache / "retain_only.pt"
    todo = [(s, p) for s, p in (("train", learned), ("retain", retain_only)) if not p.exists()]
    learn_info = {}
    for info in run_tasks([(learn, (cfg, s, p, args.threads)) for s, p in todo], args.jobs):
        if isinstance(info, Exception):
            raise info
        learn_info[info["split"]] = info
        print(
            f"learned {info['split']}: {info['steps']} steps, loss {info['final_loss']:.4f}, "
            f"{info['wall_s']:.0f}s",
            flush=True,
        )

    if args.learn_only:
        return
    [first] = run_tasks([(score_fixed, (cfg, retain_only, None, args.threads, cfg.seeds))], 1)
    if isinstance(first, Exception):
        raise first
    reference = first[1]
    runs = [(name, seed) for seed in cfg.seeds for name in args.methods]
    tasks = [(score_fixed, (cfg, p, reference, args.threads, cfg.seeds)) for p in (learned, retain_only)]
    tasks += [
        (unlearn, (n, METHODS[n], cfg, learned, s, reference, args.threads, args.accelerator))
        for n, s in runs
    ]
    results = run_tasks(
        tasks,
        args.jobs,
        lambda i, r: print(f"done {i}: {r if i >= 2 else ''}", flush=True),
        "spawn" if args.accelerator == "gpu" else "fork",
    )
    for r in results[:2]:
        if isinstance(r, Exception):
            raise r
    (learned_m, _), (retain_m, _) = results[:2]
    rows: list[dict[str, Any]] = []
    for label, m in (("learned", learned_m), ("retain_only", retain_m)):
        rows.append({"method": label, "mode": "FO", **{k: round(v, 4) for k, v in m.items()}})
    for (name, seed), row in zip(runs, results[2:], strict=True):
        if isinstance(row, Exception):  # a diverging run must not hide the others
            row = {"method": name, "mode": METHODS[name]["mode"], "seed": seed, "error": str(row)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    base_forget, base_retain = retain_m["forget/em"], learned_m["retain/em"]
    summary = summarize([r for r in rows if "seed" in r])
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {args.threads} x {args.jobs} processes, torch {torch.__version__})"
        + (f"; unlearning on {torch.cuda.get_device_name(0)}" if args.accelerator == "gpu" else ""),
        "memory": "torch.cuda.max_memory_allocated over the fit"
        if args.accelerator == "gpu"
        else "peak RSS above the run process's start (VmHWM)",
        "command": "python " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": {"name": args.config, **asdict(cfg)},
        "parameters": sum(p.numel() for p in build_causal_lm(cfg.model).parameters()),
        "forget_questions": len(splits.forget),
        "retain_questions": len(splits.retain),
        "retain_questions_scored": min(cfg.retain_eval, len(splits.retain)),
        "holdout_questions": len(splits.holdout),
        "methods": {n: METHODS[n] for n in args.methods},
        "objective": OBJECTIVE,
        "learn": learn_info,
        "rows": rows,
        "summary": summary,
        "acceptance": acceptance(summary, base_forget, base_retain),
        "total_s": round(time.perf_counter() - t0, 1),
    }
    print(f"\nretain-only forget EM {base_forget:.3f}; learned retain EM {base_retain:.3f}")
    for name, s in summary.items():
        print(
            f"{name:>22} {s['mode']:>7}  forget EM {s['forget/em']['mean']:.3f}±{s['forget/em']['ci95']:.3f}  "
            f"retain EM {s['retain/em']['mean']:.3f}±{s['retain/em']['ci95']:.3f}  "
            f"FQ {s['forget_quality']['mean']:.3g}  peak {s['peak_mib']['mean']:.0f} MiB"
            + (
                f"  relearn {s['relearn/forget_em_rest']['mean']:.3f}  nf4 forget {s['nf4/forget/em']['mean']:.3f}"
                if "nf4/forget/em" in s
                else ""
            )
        )
    print(json.dumps(result["acceptance"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} ({result['total_s']:.0f}s)")


if __name__ == "__main__":
    main()
