"""The fused Triton ZO path against the torch reference: distribution, restore bound, update, look-ahead.

On CPU the kernel runs in Triton's interpreter (no GPU needed, slow: tensors stay small); the
``gpu`` tests run the compiled kernel and compare it with the interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import mse_closure, tiny_mlp

pytest.importorskip("triton")

from lightning_zobi.zo import ZOSGD, DirectionKey, build_optimizer  # noqa: E402
from lightning_zobi.zo.estimators import Estimate  # noqa: E402
from lightning_zobi.zo.fused import FusedGaussianDirections, FusedZOSGD, use_fused  # noqa: E402
from lightning_zobi.zo.fused.tables import tensor_seeds  # noqa: E402

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
)
DEVICES = ["cpu", CUDA]
UNIT = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-8}


def _z32(dirs: FusedGaussianDirections, p: torch.Tensor, index: int, key: DirectionKey) -> torch.Tensor:
    """The float32 direction the in-place passes add (values depend only on seed and position)."""
    return dirs.sample(torch.empty(p.shape, dtype=torch.float32, device=p.device), index, key).double()


def test_tensor_seeds_match_derive_seed():
    from lightning_zobi.zo.directions import derive_seed
    from lightning_zobi.zo.fused.tables import derive_seeds

    key = DirectionKey(11, 42, 3)
    idx = [0, 1, 7, 300, 2**40]
    assert [int(s) for s in tensor_seeds(key, idx)] == [key.seed_for(i) for i in idx]
    assert [int(s) for s in derive_seeds((5, 9), idx, 0x56, 2**64 - 1)] == [
        derive_seed(5, 9, i, 0x56, 2**64 - 1) for i in idx
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rounds", [10, 7])
def test_moments_and_independence(device, rounds):
    """mean≈0, var≈1, kurtosis≈3 (5 standard errors), no correlation across words, tensors, keys."""
    dirs = FusedGaussianDirections(rounds=rounds)
    n = 1 << 17
    key = DirectionKey(3, 7, 0)
    z = dirs.sample(torch.empty(n, device=device), 0, key).double().cpu()
    m, v = z.mean(), z.var()
    kurt = ((z - m) ** 4).mean() / v**2
    assert abs(m) < 5 / math.sqrt(n)
    assert abs(v - 1) < 5 * math.sqrt(2 / n)
    assert abs(kurt - 3) < 5 * math.sqrt(24 / n)
    assert z.abs().max() <= 4.85  # Box-Muller on 16-bit uniforms: |z| ≤ sqrt(2·ln(2^17))
    other_index = dirs.sample(torch.empty(n, device=device), 1, key).double().cpu()
    other_key = dirs.sample(torch.empty(n, device=device), 0, DirectionKey(3, 8, 0)).double().cpu()
    words = z.view(-1, 8, 512)  # the 8 normals of one Philox call sit 512 elements apart

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    bound = 5 / math.sqrt(n / 8)
    for a, b in [(z, other_index), (z, other_key), (z[:-1], z[1:])]:
        assert abs(corr(a, b)) < bound
    for a, b in [(0, 1), (0, 2), (1, 3), (2, 3), (0, 4), (2, 6), (4, 5), (6, 7), (1, 7)]:
        assert abs(corr(words[:, a], words[:, b])) < bound
        # Box-Muller pairs are uncorrelated but share a radius: check squares too
        assert abs(corr(words[:, a] ** 2, words[:, b] ** 2)) < bound


@pytest.mark.parametrize("device", DEVICES)
def test_regenerates_identically_and_in_place_adds_the_same_direction(device):
    dirs = FusedGaussianDirections()
    key = DirectionKey(5, 1, 0)
    p = torch.zeros(3, 5000, device=device)
    a = dirs.sample(p, 4, key)
    dirs.sample(p, 5, key)
    assert torch.equal(a, dirs.sample(p, 4, key))
    assert not torch.equal(a, dirs.sample(p, 4, DirectionKey(5, 2, 0)))
    q = torch.ones(3, 5000, device=device)
    dirs.apply_([q], [(key, 0.5)], beta=2.0, indices=[4])
    torch.testing.assert_close(q, 2.0 + 0.5 * a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("difference", ["central", "forward"])
def test_lr_zero_step_restores_within_the_torch_bound(device, dtype, difference):
    """In place, lr=0, no look-ahead: |Δ| ≤ 3u(|θ| + ε|z|) per element, the torch path's bound.

    (The default exact path leaves θ bit-identical: ``tests/test_fused_exact.py``.)
    """
    model = tiny_mlp(dtype=dtype, device=device)
    before = [p.detach().clone() for p in model.parameters()]
    eps = 1e-3
    opt = FusedZOSGD(
        model.parameters(),
        lr=0.0,
        eps=eps,
        difference=difference,
        seed=5,
        lookahead=False,
        perturbation="inplace",
    )
    opt.step(mse_closure(model))
    u, key = UNIT[dtype], opt.keys_for_step(0)[0]
    for index, (p, p0) in enumerate(zip(model.parameters(), before, strict=True)):
        z = _z32(opt.fused_directions, p, index, key)
        bound = 3 * u * (p0.double().abs() + eps * z.abs()) * (1 + 1e-6)
        assert bool(((p.double() - p0.double()).abs() <= bound).all()), f"param {index}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lookahead_then_unperturb_restores(device, dtype):
    """Folded: +εz0, −2εz0, +εz0+εz1, −εz1: four roundings, |Δ| ≤ 4u(|θ| + ε|z0| + ε|z1|)."""
    model = tiny_mlp(dtype=dtype, device=device)
    before = [p.detach().clone() for p in model.parameters()]
    eps = 1e-3
    opt = FusedZOSGD(model.parameters(), lr=0.0, eps=eps, seed=5, lookahead=True, perturbation="inplace")
    opt.step(mse_closure(model))
    assert opt.perturbed
    opt.unperturb()
    assert not opt.perturbed
    k0, k1 = opt.keys_for_step(0)[0], opt.keys_for_step(1)[0]
    for index, (p, p0) in enumerate(zip(model.parameters(), before, strict=True)):
        dirs = opt.fused_directions
        zsum = _z32(dirs, p, index, k0).abs() + _z32(dirs, p, index, k1).abs()
        bound = 4 * UNIT[dtype] * (p0.double().abs() + eps * zsum) * (1 + 1e-6)
        assert bool(((p.double() - p0.double()).abs() <= bound).all()), f"param {index}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("queries", [1, 3])
def test_fused_update_equals_torch_update_for_the_same_estimate(device, dtype, tol, queries):
    """Same perturbed θ, same projected gradients: the fused pass equals ZOSGD's torch update."""
    a, b = tiny_mlp(dtype=dtype, device=device), tiny_mlp(dtype=dtype, device=device)
    groups = lambda m: [  # noqa: E731  (two groups with their own lr / decay)
        {"params": list(m[0].parameters()), "lr": 0.05, "weight_decay": 0.1},
        {"params": list(m[2].parameters())},
    ]
    inplace = dict(perturbation="inplace")  # θ − εz is applied in place below
    fused = FusedZOSGD(groups(a), lr=0.02, eps=1e-3, seed=3, queries=queries, lookahead=False, **inplace)
    torch_path = ZOSGD(
        groups(b), lr=0.02, eps=1e-3, seed=3, queries=queries, directions=FusedGaussianDirections(), **inplace
    )
    keys = fused.keys_for_step(0)
    grads = [0.7, -1.3, 2.1][:queries]
    fused.fused_directions.apply_(fused._params(), [(keys[-1], -1e-3)])  # θ − εz, as after L-
    torch_path.directions.perturb_(torch_path._params(), keys[-1], -1e-3)
    est = dict(keys=keys, projected_grads=grads, loss=0.0, pending=(keys[-1], 1e-3))
    with torch.no_grad():
        fused._update(Estimate(**est))
        torch_path._update(Estimate(**est))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_lookahead_trajectory_equals_unfolded_and_torch_reference(device):
    """Five float64 steps: folded = unfolded = ZOSGD with the same directions (torch algebra)."""
    models = [tiny_mlp(dtype=torch.float64, device=device) for _ in range(3)]
    kw = dict(lr=0.01, eps=1e-3, weight_decay=0.1, seed=3, perturbation="inplace")
    opts = [
        FusedZOSGD(models[0].parameters(), lookahead=True, **kw),
        FusedZOSGD(models[1].parameters(), lookahead=False, **kw),
        ZOSGD(models[2].parameters(), directions=FusedGaussianDirections(), **kw),
    ]
    for _ in range(5):
        for model, opt in zip(models, opts, strict=True):
            opt.step(mse_closure(model))
    opts[0].unperturb()
    for ps in zip(*(m.parameters() for m in models), strict=True):
        torch.testing.assert_close(ps[0], ps[1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ps[0], ps[2], rtol=1e-10, atol=1e-12)


def test_guard_unperturbs_before_outside_forward_and_state_dict():
    guarded, plain = tiny_mlp(dtype=torch.float64), tiny_mlp(dtype=torch.float64)
    g_opt = FusedZOSGD(guarded.parameters(), lr=0.01, eps=1e-3, seed=2, perturbation="inplace")
    p_opt = FusedZOSGD(plain.parameters(), lr=0.01, eps=1e-3, seed=2, perturbation="inplace")
    g_opt.guard(guarded)
    for _ in range(2):
        g_opt.step(mse_closure(guarded))
        p_opt.step(mse_closure(plain))
    assert g_opt.perturbed and not p_opt.perturbed  # lookahead=None folds only when guarded
    state = guarded.state_dict()  # a checkpoint sees clean weights
    assert not g_opt.perturbed
    for (name, v), q in zip(state.items(), plain.parameters(), strict=True):
        torch.testing.assert_close(v, q, rtol=1e-10, atol=1e-12, msg=name)
    g_opt.step(mse_closure(guarded))
    p_opt.step(mse_closure(plain))
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(guarded(x), plain(x), rtol=1e-10, atol=1e-12)  # validation: clean
    assert not g_opt.perturbed
    g_opt.step(mse_closure(guarded))  # the step after an unperturb re-applies +εz itself
    p_opt.step(mse_closure(plain))
    g_opt.unguard()
    for p, q in zip(guarded.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert "zo" in g_opt.state_dict()


def test_switch_and_errors():
    model = tiny_mlp()
    assert not use_fused(None, model.parameters())  # automatic: CPU keeps the torch path
    assert type(build_optimizer("zo_sgd", model.parameters())) is ZOSGD
    assert type(build_optimizer("zo_sgd", model.parameters(), fused=True)) is FusedZOSGD
    assert type(build_optimizer("zo_sgd", model.parameters(), fused=False)) is ZOSGD
    # fused-only options are accepted (and ignored) on the torch path, so one recipe fits both
    assert type(build_optimizer("zo_sgd", model.parameters(), rounds=7, lookahead=True)) is ZOSGD
    assert (
        type(build_optimizer("zo_sgd", model.parameters(), fused=False, rounds=7, fast_math=False)) is ZOSGD
    )
    with pytest.raises(TypeError, match="rounds"):  # a rule without a fused path takes no fused knobs
        build_optimizer("zo_adam", model.parameters(), fused=False, rounds=7)
    opt = build_optimizer("zo_sgd", model.parameters(), fused=True, rounds=7, lookahead=False)
    assert opt.fused_directions.rounds == 7 and opt.lookahead is False
    with pytest.raises(ValueError, match="zo_sgd"):
        build_optimizer("zo_adam", model.parameters(), fused=True)
    with pytest.raises(TypeError, match="fused"):
        build_optimizer("zo_sgd", model.parameters(), fused="yes")
    with pytest.raises(ValueError, match="rounds"):
        FusedGaussianDirections(rounds=0)
    with pytest.raises(TypeError, match="int64"):
        FusedZOSGD([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="lookahead"):
        FusedZOSGD(model.parameters(), lookahead="sometimes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fast_math,tol", [(True, 1e-4), (False, 1e-5)])
def test_compiled_kernel_matches_the_interpreter(fast_math, tol):
    """The CUDA kernel and Triton's CPU interpreter give the same directions (several tensors, odd sizes).

    The interpreter always uses exact log/sin/cos; with ``fast_math`` the GPU uses the hardware
    approximations (~1e-6 on z, more only where z itself is ~1e-3).
    """
    dirs = FusedGaussianDirections(fast_math=fast_math)
    key = DirectionKey(9, 4, 1)
    shapes = [(4097,), (33, 129), (2, 8, 1024), (1,)]
    cpu = [torch.zeros(s, dtype=torch.float32) for s in shapes]
    gpu = [t.cuda() for t in cpu]
    dirs.apply_(cpu, [(key, 1.0), (DirectionKey(9, 5, 0), -0.5)], beta=0.5)
    dirs.apply_(gpu, [(key, 1.0), (DirectionKey(9, 5, 0), -0.5)], beta=0.5)
    for c, g in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(g.cpu(), c, rtol=tol, atol=tol)
    big = torch.zeros(1 << 22, dtype=torch.bfloat16, device="cuda")
    dirs.perturb_([big], key, 1.0)
    z = big.double()
    assert abs(float(z.mean())) < 5 / 2**11 and abs(float(z.var()) - 1) < 0.01


def test_zo_step_benchmark_runs_tiny_on_cpu(tmp_path):
    """benchmarks/zo_step.py --tiny: every path runs and the JSON has the ratios the table prints."""
    import json
    import runpy
    from pathlib import Path

    bench = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "zo_step.py"))
    out = tmp_path / "zo_step_tiny.json"
    variants = "forward,pass,zo_torch,zo_fused,mezo,adamw"
    bench["main"](
        [
            "--tiny",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--repeat",
            "2",
            "--variants",
            variants,
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())["shapes"]["tiny"]
    assert set(result["variants"]) == set(variants.split(","))
    for name, r in result["variants"].items():
        assert r["ms"] > 0, name
        assert len(r["ms_rounds"]) == 2 and len(r["ms_all"]) == 2, name  # two interleaved rounds
        assert r["ratio_2fwd"] == pytest.approx(r["ms"] / (2 * result["variants"]["forward"]["ms"]))
    assert result["params"] > 0 and result["floor_ratio"] >= 1.0


def test_state_dict_names_rounds_and_format_and_warns_on_an_older_format():
    dirs = FusedGaussianDirections(rounds=7)
    assert dirs.state_dict() == {"rounds": 7, "format": FusedGaussianDirections.FORMAT}
    dirs.load_state_dict(dirs.state_dict())  # same: silent
    with pytest.warns(UserWarning, match="format 1"):
        dirs.load_state_dict({"rounds": 7})
    with pytest.raises(ValueError, match="rounds=10"):
        dirs.load_state_dict({"rounds": 10, "format": FusedGaussianDirections.FORMAT})


def test_zo_step_profile_runs_tiny_on_cpu(tmp_path):
    """benchmarks/zo_step_profile.py: profiles a forward and a fused step; on CPU it reports no GPU events."""
    import json
    import runpy
    from pathlib import Path

    prof = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "zo_step_profile.py"))
    out = tmp_path / "profile.json"
    prof["main"](["--shape", "tiny", "--variants", "forward,zo_fused", "--steps", "1", "--out", str(out)])
    variants = json.loads(out.read_text())["variants"]
    assert set(variants) == {"forward", "zo_fused"}
    for r in variants.values():
        assert len(r["wall_ms"]) == 1 and r["wall_ms"][0] > 0
        assert r["error"] == "no GPU events in the trace"  # a CUDA run reports busy/idle and the gaps instead
    assert (tmp_path / "trace_zo_fused.json").exists()
