"""``ZeroOrder``: turn an existing LightningModule into a forward-only (zeroth-order) learner.

How it hooks into Lightning, and why there. In automatic optimization Lightning wraps
``training_step`` + ``zero_grad`` + ``backward`` in a ``Closure`` and hands it to
``Precision.optimizer_step``, which calls ``optimizer.step(closure)``
(``loops/optimization/automatic.py``). Setting ``trainer.fit_loop._skip_backward = True`` (the flag
Lightning's own ``StochasticWeightAveraging`` uses) removes ``zero_grad`` and ``backward`` from
that closure, leaving exactly what a ZO optimizer needs: a callable that runs the user's unchanged
``training_step`` and returns the loss. So the callback only has to

1. on ``setup`` (each process, before any checkpoint is read), refuse what would be silently
   wrong: a multi-process strategy that all-reduces gradients (``ddp``, ``fsdp``, ``deepspeed``:
   a ZO step has none, the replicas would drift apart), fp16's ``GradScaler``, gradient
   accumulation; and take ``gradient_clip_val`` over as a clamp of the projected gradient;
2. on ``on_load_checkpoint`` (resume), compare the checkpoint's run seed with ``seed``;
3. on ``on_fit_start`` (after ``Strategy.setup`` built the module's optimizers, before a checkpoint's
   optimizer state is restored into them), replace each configured optimizer by a ZO rule over the
   same parameter groups and hyperparameters, rebinding LR schedulers to it, and attach the rule
   to the module (``opt.attach(module)``: shared RNG, eval-mode forwards);
4. switch backward off.

The closure is then called 2 (or more) times per step at perturbed parameters; the ZO optimizer
switches ``requires_grad`` off meanwhile, so no graph or ``.grad`` is ever made even though
Lightning's closure runs under ``torch.enable_grad``. ``bf16-mixed`` and ``bf16-true`` work (their
plugins pass the closure through); ``16-mixed`` is refused because its ``GradScaler`` steps without
the closure. A checkpoint's ZO optimizer groups carry a ``"zo_rule"`` tag, so resuming it without
this callback fails at the first step instead of continuing as first-order training
(:func:`lightning_zobi.lightning.checkpoint_io.refuse_zo_state_in_first_order_optimizer`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_zobi.lightning.callbacks.flatness import FlatnessMonitor
from lightning_zobi.lightning.checkpoint_io import ZO_GROUP_TAG, install_zo_resume_guard
from lightning_zobi.lightning.strategies import ZODDPStrategy, ZOFSDPStrategy
from lightning_zobi.zo.optim import OPTIMIZERS, ZOFOHybrid, ZOOptimizer, build_optimizer
from lightning_zobi.zo.params import select_parameters


def rule_names() -> Any:
    """The rule names registered in ``lightning_zobi.zo.OPTIMIZERS`` now, as a ``Literal``."""
    return Literal[tuple(OPTIMIZERS)]


ZORuleName = rule_names()
"""``Literal`` of the ZO rule names, so a config typo fails at parse time with the choices listed. Rules
registered after this module is imported join it through :func:`refresh_rule_names` (the ``zobi`` CLI calls it
before parsing; jsonargparse reads the annotation then)."""


def refresh_rule_names() -> None:
    """Rebind :data:`ZORuleName` to the registry as it is now."""
    global ZORuleName
    ZORuleName = rule_names()


Difference = Literal["central", "forward"]
ForwardMode = Literal["train", "eval"]
RNGMode = Literal["shared", "independent"]
Perturbation = Literal["exact", "inplace"]

FORWARD_MODES: tuple[str, ...] = get_args(ForwardMode)
RNG_MODES: tuple[str, ...] = get_args(RNGMode)
PERTURBATIONS: tuple[str, ...] = get_args(Perturbation)
NO_DECAY_NAMES = ("bias", "norm", "ln")
"""Substrings (of the lower-cased parameter name) that MeZO exempts from weight decay, besides 1-D tensors."""

ZO_LR_RANGE = "use 1e-7..1e-6 for full-parameter tuning (MeZO) and 1e-4..1e-3 for LoRA"

MANUAL_OPTIMIZATION = (
    "{name} under manual optimization needs the loss as a closure: in training_step call "
    "`opt.step(closure=lambda: self.loss(batch))` (no manual_backward, no opt.zero_grad), because a ZO step "
    "evaluates the loss itself at perturbed parameters; opt.step() without a closure gives it nothing to evaluate."
)


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


def _require_closure_loss(optimizer: Optimizer, name: str) -> None:
    """Under manual optimization, turn a closure that returns nothing into the error that names the fix.

    ``LightningOptimizer.step()`` without a closure passes Lightning's ``do_nothing_closure``,
    which returns ``None``: the ZO core would only say that the closure returned no loss.
    """
    step = optimizer.step

    @functools.wraps(step)
    def wrapper(closure: Callable[[], Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        if closure is None:
            raise ValueError(MANUAL_OPTIMIZATION.format(name=name))

        def checked() -> Any:
            loss = closure()
            if loss is None:
                raise ValueError(MANUAL_OPTIMIZATION.format(name=name))
            return loss

        return step(checked, *args, **kwargs)

    optimizer.step = wrapper  # type: ignore[method-assign]


def is_no_decay(name: str, param: Tensor) -> bool:
    """MeZO's rule: biases, norm weights (names with 'bias'/'norm'/'ln', any case) and 1-D tensors get no decay."""
    lower = name.lower()
    return param.ndim < 2 or any(part in lower for part in NO_DECAY_NAMES)


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value is not None and value not in allowed:
        raise ValueError(
            f"{name}={value!r} is invalid: choose one of {list(allowed)} (or None for the rule's default)."
        )


class ZeroOrder(Callback):
    """Train with zeroth-order steps: two forward passes per step, no backward, inference memory.

    ``Trainer(callbacks=[ZeroOrder(lr=1e-6, eps=1e-3)])`` on any LightningModule: its
    ``training_step`` and ``configure_optimizers`` stay as written; each configured optimizer is
    replaced by the ZO rule ``optimizer`` over the same parameter groups (per-group lr and
    weight decay carry over; ``lr`` overrides them, schedulers then scale from it). One line at
    fit start says what was inherited (lr and weight decay per group, tensors decayed / not).

    Args:
        optimizer: a rule name from ``lightning_zobi.zo.OPTIMIZERS`` (default ``"zo_sgd"``, MeZO).
        lr: learning rate overriding the module's. ZO wants far smaller rates than first-order
            training: 1e-7..1e-6 for full-parameter tuning (MeZO, arXiv 2305.17333),
            1e-4..1e-3 for LoRA. ``None`` keeps the module's groups' rates and warns once, since a
            first-order rate (e.g. 0.1) makes a ZO run diverge.
        eps: perturbation scale ε (MeZO: 1e-3).
        queries: directions averaged per step.
        difference: ``"central"`` or ``"forward"``.
        params: which parameters the ZO rule trains: "trainable" (requires_grad: a peft model
            just works), "all", "lora" (names containing ``lora_``), or a regex over names.
        seed: run seed naming every direction. It is saved in checkpoints; on resume the
            checkpoint's seed is used (so the resumed run is the same run) and a different
            ``seed`` here is reported in one warning.
        max_nonfinite: consecutive NaN/inf losses skipped before the run stops with an error.
        forward_mode: ``"train"`` runs the ZO forwards with the module in train mode (dropout on,
            made harmless by ``rng="shared"``); ``"eval"`` runs them in eval mode, as MeZO does.
            ``None``: the rule's default (``"train"``).
        rng: ``"shared"``: both forwards of a query replay the same CPU/CUDA RNG state, so dropout
            masks, sampled noise and timesteps drawn in ``training_step`` match and ``g`` is the
            directional derivative for that draw; ``"independent"``: each forward draws afresh
            (the finite difference then measures the draw's noise: with dropout 0.1 a GPT-2 does
            not learn). ``None``: the rule's default (``"shared"``).
        perturbation: ``"exact"``: θ is never written by a perturbation (``θ ± εz`` is
            materialised just in time), so lr = 0 leaves every parameter bit-identical in every
            dtype; ``"inplace"``: MeZO's in-place ``θ += εz`` (rounds in bf16/fp16). ``None``: the
            rule's default (``"exact"``).
        stochastic_rounding: round the update stochastically (seeded by run seed and step, so
            resume stays exact) so that sub-ulp bf16/fp16 updates are not lost; ``None``: on for
            bf16/fp16 parameters.
        exclude_bias_and_norm: MeZO's weight decay: when a configured group mixes weights with
            biases / norm weights (1-D tensors, names containing 'bias', 'norm', 'ln') and no group
            of the module already has ``weight_decay=0``, the latter are split off with no decay.
            ``False`` decays exactly as the module's groups say.
        optimizer_kwargs: extra arguments of the chosen rule (e.g. ``{"momentum": 0.9}``).
        log_hessian_trace_every: log ``zo/hessian_trace``, a forward-only Hutchinson estimate of
            the loss Hessian's trace ("Zeroth-Order Optimization Finds Flat Minima", arXiv
            2506.05454), every N steps (``2·hessian_trace_probes + 1`` extra forwards each time;
            :class:`~lightning_zobi.lightning.callbacks.flatness.FlatnessMonitor` does the work).

    Gradient clipping: ``Trainer(gradient_clip_val=c)`` clamps each query's projected gradient
    ``g = (L+ − L−)/2ε`` to ``[−c, c]`` before the update (``gradient_clip_algorithm`` "norm" and
    "value" mean the same for one scalar; it is QZO's directional-derivative clipping), the ZO
    counterpart of bounding a step. Lightning's own clipping of ``.grad`` is switched off for the
    fit (a ZO step has no ``.grad``) and restored after it.

    Strategies: one process, ``"zo_ddp"`` (all-reduces the projected gradients) or ``"zo_fsdp"``.
    ``ddp``, ``ddp_spawn``, ``fsdp``, ``deepspeed`` and other multi-process strategies are refused
    at setup: they average gradients in backward, which a ZO step never runs.

    Manual optimization (``automatic_optimization = False``) works when ``training_step`` steps
    with a closure that returns the loss, ``self.optimizers().step(closure=lambda: loss_of(batch))``,
    with no ``manual_backward``; ``opt.step()`` without a closure is an error naming that pattern.

    Memory: the ZO rule's state only (none for ZO-SGD); no gradients, no activations kept.
    Logs ``zo/projected_grad`` and ``zo/nonfinite_skips`` each step.
    """

    def __init__(
        self,
        optimizer: ZORuleName = "zo_sgd",
        lr: float | None = None,
        eps: float = 1e-3,
        queries: int = 1,
        difference: Difference = "central",
        params: str = "trainable",
        seed: int = 0,
        max_nonfinite: int = 5,
        forward_mode: ForwardMode | None = None,
        rng: RNGMode | None = None,
        perturbation: Perturbation | None = None,
        stochastic_rounding: bool | None = None,
        exclude_bias_and_norm: bool = True,
        optimizer_kwargs: dict[str, Any] | None = None,
        log_hessian_trace_every: int | None = None,
        hessian_trace_probes: int = 8,
    ) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer={optimizer!r} is not a known ZO rule; choose one of {sorted(OPTIMIZERS)}."
            )
        if lr is not None and not lr >= 0:
            raise ValueError(f"lr={lr!r} is invalid: use a learning rate >= 0, or None to keep the module's.")
        if not eps > 0:
            raise ValueError(f"eps={eps!r} is invalid: the perturbation scale must be > 0 (e.g. 1e-3).")
        _choice("forward_mode", forward_mode, FORWARD_MODES)
        _choice("rng", rng, RNG_MODES)
        _choice("perturbation", perturbation, PERTURBATIONS)
        self.optimizer = optimizer
        self.lr = lr
        self.eps = eps
        self.queries = queries
        self.difference = difference
        self.params = params
        self.seed = seed
        self.max_nonfinite = max_nonfinite
        self.forward_mode = forward_mode
        self.rng = rng
        self.perturbation = perturbation
        self.stochastic_rounding = stochastic_rounding
        self.exclude_bias_and_norm = exclude_bias_and_norm
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.flatness = (
            FlatnessMonitor(every_n_steps=log_hessian_trace_every, probes=hessian_trace_probes, seed=seed)
            if log_hessian_trace_every is not None
            else None
        )
        self.projected_grad_clip: float | None = None
        self.zo_optimizers: list[ZOOptimizer] = []
        self._unwrap: Callable[[], None] | None = None
        self._lightning_clip: tuple[Any, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(optimizer=self.optimizer, params=self.params, seed=self.seed)

    @property
    def name(self) -> str:
        return type(self).__name__

    def core_kwargs(self) -> dict[str, Any]:
        """The ZO core's options this callback passes to the rule (only those set, so the rule's defaults hold)."""
        given = {
            "forward_mode": self.forward_mode,
            "rng": self.rng,
            "perturbation": self.perturbation,
            "stochastic_rounding": self.stochastic_rounding,
            "projected_grad_clip": self.projected_grad_clip,
        }
        return {k: v for k, v in given.items() if v is not None}

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        install_zo_resume_guard()
        strategy = trainer.strategy
        if isinstance(strategy, ParallelStrategy) and not isinstance(
            strategy, (ZODDPStrategy, ZOFSDPStrategy)
        ):
            raise ValueError(
                f"{self.name} cannot run under strategy={type(strategy).__name__} "
                f"({getattr(strategy, 'world_size', '?')} processes): it averages gradients in backward, which a "
                "ZO step never runs, so each rank would apply its own projected gradient and the replicas would "
                'silently diverge. Use Trainer(strategy="zo_ddp") (all-reduces the projected gradients; '
                '"zo_fsdp" for a sharded model).'
            )
        precision = str(trainer.precision)
        if precision == "16-mixed":
            raise ValueError(
                f"{self.name} cannot run with precision={precision!r}: fp16 mixed precision steps through a "
                "GradScaler, which calls optimizer.step() without the closure a ZO step needs. Use "
                "precision='bf16-mixed' (or '32-true')."
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"{self.name} cannot accumulate gradients (accumulate_grad_batches={trainer.accumulate_grad_batches}): "
                "a ZO step estimates its gradient on one batch. Raise the batch size or ZeroOrder(queries=...) instead."
            )
        clip = trainer.gradient_clip_val
        if clip:  # Lightning: None or 0 means no clipping
            if not (isinstance(clip, (int, float)) and clip > 0 and math.isfinite(clip)):
                raise ValueError(
                    f"gradient_clip_val={clip!r} is invalid for {self.name}: it bounds each projected gradient to "
                    "[-c, c], so use a finite float > 0 (or None)."
                )
            self.projected_grad_clip = float(clip)
            # a ZO step leaves no .grad: Lightning's clip_grad_value_ would fail on the empty list
            self._lightning_clip = (trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
            trainer.gradient_clip_val = None
        else:
            self.projected_grad_clip = None

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Say which run seed the resumed run uses when ``seed`` differs from the checkpoint's."""
        seeds = {
            int(state["zo"]["seed"])
            for state in checkpoint.get("optimizer_states", [])
            if isinstance(state, Mapping) and isinstance(state.get("zo"), Mapping) and "seed" in state["zo"]
        }
        if seeds and seeds != {int(self.seed)}:
            used = ", ".join(str(s) for s in sorted(seeds))
            rank_zero_warn(
                f"{self.name}(seed={self.seed}) differs from the checkpoint's run seed {used}: the resumed run uses "
                f"seed {used}, so it replays the directions of the run it continues (start without ckpt_path for a "
                "new seed)."
            )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Tag the ZO optimizers' saved groups, so that loading them into a first-order optimizer fails loudly."""
        for state in checkpoint.get("optimizer_states", []):
            if isinstance(state, Mapping) and "zo" in state:
                for group in state.get("param_groups", []):
                    group[ZO_GROUP_TAG] = self.optimizer

    # ------------------------------------------------------------------ building the rule
    def _groups(self, pl_module: nn.Module, optimizer: Optimizer) -> tuple[list[dict[str, Any]], bool]:
        """``optimizer``'s groups restricted to the selected parameters, MeZO's decay split applied.

        Returns the groups and whether biases / norm weights were split off.
        """
        selected = {id(p): n for n, p in select_parameters(pl_module, self.params)}
        user_separated = any(not g.get("weight_decay", 0.0) for g in optimizer.param_groups)
        groups, split = [], False
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if id(p) in selected]
            if not params:
                continue
            rest = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            rest.setdefault("weight_decay", 0.0)
            if self.exclude_bias_and_norm and rest["weight_decay"] and not user_separated:
                plain = [p for p in params if is_no_decay(selected[id(p)], p)]
                decayed = [p for p in params if not is_no_decay(selected[id(p)], p)]
                if plain and decayed:
                    split = True
                    for part, wd in ((decayed, rest["weight_decay"]), (plain, 0.0)):
                        names = [selected[id(p)] for p in part]
                        groups.append({**rest, "weight_decay": wd, "params": part, "param_names": names})
                    continue
            groups.append({**rest, "params": params, "param_names": [selected[id(p)] for p in params]})
        if not groups:
            raise ValueError(
                f"{self.name}(params={self.params!r}) selected parameters that the module's optimizer does not "
                "hold; configure_optimizers must include them."
            )
        return groups, split

    def build(self, pl_module: nn.Module, optimizer: Optimizer) -> ZOOptimizer:
        """A ZO rule over ``optimizer``'s parameter groups restricted to the selected parameters."""
        groups, split = self._groups(pl_module, optimizer)
        lr = self.lr if self.lr is not None else groups[0]["lr"]
        zo = build_optimizer(
            self.optimizer,
            groups,
            lr=lr,
            eps=self.eps,
            queries=self.queries,
            difference=self.difference,
            seed=self.seed,
            max_nonfinite=self.max_nonfinite,
            **self.core_kwargs(),
            **self.optimizer_kwargs,
        )
        if self.lr is not None:
            for group in zo.param_groups:
                group["lr"] = (
                    self.lr * group["lr"] / group.get("initial_lr", group["lr"]) if group["lr"] else 0.0
                )
                group["initial_lr"] = self.lr
        zo.no_grad_params = list(pl_module.parameters())
        self._report(optimizer, zo, split)
        return zo

    def _report(self, source: Optimizer, zo: ZOOptimizer, split: bool) -> None:
        """One line: what the ZO rule inherited (lr, weight decay per group, decayed / not decayed tensors)."""
        if self.lr is None:
            rank_zero_warn(
                f"{self.name}: no lr given, so the module's optimizer lr {source.param_groups[0]['lr']:g} is used for "
                f"the ZO steps; ZO needs far smaller rates than first-order training ({ZO_LR_RANGE}): set "
                f"{self.name}(lr=...)."
            )
        parts, decayed, plain = [], 0, 0
        for group in zo.param_groups:
            n = len(group["params"])
            parts.append(f"lr {group['lr']:g} wd {group.get('weight_decay', 0.0):g} x{n}")
            if group.get("weight_decay", 0.0):
                decayed += n
            else:
                plain += n
        how = " (biases/norm weights split off, as MeZO)" if split else ""
        rank_zero_info(
            f"{self.name}: {type(zo).__name__} inherited from {type(source).__name__} "
            f"{'' if self.lr is None else f'(lr overridden to {self.lr:g}) '}"
            f"{len(zo.param_groups)} group(s) [{'; '.join(parts)}]: weight decay on {decayed} tensors, "
            f"none on {plain}{how}."
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        old = list(strategy.optimizers)
        if not old:
            raise ValueError(
                f"{self.name} needs configure_optimizers to return an optimizer: its parameter groups and lr "
                "become the ZO optimizer's."
            )
        new = [self.build(pl_module, opt) for opt in old]
        for config in strategy.lr_scheduler_configs:
            scheduler = config.scheduler
            index = next(i for i, opt in enumerate(old) if opt is scheduler.optimizer)
            scheduler.optimizer = new[index]
            if self.lr is not None and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [self.lr for _ in scheduler.base_lrs]
        for zo in new:
            if hasattr(zo, "attach"):  # shared RNG and eval-mode forwards act on the module
                zo.attach(pl_module)
            if not pl_module.automatic_optimization:
                _require_closure_loss(zo, self.name)
            _track_step_calls(zo)
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
        if self.flatness is not None:
            self.flatness.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.fit_loop._skip_backward = False
        for zo in self.zo_optimizers:
            if hasattr(zo, "unguard"):
                zo.unguard()
        if self._unwrap is not None:
            self._unwrap()
            self._unwrap = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._lightning_clip is not None:
            trainer.gradient_clip_val, trainer.gradient_clip_algorithm = self._lightning_clip
            self._lightning_clip = None
