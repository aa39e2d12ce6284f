"""ZeroOrder through Lightning on CUDA: the fused Triton path, bf16-mixed, validation and a checkpoint."""

from __future__ import annotations

import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_zobi import ZeroOrder
from lightning_zobi.lightning.datamodules.facts import FactsDataModule
from lightning_zobi.lightning.modules.causal_lm import CausalLMModule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fused_zero_order_fit_on_cuda_keeps_checkpoints_unperturbed(tmp_path):
    from lightning_zobi.zo.fused import FusedZOSGD

    dm = FactsDataModule(num_people=20, batch_size=16, max_length=64)
    module = CausalLMModule(model="tiny-llama")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=50)
    trainer = quiet_trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=200,
        val_check_interval=50,
        check_val_every_n_epoch=None,
        enable_checkpointing=True,
        callbacks=[ZeroOrder(lr=1e-3, eps=1e-3, seed=0), ckpt],
    )
    trainer.fit(module, dm)
    opt = trainer.optimizers[0]
    assert isinstance(opt, FusedZOSGD)
    assert not opt.perturbed  # unguarded on fit end: clean weights
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for name, tensor in module.state_dict().items():
        assert torch.equal(saved[name], tensor.cpu()), f"{name}: the checkpoint holds perturbed weights"
    assert float(trainer.callback_metrics["val_loss"]) < 5.3  # ln 259 = 5.56 at random init
    assert all(p.grad is None for p in module.parameters())
