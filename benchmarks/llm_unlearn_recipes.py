"""LLM unlearning chain on CPU: learn the facts, train a retain-only model, unlearn with every method (FO and ZO).

Runs the recipes of ``recipes/llm/`` through the ``zobi`` CLI, in order, passing checkpoints between
stages by ``init_from`` exactly as a user would (only output folders and, with ``--steps-scale``, step
counts are rewritten), then scores every resulting model with
:func:`lightning_zobi.unlearn.metrics.evaluate_model` on the forget / retain / hold-out questions.

Acceptance (issue 4, forget10): after ``learn_facts`` the model answers forget and retain questions;
after GradDiff / NPO the forget exact match is within ±5 points of the retain-only model's while the
retain exact match stays ≥ 90 % of the learned model's.

Usage::

    python benchmarks/llm_unlearn_recipes.py                    # whole chain, FO and ZO, prints a table
    python benchmarks/llm_unlearn_recipes.py --methods grad_diff npo --no-zo

Writes ``benchmarks/results/llm_unlearn_recipes.json`` (the multi-seed successor with the acceptance of
issue 23 is ``benchmarks/llm_unlearn.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_zobi.cli import main as zobi  # noqa: E402
from lightning_zobi.data.facts import make_splits  # noqa: E402
from lightning_zobi.lightning.datamodules.facts import load_tokenizer  # noqa: E402
from lightning_zobi.lightning.modules.causal_lm import build_causal_lm  # noqa: E402
from lightning_zobi.unlearn.llm import METHODS, load_weights  # noqa: E402
from lightning_zobi.unlearn.metrics import evaluate_model  # noqa: E402

RECIPES = ROOT / "recipes" / "llm"


def run_stage(
    recipe: str, workdir: Path, init_from: Path | None, retain_from: Path | None, scale: float
) -> tuple[Path, float]:
    """Run one recipe with its outputs under ``workdir``; return (checkpoint path, wall seconds of the fit)."""
    config = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())
    out = workdir / recipe
    trainer = config["trainer"]
    trainer.update(default_root_dir=str(out), enable_progress_bar=False, logger=False, limit_val_batches=0)
    trainer.pop("val_check_interval", None)
    trainer["check_val_every_n_epoch"] = 1  # without validation, ModelCheckpoint saves at epoch (and fit) end
    trainer["max_steps"] = max(1, round(trainer["max_steps"] * scale))
    checkpoints = [cb for cb in trainer.get("callbacks", []) if cb["class_path"].endswith("ModelCheckpoint")]
    if len(checkpoints) != 1:
        raise ValueError(f"recipe {recipe} must have exactly one ModelCheckpoint callback.")
    checkpoints[0]["init_args"]["dirpath"] = str(out)
    args = config["model"]["init_args"]
    if args.get("decay_steps"):
        args["decay_steps"] = trainer["max_steps"]
    if init_from is not None:
        args["init_from"] = str(init_from)
    if "retain_model_from" in args:
        args["retain_model_from"] = None  # forget quality is computed below, once per model
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    start = time.perf_counter()
    zobi(["fit", "--config", f.name])
    wall = time.perf_counter() - start
    os.unlink(f.name)
    ckpt = out / (checkpoints[0]["init_args"]["filename"] + ".ckpt")
    if not ckpt.exists():
        raise RuntimeError(f"stage {recipe} wrote no checkpoint at {ckpt}.")
    return ckpt, wall


def score(
    ckpt: Path, recipe: str, reference: torch.Tensor | None, tok: Any, splits: Any
) -> tuple[dict, torch.Tensor]:
    config = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())
    model = load_weights(
        build_causal_lm(config["model"]["init_args"].get("model", "tiny-llama")), ckpt
    ).eval()
    return evaluate_model(model, tok, splits, reference_ratios=reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=sorted(METHODS))
    parser.add_argument("--no-zo", action="store_true", help="skip the ZO recipes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every recipe's max_steps")
    parser.add_argument(
        "--reuse-stages",
        action="store_true",
        help="reuse learn_facts/retain_only checkpoints of an earlier run",
    )
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "llm_unlearn_bench"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_unlearn_recipes.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    t0 = time.perf_counter()

    data = yaml.safe_load((RECIPES / "unlearn_grad_diff.yaml").read_text())["data"]["init_args"]
    splits = make_splits(
        data["num_people"],
        data.get("forget_fraction", 0.1),
        data.get("holdout_fraction", 0.1),
        data.get("seed", 0),
    )
    tok = load_tokenizer(data.get("tokenizer", "bytes"))

    rows: list[dict[str, Any]] = []

    def record(name: str, mode: str, wall: float, metrics: dict[str, float]) -> None:
        row = {
            "method": name,
            "mode": mode,
            "wall_s": round(wall, 1),
            **{k: round(v, 4) for k, v in metrics.items()},
        }
        rows.append(row)
        print(
            f"{name:>12} {mode:>3}  forget EM {row['forget/em']:.3f}  retain EM {row['retain/em']:.3f}  "
            f"FQ {row.get('forget_quality', float('nan')):.3g}  MIA {row['mia_auc']:.3f}  {row['wall_s']:.1f}s",
            flush=True,
        )

    if args.reuse_stages:
        learned, wall = workdir / "learn_facts" / "learned.ckpt", float("nan")
        retain_only, wall_r = workdir / "retain_only" / "retain_only.ckpt", float("nan")
    else:
        learned, wall = run_stage("learn_facts", workdir, None, None, args.steps_scale)
        retain_only, wall_r = run_stage("retain_only", workdir, None, None, args.steps_scale)
    ref_metrics, reference = score(retain_only, "retain_only", None, tok, splits)
    ref_metrics, _ = score(retain_only, "retain_only", reference, tok, splits)
    learned_metrics, _ = score(learned, "learn_facts", reference, tok, splits)
    record("learned", "FO", wall, learned_metrics)
    record("retain_only", "FO", wall_r, ref_metrics)

    for method in args.methods:
        for mode, suffix in (("FO", ""), ("ZO", "_zo")):
            if mode == "ZO" and args.no_zo:
                continue
            recipe = f"unlearn_{method}{suffix}"
            try:
                ckpt, wall = run_stage(recipe, workdir, learned, retain_only, args.steps_scale)
            except Exception as err:  # a diverging ZO run must not hide the other rows
                rows.append({"method": method, "mode": mode, "error": f"{type(err).__name__}: {err}"})
                print(f"{method:>12} {mode:>3}  FAILED: {err}", flush=True)
                continue
            metrics, _ = score(ckpt, recipe, reference, tok, splits)
            record(method, mode, wall, metrics)

    base_forget, base_retain = ref_metrics["forget/em"], learned_metrics["retain/em"]
    checks = {}
    for row in rows:
        if row["method"] in ("grad_diff", "npo") and "error" not in row:
            checks[f"{row['method']}_{row['mode']}"] = {
                "forget_within_5pts_of_retain_only": abs(row["forget/em"] - base_forget) <= 0.05 + 1e-9,
                "retain_at_least_90pct_of_learned": row["retain/em"] >= 0.9 * base_retain,
            }
    total = time.perf_counter() - t0
    print(
        f"\nretain-only forget EM {base_forget:.3f}; learned retain EM {base_retain:.3f}; total {total:.0f}s"
    )
    for name, check in checks.items():
        print(f"  {name}: {check}")
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads})",
        "command": "python " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "people": data["num_people"],
        "forget_questions": len(splits.forget),
        "retain_questions": len(splits.retain),
        "rows": rows,
        "acceptance": checks,
        "total_s": round(total, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
