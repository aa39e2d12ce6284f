"""Which forward-only parametrisation can unlearn the facts? A GPU probe with learning curves (issue 23).

Learns the facts of ``benchmarks/llm_unlearn.py``'s configuration into its Llama (first-order, on the
GPU, ``--learn-steps``), then unlearns them with NPO + α·retain NLL through several parametrisations,
each first-order (AdamW, the capacity reference) and zeroth-order (ZO-SGD, forward passes only):

* ``full``: every weight;
* ``ia3``: peft's IA3 scales (input of ``down_proj``, output of ``k_proj``/``v_proj``), 3 840 numbers;
* ``gates``: one multiplicative gate per MLP neuron on the ``--top-k`` neurons per layer whose
  activation is most specific to the forget prompts (forward passes only: mean |activation| on forget
  minus retain prompts, over the retain spread);
* ``columns``: the ``down_proj`` columns (output weights) of the same neurons.

A ZO rate is picked per parametrisation by a short sweep on the training objective, then the long run
is scored (forget/retain EM, forget quality) at ``--checkpoints`` points. Prints one JSON line per
scored point and writes them all to ``--out``.

Usage (GPU)::

    python benchmarks/llm_unlearn_probe.py --out $OUT/probe.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_unlearn as bench  # noqa: E402

from lightning_zobi.lightning.datamodules.facts import QADataset, load_tokenizer  # noqa: E402
from lightning_zobi.unlearn.llm import decoder_layers, mean_nll, npo_loss, sequence_logprobs  # noqa: E402
from lightning_zobi.unlearn.metrics import evaluate_model  # noqa: E402
from lightning_zobi.zo.backends import build_optimizer  # noqa: E402


def batches(pairs: list, tok: Any, cfg: bench.Config, size: int, seed: int, device: str) -> Iterator[dict]:
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        QADataset(pairs, tok, cfg.max_length), batch_size=size, shuffle=True, generator=gen, drop_last=True
    )
    while True:
        for b in loader:
            yield {k: v.to(device) for k, v in b.items()}


def mlp_activations(model: nn.Module, loader: Iterator[dict], n_batches: int) -> list[Tensor]:
    """Per layer, the mean |input of down_proj| per neuron over the batches' non-pad tokens, ``(B·n, I)`` rows."""
    store: list[list[Tensor]] = [[] for _ in decoder_layers(model)]
    handles = []
    for i, layer in enumerate(decoder_layers(model)):

        def hook(mod: nn.Module, args: tuple, i: int = i) -> None:
            store[i].append(args[0].detach().abs())

        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for _ in range(n_batches):
                b = next(loader)
                store_len = [len(s) for s in store]
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                mask = b["attention_mask"].bool()
                for s, n0 in zip(store, store_len, strict=True):
                    s[n0] = s[n0][mask].mean(0, keepdim=True)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in store]


def forget_specific_neurons(model: nn.Module, forget: Iterator, retain: Iterator, k: int) -> list[Tensor]:
    """Top-``k`` neurons per layer by (mean|a| on forget − mean|a| on retain) / retain spread."""
    fa, ra = mlp_activations(model, forget, 8), mlp_activations(model, retain, 8)
    out = []
    for f, r in zip(fa, ra, strict=True):
        score = (f.mean(0) - r.mean(0)) / (r.std(0) + 1e-6)
        out.append(score.topk(k).indices.sort().values)
    return out


class NeuronGates(nn.Module):
    """A gate per selected neuron, multiplying the input of ``down_proj`` (registered as its pre-hook)."""

    def __init__(self, proj: nn.Linear, neurons: Tensor) -> None:
        super().__init__()
        self.register_buffer("neurons", neurons)
        self.gate = nn.Parameter(torch.ones(len(neurons), device=proj.weight.device))
        self.handle = proj.register_forward_pre_hook(self.scale)

    def scale(self, mod: nn.Module, args: tuple) -> tuple:
        x = args[0].clone()
        x[..., self.neurons] = x[..., self.neurons] * self.gate.to(x.dtype)
        return (x, *args[1:])


class ColumnMask:
    """Directions restricted to the selected neurons' ``down_proj`` columns (Sparse directions, fixed mask)."""

    @staticmethod
    def directions(masks: list[Tensor]) -> Any:
        from lightning_zobi.zo.directions import Directions, seeded_randn

        class Fixed(Directions):
            def sample(self, param: Tensor, index: int, key: Any) -> Tensor:
                return seeded_randn(param.shape, key.seed_for(index), param, self._pool).mul_(masks[index])

        return Fixed()


def setup(kind: str, learned: nn.Module, neurons: list[Tensor]) -> tuple[nn.Module, list, dict]:
    """``(model to run, params to train, extra optimizer kwargs)`` for a parametrisation."""
    model = copy.deepcopy(learned).train()
    model.requires_grad_(False)
    if kind == "full":
        model.requires_grad_(True)
        return model, list(model.parameters()), {}
    if kind in ("ia3", "ia3_mlp"):
        from lightning_zobi.lightning.modules.causal_lm import add_ia3

        model = add_ia3(model, ["down_proj"] if kind == "ia3_mlp" else None)
        return model, [p for p in model.parameters() if p.requires_grad], {}
    if kind == "gates":
        gates = [
            NeuronGates(layer.mlp.down_proj, idx)
            for layer, idx in zip(decoder_layers(model), neurons, strict=True)
        ]
        model._gates = nn.ModuleList(gates)  # type: ignore[assignment]
        params = [g.gate for g in gates]
        for p in params:
            p.requires_grad_(True)
        return model, params, {}
    if kind == "columns":
        projs = [layer.mlp.down_proj.weight for layer in decoder_layers(model)]
        masks = []
        for w, idx in zip(projs, neurons, strict=True):
            m = torch.zeros_like(w)
            m[:, idx] = 1.0
            masks.append(m)
            w.requires_grad_(True)
        return model, projs, {"directions": ColumnMask.directions(masks), "masks": masks}
    raise ValueError(kind)


def run(
    kind: str,
    order: str,
    lr: float,
    steps: int,
    learned: nn.Module,
    neurons: list[Tensor],
    data: Callable[[], dict[str, Iterator]],
    args: argparse.Namespace,
    score: Callable[[nn.Module], dict] | None,
    checkpoints: int,
) -> list[dict]:
    torch.manual_seed(0)
    model, params, extra = setup(kind, learned, neurons)
    masks = extra.pop("masks", None)
    ref = learned
    if order == "FO":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    elif args.rule == "retain_safe":
        opt = RetainSafeSign(params, lr, args.eps)
    else:
        opt = build_optimizer(
            args.rule,
            params,
            lr=lr,
            eps=args.eps,
            queries=args.queries,
            perturbation="inplace",
            fused=False,
            seed=0,
            **extra,
        )
    stream = data()
    points = sorted({round(steps * (i + 1) / checkpoints) for i in range(checkpoints)}) if score else []
    out, losses, start = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        fb, rb = next(stream["forget"]), next(stream["retain"])
        with torch.no_grad():
            ref_logp, _ = sequence_logprobs(ref, fb)

        both = joined(fb, rb)

        def closure(both: dict = both, ref_logp: Tensor = ref_logp) -> Tensor:
            return objective(model, both, len(ref_logp), ref_logp, args)

        if order == "FO":
            loss = closure()
            loss.backward()
            if masks is not None:
                for p, m in zip(params, masks, strict=True):
                    p.grad.mul_(m)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        elif isinstance(opt, RetainSafeSign):
            losses.append(opt.step(lambda both=both, ref=ref_logp: parts(model, both, len(ref), ref, args)))
        else:
            losses.append(float(opt.step(closure)))
        if not losses[-1] < 1e6:
            out.append({"kind": kind, "order": order, "lr": lr, "step": step, "diverged": True})
            break
        if time.perf_counter() - start > args.max_run_s and step not in points:
            points = [step]
        if step in points:
            model.eval()
            m = score(model)
            model.train()
            row = {
                "kind": kind,
                "order": order,
                "lr": lr,
                "step": step,
                "loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
                "wall_s": round(time.perf_counter() - start, 1),
                **{k: round(v, 4) for k, v in m.items() if k in KEYS},
            }
            print(json.dumps(row), flush=True)
            out.append(row)
        if points and step == points[-1]:
            break
    if not score:
        return [{"kind": kind, "order": order, "lr": lr, "loss": held_out_objective(model, args, ref)}]
    return out


def joined(forget: dict, retain: dict) -> dict:
    """Forget and retain rows in one batch (both padded to ``max_length``): one forward per loss."""
    return {k: torch.cat([forget[k], retain[k]]) for k in ("input_ids", "attention_mask", "labels")}


def objective(
    model: nn.Module, both: dict, n_forget: int, ref_logp: Tensor, args: argparse.Namespace
) -> Tensor:
    """NPO on the forget rows + α · mean NLL on the retain rows."""
    logp, n = sequence_logprobs(model, both)
    forget = npo_loss(logp[:n_forget], ref_logp, args.beta)
    return forget + args.alpha * mean_nll(logp[n_forget:], n[n_forget:])


def parts(model: nn.Module, both: dict, n_forget: int, ref_logp: Tensor, args: argparse.Namespace) -> tuple:
    logp, n = sequence_logprobs(model, both)
    forget = npo_loss(logp[:n_forget], ref_logp, args.beta)
    return float(forget), float(args.alpha * mean_nll(logp[n_forget:], n[n_forget:]))


class RetainSafeSign:
    """Sign-ZO on the forget term, taking a direction only where it does not raise the retain term.

    One pair of forwards per step gives both projected derivatives along z (the batch holds forget
    and retain rows): g_f of the forget term, g_r of the retain term. The step is −lr·sign(g_f)·z
    when that move lowers (or keeps) the retain term to first order (sign(g_f)·g_r ≥ 0), and
    −lr·sign(g_r)·z (repair) when the retain term is the larger slope, else no move.
    """

    def __init__(self, params: list, lr: float, eps: float) -> None:
        self.params, self.lr, self.eps, self.step_n = params, lr, eps, 0

    def _z(self) -> list[Tensor]:
        g = torch.Generator(device=self.params[0].device).manual_seed(1000 + self.step_n)
        return [torch.randn(p.shape, generator=g, device=p.device) for p in self.params]

    @torch.no_grad()
    def step(self, fn: Callable) -> float:
        z = self._z()
        for p, d in zip(self.params, z, strict=True):
            p.add_(d, alpha=self.eps)
        fp, rp = fn()
        for p, d in zip(self.params, z, strict=True):
            p.add_(d, alpha=-2 * self.eps)
        fm, rm = fn()
        gf, gr = (fp - fm) / (2 * self.eps), (rp - rm) / (2 * self.eps)
        coeff = 0.0
        if gf * gr >= 0:  # lowering F along -sign(gf) z also lowers R (or R is flat)
            coeff = -self.lr * math.copysign(1.0, gf)
        elif abs(gr) > abs(gf):
            coeff = -self.lr * math.copysign(1.0, gr)
        for p, d in zip(self.params, z, strict=True):
            p.add_(d, alpha=self.eps + coeff)
        self.step_n += 1
        return (fp + fm + rp + rm) / 2


def held_out_objective(model: nn.Module, args: argparse.Namespace, ref: nn.Module) -> float:
    """The training objective on the same fixed batches for every candidate rate (a fair comparison)."""
    total, fixed = 0.0, args.fixed_batches
    with torch.no_grad():
        for fb, rb in fixed:
            ref_logp, _ = sequence_logprobs(ref, fb)
            total += float(objective(model, joined(fb, rb), len(ref_logp), ref_logp, args))
    return total / len(fixed)


KEYS = ("forget/em", "retain/em", "forget_quality", "model_utility", "forget/truth_ratio", "holdout/em")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--learn-steps", type=int, default=3000)
    parser.add_argument("--kinds", nargs="+", default=["gates", "columns", "ia3", "full"])
    parser.add_argument("--orders", nargs="+", default=["FO", "ZO"])
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--zo-steps", type=int, default=3000)
    parser.add_argument("--fo-steps", type=int, default=300)
    parser.add_argument("--sweep-steps", type=int, default=200)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--rule", default="zo_sgd", help="ZO rule of lightning_zobi.zo.backends.OPTIMIZERS")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=5.0)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-run-s", type=float, default=60.0, help="stop and score a run after this wall")
    parser.add_argument("--fo-lrs", type=float, nargs="*", default=None, help="override the FO rates")
    parser.add_argument("--zo-lrs", type=float, nargs="*", default=None, help="run these ZO rates, no sweep")
    parser.add_argument("--cache", default=None, help="directory with learned.pt / retain_only.pt to reuse")
    parser.add_argument("--out", default="probe.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = bench.CONFIGS[args.config]
    cfg.learn_steps = args.learn_steps
    splits, tok = bench.splits_of(cfg), load_tokenizer("bytes")
    out_dir = Path(args.out).parent
    cache = Path(args.cache) if args.cache else out_dir
    t0 = time.perf_counter()
    for split, name in (("train", "learned.pt"), ("retain", "retain_only.pt")):
        if not (cache / name).exists():
            info = bench.learn(cfg, split, cache / name, threads=torch.get_num_threads(), device=device)
            print(json.dumps(info), flush=True)
    torch.use_deterministic_algorithms(False)
    learned = bench.load_model(cfg, cache / "learned.pt").to(device)
    retain_only = bench.load_model(cfg, cache / "retain_only.pt").to(device)
    _, reference = evaluate_model(retain_only, tok, splits, retain_limit=cfg.retain_eval)

    def score(model: nn.Module) -> dict:
        return evaluate_model(model, tok, splits, reference, retain_limit=cfg.retain_eval)[0]

    rows: list[dict] = []
    for label, m in (("learned", learned), ("retain_only", retain_only)):
        row = {"kind": label, **{k: round(v, 4) for k, v in score(m).items() if k in KEYS}}
        print(json.dumps(row), flush=True)
        rows.append(row)

    def data() -> dict[str, Iterator]:
        return {
            "forget": batches(splits.forget, tok, cfg, cfg.forget_batch, 0, device),
            "retain": batches(splits.retain, tok, cfg, cfg.retain_batch, 1, device),
        }

    probe = data()
    neurons = forget_specific_neurons(learned, probe["forget"], probe["retain"], args.top_k)
    held = {
        "forget": batches(splits.forget, tok, cfg, cfg.forget_batch, 7, device),
        "retain": batches(splits.retain, tok, cfg, cfg.retain_batch, 8, device),
    }
    args.fixed_batches = [(next(held["forget"]), next(held["retain"])) for _ in range(6)]
    fo_lrs = {
        "full": [1e-5, 3e-5],
        "ia3": [3e-3, 1e-2],
        "ia3_mlp": [1e-2],
        "gates": [1e-2, 3e-2],
        "columns": [1e-4, 3e-4],
    }
    zo_grid = {
        "full": [1e-6, 1e-5, 1e-4, 1e-3, 1e-2],
        "ia3": [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
        "ia3_mlp": [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
        "gates": [1e-3, 1e-2, 1e-1, 1.0, 10.0],
        "columns": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
    }
    for kind in args.kinds:
        if "FO" in args.orders:
            for lr in args.fo_lrs or fo_lrs[kind]:
                rows += run(
                    kind, "FO", lr, args.fo_steps, learned, neurons, data, args, score, args.checkpoints
                )
        if "ZO" in args.orders and args.zo_lrs:
            for lr in args.zo_lrs:
                rows += run(
                    kind, "ZO", lr, args.zo_steps, learned, neurons, data, args, score, args.checkpoints
                )
        elif "ZO" in args.orders:
            sweep = [
                run(kind, "ZO", lr, args.sweep_steps, learned, neurons, data, args, None, 0)[0]
                for lr in zo_grid[kind]
            ]
            print(json.dumps({"kind": kind, "sweep": sweep}), flush=True)
            ok = [s for s in sweep if s["loss"] == s["loss"] and s["loss"] < 1e6]
            best = min(ok, key=lambda s: s["loss"])["lr"]
            rows.append({"kind": kind, "sweep": sweep, "chosen_lr": best})
            rows += run(
                kind, "ZO", best, args.zo_steps, learned, neurons, data, args, score, args.checkpoints
            )
        saved = {k: v for k, v in vars(args).items() if k != "fixed_batches"}
        Path(args.out).write_text(json.dumps({"args": saved, "rows": rows}, indent=1))
    print(f"total {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
