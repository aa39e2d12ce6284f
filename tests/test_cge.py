"""DeepZero's coordinate-wise estimate (zo_cge): the finite-difference gradient on the chosen coordinates, nothing else moves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_zobi.zo.coordinate import ZOCGE, CoordinateDirections, grasp_layer_density, zo_grasp_scores
from lightning_zobi.zo.optim import OPTIMIZERS, build_optimizer


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))

    def loss():
        return nn.functional.cross_entropy(net(x), y)

    return net, loss


def _fd(net, loss, host: int, pos: int, mu: float, central: bool) -> float:
    p = list(net.parameters())[host]
    saved = p.detach().clone()
    with torch.no_grad():
        base = float(loss())
        p.view(-1)[pos] += mu
        plus = float(loss())
        p.copy_(saved)
        p.view(-1)[pos] -= mu
        minus = float(loss())
        p.copy_(saved)
    return (plus - minus) / (2 * mu) if central else (plus - base) / mu


@pytest.mark.parametrize("difference", ["forward", "central"])
def test_cge_estimate_is_the_finite_difference_gradient_on_the_chosen_coordinates(difference):
    net, loss = _problem()
    before = [p.detach().clone() for p in net.parameters()]
    lr, mu = 0.5, 1e-4
    opt = ZOCGE(net.parameters(), lr=lr, eps=mu, coordinates=9, mask="none", difference=difference).attach(
        net
    )
    d = opt.coordinate_directions
    d.begin_step(opt._params(), opt.seed, 0)
    chosen = d.chosen
    d.end_step()
    assert len(set(chosen)) == 9
    expected = [_fd(net, loss, h, q, mu, difference == "central") for h, q in chosen]
    # and the finite differences are the true partial derivatives up to O(mu) / O(mu^2)
    for p in net.parameters():
        p.grad = None
    loss().backward()
    true = [float(list(net.parameters())[h].grad.view(-1)[q]) for h, q in chosen]
    for p in net.parameters():
        p.grad = None
    opt.step(loss)
    est = opt.last_estimate
    assert est.projected_grads == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert est.projected_grads == pytest.approx(true, abs=1e-3)
    assert len(est.losses) == (10 if difference == "forward" else 18)
    # only the chosen coordinates moved, each by -lr * g_i
    moved = {
        (h, q)
        for h, p in enumerate(net.parameters())
        for q in torch.nonzero((p.detach() - before[h]).view(-1)).flatten().tolist()
    }
    assert moved <= set(chosen)
    for (h, q), g in zip(chosen, est.projected_grads, strict=True):
        delta = float(list(net.parameters())[h].detach().view(-1)[q] - before[h].view(-1)[q])
        assert delta == pytest.approx(-lr * g, rel=1e-6, abs=1e-15)


def test_subset_is_seeded_and_drawn_from_the_mask():
    net, loss = _problem()
    params = list(net.parameters())
    d1, d2 = (
        CoordinateDirections(5, density=0.3, mask="magnitude"),
        CoordinateDirections(5, density=0.3, mask="magnitude"),
    )
    d1.begin_step(params, 7, 3)
    d2.begin_step(params, 7, 3)
    assert d1.chosen == d2.chosen
    for h, q in d1.chosen:
        p = params[h].detach().abs().flatten()
        k = max(1, round(0.3 * p.numel()))
        assert q in set(p.topk(k).indices.tolist())
    d2.begin_step(params, 7, 4)
    assert d1.chosen != d2.chosen


def test_zo_grasp_mask_sets_layer_densities_and_leaves_theta_bit_identical():
    net, loss = _problem(1)
    before = [p.detach().clone() for p in net.parameters()]
    opt = build_optimizer(
        "zo_cge", net.parameters(), lr=0.0, coordinates=4, density=0.25, mask="zo_grasp", grasp_queries=8
    )
    assert OPTIMIZERS["zo_cge"] is ZOCGE and isinstance(opt, ZOCGE)
    opt.step(loss)
    dens = opt.coordinate_directions.layer_density
    sizes = [p.numel() for p in net.parameters()]
    kept = sum(round(dn * n) for dn, n in zip(dens, sizes, strict=True))
    assert abs(kept - 0.25 * sum(sizes)) <= len(sizes)
    for p, b in zip(net.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)  # lr = 0: GraSP's in-place probes and the step restore θ exactly
    state = opt.state_dict()
    fresh = ZOCGE(net.parameters(), coordinates=4, density=0.25)
    fresh.load_state_dict(state)
    assert fresh.coordinate_directions.layer_density == dens


def test_zo_grasp_scores_agree_in_sign_with_exact_grasp_on_a_quadratic():
    # L = 0.5 θᵀAθ: g = Aθ, Hg = A²θ; the score −θ ⊙ Hg is what ZO-GraSP estimates (RGE noise aside).
    gen = torch.Generator().manual_seed(0)
    a = torch.diag(torch.linspace(0.5, 3.0, 6, dtype=torch.float64))
    theta = nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))
    exact = -(theta.detach() * (a @ a @ theta.detach()))
    scores = zo_grasp_scores([theta], lambda: 0.5 * theta @ a @ theta, queries=4000, mu=1e-3, delta=1e-2)
    assert torch.corrcoef(torch.stack([scores[0].double(), exact]))[0, 1] > 0.9
    assert grasp_layer_density([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])], 0.5) == [1.0, 0.5]


def test_cge_trains_a_tiny_classifier():
    net, loss = _problem(2)
    opt = ZOCGE(net.parameters(), lr=0.5, eps=1e-4, coordinates=16, mask="none")
    start = float(loss())
    for _ in range(40):
        opt.step(loss)
    assert float(loss()) < start - 0.05


def test_bad_arguments():
    net, _ = _problem()
    with pytest.raises(TypeError, match="coordinates"):
        ZOCGE(net.parameters(), queries=3)
    with pytest.raises(ValueError, match="mask"):
        ZOCGE(net.parameters(), mask="grasp")
    with pytest.raises(ValueError, match="coordinates"):
        ZOCGE(net.parameters(), coordinates=0)


def test_zero_order_callback_drives_zo_cge(tmp_path):
    import lightning.pytorch as pl

    from lightning_zobi import ZeroOrder

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    model = Tiny()
    before = model.net.weight.detach().clone()
    cb = ZeroOrder(optimizer="zo_cge", lr=0.1, eps=1e-3, optimizer_kwargs={"coordinates": 3, "mask": "none"})
    trainer = pl.Trainer(
        max_steps=4,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    changed = int((model.net.weight.detach() != before).sum())
    assert 1 <= changed <= 12  # at most 3 coordinates per step over 4 steps (bias included elsewhere)
