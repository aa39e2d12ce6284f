"""Which parameters a ZO, QZO or bilevel step touches, chosen by a short name or a regex."""

from __future__ import annotations

import re

from torch import nn


def select_parameters(
    module: nn.Module, spec: str, *, argument: str = "params"
) -> list[tuple[str, nn.Parameter]]:
    """Named parameters of ``module`` picked by ``spec``.

    ``"trainable"``: ``requires_grad`` parameters; ``"lora"``: names containing ``"lora_"`` (peft
    adapters); ``"base"``: every parameter whose name does not contain ``"lora_"`` (the frozen
    backbone of a peft model); ``"all"``: every parameter; anything else: a regular expression
    searched (``re.search``) in the parameter names. Shared parameters are listed once.
    """
    if not isinstance(spec, str) or not spec:
        raise TypeError(
            f"{argument}={spec!r} is invalid: use 'trainable', 'lora', 'base', 'all' or a regex over parameter names."
        )
    named = list(module.named_parameters())
    if spec == "trainable":
        picked = [(n, p) for n, p in named if p.requires_grad]
    elif spec == "lora":
        picked = [(n, p) for n, p in named if "lora_" in n]
    elif spec == "base":
        picked = [(n, p) for n, p in named if "lora_" not in n]
    elif spec == "all":
        picked = named
    else:
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise ValueError(f"{argument}={spec!r} is not a valid regular expression ({err}).") from None
        picked = [(n, p) for n, p in named if pattern.search(n)]
    if not picked:
        sample = ", ".join(n for n, _ in named[:6]) or "<none>"
        why = (
            "no parameter requires grad: unfreeze some or add a LoRA adapter. " if spec == "trainable" else ""
        )
        raise ValueError(
            f"{argument}={spec!r} selects no parameter of {type(module).__name__} (first names: {sample}). {why}"
            "Use 'trainable', 'lora' (needs a peft adapter), 'base', 'all' or a regex that matches these names."
        )
    return picked
