"""ZO on a tiny transformers causal LM: full-parameter and peft LoRA, through the callback."""

from __future__ import annotations

import pytest
import torch
from conftest import quiet_trainer

from lightning_zobi import ZeroOrder
from lightning_zobi.lightning.datamodules.facts import FactsDataModule
from lightning_zobi.lightning.modules.causal_lm import CausalLMModule, build_causal_lm


def _val_loss(module, dm) -> float:
    module.eval()
    with torch.no_grad():
        losses = [float(module.model(**b).loss) for b in dm.val_dataloader()]
    return sum(losses) / len(losses)


def test_zo_fine_tuning_lowers_the_lm_loss():
    dm = FactsDataModule(num_people=20, batch_size=16, max_length=64)
    module = CausalLMModule(model="tiny-llama")
    start = _val_loss(module, dm)
    quiet_trainer(max_steps=150, callbacks=[ZeroOrder(lr=1e-3, eps=1e-3, seed=0)], limit_val_batches=0).fit(
        module, dm
    )
    assert _val_loss(module, dm) < start - 0.3


def test_peft_lora_trains_only_the_adapter():
    dm = FactsDataModule(num_people=10, batch_size=8, max_length=48)
    module = CausalLMModule(model="tiny-llama", lora_r=4, lr=1e-2)
    named = dict(module.named_parameters())
    lora = {n for n, p in named.items() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    before = {n: p.detach().clone() for n, p in named.items()}
    trainer = quiet_trainer(
        max_steps=10, callbacks=[ZeroOrder(lr=1e-2, params="trainable")], limit_val_batches=0
    )
    trainer.fit(module, dm)
    trained = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert trained == {id(named[n]) for n in lora}
    for n, p in module.named_parameters():
        if n in lora:
            continue
        assert torch.equal(p, before[n]), f"frozen base parameter {n} changed"
    assert any(not torch.equal(named[n], before[n]) for n in lora)
    assert all(p.grad is None for p in module.parameters())


def test_opt_config_and_bad_model_path():
    assert build_causal_lm("tiny-opt").config.model_type == "opt"
    with pytest.raises(ValueError, match="existing local directory"):
        build_causal_lm("/no/such/checkpoint")
    with pytest.raises(ValueError, match="model_type"):
        build_causal_lm({"hidden_size": 8})
