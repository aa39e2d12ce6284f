"""Offloaded ZO (weights in host memory, streamed to the device per module): same steps as the plain path."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_zobi.zo import ZOSGD, build_optimizer
from lightning_zobi.zo.offload import OffloadedJustInTime, offload_parameters

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _llama(dtype: torch.dtype, device: str = "cpu") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_offloaded_steps_are_bit_identical_to_the_plain_path(device: str, dtype: torch.dtype) -> None:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    plain, streamed = _llama(dtype, device), _llama(dtype, device)
    opt_plain = ZOSGD(plain.parameters(), lr=1e-2, eps=1e-2, seed=4, fused=False) if False else build_optimizer(
        "zo_sgd", plain.parameters(), lr=1e-2, eps=1e-2, seed=4, fused=False
    )
    opt = build_optimizer("zo_sgd", streamed.parameters(), lr=1e-2, eps=1e-2, seed=4, fused=False)
    offload = offload_parameters(opt, streamed, device=device, prefetch=3)
    assert all(p.device.type == "cpu" for p in streamed.parameters())
    for _ in range(4):
        loss_plain = opt_plain.step(lambda: plain(input_ids=ids, labels=ids).loss)
        loss = opt.step(lambda: streamed(input_ids=ids, labels=ids).loss)
        assert loss == loss_plain
    assert isinstance(opt.perturber(), OffloadedJustInTime)
    for a, b in zip(plain.parameters(), streamed.parameters(), strict=True):
        assert torch.equal(a.detach().cpu(), b.detach())
    with torch.no_grad():  # a plain forward outside a step fetches the weights unperturbed
        assert torch.equal(plain(input_ids=ids).logits.cpu(), streamed(input_ids=ids).logits.cpu())
    total = sum(p.numel() * p.element_size() for p in streamed.parameters())
    assert offload.bytes_to_device >= 4 * 3 * total  # two forwards and the update's fetch per step
    assert offload.bytes_to_host == 4 * total


def test_offload_refuses_stateful_rules_and_in_place_perturbation() -> None:
    model = _llama(torch.float32)
    with pytest.raises(ValueError, match="ZOAdam keeps optimizer state"):
        offload_parameters(build_optimizer("zo_adam", model.parameters(), fused=False), model, device="cpu")
    with pytest.raises(ValueError, match="perturbation='exact'"):
        offload_parameters(
            ZOSGD(model.parameters(), perturbation="inplace"), model, device="cpu"
        )


def test_offload_benchmark_runs_on_cpu(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "offload.json"
    cmd = [sys.executable, str(root / "benchmarks" / "zo_offload.py"), "--shape", "tiny", "--device", "cpu",
           "--steps", "1", "--batch", "2", "--seq", "16", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["shape"] == "tiny" and row["step_s"] > 0 and len(row["losses"]) == 2
