"""ZO on most parameters, first-order AdamW on a chosen subset (head, LoRA, norms)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_zobi.zo.base import (
    ZOOptimizer,
)
from lightning_zobi.zo.estimators import Closure


def _split_fo_groups(
    params: Iterable[Any], fo_params: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Split param groups into (ZO groups, FO groups, FO names) by a ``fo`` flag or a name regex."""
    items = list(params)
    if not items:
        return [], [], []
    groups = [dict(g) for g in items] if isinstance(items[0], dict) else [{"params": items}]
    pattern = re.compile(fo_params) if fo_params is not None else None
    zo_groups, fo_groups, fo_names = [], [], []
    for group in groups:
        tensors = list(group.pop("params"))
        names = group.pop("param_names", None)
        if tensors and isinstance(tensors[0], tuple):
            names, tensors = [n for n, _ in tensors], [t for _, t in tensors]
        whole_group_fo = bool(group.pop("fo", False))
        if whole_group_fo:
            is_fo = [True] * len(tensors)
        elif pattern is not None:
            if names is None:
                raise ValueError(
                    f"fo_params={fo_params!r} needs parameter names: pass model.named_parameters() (or groups "
                    "with 'param_names'), or mark the first-order group with {'params': [...], 'fo': True}."
                )
            is_fo = [pattern.search(n) is not None for n in names]
        else:
            is_fo = [False] * len(tensors)
        fo_part = [t for t, f in zip(tensors, is_fo, strict=True) if f]
        zo_part = [t for t, f in zip(tensors, is_fo, strict=True) if not f]
        if names is not None:
            fo_names += [n for n, f in zip(names, is_fo, strict=True) if f]
        if fo_part:
            fo_groups.append({"params": fo_part})
        if zo_part:
            zo_groups.append({**group, "params": zo_part})
    return zo_groups, fo_groups, fo_names


class ZOFOHybrid(ZOOptimizer):
    """ZO on most parameters, first-order AdamW on a small chosen subset (head, LoRA, norms).

    In the spirit of the ZO/FO hybrids of "Revisiting Zeroth-Order Optimization for
    Memory-Efficient LLM Fine-Tuning: A Benchmark" (arXiv 2402.11592) and ZOFO-style fine-tuning:
    a step first runs **one** forward+backward with only the FO subset requiring grad and updates
    it with ``torch.optim.AdamW`` (``fo_lr``), then runs the usual ZO-SGD step (2 forwards, no
    graph) on the rest. Choose the subset with ``fo_params`` (a regex over parameter names; pass
    ``model.named_parameters()`` or groups with ``param_names``) or a group ``{"fo": True}``.
    LR schedulers act on the ZO groups (``param_groups``); the FO rate is ``fo_lr``.

    The first-order pass needs the loss *with* its autograd graph. A plain PyTorch closure returns
    it; Lightning's automatic-optimization closure returns a detached copy, so a wrapper sets
    :attr:`graph_loss_source` to a callable giving the graph-carrying loss of the latest closure
    call (e.g. captured from ``training_step``'s output). Without either, the step is refused with
    a clear error.

    Memory: the FO subset's gradients (during the step) and AdamW's two moments (2× the FO subset),
    plus the activations autograd keeps for the backward through that subset: little for a head at
    the end of the network (only its input), close to first-order training when the subset is
    spread over all layers (LoRA in every block). The ZO part costs nothing extra.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        fo_params: str | None = None,
        fo_lr: float = 1e-3,
        fo_weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if fo_params is not None and not isinstance(fo_params, str):
            raise TypeError(
                f"fo_params={fo_params!r} must be a regex string over parameter names (e.g. 'lm_head')."
            )
        if not isinstance(fo_lr, (int, float)) or fo_lr <= 0:
            raise ValueError(
                f"fo_lr={fo_lr!r} is invalid: the first-order AdamW rate must be > 0 (e.g. 1e-3)."
            )
        zo_groups, fo_groups, fo_names = _split_fo_groups(params, fo_params)
        if not fo_groups:
            raise ValueError(
                f"ZOFOHybrid got no first-order parameters (fo_params={fo_params!r}): give a regex that matches "
                "some parameter names, or a param group with 'fo': True. For pure ZO use 'zo_sgd'."
            )
        if not zo_groups:
            raise ValueError(
                f"fo_params={fo_params!r} matched every parameter, leaving nothing for ZO; use a narrower "
                "regex, or torch.optim.AdamW for pure first-order training."
            )
        super().__init__(zo_groups, lr, eps, weight_decay, **kwargs)
        self.fo_optimizer = torch.optim.AdamW(fo_groups, lr=fo_lr, weight_decay=fo_weight_decay)
        self.fo_names = fo_names
        self.last_fo_loss: float | None = None
        self.graph_loss_source: Callable[[], Tensor | None] | None = None

    def fo_parameters(self) -> list[Tensor]:
        return [p for g in self.fo_optimizer.param_groups for p in g["params"]]

    def _first_order_step(self, closure: Closure) -> None:
        fo = self.fo_parameters()
        fo_ids = {id(p) for p in fo}
        frozen = [
            p for p in (*self._params(), *self.no_grad_params) if p.requires_grad and id(p) not in fo_ids
        ]
        for p in frozen:
            p.requires_grad_(False)
        for p in fo:
            p.requires_grad_(True)
        try:
            self.fo_optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = closure()
                if (not isinstance(loss, Tensor) or not loss.requires_grad) and self.graph_loss_source:
                    loss = self.graph_loss_source()
                if not isinstance(loss, Tensor) or not loss.requires_grad:
                    raise TypeError(
                        "zo_fo_hybrid needs the loss with its autograd graph for the first-order subset, but "
                        "the closure returned a detached loss (Lightning's closure detaches it when backward "
                        "is skipped) and no graph_loss_source gave one. Call opt.step(closure) from plain "
                        "PyTorch, set opt.graph_loss_source, or use a pure ZO rule."
                    )
                self.last_fo_loss = float(loss.detach())
                if math.isfinite(self.last_fo_loss):
                    loss.backward()
            if math.isfinite(self.last_fo_loss):
                self.fo_optimizer.step()
        finally:
            self.fo_optimizer.zero_grad(set_to_none=True)
            for p in frozen:
                p.requires_grad_(True)

    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        if closure is None:
            return super().step(closure)  # raises the base's clear error
        self._first_order_step(closure)
        fo = [p for p in self.fo_parameters() if p.requires_grad]
        for p in fo:
            p.requires_grad_(False)
        try:
            return super().step(closure)
        finally:
            for p in fo:
                p.requires_grad_(True)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["fo_optimizer"] = self.fo_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        fo_state = state_dict.pop("fo_optimizer", None)
        super().load_state_dict(state_dict)
        if fo_state is not None:
            self.fo_optimizer.load_state_dict(fo_state)
