"""``Bilevel``: train a LightningModule as a bilevel problem with a solver from ``lightning_zobi.bilevel``.

How it hooks into Lightning, and why there. A bilevel step evaluates two losses several times at
different parameters (the inner copy ``z`` swapped in, a ZO perturbation of the base weights) and
updates two parameter sets, which Lightning's one-loss closure cannot express. So, on
``on_fit_start`` (after ``Strategy.setup`` built the module's optimizer, before a checkpoint's
optimizer state is restored into it), the callback

1. builds a :class:`~lightning_zobi.bilevel.BilevelProblem` from the module (``upper_loss`` /
   ``lower_loss``, a ``training_step`` returning ``{"upper", "lower"}``, or the module's own loss on
   two keys / two halves of the batch) and the chosen solver around the module's configured
   optimizer (its groups, rates and LR scheduler are kept as they are);
2. makes Lightning's ``training_step`` call run one solver step (the module's method is shadowed
   on the instance for the fit and restored after), so it still runs under Lightning's precision
   context, logging context and hooks; it returns the penalized objective for the progress bar;
3. switches Lightning's backward off (``trainer.fit_loop._skip_backward = True``, as ``ZeroOrder``
   and Lightning's ``StochasticWeightAveraging`` do) and hands Lightning a thin optimizer whose
   ``step(closure)`` only runs the closure: the solver has already stepped the real optimizer.
   It shares the real optimizer's ``param_groups`` and ``state`` (schedulers, LR monitors and
   checkpoints see the module's optimizer).

The solver's own state (step counter, the copy ``z``, the ZO rule's seed and step) is saved in the
checkpoint through this callback's ``state_dict`` and restored on resume.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim import Optimizer

from lightning_zobi.bilevel import SOLVERS, BilevelProblem, BilevelSolver, GammaSchedule
from lightning_zobi.lightning.callbacks import zero_order
from lightning_zobi.lightning.callbacks.zero_order import Difference

_DEFAULT_PARAMS = {
    "penalty": ("trainable", "trainable"),
    "vf_free": ("trainable", "trainable"),
    "zofo": ("base", "lora"),
}


class _ClosureOnly(Optimizer):
    """What Lightning steps: runs the closure (one solver step); the real optimizer stepped inside it.

    Shares ``param_groups``/``state`` with the module's optimizer and delegates ``state_dict``, so LR
    schedulers, ``LearningRateMonitor`` and checkpoints keep working on the real one.
    """

    def __init__(self, inner: Optimizer) -> None:
        super().__init__(inner.param_groups, inner.defaults)
        self.inner = inner
        self.param_groups = inner.param_groups
        self.state = inner.state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if closure is None:
            raise TypeError(
                "The Bilevel callback's optimizer needs Lightning's closure (it runs the solver step)."
            )
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


class SolverCallback(Callback):
    """What the solver callbacks (:class:`Bilevel`, ``Reweighting``) share: undo their wiring and keep the solver's state.

    A subclass sets ``solver`` (with ``state_dict``/``load_state_dict``), ``_inner_optimizer`` (the
    module's optimizer it replaced, or None) and ``_pending_state``; it patches ``training_step`` on
    the module and sets ``fit_loop._skip_backward``. Fit end and exceptions restore all three, and
    the solver's state is checkpointed (restored before the solver exists: kept until then).
    """

    solver: Any = None
    _inner_optimizer: Optimizer | None = None
    _pending_state: dict[str, Any] | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore(trainer, pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore(trainer, pl_module)

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "training_step" in vars(pl_module):
            del pl_module.training_step
        if self._inner_optimizer is not None:
            trainer.strategy.optimizers = [self._inner_optimizer]
            self._inner_optimizer = None
        trainer.fit_loop._skip_backward = False

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The solver's state (step, γ position, ``z``, ZO seeds and steps, ...) for the checkpoint."""
        if self.solver is not None:
            return self.solver.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restored before the solver exists (Lightning restores callbacks before on_fit_start): kept until then."""
        if not state_dict:
            return
        if self.solver is not None:
            self.solver.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)


class Bilevel(SolverCallback):
    """Solve ``min f(x, y) s.t. y ∈ argmin g(x, y)`` with the module's losses and a bilevel solver.

    ``Trainer(callbacks=[Bilevel(solver="penalty", gamma=10.0, inner_steps=3)])`` on a module that
    defines ``upper_loss(self, batch)`` (``f``) and ``lower_loss(self, batch)`` (``g``), or whose
    ``training_step`` returns ``{"upper": f, "lower": g}``, or with ``upper_key``/``lower_key`` (a
    ``CombinedLoader`` batch) or ``split_batch=True`` (two halves of each batch) on any module whose
    ``training_step`` returns its loss. The module's ``configure_optimizers`` provides the
    first-order optimizer (and LR schedule) of the first-order updates.

    Args:
        solver: ``"penalty"`` (value-function penalty with inner copy ``z``; Shen & Chen arXiv
            2302.05185, Kwon et al. arXiv 2309.01753), ``"vf_free"`` (single loop on ``f + γ g``;
            Jiang et al. arXiv 2507.20400) or ``"zofo"`` (first-order LoRA lower level, ZO base-model
            upper level; Shirkavand et al. arXiv 2502.03604).
        gamma: penalty constant γ (the final value when ramped).
        gamma_schedule: ``"constant"``, ``"linear"`` or ``"geometric"`` ramp from ``gamma_init``.
        gamma_init: start of the ramp (default ``gamma / 100``).
        gamma_ramp_steps: steps of the ramp.
        inner_steps: ``K``, inner steps per step (penalty: on ``z``; zofo: on ``z`` and the adapter).
        inner_lr: step of the inner copy ``z`` (SGD: about ``1/L`` of the lower loss).
        inner_optimizer: ``"sgd"`` or ``"adam"`` for ``z``; match the module's optimizer family so
            ``z`` keeps up with ``y`` (a negative logged gap says it does not).
        upper_params, lower_params: parameter sets ``x``/``y``: ``"trainable"``, ``"lora"``,
            ``"base"`` (non-LoRA), ``"all"`` or a regex over names; ``None`` picks the solver's
            default (penalty/vf_free: trainable/trainable; zofo: base/lora). A module's
            ``bilevel_parameters()`` wins over both.
        upper_key, lower_key: keys of a combined batch whose sub-batches feed ``training_step``.
        split_batch: ``f`` on the first half of each batch, ``g`` on the second.
        reset_inner: re-copy ``z ← y`` before each inner loop instead of warm-starting.
        zo_optimizer, zo_lr, eps, queries, difference, seed, max_nonfinite, zo_kwargs: the ZO rule
            of the zofo upper level (ignored by the first-order solvers).
        log_prefix: prefix of the logged keys ``f``, ``g``, ``gap``, ``gamma``, ``objective``.

    Memory: the solver's (see its docstring): ``z`` is one copy of the lower parameters.
    Gradient clipping by norm (``Trainer(gradient_clip_val=...)``) is applied by the solver.
    """

    def __init__(
        self,
        solver: Literal["penalty", "vf_free", "zofo"] = "penalty",
        gamma: float = 10.0,
        gamma_schedule: Literal["constant", "linear", "geometric"] = "constant",
        gamma_init: float | None = None,
        gamma_ramp_steps: int = 1000,
        inner_steps: int = 1,
        inner_lr: float = 1e-2,
        inner_optimizer: Literal["sgd", "adam"] = "sgd",
        upper_params: str | None = None,
        lower_params: str | None = None,
        upper_key: str | None = None,
        lower_key: str | None = None,
        split_batch: bool = False,
        reset_inner: bool = False,
        zo_optimizer: zero_order.ZORuleName = "zo_sgd",
        zo_lr: float = 1e-6,
        eps: float = 1e-3,
        queries: int = 1,
        difference: Difference = "central",
        seed: int = 0,
        max_nonfinite: int = 5,
        zo_kwargs: dict[str, Any] | None = None,
        log_prefix: str = "bilevel/",
    ) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"solver={solver!r} is not a bilevel solver; choose one of {sorted(SOLVERS)}.")
        if split_batch and (upper_key is not None or lower_key is not None):
            raise ValueError(
                "split_batch=True and upper_key/lower_key are two ways to feed f and g; use one."
            )
        self.schedule = GammaSchedule(gamma, gamma_schedule, gamma_init, gamma_ramp_steps)  # validates early
        self.solver_name = solver
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr
        self.inner_optimizer = inner_optimizer
        default_upper, default_lower = _DEFAULT_PARAMS[solver]
        self.upper_params = upper_params if upper_params is not None else default_upper
        self.lower_params = lower_params if lower_params is not None else default_lower
        self.upper_key = upper_key
        self.lower_key = lower_key
        self.split_batch = split_batch
        self.reset_inner = reset_inner
        self.zo_args = dict(
            zo_optimizer=zo_optimizer,
            zo_lr=zo_lr,
            eps=eps,
            queries=queries,
            difference=difference,
            seed=seed,
            max_nonfinite=max_nonfinite,
            zo_kwargs=zo_kwargs,
        )
        self.log_prefix = log_prefix
        self.solver: BilevelSolver | None = None
        self.problem: BilevelProblem | None = None
        self.last_logs: dict[str, float] = {}
        self._pending_state: dict[str, Any] | None = None
        self._inner_optimizer: Optimizer | None = None
        self._module: pl.LightningModule | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(solver=self.solver_name)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if str(trainer.precision) == "16-mixed":
            raise ValueError(
                "Bilevel cannot run with precision='16-mixed': its GradScaler steps the optimizer outside the "
                "solver. Use precision='bf16-mixed' or '32-true'."
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"Bilevel cannot accumulate gradients (accumulate_grad_batches={trainer.accumulate_grad_batches}): "
                "each solver step uses one batch. Raise the batch size instead."
            )
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(
                f"gradient_clip_algorithm={trainer.gradient_clip_algorithm!r} is not supported with Bilevel; the "
                "solver clips by norm (gradient_clip_algorithm='norm')."
            )
        others = [type(cb).__name__ for cb in trainer.callbacks if type(cb).__name__ in ("ZeroOrder", "QZO")]
        if others:
            raise ValueError(
                f"Bilevel cannot be combined with {others}: both replace the optimization step. For a ZO upper "
                "level use Bilevel(solver='zofo')."
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(pl_module).__name__} uses manual optimization; the Bilevel callback drives automatic "
                "optimization. Call a lightning_zobi.bilevel solver's step(batch) from your training_step instead."
            )

    def build(self, pl_module: pl.LightningModule, optimizer: Optimizer) -> BilevelSolver:
        """The problem from the module and the solver around ``optimizer`` (the module's first-order one)."""
        user_step = type(pl_module).training_step.__get__(pl_module)
        self.problem = BilevelProblem.from_module(
            pl_module,
            self.upper_params,
            self.lower_params,
            upper_key=self.upper_key,
            lower_key=self.lower_key,
            split_batch=self.split_batch,
            step_fn=user_step,
        )
        clip = pl_module.trainer.gradient_clip_val if pl_module._trainer is not None else None
        common: dict[str, Any] = dict(gamma=self.schedule, max_grad_norm=float(clip) if clip else None)
        if self.solver_name == "vf_free":
            return SOLVERS["vf_free"](self.problem, optimizer, **common)
        common.update(
            inner_steps=self.inner_steps,
            inner_lr=self.inner_lr,
            inner_optimizer=self.inner_optimizer,
            reset_inner=self.reset_inner,
        )
        if self.solver_name == "penalty":
            return SOLVERS["penalty"](self.problem, optimizer, **common)
        return SOLVERS["zofo"](self.problem, optimizer, **common, **self.zo_args)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        if len(strategy.optimizers) != 1:
            raise ValueError(
                f"Bilevel needs configure_optimizers to return exactly one optimizer (got {len(strategy.optimizers)}): "
                "it makes the first-order updates of the solver."
            )
        inner = strategy.optimizers[0]
        self.solver = self.build(pl_module, inner)
        if self._pending_state is not None:
            self.solver.load_state_dict(self._pending_state)
            self._pending_state = None
        self._inner_optimizer = inner
        self._module = pl_module
        strategy.optimizers = [_ClosureOnly(inner)]
        pl_module.training_step = self._training_step  # type: ignore[method-assign]
        trainer.fit_loop._skip_backward = True

    def _training_step(self, batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> Tensor:
        """One solver step on ``batch``, logged; stands in for the module's training_step during fit."""
        assert self.solver is not None and self.problem is not None and self._module is not None
        self.problem.batch_idx = batch_idx
        logs = self.solver.step(batch)
        self.last_logs = logs
        module = self._module
        for key, value in logs.items():
            module.log(self.log_prefix + key, value, on_step=True, on_epoch=False, prog_bar=key in ("f", "g"))
        return torch.tensor(logs["objective"])
