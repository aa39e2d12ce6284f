"""``WMDPDataModule``: the WMDP forget / retain corpora of one domain as unlearning batches."""

from __future__ import annotations

import os

from lightning_zobi.data.benchmarks import load_wmdp_corpus
from lightning_zobi.lightning.datamodules.corpus import CorpusUnlearningDataModule


class WMDPDataModule(CorpusUnlearningDataModule):
    """``<domain>-forget-corpus`` against ``<domain>-retain-corpus`` (RMU's setting), chunked.

    Args:
        path: a directory holding ``<domain>-forget-corpus.jsonl`` and ``<domain>-retain-corpus.jsonl``
            (the unzipped ``wmdp-corpora`` of open-unlearning's ``setup_data.py --wmdp``) or the hub
            id ``"cais/wmdp-corpora"`` (cyber; the bio forget corpus is distributed on request).
        domain: ``"cyber"`` or ``"bio"`` (``"chem"`` has questions but no corpora).
        tokenizer, forget_batch_size, retain_batch_size, max_length, max_chunks_per_doc, mode,
            num_workers: as :class:`CorpusUnlearningDataModule` (open-unlearning chunks at 512 tokens).

    The multiple-choice evaluation is :func:`lightning_zobi.data.benchmarks.load_wmdp_questions`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "cais/wmdp-corpora",
        domain: str = "cyber",
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
        self.save_hyperparameters()
        self.set_texts(load_wmdp_corpus(path, domain, "forget"), load_wmdp_corpus(path, domain, "retain"))
