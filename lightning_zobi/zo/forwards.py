"""How the forwards of one ZO step are run: shared randomness and train/eval mode.

A two-point estimate ``(L(θ+εz) − L(θ−εz)) / 2ε`` is a directional derivative only when both
losses are the *same function* of θ. A user's ``training_step`` draws random numbers (dropout
masks, diffusion timesteps and noise, data augmentation): drawn afresh for each forward, the
difference measures the noise of two draws, not the slope along ``z`` (with ``Dropout(0.1)`` the
projected gradient of a fixed ``z`` at a fixed θ had a std of 11.2 around a mean of 2.1).

:class:`StepForwards` wraps the user's closure so that every forward of one step starts from the
same random state (``rng="shared"``, the default): the CPU generator, every initialised CUDA
generator, Python's ``random`` and NumPy's global state are captured before the first forward and
replayed before each later one; after the step they are left where the first forward left them,
so the next step draws new masks as a plain training loop would. ``forward_mode="eval"`` instead
runs the forwards with the module in eval mode (dropout off), as MeZO's code does.

Memory: a few KiB of generator state per step.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

Closure = Callable[[], "Tensor | float | None"]
"""A forward-only closure returning the scalar loss."""

RNG_MODES = ("shared", "independent")
FORWARD_MODES = ("train", "eval")


def _capture() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _restore(state: tuple[Any, ...]) -> None:
    cpu, cuda, py, npy = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(py)
    np.random.set_state(npy)


@contextmanager
def eval_mode(module: nn.Module | None) -> Iterator[None]:
    """Run the body with ``module`` (and every submodule) in eval mode; restore each flag after."""
    if module is None:
        yield
        return
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


class StepForwards:
    """The closure of one ZO step, called once per forward with the randomness policy applied.

    Args:
        closure: the user's forward-only closure.
        rng: ``"shared"`` replays the random state of the first forward before every later one;
            ``"independent"`` lets each forward draw afresh (the references' behaviour in train mode).
        forward_mode: ``"train"`` (as the module is) or ``"eval"`` (``module`` put in eval mode
            for the step's forwards, as MeZO does).
        module: the model whose mode ``forward_mode="eval"`` switches.
    """

    def __init__(
        self,
        closure: Callable[[], Any],
        *,
        rng: str = "shared",
        forward_mode: str = "train",
        module: nn.Module | None = None,
    ) -> None:
        self.closure = closure
        self.rng = rng
        self.forward_mode = forward_mode
        self.module = module
        self._start: tuple[Any, ...] | None = None
        self._after_first: tuple[Any, ...] | None = None

    def __call__(self) -> Any:
        if self.rng == "shared":
            if self._start is None:
                self._start = _capture()
            else:
                _restore(self._start)
        with eval_mode(self.module if self.forward_mode == "eval" else None):
            out = self.closure()
        if self.rng == "shared" and self._after_first is None:
            self._after_first = _capture()
        return out

    def finish(self) -> None:
        """Leave the random state where the step's first forward left it (one forward's worth of draws)."""
        if self._after_first is not None:
            _restore(self._after_first)


def check_modes(rng: str, forward_mode: str) -> None:
    """Clear errors for unknown ``rng`` / ``forward_mode`` values."""
    if rng not in RNG_MODES:
        raise ValueError(
            f"rng={rng!r} is invalid: use 'shared' (both forwards of a query see the same dropout/noise draws, "
            "the default) or 'independent'."
        )
    if forward_mode not in FORWARD_MODES:
        raise ValueError(
            f"forward_mode={forward_mode!r} is invalid: use 'train' (the module's own mode) or 'eval' "
            "(the ZO forwards run in eval mode, as MeZO)."
        )


def _loss_of(closure: Closure) -> Tensor | float:
    """Run a forward-only closure and return its scalar loss as is (a tensor stays on its device)."""
    loss = closure()
    if loss is None:
        raise ValueError(
            "The closure returned no loss (None). A ZO step needs a scalar loss: make training_step/closure "
            "return the loss tensor (or a dict with a 'loss' key)."
        )
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"The closure returned a tensor of shape {tuple(loss.shape)}; a ZO step needs a scalar loss. "
                "Reduce it (e.g. loss.mean()) before returning."
            )
        return loss.detach()
    if isinstance(loss, (int, float)):
        return float(loss)
    raise TypeError(
        f"The closure returned {type(loss).__name__}; a ZO step needs a scalar loss (Tensor or float)."
    )
