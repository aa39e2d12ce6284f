"""``QZO``: zeroth-order fine-tuning of a quantized LightningModule through its quantization scales.

"Fine-tuning Quantized Neural Networks with Zeroth-order Optimization" (Shang et al., arXiv
2505.13430). A :class:`~lightning_zobi.ZeroOrder` whose parameters are not the module's
parameters but the continuous scales of its quantized layers (bitsandbytes ``absmax``, torchao
``scale``), found by :func:`lightning_zobi.quant.find_quant_scales` at fit start — after the model
is on its device, so the tensors held are the ones the layers read — and trained by
:class:`lightning_zobi.quant.QZOOptimizer` (ZO-SGD + directional-derivative clipping). Everything
else is ``ZeroOrder``'s: forward-only steps through the unchanged ``training_step``, LR schedulers
rebound, precision checks, seeds saved in checkpoints, ``zo/*`` logs.

On resume (``ckpt_path``) the callback installs the trained 4-bit states itself, whatever the
module: ``Linear4bit`` saves ``weight.absmax``/``quant_map``/... but cannot load them, so before
Lightning's strict ``load_state_dict`` the module's ``on_load_checkpoint`` is preceded by
:func:`lightning_zobi.quant.load_4bit_state_`.

Memory: the quantized model plus one scale-sized temporary: no gradients, no optimizer state, no
activations kept; un-nesting double-quantized absmax adds 3 bytes per 64 weights once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer

from lightning_zobi.lightning.callbacks.zero_order import (
    Difference,
    ForwardMode,
    Perturbation,
    RNGMode,
    ZeroOrder,
)
from lightning_zobi.quant.backends import qzo_optimizer
from lightning_zobi.quant.convert import load_4bit_state_
from lightning_zobi.quant.qzo import DEFAULT_CLIP, QZORule
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
        forward_mode, rng, perturbation, stochastic_rounding: the ZO core's options, as for
            :class:`~lightning_zobi.ZeroOrder` (``None``: the rule's defaults).
        layers: optional regex over quantized layer names to train (default: all quantized layers).
        backends: scale adapters to use (default: all of ``lightning_zobi.quant.SCALE_ADAPTERS``).
        unnest: un-nest double-quantized bitsandbytes absmax to float32 (else such layers are refused).
        fused: ``None`` (default) runs the fused Triton path when the scales are on CUDA
            (:class:`~lightning_zobi.quant.qzo_fused.FusedQZOOptimizer`), ``False`` the torch path,
            ``True`` requires the fused one.

    ``Trainer(gradient_clip_val=c)`` is the same directional-derivative clipping: the bound used is
    ``min(clip, c)``. Strategies, manual optimization, seeds on resume and the lr warning: as for
    :class:`~lightning_zobi.ZeroOrder`.

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
        difference: Difference = "central",
        layers: str | None = None,
        backends: list[str] | None = None,
        unnest: bool = True,
        seed: int = 0,
        max_nonfinite: int = 5,
        fused: bool | None = None,
        forward_mode: ForwardMode | None = None,
        rng: RNGMode | None = None,
        perturbation: Perturbation | None = None,
        stochastic_rounding: bool | None = None,
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
            forward_mode=forward_mode,
            rng=rng,
            perturbation=perturbation,
            stochastic_rounding=stochastic_rounding,
            exclude_bias_and_norm=False,
            optimizer_kwargs={"clip": clip, "nonnegative": nonnegative},
        )
        self.optimizer = "qzo"
        self.layers = layers
        self.backends = backends
        self.unnest = unnest
        self.fused = fused
        self.scales: QuantScales | None = None
        self._restore_hook: Callable[[], None] | None = None

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
        kwargs = dict(self.optimizer_kwargs)
        if self.projected_grad_clip is not None:  # gradient_clip_val: the same clipping, the tighter bound
            clip = kwargs.get("clip")
            kwargs["clip"] = self.projected_grad_clip if clip is None else min(clip, self.projected_grad_clip)
        core = {k: v for k, v in self.core_kwargs().items() if k != "projected_grad_clip"}
        zo = qzo_optimizer(
            self.scales,
            fused=self.fused,
            lr=lr,
            eps=self.eps,
            queries=self.queries,
            difference=self.difference,
            seed=self.seed,
            max_nonfinite=self.max_nonfinite,
            **core,
            **kwargs,
        )
        zo.param_groups[0]["initial_lr"] = self.lr if self.lr is not None else hyper.get("initial_lr", lr)
        zo.no_grad_params = list(pl_module.parameters())
        if self.lr is None:
            rank_zero_warn(
                f"QZO: no lr given, so the module's optimizer lr {lr:g} is used on the quantization scales: set "
                "QZO(lr=...) (the recipes use 2e-2 with clip 100)."
            )
        rank_zero_info(
            f"QZO: training {self.scales.numel():,} scales of {len(self.scales)} quantized layers "
            f"(un-nesting added {self.scales.extra_bytes / 2**20:.2f} MiB); codes stay frozen."
        )
        return zo

    def _report(self, source: Optimizer, zo: Any, split: bool) -> None:
        """QZO's own lines are written in :meth:`build` (the scales have no weight decay)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """ZeroOrder's checks (fit), and the 4-bit states of a checkpoint restored before Lightning loads the weights.

        Lightning calls the module's ``on_load_checkpoint`` and then its strict ``load_state_dict``,
        both before any callback hook sees the checkpoint; so the module's hook is wrapped here
        (every stage: ``validate``/``test`` with ``ckpt_path`` need it too) and unwrapped on teardown.
        """
        super().setup(trainer, pl_module, stage)
        if self._restore_hook is not None:
            return
        original = pl_module.on_load_checkpoint
        own = "on_load_checkpoint" in vars(pl_module)

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> Any:
            restored = load_4bit_state_(pl_module, checkpoint["state_dict"])
            if restored:
                rank_zero_info(
                    f"QZO: restored the trained 4-bit states of {len(restored)} layers from the checkpoint."
                )
            return original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
        self._restore_hook = (
            (lambda: setattr(pl_module, "on_load_checkpoint", original))
            if own
            else (lambda: vars(pl_module).pop("on_load_checkpoint", None))
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._restore_hook is not None:
            self._restore_hook()
            self._restore_hook = None

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
