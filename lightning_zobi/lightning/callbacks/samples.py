"""``SampleGrid``: writes a PNG grid of the module's samples after every validation epoch.

Reads ``pl_module.last_samples`` (``(images in [-1, 1], labels)``, set by ``DiffusionModule`` when
it samples for its metrics) or, when absent, calls ``pl_module.generate(labels)``. One row per
class, nearest-neighbour upscaled so 8x8 digits are visible. Files: ``{dirpath}/epoch{E:03d}.png``.

Memory: one uint8 grid image.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor


def image_grid(images: Tensor, labels: Tensor, scale: int = 4) -> np.ndarray:
    """``(rows = classes, cols = samples)`` uint8 grid, grey (H, W) or RGB (H, W, 3), 1-pixel gaps."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}.")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale={scale!r} is invalid: use a positive int.")
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    images = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    classes = labels.unique(sorted=True).tolist()
    rows = [images[labels.cpu() == c] for c in classes]
    cols = max(len(r) for r in rows)
    n, c, h, w = len(rows), images.shape[1], images.shape[2], images.shape[3]
    grid = torch.zeros(c, n * (h + 1) + 1, cols * (w + 1) + 1, dtype=torch.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid[:, 1 + i * (h + 1) : 1 + i * (h + 1) + h, 1 + j * (w + 1) : 1 + j * (w + 1) + w] = img
    arr = grid.permute(1, 2, 0).numpy()
    return arr[..., 0] if c == 1 else arr


class SampleGrid(pl.Callback):
    """Save the latest validation samples as ``{dirpath}/epoch{E:03d}.png`` every ``every_n_epochs``.

    Args:
        dirpath: output folder (created).
        every_n_epochs: write on epochs divisible by this.
        samples_per_class: used only when the module has no ``last_samples``.
        scale: nearest-neighbour upscale factor per pixel.
    """

    def __init__(
        self, dirpath: str = "samples", every_n_epochs: int = 1, samples_per_class: int = 8, scale: int = 4
    ) -> None:
        super().__init__()
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs!r} is invalid: use a positive int.")
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.samples_per_class = samples_per_class
        self.scale = scale
        self.written: list[Path] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the grid (rank 0, not during the sanity check)."""
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if trainer.current_epoch % self.every_n_epochs:
            return
        samples = getattr(pl_module, "last_samples", None)
        if samples is None:
            if not callable(getattr(pl_module, "generate", None)):
                raise TypeError(
                    f"{type(pl_module).__name__} has neither last_samples nor generate(labels): SampleGrid needs one."
                )
            labels = torch.arange(10).repeat_interleave(self.samples_per_class)
            samples = (pl_module.generate(labels), labels)
        from PIL import Image

        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"epoch{trainer.current_epoch:03d}.png"
        Image.fromarray(image_grid(samples[0], samples[1], self.scale)).save(path)
        self.written.append(path)
