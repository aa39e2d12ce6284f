"""The ZO optimizers' public names, in one import: base, rules and the backend choice.

``from lightning_zobi.zo.optim import ZOSGD, build_optimizer`` keeps working; the code lives in
``zo/base.py`` (the :class:`ZOOptimizer` base), ``zo/rules/`` (one file per rule family) and
``zo/backends.py`` (the registry and the choice of execution path).
"""

from lightning_zobi.zo.backends import FUSED_ONLY_KWARGS, FUSED_RULES, OPTIMIZERS, build_optimizer
from lightning_zobi.zo.base import (
    _ROUNDING_SALT,
    NonFiniteLossError,
    ZOOptimizer,
    _check_beta,
    _no_graph,
    _reject_directions,
    _set_group_hparams,
    extra_state_bytes,
)
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
from lightning_zobi.zo.rules.hybrid import _split_fo_groups

__all__ = [
    "FUSED_ONLY_KWARGS",
    "FUSED_RULES",
    "LOZO",
    "LOZOM",
    "OPTIMIZERS",
    "ZOSGD",
    "NonFiniteLossError",
    "SparseZO",
    "ZOAdam",
    "ZOFOHybrid",
    "ZOOptimizer",
    "ZOSGDCons",
    "ZOSGDMomentum",
    "ZOSign",
    "_ROUNDING_SALT",
    "_check_beta",
    "_no_graph",
    "_reject_directions",
    "_set_group_hparams",
    "_split_fo_groups",
    "build_optimizer",
    "extra_state_bytes",
]
