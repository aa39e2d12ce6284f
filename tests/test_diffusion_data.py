"""Offline digits data for the diffusion track: splits, prompts, forget/retain batches, sample grids."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

from lightning_zobi.data.images import digit_prompt, load_digits_splits  # noqa: E402
from lightning_zobi.lightning.callbacks.samples import image_grid  # noqa: E402
from lightning_zobi.lightning.datamodules.digits import DigitsDataModule  # noqa: E402


def test_digits_splits_are_scaled_stratified_and_resizable():
    splits = load_digits_splits()
    assert splits.train.images.shape[1:] == (1, 8, 8)
    assert len(splits.train) + len(splits.test) == 1797
    assert splits.train.images.min() >= -1 and splits.train.images.max() <= 1
    assert torch.bincount(splits.test.labels, minlength=10).min() >= 35  # every class held out
    rgb = load_digits_splits(size=32, channels=3)
    assert rgb.test.images.shape[1:] == (3, 32, 32)
    assert torch.equal(rgb.test.labels, splits.test.labels)  # same seed, same split
    three = splits.train.select([3])
    assert len(three) > 0 and bool((three.labels == 3).all())
    assert not bool((splits.train.exclude([3]).labels == 3).any())
    with pytest.raises(ValueError, match="size"):
        load_digits_splits(size=4)
    with pytest.raises(ValueError, match="channels"):
        load_digits_splits(channels=2)


def test_digit_prompt():
    assert digit_prompt(3) == "a handwritten digit three"
    assert digit_prompt(0, "digit {name}") == "digit zero"
    with pytest.raises(ValueError, match="label"):
        digit_prompt(10)
    with pytest.raises(ValueError, match="template"):
        digit_prompt(1, "no field")


def test_datamodule_splits_forget_and_retain_batches():
    dm = DigitsDataModule(batch_size=32, forget_class=3, forget_batch_size=8)
    loader = dm.train_dataloader()
    batch, _, _ = next(iter(loader))
    assert set(batch) == {"retain", "forget"}
    assert batch["retain"]["images"].shape == (32, 1, 8, 8)
    assert not bool((batch["retain"]["labels"] == 3).any())
    assert bool((batch["forget"]["labels"] == 3).all()) and batch["forget"]["images"].shape[0] == 8
    val = next(iter(dm.val_dataloader()))
    assert set(val["labels"].tolist()) == set(range(10))
    full, _, _ = next(iter(DigitsDataModule(batch_size=16).train_dataloader()))
    assert set(full) == {"retain"}
    with pytest.raises(ValueError, match="forget_class"):
        DigitsDataModule(forget_class=12)


def test_image_grid_has_one_row_per_class():
    images = torch.linspace(-1, 1, 6 * 64).reshape(6, 1, 8, 8)
    grid = image_grid(images, torch.tensor([0, 0, 1, 1, 2, 2]), scale=2)
    assert grid.shape == (3 * 17 + 1, 2 * 17 + 1) and grid.dtype.name == "uint8"
    assert grid.max() == 255 and grid[0].max() == 0  # the 1-pixel border stays black
