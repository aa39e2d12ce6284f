"""``UnlearningModule``: unlearn a forget set from a causal LM while keeping a retain set.

A :class:`~lightning_zobi.lightning.modules.causal_lm.CausalLMModule` whose ``training_step`` takes
a ``CombinedLoader`` batch ``{"forget": ..., "retain": ...}`` (see
:class:`~lightning_zobi.lightning.datamodules.unlearning.UnlearningDataModule`) and minimizes one
objective of :mod:`lightning_zobi.unlearn.llm` (GA, GradDiff, KL, NPO, SimNPO, RMU, IDK; the
papers are cited there). Three ways to train it, none needing code changes:

* first-order: the module's AdamW, as any LightningModule;
* zeroth-order: add ``lightning_zobi.ZeroOrder`` to the trainer's callbacks; ``training_step`` then
  runs forward-only inside the ZO closure (the reference model's forward is inference anyway);
* bilevel: the ``Bilevel`` callback calls :meth:`upper_loss` (the forget term, on ``batch["forget"]``)
  and :meth:`lower_loss` (the retain term, on ``batch["retain"]``).

Stages pass weights through ``init_from`` (a ``.ckpt`` read with ``weights_only=True``, or a
safetensors file): ``learn_facts`` → ``unlearn_<method>``. Validation runs the unlearning metrics
of :mod:`lightning_zobi.unlearn.metrics` on the datamodule's forget / retain / hold-out loaders and
logs ``val/forget/em``, ``val/retain/em``, ``val/model_utility``, ``val/mia_auc`` and, with
``retain_model_from`` (the retain-only model of ``recipes/llm/retain_only.yaml``),
``val/forget_quality``.

Memory: the trained model and its optimizer state, plus a frozen reference copy of the weights for
the objectives that need one (NPO, KL, RMU); with LoRA (``lora_r > 0``) the reference is the
adapter-disabled base model and costs nothing. ``retain_model_from`` loads one more copy, used
once (the reference truth ratios are cached after the first validation).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_zobi.lightning.datamodules.facts import load_tokenizer
from lightning_zobi.lightning.modules.causal_lm import CausalLMModule, add_adapter, build_causal_lm
from lightning_zobi.unlearn.llm import METHODS, UnlearningObjective, load_weights, untie_lm_head
from lightning_zobi.unlearn.metrics import UnlearningEvaluator, score_batch

_DEFAULT_BETA = {"npo": 0.1, "simnpo": 2.5}
"""The papers' temperatures: NPO (arXiv 2404.05868) 0.1; SimNPO on TOFU (arXiv 2410.07163) 2.5."""


class _AdapterDisabled(nn.Module):
    """A peft model called with its adapter switched off: the pre-unlearning reference, for free."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.peft_model = peft_model

    def forward(self, **kwargs: Any) -> Any:
        with self.peft_model.disable_adapter():
            return self.peft_model(**kwargs)


class UnlearningModule(CausalLMModule):
    """Unlearn ``batch["forget"]`` while keeping ``batch["retain"]`` with a named objective.

    Args:
        model: as :class:`CausalLMModule` (tiny preset, config dict, local path); the architecture
            of the weights in ``init_from``.
        objective: a method of :data:`lightning_zobi.unlearn.llm.METHODS`: ``"ga"``, ``"grad_diff"``,
            ``"kl"``, ``"npo"``, ``"simnpo"``, ``"rmu"``, ``"idk"``, and the open-unlearning methods
            registered by :mod:`lightning_zobi.unlearn.objectives_extra`: ``"idk_dpo"``,
            ``"undial"``, ``"wga"``, ``"satimp"``, ``"ceu"``.
        retain_loss: override the method's retain term (``"none"``, ``"nll"``, ``"kl"``, ``"rmu"``).
        alpha: weight of the retain term; forget_weight: weight of the forget term.
        beta: NPO/SimNPO temperature (None: the paper's, 0.1 / 2.5); gamma: SimNPO margin.
        rmu_layer, rmu_coeff, rmu_seed: RMU's steered layer, steering coefficient and direction seed.
        term_kwargs: hyper-parameters of a registered forget term (e.g. ``{"beta": 10.0}`` for
            UNDIAL, ``{"beta1": 5.0, "beta2": 1.0}`` for SatImp), over open-unlearning's defaults.
        trainable: regex over parameter names; only matching parameters train (RMU updates a few
            layers only). None: all (or the LoRA / IA3 adapter).
        untie_head: give the model an output head of its own (a copy of the input embedding it was
            tied to) after ``init_from`` is loaded. A first-order update of a tied head back-propagates
            through the whole network; an untied one stops at the head, which is what the
            first-order-head / zeroth-order-body hybrid (``ZeroOrder(optimizer="zo_fo_hybrid",
            optimizer_kwargs={"fo_params": "lm_head"})``) needs to keep activation memory small.
        init_from: weights to start from (the ``learn_facts`` checkpoint).
        retain_model_from: weights of a model trained on retain data only (enables forget quality).
        tokenizer: "bytes" or a local tokenizer path (decodes generations for the metrics).
        max_new_tokens: greedy-generation budget of the validation metrics.
        lr, weight_decay, warmup_steps, lora_*, ia3*, dtype, seed: as :class:`CausalLMModule`. With an
            adapter (LoRA or IA3) the NPO/KL reference is the adapter-disabled model: no copy.
    """

    def __init__(
        self,
        model: str | dict[str, Any] = "tiny-llama",
        objective: str = "grad_diff",
        retain_loss: str | None = None,
        alpha: float = 1.0,
        forget_weight: float = 1.0,
        beta: float | None = None,
        gamma: float = 0.0,
        rmu_layer: int = -1,
        rmu_coeff: float = 20.0,
        rmu_seed: int = 0,
        term_kwargs: dict[str, float] | None = None,
        trainable: str | None = None,
        untie_head: bool = False,
        init_from: str | None = None,
        retain_model_from: str | None = None,
        tokenizer: str = "bytes",
        max_new_tokens: int = 32,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lora_r: int = 0,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        ia3: bool = False,
        ia3_target_modules: list[str] | None = None,
        dtype: str | None = None,
        seed: int = 0,
    ) -> None:
        if objective not in METHODS:
            raise ValueError(
                f"objective={objective!r} is not a known method; choose one of {sorted(METHODS)}."
            )
        super().__init__(
            model=model,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            lora_r=0,  # the adapter goes on after init_from is loaded into the plain model
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_target_modules=lora_target_modules,
            dtype=dtype,
            seed=seed,
        )
        self.save_hyperparameters()
        self.objective = UnlearningObjective.from_method(
            objective,
            retain=retain_loss,
            alpha=alpha,
            forget_weight=forget_weight,
            beta=beta if beta is not None else _DEFAULT_BETA.get(objective, 0.1),
            gamma=gamma,
            rmu_layer=rmu_layer,
            rmu_coeff=rmu_coeff,
            rmu_seed=rmu_seed,
            term_kwargs=term_kwargs,
        )
        if init_from is not None:
            load_weights(self.model, init_from)
        if untie_head:
            untie_lm_head(self.model)
        self.model = add_adapter(
            self.model, lora_r, lora_alpha, lora_dropout, lora_target_modules, ia3, ia3_target_modules
        )
        if trainable is not None:
            freeze_except(self.model, trainable)
        reference: nn.Module | None = None
        if self.objective.needs_reference:
            if lora_r > 0 or ia3:
                reference = _AdapterDisabled(self.model)
            else:
                reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        object.__setattr__(self, "_reference", reference)  # not a submodule: not saved, not optimized
        self.tokenizer = load_tokenizer(tokenizer)
        self.evaluator = UnlearningEvaluator()
        self._retain_ratios: list[Tensor] = []
        self._retain_ratios_done = False

    # ------------------------------------------------------------------ reference model
    @property
    def reference(self) -> nn.Module | None:
        """The frozen pre-unlearning model (None when the objective needs none), on this module's device."""
        ref = self._reference
        if ref is not None and not isinstance(ref, _AdapterDisabled):
            p = next(ref.parameters(), None)
            if p is not None and p.device != self.device:
                ref.to(self.device)
        return ref

    # ------------------------------------------------------------------ losses
    @staticmethod
    def _parts(batch: Any) -> tuple[Mapping[str, Tensor], Mapping[str, Tensor]]:
        if not isinstance(batch, Mapping) or "forget" not in batch or "retain" not in batch:
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise TypeError(
                f"UnlearningModule needs batches {{'forget': ..., 'retain': ...}} (a CombinedLoader, e.g. "
                f"UnlearningDataModule); got {got}."
            )
        return batch["forget"], batch["retain"]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        forget, retain = self._parts(batch)
        out = self.objective(self.model, forget, retain, self.reference)
        self.log("train_loss", out["loss"], prog_bar=True, on_step=True, on_epoch=False)
        self.log("unlearn/forget", out["forget"], on_step=True, on_epoch=False)
        self.log("unlearn/retain", out["retain"], on_step=True, on_epoch=False)
        return out["loss"]

    def upper_loss(self, batch: Any) -> Tensor:
        """Bilevel upper loss ``f``: the forget term on ``batch["forget"]``."""
        return self.objective.forget_loss(self.model, self._parts(batch)[0], self.reference)

    def lower_loss(self, batch: Any) -> Tensor:
        """Bilevel lower loss ``g``: the retain term on ``batch["retain"]`` (NLL when the method has none)."""
        return self.objective.retain_loss(self.model, self._parts(batch)[1], self.reference)

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if "split" not in batch:
            raise TypeError(
                "UnlearningModule validates on FactsEvalDataset batches (UnlearningDataModule.val_dataloader)."
            )
        split = batch["split"][0]
        self.evaluator.update(
            split, score_batch(self.model, batch, self.tokenizer, self.hparams.max_new_tokens)
        )
        if split == "forget" and self.hparams.retain_model_from and not self._retain_ratios_done:
            self._retain_ratios.append(self._reference_truth_ratios(batch))

    def _reference_truth_ratios(self, batch: Mapping[str, Any]) -> Tensor:
        from lightning_zobi.unlearn.metrics import truth_ratio, truth_ratio_logprobs

        with self._retain_model() as retain_model, torch.no_grad():
            return truth_ratio(*truth_ratio_logprobs(retain_model, batch)).cpu()

    @contextmanager
    def _retain_model(self) -> Iterator[nn.Module]:
        cached = getattr(self, "_retain_model_cache", None)
        if cached is None:
            cached = build_causal_lm(self.hparams.model, dtype=self.hparams.dtype, seed=self.hparams.seed)
            load_weights(cached, self.hparams.retain_model_from)
            cached.eval().requires_grad_(False)
            object.__setattr__(self, "_retain_model_cache", cached)
        yield cached.to(self.device)

    def _log_evaluation(self, prefix: str) -> None:
        if self._retain_ratios and not self._retain_ratios_done:
            self.evaluator.set_reference(torch.cat(self._retain_ratios))
            self._retain_ratios_done = True
            object.__setattr__(self, "_retain_model_cache", None)
        results = self.evaluator.compute()
        shown = ("forget/em", "retain/em")
        for key, value in results.items():
            self.log(f"{prefix}/{key}", value, prog_bar=key in shown)
        self.last_metrics = results
        self.evaluator.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")


def freeze_except(model: nn.Module, pattern: str) -> list[str]:
    """Freeze every parameter whose name does not match the regex ``pattern``; return the trainable names."""
    import re

    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"trainable={pattern!r} is not a valid regular expression ({err}).") from None
    names = []
    for name, param in model.named_parameters():
        keep = bool(regex.search(name))
        param.requires_grad_(keep)
        if keep:
            names.append(name)
    if not names:
        sample = [n for n, _ in list(model.named_parameters())[:6]]
        raise ValueError(f"trainable={pattern!r} matches no parameter; names look like {sample}.")
    return names
