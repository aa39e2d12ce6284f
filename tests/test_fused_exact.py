"""The fused path under exact perturbation: bit-identical at lr=0, fused materialisation, in-kernel stochastic rounding.

On CPU the kernels run in Triton's interpreter (small tensors); the ``gpu`` cases run the compiled
kernels.
"""

from __future__ import annotations

import pytest
import torch
from conftest import mse_closure, tiny_mlp
from torch import nn

pytest.importorskip("triton")

from lightning_zobi.quant.qzo_fused import FusedQZOOptimizer  # noqa: E402
from lightning_zobi.zo import ZOSGD, DirectionKey  # noqa: E402
from lightning_zobi.zo.estimators import Estimate  # noqa: E402
from lightning_zobi.zo.fused import (  # noqa: E402
    FusedGaussianDirections,
    FusedJustInTime,
    FusedLowRankDirections,
    FusedLOZO,
    FusedZOSGD,
)
from lightning_zobi.zo.optim import LOZO  # noqa: E402

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
)
DEVICES = ["cpu", CUDA]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = {
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float64: torch.int64,
}


def _model(dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    """Linear, LayerNorm, Linear: 2-D weights (LOZO's tiles), vectors, and a -0.0 to keep."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.LayerNorm(24), nn.ReLU(), nn.Linear(24, 3)).to(device, dtype)
    with torch.no_grad():
        model[0].bias[0] = -0.0
    return model


def _closure(model: nn.Module):
    p = next(model.parameters())
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=gen).to(p), torch.randn(16, 3, generator=gen).to(p)
    return lambda: ((model(x) - y).float() ** 2).mean()


def _bits(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().view(BITS[p.dtype]).clone() for p in model.parameters()]


FACTORIES = {
    "zo_sgd": lambda params, **kw: FusedZOSGD(params, **kw),
    "lozo": lambda params, **kw: FusedLOZO(params, rank=2, nu=2, **kw),
    "qzo": lambda params, **kw: FusedQZOOptimizer(params, clip=None, nonnegative=False, **kw),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", sorted(FACTORIES))
def test_lr_zero_leaves_every_bit(rule, dtype, device):
    """Three central steps at lr=0 (forwards read θ ± εz; nothing writes θ), -0.0 included."""
    model = _model(dtype, device)
    before = _bits(model)
    opt = FACTORIES[rule](list(model.parameters()), lr=0.0, eps=1e-2, seed=3)
    for _ in range(3):
        loss = opt.step(_closure(model))
        assert loss == loss
    assert isinstance(opt.perturber(), FusedJustInTime)
    assert all(torch.equal(a, b) for a, b in zip(before, _bits(model), strict=True))
    assert str(model[0].bias[0].item()) == "-0.0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_lr_zero_on_plain_tensors_read_in_the_closure(dtype):
    """QZO's scales are not module parameters: materialised for the whole forward, still bit-identical."""
    torch.manual_seed(0)
    scales = [torch.rand(n, dtype=dtype) * 0.1 for n in (300, 64)]
    before = [s.clone() for s in scales]
    opt = FusedQZOOptimizer(scales, lr=0.0, eps=1e-3, seed=2)
    for _ in range(2):
        opt.step(lambda: sum((s.float() ** 2).sum() for s in scales))
    assert all(
        torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(before, scales, strict=True)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_materialisation_is_theta_plus_scaled_directions_rounded_once(dtype, device):
    """``θ + s_a·z_a + s_b·z_b`` in float32 (float64) from the in-place kernel's z, rounded once; θ untouched."""
    model = _model(dtype, device)
    params = list(model.parameters())
    before = _bits(model)
    keys = [DirectionKey(1, 4, 0), DirectionKey(1, 5, 0)]
    for family in (FusedGaussianDirections(), FusedLowRankDirections(rank=3, nu=2)):
        terms = [(keys[0], 0.25), (keys[1], [-0.5 * (i + 1) for i in range(len(params))])]
        sizes = [-(-p.numel() // 8) * 8 for p in params]
        out = torch.empty(sum(sizes), dtype=dtype, device=device)
        offsets = [sum(sizes[:k]) for k in range(len(params))]
        assert family.materialize_chunk(params, range(len(params)), terms, out, offsets)
        compute = torch.float64
        for i, (p, o) in enumerate(zip(params, offsets, strict=True)):
            z = [
                family.sample(p.detach().to(torch.float64 if dtype == torch.float64 else torch.float32), i, k)
                for k in keys
            ]
            ref = p.detach().to(compute) + 0.25 * z[0].to(compute) - 0.5 * (i + 1) * z[1].to(compute)
            got = out[o : o + p.numel()].view(p.shape)
            tol = {torch.float64: 1e-12, torch.float32: 2e-6}.get(dtype, 0.0)
            if tol:
                torch.testing.assert_close(got.to(compute), ref, rtol=tol, atol=tol)
            else:  # one rounding of the float32 value (ties and the last float32 bit aside)
                ulp = (ref.to(dtype).to(compute) - ref).abs().max()
                assert float((got.to(compute) - ref).abs().max()) <= float(ulp) + 1e-6
    assert all(torch.equal(a, b) for a, b in zip(before, _bits(model), strict=True))


def test_chunked_materialisation_equals_tensor_by_tensor():
    """After the first forward a request materialises the next tensors of the recorded order in one launch."""
    runs = {}
    for chunk in (None, 0):
        model = _model(torch.bfloat16)
        opt = FusedZOSGD(model.parameters(), lr=1e-2, eps=1e-2, seed=1)
        if chunk is not None:
            opt.perturber().chunk_numel = chunk
        calls = []
        dirs = opt.fused_directions
        original = dirs.materialize_chunk
        dirs.materialize_chunk = lambda *a, calls=calls, original=original, **k: (
            calls.append(len(a[1])),
            original(*a, **k),
        )[1]
        for _ in range(3):
            opt.step(_closure(model))
        runs[chunk] = (_bits(model), calls, opt.perturber()._order)
    (merged, calls, order), (single, single_calls, _) = runs[None], runs[0]
    assert order == list(range(6))  # the order the forward asked for the tensors
    assert max(calls) > 1 and max(single_calls) == 1 and len(calls) < len(single_calls)
    assert all(torch.equal(a, b) for a, b in zip(merged, single, strict=True))


def _pair(fused_cls, torch_cls, directions, a, b):
    groups = lambda m: [  # noqa: E731  (two groups with their own lr / decay)
        {"params": list(m[0].parameters()), "lr": 0.05, "weight_decay": 0.1},
        {"params": list(m[2].parameters())},
    ]
    kw = dict(lr=0.02, eps=1e-3, seed=3)
    if torch_cls is LOZO:
        kw.update(rank=2, nu=2)
    fused, reference = fused_cls(groups(a), **kw), torch_cls(groups(b), **kw)
    reference.directions = directions()
    return fused, reference


PAIRS = {
    "zo_sgd": (FusedZOSGD, ZOSGD, lambda: FusedGaussianDirections()),
    "lozo": (FusedLOZO, LOZO, lambda: FusedLowRankDirections(rank=2, nu=2)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", sorted(PAIRS))
def test_fused_exact_update_equals_the_torch_exact_update_for_the_same_estimate(rule, device):
    """float32, two queries, decay, two groups: the fused update pass = the rule's torch update (no restore)."""
    a, b = tiny_mlp(device=device), tiny_mlp(device=device)
    fused, reference = _pair(*PAIRS[rule], a, b)
    est = dict(
        keys=fused.keys_for_step(0)[:1] + [DirectionKey(3, 0, 1)], projected_grads=[0.7, -1.3], loss=0.0
    )
    with torch.no_grad():
        fused._update(Estimate(**est))
        reference._update(Estimate(**est))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
    assert any(
        not torch.equal(p, q)
        for p, q in zip(a.parameters(), tiny_mlp(device=device).parameters(), strict=True)
    )


@pytest.mark.parametrize("rule", sorted(PAIRS))
def test_fused_exact_trajectory_equals_the_torch_exact_path_in_float64(rule):
    """Three float64 steps: fused materialisation + update = the torch path's, on the same directions."""
    a, b = tiny_mlp(dtype=torch.float64), tiny_mlp(dtype=torch.float64)
    fused, reference = _pair(*PAIRS[rule], a, b)
    for _ in range(3):
        fused.step(mse_closure(a))
        reference.step(mse_closure(b))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_in_kernel_stochastic_rounding_is_unbiased_and_seeded(dtype, device):
    """θ·β lands 0.3 ulp above a representable value: the mean keeps the 0.3 ulp, round-to-nearest loses it."""
    n = 1 << 15
    base = torch.tensor(0.02, dtype=dtype)
    ulp = float(torch.nextafter(base, torch.tensor(1.0, dtype=dtype)).float() - base.float())
    beta = 1.0 + 0.3 * ulp / float(base.float())
    dirs = FusedGaussianDirections()
    key = DirectionKey(0, 0, 0)
    results = {}
    for name, seeds in (("a", 11), ("a2", 11), ("b", 12), ("rn", None)):
        t = torch.full((n,), float(base), dtype=dtype, device=device)
        sr = None if seeds is None else __import__("numpy").array([seeds], dtype="uint64")
        dirs.apply_([t], [(key, 0.0)], beta=beta, sr_seeds=sr)
        results[name] = t.float().cpu()
    target = float(base.float()) * beta
    assert set(results["a"].unique().tolist()) <= {float(base.float()), float(base.float()) + ulp}
    assert abs(float(results["a"].mean()) - target) < 0.02 * ulp
    assert torch.equal(results["a"], results["a2"]) and not torch.equal(results["a"], results["b"])
    assert float(results["rn"].mean()) == float(base.float())


def test_sub_ulp_updates_survive_in_bf16_and_resume_is_bit_exact():
    """lr·g·z ≈ 0.1 ulp: stochastic rounding follows fp32; a run resumed from a state_dict repeats the bits."""
    n, steps, lr = 4096, 60, 2e-7

    def run(dtype, sr, split=None):
        w = nn.Parameter(torch.full((n,), 0.02, dtype=dtype))
        opt = FusedZOSGD([w], lr=lr, eps=1e-3, seed=0, stochastic_rounding=sr)
        for t in range(steps):
            if split is not None and t == split:
                state = opt.state_dict()
                opt = FusedZOSGD([w], lr=lr, eps=1e-3, seed=9, stochastic_rounding=sr)
                opt.load_state_dict(state)
            opt.step(lambda w=w: w.double().sum())
        return w.detach()

    fp32 = float(run(torch.float32, True).double().mean()) - 0.02
    sr = run(torch.bfloat16, True)
    rn = float(run(torch.bfloat16, False).double().mean()) - float(torch.tensor(0.02, dtype=torch.bfloat16))
    shift = float(sr.double().mean()) - float(torch.tensor(0.02, dtype=torch.bfloat16))
    assert fp32 < 0 and shift == pytest.approx(fp32, rel=0.35)
    assert abs(rn) < 0.25 * abs(fp32)  # round to nearest keeps only the rare draws above half an ulp
    assert torch.equal(sr.view(torch.int16), run(torch.bfloat16, True, split=25).view(torch.int16))
