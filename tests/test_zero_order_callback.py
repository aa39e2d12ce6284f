"""The ZeroOrder callback on modules written without any knowledge of lightning_zobi."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import PlainRegression, quiet_trainer, regression_loader
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_zobi import ZeroOrder
from lightning_zobi.zo import ZOSGD, NonFiniteLossError


def _fit(module, callbacks, max_steps=20, **trainer_kwargs):
    trainer = quiet_trainer(max_steps=max_steps, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, regression_loader(), regression_loader(n=64))
    return trainer


def test_forward_only_fit_on_a_foreign_module_reduces_loss(plain_module):
    backward_calls = []
    plain_module.net.register_full_backward_hook(lambda *a: backward_calls.append(1))
    trainer = _fit(plain_module, [ZeroOrder(lr=0.05, eps=1e-3, queries=2, seed=1)], max_steps=120)
    assert isinstance(trainer.optimizers[0], ZOSGD)
    first, last = sum(plain_module.losses[:16]) / 16, sum(plain_module.losses[-16:]) / 16
    assert last < 0.7 * first
    # forward-only: no backward ran, no graph was recorded, no .grad allocated
    assert backward_calls == []
    assert not any(plain_module.loss_requires_grad)
    assert all(p.grad is None for p in plain_module.parameters())
    assert all(p.requires_grad for p in plain_module.parameters())  # flags restored after each step
    # two closure evaluations (L+ and L-) per query per step
    assert len(plain_module.losses) == 120 * 2 * 2
    assert "train_loss" in trainer.callback_metrics and "val_loss" in trainer.callback_metrics


def test_param_groups_lr_and_scheduler_carry_over(plain_module):
    zo = ZeroOrder(eps=1e-3)  # lr=None keeps the module's rate
    trainer = _fit(plain_module, [zo], max_steps=12)
    opt = trainer.optimizers[0]
    assert isinstance(opt, ZOSGD)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.optimizer is opt
    # StepLR(step_size=5, gamma=0.5) stepped 12 times from the module's lr 0.05
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)


def test_lr_override_rescales_schedule(plain_module):
    trainer = _fit(plain_module, [ZeroOrder(lr=1e-3)], max_steps=6)
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5)
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [1e-3]


def test_checkpoint_resume_continues_exactly(tmp_path):
    def module():
        torch.manual_seed(0)
        return PlainRegression(with_scheduler=True)

    full = module()
    _fit(full, [ZeroOrder(lr=0.02, seed=3)], max_steps=16)

    first = module()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=8)
    _fit(first, [ZeroOrder(lr=0.02, seed=3), ckpt], max_steps=8, enable_checkpointing=True)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert state["optimizer_states"][0]["zo"] == {**state["optimizer_states"][0]["zo"], "seed": 3, "step": 8}

    resumed = module()
    trainer = quiet_trainer(max_steps=16, callbacks=[ZeroOrder(lr=0.02, seed=3)])
    trainer.fit(resumed, regression_loader(), regression_loader(n=64), ckpt_path=tmp_path / "last.ckpt")
    assert trainer.optimizers[0].zo_step == 16
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bf16_mixed_precision_runs(plain_module):
    trainer = _fit(plain_module, [ZeroOrder(lr=0.02)], max_steps=5, precision="bf16-mixed")
    assert trainer.optimizers[0].zo_step == 5


def test_fp16_gradscaler_is_refused_with_a_fix(plain_module):
    # on CPU Lightning silently turns 16-mixed into bf16-mixed, so check the set-up hook directly
    trainer = SimpleNamespace(precision="16-mixed", accumulate_grad_batches=1, strategy=None, gradient_clip_val=None)
    with pytest.raises(ValueError, match="bf16-mixed"):
        ZeroOrder().setup(trainer, plain_module, "fit")


def test_gradient_accumulation_is_refused(plain_module):
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        _fit(plain_module, [ZeroOrder()], max_steps=2, accumulate_grad_batches=2)


def test_training_step_without_loss_is_a_clear_error(plain_module):
    plain_module.training_step = lambda batch, batch_idx: None
    with pytest.raises(ValueError, match="returned no loss"):
        _fit(plain_module, [ZeroOrder()], max_steps=2)


def test_non_finite_losses_stop_the_run_with_a_fix(plain_module):
    plain_module.training_step = lambda batch, batch_idx: torch.tensor(float("nan"))
    with pytest.raises(NonFiniteLossError, match="smaller learning rate"):
        _fit(plain_module, [ZeroOrder(max_nonfinite=2)], max_steps=5)


def test_no_trainable_parameters_is_a_clear_error(plain_module):
    plain_module.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        _fit(plain_module, [ZeroOrder()], max_steps=2)


def test_params_regex_trains_only_the_selected_subset(plain_module):
    frozen = plain_module.net[0].weight.detach().clone()
    trainer = _fit(plain_module, [ZeroOrder(lr=0.05, params=r"net\.2\.")], max_steps=5)
    assert torch.equal(plain_module.net[0].weight, frozen)
    assert len(trainer.optimizers[0].param_groups[0]["params"]) == 2


def test_unknown_rule_and_bad_eps_are_refused():
    with pytest.raises(ValueError, match="not a known ZO rule"):
        ZeroOrder(optimizer="zo_nonsense")
    with pytest.raises(ValueError, match="eps=0"):
        ZeroOrder(eps=0)


def test_zo_fo_hybrid_through_the_callback_trains_the_head_first_order(plain_module):
    """FO AdamW on the head (picked by a name regex), ZO on the rest, from one callback line."""
    body, head = plain_module.net[0].weight.detach().clone(), plain_module.net[2].weight.detach().clone()
    callback = ZeroOrder(
        lr=0.02, optimizer="zo_fo_hybrid", optimizer_kwargs={"fo_params": r"net\.2\.", "fo_lr": 0.05}
    )
    trainer = _fit(plain_module, [callback], max_steps=60)
    opt = trainer.optimizers[0]
    assert opt.fo_names == ["net.2.weight", "net.2.bias"]
    assert opt.last_fo_loss is not None
    assert not torch.equal(plain_module.net[0].weight, body) and not torch.equal(
        plain_module.net[2].weight, head
    )
    first, last = sum(plain_module.losses[:12]) / 12, sum(plain_module.losses[-12:]) / 12
    assert last < 0.7 * first
    assert plain_module.training_step.__func__ is PlainRegression.training_step  # unwrapped after fit


def test_lozo_through_the_callback_on_the_fused_path():
    """``optimizer_kwargs={"fused": True}`` builds FusedLOZO (Triton's interpreter on CPU) and it trains."""
    pytest.importorskip("triton")
    from lightning_zobi.zo.fused import FusedLOZO

    torch.manual_seed(0)
    module = PlainRegression(with_scheduler=False)
    zo = ZeroOrder(
        optimizer="lozo", lr=0.01, eps=1e-3, seed=1, optimizer_kwargs={"fused": True, "rank": 2, "nu": 5}
    )
    trainer = _fit(module, [zo], max_steps=40)
    opt = trainer.optimizers[0]
    assert isinstance(opt, FusedLOZO) and opt.zo_step == 40
    first, last = sum(module.losses[:16]) / 16, sum(module.losses[-16:]) / 16
    assert last < 0.8 * first, (first, last)
