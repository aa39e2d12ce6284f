"""``QZO``: zeroth-order fine-tuning of a quantized LightningModule through its quantization scales.

"Fine-tuning Quantized Neural Networks with Zeroth-order Optimization" (Shang et al., arXiv
2505.13430). A :class:`~lightning_zobi.ZeroOrder` whose parameters are not the module's
parameters but the continuous scales of its quantized layers (bitsandbytes ``absmax``, torchao
``scale``), found by :func:`lightning_zobi.quant.find_quant_scales` at fit start — after the model
is on its device, so the tensors held are the ones the layers read — and trained by
:class:`lightning_zobi.quant.QZOOptimizer` (ZO-SGD + directional-derivative clipping). Everything
else is ``ZeroOrder``'s: forward-only steps through the unchanged ``training_step``, LR schedulers
rebound, precision checks, seeds saved in checkpoints, ``zo/*`` logs.

Memory: the quantized model plus one scale-sized temporary: no gradients, no optimizer state, no
activations kept; un-nesting double-quantized absmax adds 3 bytes per 64 weights once.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.optim import Optimizer

from lightning_zobi.lightning.callbacks.zero_order import ZeroOrder, _track_step_calls
from lightning_zobi.quant.qzo import DEFAULT_CLIP, QZORule, qzo_optimizer
from lightning_zobi.quant.scales import QuantScales, find_quant_scales


class QZO(ZeroOrder):
    """Train only the quantization scales of a quantized model with zeroth-order steps (QZO).

    ``Trainer(callbacks=[QZO(lr=2e-2, eps=1e-3, clip=100.0)])`` on a module whose linear layers
    are bitsandbytes 4-bit (e.g. :class:`~lightning_zobi.lightning.modules.quantized.QuantizedCausalLMModule`,
    or any model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``). The codes stay
    byte-identical; the module's ``configure_optimizers`` only lends its learning rate (and LR
    scheduler) to the QZO optimizer.

    Args:
        lr: learning rate on the scales (``None``: the module optimizer's rate).
        eps: additive perturbation of the scales (paper: ``Δ ± εz``).
        clip: bound ``C`` of directional-derivative clipping (paper sweep 75..125; ``None`` disables).
        nonnegative: keep scales ``≥ 0`` after each update (the paper's ``max(·, 0)``).
        queries, difference, seed, max_nonfinite: as for :class:`~lightning_zobi.ZeroOrder`.
        layers: optional regex over quantized layer names to train (default: all quantized layers).
        backends: scale adapters to use (default: all of ``lightning_zobi.quant.SCALE_ADAPTERS``).
        unnest: un-nest double-quantized bitsandbytes absmax to float32 (else such layers are refused).
        fused: ``None`` (default) runs the fused Triton path when the scales are on CUDA
            (:class:`~lightning_zobi.quant.qzo_fused.FusedQZOOptimizer`), ``False`` the torch path,
            ``True`` requires the fused one.

    Logs, besides ``ZeroOrder``'s ``zo/*``: ``qzo/clipped`` (queries clipped this step),
    ``qzo/clip_fraction`` (running share of clipped queries) and ``qzo/raw_projected_grad``
    (mean |d| before clipping).
    """

    def __init__(
        self,
        lr: float | None = None,
        eps: float = 1e-3,
        clip: float | None = DEFAULT_CLIP,
        nonnegative: bool = True,
        queries: int = 1,
        difference: str = "central",
        layers: str | None = None,
        backends: list[str] | None = None,
        unnest: bool = True,
        seed: int = 0,
        max_nonfinite: int = 5,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            optimizer="zo_sgd",  # validated name only: build() below makes the QZOOptimizer over the scales
            lr=lr,
            eps=eps,
            queries=queries,
            difference=difference,
            params="all",
            seed=seed,
            max_nonfinite=max_nonfinite,
            optimizer_kwargs={"clip": clip, "nonnegative": nonnegative},
        )
        self.optimizer = "qzo"
        self.layers = layers
        self.backends = backends
        self.unnest = unnest
        self.fused = fused
        self.scales: QuantScales | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(optimizer="qzo", layers=self.layers, seed=self.seed)

    def build(self, pl_module: nn.Module, optimizer: Optimizer) -> QZORule:
        """A QZO optimizer (torch or fused path) over the module's quantization scales, with ``optimizer``'s learning rate."""
        self.scales = find_quant_scales(
            pl_module, backends=self.backends, include=self.layers, unnest=self.unnest
        )
        hyper = optimizer.param_groups[0]
        lr = self.lr if self.lr is not None else hyper["lr"]
        zo = qzo_optimizer(
            self.scales,
            fused=self.fused,
            lr=lr,
            eps=self.eps,
            queries=self.queries,
            difference=self.difference,
            seed=self.seed,
            max_nonfinite=self.max_nonfinite,
            **self.optimizer_kwargs,
        )
        zo.param_groups[0]["initial_lr"] = self.lr if self.lr is not None else hyper.get("initial_lr", lr)
        zo.no_grad_params = list(pl_module.parameters())
        _track_step_calls(zo)
        rank_zero_info(
            f"QZO: training {self.scales.numel():,} scales of {len(self.scales)} quantized layers "
            f"(un-nesting added {self.scales.extra_bytes / 2**20:.2f} MiB); codes stay frozen."
        )
        return zo

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.strategy.optimizers) != 1:
            raise ValueError(
                f"QZO needs configure_optimizers to return exactly one optimizer (got {len(trainer.strategy.optimizers)}): "
                "its learning rate and scheduler are lent to the QZO optimizer over the scales."
            )
        self.zo_optimizers = []
        super().on_fit_start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        for zo in self.zo_optimizers:
            if not isinstance(zo, QZORule) or not zo.last_raw_projected_grads:
                continue
            raw = zo.last_raw_projected_grads
            pl_module.log("qzo/clipped", float(zo.last_clipped), on_step=True, on_epoch=False)
            pl_module.log("qzo/clip_fraction", zo.clip_fraction, on_step=True, on_epoch=False)
            pl_module.log(
                "qzo/raw_projected_grad", sum(abs(g) for g in raw) / len(raw), on_step=True, on_epoch=False
            )
