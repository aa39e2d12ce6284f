"""``Reweighting``: learn one weight per data source while the module trains on the weighted mixture (ScaleBiO).

Hooks and why there, as the ``Bilevel`` callback (same mechanism): on ``on_fit_start`` the callback
builds a :class:`~lightning_zobi.bilevel.DataReweighting` solver around the module's configured
optimizer (``lower="first_order"``) or a ZO rule (``lower="zo"``), shadows ``training_step`` on the
instance with one solver step (so it runs under Lightning's precision and logging contexts), switches
Lightning's backward off (``trainer.fit_loop._skip_backward``) and hands Lightning a thin optimizer
whose ``step(closure)`` only runs the closure. The source weights, the copy ``u`` and the ZO seeds
are saved in the checkpoint through ``state_dict``.

Batches are ``{source: sub-batch, ..., upper_key: validation sub-batch}`` (a ``CombinedLoader``, e.g.
:class:`~lightning_zobi.lightning.datamodules.sources.DigitsSourcesDataModule`). The loss on a
sub-batch is the module's ``source_loss(sub_batch, source)`` when it defines one, else its ordinary
``training_step(sub_batch, batch_idx)`` (the loss, or a dict with ``"loss"``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_zobi.bilevel import DataReweighting, GammaSchedule
from lightning_zobi.bilevel.reweighting import LOWER_MODES, PARAMETRIZATIONS
from lightning_zobi.lightning.callbacks.bilevel import SolverCallback, _ClosureOnly
from lightning_zobi.zo.params import select_parameters


class Reweighting(SolverCallback):
    """ScaleBiO data reweighting (arXiv 2406.19976) as a callback: ``Trainer(callbacks=[Reweighting(sources=[...])])``.

    Logs ``reweight/weight/<source>`` (the learned λ), ``reweight/loss/<source>``, ``reweight/gap/<source>``
    (``ℓ_i(w) − ℓ_i(u)``, the sign of λ's move) and ``reweight/{f,g,gap,objective}``.

    Args:
        sources: the training sources (keys of the combined batch).
        upper_key: key of the validation sub-batch (the upper loss ``f``).
        gamma, gamma_schedule, gamma_init, gamma_ramp_steps: the penalty constant γ and its ramp.
        weight_lr: step of the source weights; parametrization: ``"softmax"`` or ``"simplex"``.
        init_weights: starting weights per source (default uniform).
        inner_steps, inner_lr, inner_optimizer: the copy ``u`` (first order; match the module's
            optimizer family: ``"adam"`` under AdamW).
        lower: ``"first_order"`` (the module's optimizer trains the model) or ``"zo"`` (a ZO rule does).
        params: which parameters train (``"trainable"``, ``"lora"``, ``"base"``, ``"all"`` or a regex).
        zo_optimizer, zo_lr, eps, queries, seed, zo_kwargs: the ZO rule of ``lower="zo"``.
        log_prefix: prefix of the logged keys.
    """

    def __init__(
        self,
        sources: list[str],
        upper_key: str = "val",
        gamma: float = 10.0,
        gamma_schedule: str = "constant",
        gamma_init: float | None = None,
        gamma_ramp_steps: int = 1000,
        weight_lr: float = 0.1,
        parametrization: str = "softmax",
        init_weights: dict[str, float] | None = None,
        inner_steps: int = 1,
        inner_lr: float = 1e-2,
        inner_optimizer: str = "adam",
        lower: str = "first_order",
        params: str = "trainable",
        zo_optimizer: str = "zo_sgd",
        zo_lr: float = 1e-3,
        eps: float = 1e-3,
        queries: int = 1,
        seed: int = 0,
        zo_kwargs: dict[str, Any] | None = None,
        log_prefix: str = "reweight/",
    ) -> None:
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"parametrization={parametrization!r} is invalid: choose one of {list(PARAMETRIZATIONS)}."
            )
        if lower not in LOWER_MODES:
            raise ValueError(f"lower={lower!r} is invalid: choose one of {list(LOWER_MODES)}.")
        if len(sources) < 2 or len(set(sources)) != len(sources) or upper_key in sources:
            raise ValueError(
                f"sources={sources!r} is invalid: name at least two distinct sources, none equal to upper_key={upper_key!r}."
            )
        self.schedule = GammaSchedule(gamma, gamma_schedule, gamma_init, gamma_ramp_steps)  # validates early
        self.sources = list(sources)
        self.upper_key = upper_key
        self.solver_args = dict(
            weight_lr=weight_lr,
            parametrization=parametrization,
            init_weights=init_weights,
            upper_key=upper_key,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            inner_optimizer=inner_optimizer,
            lower=lower,
            zo_optimizer=zo_optimizer,
            zo_lr=zo_lr,
            eps=eps,
            queries=queries,
            seed=seed,
            zo_kwargs=zo_kwargs,
        )
        self.params = params
        self.log_prefix = log_prefix
        self.solver: DataReweighting | None = None
        self.last_logs: dict[str, float] = {}
        self._pending_state: dict[str, Any] | None = None
        self._inner_optimizer: Optimizer | None = None
        self._module: pl.LightningModule | None = None
        self._batch_idx = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sources=tuple(self.sources))

    @property
    def weights(self) -> dict[str, float]:
        """The current source weights (empty before fit)."""
        return self.solver.weights.as_dict() if self.solver is not None else {}

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"Reweighting cannot accumulate gradients (accumulate_grad_batches={trainer.accumulate_grad_batches}): "
                "each step uses one batch per source. Raise the batch sizes instead."
            )
        if str(trainer.precision) == "16-mixed":
            raise ValueError(
                "Reweighting cannot run with precision='16-mixed' (its GradScaler steps outside the solver); use "
                "'bf16-mixed' or '32-true'."
            )
        others = [
            type(cb).__name__
            for cb in trainer.callbacks
            if type(cb).__name__ in ("ZeroOrder", "QZO", "Bilevel")
        ]
        if others:
            raise ValueError(
                f"Reweighting cannot be combined with {others}: both replace the optimization step. For a ZO lower "
                "level use Reweighting(lower='zo')."
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(pl_module).__name__} uses manual optimization; call a lightning_zobi.bilevel.DataReweighting "
                "solver's step(batch) from your training_step instead."
            )

    def _source_loss_fn(self, pl_module: pl.LightningModule) -> Any:
        custom = getattr(pl_module, "source_loss", None)
        if callable(custom):
            return custom
        user_step = type(pl_module).training_step.__get__(pl_module)

        def loss(batch: Any, source: str) -> Tensor:
            out = user_step(batch, self._batch_idx)
            if isinstance(out, dict):
                out = out.get("loss")
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"{type(pl_module).__name__}.training_step returned {type(out).__name__} on the {source!r} batch; "
                    "Reweighting needs the loss tensor (or a dict with 'loss'), or define source_loss(batch, source)."
                )
            return out

        return loss

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        if len(strategy.optimizers) != 1:
            raise ValueError(
                f"Reweighting needs configure_optimizers to return exactly one optimizer (got {len(strategy.optimizers)})."
            )
        inner = strategy.optimizers[0]
        named = select_parameters(pl_module, self.params, argument="params")
        args = dict(self.solver_args)
        self.solver = DataReweighting(
            self.sources,
            self._source_loss_fn(pl_module),
            [p for _, p in named],
            inner if args["lower"] == "first_order" else None,
            self.schedule,
            param_names=[n for n, _ in named],
            max_grad_norm=float(trainer.gradient_clip_val) if trainer.gradient_clip_val else None,
            **args,
        ).attach(pl_module)
        if self._pending_state is not None:
            self.solver.load_state_dict(self._pending_state)
            self._pending_state = None
        self._inner_optimizer = inner
        self._module = pl_module
        strategy.optimizers = [_ClosureOnly(inner)]
        pl_module.training_step = self._training_step  # type: ignore[method-assign]
        trainer.fit_loop._skip_backward = True

    def _training_step(self, batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> Tensor:
        """One reweighting step on the combined batch, logged; stands in for training_step during fit."""
        assert self.solver is not None and self._module is not None
        self._batch_idx = batch_idx
        logs = self.solver.step(batch)
        self.last_logs = logs
        for key, value in logs.items():
            self._module.log(
                self.log_prefix + key, value, on_step=True, on_epoch=False, prog_bar=key.startswith("weight/")
            )
        return torch.tensor(logs["objective"])
