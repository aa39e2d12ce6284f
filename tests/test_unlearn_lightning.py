"""UnlearningModule / UnlearningDataModule: stages through init_from, FO and ZO unlearning, bilevel losses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.utilities import CombinedLoader

from lightning_zobi.lightning.callbacks.zero_order import ZeroOrder
from lightning_zobi.lightning.checkpoint_io import export_safetensors
from lightning_zobi.lightning.datamodules.unlearning import UnlearningDataModule
from lightning_zobi.lightning.modules.causal_lm import CausalLMModule
from lightning_zobi.lightning.modules.unlearning import UnlearningModule
from lightning_zobi.unlearn.llm import mean_nll, sequence_logprobs

PEOPLE = 10
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (two threads on busy shared cores are ~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dm() -> UnlearningDataModule:
    return UnlearningDataModule(num_people=PEOPLE, forget_batch_size=4, retain_batch_size=4, max_length=48)


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> str:
    """A 'learn_facts' stage in miniature: a tiny Llama's weights saved as a Lightning-style checkpoint."""
    module = CausalLMModule("tiny-llama", seed=3)
    path = tmp_path_factory.mktemp("stage") / "learned.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


SEED = 0


def forget_nll(module: UnlearningModule, dm: UnlearningDataModule) -> float:
    """Mean NLL of the forget answers of one fixed batch (the same one before and after training)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        batch = next(iter(dm.train_dataloader()))[0]["forget"]
    with torch.no_grad():
        return mean_nll(*sequence_logprobs(module.model, batch)).item()


def test_datamodule_combined_batches_and_eval_loaders(dm):
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    batch, _, _ = next(iter(loader))
    assert set(batch) == {"forget", "retain"}
    assert {"input_ids", "labels", "idk_input_ids", "idk_labels"} <= set(batch["forget"])
    assert batch["forget"]["input_ids"].shape == (4, 48) and batch["retain"]["input_ids"].shape == (4, 48)
    loaders = dm.val_dataloader()
    assert [next(iter(ld))["split"][0] for ld in loaders] == ["forget", "retain", "holdout"]
    assert sum(len(ld.dataset) for ld in loaders) == PEOPLE * 4
    with pytest.raises(ValueError, match="mode="):
        UnlearningDataModule(num_people=PEOPLE, mode="zip")
    with pytest.raises(ValueError, match="forget_batch_size"):
        UnlearningDataModule(num_people=PEOPLE, forget_batch_size=0)


def test_init_from_checkpoint_and_safetensors_and_frozen_reference(learned, tmp_path):
    module = UnlearningModule("tiny-llama", objective="npo", init_from=learned)
    saved = torch.load(learned, weights_only=True)["state_dict"]
    assert torch.equal(
        module.model.model.layers[0].mlp.up_proj.weight, saved["model.model.layers.0.mlp.up_proj.weight"]
    )
    ref = module.reference
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    assert not any(k.startswith("_reference") for k in module.state_dict())  # not saved with the module
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), module.model.parameters(), strict=True))
    path = export_safetensors(module.model, tmp_path / "w.safetensors")
    again = UnlearningModule("tiny-llama", objective="grad_diff", init_from=str(path))
    assert again.reference is None  # GradDiff needs no reference model
    assert all(
        torch.equal(a, b) for a, b in zip(again.model.parameters(), module.model.parameters(), strict=True)
    )
    rmu = UnlearningModule("tiny-llama", objective="rmu", trainable=r"layers\.0\.mlp", init_from=learned)
    trainable = [n for n, p in rmu.model.named_parameters() if p.requires_grad]
    assert trainable and all("layers.0.mlp" in n for n in trainable)
    with pytest.raises(ValueError, match="objective="):
        UnlearningModule("tiny-llama", objective="forgetting")
    with pytest.raises(ValueError, match="trainable="):
        UnlearningModule("tiny-llama", trainable="nothing_matches_this")


def test_first_order_unlearning_and_validation_metrics(learned, dm):
    module = UnlearningModule(
        "tiny-llama",
        objective="grad_diff",
        lr=1e-2,
        init_from=learned,
        retain_model_from=learned,
        max_new_tokens=4,
    )
    before = forget_nll(module, dm)
    trainer = quiet_trainer(max_steps=8, val_check_interval=8, check_val_every_n_epoch=None)
    torch.manual_seed(SEED)  # the batch order, whatever tests ran before
    trainer.fit(module, dm)
    assert forget_nll(module, dm) > before + 0.1
    logged = trainer.callback_metrics
    for key in ("val/forget/em", "val/retain/em", "val/model_utility", "val/mia_auc", "val/forget_quality"):
        assert key in logged, key
    assert 0.0 <= float(logged["val/forget_quality"]) <= 1.0
    with pytest.raises(TypeError, match="forget"):
        module.training_step({"retain": {}}, 0)


def test_zeroth_order_unlearning_is_forward_only(learned, dm):
    module = UnlearningModule("tiny-llama", objective="ga", retain_loss="none", lr=1e-3, init_from=learned)
    before = forget_nll(module, dm)
    trainer = quiet_trainer(
        max_steps=30, limit_val_batches=0, callbacks=[ZeroOrder(lr=3e-3, eps=1e-3, seed=0)]
    )
    trainer.fit(module, dm)
    assert all(p.grad is None for p in module.parameters())
    assert forget_nll(module, dm) > before + 0.05


def test_npo_with_lora_uses_the_adapter_disabled_base_as_reference(learned, dm):
    module = UnlearningModule("tiny-llama", objective="npo", lora_r=4, init_from=learned)
    batch = next(iter(dm.train_dataloader()))[0]
    # LoRA starts as the identity, so the model equals its reference: NPO = (2/β) log 2.
    assert module.upper_loss(batch).item() == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)
    assert module.lower_loss(batch).item() == pytest.approx(
        mean_nll(*sequence_logprobs(module.model, batch["retain"])).item()
    )
    quiet_trainer(max_steps=3, limit_val_batches=0).fit(module, dm)
    assert module.upper_loss(batch).item() < 2 / 0.1 * math.log(2)


def test_bilevel_callback_drives_upper_and_lower_losses(learned, dm):
    bilevel = pytest.importorskip("lightning_zobi.lightning.callbacks.bilevel")
    module = UnlearningModule("tiny-llama", objective="npo", lr=1e-2, init_from=learned)
    before = forget_nll(module, dm)
    callback = bilevel.Bilevel(solver="penalty", gamma=1.0, inner_steps=1, inner_lr=1e-2)
    quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[callback]).fit(module, dm)
    assert forget_nll(module, dm) > before


def _recipe(name: str, tmp_path, **model_args) -> str:
    """A copy of ``recipes/llm/<name>.yaml`` writing under ``tmp_path``, with a few steps and fewer people."""
    import yaml

    config = yaml.safe_load((ROOT / "recipes" / "llm" / f"{name}.yaml").read_text())
    out = tmp_path / name
    config["model"]["init_args"].update(model_args)
    config["data"]["init_args"]["num_people"] = PEOPLE
    trainer = config["trainer"]
    trainer.update(default_root_dir=str(out), max_steps=2, enable_progress_bar=False, logger=False)
    if "val_check_interval" in trainer:
        trainer["val_check_interval"] = 2
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(out)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_recipe_chain_passes_checkpoints_between_stages(tmp_path):
    """learn_facts -> retain_only -> unlearn_npo_zo, through the zobi CLI, as the README runs them."""
    from lightning_zobi.cli import main

    main(["fit", "--config", _recipe("learn_facts", tmp_path)])
    main(["fit", "--config", _recipe("retain_only", tmp_path)])
    learned, retain = tmp_path / "learn_facts" / "learned.ckpt", tmp_path / "retain_only" / "retain_only.ckpt"
    assert learned.exists() and retain.exists()
    config = _recipe(
        "unlearn_npo_zo", tmp_path, init_from=str(learned), retain_model_from=str(retain), max_new_tokens=4
    )
    main(["fit", "--config", config])
    unlearned = tmp_path / "unlearn_npo_zo" / "unlearned.ckpt"
    state = torch.load(unlearned, weights_only=True)["state_dict"]
    before = torch.load(learned, weights_only=True)["state_dict"]
    assert any(not torch.equal(state[k], before[k]) for k in before)  # ZO moved the weights
