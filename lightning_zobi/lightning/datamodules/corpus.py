"""``CorpusUnlearningDataModule``: raw-text forget/retain corpora as ``UnlearningModule`` batches (MUSE, WMDP)."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_zobi.data.benchmarks import TextChunkDataset
from lightning_zobi.lightning.datamodules.facts import load_tokenizer

_MODES = ("max_size_cycle", "min_size", "max_size")


class CorpusUnlearningDataModule(pl.LightningDataModule):
    """Forget and retain documents, chunked to ``max_length`` tokens, as ``{"forget", "retain"}`` batches.

    Every real token is labelled (pretraining-style unlearning: GA / NPO / RMU on the text
    itself); items hold ``input_ids``/``attention_mask``/``labels`` only, so the IDK objectives
    (which need refusal targets) do not apply. There is no validation loader: the corpora's
    evaluations (MUSE's knowmem/verbmem/privleak, WMDP's multiple choice) are loaded by
    :mod:`lightning_zobi.data.benchmarks` and scored with :mod:`lightning_zobi.unlearn.mia` /
    :mod:`lightning_zobi.unlearn.memorization`.

    Subclasses load the texts (:class:`~lightning_zobi.lightning.datamodules.muse.MUSEDataModule`,
    :class:`~lightning_zobi.lightning.datamodules.wmdp.WMDPDataModule`) and call :meth:`set_texts`.
    """

    def __init__(
        self,
        tokenizer: str = "bytes",
        forget_batch_size: int = 4,
        retain_batch_size: int = 4,
        max_length: int = 256,
        max_chunks_per_doc: int | None = None,
        mode: str = "max_size_cycle",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode={mode!r} is invalid: choose one of {_MODES}.")
        for name, value in (
            ("forget_batch_size", forget_batch_size),
            ("retain_batch_size", retain_batch_size),
        ):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r} is invalid: use a batch size >= 1.")
        self.tokenizer = load_tokenizer(tokenizer)
        self.batch_sizes = {"forget": forget_batch_size, "retain": retain_batch_size}
        self.max_length, self.max_chunks_per_doc = max_length, max_chunks_per_doc
        self.mode, self.num_workers = mode, num_workers
        self.forget_set: TextChunkDataset | None = None
        self.retain_set: TextChunkDataset | None = None

    def set_texts(self, forget: Sequence[str], retain: Sequence[str]) -> None:
        """Chunk the forget and retain documents (replaces earlier ones)."""
        self.forget_set = TextChunkDataset(forget, self.tokenizer, self.max_length, self.max_chunks_per_doc)
        self.retain_set = TextChunkDataset(retain, self.tokenizer, self.max_length, self.max_chunks_per_doc)

    def train_dataloader(self) -> CombinedLoader:
        if self.forget_set is None or self.retain_set is None:
            raise RuntimeError(f"{type(self).__name__} has no texts; call set_texts(forget, retain) first.")
        loaders = {
            name: StatefulDataLoader(
                ds, batch_size=self.batch_sizes[name], shuffle=True, num_workers=self.num_workers
            )
            for name, ds in (("forget", self.forget_set), ("retain", self.retain_set))
        }
        return CombinedLoader(loaders, mode=self.mode)
