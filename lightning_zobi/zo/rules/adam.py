"""ZO-Adam (ZO-AdaMM): Adam's moments on the two-point estimate."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_zobi.zo.base import (
    ZOOptimizer,
    _check_beta,
    _set_group_hparams,
)


class ZOAdam(ZOOptimizer):
    """ZO-Adam: Adam's moments on the ZO estimate ``ĝ`` (ZO-AdaMM).

    From "ZO-AdaMM: Zeroth-Order Adaptive Momentum Method for Black-Box Optimization"
    (Chen et al., NeurIPS 2019, arXiv 1910.06513), as benchmarked for LLM fine-tuning in
    arXiv 2402.11592. ``m ← β₁m + (1−β₁)ĝ``, ``v ← β₂v + (1−β₂)ĝ²``, bias-corrected,
    ``θ ← θ − lr·m̂/(√v̂ + adam_eps)``. ``adam_eps`` is Adam's denominator guard, distinct from the
    perturbation scale ``eps``. ``betas`` default to (0.9, 0.999) unless a param group carries its
    own (e.g. from the AdamW the module configured); a value passed here applies to every group.

    Memory: two buffers per parameter, **2× the trainable parameters** (as first-order Adam; fp32
    for bf16/fp16 parameters under stochastic rounding), which removes much of ZO's memory
    advantage on full fine-tuning; prefer it with LoRA.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        betas: tuple[float, float] | list[float] | None = None,
        adam_eps: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr, eps, weight_decay, **kwargs)
        _set_group_hparams(
            self, betas=(tuple(betas) if betas is not None else None, (0.9, 0.999)), adam_eps=(adam_eps, 1e-8)
        )
        for group in self.param_groups:
            if len(group["betas"]) != 2:
                raise ValueError(
                    f"betas={group['betas']!r} is invalid: pass two floats (beta1, beta2), e.g. (0.9, 0.999)."
                )
            _check_beta("betas[0]", group["betas"][0])
            _check_beta("betas[1]", group["betas"][1])
            if not isinstance(group["adam_eps"], (int, float)) or not group["adam_eps"] > 0:
                raise ValueError(
                    f"adam_eps={group['adam_eps']!r} is invalid: use a float > 0 (1e-8 is Adam's default)."
                )

    def apply_rule(self, param: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        t = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (exp_avg_sq / (1.0 - beta2**t)).sqrt_().add_(group["adam_eps"])
        param.addcdiv_(exp_avg, denom, value=-group["lr"] / (1.0 - beta1**t))
