"""Small image sets made offline: scikit-learn's bundled 8x8 handwritten digits, with forget/retain splits.

The digits (1,797 images of 0-9, shipped inside scikit-learn, no download) are the embedded test bed of
the diffusion track: small enough that a class-conditional UNet learns them on a CPU in a minute, varied
enough that a judge classifier can tell whether a concept (a digit class) was erased. Images are scaled
to ``[-1, 1]`` (the range diffusion models are trained in) and optionally upsampled (bilinear) to 16x16
or 32x32, and to 3 channels for the Stable Diffusion path. Each class also has a text prompt
(``"a handwritten digit three"``) so the same data feeds text-conditioned pipelines.

Memory: the whole set as float32 tensors, ``1797 * C * S * S * 4`` bytes (0.5 MB at 8x8, 7 MB at
32x32 RGB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""English names of the ten digit classes, used in the text prompts."""

DEFAULT_PROMPT_TEMPLATE = "a handwritten digit {name}"


def digit_prompt(label: int, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """Text prompt of a digit class, e.g. ``digit_prompt(3) == "a handwritten digit three"``."""
    if not isinstance(label, int) or not 0 <= label <= 9:
        raise ValueError(f"label={label!r} is invalid: use an int digit class in 0..9.")
    if "{name}" not in template:
        raise ValueError(
            f"template={template!r} has no '{{name}}' field: e.g. 'a handwritten digit {{name}}'."
        )
    return template.format(name=DIGIT_NAMES[label])


@dataclass
class ImageSplit:
    """Images in ``[-1, 1]`` of shape ``(N, C, S, S)`` and their int64 labels ``(N,)``."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, classes: list[int] | tuple[int, ...]) -> ImageSplit:
        """Only the samples whose label is in ``classes``."""
        mask = torch.isin(self.labels, torch.as_tensor(list(classes), dtype=torch.long))
        return ImageSplit(self.images[mask], self.labels[mask])

    def exclude(self, classes: list[int] | tuple[int, ...]) -> ImageSplit:
        """Every sample whose label is not in ``classes``."""
        mask = ~torch.isin(self.labels, torch.as_tensor(list(classes), dtype=torch.long))
        return ImageSplit(self.images[mask], self.labels[mask])


@dataclass
class DigitsSplits:
    """Stratified train/test splits of the digits (same seed, same split)."""

    train: ImageSplit
    test: ImageSplit


def load_digits_splits(
    size: int = 8, channels: int = 1, test_fraction: float = 0.2, seed: int = 0
) -> DigitsSplits:
    """scikit-learn's digits as ``[-1, 1]`` tensors, resized to ``size`` and split stratified by class.

    Args:
        size: side of the returned images (8 keeps the originals; larger sizes are bilinear upsamples).
        channels: 1 (grey) or 3 (the grey image repeated, for RGB pipelines such as Stable Diffusion).
        test_fraction: share of each class held out for testing (the judge's test accuracy, the
            Fréchet distance's real reference).
        seed: seed of the split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size={size!r} is invalid: use an int >= 8 (8 keeps the original digits).")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels!r} is invalid: use 1 (grey) or 3 (RGB).")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is invalid: use a float in (0, 1), e.g. 0.2.")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    if channels == 3:
        images = images.repeat(1, 3, 1, 1)
    idx = torch.arange(len(labels)).numpy()
    train_idx, test_idx = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return DigitsSplits(
        train=ImageSplit(images[train_idx], labels[train_idx]),
        test=ImageSplit(images[test_idx], labels[test_idx]),
    )
