"""``DigitsDataModule``: scikit-learn's digits as diffusion/judge batches, split into retain and forget classes.

Training batches are ``{"retain": {"images", "labels"}, "forget": {"images", "labels"}}`` from
Lightning's ``CombinedLoader`` (``max_size_cycle``: the small forget loader cycles), which is what a
forget/retain objective (and the ``Bilevel`` callback) consumes. Without ``forget_class`` the
``"retain"`` part is the whole training split (teacher and judge training). Validation and test
batches are the held-out split, all classes.

Memory: the dataset as tensors (see :func:`lightning_zobi.data.images.load_digits_splits`).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from lightning_zobi.data.images import ImageSplit, load_digits_splits


class _SplitDataset(Dataset):
    def __init__(self, split: ImageSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"images": self.split.images[i], "labels": self.split.labels[i]}


class DigitsDataModule(pl.LightningDataModule):
    """Digits at ``size`` x ``size`` with ``channels`` channels, forget class optional.

    Args:
        size: image side (8 = original; 16/32 upsampled).
        channels: 1, or 3 for RGB pipelines (Stable Diffusion).
        batch_size: retain batch size (the forget batch uses ``forget_batch_size`` or the same).
        forget_class: digit whose images form the forget set and leave the retain set; None = no split.
        forget_batch_size: forget batch size (None = ``batch_size``).
        test_fraction / seed: the stratified split.
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).
    """

    def __init__(
        self,
        size: int = 8,
        channels: int = 1,
        batch_size: int = 128,
        forget_class: int | None = None,
        forget_batch_size: int | None = None,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid: use a positive int.")
        if forget_class is not None and (not isinstance(forget_class, int) or not 0 <= forget_class <= 9):
            raise ValueError(f"forget_class={forget_class!r} is invalid: use a digit 0..9 or None.")
        # forget_class is kept out of hparams: DiffusionModule has its own (the concept it erases and
        # scores), and Lightning refuses to log two hparams of one name with different values.
        self.save_hyperparameters(ignore=["forget_class"])
        self.forget_class = forget_class
        self.splits = None

    def setup(self, stage: str | None = None) -> None:
        """Load and split the digits (in memory, a few ms)."""
        if self.splits is None:
            hp = self.hparams
            self.splits = load_digits_splits(hp.size, hp.channels, hp.test_fraction, hp.seed)

    def _loader(self, split: ImageSplit, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            _SplitDataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(split) > batch_size,
            num_workers=self.hparams.num_workers,
            generator=generator if shuffle else None,
        )

    def train_dataloader(self) -> CombinedLoader:
        """``{"retain": ..., "forget": ...}`` (or ``{"retain": all}``) batches."""
        self.setup()
        hp = self.hparams
        train = self.splits.train
        if self.forget_class is None:
            return CombinedLoader({"retain": self._loader(train, hp.batch_size, True)}, mode="max_size_cycle")
        loaders = {
            "retain": self._loader(train.exclude([self.forget_class]), hp.batch_size, True),
            "forget": self._loader(
                train.select([self.forget_class]), hp.forget_batch_size or hp.batch_size, True
            ),
        }
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        """Held-out split, all classes."""
        self.setup()
        return self._loader(self.splits.test, 512, False)

    def test_dataloader(self) -> DataLoader:
        """Held-out split, all classes."""
        return self.val_dataloader()
