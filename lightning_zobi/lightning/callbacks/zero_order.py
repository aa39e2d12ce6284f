"""``ZeroOrder``: turn an existing LightningModule into a forward-only (zeroth-order) learner.

How it hooks into Lightning, and why there. In automatic optimization Lightning wraps
``training_step`` + ``zero_grad`` + ``backward`` in a ``Closure`` and hands it to
``Precision.optimizer_step``, which calls ``optimizer.step(closure)``
(``loops/optimization/automatic.py``). Setting ``trainer.fit_loop._skip_backward = True`` (the flag
Lightning's own ``StochasticWeightAveraging`` uses) removes ``zero_grad`` and ``backward`` from
that closure, leaving exactly what a ZO optimizer needs: a callable that runs the user's unchanged
``training_step`` and returns the loss. So the callback only has to

1. on ``on_fit_start`` (after ``Strategy.setup`` built the module's optimizers, before a checkpoint's
   optimizer state is restored into them), replace each configured optimizer by a ZO rule over the
   same parameter groups and hyperparameters, rebinding LR schedulers to it;
2. switch backward off.

The closure is then called 2 (or more) times per step at perturbed parameters; the ZO optimizer
switches ``requires_grad`` off meanwhile, so no graph or ``.grad`` is ever made even though
Lightning's closure runs under ``torch.enable_grad``. ``bf16-mixed`` works (its plugin passes the
closure through); ``16-mixed`` is refused because its ``GradScaler`` steps without the closure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_zobi.zo.optim import OPTIMIZERS, ZOFOHybrid, ZOOptimizer, build_optimizer
from lightning_zobi.zo.params import select_parameters


def _track_step_calls(optimizer: Optimizer) -> None:
    """Mark ``optimizer.step`` the way ``LRScheduler`` marks the optimizer it was built on.

    Schedulers rebound to a new optimizer otherwise warn that ``optimizer.step()`` was overridden.
    """
    step = optimizer.step

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


class ZeroOrder(Callback):
    """Train with zeroth-order steps: two forward passes per step, no backward, inference memory.

    ``Trainer(callbacks=[ZeroOrder(lr=1e-6, eps=1e-3)])`` on any LightningModule: its
    ``training_step`` and ``configure_optimizers`` stay as written; each configured optimizer is
    replaced by the ZO rule ``optimizer`` over the same parameter groups (per-group lr and
    weight decay carry over; ``lr`` overrides them, schedulers then scale from it).

    Args:
        optimizer: a rule name from ``lightning_zobi.zo.OPTIMIZERS`` (default ``"zo_sgd"``, MeZO).
        lr: learning rate overriding the module's (ZO wants ~1e-7..1e-6 for full-parameter LLMs,
            ~1e-4..1e-3 for LoRA). ``None`` keeps the module's groups' rates.
        eps: perturbation scale ε (MeZO: 1e-3).
        queries: directions averaged per step.
        difference: ``"central"`` or ``"forward"``.
        params: which parameters the ZO rule trains: "trainable" (requires_grad: a peft model
            just works), "all", "lora" (names containing ``lora_``), or a regex over names.
        seed: run seed naming every direction (saved in checkpoints; resume is exact).
        max_nonfinite: consecutive NaN/inf losses skipped before the run stops with an error.
        optimizer_kwargs: extra arguments of the chosen rule (e.g. ``{"momentum": 0.9}``).

    Memory: the ZO rule's state only (none for ZO-SGD); no gradients, no activations kept.
    Logs ``zo/projected_grad`` and ``zo/nonfinite_skips`` each step.
    """

    def __init__(
        self,
        optimizer: str = "zo_sgd",
        lr: float | None = None,
        eps: float = 1e-3,
        queries: int = 1,
        difference: str = "central",
        params: str = "trainable",
        seed: int = 0,
        max_nonfinite: int = 5,
        optimizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer={optimizer!r} is not a known ZO rule; choose one of {sorted(OPTIMIZERS)}."
            )
        if lr is not None and not lr >= 0:
            raise ValueError(f"lr={lr!r} is invalid: use a learning rate >= 0, or None to keep the module's.")
        if not eps > 0:
            raise ValueError(f"eps={eps!r} is invalid: the perturbation scale must be > 0 (e.g. 1e-3).")
        self.optimizer = optimizer
        self.lr = lr
        self.eps = eps
        self.queries = queries
        self.difference = difference
        self.params = params
        self.seed = seed
        self.max_nonfinite = max_nonfinite
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.zo_optimizers: list[ZOOptimizer] = []
        self._unwrap: Callable[[], None] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(optimizer=self.optimizer, params=self.params, seed=self.seed)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        precision = str(trainer.precision)
        if precision == "16-mixed":
            raise ValueError(
                f"ZeroOrder cannot run with precision={precision!r}: fp16 mixed precision steps through a "
                "GradScaler, which calls optimizer.step() without the closure a ZO step needs. Use "
                "precision='bf16-mixed' (or '32-true')."
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"ZeroOrder cannot accumulate gradients (accumulate_grad_batches={trainer.accumulate_grad_batches}): "
                "a ZO step estimates its gradient on one batch. Raise the batch size or ZeroOrder(queries=...) instead."
            )

    def build(self, pl_module: nn.Module, optimizer: Optimizer) -> ZOOptimizer:
        """A ZO rule over ``optimizer``'s parameter groups restricted to the selected parameters."""
        selected = {id(p): n for n, p in select_parameters(pl_module, self.params)}
        groups = []
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if id(p) in selected]
            if params:
                rest = {k: v for k, v in group.items() if k not in ("params", "param_names")}
                groups.append({**rest, "params": params, "param_names": [selected[id(p)] for p in params]})
        if not groups:
            raise ValueError(
                f"ZeroOrder(params={self.params!r}) selected parameters that the module's optimizer does not "
                "hold; configure_optimizers must include them."
            )
        for group in groups:
            group.setdefault("weight_decay", 0.0)
        zo = build_optimizer(
            self.optimizer,
            groups,
            lr=self.lr if self.lr is not None else groups[0]["lr"],
            eps=self.eps,
            queries=self.queries,
            difference=self.difference,
            seed=self.seed,
            max_nonfinite=self.max_nonfinite,
            **self.optimizer_kwargs,
        )
        if self.lr is not None:
            for group in zo.param_groups:
                group["lr"] = (
                    self.lr * group["lr"] / group.get("initial_lr", group["lr"]) if group["lr"] else 0.0
                )
                group["initial_lr"] = self.lr
        zo.no_grad_params = list(pl_module.parameters())
        _track_step_calls(zo)
        return zo

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        old = list(strategy.optimizers)
        if not old:
            raise ValueError(
                "ZeroOrder needs configure_optimizers to return an optimizer: its parameter groups and lr "
                "become the ZO optimizer's."
            )
        new = [self.build(pl_module, opt) for opt in old]
        for config in strategy.lr_scheduler_configs:
            scheduler = config.scheduler
            index = next(i for i, opt in enumerate(old) if opt is scheduler.optimizer)
            scheduler.optimizer = new[index]
            if self.lr is not None and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [self.lr for _ in scheduler.base_lrs]
        strategy.optimizers = new
        self.zo_optimizers = new
        for zo in new:
            if isinstance(zo, ZOFOHybrid):
                zo.graph_loss_source = self._capture_training_loss(pl_module)
            # the fused CUDA path may leave the next step's +εz folded into the weights; its guard
            # removes it before any forward outside a ZO step (validation) and any state_dict
            if hasattr(zo, "guard"):
                zo.guard(pl_module)
        if pl_module.automatic_optimization:
            trainer.fit_loop._skip_backward = True

    def _capture_training_loss(self, pl_module: pl.LightningModule) -> Callable[[], Tensor | None]:
        """Keep the graph-carrying loss of the latest ``training_step`` for the ZO/FO hybrid.

        Lightning's closure hands the optimizer a detached loss when backward is skipped; the
        hybrid's first-order subset needs the loss with its graph, so ``training_step`` is wrapped
        (and unwrapped on fit end) to remember it.
        """
        original = pl_module.training_step
        latest: dict[str, Tensor | None] = {"loss": None}

        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            latest["loss"] = out.get("loss") if isinstance(out, Mapping) else out
            return out

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._unwrap = lambda: setattr(pl_module, "training_step", original)
        return lambda: latest["loss"]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for i, zo in enumerate(self.zo_optimizers):
            estimate = zo.last_estimate
            if estimate is None:
                continue
            suffix = f"_{i}" if len(self.zo_optimizers) > 1 else ""
            g = sum(abs(v) for v in estimate.projected_grads) / len(estimate.projected_grads)
            pl_module.log(f"zo/projected_grad{suffix}", g, on_step=True, on_epoch=False)
            pl_module.log(
                f"zo/nonfinite_skips{suffix}", float(zo.nonfinite_total), on_step=True, on_epoch=False
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.fit_loop._skip_backward = False
        for zo in self.zo_optimizers:
            if hasattr(zo, "unguard"):
                zo.unguard()
        if self._unwrap is not None:
            self._unwrap()
            self._unwrap = None
