"""DeepZero's coordinate-wise ZO (``zo_cge``) training a small CNN from scratch, against ZO-SGD and FO SGD.

Task: scikit-learn's 8x8 digits (1 437 train / 360 test images, ``lightning_zobi.data.images``), a CNN
conv(1→8, 3x3) → ReLU → maxpool → conv(8→16, 3x3) → ReLU → maxpool → linear(64→10): 1 898 parameters,
from the same random start for every method of a seed. Mini-batches of 128, the batch fixed within a step.

Every method gets the same number of forward passes:
* ``zo_cge``: ``coordinates`` partial derivatives per step by forward differences (``coordinates + 1``
  forwards), drawn from a ZO-GraSP mask of density 0.5 (its ``4·grasp_queries`` forwards are counted)
  or from every coordinate (``mask="none"``);
* ``zo_sgd``: central two-point ZO-SGD (MeZO), 2 forwards per step;
* ``fo_sgd``: first-order SGD, 1 forward (+ 1 backward, not counted: FO's budget is generous in compute).
Each method's learning rate is picked on a tuning seed (100) from a small grid by its final train loss,
then reported as mean ± std over the evaluation seeds.

Run:  OMP_NUM_THREADS=1 python benchmarks/deepzero_cge.py --forwards 6000 --seeds 0 1 2
Writes benchmarks/results/deepzero_cge.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lightning_zobi.data.images import load_digits_splits
from lightning_zobi.zo.coordinate import ZOCGE
from lightning_zobi.zo.optim import ZOSGD, NonFiniteLossError

GRIDS = {
    "zo_cge (ZO-GraSP 0.5)": [0.2, 0.5, 1.0],
    "zo_cge (dense)": [0.2, 0.5, 1.0],
    "zo_sgd": [1e-3, 3e-3, 1e-2],
    "fo_sgd": [0.05, 0.1, 0.3],
}


def make_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def run(method: str, lr: float, seed: int, forwards: int, coordinates: int) -> dict:
    splits = load_digits_splits(8, 1, 0.2, 0)
    xtr, ytr, xte, yte = splits.train.images, splits.train.labels, splits.test.images, splits.test.labels
    net = make_cnn(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    state = {"x": xtr[:128], "y": ytr[:128]}

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(net(state["x"]), state["y"])

    if method.startswith("zo_cge"):
        mask = "zo_grasp" if "GraSP" in method else "none"
        opt = ZOCGE(net.parameters(), lr=lr, eps=5e-3, coordinates=coordinates, density=0.5 if mask != "none" else 1.0,
                    mask=mask, grasp_queries=32, mask_every=50, seed=seed).attach(net)  # fmt: skip
        per_step = coordinates + 1
        used = 4 * 32 if mask == "zo_grasp" else 0
    elif method == "zo_sgd":
        opt = ZOSGD(net.parameters(), lr=lr, eps=1e-3, seed=seed).attach(net)
        per_step, used = 2, 0
    else:
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        per_step, used = 1, 0
    steps = 0
    start = time.perf_counter()
    while used + per_step <= forwards:
        idx = torch.randint(0, len(ytr), (128,), generator=gen)
        state["x"], state["y"] = xtr[idx], ytr[idx]
        if method == "fo_sgd":
            opt.zero_grad()
            loss().backward()
            opt.step()
        else:
            try:
                opt.step(loss)
            except NonFiniteLossError:  # diverged: reported as an infinite loss
                break
        used += per_step
        steps += 1
    with torch.no_grad():
        train_loss = float(nn.functional.cross_entropy(net(xtr), ytr))
        acc = float((net(xte).argmax(1) == yte).float().mean())
    return {"method": method, "lr": lr, "seed": seed, "steps": steps, "forwards": used,
            "train_loss": train_loss if math.isfinite(train_loss) else float("inf"), "test_acc": acc,
            "seconds": time.perf_counter() - start}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--forwards", type=int, default=6000)
    parser.add_argument("--coordinates", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tune-seed", type=int, default=100)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "deepzero_cge.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    records, rows = [], []
    for method, grid in GRIDS.items():
        tuning = [run(method, lr, args.tune_seed, args.forwards, args.coordinates) for lr in grid]
        records += [{**r, "phase": "tune"} for r in tuning]
        best = min(tuning, key=lambda r: r["train_loss"])["lr"]
        evals = [run(method, best, s, args.forwards, args.coordinates) for s in args.seeds]
        records += [{**r, "phase": "eval"} for r in evals]
        losses, accs = [r["train_loss"] for r in evals], [r["test_acc"] for r in evals]
        rows.append((method, best, evals[0]["steps"], statistics.mean(losses), statistics.stdev(losses),
                     statistics.mean(accs), statistics.stdev(accs), statistics.mean(r["seconds"] for r in evals)))  # fmt: skip
        print(rows[-1], flush=True)
    print(f"\nForward budget {args.forwards}, {args.coordinates} coordinates per CGE step, seeds {args.seeds} "
          f"(lr tuned on seed {args.tune_seed}); start: train loss {math.log(10):.3f} is chance.\n")  # fmt: skip
    print("| method | lr | steps | train loss | test acc | s/run |\n|---|---|---|---|---|---|")
    for m, lr, steps, lm, ls, am, as_, sec in rows:
        print(f"| {m} | {lr:g} | {steps} | {lm:.3f} ± {ls:.3f} | {100 * am:.1f} ± {100 * as_:.1f} % | {sec:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "records": records}, indent=1))


if __name__ == "__main__":
    main()
