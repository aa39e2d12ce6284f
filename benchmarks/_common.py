"""Helpers the benchmark scripts share: Llama architectures, on-device model builds, device sync and naming.

Import from a script as ``from _common import ...`` after putting this folder on ``sys.path`` (each script
does, so ``python benchmarks/<name>.py`` and ``runpy.run_path`` both work without installing anything).
"""

from __future__ import annotations

import platform
from typing import Any

import torch

LLAMA_1_1B: dict[str, Any] = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)
"""TinyLlama-1.1B's architecture (no ``max_position_embeddings``: each benchmark sets its own)."""

LLAMA_6_7B: dict[str, Any] = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
"""Llama-2-7B's architecture (6.7 B parameters)."""

LLAMA_TINY: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)
"""A 2-layer Llama for CPU smoke runs of the benchmarks."""


def llama_on(config: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight ``LlamaForCausalLM`` allocated directly on ``device`` in ``dtype``.

    The default dtype is switched while the model is built, so a 7B model never has an fp32 copy.
    """
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall times cover the kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's processor string."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def quiet_trainer(**kwargs: Any) -> Any:
    """A Lightning ``Trainer`` for timed benchmark fits: no logger, checkpoints, progress bar, summary or validation.

    ``kwargs`` (accelerator, max_steps, callbacks, ...) are added to, or override, those defaults.
    """
    import lightning.pytorch as pl

    defaults: dict[str, Any] = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})
