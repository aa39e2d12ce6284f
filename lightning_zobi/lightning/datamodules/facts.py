"""``FactsDataModule``: the fictitious-facts QA set as tokenized causal-LM batches."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

from lightning_zobi.data.facts import FactsSplits, QAPair, encode_qa, make_splits

__all__ = ["FactsDataModule", "QADataset", "encode_qa", "load_tokenizer"]


def load_tokenizer(tokenizer: str) -> PreTrainedTokenizerBase:
    """``"bytes"``: transformers' byte-level ``ByT5Tokenizer`` (no files, 259 ids); else a local path."""
    if tokenizer == "bytes":
        return ByT5Tokenizer(extra_ids=0)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class QADataset(Dataset):
    """QA pairs tokenized as ``prompt + answer + eos``; labels are -100 on the prompt and padding.

    Training on the answer tokens only is what TOFU does, and it makes the loss a direct measure of
    how well the model knows the fact.
    """

    def __init__(self, pairs: list[QAPair], tokenizer: PreTrainedTokenizerBase, max_length: int = 96) -> None:
        self.pairs = pairs
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return encode_qa(self.pairs[i].prompt(), self.pairs[i].answer, self.tokenizer, self.max_length)


class FactsDataModule(pl.LightningDataModule):
    """Train on the facts (forget + retain, or one split), validate on the same questions.

    Args:
        num_people: fictitious people generated (4 QA pairs each).
        forget_fraction: share of people in the forget split (TOFU: 0.01, 0.05, 0.1).
        holdout_fraction: share of people never trained on (membership-inference reference).
        train_split: which pairs to train on: "train" (forget + retain), "retain", "forget".
        tokenizer: "bytes" (byte-level, no files) or a local tokenizer path.
        batch_size, max_length, seed: as usual.
    """

    def __init__(
        self,
        num_people: int = 40,
        forget_fraction: float = 0.1,
        holdout_fraction: float = 0.1,
        train_split: str = "train",
        tokenizer: str = "bytes",
        batch_size: int = 16,
        max_length: int = 96,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if train_split not in ("train", "retain", "forget"):
            raise ValueError(f"train_split={train_split!r} is invalid: choose 'train', 'retain' or 'forget'.")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        self.splits: FactsSplits = make_splits(num_people, forget_fraction, holdout_fraction, seed)

    def _loader(self, pairs: list[QAPair], shuffle: bool) -> DataLoader:
        """A ``StatefulDataLoader``: its position and shuffle order go into checkpoints (exact mid-epoch resume)."""
        dataset = QADataset(pairs, self.tokenizer, self.hparams.max_length)
        return StatefulDataLoader(
            dataset, batch_size=self.hparams.batch_size, shuffle=shuffle, num_workers=self.hparams.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(getattr(self.splits, self.hparams.train_split), shuffle=True)

    def val_dataloader(self) -> Any:
        return self._loader(getattr(self.splits, self.hparams.train_split), shuffle=False)
