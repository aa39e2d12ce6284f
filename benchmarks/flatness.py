"""Does ZO-SGD reach flatter minima than FO SGD? The Hessian trace each reaches, on two problems, several seeds.

"Zeroth-Order Optimization Finds Flat Minima" (arXiv 2506.05454): the two-point estimator makes ZO-SGD
minimise ``L + (ε²/2)·tr(∇²L)`` in expectation, so among equally good minima it drifts to the flattest.

* ``valley``: ``L(u, v) = (uᵀv − 1)²`` with ``u, v ∈ R^8``, started unbalanced (``|u| ≈ 3``, ``|v| ≈ 1/3``).
  Every point with ``uᵀv = 1`` is a minimum; there ``tr(∇²L) = 2(|u|² + |v|²) ≥ 4`` (equality iff ``u = v``).
  ZO-SGD (ε = 0.1) and FO SGD run the same steps at the same rate; the trace is exact (``torch.func.hessian``)
  and also estimated by :func:`lightning_zobi.zo.diagnostics.hessian_trace` (the forward-only diagnostic).
* ``digits``: an MLP 64-32-10 (2 410 parameters) on scikit-learn's digits, full-batch. ZO-SGD runs a fixed
  number of steps; FO SGD, from the same start, runs until its train loss is *at or below* ZO's final one
  (the control: a trace is only comparable at equal loss), then the trace of both is estimated with
  64 Hutchinson probes (float64, ε = 1e-3).

Run:  OMP_NUM_THREADS=1 python benchmarks/flatness.py --seeds 0 1 2
Writes benchmarks/results/flatness.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch import nn
from torch.func import hessian

from lightning_zobi.data.images import load_digits_splits
from lightning_zobi.zo.diagnostics import hessian_trace
from lightning_zobi.zo.optim import ZOSGD


def valley(seed: int, steps: int, lr: float, eps: float) -> dict:
    dim = 8
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(dim, generator=gen, dtype=torch.float64)
    e = e / e.norm()
    u0 = 3.0 * e + 0.1 * torch.randn(dim, generator=gen, dtype=torch.float64)
    v0 = e / 3.0 + 0.1 * torch.randn(dim, generator=gen, dtype=torch.float64)

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        return (flat[:dim] @ flat[dim:] - 1.0) ** 2

    out = {"seed": seed, "start_trace": float(torch.diagonal(hessian(loss_of)(torch.cat([u0, v0]))).sum())}
    for method in ("zo_sgd", "fo_sgd"):
        theta = nn.Parameter(torch.cat([u0, v0]).clone())
        if method == "zo_sgd":
            opt = ZOSGD([theta], lr=lr, eps=eps, seed=seed)
            for _ in range(steps):
                opt.step(lambda theta=theta: loss_of(theta))
        else:
            sgd = torch.optim.SGD([theta], lr=lr)
            for _ in range(steps):
                sgd.zero_grad()
                loss_of(theta).backward()
                sgd.step()
            opt = ZOSGD([theta], lr=0.0, seed=seed)  # only for the diagnostic's perturber
        flat = theta.detach()
        est = hessian_trace(lambda theta=theta: loss_of(theta), opt, probes=64, eps=1e-3)
        out[method] = {
            "loss": float(loss_of(flat)),
            "trace_exact": float(torch.diagonal(hessian(loss_of)(flat)).sum()),
            "trace_hutchinson": est.value,
            "trace_stderr": est.stderr,
            "balance": float(flat[:dim].norm() / flat[dim:].norm()),
        }
    return out


def digits(seed: int, zo_steps: int, zo_lr: float, fo_lr: float) -> dict:
    splits = load_digits_splits(8, 1, 0.2, 0)
    x = splits.train.images.flatten(1).double()
    y = splits.train.labels
    torch.manual_seed(seed)
    start = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    out: dict = {"seed": seed}
    nets = {}
    for method in ("zo_sgd", "fo_sgd"):
        net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
        net.load_state_dict(start.state_dict())
        nets[method] = net

    def loss_fn(net: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(net(x), y)

    zo_net = nets["zo_sgd"]
    zo = ZOSGD(zo_net.parameters(), lr=zo_lr, eps=1e-3, seed=seed).attach(zo_net)
    for _ in range(zo_steps):
        zo.step(lambda: loss_fn(zo_net))
    with torch.no_grad():
        target = float(loss_fn(zo_net))
    fo_net = nets["fo_sgd"]
    sgd = torch.optim.SGD(fo_net.parameters(), lr=fo_lr)
    fo_steps = 0
    while fo_steps < 100_000:
        sgd.zero_grad()
        loss = loss_fn(fo_net)
        if float(loss.detach()) <= target:
            break
        loss.backward()
        sgd.step()
        fo_steps += 1
    for method, net, steps in (("zo_sgd", zo_net, zo_steps), ("fo_sgd", fo_net, fo_steps)):
        opt = zo if method == "zo_sgd" else ZOSGD(net.parameters(), lr=0.0, seed=seed).attach(net)
        est = hessian_trace(lambda net=net: loss_fn(net), opt, probes=64, eps=1e-3, seed=1000 + seed, step=0)
        with torch.no_grad():
            out[method] = {"steps": steps, "loss": float(loss_fn(net)), "trace": est.value, "trace_stderr": est.stderr}
    return out


def _ms(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--valley-steps", type=int, default=4000)
    parser.add_argument("--valley-lr", type=float, default=0.01)
    parser.add_argument("--valley-eps", type=float, default=0.1)
    parser.add_argument("--digits-steps", type=int, default=3000)
    parser.add_argument("--digits-zo-lr", type=float, default=3e-3)
    parser.add_argument("--digits-fo-lr", type=float, default=0.05)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "flatness.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    v = [valley(s, args.valley_steps, args.valley_lr, args.valley_eps) for s in args.seeds]
    d = [digits(s, args.digits_steps, args.digits_zo_lr, args.digits_fo_lr) for s in args.seeds]
    print(f"\nvalley (uᵀv − 1)², d = 2·8, {args.valley_steps} steps, lr {args.valley_lr}, ZO ε {args.valley_eps}, "
          f"seeds {args.seeds}; start trace {_ms([r['start_trace'] for r in v])}; min over minima = 4\n")  # fmt: skip
    print("| method | final loss | tr(H) exact | tr(H) Hutchinson (64 probes) | \\|u\\|/\\|v\\| |\n|---|---|---|---|---|")
    for m in ("zo_sgd", "fo_sgd"):
        print(f"| {m} | {_ms([r[m]['loss'] for r in v])} | {_ms([r[m]['trace_exact'] for r in v])} | "
              f"{_ms([r[m]['trace_hutchinson'] for r in v])} | {_ms([r[m]['balance'] for r in v])} |")  # fmt: skip
    print(f"\ndigits MLP, ZO-SGD {args.digits_steps} steps (lr {args.digits_zo_lr}); FO SGD (lr {args.digits_fo_lr}) "
          f"until its train loss <= ZO's; seeds {args.seeds}\n")  # fmt: skip
    print("| method | steps | train loss | tr(H) (64 probes) |\n|---|---|---|---|")
    for m in ("zo_sgd", "fo_sgd"):
        print(f"| {m} | {_ms([r[m]['steps'] for r in d])} | {_ms([r[m]['loss'] for r in d])} | "
              f"{_ms([r[m]['trace'] for r in d])} |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "valley": v, "digits": d}, indent=1))


if __name__ == "__main__":
    main()
