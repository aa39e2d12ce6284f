"""The ZO rule family: each rule descends, stateful rules resume exactly, LOZO/sparse directions behave."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_zobi.zo.directions import DirectionKey, LowRankDirections, SparseDirections
from lightning_zobi.zo.optim import (
    LOZO,
    LOZOM,
    OPTIMIZERS,
    ZOAdam,
    ZOFOHybrid,
    ZOSGDCons,
    ZOSign,
    build_optimizer,
    extra_state_bytes,
)

# Learning rates that make each rule descend on the quadratic below within 150 steps.
QUADRATIC_LR = {
    "zo_sgd": dict(lr=2e-3),
    "zo_sgd_momentum": dict(lr=3e-4, momentum=0.9),
    "zo_sign": dict(lr=2e-2),
    "zo_adam": dict(lr=3e-2),
    "zo_sgd_cons": dict(lr=2e-3),
    "lozo": dict(lr=1e-3, rank=2, nu=10),
    "lozo_m": dict(lr=2.5e-3, rank=2, nu=10, beta=0.9),
    "sparse_zo": dict(lr=2e-3, density=0.5),
    "sparse_zo_random": dict(lr=2e-3, density=0.5, mask="random"),
    "zo_fo_hybrid": dict(lr=2e-3, fo_params="^b$", fo_lr=0.05),
}
RULES = sorted(set(OPTIMIZERS) - {"zo_sgd"})


def _rule_name(case: str) -> str:
    return "sparse_zo" if case.startswith("sparse_zo") else case


def _quadratic(seed: int = 0) -> tuple[nn.Parameter, nn.Parameter, callable]:
    gen = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(16, 12, generator=gen))
    b = nn.Parameter(torch.randn(12, generator=gen))
    w_star, b_star = torch.randn(16, 12, generator=gen), torch.randn(12, generator=gen)

    def loss() -> torch.Tensor:
        return ((w - w_star) ** 2).sum() + ((b - b_star) ** 2).sum()

    return w, b, loss


def _params_for(case: str, w: torch.Tensor, b: torch.Tensor) -> list:
    return [("w", w), ("b", b)] if case == "zo_fo_hybrid" else [w, b]


def test_every_rule_is_registered_and_built_by_name() -> None:
    assert set(RULES) == {
        "zo_sgd_momentum",
        "zo_sign",
        "zo_adam",
        "zo_sgd_cons",
        "lozo",
        "lozo_m",
        "sparse_zo",
        "zo_fo_hybrid",
        "zo_cge",
    }
    w, b, _ = _quadratic()
    for case, kwargs in QUADRATIC_LR.items():
        opt = build_optimizer(
            _rule_name(case),
            _params_for(case, w, b),
            eps=1e-3,
            queries=1,
            difference="central",
            seed=3,
            max_nonfinite=2,
            **kwargs,
        )
        assert isinstance(opt, OPTIMIZERS[_rule_name(case)])
        assert opt.seed == 3 and opt.max_nonfinite == 2


@pytest.mark.parametrize("case", sorted(QUADRATIC_LR))
def test_rule_reduces_quadratic_loss(case: str) -> None:
    w, b, loss = _quadratic()
    opt = build_optimizer(_rule_name(case), _params_for(case, w, b), eps=1e-3, seed=1, **QUADRATIC_LR[case])
    with torch.no_grad():
        start = float(loss())
    for _ in range(150):
        opt.step(loss)
    with torch.no_grad():
        end = float(loss())
    assert end < 0.85 * start, f"{case}: {start:.1f} -> {end:.1f}"
    assert w.grad is None and b.grad is None  # no gradient was ever materialised on the tuned tensors


TINY_LM_LR = {
    "zo_sgd_momentum": dict(lr=2e-3, momentum=0.9),
    "zo_sign": dict(lr=1e-2),
    "zo_adam": dict(lr=3e-3),
    "zo_sgd_cons": dict(lr=2e-2),
    "lozo": dict(lr=1e-2, rank=2, nu=5),
    "lozo_m": dict(lr=1e-2, rank=2, nu=5),
    "sparse_zo": dict(lr=2e-2, density=0.3),
    "zo_fo_hybrid": dict(lr=2e-2, fo_params="lm_head", fo_lr=1e-2),
}


@pytest.fixture(scope="module")
def tiny_lm_state() -> tuple[dict, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(1))
    return {"config": config, "state": copy.deepcopy(model.state_dict())}, ids


@pytest.mark.parametrize("case", sorted(TINY_LM_LR))
def test_rule_reduces_tiny_llama_loss(case: str, tiny_lm_state) -> None:
    from transformers import LlamaForCausalLM

    spec, ids = tiny_lm_state
    model = LlamaForCausalLM(spec["config"])
    model.load_state_dict(spec["state"])
    params = list(model.named_parameters()) if case == "zo_fo_hybrid" else list(model.parameters())
    opt = build_optimizer(case, params, eps=1e-2, seed=0, **TINY_LM_LR[case])

    def closure() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    with torch.no_grad():
        start = float(closure())
    for _ in range(40):
        opt.step(closure)
    with torch.no_grad():
        end = float(closure())
    assert end < start - 0.02, f"{case}: {start:.4f} -> {end:.4f}"


STATEFUL = {
    "zo_sgd_momentum": dict(lr=3e-4),
    "zo_adam": dict(lr=1e-2),
    "lozo_m": dict(lr=2.5e-3, rank=2, nu=2),
    "zo_fo_hybrid": dict(lr=2e-3, fo_params="^b$", fo_lr=0.05),
}


@pytest.mark.parametrize("case", sorted(STATEFUL))
def test_state_dict_round_trip_resumes_exactly(case: str) -> None:
    w, b, loss = _quadratic()
    opt = build_optimizer(case, _params_for(case, w, b), eps=1e-3, seed=7, **STATEFUL[case])
    for _ in range(3):
        opt.step(loss)
    state = copy.deepcopy(opt.state_dict())
    assert state["zo"]["step"] == 3
    if case == "lozo_m":
        assert opt.state[w]["lozo_n"].shape == (16, 2) and opt.state[w]["lozo_period"] == 1
    if case == "zo_fo_hybrid":
        assert state["fo_optimizer"]["state"]  # AdamW moments of the first-order subset

    w2, b2, loss2 = _quadratic()
    with torch.no_grad():
        w2.copy_(w)
        b2.copy_(b)
    resumed = build_optimizer(case, _params_for(case, w2, b2), eps=1e-3, seed=0, **STATEFUL[case])
    resumed.load_state_dict(state)
    assert resumed.seed == 7 and resumed.zo_step == 3
    for _ in range(4):  # crosses LOZO-M's lazy-period boundary (nu=2), so the reprojection is exercised
        opt.step(loss)
        resumed.step(loss2)
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_lozo_direction_is_exactly_rank_r_and_regenerated_identically() -> None:
    dirs = LowRankDirections(rank=3, nu=4)
    param = torch.zeros(20, 14, dtype=torch.float64)
    key = DirectionKey(run_seed=5, step=6, query=0)
    z = dirs.sample(param, 2, key)
    assert z.shape == param.shape
    assert int(torch.linalg.matrix_rank(z)) == 3
    assert torch.equal(z, dirs.sample(param, 2, key))
    assert torch.equal(z, LowRankDirections(rank=3, nu=4).sample(param, 2, key))  # a fresh object agrees
    # V is shared inside a lazy period (steps 4..7) and by all queries; U is not.
    _, v = dirs.factors(param, 2, key)
    u_next, v_next = dirs.factors(param, 2, DirectionKey(5, 7, 1))
    assert torch.equal(v, v_next) and not torch.equal(dirs.factors(param, 2, key)[0], u_next)
    assert not torch.equal(v, dirs.factors(param, 2, DirectionKey(5, 8, 0))[1])
    # perturb_ adds exactly scale * U V^T (through addmm, no dense direction) and Gaussian for vectors
    bias = torch.zeros(14, dtype=torch.float64)
    dirs.perturb_([torch.zeros(3), bias, param], key, 0.5)
    assert torch.allclose(param, 0.5 * dirs.sample(param, 2, key), atol=1e-12)
    assert torch.equal(bias, 0.5 * dirs.sample(bias, 1, key))
    with pytest.raises(ValueError, match="rank"):
        LowRankDirections(rank=0)
    with pytest.raises(ValueError, match="nu"):
        LowRankDirections(nu=0)


def test_lozo_estimate_is_unbiased_with_the_one_over_r_scale() -> None:
    """For a linear loss <G, W>, the mean LOZO step (unbiased=True) over many directions recovers -lr·G."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(10, 8, generator=gen, dtype=torch.float64)
    total = torch.zeros_like(target)
    n = 3000
    w = nn.Parameter(torch.zeros(10, 8, dtype=torch.float64))
    opt = LOZO([w], lr=1.0, eps=1e-3, rank=4, nu=1, seed=11, unbiased=True)
    for _ in range(n):
        before = w.detach().clone()
        opt.step(lambda: (target * w).sum())
        total += before - w.detach()
        with torch.no_grad():
            w.zero_()
    mean_step = total / n
    rel_err = float((mean_step - target).norm() / target.norm())
    assert rel_err < 0.25, rel_err


def test_lozo_keeps_no_state_and_lozo_m_keeps_only_small_factors() -> None:
    w, b, loss = _quadratic()
    lozo = LOZO([w, b], lr=1e-3, rank=2, nu=5)
    lozo.step(loss)
    assert extra_state_bytes(lozo) == 0
    w, b, loss = _quadratic()
    lozo_m = LOZOM([w, b], lr=1e-3, rank=2, nu=5)
    lozo_m.step(loss)
    # N is 16x2 floats; the bias keeps a dense EMA buffer of 12 floats
    assert extra_state_bytes(lozo_m) == (16 * 2 + 12) * 4


def test_lozo_m_reprojects_momentum_when_v_is_resampled() -> None:
    w = nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)))
    opt = LOZOM([w], lr=0.0, eps=1e-3, rank=2, nu=2, beta=0.5, seed=4)
    target = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    closure = lambda: (target * w).sum()  # noqa: E731
    opt.step(closure)
    opt.step(closure)
    n_before = opt.state[w]["lozo_n"].clone()
    opt.step(closure)  # step 2 opens lazy period 1
    d = opt.lowrank
    v0, v1 = d.v_factor(w, 0, 4, 0), d.v_factor(w, 0, 4, 1)
    u = d.u_factor(w, 0, DirectionKey(4, 2, 0))
    g = opt.last_estimate.projected_grads[0]
    expected = 0.5 * (n_before @ (v0.T @ v1) / 5) + 0.5 * g * u
    assert torch.allclose(opt.state[w]["lozo_n"], expected, atol=1e-6)


def test_momentum_and_adam_state_sizes() -> None:
    w, b, loss = _quadratic()
    numel = w.numel() + b.numel()
    mom = build_optimizer("zo_sgd_momentum", [w, b], lr=1e-4)
    mom.step(loss)
    assert extra_state_bytes(mom) == numel * 4
    adam = ZOAdam([w, b], lr=1e-3)
    adam.step(loss)
    assert extra_state_bytes(adam) == 2 * numel * 4
    assert extra_state_bytes(build_optimizer("zo_sign", [w, b], lr=1e-3)) == 0


def test_sparse_magnitude_mask_only_touches_the_smallest_weights() -> None:
    w, b, loss = _quadratic()
    density = 0.25
    dirs = SparseDirections(density=density)
    mask = dirs.magnitude_mask(w)
    assert mask.sum() == round(density * w.numel())
    assert w.detach().abs()[mask].max() <= w.detach().abs()[~mask].min()
    before = w.detach().clone()
    opt = build_optimizer("sparse_zo", [w, b], lr=1e-3, density=density, seed=2)
    opt.step(loss)
    assert torch.equal(w.detach()[~mask], before[~mask])  # untouched bit for bit
    assert not torch.equal(w.detach()[mask], before[mask])
    assert dirs._packed == {} and opt.directions._packed == {}  # the step's masks were freed


def test_sparse_random_mask_is_seeded_and_has_the_requested_density() -> None:
    dirs = SparseDirections(density=0.2, mask="random")
    param = torch.zeros(200, 50)
    key = DirectionKey(1, 3, 0)
    z = dirs.sample(param, 0, key)
    assert torch.equal(z, SparseDirections(density=0.2, mask="random").sample(param, 0, key))
    assert abs(float((z != 0).float().mean()) - 0.2) < 0.02
    assert not torch.equal(z != 0, dirs.sample(param, 0, DirectionKey(1, 4, 0)) != 0)
    with pytest.raises(ValueError, match="density"):
        SparseDirections(density=0.0)
    with pytest.raises(ValueError, match="mask"):
        SparseDirections(mask="topk")


@pytest.mark.parametrize("mask", ["magnitude", "random"])
def test_sparse_step_with_zero_lr_restores_parameters(mask: str) -> None:
    w, b, loss = _quadratic()
    before = [w.detach().clone(), b.detach().clone()]
    opt = build_optimizer("sparse_zo", [w, b], lr=0.0, density=0.3, mask=mask, eps=1e-2)
    for _ in range(3):
        opt.step(loss)
    assert torch.allclose(w, before[0], atol=1e-6) and torch.allclose(b, before[1], atol=1e-6)


def test_conservative_rule_never_accepts_a_higher_loss() -> None:
    w, b, loss = _quadratic()
    # a learning rate at which plain ZO-SGD overshoots on about half of the steps
    opt = ZOSGDCons([w, b], lr=5e-3, eps=1e-3, difference="forward", seed=0)
    choices = []
    with torch.no_grad():
        current = float(loss())
    for _ in range(40):
        opt.step(loss)
        with torch.no_grad():
            new = float(loss())
        assert new <= current + 1e-4
        current = new
        choices.append(opt.last_choice)
    assert choices.count(-1) >= 5 and choices.count(0) >= 5  # it descended and it refused steps


def test_conservative_rule_turns_a_wrong_sign_estimate_around() -> None:
    w, b, loss = _quadratic()
    calls = {"n": 0}
    with torch.no_grad():
        start = float(loss())

    def misleading() -> torch.Tensor:
        # the two estimate forwards see the loss mirrored around L(θ) (a wrong-sign g, as a noisy
        # batch can give, with the right reference level); the two comparison forwards see the true one
        calls["n"] += 1
        return 2 * start - loss() if calls["n"] % 4 in (1, 2) else loss()

    opt = ZOSGDCons([w, b], lr=1e-3, eps=1e-3, seed=0)
    opt.step(misleading)
    with torch.no_grad():
        assert opt.last_choice == 1 and float(loss()) < start


def test_multi_query_averaging_aligns_the_step_with_the_gradient() -> None:
    """More queries per step give a step closer to -grad (cosine averaged over seeds)."""

    def mean_cosine(rule: str, queries: int, **kw) -> float:
        cos = []
        for seed in range(8):
            w, b, loss = _quadratic()
            grad = torch.autograd.grad(loss(), [w])[0]
            before = w.detach().clone()
            opt = build_optimizer(rule, [w, b], lr=1e-4, queries=queries, seed=seed, **kw)
            opt.step(loss)
            cos.append(float(torch.cosine_similarity((before - w.detach()).flatten(), grad.flatten(), dim=0)))
        return sum(cos) / len(cos)

    assert mean_cosine("zo_sgd", 16) > 2 * mean_cosine("zo_sgd", 1)
    assert mean_cosine("lozo", 16, rank=2) > 2 * mean_cosine("lozo", 1, rank=2)


def test_forward_difference_works_for_the_rules() -> None:
    for rule, kw in [("lozo", dict(lr=2e-3)), ("zo_sgd_momentum", dict(lr=3e-4)), ("zo_adam", dict(lr=3e-2))]:
        w, b, loss = _quadratic()
        opt = build_optimizer(rule, [w, b], difference="forward", eps=1e-3, **kw)
        with torch.no_grad():
            start = float(loss())
        for _ in range(100):
            opt.step(loss)
        with torch.no_grad():
            assert float(loss()) < 0.9 * start, rule


def test_hybrid_updates_the_first_order_subset_with_adamw_and_leaves_no_grads() -> None:
    w, b, loss = _quadratic()
    opt = ZOFOHybrid([("w", w), ("b", b)], lr=0.0, fo_params="^b$", fo_lr=0.1)
    assert opt.fo_names == ["b"] and [p for g in opt.param_groups for p in g["params"]] == [w]
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt.step(loss)
    assert torch.allclose(w, w0, atol=1e-6)  # lr=0 on the ZO part: only restored
    # AdamW's first step moves every coordinate by ~fo_lr against the gradient's sign
    assert torch.allclose((b0 - b.detach()).abs(), torch.full_like(b0, 0.1), atol=1e-3)
    assert w.grad is None and b.grad is None and w.requires_grad and b.requires_grad
    # a group flag works too, without names
    w, b, loss = _quadratic()
    opt = ZOFOHybrid([{"params": [w]}, {"params": [b], "fo": True}], lr=1e-3)
    assert opt.fo_parameters() == [b]


def test_hybrid_bad_input_is_explained() -> None:
    w, b, loss = _quadratic()
    with pytest.raises(ValueError, match="needs parameter names"):
        ZOFOHybrid([w, b], fo_params="b")
    with pytest.raises(ValueError, match="no first-order parameters"):
        ZOFOHybrid([("w", w), ("b", b)], fo_params="nothing")
    with pytest.raises(ValueError, match="matched every parameter"):
        ZOFOHybrid([("w", w), ("b", b)], fo_params=".")
    opt = ZOFOHybrid([("w", w), ("b", b)], fo_params="^b$")
    with pytest.raises(TypeError, match="detached loss"):
        opt.step(lambda: loss().detach())


@pytest.mark.parametrize(
    ("rule", "kwargs", "match"),
    [
        ("zo_sgd_momentum", dict(momentum=1.0), "momentum"),
        ("zo_sgd_momentum", dict(dampening=2.0), "dampening"),
        ("zo_adam", dict(betas=(0.9,)), "betas"),
        ("zo_adam", dict(adam_eps=0.0), "adam_eps"),
        ("lozo", dict(rank=0), "rank"),
        ("lozo_m", dict(beta=1.5), "beta"),
        ("sparse_zo", dict(density=1.5), "density"),
        ("zo_fo_hybrid", dict(fo_lr=-1.0), "fo_lr"),
    ],
)
def test_bad_rule_arguments_raise_value_errors(rule: str, kwargs: dict, match: str) -> None:
    w, b, _ = _quadratic()
    with pytest.raises(ValueError, match=match):
        build_optimizer(rule, [("w", w), ("b", b)] if rule == "zo_fo_hybrid" else [w, b], **kwargs)


def test_rules_that_build_their_directions_refuse_another() -> None:
    w, b, _ = _quadratic()
    with pytest.raises(TypeError, match="directions"):
        LOZO([w, b], directions=SparseDirections())


def test_nonfinite_losses_are_skipped_and_restore_for_lozo_m() -> None:
    w, b, loss = _quadratic()
    before = w.detach().clone()
    opt = LOZOM([w, b], lr=1e-3, max_nonfinite=3)
    opt.step(lambda: torch.tensor(math.nan))
    assert torch.allclose(w, before, atol=1e-6) and opt.nonfinite_total == 1
    assert "lozo_n" not in opt.state[w]


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes" / "zo_rules").glob("*.yaml"))


def test_there_is_a_recipe_for_every_rule() -> None:
    names = {p.stem for p in RECIPES}
    assert set(RULES) - {"zo_fo_hybrid"} <= names and {"multi_query", "forward_difference"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_runs_a_few_zo_steps(recipe: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["zobi"])
    import yaml
    from lightning.pytorch.cli import LightningCLI

    from lightning_zobi import ZeroOrder

    cli = LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=None,
        args=[
            "fit",
            "--config",
            str(recipe),
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.num_people=8",
            "--data.init_args.batch_size=4",
        ],
    )
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ZeroOrder))
    (zo,) = callback.zo_optimizers
    expected = yaml.safe_load(recipe.read_text())["trainer"]["callbacks"][0]["init_args"]
    assert isinstance(zo, OPTIMIZERS[expected["optimizer"]])
    assert zo.zo_step == 3 and cli.trainer.global_step == 3
    queries = expected["optimizer_kwargs"]["coordinates"] if expected["optimizer"] == "zo_cge" else expected["queries"]
    assert zo.queries == queries and zo.difference == expected["difference"]
    assert math.isfinite(zo.last_estimate.loss)


def test_hybrid_runs_under_lightning_with_a_graph_loss_source(tmp_path: Path) -> None:
    """An FO group flagged in configure_optimizers + a graph-loss hook: the hybrid trains under Lightning."""
    import lightning.pytorch as pl

    from lightning_zobi import ZeroOrder

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(6, 8)
            self.head = nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return ((self.head(torch.tanh(self.body(x))) - y) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(
                [{"params": self.body.parameters()}, {"params": self.head.parameters(), "fo": True}], lr=1e-3
            )

    class CaptureGraphLoss(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            holder: dict = {}
            step = pl_module.training_step

            def training_step(*args, **kwargs):
                holder["loss"] = step(*args, **kwargs)
                return holder["loss"]

            pl_module.training_step = training_step
            for zo in trainer.callbacks[0].zo_optimizers:
                zo.graph_loss_source = lambda: holder.pop("loss", None)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=gen)
    y = x[:, :1] * 2.0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    torch.manual_seed(0)
    module = Regression()
    head_before = module.head.weight.detach().clone()
    body_before = module.body.weight.detach().clone()
    with torch.no_grad():
        start = float(((module.head(torch.tanh(module.body(x))) - y) ** 2).mean())
    zero_order = ZeroOrder(optimizer="zo_fo_hybrid", lr=1e-3, optimizer_kwargs={"fo_lr": 0.05})
    trainer = pl.Trainer(
        max_steps=30,
        callbacks=[zero_order, CaptureGraphLoss()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    (zo,) = zero_order.zo_optimizers
    assert isinstance(zo, ZOFOHybrid) and zo.fo_parameters() == list(module.head.parameters())
    assert not torch.equal(module.head.weight, head_before) and not torch.equal(
        module.body.weight, body_before
    )
    assert module.head.weight.grad is None
    with torch.no_grad():
        end = float(((module.head(torch.tanh(module.body(x))) - y) ** 2).mean())
    assert end < 0.5 * start


def test_group_hyperparameters_carry_over_unless_passed_explicitly() -> None:
    w, b, _ = _quadratic()
    # groups as the ZeroOrder callback copies them from the module's AdamW (with its betas)
    adam = ZOAdam([{"params": [w], "betas": (0.8, 0.99)}, {"params": [b]}], lr=1e-3)
    assert adam.param_groups[0]["betas"] == (0.8, 0.99) and adam.param_groups[1]["betas"] == (0.9, 0.999)
    adam = build_optimizer("zo_adam", [{"params": [w], "betas": (0.8, 0.99)}], lr=1e-3, betas=[0.5, 0.9])
    assert adam.param_groups[0]["betas"] == (0.5, 0.9)
    mom = build_optimizer("zo_sgd_momentum", [{"params": [w], "momentum": 0.5}, {"params": [b]}], lr=1e-3)
    assert [g["momentum"] for g in mom.param_groups] == [0.5, 0.9]
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer("zo_sgd_momentum", [{"params": [w], "momentum": 1.0}], lr=1e-3)


# ---------------------------------------------------------------- parity with the reference code
# Each test transcribes the reference's update on fixed inputs: θ, the projected gradient g and the
# direction are taken from our step, the reference formula is applied to them, and the parameters
# must agree.


def _linear_problem(shape=(6, 5)):
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64))
    b = nn.Parameter(torch.randn(shape[0], generator=gen, dtype=torch.float64))
    target = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return w, b, lambda: (target * w).sum() + (w**2).sum() * 0.1 + b.pow(2).sum()


def test_lozo_matches_the_reference_update() -> None:
    """LOZO code (lowrank_zo_update): θ ← θ − lr·(g·U Vᵀ + wd·θ), no division by the rank."""
    w, b, closure = _linear_problem()
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = LOZO([w, b], lr=1e-2, eps=1e-3, weight_decay=0.1, rank=3, nu=4, seed=2)
    opt.step(closure)
    g = opt.last_estimate.projected_grads[0]
    key = opt.last_estimate.keys[0]
    u, v = opt.lowrank.factors(w0, 0, key)
    z_b = opt.lowrank.sample(b0, 1, key)
    assert torch.allclose(w.detach(), w0 - 1e-2 * (g * (u @ v.T) + 0.1 * w0), atol=1e-12)
    assert torch.allclose(b.detach(), b0 - 1e-2 * (g * z_b + 0.1 * b0), atol=1e-12)


def test_lozo_m_starts_its_momentum_at_the_first_estimate_as_the_reference() -> None:
    """LOZO code (lowrank_zo_update_momentum): N₀ = g·U, then N ← βN + (1−β)g·U; θ ← θ − lr·N Vᵀ."""
    w, b, closure = _linear_problem()
    opt = LOZOM([w, b], lr=1e-2, eps=1e-3, rank=2, nu=10, beta=0.9, seed=3)
    d = opt.lowrank
    n_ref, m_ref = None, None
    for step in range(3):
        w0, b0 = w.detach().clone(), b.detach().clone()
        opt.step(closure)
        g = opt.last_estimate.projected_grads[0]
        key = opt.last_estimate.keys[0]
        u = d.u_factor(w0, 0, key)
        v = d.v_factor(w0, 0, 3, 0)
        z_b = d.sample(b0, 1, key)
        n_ref = g * u if n_ref is None else 0.9 * n_ref + 0.1 * g * u
        m_ref = g * z_b if m_ref is None else 0.9 * m_ref + 0.1 * g * z_b
        assert torch.allclose(opt.state[w]["lozo_n"], n_ref, atol=1e-12), step
        assert torch.allclose(w.detach(), w0 - 1e-2 * n_ref @ v.T, atol=1e-12), step
        assert torch.allclose(b.detach(), b0 - 1e-2 * m_ref, atol=1e-12), step


@pytest.mark.parametrize("variant", ["direction", "coordinate"])
def test_zo_sign_variants_match_their_references(variant: str) -> None:
    """ZO-Bench's zo_sign_opt: θ ← θ − lr·sign(g)·z; Liu et al.: θ ← θ − lr·sign(g·z)."""
    w, b, closure = _linear_problem()
    w0 = w.detach().clone()
    opt = ZOSign([w, b], lr=1e-2, eps=1e-3, seed=5, variant=variant)
    opt.step(closure)
    g = opt.last_estimate.projected_grads[0]
    z = opt.directions.sample(w0, 0, opt.last_estimate.keys[0])
    expected = w0 - 1e-2 * (math.copysign(1.0, g) * z if variant == "direction" else torch.sign(g * z))
    assert torch.allclose(w.detach(), expected, atol=1e-12)
    with pytest.raises(ValueError, match="variant='diagonal'.*direction"):
        ZOSign([w], variant="diagonal")


def test_zo_sgd_cons_compares_against_a_true_forward_at_theta() -> None:
    """ZO-Bench's zo_conserv_step: loss0 = L(θ) from its own forward; the mean of L± only as an option."""
    seen = []
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def closure() -> torch.Tensor:
        seen.append(w.detach().clone())
        return (w - 1.0).pow(2).sum()

    opt = ZOSGDCons([w], lr=1e-2, eps=1e-3, seed=0)
    opt.step(closure)
    assert len(seen) == 5 and any(torch.equal(x, torch.zeros(3, dtype=torch.float64)) for x in seen[2:])
    seen.clear()
    cheap = ZOSGDCons([nn.Parameter(torch.zeros(3, dtype=torch.float64))], lr=1e-2, reference="mean")
    cheap.step(lambda: torch.zeros((), dtype=torch.float64))
    with pytest.raises(ValueError, match="reference='median'"):
        ZOSGDCons([w], reference="median")


def test_zo_sgd_cons_with_a_true_reference_rejects_the_uphill_move_the_mean_accepts() -> None:
    """High dimension, large ε: mean(L±) = L(θ) + ε²·tr(H)/2 sits above L(θ) and lets an uphill step in."""
    d = 20000
    gen = torch.Generator().manual_seed(0)
    h = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    x0 = torch.randn(d, generator=gen, dtype=torch.float64) * 0.01
    results = {}
    for reference in ("forward", "mean"):
        x = nn.Parameter(x0.clone())
        loss = lambda x=x: 0.5 * (h * x * x).sum()  # noqa: E731
        start = float(loss())
        opt = ZOSGDCons([x], lr=5e-4, eps=1e-2, seed=1, reference=reference)
        for _ in range(5):
            opt.step(loss)
        results[reference] = float(loss()) - start
    assert results["forward"] <= 0.0
    assert results["mean"] > results["forward"]
