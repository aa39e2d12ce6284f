"""``UnlearningDataModule``: forget and retain batches together, plus the unlearning evaluation loaders."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_zobi.data.facts import (
    TRUTH_RATIO_QUESTIONS,
    FactsEvalDataset,
    FactsSplits,
    ForgetQADataset,
    make_splits,
)
from lightning_zobi.lightning.datamodules.facts import QADataset, load_tokenizer
from lightning_zobi.unlearn.metrics import SPLITS

_MODES = ("max_size_cycle", "min_size", "max_size")


def check_unlearning_options(mode: str, truth_ratio_question: str, **batch_sizes: int) -> None:
    """Clear errors for the options every forget/retain QA datamodule takes (this one, TOFU's)."""
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} is invalid: choose one of {_MODES}.")
    if truth_ratio_question not in TRUTH_RATIO_QUESTIONS:
        raise ValueError(
            f"truth_ratio_question={truth_ratio_question!r} is invalid: choose one of {TRUTH_RATIO_QUESTIONS}."
        )
    for name, value in batch_sizes.items():
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}={value!r} is invalid: use a batch size >= 1.")


def forget_retain_loader(forget: list, retain: list, tokenizer: Any, hp: Any) -> CombinedLoader:
    """Shuffled forget (with IDK answers) and retain QA loaders, combined as ``{"forget", "retain"}``."""
    forget_loader = StatefulDataLoader(
        ForgetQADataset(forget, tokenizer, hp.max_length, hp.seed),
        batch_size=hp.forget_batch_size,
        shuffle=True,
        num_workers=hp.num_workers,
    )
    retain_loader = StatefulDataLoader(
        QADataset(retain, tokenizer, hp.max_length),
        batch_size=hp.retain_batch_size,
        shuffle=True,
        num_workers=hp.num_workers,
    )
    return CombinedLoader({"forget": forget_loader, "retain": retain_loader}, mode=hp.mode)


class UnlearningDataModule(pl.LightningDataModule):
    """Fictitious-facts forget/retain training batches and forget/retain/hold-out evaluation batches.

    Training yields Lightning ``CombinedLoader`` batches ``{"forget": ..., "retain": ...}``; by default
    (``mode="max_size_cycle"``) an epoch runs over the larger (retain) set and cycles the small forget
    set. Forget items also carry "I don't know" targets (``idk_*`` keys) for the IDK objective.
    Validation and test return three loaders, in the order of ``SPLITS`` = (forget, retain, hold-out),
    of :class:`~lightning_zobi.data.facts.FactsEvalDataset` items (prompt for greedy generation,
    perturbed answers for the truth ratio); the split name travels in each batch.

    The people and splits are those of ``FactsDataModule`` with the same ``num_people``,
    ``forget_fraction``, ``holdout_fraction`` and ``seed``, so a model taught there unlearns here.

    Args:
        num_people, forget_fraction, holdout_fraction, seed: the generated set (TOFU forget01/05/10:
            ``forget_fraction`` 0.01/0.05/0.1).
        tokenizer: "bytes" or a local tokenizer path.
        forget_batch_size, retain_batch_size: sizes of the two halves of a training batch.
        eval_batch_size: batch size of the evaluation loaders.
        eval_retain_size: evaluate on the first this many retain pairs only (None: all).
        max_length: padded sequence length.
        truth_ratio_question: "original" or "paraphrased" question for the truth ratio.
        mode: ``CombinedLoader`` mode ("max_size_cycle", "min_size", "max_size").
        num_workers: data-loader workers.

    Memory: the generated strings; items are tokenized on the fly.
    """

    def __init__(
        self,
        num_people: int = 40,
        forget_fraction: float = 0.1,
        holdout_fraction: float = 0.1,
        tokenizer: str = "bytes",
        forget_batch_size: int = 8,
        retain_batch_size: int = 16,
        eval_batch_size: int = 64,
        eval_retain_size: int | None = None,
        max_length: int = 64,
        truth_ratio_question: str = "original",
        mode: str = "max_size_cycle",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_unlearning_options(
            mode, truth_ratio_question, forget_batch_size=forget_batch_size, retain_batch_size=retain_batch_size
        )
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        self.splits: FactsSplits = make_splits(num_people, forget_fraction, holdout_fraction, seed)
        if not self.splits.retain:
            raise ValueError(
                f"num_people={num_people} leaves no retain people; raise num_people or lower the fractions."
            )

    def train_dataloader(self) -> CombinedLoader:
        return forget_retain_loader(self.splits.forget, self.splits.retain, self.tokenizer, self.hparams)

    def eval_pairs(self) -> dict[str, list]:
        """The pairs each evaluation split scores (retain cut to ``eval_retain_size``)."""
        retain = self.splits.retain[: self.hparams.eval_retain_size]
        return {"forget": self.splits.forget, "retain": retain, "holdout": self.splits.holdout}

    def _eval_loaders(self) -> list[DataLoader]:
        hp = self.hparams
        pairs = self.eval_pairs()
        return [
            DataLoader(
                FactsEvalDataset(pairs[split], self.tokenizer, split, hp.max_length, hp.truth_ratio_question),
                batch_size=hp.eval_batch_size,
                num_workers=hp.num_workers,
            )
            for split in SPLITS
            if pairs[split]
        ]

    def val_dataloader(self) -> Any:
        return self._eval_loaders()

    def test_dataloader(self) -> Any:
        return self._eval_loaders()
