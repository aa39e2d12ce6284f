"""Which perturber runs a ZO step: exact per module, exact per FSDP2 unit, or in place.

:func:`make_perturber` is the one place that picks; :class:`FSDPJustInTimePerturbation` is the
exact perturbation of FSDP2-sharded parameters (see its docstring). The per-module exact path and
the in-place path live in :mod:`lightning_zobi.zo.perturbation`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_zobi.zo.directions import Directions
from lightning_zobi.zo.forwards import _loss_of
from lightning_zobi.zo.perturbation import (
    InPlacePerturbation,
    JustInTimePerturbation,
    Perturber,
    Terms,
    _scale_at,
)
from lightning_zobi.zo.sharded import is_sharded


class FSDPJustInTimePerturbation(Perturber):
    """Exact perturbation of FSDP2-sharded parameters: ``θ + Σ s·z`` materialised per FSDP unit.

    FSDP2 all-gathers a unit's shards into persistent unsharded parameters in its forward
    pre-hook and frees them in its post-hook. A pre-hook registered *after* FSDP's points each
    unsharded parameter at a materialised ``θ_full + Σ s·z_full`` (the shard-invariant direction of
    :class:`~lightning_zobi.zo.sharded.ChunkedGaussianDirections`, generated for the whole tensor,
    so every rank materialises the same values), and a post-hook registered *before* FSDP's points
    it back, so the shards are never written by a perturbation.

    Memory: one unit's unsharded parameters twice (FSDP's gathered copy and the materialised one).
    """

    def __init__(self, params: Sequence[Tensor], directions: Directions, units: list[tuple[nn.Module, list]]) -> None:
        super().__init__(params, directions)
        self.units = units
        self._terms: Terms = ()
        self._saved: list[tuple[Tensor, Tensor]] = []

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        for unit, entries in self.units:
            if unit is module:
                for index, fsdp_param in entries:
                    full = fsdp_param.unsharded_param
                    compute = torch.float32 if full.dtype in (torch.bfloat16, torch.float16) else full.dtype
                    out = full.detach().to(compute, copy=True)
                    for key, scale in self._terms:
                        s = _scale_at(scale, index)
                        if s:
                            self.directions.accumulate_(out, full.detach(), index, key, s)
                    self._saved.append((full, full.data))
                    full.data = out.to(full.dtype)

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        ids = {id(fp.unsharded_param) for unit, entries in self.units if unit is module for _, fp in entries}
        keep = []
        for full, data in self._saved:
            if id(full) in ids:
                full.data = data
            else:
                keep.append((full, data))
        self._saved = keep

    def loss_at(self, closure: Callable[[], Any], terms: Terms) -> Any:
        self._terms = list(terms)
        hooks = []
        for unit, _ in self.units:
            hooks.append(unit.register_forward_pre_hook(self._pre_hook))
            hooks.append(unit.register_forward_hook(self._post_hook, prepend=True, always_call=True))
        try:
            return _loss_of(closure)
        finally:
            for h in hooks:
                h.remove()
            for full, data in self._saved:
                full.data = data
            self._saved = []


def fsdp_units(module: nn.Module | None, params: Sequence[Tensor]) -> list[tuple[nn.Module, list]] | None:
    """``[(FSDP unit, [(param index, FSDPParam)])]`` covering every sharded parameter, or None."""
    if module is None:
        return None
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state
    except ImportError:  # pragma: no cover - older torch
        return None
    index = {id(p): i for i, p in enumerate(params)}
    units, covered = [], set()
    for sub in module.modules():
        state = _get_module_fsdp_state(sub)
        group = getattr(state, "_fsdp_param_group", None) if state is not None else None
        if group is None:
            continue
        entries = [(index[id(fp.sharded_param)], fp) for fp in group.fsdp_params if id(fp.sharded_param) in index]
        if entries:
            units.append((sub, entries))
            covered |= {i for i, _ in entries}
    sharded = {i for i, p in enumerate(params) if is_sharded(p)}
    return units if units and sharded <= covered and covered == set(range(len(params))) else None


def make_perturber(
    mode: str,
    params: Sequence[Tensor],
    directions: Directions,
    owners: dict[int, nn.Module] | None = None,
    module: nn.Module | None = None,
) -> Perturber:
    """The perturber for ``perturbation=mode`` (the one place that picks one).

    Sharded parameters (FSDP2 ``DTensor`` s) are materialised per FSDP unit when the optimizer is
    attached to the sharded model (the ``ZeroOrder`` callback attaches it; plain PyTorch:
    ``opt.attach(model)``). Otherwise, and for sharding FSDP2 does not manage (tensor parallel),
    they are perturbed in place, with a warning.
    """
    if mode == "exact" and any(is_sharded(p) for p in params):
        units = fsdp_units(module, params)
        if units is not None:
            return FSDPJustInTimePerturbation(params, directions, units)
        warnings.warn(
            "perturbation='exact' needs the FSDP2-sharded model to materialise θ ± εz per unit: call "
            "opt.attach(model) (ZeroOrder does). Without it, or for DTensors FSDP2 does not manage, this "
            "optimizer perturbs them in place (each write rounds; updates still use stochastic rounding).",
            stacklevel=3,
        )
        return InPlacePerturbation(params, directions)
    if mode == "exact":
        return JustInTimePerturbation(params, directions, owners)
    if mode == "inplace":
        return InPlacePerturbation(params, directions)
    raise ValueError(
        f"perturbation={mode!r} is invalid: use 'exact' (θ is never written by a perturbation; bit-identical "
        "at lr=0 in every dtype, the default) or 'inplace' (MeZO's in-place θ ± εz, which rounds)."
    )
