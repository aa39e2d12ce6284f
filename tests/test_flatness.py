"""The forward-only Hutchinson trace (arXiv 2506.05454's flatness measure) against torch.func's exact Hessian."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from lightning_zobi.zo.diagnostics import hessian_trace
from lightning_zobi.zo.optim import ZOSGD


def _quadratic(dim: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    a = m @ m.T / dim + torch.diag(torch.rand(dim, generator=gen, dtype=torch.float64) * 3)
    b = torch.randn(dim, generator=gen, dtype=torch.float64)
    theta = torch.randn(dim, generator=gen, dtype=torch.float64)
    return a, b, theta


def test_hutchinson_matches_exact_trace_of_a_quadratic_within_its_sampling_error():
    a, b, theta0 = _quadratic()
    theta = nn.Parameter(theta0.clone())

    def loss_of(t):
        return 0.5 * t @ a @ t + b @ t

    exact = float(torch.diagonal(hessian(loss_of)(theta.detach())).sum())
    assert math.isclose(exact, float(torch.trace(a)), rel_tol=1e-12)
    opt = ZOSGD([theta], lr=0.0, eps=1e-3, seed=3)
    est = hessian_trace(lambda: loss_of(theta), opt, probes=400, eps=1e-2)
    # Var(zᵀAz) = 2 tr(A²) for Gaussian z: the reported error must match it, and the estimate sit within 4σ.
    expected_stderr = math.sqrt(2 * float(torch.trace(a @ a)) / 400)
    assert 0.7 * expected_stderr < est.stderr < 1.3 * expected_stderr
    assert abs(est.value - exact) < 4 * est.stderr, (est.value, exact, est.stderr)
    assert torch.equal(theta.detach(), theta0), "the diagnostic must never write θ"
    assert est.loss == pytest.approx(float(loss_of(theta0)), rel=1e-12)


def test_each_probe_is_exactly_ztaz_on_a_quadratic():
    # On a quadratic the second difference has no O(ε²) term: every probe equals zᵀAz of its direction.
    a, b, theta0 = _quadratic(dim=6, seed=1)
    theta = nn.Parameter(theta0.clone())
    opt = ZOSGD([theta], lr=0.0, seed=0)
    est = hessian_trace(lambda: 0.5 * theta @ a @ theta + b @ theta, opt, probes=5, eps=1e-1)
    from lightning_zobi.zo.diagnostics import _TRACE_SALT
    from lightning_zobi.zo.directions import DirectionKey, GaussianDirections, derive_seed

    d = GaussianDirections()
    for k, v in enumerate(est.samples):
        z = d.sample(theta, 0, DirectionKey(derive_seed(0, _TRACE_SALT), 0, k))
        assert v == pytest.approx(float(z @ a @ z), rel=1e-8)


def test_trace_of_a_small_network_matches_torch_func_and_leaves_it_bit_identical():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    names = [n for n, _ in net.named_parameters()]
    before = {n: p.detach().clone() for n, p in net.named_parameters()}

    def flat_loss(flat):
        shapes = [before[n].shape for n in names]
        chunks = torch.split(flat, [math.prod(s) for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return ((functional_call(net, params, (x,)) - y) ** 2).mean()

    flat = torch.cat([before[n].flatten() for n in names])
    exact = float(torch.diagonal(hessian(flat_loss)(flat)).sum())
    opt = ZOSGD(net.parameters(), lr=0.0, seed=1).attach(net)
    est = hessian_trace(lambda: ((net(x) - y) ** 2).mean(), opt, probes=300, eps=1e-3)
    assert abs(est.value - exact) < 4 * est.stderr + 1e-4 * abs(exact), (est.value, exact, est.stderr)
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_bad_arguments_are_refused_where_given():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="probes"):
        hessian_trace(lambda: p.sum(), params=[p], probes=0)
    with pytest.raises(ValueError, match="eps"):
        hessian_trace(lambda: p.sum(), params=[p], eps=-1.0)
    with pytest.raises(ValueError, match="optimizer"):
        hessian_trace(lambda: p.sum())


def _tiny_fit(tmp_path, callbacks, steps=6):
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    model = Tiny()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    return model, before, trainer


def test_flatness_monitor_logs_the_trace_and_never_moves_the_model(tmp_path):
    from lightning_zobi import ZeroOrder
    from lightning_zobi.lightning.callbacks.flatness import FlatnessMonitor

    monitor = FlatnessMonitor(every_n_steps=2, probes=4, eps=1e-2)
    model, before, trainer = _tiny_fit(tmp_path, [ZeroOrder(lr=0.0), monitor])
    assert [h[0] for h in monitor.history] == [2, 4, 6]  # global_step after the update
    assert all(math.isfinite(h[1]) for h in monitor.history)
    assert "zo/hessian_trace" in trainer.callback_metrics
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)  # lr = 0 and the monitor's probes never write θ


def test_flatness_monitor_runs_under_first_order_training(tmp_path):
    from lightning_zobi.lightning.callbacks.flatness import FlatnessMonitor

    monitor = FlatnessMonitor(every_n_steps=3, probes=4)
    _tiny_fit(tmp_path, [monitor])
    assert [h[0] for h in monitor.history] == [3, 6]
    assert all(h[1] > 0 for h in monitor.history)  # cross-entropy of a small net: a positive trace here


def test_zero_order_logs_the_trace_on_request(tmp_path):
    """``ZeroOrder(log_hessian_trace_every=N)``: the same diagnostic without adding a callback."""
    from lightning_zobi import ZeroOrder

    zo = ZeroOrder(lr=0.0, log_hessian_trace_every=3, hessian_trace_probes=2)
    model, before, trainer = _tiny_fit(tmp_path, [zo])
    assert zo.flatness is not None and [h[0] for h in zo.flatness.history] == [3, 6]
    assert "zo/hessian_trace" in trainer.callback_metrics
    assert ZeroOrder().flatness is None
