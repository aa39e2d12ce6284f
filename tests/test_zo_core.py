"""The seeded ZO engine in plain PyTorch: exact restore, unbiasedness, determinism, state, errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import mse_closure, tiny_mlp
from torch import nn

from lightning_zobi.zo import (
    ZOSGD,
    DirectionKey,
    GaussianDirections,
    NonFiniteLossError,
    ZOOptimizer,
    build_optimizer,
    central_difference,
    derive_seed,
)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, 1, 2, 3) == derive_seed(0, 1, 2, 3)
    seeds = {derive_seed(7, t, k, i) for t in range(20) for k in range(3) for i in range(10)}
    assert len(seeds) == 600
    assert all(0 <= s < 2**63 for s in seeds)


def test_direction_regenerates_identically():
    dirs = GaussianDirections()
    p = torch.empty(5, 7)
    key = DirectionKey(3, 10, 0)
    a = dirs.sample(p, 2, key)
    dirs.sample(p, 3, key)  # other draws in between must not matter
    assert torch.equal(a, dirs.sample(p, 2, key))
    assert not torch.equal(a, dirs.sample(p, 2, DirectionKey(3, 11, 0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("difference", ["central", "forward"])
def test_lr_zero_step_restores_parameters_within_rounding(dtype, difference):
    """With lr=0, θ is restored up to the documented bound |Δ| ≤ 3u(|θ| + ε|z|) per element.

    u is the dtype's unit roundoff (2^-24 fp32, 2^-53 fp64, 2^-8 bf16): the three in-place adds
    (+εz, −2εz, +εz) round once each. In float64 the perturbation is also tested bit-exactly
    restored when ε z is a power of two apart from θ's ulp (not guaranteed in general).
    """
    model = tiny_mlp(dtype=dtype)
    before = [p.detach().clone() for p in model.parameters()]
    eps = 1e-3
    opt = ZOSGD(model.parameters(), lr=0.0, eps=eps, difference=difference, seed=5)
    opt.step(mse_closure(model))
    u = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-8}[dtype]
    key = opt.keys_for_step(0)[0]
    for index, (p, p0) in enumerate(zip(model.parameters(), before, strict=True)):
        z = opt.directions.sample(p, index, key).double()
        bound = 3 * u * (p0.double().abs() + eps * z.abs()) * (1 + 1e-6)
        err = (p.double() - p0.double()).abs()
        assert bool((err <= bound).all()), f"param {index}: max err {err.max():.3g} > bound"


def test_lr_zero_step_is_bit_identical_for_dyadic_values():
    """When every intermediate is exactly representable, restore is bit-for-bit."""
    p = nn.Parameter(torch.full((64,), 0.5, dtype=torch.float64))
    opt = ZOSGD([p], lr=0.0, eps=2.0**-10, seed=1)
    opt.step(lambda: (p**2).sum())
    # θ ± εz rounds; the restore error is bounded by 3u(|θ| + ε|z|) ≪ ulp-scale of 0.5 at fp64
    assert (p - 0.5).abs().max() <= 3 * 2.0**-53 * (0.5 + 2.0**-10 * 5)


def test_central_estimate_is_unbiased_on_a_quadratic():
    """mean_k g_k z_k → ∇f; its RMS relative error is sqrt((d+1)/N); we allow 4×."""
    torch.manual_seed(0)
    d, n = 10, 4000
    a = torch.randn(d, d, dtype=torch.float64)
    a = a @ a.T / d + torch.eye(d, dtype=torch.float64)
    x = torch.randn(d, dtype=torch.float64)
    true = a @ x
    dirs = GaussianDirections()
    keys = [DirectionKey(0, 0, k) for k in range(n)]
    est = central_difference([x], lambda: 0.5 * x @ a @ x, dirs, keys, eps=1e-4)
    dirs.perturb_([x], est.pending[0], est.pending[1])
    zs = torch.stack([dirs.sample(x, 0, k) for k in keys])
    g = torch.tensor(est.projected_grads, dtype=torch.float64)
    # each projected gradient is the exact directional derivative for a quadratic
    assert torch.allclose(g, zs @ true, rtol=1e-6, atol=1e-8)
    mean = (g[:, None] * zs).mean(0)
    rel = float((mean - true).norm() / true.norm())
    assert rel < 4 * math.sqrt((d + 1) / n)


@pytest.mark.parametrize("queries,difference", [(1, "central"), (4, "central"), (2, "forward")])
def test_zo_sgd_decreases_a_regression_loss(queries, difference):
    model = tiny_mlp()
    closure = mse_closure(model)
    start = float(closure())
    opt = ZOSGD(model.parameters(), lr=0.02, eps=1e-3, queries=queries, difference=difference)
    for _ in range(200):
        opt.step(closure)
    assert float(closure()) < 0.8 * start
    assert all(p.grad is None for p in model.parameters())


def test_fused_sgd_update_equals_the_generic_rule():
    """ZOSGD's fused restore+update gives the base class's restore-then-update result."""
    a, b = tiny_mlp(dtype=torch.float64), tiny_mlp(dtype=torch.float64)
    fused = ZOSGD(a.parameters(), lr=0.01, eps=1e-3, weight_decay=0.1, seed=3)
    generic = ZOOptimizer(b.parameters(), lr=0.01, eps=1e-3, weight_decay=0.1, seed=3)
    for _ in range(5):
        fused.step(mse_closure(a))
        generic.step(mse_closure(b))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_same_seed_bit_identical_and_other_seed_differs():
    def run(seed):
        model = tiny_mlp()
        opt = ZOSGD(model.parameters(), lr=0.01, eps=1e-3, seed=seed, queries=2)
        for _ in range(10):
            opt.step(mse_closure(model))
        return [p.detach().clone() for p in model.parameters()]

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(p, q) for p, q in zip(first, again, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(first, other, strict=True))


def test_state_dict_round_trip_resumes_exactly():
    model = tiny_mlp()
    opt = ZOSGD(model.parameters(), lr=0.01, eps=1e-3, seed=9)
    for _ in range(3):
        opt.step(mse_closure(model))
    state = opt.state_dict()
    assert state["zo"]["seed"] == 9 and state["zo"]["step"] == 3
    snapshot = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.step(mse_closure(model))
    continued = [p.detach().clone() for p in model.parameters()]

    clone = tiny_mlp()
    with torch.no_grad():
        for p, s in zip(clone.parameters(), snapshot, strict=True):
            p.copy_(s)
    resumed = ZOSGD(clone.parameters(), lr=0.5, eps=1e-3, seed=0)
    resumed.load_state_dict(state)
    assert resumed.seed == 9 and resumed.zo_step == 3 and resumed.param_groups[0]["lr"] == 0.01
    for _ in range(3):
        resumed.step(mse_closure(clone))
    assert all(torch.equal(p, q) for p, q in zip(clone.parameters(), continued, strict=True))


def test_no_graph_even_if_the_closure_enables_grad():
    model = tiny_mlp()
    seen = []

    @torch.enable_grad()
    def closure():
        loss = nn.functional.mse_loss(model(torch.ones(4, 6)), torch.zeros(4, 3))
        seen.append(loss.requires_grad)
        return loss

    ZOSGD(model.parameters(), lr=0.01).step(closure)
    assert seen == [False, False]
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_bad_inputs_get_clear_errors():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="no trainable parameters"):
        ZOSGD([], lr=0.1)
    with pytest.raises(ValueError, match="eps=0"):
        ZOSGD(model.parameters(), eps=0)
    with pytest.raises(ValueError, match="eps=-0.1"):
        ZOSGD(model.parameters(), eps=-0.1)
    with pytest.raises(ValueError, match="lr=-1"):
        ZOSGD(model.parameters(), lr=-1)
    with pytest.raises(ValueError, match="queries=0"):
        ZOSGD(model.parameters(), queries=0)
    with pytest.raises(ValueError, match="difference='backward'"):
        ZOSGD(model.parameters(), difference="backward")
    with pytest.raises(ValueError, match="not a known ZO rule"):
        build_optimizer("zo_magic", model.parameters())
    opt = ZOSGD(model.parameters())
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match="returned no loss"):
        opt.step(lambda: None)
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(lambda: torch.ones(3))


def test_non_finite_losses_are_skipped_counted_then_stop():
    model = tiny_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = ZOSGD(model.parameters(), lr=0.01, max_nonfinite=3, seed=4)
    for _ in range(2):
        opt.step(lambda: torch.tensor(float("nan")))
    assert opt.nonfinite_total == 2 and opt.zo_step == 2
    for p, p0 in zip(model.parameters(), before, strict=True):  # skipped steps only restore
        torch.testing.assert_close(p, p0, rtol=0, atol=1e-6)
    with pytest.raises(
        NonFiniteLossError, match=r"3 ZO steps in a row.*step 2.*seed 4.*smaller learning rate"
    ):
        opt.step(lambda: torch.tensor(float("inf")))
    opt.nonfinite_streak = 0
    opt.step(mse_closure(model))  # a finite step resets the streak
    assert opt.nonfinite_streak == 0
