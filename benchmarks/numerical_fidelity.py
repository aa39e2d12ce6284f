"""Numerical fidelity of a ZO step: weight drift at lr = 0, and bf16 fine-tunes against fp32 (same seed).

Two measurements (issue 16):

* **drift**: a Llama-architecture model with random weights takes ``--steps`` ZO steps with
  ``lr = 0`` on a fixed batch; reported is the relative weight drift ``‖θ_T − θ_0‖ / ‖θ_0‖`` (float64),
  the share of elements whose bits changed, and whether every parameter is bit-identical. Rows:
  ``ours``: ``build_optimizer("zo_sgd")`` at its defaults (exact perturbation; on CUDA the fused
  :class:`~lightning_zobi.zo.fused.FusedZOSGD`, on CPU the torch-path ``ZOSGD``); ``ours_inplace``:
  the same with ``perturbation="inplace"``; ``mezo``: a MeZO-style loop (MeZO's trainer: ``torch.normal``
  per parameter, ``θ ± εz`` written in place, ``benchmarks/zo_step.py``'s ``MeZOStyle``). In bf16 and fp32.
* **curves**: a linear-regression fine-tune (``y = x W*ᵀ``, a 64×64 ``W`` started near ``W*``, MSE,
  ZO-SGD, ``--curve-steps`` steps, for each ``--lr``) from the same seed with ``W`` stored in fp32
  (the reference) and in bf16 (the forward reads ``W`` upcast to fp32, so only the storage
  precision differs: the rounding of θ ± εz and of the update) as
  ``exact+SR`` (the default: exact perturbation, stochastically rounded updates), ``exact, RN`` (round
  to nearest), and ``inplace, RN`` (MeZO's arithmetic). The loss is evaluated in float64 on the
  current weights every ``--every`` steps.

Run (CPU, ~1-2 min): ``python benchmarks/numerical_fidelity.py``
Run (GPU, the 1.1B shape): ``python benchmarks/numerical_fidelity.py --shape 1.1b --steps 1000``
Writes ``benchmarks/results/numerical_fidelity_<device>.json`` (or ``--out``); prints the tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lightning_zobi.zo.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LLAMA_1_1B, device_name, llama_on, sync  # noqa: E402
from zo_step import MeZOStyle  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "small": dict(
        config=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
        ),
        batch=(1, 16),
    ),  # fmt: skip
    "1.1b": dict(config=LLAMA_1_1B, batch=(4, 128)),
}
EPS = 1e-3


def _model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape]["config"], max_position_embeddings=512, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return llama_on(cfg, device, dtype).eval()


def drift(shape: str, device: torch.device, dtype: torch.dtype, method: str, steps: int) -> dict[str, Any]:
    """Relative drift of every parameter after ``steps`` lr=0 ZO steps of ``method``."""
    model = _model(shape, device, dtype)
    b, s = SHAPES[shape]["batch"]
    vocab = SHAPES[shape]["config"]["vocab_size"]
    ids = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(1)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]

    def closure() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss

    if method == "mezo":
        stepper: Any = MeZOStyle(model, 0.0, EPS)
    else:
        mode = "inplace" if method == "ours_inplace" else "exact"
        stepper = build_optimizer("zo_sgd", params, lr=0.0, eps=EPS, seed=0, perturbation=mode)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        stepper.step(closure)
    if hasattr(stepper, "unperturb"):
        stepper.unperturb()
    sync(device)
    seconds = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]  # MeZO-style rebinds p.data, not p
    num = den = 0.0
    changed = total = 0
    for p, p0 in zip(params, before, strict=True):
        d = p.detach().double() - p0.double()
        num += float((d * d).sum())
        den += float((p0.double() ** 2).sum())
        changed += int((p.detach().view(torch.int16 if p.element_size() == 2 else torch.int32)
                        != p0.view(torch.int16 if p0.element_size() == 2 else torch.int32)).sum())  # fmt: skip
        total += p.numel()
    return {
        "method": method,
        "optimizer": type(stepper).__name__,
        "dtype": str(dtype).replace("torch.", ""),
        "steps": steps,
        "rel_drift": math.sqrt(num / den),
        "changed_frac": changed / total,
        "bit_identical": changed == 0,
        "seconds": round(seconds, 2),
    }


CURVES = {  # name: (dtype, perturbation, stochastic rounding)
    "fp32": (torch.float32, "exact", True),
    "bf16 exact+SR": (torch.bfloat16, "exact", True),
    "bf16 exact, RN": (torch.bfloat16, "exact", False),
    "bf16 inplace, RN": (torch.bfloat16, "inplace", False),
}


def curve(name: str, device: torch.device, steps: int, every: int, lr: float) -> dict[str, Any]:
    """Loss (float64) of a 64×64 linear-regression ZO-SGD fine-tune every ``every`` steps."""
    dtype, mode, sr = CURVES[name]
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(64, 64, generator=gen, dtype=torch.float64) * 0.05
    start = target + torch.randn(64, 64, generator=gen, dtype=torch.float64) * 0.01
    x = torch.randn(256, 64, generator=gen, dtype=torch.float64)
    y = x @ target.T
    w = torch.nn.Parameter(start.to(device=device, dtype=dtype))
    xd, yd = x.to(device=device, dtype=torch.float32), y.to(device=device, dtype=torch.float32)
    lin = torch.nn.Module()
    lin.weight = w  # a module owns w, so exact perturbation materialises it in lin's forward
    lin.forward = lambda inp: inp @ lin.weight.float().T  # type: ignore[method-assign]
    opt = build_optimizer("zo_sgd", [w], lr=lr, eps=EPS, seed=0, perturbation=mode, stochastic_rounding=sr)
    xw = x.to(device)

    def f64_loss() -> float:
        return float(((xw @ w.detach().double().T - y.to(device)) ** 2).mean())

    losses = [f64_loss()]
    for t in range(1, steps + 1):
        opt.step(lambda: ((lin(xd) - yd) ** 2).mean())
        if t % every == 0:
            losses.append(f64_loss())
    return {"name": name, "optimizer": type(opt).__name__, "lr": lr, "every": every, "losses": losses}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=1000, help="lr=0 steps of the drift runs")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--methods", default="ours,mezo", help="from ours, ours_inplace, mezo")
    parser.add_argument("--curve-steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument(
        "--lr", default="3e-3,3e-4", help="the curves' ZO-SGD learning rates (comma-separated)"
    )
    parser.add_argument("--no-curves", action="store_true")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results: dict[str, Any] = {
        "meta": {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device),
            "torch": torch.__version__,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "shape": args.shape,
            "batch": SHAPES[args.shape]["batch"],
            "eps": EPS,
        },
        "drift": [],
        "curves": [],
    }
    out = args.out or Path(__file__).parent / "results" / f"numerical_fidelity_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for dtype_name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            r = drift(args.shape, device, getattr(torch, dtype_name), method, args.steps)
            print(f"  drift {r}", flush=True)
            results["drift"].append(r)
            out.write_text(json.dumps(results, indent=1))  # after every row: a run cut short keeps its rows
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not args.no_curves:
        for lr in [float(v) for v in args.lr.split(",") if v.strip()]:
            for name in CURVES:
                r = curve(name, device, args.curve_steps, args.every, lr)
                print(f"  curve lr={lr:g} {name}: {r['losses'][0]:.3e} -> {r['losses'][-1]:.3e}", flush=True)
                results["curves"].append(r)
                out.write_text(json.dumps(results, indent=1))
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nwrote {out}")
    return results


def table(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [f"\ndrift after lr=0 steps ({meta['shape']}, {meta['device']}):",
             "| method | optimizer | dtype | steps | rel. drift | elements changed | bit-identical | s |",
             "|---|---|---|---:|---:|---:|---|---:|"]  # fmt: skip
    for r in results["drift"]:
        lines.append(
            f"| {r['method']} | {r['optimizer']} | {r['dtype']} | {r['steps']} | {r['rel_drift']:.3e} | "
            f"{100 * r['changed_frac']:.2f} % | {r['bit_identical']} | {r['seconds']} |"
        )
    if results["curves"]:
        lines += ["\nlinear-regression fine-tune (loss, float64):", "| lr | run | start | 25 % | 50 % | end |",
                  "|---|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in results["curves"]:
            ls = r["losses"]
            lines.append(
                f"| {r['lr']:g} | {r['name']} | {ls[0]:.3e} | {ls[len(ls) // 4]:.3e} | {ls[len(ls) // 2]:.3e} | {ls[-1]:.3e} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
