"""Quantize the ``nn.Linear`` layers of an in-memory model to bitsandbytes 4-bit, in place.

``from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` is the way
to quantize a checkpoint on disk (transformers and diffusers both support it). Models built from a
config in memory (tests, CPU recipes, the GPU benchmark's random 7B Llama) have no such path, so
this swaps each ``nn.Linear`` for a ``bitsandbytes.nn.Linear4bit`` holding the same weight, which
bitsandbytes quantizes itself (``Params4bit`` → ``quantize_4bit``) on its device — the same layer
and state that ``BitsAndBytesConfig(load_in_4bit=True)`` produces, one layer at a time so the
full-precision copy of only one weight is alive beyond the model.

Memory: after the call, 0.5 byte per weight for the codes plus the absmax state (1 byte per 64
weights plus a little with ``compress_statistics=True``, 4 bytes per 64 weights without).
"""

from __future__ import annotations

import re

import torch
from torch import nn


def quantize_linear_4bit_(
    model: nn.Module,
    skip: str | None = r"(^|\.)lm_head$",
    quant_type: str = "nf4",
    compress_statistics: bool = True,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
) -> list[str]:
    """Replace every ``nn.Linear`` (whose name does not match ``skip``) by a bitsandbytes ``Linear4bit``.

    Args:
        model: the model, already on the device where it will run (bitsandbytes quantizes there).
        skip: regex over qualified layer names left in full precision (default: ``lm_head``, as
            transformers does); ``None`` quantizes every linear layer.
        quant_type: ``"nf4"`` (QLoRA's normal float) or ``"fp4"``.
        compress_statistics: double-quantize absmax (bitsandbytes' and transformers' default);
            QZO un-nests it at set-up.
        compute_dtype: matmul dtype (default: the weight's dtype).
        blocksize: weights per absmax scale (bitsandbytes: 64).

    Returns the names of the layers quantized. Raises ValueError if there were none.
    """
    import bitsandbytes as bnb

    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r} is invalid: bitsandbytes 4-bit supports 'nf4' or 'fp4'.")
    pattern = re.compile(skip) if skip else None
    targets = [
        name
        for name, mod in model.named_modules()
        if type(mod) is nn.Linear and not (pattern is not None and pattern.search(name))
    ]
    if not targets:
        raise ValueError(
            f"quantize_linear_4bit_ found no nn.Linear layer to quantize in {type(model).__name__} (skip={skip!r})."
        )
    done = []
    for name in targets:  # by name, so each full-precision weight is freed as soon as it is replaced
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        weight = linear.weight.data
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype or weight.dtype,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            module=q,
        ).to(weight.device)
        q.support_avx512bf16_for_cpu = False  # see keep_cpu_layout_
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data, requires_grad=linear.bias.requires_grad)
        q.train(linear.training)
        setattr(parent, child, q)
        done.append(name)
        del linear, weight
    return done


def keep_cpu_layout_(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU inference repacking in every ``Linear4bit`` of ``model``; returns the count.

    On CPUs with AVX512-BF16, a ``Linear4bit`` run in eval mode without grad rewrites its codes into
    a packed layout and its absmax into a transposed bfloat16 copy. That would replace the scale
    tensors QZO holds (and round their perturbations to 8 mantissa bits), and it fails for layers
    narrower than one block (bitsandbytes 0.50). Keeping the standard layout costs only the faster
    CPU inference kernel.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_4bit_state_(model: nn.Module, state_dict: dict, prefix: str = "") -> list[str]:
    """Install the bitsandbytes 4-bit states saved in ``state_dict`` into ``model``'s ``Linear4bit`` layers.

    ``Linear4bit.state_dict()`` saves each layer's quantization state (``weight.absmax``,
    ``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``) next to
    its codes, but ``Linear4bit`` has no loader for them, so ``load_state_dict`` would report them
    as unexpected and keep the old scales. This pops those entries from ``state_dict`` (keys under
    ``prefix``) and rebuilds each layer's state with bitsandbytes' ``QuantState.from_dict`` (the
    scales QZO trained, nested or not); the codes (``weight``) are then loaded by the ordinary
    ``load_state_dict``. Returns the names of the layers restored.
    """
    import bitsandbytes as bnb

    restored = []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        head = f"{prefix}{name}.weight." if name else f"{prefix}weight."
        keys = [k for k in state_dict if k.startswith(head)]
        if not keys:
            continue
        device = module.weight.device
        state = bnb.functional.QuantState.from_dict(
            {k[len(head) :]: state_dict.pop(k) for k in keys}, device=device
        )
        module.weight.quant_state = state
        module.quant_state = state
        restored.append(name)
    return restored
