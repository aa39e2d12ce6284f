"""Quality of the ZO rules at an equal number of forward passes, against FO AdamW and plain ZO-SGD.

Two small tasks the package can build offline, both on CPU in minutes:

* ``digits``: an MLP (64-64-10, 4.8 k parameters) trained from a fixed random start on scikit-learn's
  digits (1 200 train / 597 test images); loss = cross-entropy on the full train set, accuracy on
  the test set.
* ``lm``: MeZO-style prompt-based classification with a tiny Llama (hidden 32, 2 layers, vocab 16,
  21 k parameters). The model is first "pre-trained" with FO AdamW on a related task (does token 3
  occur in the sequence?), then fine-tuned on the target task (does token 2 occur?) by reading the
  logits of two label words ("no"/"yes") at the last position, as MeZO does with prompts.

Every rule gets the same budget of forward passes (central ZO-SGD: 2 per step; ZO-SGD-Cons: 4;
``queries=4``: 8; forward difference: 2; the ZO/FO hybrid: 3 plus one backward through the head;
FO AdamW: 1 plus one backward, so its budget is generous in compute). Each rule's learning rate is
picked from a small grid by the mean final train loss over the seeds, then reported as mean ± std
over those seeds. "state bytes" is what the optimizer keeps between steps (``extra_state_bytes``);
"grad bytes" is the ``.grad`` memory a first-order part needs during a step.

Run:  python benchmarks/zo_quality.py --task digits --jobs 2   (a few minutes on 2 free cores)
      python benchmarks/zo_quality.py --task lm --jobs 2       (about 10 minutes on 2 free cores)
Writes benchmarks/results/zo_quality_<task>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_zobi.zo.optim import build_optimizer, extra_state_bytes


@dataclass
class Rule:
    """One row of the table: a rule name, its build arguments and its learning-rate grid."""

    label: str
    name: str
    lrs: list[float]
    kwargs: dict[str, Any] = field(default_factory=dict)
    forwards_per_step: int = 2


@dataclass
class Task:
    """Model factory, per-step batches, the loss, and the final metrics."""

    name: str
    make_model: Callable[[int], nn.Module]
    batch: Callable[[int, int], tuple[Tensor, Tensor]]  # (seed, step) -> batch
    loss: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor]
    evaluate: Callable[[nn.Module], tuple[float, float]]  # -> (train loss, test accuracy)
    fo_regex: str


# ----------------------------------------------------------------------------- tasks
def digits_task() -> Task:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1200], perm[1200:]

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))

    def batch(seed: int, step: int) -> tuple[Tensor, Tensor]:
        idx = train[
            torch.randint(len(train), (64,), generator=torch.Generator().manual_seed(seed * 100_003 + step))
        ]
        return x[idx], y[idx]

    def loss(model: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(b[0]), b[1])

    @torch.no_grad()
    def evaluate(model: nn.Module) -> tuple[float, float]:
        train_loss = float(F.cross_entropy(model(x[train]), y[train]))
        acc = float((model(x[test]).argmax(-1) == y[test]).float().mean())
        return train_loss, acc

    return Task("digits", make_model, batch, loss, evaluate, fo_regex=r"^2\.")


def lm_task() -> Task:
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, length, no, yes = 16, 8, 0, 1
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )

    def sample(gen: torch.Generator, n: int, token: int) -> tuple[Tensor, Tensor]:
        ids = torch.randint(2, vocab, (n, length), generator=gen)
        return ids, (ids == token).any(-1).long()

    def loss_on(model: nn.Module, ids: Tensor, labels: Tensor) -> Tensor:
        logits = model(input_ids=ids).logits[:, -1, [no, yes]]
        return F.cross_entropy(logits, labels)

    pretrained: dict[int, dict[str, Tensor]] = {}

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        if seed not in pretrained:  # FO "pre-training" on the related task, once per seed
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            gen = torch.Generator().manual_seed(10_000 + seed)
            for _ in range(300):
                ids, labels = sample(gen, 64, token=3)
                opt.zero_grad()
                loss_on(model, ids, labels).backward()
                opt.step()
            pretrained[seed] = copy.deepcopy(model.state_dict())
        model.load_state_dict(pretrained[seed])
        return model

    train_ids, train_labels = sample(torch.Generator().manual_seed(1), 512, token=2)
    test_ids, test_labels = sample(torch.Generator().manual_seed(2), 512, token=2)

    def batch(seed: int, step: int) -> tuple[Tensor, Tensor]:
        idx = torch.randint(512, (32,), generator=torch.Generator().manual_seed(seed * 100_003 + step))
        return train_ids[idx], train_labels[idx]

    def loss(model: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return loss_on(model, *b)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> tuple[float, float]:
        train_loss = float(loss_on(model, train_ids, train_labels))
        logits = model(input_ids=test_ids).logits[:, -1, [no, yes]]
        return train_loss, float((logits.argmax(-1) == test_labels).float().mean())

    return Task("lm", make_model, batch, loss, evaluate, fo_regex=r"lm_head")


# ----------------------------------------------------------------------------- rules
def rules_for(task: str) -> list[Rule]:
    if task == "digits":
        zo, sign, adam, fo = (
            [3e-3, 1e-2, 3e-2, 1e-1],
            [1e-3, 3e-3, 1e-2, 3e-2],
            [3e-3, 1e-2, 3e-2, 1e-1],
            [1e-3, 1e-2],
        )
    else:
        zo, sign, adam, fo = (
            [1e-4, 3e-4, 1e-3, 3e-3],
            [3e-4, 1e-3, 3e-3, 1e-2],
            [3e-4, 1e-3, 3e-3, 1e-2],
            [1e-3, 3e-3],
        )
    return [
        Rule("FO AdamW", "fo_adamw", fo, forwards_per_step=1),
        Rule("ZO-SGD (MeZO)", "zo_sgd", zo),
        Rule("ZO-SGD momentum 0.9", "zo_sgd_momentum", [lr / 10 for lr in zo], {"momentum": 0.9}),
        Rule("ZO-Sign", "zo_sign", sign),
        Rule("ZO-Adam", "zo_adam", adam),
        Rule("ZO-SGD-Cons", "zo_sgd_cons", zo, forwards_per_step=4),
        Rule("ZO-SGD q=4", "zo_sgd", zo, {"queries": 4}, forwards_per_step=8),
        Rule("ZO-SGD forward diff.", "zo_sgd", zo, {"difference": "forward"}, forwards_per_step=2),
        Rule("LOZO r=2 nu=50", "lozo", zo, {"rank": 2, "nu": 50}),
        Rule("LOZO r=8 nu=50", "lozo", zo, {"rank": 8, "nu": 50}),
        Rule("LOZO-M r=2 nu=50", "lozo_m", zo, {"rank": 2, "nu": 50, "beta": 0.9}),
        Rule("Sparse-MeZO 25%", "sparse_zo", [3 * lr for lr in zo], {"density": 0.25}),
        Rule(
            "ZO + FO head (hybrid)", "zo_fo_hybrid", [*zo, 3 * zo[-1]], {"fo_lr": 3e-3}, forwards_per_step=3
        ),
    ]


# ----------------------------------------------------------------------------- runs
_TASKS: dict[str, Task] = {}


def get_task(name: str) -> Task:
    """The task named ``name``, built once per process (workers build their own)."""
    if name not in _TASKS:
        _TASKS[name] = digits_task() if name == "digits" else lm_task()
    return _TASKS[name]


def run_one(task_name: str, rule: Rule, lr: float, seed: int, budget: int) -> dict[str, float]:
    torch.set_num_threads(1)
    task = get_task(task_name)
    model = task.make_model(seed)
    if rule.name == "fo_adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    else:
        kwargs = dict(rule.kwargs)
        params: Any = list(model.parameters())
        if rule.name == "zo_fo_hybrid":
            params, kwargs["fo_params"] = list(model.named_parameters()), task.fo_regex
        opt = build_optimizer(rule.name, params, lr=lr, eps=1e-3, seed=seed, **kwargs)
    steps = budget // rule.forwards_per_step
    grad_bytes = 0
    for step in range(steps):
        b = task.batch(seed, step)
        if rule.name == "fo_adamw":
            opt.zero_grad()
            task.loss(model, b).backward()
            grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
            opt.step()
        else:
            opt.step(lambda b=b: task.loss(model, b))
    if rule.name == "zo_fo_hybrid":
        grad_bytes = sum(p.numel() * p.element_size() for p in opt.fo_parameters())
    train_loss, acc = task.evaluate(model)
    return {
        "train_loss": train_loss,
        "test_acc": acc,
        "state_bytes": extra_state_bytes(opt),
        "grad_bytes": grad_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["digits", "lm"], default="digits")
    parser.add_argument("--budget", type=int, default=None, help="forward passes per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = get_task(args.task)
    budget = args.budget or (4000 if args.task == "digits" else 1200)
    seeds = list(range(args.seeds))
    start_model = task.make_model(0)
    n_params = sum(p.numel() for p in start_model.parameters())
    start_loss, start_acc = task.evaluate(start_model)
    rows = []
    t0 = time.time()
    rules = rules_for(args.task)
    jobs = [(args.task, rule, lr, seed, budget) for rule in rules for lr in rule.lrs for seed in seeds]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(run_one, *zip(*jobs, strict=True)))
    else:
        results = [run_one(*job) for job in jobs]
    by_job = {(rule.label, lr, seed): r for (_, rule, lr, seed, _), r in zip(jobs, results, strict=True)}
    for rule in rules:
        by_lr = {}
        for lr in rule.lrs:
            runs = [by_job[(rule.label, lr, seed)] for seed in seeds]
            losses = [r["train_loss"] for r in runs]
            mean = statistics.mean(losses) if all(math.isfinite(v) for v in losses) else math.inf
            by_lr[lr] = (mean, runs)
        best_lr = min(by_lr, key=lambda lr: by_lr[lr][0])
        runs = by_lr[best_lr][1]
        row = {
            "rule": rule.label,
            "name": rule.name,
            "kwargs": rule.kwargs,
            "lr": best_lr,
            "forwards_per_step": rule.forwards_per_step,
            "steps": budget // rule.forwards_per_step,
            "train_loss_mean": statistics.mean(r["train_loss"] for r in runs),
            "train_loss_std": statistics.pstdev(r["train_loss"] for r in runs),
            "test_acc_mean": statistics.mean(r["test_acc"] for r in runs),
            "test_acc_std": statistics.pstdev(r["test_acc"] for r in runs),
            "state_bytes": runs[0]["state_bytes"],
            "grad_bytes": runs[0]["grad_bytes"],
            "lr_grid": {str(lr): by_lr[lr][0] for lr in rule.lrs},
        }
        rows.append(row)
        print(
            f"  {rule.label:24s} lr={best_lr:g} loss={row['train_loss_mean']:.4f} ({time.time() - t0:.0f}s)",
            flush=True,
        )
    result = {
        "task": args.task,
        "budget_forwards": budget,
        "seeds": seeds,
        "params": n_params,
        "param_bytes": n_params * 4,
        "start_train_loss": start_loss,
        "start_test_acc": start_acc,
        "torch": torch.__version__,
        "device": f"cpu ({os.cpu_count()} cores, {args.jobs} worker processes of 1 thread)",
        "seconds": time.time() - t0,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"zo_quality_{args.task}.json"
    path.write_text(json.dumps(result, indent=2))
    zo_sgd = next(r for r in rows if r["name"] == "zo_sgd" and not r["kwargs"])
    print(
        f"\n{args.task}: {n_params} params, {budget} forwards per run, seeds {seeds}; "
        f"start: train loss {start_loss:.3f}, test acc {start_acc:.3f}\n"
    )
    print("| rule | lr | steps | train loss | vs ZO-SGD | test acc | state bytes | grad bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        delta = r["train_loss_mean"] - zo_sgd["train_loss_mean"]
        print(
            f"| {r['rule']} | {r['lr']:g} | {r['steps']} | {r['train_loss_mean']:.3f} ± {r['train_loss_std']:.3f} "
            f"| {delta:+.3f} | {r['test_acc_mean']:.3f} ± {r['test_acc_std']:.3f} | {r['state_bytes']} "
            f"| {r['grad_bytes']} |"
        )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
