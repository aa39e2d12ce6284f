"""``MUSEDataModule``: MUSE-News / MUSE-Books raw forget and retain text as unlearning batches."""

from __future__ import annotations

import os

from lightning_zobi.data.benchmarks import MUSE_SPLITS, muse_hub_id, muse_texts
from lightning_zobi.lightning.datamodules.corpus import CorpusUnlearningDataModule


class MUSEDataModule(CorpusUnlearningDataModule):
    """MUSE's ``raw`` ``forget`` split against a retain split, chunked (see :class:`CorpusUnlearningDataModule`).

    Args:
        path: a local copy of ``muse-bench/MUSE-News`` / ``-Books`` (``<config>/<split>.json`` or
            parquet) or None for the hub id of ``corpus``.
        corpus: ``"News"`` or ``"Books"`` (used when ``path`` is None).
        retain_split: ``"retain1"`` (open-unlearning's and MUSE's unlearning retain set) or ``"retain2"``.
        tokenizer, forget_batch_size, retain_batch_size, max_length, max_chunks_per_doc, mode,
            num_workers: as :class:`CorpusUnlearningDataModule` (open-unlearning chunks at 2048 tokens).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        corpus: str = "News",
        retain_split: str = "retain1",
        tokenizer: str = "bytes",
        forget_batch_size: int = 4,
        retain_batch_size: int = 4,
        max_length: int = 256,
        max_chunks_per_doc: int | None = None,
        mode: str = "max_size_cycle",
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            tokenizer, forget_batch_size, retain_batch_size, max_length, max_chunks_per_doc, mode, num_workers
        )
        raw_splits = MUSE_SPLITS["raw"][0]
        if retain_split not in raw_splits or retain_split in ("forget", "holdout"):
            raise ValueError(f"retain_split={retain_split!r} is invalid: choose 'retain1' or 'retain2'.")
        self.save_hyperparameters()
        source = path if path is not None else muse_hub_id(corpus)
        self.set_texts(muse_texts(source, "forget"), muse_texts(source, retain_split))
