"""Bilevel ZOFO: ZO upper level on base weights, first-order LoRA lower level."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_bilevel_solvers import CoupledQuadratic
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_zobi.bilevel import BilevelProblem, BilevelZOFO, select_parameters


def test_zofo_reaches_penalized_optimum_on_quadratic() -> None:
    """x by ZO (central differences are exact on quadratics), y by SGD: the fixed point is the stationary
    point of f + γ(g − v), O(1/γ) from the bilevel x*, and far from the value-function-free point."""
    gamma = 10.0
    model = CoupledQuadratic(coupling=1.0)
    problem = BilevelProblem.from_module(model, upper_params="^x$", lower_params="^y$")
    opt = torch.optim.SGD([model.y], lr=0.9 / (1 + gamma))
    solver = BilevelZOFO(problem, opt, gamma=gamma, inner_steps=2, inner_lr=0.9, zo_lr=0.02, eps=1e-3, seed=0)
    logs = [solver.step(None) for _ in range(500)]
    x_pen, _ = model.penalty_solution(gamma, value_function=True)
    x_free, _ = model.penalty_solution(gamma, value_function=False)
    x_star, _ = model.bilevel_solution()
    x = model.x.detach()
    assert (x - x_pen).norm() < 1e-3
    assert (x - x_star).norm() < 1.0 / gamma
    assert (x - x_free).norm() > 0.5
    assert model.x.grad is None  # the upper level never had a gradient
    assert logs[-1]["gap"] >= 0.0 and set(logs[-1]) == {"f", "g", "gap", "gamma", "objective"}


def tiny_lora_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(base, lora)


def counting_batch(n: int, length: int, offset: int, vocab: int = 32) -> torch.Tensor:
    """Sequences that count up mod vocab from different starts: a rule a tiny LM can learn."""
    starts = (torch.arange(n) * 7 + offset) % vocab
    return (starts[:, None] + torch.arange(length)[None, :]) % vocab


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def test_zofo_tiny_llama_lora_reduces_both_losses() -> None:
    model = tiny_lora_llama()
    upper_ids, lower_ids = counting_batch(8, 12, offset=3), counting_batch(8, 12, offset=0)
    base = [p for _, p in select_parameters(model, "base")]
    lora = [p for _, p in select_parameters(model, "lora")]
    problem = BilevelProblem(
        upper_loss=lambda batch: lm_loss(model, batch["upper"]),
        lower_loss=lambda batch: lm_loss(model, batch["lower"]),
        upper_params=base,
        lower_params=lora,
    )
    batch = {"upper": upper_ids, "lower": lower_ids}
    base_before = [p.detach().clone() for p in base]
    lora_before = [p.detach().clone() for p in lora]
    with torch.no_grad():
        f0, g0 = (float(v) for v in problem.losses(batch))
    opt = torch.optim.Adam(lora, lr=3e-2)
    solver = BilevelZOFO(problem, opt, gamma=1.0, inner_steps=1, inner_lr=1.0, zo_lr=1e-4, eps=1e-3, seed=7)
    logs = [solver.step(batch) for _ in range(12)]
    with torch.no_grad():
        f1, g1 = (float(v) for v in problem.losses(batch))
    assert f1 < f0 - 0.15 and g1 < g0 - 0.15, (f0, f1, g0, g1)  # from ≈ ln 32 = 3.47
    assert all(torch.isfinite(torch.tensor(list(row.values()))).all() for row in logs)
    # ZO moved the backbone without ever giving it a gradient; first order moved the adapter.
    assert any(not torch.equal(a, b) for a, b in zip(base_before, base, strict=True))
    assert all(p.grad is None and not p.requires_grad for p in base)
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, lora, strict=True))
    # Resume: the state holds z, the step and the ZO seed/step.
    state = solver.state_dict()
    assert state["step"] == 12 and state["zo"]["zo"]["step"] == 12 and len(state["inner"]["z"]) == len(lora)


def test_zofo_rejects_overlapping_levels_and_frozen_adapter() -> None:
    model = tiny_lora_llama()
    lora = [p for _, p in select_parameters(model, "lora")]
    opt = torch.optim.Adam(lora, lr=1e-2)
    overlap = BilevelProblem(lambda b: b, lambda b: b, upper_params=[*lora[:1]], lower_params=lora)
    with pytest.raises(ValueError, match="disjoint"):
        BilevelZOFO(overlap, opt)
    base = [p for _, p in select_parameters(model, "base")]
    frozen = BilevelProblem(lambda b: b, lambda b: b, upper_params=lora, lower_params=base[:2])
    with pytest.raises(ValueError, match="requires_grad=False"):
        BilevelZOFO(frozen, opt)
