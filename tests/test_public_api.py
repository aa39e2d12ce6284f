"""Every public name resolves, and the strategies are registered on import."""

from __future__ import annotations

import pytest
from lightning.pytorch.strategies import StrategyRegistry

import lightning_zobi


@pytest.mark.parametrize("name", lightning_zobi.__all__)
def test_public_name_resolves(name):
    assert getattr(lightning_zobi, name) is not None


def test_strategies_are_registered():
    assert {"zo_ddp", "zo_ddp_per_rank", "zo_fsdp"} <= set(StrategyRegistry.available_strategies())


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lightning_zobi.Nope  # noqa: B018
