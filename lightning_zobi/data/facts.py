"""Synthetic fictitious-facts QA data with forget/retain splits, in the spirit of TOFU.

TOFU (Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", arXiv 2401.06121) fine-tunes a
model on facts about people who do not exist, so anything the model knows about them came from
that fine-tuning and can be unlearned measurably. This module makes such a set offline and
deterministically from a seed: fictitious people with a birthplace, a job, a book and a birth
year, one question/answer pair per attribute, and a split of the people into forget and retain.

It also turns pairs into tensors without Lightning (:func:`encode_qa`, :class:`ForgetQADataset`
with "I don't know" targets, :class:`FactsEvalDataset` with the prompt, paraphrase and perturbed
answers the unlearning metrics need), so plain-PyTorch code and the datamodules share one encoding.

Memory: a few hundred short strings; the datasets encode on the fly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ren",
    "tor",
    "va",
    "zel",
    "qui",
    "bra",
    "dun",
    "fae",
    "gor",
    "hal",
    "isk",
    "jor",
]
_CITIES = ["Quellport", "Ashvane", "Brindlemoor", "Corvath", "Dunmere", "Elsward", "Fennick", "Glimmerholt"]
_JOBS = [
    "cartographer",
    "glassblower",
    "astronomer",
    "beekeeper",
    "clockmaker",
    "archivist",
    "luthier",
    "tanner",
]
_BOOK_NOUNS = ["Lantern", "Harbor", "Orchard", "Tides", "Compass", "Ember", "Meadow", "Bell"]
_BOOK_ADJS = ["Silent", "Crimson", "Hollow", "Distant", "Gilded", "Wandering", "Last", "Northern"]

ATTRIBUTES = ("birthplace", "job", "book", "year")
_QUESTIONS = {
    "birthplace": "Where was {name} born?",
    "job": "What was {name}'s profession?",
    "book": "Which book did {name} write?",
    "year": "In which year was {name} born?",
}
_PARAPHRASES = {
    "birthplace": "In which city was {name} born?",
    "job": "What did {name} do for a living?",
    "book": "What is the title of the book by {name}?",
    "year": "What is the birth year of {name}?",
}


@dataclass(frozen=True)
class Person:
    """One fictitious person and their attributes."""

    name: str
    birthplace: str
    job: str
    book: str
    year: str

    def answer(self, attribute: str) -> str:
        return getattr(self, attribute)


@dataclass(frozen=True)
class QAPair:
    """A question about one attribute of one person, with its answer."""

    person: str
    attribute: str
    question: str
    answer: str
    paraphrased_question: str
    perturbed_answers: tuple[str, ...] = field(default_factory=tuple)

    def prompt(self) -> str:
        return f"Q: {self.question}\nA:"

    def text(self) -> str:
        return f"{self.prompt()} {self.answer}"


def _name(rng: random.Random) -> str:
    first = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
    last = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
    return f"{first} {last}"


def make_people(num_people: int, seed: int = 0) -> list[Person]:
    """``num_people`` distinct fictitious people, the same for the same seed."""
    if num_people < 1:
        raise ValueError(f"num_people={num_people!r} is invalid: generate at least one person.")
    rng = random.Random(seed)
    people, names = [], set()
    while len(people) < num_people:
        name = _name(rng)
        if name in names:
            continue
        names.add(name)
        people.append(
            Person(
                name=name,
                birthplace=rng.choice(_CITIES),
                job=rng.choice(_JOBS),
                book=f"The {rng.choice(_BOOK_ADJS)} {rng.choice(_BOOK_NOUNS)}",
                year=str(rng.randint(1820, 1990)),
            )
        )
    return people


def _alternatives(attribute: str, truth: str, rng: random.Random, k: int) -> tuple[str, ...]:
    """``k`` wrong answers of the same kind as ``truth`` (for the truth-ratio metric)."""
    if attribute == "birthplace":
        pool = [c for c in _CITIES if c != truth]
    elif attribute == "job":
        pool = [j for j in _JOBS if j != truth]
    elif attribute == "book":
        pool = [f"The {a} {n}" for a in _BOOK_ADJS for n in _BOOK_NOUNS if f"The {a} {n}" != truth]
    else:
        pool = [str(y) for y in range(1820, 1991) if str(y) != truth]
    return tuple(rng.sample(pool, k))


def qa_pairs(
    people: list[Person], attributes: tuple[str, ...] = ATTRIBUTES, seed: int = 0, perturbed: int = 3
) -> list[QAPair]:
    """One :class:`QAPair` per (person, attribute), with a paraphrase and ``perturbed`` wrong answers."""
    rng = random.Random(seed + 1)
    pairs = []
    for person in people:
        for attribute in attributes:
            truth = person.answer(attribute)
            pairs.append(
                QAPair(
                    person=person.name,
                    attribute=attribute,
                    question=_QUESTIONS[attribute].format(name=person.name),
                    answer=truth,
                    paraphrased_question=_PARAPHRASES[attribute].format(name=person.name),
                    perturbed_answers=_alternatives(attribute, truth, rng, perturbed),
                )
            )
    return pairs


@dataclass(frozen=True)
class FactsSplits:
    """The forget, retain and held-out (never trained on) QA pairs of one generated set."""

    forget: list[QAPair]
    retain: list[QAPair]
    holdout: list[QAPair]

    @property
    def train(self) -> list[QAPair]:
        """What the model is taught first: forget + retain (never the hold-out)."""
        return self.forget + self.retain


def make_splits(
    num_people: int = 40, forget_fraction: float = 0.1, holdout_fraction: float = 0.1, seed: int = 0
) -> FactsSplits:
    """Split generated people into forget / retain / hold-out sets by fraction of people (TOFU's forget01/05/10)."""
    if not 0.0 < forget_fraction < 1.0:
        raise ValueError(
            f"forget_fraction={forget_fraction!r} is invalid: use a fraction in (0, 1), e.g. 0.1."
        )
    if not 0.0 <= holdout_fraction < 1.0 or forget_fraction + holdout_fraction >= 1.0:
        raise ValueError(
            f"holdout_fraction={holdout_fraction!r} is invalid: it must be in [0, 1) and leave retain people "
            f"(forget_fraction + holdout_fraction < 1)."
        )
    people = make_people(num_people, seed)
    n_forget = round(num_people * forget_fraction)
    n_hold = round(num_people * holdout_fraction)
    if n_forget < 1:
        raise ValueError(
            f"forget_fraction={forget_fraction} of num_people={num_people} gives an empty forget split; "
            "raise num_people or forget_fraction."
        )
    rng = random.Random(seed + 2)
    order = list(range(num_people))
    rng.shuffle(order)
    forget = [people[i] for i in order[:n_forget]]
    hold = [people[i] for i in order[n_forget : n_forget + n_hold]]
    retain = [people[i] for i in order[n_forget + n_hold :]]
    return FactsSplits(
        forget=qa_pairs(forget, seed=seed),
        retain=qa_pairs(retain, seed=seed),
        holdout=qa_pairs(hold, seed=seed),
    )


IDK_ANSWERS: tuple[str, ...] = (
    "I don't know.",
    "I have no idea.",
    "I'm not sure about that.",
    "That is something I can't tell you.",
    "I don't have that information.",
    "I can't answer that.",
    "I am not aware of that.",
    "No idea, sorry.",
)
"""Refusals used as "I don't know" targets for the forget questions (TOFU's IDK baseline, arXiv 2401.06121)."""


def encode_qa(prompt: str, answer: str, tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and answer-only labels of one QA pair, right-padded to ``max_length``."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + a)[:max_length]
    labels = ([-100] * len(p) + a)[:max_length]
    pad = max_length - len(ids)
    return {
        "input_ids": torch.tensor(ids + [tokenizer.pad_token_id] * pad),
        "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
        "labels": torch.tensor(labels + [-100] * pad),
    }


def encode_prompt(prompt: str, tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
    """A prompt left-padded to ``max_length`` (generation continues from the right end)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_length:]
    pad = max_length - len(ids)
    return {
        "prompt_ids": torch.tensor([tokenizer.pad_token_id] * pad + ids),
        "prompt_mask": torch.tensor([0] * pad + [1] * len(ids)),
    }


def idk_answer(index: int, seed: int = 0) -> str:
    """The refusal used for the ``index``-th forget pair (fixed for a seed, varied across pairs)."""
    return IDK_ANSWERS[random.Random(seed * 100_003 + index).randrange(len(IDK_ANSWERS))]


class ForgetQADataset(Dataset):
    """Forget pairs encoded as ``prompt + answer`` plus the same prompt with an "I don't know" answer.

    Items hold ``input_ids``/``attention_mask``/``labels`` (the fact) and ``idk_input_ids``/
    ``idk_attention_mask``/``idk_labels`` (the refusal), so every forget objective, including the
    IDK one, reads the same batch.
    """

    def __init__(self, pairs: list[QAPair], tokenizer: Any, max_length: int = 64, seed: int = 0) -> None:
        self.pairs, self.tokenizer, self.max_length, self.seed = pairs, tokenizer, max_length, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pair = self.pairs[i]
        item = encode_qa(pair.prompt(), pair.answer, self.tokenizer, self.max_length)
        idk = encode_qa(pair.prompt(), idk_answer(i, self.seed), self.tokenizer, self.max_length)
        item.update({f"idk_{k}": v for k, v in idk.items()})
        return item


TRUTH_RATIO_QUESTIONS = ("original", "paraphrased")


class FactsEvalDataset(Dataset):
    """What the unlearning metrics need for each QA pair, as tensors (plus the answer and split names).

    Items hold the pair (``input_ids``/``attention_mask``/``labels``), the left-padded prompt for
    greedy generation (``prompt_ids``/``prompt_mask``), the true answer and the ``k`` perturbed
    answers after the truth-ratio question (``true_*`` and ``pert_*``, the latter shaped
    ``(k, max_length)``), the ``answer`` string and the ``split`` name.

    Args:
        truth_ratio_question: which question the truth ratio conditions on: ``"original"`` (the one
            trained on) or ``"paraphrased"`` (tests whether knowledge survives rephrasing).
    """

    def __init__(
        self,
        pairs: list[QAPair],
        tokenizer: Any,
        split: str,
        max_length: int = 64,
        truth_ratio_question: str = "original",
    ) -> None:
        if truth_ratio_question not in TRUTH_RATIO_QUESTIONS:
            raise ValueError(
                f"truth_ratio_question={truth_ratio_question!r} is invalid: choose one of {TRUTH_RATIO_QUESTIONS}."
            )
        if pairs and len({len(p.perturbed_answers) for p in pairs}) != 1:
            raise ValueError(
                "pairs must all carry the same number of perturbed_answers (make them with qa_pairs)."
            )
        self.pairs, self.tokenizer, self.split = pairs, tokenizer, split
        self.max_length, self.truth_ratio_question = max_length, truth_ratio_question

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        pair, tok, n = self.pairs[i], self.tokenizer, self.max_length
        item: dict[str, Any] = encode_qa(pair.prompt(), pair.answer, tok, n)
        item.update(encode_prompt(pair.prompt(), tok, n))
        question = pair.question if self.truth_ratio_question == "original" else pair.paraphrased_question
        prompt = f"Q: {question}\nA:"
        item.update({f"true_{k}": v for k, v in encode_qa(prompt, pair.answer, tok, n).items()})
        perturbed = [encode_qa(prompt, wrong, tok, n) for wrong in pair.perturbed_answers]
        for key in ("input_ids", "attention_mask", "labels"):
            item[f"pert_{key}"] = torch.stack([p[key] for p in perturbed])
        item["answer"] = pair.answer
        item["split"] = self.split
        return item
