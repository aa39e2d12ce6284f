"""Bilevel objectives and solvers (pure torch, no Lightning).

``BilevelProblem`` names an upper loss ``f``, a lower loss ``g`` and two parameter sets; a solver's
``step(batch)`` advances it and returns the floats to log (``f``, ``g``, ``gap``, ``gamma``,
``objective``). Solvers: ``"penalty"`` (:class:`ValueFunctionPenalty`), ``"vf_free"``
(:class:`ValueFunctionFree`), ``"zofo"`` (:class:`BilevelZOFO`). :class:`DataReweighting` (ScaleBiO)
learns one weight per data source over a model trained on the weighted mixture.
"""

from lightning_zobi.bilevel.penalty import ValueFunctionFree, ValueFunctionPenalty
from lightning_zobi.bilevel.problem import (
    GAMMA_SCHEDULES,
    BilevelProblem,
    BilevelSolver,
    GammaSchedule,
    select_parameters,
)
from lightning_zobi.bilevel.reweighting import DataReweighting, SourceWeights, project_simplex
from lightning_zobi.bilevel.zofo import BilevelZOFO

SOLVERS: dict[str, type[BilevelSolver]] = {
    "penalty": ValueFunctionPenalty,
    "vf_free": ValueFunctionFree,
    "zofo": BilevelZOFO,
}
"""Solver names accepted by the ``Bilevel`` callback and recipes."""

__all__ = [
    "GAMMA_SCHEDULES",
    "SOLVERS",
    "BilevelProblem",
    "BilevelSolver",
    "BilevelZOFO",
    "DataReweighting",
    "GammaSchedule",
    "SourceWeights",
    "ValueFunctionFree",
    "ValueFunctionPenalty",
    "project_simplex",
    "select_parameters",
]
