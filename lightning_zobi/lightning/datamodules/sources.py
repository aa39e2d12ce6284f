"""Datamodules that yield one batch per data source (plus a validation batch) for ``Reweighting``.

Training batches are ``CombinedLoader({source: loader, ..., "val": loader}, "max_size_cycle")``
batches, so a step sees every source and the validation set once; that is the batch
:class:`~lightning_zobi.lightning.callbacks.reweighting.Reweighting` (ScaleBiO, arXiv 2406.19976)
consumes.

* :class:`DigitsSourcesDataModule`: scikit-learn's digits split into disjoint sources, each with its
  own label-noise rate, and a clean validation sample: the setting where the right answer is known
  (a corrupted source's weight must fall).
* :class:`FactsSourcesDataModule`: the synthetic fictitious facts as retain / forget / IDK / auxiliary
  sources, validated on paraphrased questions (retain: the true answer; forget: "I don't know").

Memory: the data as tensors (digits) or strings (facts, tokenized on the fly).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from lightning_zobi.data.facts import QAPair, encode_qa, idk_answer, make_splits
from lightning_zobi.data.images import ImageSplit, load_digits_splits


class _Images(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"images": self.images[i], "labels": self.labels[i]}


def _loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle and len(dataset) > batch_size,  # type: ignore[arg-type]
        generator=gen,
        num_workers=workers,
    )


class DigitsSourcesDataModule(pl.LightningDataModule):
    """Digits split into sources with known label noise, plus a clean validation sample.

    Args:
        noise: ``{source: fraction of its labels replaced by a uniformly random class}``, e.g.
            ``{"clean": 0.0, "noisy": 0.8}``; the training split is divided evenly between them.
        val_size: clean training images held out as the upper level's validation sample (``"val"``).
        batch_size / val_batch_size: per-source and validation batch sizes.
        upper_key: the validation sub-batch's key.
        seed: the split and the corruption.
    """

    def __init__(
        self,
        noise: dict[str, float] | None = None,
        val_size: int = 200,
        batch_size: int = 64,
        val_batch_size: int = 64,
        upper_key: str = "val",
        seed: int = 0,
    ) -> None:
        super().__init__()
        noise = dict(noise) if noise is not None else {"clean": 0.0, "noisy": 0.8}
        if len(noise) < 2 or upper_key in noise:
            raise ValueError(
                f"noise={noise!r} is invalid: give at least two sources (none named {upper_key!r}) with a noise fraction each."
            )
        if any(not 0.0 <= v <= 1.0 for v in noise.values()):
            raise ValueError(f"noise={noise!r} is invalid: each label-noise fraction must be in [0, 1].")
        self.save_hyperparameters()
        self.noise = noise
        self.parts: dict[str, ImageSplit] | None = None
        self.test: ImageSplit | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.parts is not None:
            return
        hp = self.hparams
        splits = load_digits_splits(8, 1, 0.2, hp.seed)
        gen = torch.Generator().manual_seed(hp.seed)
        order = torch.randperm(len(splits.train), generator=gen)
        if hp.val_size >= len(order) // (len(self.noise) + 1):
            raise ValueError(f"val_size={hp.val_size} leaves too little training data; use a smaller value.")
        val_idx, rest = order[: hp.val_size], order[hp.val_size :]
        parts = {hp.upper_key: ImageSplit(splits.train.images[val_idx], splits.train.labels[val_idx])}
        for name, idx in zip(self.noise, torch.chunk(rest, len(self.noise)), strict=True):
            labels = splits.train.labels[idx].clone()
            flip = torch.rand(len(idx), generator=gen) < self.noise[name]
            labels[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=gen)
            parts[name] = ImageSplit(splits.train.images[idx], labels)
        self.parts = parts
        self.test = splits.test

    def train_dataloader(self) -> CombinedLoader:
        self.setup()
        assert self.parts is not None
        hp = self.hparams
        loaders = {
            name: _loader(
                _Images(part.images, part.labels),
                hp.val_batch_size if name == hp.upper_key else hp.batch_size,
                True,
                hp.seed + i,
            )
            for i, (name, part) in enumerate(self.parts.items())
        }
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        """The held-out test split (clean labels, all classes)."""
        self.setup()
        assert self.test is not None
        return _loader(_Images(self.test.images, self.test.labels), 512, False, 0)


class _QA(Dataset):
    def __init__(self, items: list[tuple[str, str]], tokenizer: Any, max_length: int) -> None:
        self.items, self.tokenizer, self.max_length = items, tokenizer, max_length

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        prompt, answer = self.items[i]
        return encode_qa(prompt, answer, self.tokenizer, self.max_length)


def _prompt(question: str) -> str:
    return f"Q: {question}\nA:"


class FactsSourcesDataModule(pl.LightningDataModule):
    """Fictitious-facts sources for unlearning-aware reweighting, validated on paraphrased questions.

    Sources (each a plain causal-LM batch, so ``CausalLMModule.training_step`` scores it):
        ``retain``: retain people's facts; ``forget``: the forget people's true facts (what must not
        be learned); ``idk``: the forget questions answered "I don't know"; ``auxiliary``: facts of
        other fictitious people (generated with ``seed + 1``: unrelated knowledge).
    Validation (``upper_key``): the *paraphrased* questions, retain people with their true answers
    and forget people with "I don't know": a model that is good on it knows the retain facts and
    refuses the forget ones. The learned weights say how much of each source serves that;
    ``forget`` should fall, ``retain`` and ``idk`` rise.

    Args:
        num_people, forget_fraction, seed: the generated set (as ``UnlearningDataModule``).
        sources: which of the four sources to use.
        tokenizer: "bytes" or a local tokenizer path. batch_size, val_batch_size, max_length: as usual.
    """

    SOURCES = ("retain", "forget", "idk", "auxiliary")

    def __init__(
        self,
        num_people: int = 40,
        forget_fraction: float = 0.25,
        sources: list[str] | None = None,
        tokenizer: str = "bytes",
        batch_size: int = 8,
        val_batch_size: int = 16,
        max_length: int = 64,
        upper_key: str = "val",
        seed: int = 0,
    ) -> None:
        super().__init__()
        sources = list(sources) if sources is not None else list(self.SOURCES)
        unknown = [s for s in sources if s not in self.SOURCES]
        if unknown or len(sources) < 2:
            raise ValueError(f"sources={sources!r} is invalid: choose at least two of {list(self.SOURCES)}.")
        self.save_hyperparameters()
        from lightning_zobi.lightning.datamodules.facts import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer)
        splits = make_splits(num_people, forget_fraction, 0.0, seed)
        aux = make_splits(num_people, forget_fraction, 0.0, seed + 1).retain
        self.items: dict[str, list[tuple[str, str]]] = {
            "retain": [(p.prompt(), p.answer) for p in splits.retain],
            "forget": [(p.prompt(), p.answer) for p in splits.forget],
            "idk": [(p.prompt(), idk_answer(i, seed)) for i, p in enumerate(splits.forget)],
            "auxiliary": [(p.prompt(), p.answer) for p in aux],
        }
        self.val_items = _paraphrased(splits.retain, None) + _paraphrased(splits.forget, seed)

    def train_dataloader(self) -> CombinedLoader:
        hp = self.hparams
        loaders = {
            name: _loader(
                _QA(self.items[name], self.tokenizer, hp.max_length), hp.batch_size, True, hp.seed + i
            )
            for i, name in enumerate(hp.sources)
        }
        loaders[hp.upper_key] = _loader(
            _QA(self.val_items, self.tokenizer, hp.max_length), hp.val_batch_size, True, hp.seed + 99
        )
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        """The paraphrased validation questions (``val_loss`` of ``CausalLMModule``)."""
        hp = self.hparams
        data = ConcatDataset([_QA(self.val_items, self.tokenizer, hp.max_length)])
        return _loader(data, 64, False, 0)


def _paraphrased(pairs: list[QAPair], idk_seed: int | None) -> list[tuple[str, str]]:
    if idk_seed is None:
        return [(_prompt(p.paraphrased_question), p.answer) for p in pairs]
    return [(_prompt(p.paraphrased_question), idk_answer(i, idk_seed)) for i, p in enumerate(pairs)]
