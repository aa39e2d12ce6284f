"""ScaleBiO data reweighting (arXiv 2406.19976): a corrupted source's weight falls; a clean control's does not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_zobi.bilevel.reweighting import DataReweighting, SourceWeights, project_simplex


def _run(
    seed: int, noise: float, lower: str = "first_order", parametrization: str = "softmax", steps: int = 150
):
    gen = torch.Generator().manual_seed(seed)
    dim = 10
    w_true = torch.randn(dim, 3, generator=gen)

    def make(n: int, flip: float):
        x = torch.randn(n, dim, generator=gen)
        y = (x @ w_true).argmax(1)
        if flip:
            m = torch.rand(n, generator=gen) < flip
            y[m] = torch.randint(0, 3, (int(m.sum()),), generator=gen)
        return x, y

    data = {"clean": make(200, 0.0), "noisy": make(200, noise), "val": make(100, 0.0)}
    torch.manual_seed(seed)
    net = nn.Linear(dim, 3)

    def loss(batch, source):
        x, y = batch
        return nn.functional.cross_entropy(net(x), y)

    opt = torch.optim.Adam(net.parameters(), lr=0.05) if lower == "first_order" else None
    solver = DataReweighting(
        ["clean", "noisy"],
        loss,
        list(net.parameters()),
        opt,
        gamma=5.0,
        weight_lr=0.5,
        inner_optimizer="adam",
        inner_lr=0.05,
        lower=lower,
        zo_lr=0.02,
        eps=1e-3,
        queries=4,
        parametrization=parametrization,
    )
    for _ in range(steps):
        idx = torch.randint(0, 200, (32,), generator=gen)
        vidx = torch.randint(0, 100, (32,), generator=gen)
        batch = {k: (v[0][idx], v[1][idx]) for k, v in data.items() if k != "val"}
        batch["val"] = (data["val"][0][vidx], data["val"][1][vidx])
        logs = solver.step(batch)
    return logs, solver


@pytest.mark.parametrize("parametrization", ["softmax", "simplex"])
def test_first_order_lower_level_drives_the_corrupted_source_down(parametrization):
    noisy = [_run(s, 0.8, parametrization=parametrization)[0]["weight/noisy"] for s in range(3)]
    control = [_run(s, 0.0, parametrization=parametrization)[0]["weight/noisy"] for s in range(3)]
    assert max(noisy) < 0.25, noisy  # started at 0.5
    assert all(0.4 < c < 0.7 for c in control), control  # two clean sources: no reason to move far


def test_zo_lower_level_drives_the_corrupted_source_down():
    noisy = [_run(s, 0.8, lower="zo")[0]["weight/noisy"] for s in range(3)]
    control = [_run(s, 0.0, lower="zo")[0]["weight/noisy"] for s in range(3)]
    assert sum(noisy) / 3 < 0.4 and max(noisy) < 0.45, noisy
    assert sum(control) / 3 > 0.45, control


def test_state_round_trip_and_logs():
    logs, solver = _run(0, 0.8, steps=5)
    assert {"f", "g", "gap", "weight/clean", "weight/noisy", "loss/noisy", "gap/clean"} <= set(logs)
    assert logs["weight/clean"] + logs["weight/noisy"] == pytest.approx(1.0)
    state = solver.state_dict()
    _, other = _run(1, 0.0, steps=1)
    other.load_state_dict(state)
    assert other.weights.as_dict() == pytest.approx(solver.weights.as_dict())
    assert other.step_count == 5


def test_simplex_projection_and_softmax_step():
    p = project_simplex(torch.tensor([0.8, 0.6, -0.3], dtype=torch.float64))
    assert float(p.sum()) == pytest.approx(1.0) and float(p.min()) >= 0
    assert p.tolist() == pytest.approx([0.6, 0.4, 0.0])
    w = SourceWeights(["a", "b"], "softmax", lr=1.0)
    w.step(torch.tensor([1.0, -1.0]))
    assert w.as_dict()["a"] < 0.5 < w.as_dict()["b"]


def test_bad_arguments():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="sources"):
        SourceWeights(["only"])
    with pytest.raises(ValueError, match="parametrization"):
        SourceWeights(["a", "b"], "exp")
    with pytest.raises(ValueError, match="upper_key"):
        DataReweighting(["a", "val"], lambda b, s: p.sum(), [p], torch.optim.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match="optimizer"):
        DataReweighting(["a", "b"], lambda b, s: p.sum(), [p])


def _fit_recipe(tmp_path, *overrides: str):
    from lightning.pytorch.cli import LightningCLI

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "bilevel" / "reweight_noisy.yaml"
    cli = LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        auto_configure_optimizers=False,
        save_config_callback=None,
        args=[
            "--config",
            str(recipe),
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_model_summary=false",
            "--trainer.max_steps=60",
            "--trainer.val_check_interval=60",
            f"--trainer.default_root_dir={tmp_path}",
            *overrides,
        ],
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    (cb,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "Reweighting"]
    return cb.weights


def test_reweight_noisy_recipe_drives_the_corrupted_source_down(tmp_path):
    corrupted = _fit_recipe(tmp_path)
    control = _fit_recipe(tmp_path, "--data.init_args.noise.noisy=0.0")  # both sources clean
    assert corrupted["noisy"] < 0.25, corrupted
    assert 0.35 < control["noisy"] < 0.65, control
