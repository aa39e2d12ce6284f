"""First-order head over a zeroth-order body (issue 23): untie_lm_head, the hybrid's memory, its control, its recipe."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import quiet_trainer

from lightning_zobi.cli import main as zobi
from lightning_zobi.lightning.callbacks.zero_order import ZeroOrder
from lightning_zobi.lightning.datamodules.unlearning import UnlearningDataModule
from lightning_zobi.lightning.modules.causal_lm import CausalLMModule, build_causal_lm
from lightning_zobi.lightning.modules.unlearning import UnlearningModule
from lightning_zobi.unlearn.llm import UnlearningObjective, forward_only_fraction, untie_lm_head
from lightning_zobi.zo.optim import ZOFOHybrid

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "llm" / "unlearn_npo_zo_head.yaml"
HEAD = r"(^|\.)lm_head\."


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> str:
    module = CausalLMModule("tiny-llama", seed=3)
    path = tmp_path_factory.mktemp("stage") / "learned.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def dm() -> UnlearningDataModule:
    return UnlearningDataModule(num_people=10, forget_batch_size=4, retain_batch_size=4, max_length=48)


def test_untie_lm_head_keeps_outputs_and_separates_the_head():
    model = build_causal_lm("tiny-llama").eval()
    x = torch.randint(2, 250, (2, 12))
    before = model(input_ids=x).logits
    assert model.lm_head.weight is model.model.embed_tokens.weight
    n = sum(p.numel() for p in model.parameters())
    tied = forward_only_fraction(model, HEAD)
    assert tied == pytest.approx(1 - model.lm_head.weight.numel() / n)  # tied: the head *is* the embedding
    assert untie_lm_head(model) is True
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model(input_ids=x).logits, before)
    assert untie_lm_head(model) is False  # already untied
    n = sum(p.numel() for p in model.parameters())
    assert forward_only_fraction(model, HEAD) == pytest.approx(1 - model.lm_head.weight.numel() / n)
    assert forward_only_fraction(model, HEAD) > tied  # the head is its own (extra) matrix now
    assert forward_only_fraction(model, None) == 1.0 and forward_only_fraction(model, "") == 0.0


def _saved_bytes(model: torch.nn.Module, fo: str) -> int:
    """Bytes autograd keeps for backward in the hybrid's first-order pass (only ``fo`` params need grad)."""
    first = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if re.search(fo, n)}
    for p in model.parameters():
        p.requires_grad_(id(p) in first)
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    objective = UnlearningObjective.from_method("grad_diff")
    batch = {
        "input_ids": torch.randint(2, 250, (4, 32)),
        "attention_mask": torch.ones(4, 32, dtype=torch.long),
        "labels": torch.randint(2, 250, (4, 32)),
    }
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        objective(model, batch, batch)["loss"].backward()
    return total


def test_untied_head_backward_stops_at_the_head():
    """The memory claim: with the head untied the first-order pass keeps a fraction of what it keeps tied."""
    tied = build_causal_lm("tiny-llama")
    untied = build_causal_lm("tiny-llama")
    untie_lm_head(untied)
    full = _saved_bytes(build_causal_lm("tiny-llama"), ".")
    tied_bytes = _saved_bytes(tied, HEAD)
    untied_bytes = _saved_bytes(untied, HEAD)
    assert tied_bytes > 0.5 * full  # tied: the backward reaches the input embedding through every layer
    assert untied_bytes < 0.25 * tied_bytes
    assert untied.model.layers[0].mlp.up_proj.weight.grad is None
    assert untied.lm_head.weight.grad is not None


def _hybrid_module(learned: str, **kwargs) -> UnlearningModule:
    return UnlearningModule(
        "tiny-llama", objective="npo", lr=1e-2, untie_head=True, init_from=learned, max_new_tokens=4, **kwargs
    )


def _fit(module: UnlearningModule, dm: UnlearningDataModule, callbacks: list, steps: int = 4) -> None:
    torch.manual_seed(0)
    quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=callbacks).fit(module, dm)


def test_hybrid_trains_head_first_order_and_body_zeroth_order(learned, dm):
    module = _hybrid_module(learned)
    start = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    zo = ZeroOrder(
        optimizer="zo_fo_hybrid", lr=1e-3, seed=0, optimizer_kwargs={"fo_params": HEAD, "fo_lr": 1e-2}
    )
    _fit(module, dm, [zo])
    [opt] = zo.zo_optimizers
    assert isinstance(opt, ZOFOHybrid) and all("lm_head" in n for n in opt.fo_names) and opt.fo_names
    moved = {n for n, p in module.model.named_parameters() if not torch.equal(p, start[n])}
    assert "lm_head.weight" in moved
    assert (
        "model.embed_tokens.weight" in moved and "model.layers.0.mlp.up_proj.weight" in moved
    )  # ZO moved the body
    assert all(p.grad is None for p in module.model.parameters())


def test_control_is_the_hybrid_with_its_forward_only_part_off(learned, dm):
    """ZO lr 0 leaves the body bit-identical, so the hybrid equals first-order training of the head alone."""
    hybrid = _hybrid_module(learned)
    zo = ZeroOrder(
        optimizer="zo_fo_hybrid", lr=0.0, seed=0, optimizer_kwargs={"fo_params": HEAD, "fo_lr": 1e-2}
    )
    _fit(hybrid, dm, [zo])
    control = _hybrid_module(learned, trainable=HEAD)
    control.hparams.lr = 1e-2
    _fit(control, dm, [])
    for (name, a), b in zip(hybrid.model.named_parameters(), control.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    start = _hybrid_module(learned).model
    assert torch.equal(
        hybrid.model.model.layers[1].self_attn.q_proj.weight, start.model.layers[1].self_attn.q_proj.weight
    )
    assert not torch.equal(hybrid.model.lm_head.weight, start.lm_head.weight)


def _run_recipe(path: Path, learned: str, tmp_path: Path, check: Any) -> tuple[dict, dict]:
    """Run a recipe for 3 steps on the tiny model (``check(config)`` first); its checkpoint and the learned one."""
    config = yaml.safe_load(path.read_text())
    check(config)
    config["model"]["init_args"].update(init_from=learned, retain_model_from=learned, max_new_tokens=4)
    config["data"]["init_args"].update(num_people=10, forget_batch_size=2, retain_batch_size=2, max_length=48)
    trainer = config["trainer"]
    trainer.update(max_steps=3, val_check_interval=3, default_root_dir=str(tmp_path), enable_progress_bar=False)
    trainer["logger"] = False
    trainer["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config))
    zobi(["fit", "--config", str(recipe)])
    state = torch.load(tmp_path / "unlearned.ckpt", weights_only=True)["state_dict"]
    return state, torch.load(learned, weights_only=True)["state_dict"]


def _zo_rule(config: dict) -> str:
    zo = next(cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("ZeroOrder"))
    return zo["init_args"]["optimizer"]


def test_recipe_runs_on_a_tiny_model(learned, tmp_path):
    def check(config: dict) -> None:
        assert config["model"]["init_args"]["untie_head"] is True
        assert _zo_rule(config) == "zo_fo_hybrid"

    state, before = _run_recipe(RECIPE, learned, tmp_path, check)
    assert not torch.equal(state["model.lm_head.weight"], state["model.model.embed_tokens.weight"])
    assert not torch.equal(state["model.lm_head.weight"], before["model.model.embed_tokens.weight"])
    assert not torch.equal(
        state["model.model.layers.0.mlp.up_proj.weight"], before["model.model.layers.0.mlp.up_proj.weight"]
    )


# ---------------------------------------------------------------------------- ZO on an IA3 adapter
def _ia3_module(learned: str, **kwargs) -> UnlearningModule:
    return UnlearningModule("tiny-llama", objective="npo", alpha=5.0, ia3=True, init_from=learned, **kwargs)


def test_ia3_adapter_trains_scales_only_and_uses_the_adapter_disabled_reference(learned, dm):
    module = _ia3_module(learned)
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("ia3_l" in n for n in trainable)
    n_scales = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    assert n_scales < 0.02 * sum(p.numel() for p in module.model.parameters())
    batch = next(iter(dm.train_dataloader()))[0]
    # IA3 starts at scale 1 (the identity): the model is its own reference, NPO = (2/β) log 2
    assert module.upper_loss(batch).item() == pytest.approx(2 / 0.1 * math.log(2), rel=1e-6)
    base = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    _fit(module, dm, [ZeroOrder(optimizer="zo_sign", lr=3e-2, eps=1e-3, seed=0)], steps=6)
    assert all(torch.equal(p, base[n]) for n, p in module.model.named_parameters() if n in base)
    assert any(not torch.equal(p, torch.ones_like(p)) for p in module.model.parameters() if p.requires_grad)
    # the forward-only steps moved the forget answers away from the reference
    assert module.upper_loss(batch).item() < 2 / 0.1 * math.log(2)


def test_ia3_control_with_the_zo_part_off_is_the_learned_model(learned, dm):
    module = _ia3_module(learned)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    _fit(module, dm, [ZeroOrder(optimizer="zo_sign", lr=0.0, eps=1e-3, seed=0)], steps=3)
    assert all(torch.equal(p, before[n]) for n, p in module.model.named_parameters())


def test_one_adapter_at_a_time():
    with pytest.raises(ValueError, match="choose one"):
        CausalLMModule("tiny-llama", lora_r=4, ia3=True)


def test_ia3_recipe_runs_on_a_tiny_model(learned, tmp_path):
    def check(config: dict) -> None:
        assert config["model"]["init_args"]["ia3"] is True
        assert _zo_rule(config) == "zo_sign"

    recipe = ROOT / "recipes" / "llm" / "unlearn_npo_zo_ia3.yaml"
    state, before = _run_recipe(recipe, learned, tmp_path, check)
    scales = {k: v for k, v in state.items() if "ia3_l" in k}
    assert scales and any(not torch.equal(v, torch.ones_like(v)) for v in scales.values())
    base = "model.base_model.model.model.layers.0.mlp.up_proj.weight"
    assert torch.equal(state[base], before["model.model.layers.0.mlp.up_proj.weight"])


def test_ia3_targets_given_scale_the_feed_forward_input():
    from lightning_zobi.lightning.modules.causal_lm import add_ia3

    model = add_ia3(build_causal_lm("tiny-llama"), ["down_proj", "v_proj"])
    down = model.base_model.model.model.layers[0].mlp.down_proj
    v = model.base_model.model.model.layers[0].self_attn.v_proj
    assert down.is_feedforward and not v.is_feedforward
    assert down.ia3_l["default"].shape == (1, down.in_features)
