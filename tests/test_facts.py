"""The generated fictitious-facts set: deterministic, disjoint splits, clear errors."""

from __future__ import annotations

import pytest

from lightning_zobi.data.facts import make_people, make_splits


def test_generation_is_deterministic_and_splits_are_disjoint():
    a, b = (
        make_splits(num_people=30, forget_fraction=0.1, seed=3),
        make_splits(num_people=30, forget_fraction=0.1, seed=3),
    )
    assert a == b
    people = [{q.person for q in split} for split in (a.forget, a.retain, a.holdout)]
    assert len(people[0]) == 3 and len(people[2]) == 3 and len(people[1]) == 24
    assert not (people[0] & people[1]) and not (people[0] & people[2]) and not (people[1] & people[2])
    for pair in a.forget:
        assert pair.answer not in pair.perturbed_answers and len(pair.perturbed_answers) == 3
    assert make_splits(num_people=30, seed=4).forget != a.forget


def test_empty_forget_split_and_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="empty forget split; raise num_people or forget_fraction"):
        make_splits(num_people=4, forget_fraction=0.1)
    with pytest.raises(ValueError, match="forget_fraction=0"):
        make_splits(forget_fraction=0)
    with pytest.raises(ValueError, match="leave retain people"):
        make_splits(forget_fraction=0.5, holdout_fraction=0.5)
    with pytest.raises(ValueError, match="num_people=0"):
        make_people(0)
