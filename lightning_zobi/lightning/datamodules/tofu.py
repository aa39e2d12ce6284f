"""``TOFUDataModule``: TOFU (``locuslab/TOFU`` or a local copy) as forget/retain batches for ``UnlearningModule``."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from lightning_zobi.data.benchmarks import (
    TOFU_FORGET_SPLITS,
    TOFUEvalDataset,
    TOFUSplits,
    load_tofu,
    with_self_as_perturbed,
)
from lightning_zobi.lightning.datamodules.facts import load_tokenizer
from lightning_zobi.lightning.datamodules.unlearning import check_unlearning_options, forget_retain_loader


class TOFUDataModule(pl.LightningDataModule):
    """TOFU forget/retain training batches and forget/retain/hold-out evaluation batches.

    The batches are those of :class:`~lightning_zobi.lightning.datamodules.unlearning.UnlearningDataModule`,
    so :class:`~lightning_zobi.lightning.modules.unlearning.UnlearningModule` trains and validates
    on TOFU unchanged: training yields ``CombinedLoader`` batches ``{"forget": ..., "retain": ...}``
    (forget items carry ``idk_*`` refusal targets for the IDK objectives), validation returns the
    forget / retain / hold-out loaders in that order, each item with its split name.

    What each loader reads (the open-unlearning TOFU evaluation's sets):

    * training: ``<forget_split>`` (``forget01/05/10``) and its retain complement
      (``retain99/95/90``), ``question``/``answer``;
    * ``forget`` evaluation: ``<forget_split>_perturbed``: probability, ROUGE, loss-MIA on the
      answer; truth ratio of the paraphrased answer against the perturbed answers, as TOFU;
    * ``retain`` evaluation: ``retain_perturbed`` (optionally cut to ``eval_retain_size`` rows);
    * ``holdout`` evaluation: ``holdout01/05/10``, the never-trained members-test set of the MIA
      (it has no wrong answers: its ``truth_ratio`` is 1 by construction, ignore it);
    * ``real_authors`` / ``world_facts`` evaluation (``world_sets=True``): ``real_authors_perturbed``
      and ``world_facts_perturbed``, the world-knowledge two thirds of TOFU's 9-way model utility
      (the evaluator logs it as ``tofu_model_utility``); their truth ratio scores the answer itself
      against the perturbed ones.

    Args:
        path: the hub id ``"locuslab/TOFU"`` or a local directory with its files (``<config>.json``).
        forget_split: ``"forget01"``, ``"forget05"`` or ``"forget10"``.
        retain_split, holdout_split: override the complements (None: TOFU's).
        tokenizer: "bytes" or a local tokenizer path.
        forget_batch_size, retain_batch_size, eval_batch_size: batch sizes.
        eval_retain_size: evaluate on the first this many ``retain_perturbed`` rows (None: all 400).
        max_length: padded sequence length (TOFU answers run to ~100 words: 256 byte tokens cut the
            longest ones; raise it with a subword tokenizer's budget in mind).
        truth_ratio_question: "original" or "paraphrased" question for the truth ratio.
        world_sets: also evaluate on real authors and world facts (TOFU's model utility needs them;
            False evaluates forget / retain / hold-out only, a little faster).
        mode: ``CombinedLoader`` mode.
        seed: picks the IDK refusal per forget question.
        num_workers: data-loader workers.

    Memory: the loaded rows (a few MB for the full TOFU); items are tokenized on the fly.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "locuslab/TOFU",
        forget_split: str = "forget10",
        retain_split: str | None = None,
        holdout_split: str | None = None,
        tokenizer: str = "bytes",
        forget_batch_size: int = 8,
        retain_batch_size: int = 16,
        eval_batch_size: int = 32,
        eval_retain_size: int | None = None,
        max_length: int = 256,
        truth_ratio_question: str = "original",
        world_sets: bool = True,
        mode: str = "max_size_cycle",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if forget_split not in TOFU_FORGET_SPLITS:
            raise ValueError(f"forget_split={forget_split!r} is invalid: choose one of {TOFU_FORGET_SPLITS}.")
        check_unlearning_options(
            mode,
            truth_ratio_question,
            forget_batch_size=forget_batch_size,
            retain_batch_size=retain_batch_size,
            eval_batch_size=eval_batch_size,
        )
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        self.splits: TOFUSplits = load_tofu(path, forget_split, retain_split, holdout_split, world_sets)

    def train_dataloader(self) -> CombinedLoader:
        return forget_retain_loader(self.splits.forget, self.splits.retain, self.tokenizer, self.hparams)

    def eval_datasets(self) -> list[TOFUEvalDataset]:
        """The forget, retain, hold-out (and real-authors, world-facts) evaluation sets, in the order of ``unlearn.metrics.EVAL_SPLITS``."""
        hp, s = self.hparams, self.splits
        n = hp.eval_retain_size
        sets = [
            ("forget", s.forget_eval, s.paraphrased["forget"]),
            ("retain", s.retain_eval[:n], s.paraphrased["retain"][:n]),
            ("holdout", with_self_as_perturbed(s.holdout), None),
            ("real_authors", s.real_authors, None),
            ("world_facts", s.world_facts, None),
        ]
        return [
            TOFUEvalDataset(pairs, self.tokenizer, split, hp.max_length, hp.truth_ratio_question, base)
            for split, pairs, base in sets
            if pairs
        ]

    def _eval_loaders(self) -> list[DataLoader]:
        hp = self.hparams
        return [
            DataLoader(ds, batch_size=hp.eval_batch_size, num_workers=hp.num_workers)
            for ds in self.eval_datasets()
        ]

    def val_dataloader(self) -> Any:
        return self._eval_loaders()

    def test_dataloader(self) -> Any:
        return self._eval_loaders()
