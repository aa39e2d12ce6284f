"""Where a ZO rule runs: the one place that picks the execution backend above the rules.

The rules (``zo/rules/``) are plain PyTorch and know nothing of their accelerated variants; this
module maps a rule name to its class (:data:`OPTIMIZERS`) and, in :func:`build_optimizer`, swaps in
the fused Triton class (``zo/fused/sgd.py``, ``zo/fused/lozo.py``) when the parameters are on CUDA.
Sharded execution is a direction family (``zo/sharded.py``) and exact per-unit perturbation
(``zo/perturbation.py``), chosen by the strategy. A new backend is one file plus one branch here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from lightning_zobi.zo.base import ZOOptimizer
from lightning_zobi.zo.coordinate import ZOCGE
from lightning_zobi.zo.rules import (
    LOZO,
    LOZOM,
    ZOSGD,
    SparseZO,
    ZOAdam,
    ZOFOHybrid,
    ZOSGDCons,
    ZOSGDMomentum,
    ZOSign,
)

OPTIMIZERS: dict[str, type[ZOOptimizer]] = {
    "zo_sgd": ZOSGD,
    "zo_sgd_momentum": ZOSGDMomentum,
    "zo_sign": ZOSign,
    "zo_adam": ZOAdam,
    "zo_sgd_cons": ZOSGDCons,
    "lozo": LOZO,
    "lozo_m": LOZOM,
    "sparse_zo": SparseZO,
    "zo_fo_hybrid": ZOFOHybrid,
    "zo_cge": ZOCGE,
}
"""Rule names accepted by ``ZeroOrder(optimizer=...)`` and recipes."""



FUSED_RULES = ("zo_sgd", "lozo")
"""Rules with a fused CUDA path (``zo/fused/sgd.py``, ``zo/fused/lozo.py``)."""
FUSED_ONLY_KWARGS = ("lookahead", "rounds", "fast_math")
"""Arguments only the fused classes take; the torch path of a fused rule drops them."""


def select_optimizer(
    cls: type[ZOOptimizer], params: Iterable[Any], fused: bool | None
) -> tuple[Callable[..., ZOOptimizer], list]:
    """``(constructor, params as a list)``: the fused class of ``cls`` when ``use_fused`` says so.

    Fused classes exist for ZO-SGD (:class:`~lightning_zobi.zo.fused.sgd.FusedZOSGD`) and LOZO
    (:class:`~lightning_zobi.zo.fused.lozo.FusedLOZO`), imported only when asked (Triton). On
    the torch path their constructors ignore the fused-only arguments (``lookahead``, ``rounds``,
    ``fast_math``), so one recipe runs on CPU and GPU alike.
    """
    from lightning_zobi.zo.fused.runtime import use_fused  # lazy: Triton is imported only when asked

    params = list(params)
    if cls in (ZOSGD, LOZO):
        if use_fused(fused, params):
            if cls is ZOSGD:
                from lightning_zobi.zo.fused.sgd import FusedZOSGD

                return FusedZOSGD, params
            from lightning_zobi.zo.fused.lozo import FusedLOZO

            return FusedLOZO, params

        def torch_path(
            params: Any, *, lookahead: Any = None, rounds: Any = None, fast_math: Any = None, **kwargs: Any
        ) -> ZOOptimizer:
            return cls(params, **kwargs)

        return torch_path, params
    if fused:
        raise ValueError(
            f"fused=True is implemented for 'zo_sgd' and 'lozo' only, not {cls.__name__}; drop fused=True."
        )
    return cls, params


def build_optimizer(
    name: str, params: Iterable[Any], *, fused: bool | None = None, **kwargs: Any
) -> ZOOptimizer:
    """Instantiate the rule registered as ``name`` with a clear error for unknown names.

    ``fused``: ``None`` picks the fused Triton path (``zo/fused/``) for ``zo_sgd`` when every
    parameter is on CUDA; ``False`` keeps the torch reference path; ``True`` requires the fused one.
    """
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"optimizer={name!r} is not a known ZO rule; choose one of {sorted(OPTIMIZERS)}."
        ) from None
    if fused is not False:
        cls, params = select_optimizer(cls, params, fused)
    elif name in FUSED_RULES:  # the torch path ignores the fused-only knobs, so one recipe fits both
        kwargs = {k: v for k, v in kwargs.items() if k not in FUSED_ONLY_KWARGS}
    return cls(params, **kwargs)
