"""Synthetic fictitious-facts QA data with forget/retain splits, in the spirit of TOFU.

TOFU (Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", arXiv 2401.06121) fine-tunes a
model on facts about people who do not exist, so anything the model knows about them came from
that fine-tuning and can be unlearned measurably. This module makes such a set offline and
deterministically from a seed: fictitious people with a birthplace, a job, a book and a birth
year, one question/answer pair per attribute, and a split of the people into forget and retain.

Memory: a few hundred short strings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_SYLLABLES = ["ka", "lo", "mi", "ren", "tor", "va", "zel", "qui", "bra", "dun", "fae", "gor", "hal", "isk", "jor"]
_CITIES = ["Quellport", "Ashvane", "Brindlemoor", "Corvath", "Dunmere", "Elsward", "Fennick", "Glimmerholt"]
_JOBS = ["cartographer", "glassblower", "astronomer", "beekeeper", "clockmaker", "archivist", "luthier", "tanner"]
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


def qa_pairs(people: list[Person], attributes: tuple[str, ...] = ATTRIBUTES, seed: int = 0, perturbed: int = 3) -> list[QAPair]:
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
        raise ValueError(f"forget_fraction={forget_fraction!r} is invalid: use a fraction in (0, 1), e.g. 0.1.")
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
    return FactsSplits(forget=qa_pairs(forget, seed=seed), retain=qa_pairs(retain, seed=seed), holdout=qa_pairs(hold, seed=seed))
