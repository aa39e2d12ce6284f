"""A generated caption set for text-conditioned concept erasure: coloured digits with captions that name them.

Each of scikit-learn's 8x8 digits (no download) is drawn in one of :data:`COLOURS` (the stroke in that
RGB primary on black) and captioned ``"a {colour} digit {name}"``, e.g. ``"a red digit three"``. A
share of the captions drops an attribute (``"a digit three"``, ``"a red digit"``) or everything
(``""``, for classifier-free guidance), so the generic prompts an erasure maps a concept to
(``"a digit"``, ``"a red digit"``) are ones the model has learned. A concept is a word of the
captions: a digit name (judged by a digit classifier on the grey image) or a colour (judged exactly
by :func:`colour_of`, the dominant channel of the stroke).

Memory: the set as float32 tensors, ``1797 * 3 * 8 * 8 * 4`` bytes (1.4 MB) plus the caption strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_zobi.data.images import DIGIT_NAMES, load_digits_splits

COLOURS = ("red", "green", "blue")
"""Stroke colours, in RGB channel order (colour ``k`` lights channel ``k``)."""


def caption(digit: int | None, colour: int | None) -> str:
    """``"a {colour} digit {name}"`` with either attribute left out when None (both None: ``""``)."""
    if digit is None and colour is None:
        return ""
    words = ["a"] + ([COLOURS[colour]] if colour is not None else []) + ["digit"]
    return " ".join(words + ([DIGIT_NAMES[digit]] if digit is not None else []))


def all_captions() -> list[str]:
    """Every caption the set can produce (the tokenizer's vocabulary and the evaluation prompts)."""
    out = []
    for d in [*range(10), None]:
        for c in [*range(len(COLOURS)), None]:
            out.append(caption(d, c))
    return out


def colourize(grey: Tensor, colours: Tensor) -> Tensor:
    """``(N, 1, S, S)`` grey digits in ``[-1, 1]`` → ``(N, 3, S, S)``: the stroke in channel ``colours[i]``."""
    stroke = (grey + 1.0) / 2.0
    onehot = torch.nn.functional.one_hot(colours, len(COLOURS)).float()[:, :, None, None]
    return stroke * onehot * 2.0 - 1.0


NO_COLOUR = -1
"""What :func:`colour_of` returns when no channel dominates (a grey, white or empty image)."""


def colour_of(images: Tensor, dominance: float = 1.5) -> Tensor:
    """The colour index of each ``(N, 3, S, S)`` image, or :data:`NO_COLOUR`.

    The colour is the channel with the most stroke (channel sums of ``(x + 1) / 2``) when it holds at
    least ``dominance`` times the second channel's; otherwise the image has no colour of the set (a
    collapsed, saturated or grey sample must not count as the first channel, red).
    """
    sums = ((images + 1.0) / 2.0).clamp(min=0).sum(dim=(2, 3))
    top = sums.topk(2, dim=1)
    dominant = (top.values[:, 0] >= dominance * top.values[:, 1]) & (top.values[:, 0] > 0)
    return torch.where(dominant, top.indices[:, 0], torch.full_like(top.indices[:, 0], NO_COLOUR))


def to_grey(images: Tensor) -> Tensor:
    """``(N, 3, S, S)`` coloured digits → ``(N, 1, S, S)`` grey ones (max over channels inverts :func:`colourize`)."""
    return images.max(dim=1, keepdim=True).values


@dataclass
class CaptionSplit:
    """Coloured images ``(N, 3, S, S)`` in ``[-1, 1]``, their digit and colour ids, and one caption each."""

    images: Tensor
    digits: Tensor
    colours: Tensor
    captions: list[str]

    def __len__(self) -> int:
        return int(self.digits.shape[0])

    def subset(self, mask: Tensor) -> CaptionSplit:
        """The samples where ``mask`` is True."""
        idx = mask.nonzero().flatten().tolist()
        return CaptionSplit(
            self.images[mask], self.digits[mask], self.colours[mask], [self.captions[i] for i in idx]
        )


@dataclass
class CaptionSplits:
    """Train and test splits (the test split's captions are always full)."""

    train: CaptionSplit
    test: CaptionSplit


def load_caption_splits(
    seed: int = 0, drop_digit: float = 0.15, drop_colour: float = 0.15, drop_all: float = 0.1
) -> CaptionSplits:
    """Coloured 8x8 digits with captions; the digit/colour split and the caption dropout are seeded.

    Args:
        seed: colour assignment, caption dropout and the train/test split.
        drop_digit / drop_colour: share of training captions without the digit name / the colour.
        drop_all: share of empty training captions (classifier-free guidance's unconditional prompt).
    """
    for name, p in (("drop_digit", drop_digit), ("drop_colour", drop_colour), ("drop_all", drop_all)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name}={p!r} is invalid: use a probability in [0, 1).")
    if drop_digit + drop_colour + drop_all >= 1.0:
        raise ValueError(
            "drop_digit + drop_colour + drop_all must stay below 1 (some captions must be full)."
        )
    base = load_digits_splits(size=8, channels=1, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    splits = []
    for part, is_train in ((base.train, True), (base.test, False)):
        colours = torch.randint(0, len(COLOURS), (len(part),), generator=gen)
        roll = torch.rand(len(part), generator=gen)
        caps = []
        for i in range(len(part)):
            d, c, r = int(part.labels[i]), int(colours[i]), float(roll[i])
            if is_train and r < drop_all:
                caps.append(caption(None, None))
            elif is_train and r < drop_all + drop_digit:
                caps.append(caption(None, c))
            elif is_train and r < drop_all + drop_digit + drop_colour:
                caps.append(caption(d, None))
            else:
                caps.append(caption(d, c))
        splits.append(CaptionSplit(colourize(part.images, colours), part.labels.clone(), colours, caps))
    return CaptionSplits(train=splits[0], test=splits[1])


def concept_kind(concept: str) -> str:
    """``"digit"`` or ``"colour"`` for a concept word of the captions."""
    if concept in DIGIT_NAMES:
        return "digit"
    if concept in COLOURS:
        return "colour"
    raise ValueError(
        f"concept={concept!r} is not a word of the caption set: use a digit name {DIGIT_NAMES} or a colour {COLOURS}."
    )


def without_concept(text: str, concept: str) -> str:
    """The caption with the concept word removed (``"a red digit three"`` → ``"a red digit"``): MACE's mapping."""
    return " ".join(w for w in text.split() if w != concept)


def caption_tokenizer(texts: Iterable[str], max_length: int = 16):
    """A word-level tokenizer over ``texts`` that wraps each prompt in ``<bos> ... <eos>`` as CLIP's does.

    Built on :func:`lightning_zobi.diffusion.sd.word_tokenizer` (ids 0-3 special), so it fits the tiny
    ``CLIPTextModel`` of :func:`~lightning_zobi.diffusion.sd.tiny_sd_components`; the eos token is where a
    causal text encoder gathers the whole prompt (the position MACE's refinement targets).
    """
    from tokenizers.processors import TemplateProcessing

    from lightning_zobi.diffusion.sd import word_tokenizer

    tok = word_tokenizer(list(texts), max_length=max_length)
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A <eos>",
        special_tokens=[("<bos>", tok.bos_token_id), ("<eos>", tok.eos_token_id)],
    )
    return tok


def prompts_for(digits: Sequence[int], colours: Sequence[int]) -> list[str]:
    """Full captions for paired digit and colour ids."""
    return [caption(int(d), int(c)) for d, c in zip(digits, colours, strict=True)]
