"""Time one ZO step against two forwards: torch path, fused Triton path, a MeZO-style baseline, FO AdamW.

For a Llama-architecture model with random bf16 weights (built from a ``LlamaConfig``, no hub), in
one process and on one device, each variant is warmed up and then timed per step (device
synchronised around every step, median reported), with the peak allocated memory of each:

* ``forward``: one forward with the loss, ``torch.no_grad`` (what a ZO step does twice);
* ``pass``: one read+write pass over all parameters (``torch._foreach_mul_(params, 1.0)``), the unit
  of the floor ``2·forward + 2·pass``;
* ``kernel1`` / ``kernel2``: one fused-kernel pass adding one / two Philox directions (``_r7``:
  7 Philox rounds; ``_exact``: libdevice's exact log/sqrt/sin/cos instead of the approximations;
  ``_w8`` / ``_w2``: 8 / 2 warps per program instead of 4; ``_narrow``: Philox products by
  ``umulhi`` + a low multiply instead of one 32×32→64 multiply; ``_sr``: with in-kernel stochastic
  rounding of the result, as the update pass does for bf16/fp16);
* ``zo_torch``: :class:`~lightning_zobi.zo.optim.ZOSGD` on the torch path, exact perturbation (the
  default: ``θ ± εz`` materialised per module, ``torch.randn``); ``zo_torch_inplace``: in place (3 passes);
* ``zo_fused_exact``: :class:`~lightning_zobi.zo.fused.FusedZOSGD` at its default, exact
  perturbation: two fused materialisations per step (:class:`~lightning_zobi.zo.fused.FusedJustInTime`,
  a few tensors per launch) and one update pass with stochastic rounding; θ never written by a
  perturbation (bit-identical at lr = 0);
* ``zo_fused3``: ``FusedZOSGD(perturbation="inplace")``, no look-ahead (3 fused passes);
* ``zo_fused``: ``FusedZOSGD(perturbation="inplace")`` with the model guarded, so the next ``+εz``
  is folded (2 passes): the in-place figure of earlier runs;
* ``zo_fused3_r7`` / ``zo_fused_r7``: the same two with 7 Philox rounds instead of 10;
* ``mezo``: a faithful MeZO-style step written here (Malladi et al., arXiv 2305.17333, as their
  trainer does it): ``torch.manual_seed(s)`` then per parameter
  ``z = torch.normal(0, 1, size, dtype)`` and ``param.data = param.data + scale * z * eps``, for
  +1, -2, +1, then the update regenerates ``z`` again: 4 passes;
* ``lozo`` / ``lozo_fused``: the LOZO rule (rank 2) on its torch path (exact) / on the fused Triton
  path in place (:class:`~lightning_zobi.zo.fused.lozo.FusedLOZO`: ``U Vᵀ`` drawn inside a tiled
  kernel; the model guarded, so the next ``U Vᵀ`` is folded: 2 passes); ``lozo_fused_exact``: fused,
  exact perturbation (the default);
* ``adamw``: first-order training step (forward + backward + fused ``torch.optim.AdamW``);
* ``forward_end``: the forward again, last, to see drift over the run.

Ratios are to ``2 × forward``; memory ratios to the forward's peak (inference).

Run (GPU):  python benchmarks/zo_step.py                      # shapes 1.1b (16×256) and 6.7b (8×256)
Run (CPU):  python benchmarks/zo_step.py --tiny               # a tiny Llama, smoke test of every path
Writes benchmarks/results/zo_step.json (``--tiny``: zo_step_tiny.json) or ``--out``; prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_zobi.zo.optim import ZOSGD, build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers next to this script
from _common import LLAMA_1_1B, LLAMA_6_7B, LLAMA_TINY, device_name, llama_on, sync  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    # TinyLlama-1.1B's architecture
    "1.1b": dict(
        config=LLAMA_1_1B,
        batch=(16, 256),
    ),
    # Llama-2-7B's architecture (6.7 B parameters)
    "6.7b": dict(
        config=LLAMA_6_7B,
        batch=(8, 256),
    ),
    "tiny": dict(
        config=LLAMA_TINY,
        batch=(2, 16),
    ),
}
KERNELS = {  # name: (directions per pass, Philox rounds, fast math, warps per program, wide multiply)
    "kernel1": (1, 10, True, 4, True),
    "kernel2": (2, 10, True, 4, True),
    "kernel1_r7": (1, 7, True, 4, True),
    "kernel2_r7": (2, 7, True, 4, True),
    "kernel1_exact": (1, 10, False, 4, True),
    "kernel1_w8": (1, 10, True, 8, True),
    "kernel2_w8": (2, 10, True, 8, True),
    "kernel1_w2": (1, 10, True, 2, True),
    "kernel2_w2": (2, 10, True, 2, True),
    "kernel2_narrow": (2, 10, True, 4, False),
    "kernel1_sr": (1, 10, True, 4, True),
    "kernel2_sr": (2, 10, True, 4, True),
}
FUSED_STEPS = {  # name: (lookahead, Philox rounds, perturbation)
    "zo_fused_exact": (None, 10, "exact"),
    "zo_fused3": (False, 10, "inplace"),
    "zo_fused": (None, 10, "inplace"),
    "zo_fused3_r7": (False, 7, "inplace"),
    "zo_fused_r7": (None, 7, "inplace"),
}
ALL_VARIANTS = [
    "forward",
    "pass",
    *KERNELS,
    "zo_torch",
    "zo_torch_inplace",
    *FUSED_STEPS,
    "mezo",
    "lozo",
    "lozo_fused",
    "lozo_fused_exact",
    "adamw",
    "forward_end",
]
"""``forward_end`` repeats the forward last, to show clock drift over the run (ratios use ``forward``)."""
FUSED_VARIANTS = set(KERNELS) | set(FUSED_STEPS) | {"lozo_fused", "lozo_fused_exact"}
LR, EPS = 1e-7, 1e-3


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of the named shape, directly on ``device``."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape]["config"], max_position_embeddings=2048, use_cache=False)
    cfg._attn_implementation = "sdpa"
    return llama_on(cfg, device, dtype).eval()


class MeZOStyle:
    """MeZO's step as its trainer writes it: 4 passes, ``torch.normal`` per parameter, out-of-place updates."""

    def __init__(self, model: torch.nn.Module, lr: float, eps: float, weight_decay: float = 0.0) -> None:
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.lr, self.eps, self.wd = lr, eps, weight_decay
        self.rng = torch.Generator().manual_seed(0)

    def _perturb(self, seed: int, scaling: float) -> None:
        torch.manual_seed(seed)
        for _, param in self.named:
            z = torch.normal(
                mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype
            )
            param.data = param.data + scaling * z * self.eps

    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        seed = int(torch.randint(0, 1_000_000_000, (1,), generator=self.rng))
        self._perturb(seed, 1.0)
        loss1 = closure()
        self._perturb(seed, -2.0)
        loss2 = closure()
        projected_grad = float((loss1 - loss2) / (2 * self.eps))
        self._perturb(seed, 1.0)
        torch.manual_seed(seed)
        for name, param in self.named:
            z = torch.normal(
                mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype
            )
            if "bias" not in name and "norm" not in name:
                param.data = param.data - self.lr * (projected_grad * z + self.wd * param.data)
            else:
                param.data = param.data - self.lr * (projected_grad * z)
        return float(loss1)


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Median wall time of ``fn`` per call (synchronised) and the peak allocated memory over the calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "ms": statistics.median(times),
        "ms_min": min(times),
        "ms_all": [round(t, 3) for t in times],
        "peak_gib": peak,
    }


class _Bench:
    """One model, its batch and the step closure; :meth:`run` times one variant on it."""

    def __init__(self, shape: str, device: torch.device) -> None:
        self.device = device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        t0 = time.perf_counter()
        self.model = build_model(shape, device, self.dtype)
        self.build_s = time.perf_counter() - t0
        b, s = SHAPES[shape]["batch"]
        gen = torch.Generator().manual_seed(1)
        self.batch = (b, s)
        self.ids = torch.randint(0, SHAPES[shape]["config"]["vocab_size"], (b, s), generator=gen).to(device)

    def params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def loss(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, labels=self.ids).loss

    def closure(self) -> torch.Tensor:
        with torch.no_grad():
            return self.loss()

    def run(self, name: str, warmup: int, steps: int) -> dict[str, Any]:
        from lightning_zobi.zo.directions import DirectionKey
        from lightning_zobi.zo.fused import FusedGaussianDirections, FusedStep, FusedZOSGD

        params, dev = self.params(), self.device
        if name in ("forward", "forward_end"):
            return _time(lambda: float(self.closure()), dev, warmup, steps)
        if name == "pass":
            with torch.no_grad():
                return _time(lambda: torch._foreach_mul_(params, 1.0), dev, warmup, steps)
        if name in KERNELS:
            from lightning_zobi.zo.fused import dense_kernel

            n_dirs, rounds, fast, warps, wide = KERNELS[name]
            dirs = FusedGaussianDirections(rounds=rounds, fast_math=fast)
            terms = [(DirectionKey(0, k, 0), 0.0) for k in range(n_dirs)]
            defaults = dense_kernel.NUM_WARPS, dense_kernel.WIDE_MUL
            dense_kernel.NUM_WARPS, dense_kernel.WIDE_MUL = warps, wide
            import numpy as np

            sr = np.arange(len(params), dtype=np.uint64) if name.endswith("_sr") else None
            try:
                return _time(lambda: dirs.apply_(params, terms, sr_seeds=sr), dev, warmup, steps)
            finally:
                dense_kernel.NUM_WARPS, dense_kernel.WIDE_MUL = defaults
        if name == "mezo":
            mezo = MeZOStyle(self.model, LR, EPS)
            return _time(lambda: mezo.step(self.closure), dev, warmup, steps)
        if name == "adamw":
            self.model.train()
            opt = torch.optim.AdamW(params, lr=1e-6, fused=dev.type == "cuda")

            def fo_step() -> None:
                self.loss().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                return _time(fo_step, dev, warmup, steps)
            finally:
                opt.zero_grad(set_to_none=True)
                self.model.eval()
        if name in ("zo_torch", "zo_torch_inplace"):
            zo = ZOSGD(
                params, lr=LR, eps=EPS, perturbation="inplace" if name.endswith("inplace") else "exact"
            )
        elif name in ("lozo", "lozo_fused", "lozo_fused_exact"):
            mode = "inplace" if name == "lozo_fused" else "exact"
            zo = build_optimizer(
                "lozo", params, fused=name != "lozo", lr=LR, eps=EPS, rank=2, perturbation=mode
            )
            if name != "lozo":
                zo.guard(
                    self.model
                )  # as ZeroOrder does: in place, the next U Vᵀ is folded into the update pass
        elif name in FUSED_STEPS:
            lookahead, rounds, mode = FUSED_STEPS[name]
            zo = FusedZOSGD(params, lr=LR, eps=EPS, lookahead=lookahead, rounds=rounds, perturbation=mode)
            if lookahead is None:
                zo.guard(self.model)  # folds the next +εz; outside forwards/state_dict unperturb first
        else:
            raise ValueError(f"unknown variant {name!r}; choose from {ALL_VARIANTS}")
        try:
            return _time(lambda: zo.step(self.closure), dev, warmup, steps)
        finally:
            if isinstance(zo, FusedStep):
                zo.unguard()


def run_shape(
    shape: str, variants: list[str], device: torch.device, warmup: int, steps: int, repeat: int = 1
) -> dict[str, Any]:
    """Time every variant on one model shape; ratios to 2 × forward and to the forward's peak memory.

    With ``repeat > 1`` the whole variant sequence runs that many times (interleaved, so slow
    drifts of the host or the clocks hit every variant alike) and each variant reports the median
    of its per-round medians (``ms_rounds``).
    """
    from lightning_zobi.zo.fused import HAS_TRITON

    bench = _Bench(shape, device)
    out: dict[str, Any] = {
        "params": sum(p.numel() for p in bench.params()),
        "tensors": len(bench.params()),
        "batch": list(bench.batch),
        "dtype": str(bench.dtype),
        "build_s": round(bench.build_s, 1),
        "repeat": repeat,
        "variants": {},
    }
    res = out["variants"]
    for _ in range(repeat):
        for name in variants:
            if name in FUSED_VARIANTS and not HAS_TRITON:
                res[name] = {"skipped": "no triton"}
                continue
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                r = bench.run(name, warmup, steps)
            except torch.OutOfMemoryError as err:
                r = {"oom": str(err).splitlines()[0]}
            except Exception as err:  # keep timing the other variants; the error is recorded
                r = {"error": repr(err)[:300]}
            _merge_round(res, name, r)
            print(f"  {shape} {name}: {r.get('ms', r)}", flush=True)
    fwd = res.get("forward", {}).get("ms")
    fwd_peak = res.get("forward", {}).get("peak_gib")
    for r in res.values():
        if "ms" in r and fwd:
            r["ratio_2fwd"] = r["ms"] / (2 * fwd)
            if fwd_peak and fwd_peak == fwd_peak:  # not NaN
                r["mem_ratio"] = r["peak_gib"] / fwd_peak
    if fwd and "ms" in res.get("pass", {}):
        out["floor_ratio"] = (2 * fwd + 2 * res["pass"]["ms"]) / (2 * fwd)
    del bench
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _merge_round(res: dict[str, Any], name: str, r: dict[str, Any]) -> None:
    """Fold one round's timing of ``name`` into ``res``: median of round medians, all samples, max peak."""
    prev = res.get(name)
    if prev is None or "ms" not in prev or "ms" not in r:
        res[name] = dict(r, ms_rounds=[r["ms"]]) if "ms" in r else r
        return
    prev["ms_rounds"].append(r["ms"])
    prev["ms"] = statistics.median(prev["ms_rounds"])
    prev["ms_min"] = min(prev["ms_min"], r["ms_min"])
    prev["ms_all"] += r["ms_all"]
    prev["peak_gib"] = max(prev["peak_gib"], r["peak_gib"])


def table(results: dict[str, Any]) -> str:
    lines = []
    for shape, out in results["shapes"].items():
        floor = out.get("floor_ratio")
        lines.append(
            f"\n{shape}: {out['params'] / 1e9:.2f} B params, batch {out['batch'][0]}×{out['batch'][1]}, {out['dtype']}"
            + (f"; floor (2 fwd + 2 passes) = {floor:.3f}× 2 fwd" if floor else "")
        )
        lines.append(f"| {'variant':<16} | {'ms':>9} | {'× 2 fwd':>8} | {'peak GiB':>9} | {'× infer':>8} |")
        lines.append(f"|{'-' * 18}|{'-' * 11}:|{'-' * 9}:|{'-' * 10}:|{'-' * 9}:|")
        for name, r in out["variants"].items():
            if "ms" not in r:
                lines.append(f"| {name:<16} | {next(iter(r.values()))[:60]} |")
                continue
            lines.append(
                f"| {name:<16} | {r['ms']:9.2f} | {r.get('ratio_2fwd', float('nan')):8.3f} | "
                f"{r['peak_gib']:9.2f} | {r.get('mem_ratio', float('nan')):8.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on CPU (smoke test of every path)")
    parser.add_argument("--shapes", default="1.1b,6.7b", help="comma-separated shapes: 1.1b, 6.7b, tiny")
    parser.add_argument(
        "--variants", default=",".join(ALL_VARIANTS), help=f"comma-separated, from {ALL_VARIANTS}"
    )
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=1, help="run the variant sequence this many times")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    shapes = ["tiny"] if args.tiny else [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"--shapes has {s!r}; choose from {sorted(SHAPES)}.")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in ALL_VARIANTS:
            raise ValueError(f"--variants has {v!r}; choose from {ALL_VARIANTS}.")
    if "forward" in variants:  # the reference of every ratio goes first
        variants.remove("forward")
        variants.insert(0, "forward")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    results: dict[str, Any] = {
        "meta": {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device),
            "torch": torch.__version__,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "warmup": args.warmup,
            "steps": args.steps,
            "repeat": args.repeat,
            "lr": LR,
            "eps": EPS,
        },
        "shapes": {},
    }
    try:
        import transformers
        import triton

        results["meta"].update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    for shape in shapes:
        print(f"shape {shape} on {device}", flush=True)
        results["shapes"][shape] = run_shape(shape, variants, device, args.warmup, args.steps, args.repeat)
    if "triton" in results["meta"]:
        from lightning_zobi.zo.fused import dense_kernel

        results["meta"]["fused_alignment_hints"] = dense_kernel._ALIGNED_OK
        results["meta"]["fused_fast_math"] = dense_kernel._FAST_OK
    out = args.out or Path(__file__).parent / "results" / (
        "zo_step_tiny.json" if args.tiny else "zo_step.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
