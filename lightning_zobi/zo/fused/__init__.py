"""The fused ZO path: Gaussian and low-rank directions drawn inside Triton kernels, never stored.

One Triton kernel per pass (over *all* parameter tensors of a dtype at once) draws ``z`` from a
counter-based Philox-4x32 generator keyed by the tensor's seed and the element's position, and
computes ``θ ← β·θ + a·z_a (+ b·z_b)`` in registers: ``z`` never exists in memory, a pass is one
read and one write of the parameters. Under the default exact perturbation the same kernel writes
``θ + Σ s·z`` out of place just before a module's forward reads it, and the update pass (with
stochastic rounding for bf16/fp16) is the only write of θ. On CPU the kernels run in Triton's
interpreter (slow, for tests); ``fused=None`` picks the fused path only for CUDA parameters.

The rules (``zo/rules/``) do not import this package: :mod:`lightning_zobi.zo.backends` (and
:mod:`lightning_zobi.quant.backends` for QZO) choose it above them. Modules, from the device up:

* :mod:`~lightning_zobi.zo.fused.runtime`: the optional Triton import, compile-or-interpret,
  supported dtypes, :func:`use_fused` / :func:`fused_available`.
* :mod:`~lightning_zobi.zo.fused.philox`, :mod:`~lightning_zobi.zo.fused.rounding`: device
  functions (Philox-4x32 + Box-Muller normals; stochastic rounding) shared by both kernels.
* :mod:`~lightning_zobi.zo.fused.tables`: per-tensor seeds and coefficient tables, plan cache.
* :mod:`~lightning_zobi.zo.fused.dense_kernel`, :mod:`~lightning_zobi.zo.fused.lowrank_kernel`:
  the two kernels and their launchers.
* :mod:`~lightning_zobi.zo.fused.directions` (:class:`FusedGaussianDirections`),
  :mod:`~lightning_zobi.zo.fused.lowrank` (:class:`FusedLowRankDirections`): direction families.
* :mod:`~lightning_zobi.zo.fused.just_in_time` (:class:`FusedJustInTime`): exact perturbation.
* :mod:`~lightning_zobi.zo.fused.step` (:class:`FusedStep`): restore + update in one pass, the
  look-ahead fold; :mod:`~lightning_zobi.zo.fused.sgd` (:class:`FusedZOSGD`) and
  :mod:`~lightning_zobi.zo.fused.lozo` (:class:`FusedLOZO`): the rules bound to it.

Memory: no direction tensor at all; per pass a small table per tensor and a cached block map.
"""

from lightning_zobi.zo.fused.directions import FusedGaussianDirections
from lightning_zobi.zo.fused.just_in_time import FusedJustInTime
from lightning_zobi.zo.fused.lowrank import FusedLowRankDirections
from lightning_zobi.zo.fused.lozo import FusedLOZO
from lightning_zobi.zo.fused.runtime import HAS_TRITON, fused_available, use_fused
from lightning_zobi.zo.fused.sgd import FusedZOSGD
from lightning_zobi.zo.fused.step import FusedStep

__all__ = [
    "HAS_TRITON",
    "FusedGaussianDirections",
    "FusedJustInTime",
    "FusedLOZO",
    "FusedLowRankDirections",
    "FusedStep",
    "FusedZOSGD",
    "fused_available",
    "use_fused",
]
