"""The ZO rules, one file per family; each is a :class:`~lightning_zobi.zo.base.ZOOptimizer`.

A rule knows nothing of its accelerated variants (``zo/fused*.py``): ``zo/backends.py`` picks the
execution path above the rules.
"""

from lightning_zobi.zo.rules.adam import ZOAdam
from lightning_zobi.zo.rules.hybrid import ZOFOHybrid
from lightning_zobi.zo.rules.lozo import LOZO, LOZOM
from lightning_zobi.zo.rules.sgd import ZOSGD, SparseZO, ZOSGDCons, ZOSGDMomentum
from lightning_zobi.zo.rules.sign import ZOSign

__all__ = ["LOZO", "LOZOM", "ZOSGD", "SparseZO", "ZOAdam", "ZOFOHybrid", "ZOSGDCons", "ZOSGDMomentum", "ZOSign"]
