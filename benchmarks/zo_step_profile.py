"""Where a ZO step's time goes beyond its kernels: GPU idle gaps and the fused kernel's instruction mix.

Runs a few steps of a ``benchmarks/zo_step.py`` variant under ``torch.profiler`` and reads the trace:
per step, the wall time, the time the GPU was busy (union of kernel intervals) and the idle gaps,
grouped by the kernels on either side of each gap (so "before the first pass" or "between a
forward's kernels" show up as such). With ``--sass`` it also compiles the fused kernel for one and
two directions (narrow/wide Philox multiply) and counts its SASS instructions by opcode.

Run (GPU):  python benchmarks/zo_step_profile.py --shape 6.7b --variants forward,zo_fused --sass
Writes benchmarks/results/zo_step_profile.json (or ``--out``) and the Chrome traces next to it.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_name, sync  # noqa: E402
from zo_step import FUSED_STEPS, SHAPES, _Bench  # noqa: E402


def _short(name: str) -> str:
    """A kernel name cut to what tells kernels apart (templates and arguments dropped)."""
    name = re.sub(r"<.*", "", name)
    name = re.sub(r"\(.*", "", name)
    return name[:60]


def gaps_of(trace: dict[str, Any], min_gap_us: float) -> dict[str, Any]:
    """GPU busy time, idle time and the idle gaps (grouped by neighbouring kernels) of a Chrome trace."""
    kernels = sorted(
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in trace["traceEvents"]
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e
    )
    if not kernels:
        return {"error": "no GPU events in the trace"}
    busy, idle, end = 0.0, 0.0, kernels[0][0]
    groups: dict[str, list[float]] = collections.defaultdict(list)
    prev_name = "(start)"
    for ts, te, name in kernels:
        if ts > end:
            gap = ts - end
            idle += gap
            if gap >= min_gap_us:
                groups[f"{_short(prev_name)} -> {_short(name)}"].append(gap)
            busy += te - ts
        else:
            busy += max(0.0, te - end)
        if te > end:
            end, prev_name = te, name
    span = end - kernels[0][0]
    by_kernel: dict[str, float] = collections.defaultdict(float)
    for ts, te, name in kernels:
        by_kernel[_short(name)] += te - ts
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {
        "span_us": span,
        "busy_us": busy,
        "idle_us": idle,
        "gaps": sorted(
            (
                {"between": k, "count": len(v), "total_us": sum(v), "max_us": max(v)}
                for k, v in groups.items()
            ),
            key=lambda g: -g["total_us"],
        )[:15],
        "kernel_time_us": dict(top),
    }


def profile_variant(bench: _Bench, name: str, steps: int, out_dir: Path, min_gap_us: float) -> dict[str, Any]:
    """Warm a variant up, then profile ``steps`` calls of it; the trace is saved and summarised."""
    from torch.profiler import ProfilerActivity, profile

    from lightning_zobi.zo.fused import FusedZOSGD

    if name == "forward":

        def fn() -> Any:
            return float(bench.closure())

        zo = None
    elif name in FUSED_STEPS:
        lookahead, rounds, mode = FUSED_STEPS[name]
        zo = FusedZOSGD(
            bench.params(), lr=1e-7, eps=1e-3, lookahead=lookahead, rounds=rounds, perturbation=mode
        )
        if lookahead is None:
            zo.guard(bench.model)

        def fn() -> Any:
            return zo.step(bench.closure)

    else:
        raise ValueError(f"--variants takes forward or one of {sorted(FUSED_STEPS)}, not {name!r}")
    try:
        for _ in range(3):
            fn()
        sync(bench.device)
        walls = []
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                sync(bench.device)
                t0 = time.perf_counter()
                fn()
                sync(bench.device)
                walls.append((time.perf_counter() - t0) * 1e3)
        path = out_dir / f"trace_{name}.json"
        prof.export_chrome_trace(str(path))
        summary = gaps_of(json.loads(path.read_text()), min_gap_us)
    finally:
        if zo is not None:
            zo.unguard()
    summary["wall_ms"] = walls
    for key in ("span_us", "busy_us", "idle_us"):
        if key in summary:
            summary[key.replace("_us", "_ms_per_step")] = summary[key] / 1e3 / steps
    return summary


def sass_mix(device: torch.device) -> dict[str, Any]:
    """Opcode counts of the fused kernel's SASS for 1 and 2 directions, narrow and wide Philox multiply."""
    import numpy as np

    from lightning_zobi.zo.directions import DirectionKey
    from lightning_zobi.zo.fused import dense_kernel as fused
    from lightning_zobi.zo.fused.tables import tensor_seeds

    out: dict[str, Any] = {}
    x = torch.zeros(1 << 16, device=device, dtype=torch.bfloat16)
    group = fused._Group([x])
    for nstream in (1, 2):
        for wide in (False, True):
            fused.WIDE_MUL = wide
            seeds = tensor_seeds(DirectionKey(0, 0, 0), [0])
            compiled = fused._launch(
                group, seeds, np.ones(1), seeds if nstream == 2 else None, np.ones(1), np.ones(1), True, 10
            )
            try:
                sass = compiled.asm["sass"]
            except Exception as err:  # nvdisasm missing: keep the PTX counts instead
                sass = ""
                out[f"error_{nstream}_{wide}"] = repr(err)[:200]
            ops = collections.Counter(
                m.group(1)
                for m in re.finditer(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, re.M)
            )
            ptx_ops = collections.Counter(
                m.group(1)
                for m in re.finditer(r"^\s+(?:@%p\d+\s+)?([a-z][a-z0-9_.]+)", compiled.asm["ptx"], re.M)
            )
            out[f"dirs{nstream}_{'wide' if wide else 'narrow'}"] = {
                "sass": dict(ops.most_common(25)),
                "ptx": dict(ptx_ops.most_common(25)),
            }
    fused.WIDE_MUL = False
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="6.7b", choices=sorted(SHAPES))
    parser.add_argument("--variants", default="forward,zo_fused")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--min-gap-us", type=float, default=20.0)
    parser.add_argument("--sass", action="store_true", help="also count the fused kernel's SASS opcodes")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "zo_step_profile.json"
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "meta": {"device": device_name(device), "torch": torch.__version__, "shape": args.shape},
        "variants": {},
    }
    if args.sass and device.type == "cuda":
        results["sass"] = sass_mix(device)
    bench = _Bench(args.shape, device)
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        results["variants"][name] = r = profile_variant(
            bench, name, args.steps, args.out.parent, args.min_gap_us
        )
        print(
            f"{name}: wall {[f'{w:.1f}' for w in r['wall_ms']]} ms; per step busy {r.get('busy_ms_per_step', 0):.2f} "
            f"idle {r.get('idle_ms_per_step', 0):.2f} ms",
            flush=True,
        )
        for g in r.get("gaps", [])[:8]:
            print(
                f"   gap {g['total_us'] / args.steps:8.1f} us/step  x{g['count'] / args.steps:.1f}  {g['between']}"
            )
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
