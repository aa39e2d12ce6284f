"""One ZO unlearning run with overrides (LoRA, queries, steps, lr) on the cached llm_unlearn stages.

Levers for the ZO GradDiff / NPO rows of ``benchmarks/llm_unlearn_recipes.py``: starts from
``recipes/llm/unlearn_<method>_zo.yaml``, applies JSON overrides to the model's init_args
(``"model"``: e.g. ``lora_r``, ``lora_target_modules``, ``alpha``), to the ``ZeroOrder`` callback
(``"zo"``: ``lr``, ``queries``) and ``max_steps``, runs it through the ``zobi`` CLI from the
``learn_facts`` checkpoint cached by ``llm_unlearn_recipes.py`` (under ``--workdir``; run that first), merges a
LoRA adapter into the base model and scores it with ``evaluate_model``. Appends one JSON line to
``benchmarks/results/llm_unlearn_zo_levers.jsonl``.

Usage::

    python benchmarks/llm_unlearn_zo_levers.py NAME grad_diff '{"zo": {"queries": 4}}'
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_unlearn_recipes as bench  # noqa: E402

from lightning_zobi.lightning.modules.causal_lm import add_lora, build_causal_lm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("method", choices=["grad_diff", "npo"])
    parser.add_argument("overrides", help='JSON: {"model": {...}, "zo": {...}, "max_steps": N}')
    parser.add_argument("--workdir", default=str(bench.ROOT / "runs" / "llm_unlearn_bench"))
    parser.add_argument(
        "--out", default=str(bench.ROOT / "benchmarks" / "results" / "llm_unlearn_zo_levers.jsonl")
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    work, ov = Path(args.workdir), json.loads(args.overrides)
    config = yaml.safe_load((bench.RECIPES / f"unlearn_{args.method}_zo.yaml").read_text())
    out = work / "levers" / args.name
    trainer = config["trainer"]
    trainer.update(default_root_dir=str(out), enable_progress_bar=False, logger=False, limit_val_batches=0)
    trainer.pop("val_check_interval", None)
    trainer["check_val_every_n_epoch"] = 1
    trainer["max_steps"] = ov.get("max_steps", trainer["max_steps"])
    for cb in trainer["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(out)
        if cb["class_path"].endswith("ZeroOrder"):
            cb["init_args"].update(ov.get("zo", {}))
    model_args = config["model"]["init_args"]
    model_args.update(ov.get("model", {}))
    model_args["init_from"] = str(work / "learn_facts" / "learned.ckpt")
    model_args["retain_model_from"] = None
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    start = time.perf_counter()
    bench.zobi(["fit", "--config", f.name])
    wall = time.perf_counter() - start
    Path(f.name).unlink()

    data = yaml.safe_load((bench.RECIPES / "unlearn_grad_diff.yaml").read_text())["data"]["init_args"]
    splits = bench.make_splits(
        data["num_people"],
        data.get("forget_fraction", 0.1),
        data.get("holdout_fraction", 0.1),
        data.get("seed", 0),
    )
    tok = bench.load_tokenizer(data.get("tokenizer", "bytes"))
    net = build_causal_lm(model_args.get("model", "tiny-llama"))
    rank = model_args.get("lora_r", 0)
    if rank:
        net = add_lora(
            net, rank, model_args.get("lora_alpha", 16), 0.0, model_args.get("lora_target_modules")
        )
    state = torch.load(out / "unlearned.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if rank:
        net = net.merge_and_unload()
    retain_only = bench.load_weights(build_causal_lm("tiny-llama"), work / "retain_only" / "retain_only.ckpt")
    _, reference = bench.evaluate_model(retain_only.eval(), tok, splits)
    metrics, _ = bench.evaluate_model(net.eval(), tok, splits, reference_ratios=reference)
    row = {"name": args.name, "method": args.method, "overrides": ov, "wall_s": round(wall, 1)}
    row.update({k: round(v, 4) for k, v in metrics.items()})
    print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
