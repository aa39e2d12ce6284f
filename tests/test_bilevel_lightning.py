"""The Bilevel callback end to end: Lightning fit, logging, schedulers, checkpoint resume, ZOFO on LoRA."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import PlainRegression, quiet_trainer, regression_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from test_bilevel_solvers import CoupledQuadratic
from torch.utils.data import DataLoader, TensorDataset

from lightning_zobi.lightning.callbacks.bilevel import Bilevel

GAMMA = 50.0


class QuadraticModule(pl.LightningModule):
    """A LightningModule that opts in with upper_loss/lower_loss (the batch is ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = CoupledQuadratic(coupling=1.0)

    def upper_loss(self, batch):
        return self.q.upper_loss(batch)

    def lower_loss(self, batch):
        return self.q.lower_loss(batch)

    def training_step(self, batch, batch_idx):  # never called while Bilevel drives the fit
        raise AssertionError("Bilevel must not call the module's training_step when upper/lower losses exist")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5 / GAMMA, momentum=0.9)


def dummy_loader(n: int = 400) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=1)


def penalty_callback(inner_optimizer: str = "sgd") -> Bilevel:
    return Bilevel(
        solver="penalty",
        gamma=GAMMA,
        gamma_schedule="linear",
        gamma_init=5.0,
        gamma_ramp_steps=100,
        inner_steps=5,
        inner_lr=0.8 if inner_optimizer == "sgd" else 0.05,
        inner_optimizer=inner_optimizer,
        upper_params=r"q\.x$",
        lower_params=r"q\.y$",
    )


def test_penalty_fit_reaches_closed_form_and_logs() -> None:
    module = QuadraticModule()
    callback = penalty_callback()
    trainer = quiet_trainer(max_steps=400, callbacks=[callback])
    trainer.fit(module, dummy_loader())
    x_pen, _ = module.q.penalty_solution(GAMMA, value_function=True)
    x_star, _ = module.q.bilevel_solution()
    assert (module.q.x.detach() - x_pen).norm() < 1e-5
    assert (module.q.x.detach() - x_star).norm() < 2.0 / GAMMA
    metrics = trainer.callback_metrics
    for key in ("f", "g", "gap", "gamma", "objective"):
        assert f"bilevel/{key}" in metrics
    assert float(metrics["bilevel/gamma"]) == pytest.approx(GAMMA)
    assert 0.0 <= float(metrics["bilevel/gap"]) < 1e-2
    # the fit is over: the module's own training_step and optimizer are back
    assert "training_step" not in vars(module)
    assert type(trainer.strategy.optimizers[0]) is torch.optim.SGD


def zofo_callback() -> Bilevel:
    return Bilevel(
        solver="zofo",
        gamma=10.0,
        inner_steps=2,
        inner_lr=0.9,
        zo_lr=0.02,
        seed=3,
        upper_params=r"q\.x$",
        lower_params=r"q\.y$",
    )


RESUMABLE = {
    "penalty_sgd": lambda: penalty_callback("sgd"),
    "penalty_adam": lambda: penalty_callback("adam"),
    "zofo": zofo_callback,
}


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_resume_is_exact(tmp_path, name: str) -> None:
    """100 steps + resume to 200 == 200 straight: z (and its Adam state), γ position, momentum and the
    ZO seed/step all come back from the checkpoint."""
    make = RESUMABLE[name]
    straight = QuadraticModule()
    quiet_trainer(max_steps=200, callbacks=[make()]).fit(straight, dummy_loader())

    first = QuadraticModule()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=50, save_top_k=-1)
    trainer = quiet_trainer(max_steps=100, callbacks=[make(), ckpt], enable_checkpointing=True)
    trainer.fit(first, dummy_loader())
    assert not torch.equal(first.q.x, straight.q.x)
    resumed = QuadraticModule()
    callback = make()
    trainer = quiet_trainer(max_steps=200, callbacks=[callback], enable_checkpointing=False)
    trainer.fit(resumed, dummy_loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert callback.solver is not None and callback.solver.step_count == 200
    assert torch.equal(resumed.q.x, straight.q.x) and torch.equal(resumed.q.y, straight.q.y)


def test_bf16_mixed_precision_runs() -> None:
    """Under bf16-mixed the solver step runs inside Lightning's autocast context and still learns."""
    torch.manual_seed(0)
    module = PlainRegression(lr=0.05, with_scheduler=False)
    callback = Bilevel(solver="penalty", gamma=1.0, inner_lr=0.05, split_batch=True)
    trainer = quiet_trainer(max_steps=15, precision="bf16-mixed", callbacks=[callback])
    trainer.fit(module, regression_loader(batch_size=32))
    assert module.losses[-1] < module.losses[0]
    assert torch.isfinite(torch.tensor(list(callback.last_logs.values()))).all()


def test_split_batch_on_an_unchanged_module_keeps_its_scheduler() -> None:
    """vf_free on a plain single-loss module: f and g on two halves of each batch; StepLR still decays."""
    torch.manual_seed(0)
    module = PlainRegression(lr=0.05)
    callback = Bilevel(solver="vf_free", gamma=1.0, split_batch=True)
    trainer = quiet_trainer(max_steps=20, callbacks=[callback])
    trainer.fit(module, regression_loader(batch_size=32))
    assert len(module.losses) == 40  # the module's training_step ran once per half per step
    assert module.losses[-1] < module.losses[0] and module.losses[-2] < module.losses[1]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        0.05 * 0.5**4
    )  # StepLR(5, 0.5) at step 20
    assert callback.last_logs["f"] != callback.last_logs["g"]


class DictModule(pl.LightningModule):
    """Opts in through training_step returning {"upper", "lower"}: a 1-D simple bilevel problem."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([2.0, -1.0]))

    def training_step(self, batch, batch_idx):
        # g = ½(w₀ + w₁ − 1)² has a line of minimizers; f = ½‖w‖² picks (½, ½).
        return {"upper": 0.5 * self.w.pow(2).sum(), "lower": 0.5 * (self.w.sum() - 1).pow(2)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def test_dict_training_step_simple_bilevel() -> None:
    module = DictModule()
    trainer = quiet_trainer(max_steps=300, callbacks=[Bilevel(solver="penalty", gamma=20.0, inner_lr=0.5)])
    trainer.fit(module, dummy_loader(300))
    # stationary point of f + γ g: w₀ = w₁ = γ / (1 + 2γ), O(1/γ) from the bilevel (½, ½)
    assert torch.allclose(module.w.detach(), torch.full((2,), 20.0 / 41.0), atol=1e-3)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="solver='bogus'"):
        Bilevel(solver="bogus")
    with pytest.raises(ValueError, match="gamma_schedule"):
        Bilevel(gamma_schedule="cosine")
    module = QuadraticModule()
    with pytest.raises(ValueError, match="accumulate"):
        quiet_trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[Bilevel()]).fit(
            module, dummy_loader(4)
        )
    with pytest.raises(ValueError, match="disjoint"):
        quiet_trainer(
            max_steps=2, callbacks=[Bilevel(solver="zofo", upper_params="q", lower_params="q")]
        ).fit(QuadraticModule(), dummy_loader(4))


def test_zofo_callback_on_causal_lm_with_lora() -> None:
    """ZOFO through Lightning on the package's CausalLMModule (tiny Llama + LoRA), two halves of a batch."""
    from lightning_zobi.lightning.modules.causal_lm import CausalLMModule

    module = CausalLMModule(model="tiny-llama", lora_r=4, lr=1e-2)
    base = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}
    ids = (torch.arange(4)[:, None] * 5 + torch.arange(8)[None, :]) % 200 + 3
    batches = [{"input_ids": ids, "labels": ids}] * 2
    callback = Bilevel(solver="zofo", gamma=1.0, inner_steps=1, inner_lr=1.0, zo_lr=1e-4, split_batch=True)
    trainer = quiet_trainer(max_steps=2, callbacks=[callback])
    trainer.fit(module, DataLoader(batches, batch_size=None))
    after = dict(module.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in base.items())  # ZO moved the base weights
    assert all(after[n].grad is None for n in base)
    assert any(not torch.equal(after[n], v) for n, v in lora.items())  # first order moved the adapter
    assert "bilevel/gap" in trainer.callback_metrics
    assert callback.solver is not None and callback.solver.zo.zo_step == 2
