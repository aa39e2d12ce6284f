"""How a perturbation ``θ + Σ s·z`` reaches the forward: exactly (just in time) or in place.

In place (MeZO's way) writes ``θ += εz``, ``θ −= 2εz``, ``θ += εz``: each write rounds, and in bf16
the rounding is a random walk (1000 lr=0 steps moved a bf16 Llama by 11.5 % of its weight norm).
:class:`JustInTimePerturbation` never writes θ: while a module's forward runs, each perturbed
tensor it owns points at a freshly materialised ``θ + Σ s·z`` (computed in fp32 for bf16/fp16 and
rounded once), and points back at θ when the forward returns. Only the update writes θ, so a step
with lr = 0 leaves every parameter bit-identical, in every dtype.

Which module "owns" a tensor: for ``nn.Parameter`` s, every module that registers it (tied weights
are materialised in each of their modules, from the same seed, so consistently); for other tensors
(QZO's quantization scales) the owners given by the optimizer. Some tensors are read outside their
owner's forward (a parameter used directly in ``training_step``, a tied weight read by a parent,
a plain tensor optimised without a module): until a forward has touched the perturbed tensors,
forwards run under a ``TorchFunctionMode`` that hands any op reading a perturbed tensor that is
*not* materialised the materialised ``θ + Σ s·z`` instead (so that forward is already right, and
a closure is never run twice) and records it; such tensors are from then on materialised for the
whole forward. Reads of metadata (dtype, shape, device) do not count. A tensor first read outside
its module in a later step (a branch never taken at the first step) is not caught. torch's
``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` eval fast path, which reads sublayer
weights without calling their forwards, is switched off during perturbed forwards. Process-wide forward hooks (``register_module_forward_pre_hook``) are only
installed while a perturbed forward runs.

Memory: the materialised tensors of the module running now (≈ one block), plus the tensors
materialised for the whole forward (usually none). Passes over the parameters per central query:
two materialisations (read θ, write a scratch copy) and the update; no restore pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from lightning_zobi.zo.directions import DirectionKey, Directions
from lightning_zobi.zo.forwards import _loss_of

Scale = float | Sequence[float]
"""A term's scale: one float for every tensor, or one per tensor (indexed like the parameters)."""
Terms = Sequence[tuple[DirectionKey, Scale]]
"""An offset ``Σ_k s_k · z_k`` as ``(key, scale)`` pairs."""
PERTURBATIONS = ("exact", "inplace")


def _scale_at(scale: Scale, index: int) -> float:
    return float(scale) if isinstance(scale, (int, float)) else float(scale[index])


class Perturber(ABC):
    """Evaluates the loss at ``θ + Σ s·z``; subclasses decide how the offset is applied."""

    def __init__(self, params: Sequence[Tensor], directions: Directions) -> None:
        self.params = list(params)
        self.directions = directions

    @abstractmethod
    def loss_at(self, closure: Callable[[], Any], terms: Terms) -> Any:
        """The closure's loss at ``θ + Σ s·z`` (a detached tensor or a float)."""

    def finish(self) -> tuple[DirectionKey, float] | None:
        """A perturbation still applied to θ, as ``(key, scale)`` to add to restore it (None: θ is clean)."""
        return None


class InPlacePerturbation(Perturber):
    """MeZO's in-place perturbation: the offset is written into θ (not exact: every write rounds).

    Moves from one offset to the next with as few passes as possible (``+εz`` then ``−2εz`` for a
    central query) and reports what is still applied through :meth:`finish`, so that the rule can
    fold the restore into its update pass.
    """

    def __init__(self, params: Sequence[Tensor], directions: Directions) -> None:
        super().__init__(params, directions)
        self.current: dict[DirectionKey, Scale] = {}

    def _apply(self, terms: dict[DirectionKey, Scale]) -> None:
        for key, scale in terms.items():
            if isinstance(scale, (int, float)):
                if scale:
                    self.directions.perturb_(self.params, key, float(scale))
                continue
            with torch.no_grad():
                for index, p in enumerate(self.params):
                    if scale[index]:
                        self.directions.accumulate_(p, p, index, key, float(scale[index]))

    def _move_to(self, terms: Terms) -> None:
        target: dict[DirectionKey, Scale] = {}
        for key, scale in terms:
            target[key] = scale if key not in target else _add(target[key], scale, len(self.params))
        delta: dict[DirectionKey, Scale] = {}
        for key in {**self.current, **target}:
            now, then = self.current.get(key, 0.0), target.get(key, 0.0)
            delta[key] = _add(then, _neg(now), len(self.params))
        self._apply(delta)
        self.current = target

    def loss_at(self, closure: Callable[[], Any], terms: Terms) -> Any:
        self._move_to(terms)
        return _loss_of(closure)

    def finish(self) -> tuple[DirectionKey, float] | None:
        current = {k: s for k, s in self.current.items() if not isinstance(s, (int, float)) or s}
        if not current:
            return None
        if len(current) == 1:
            (key, scale), = current.items()
            if isinstance(scale, (int, float)):
                self.current = {}
                return key, -float(scale)
        self._move_to([])  # several directions applied: restore them now
        return None


def _neg(scale: Scale) -> Scale:
    return -scale if isinstance(scale, (int, float)) else [-s for s in scale]


def _add(a: Scale, b: Scale, n: int) -> Scale:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) + float(b)
    return [_scale_at(a, i) + _scale_at(b, i) for i in range(n)]


_METADATA_ATTRS = (
    "dtype", "shape", "device", "requires_grad", "is_cuda", "layout", "ndim", "is_leaf", "grad", "grad_fn",
    "is_sparse", "is_quantized", "is_meta", "itemsize", "nbytes", "is_nested", "is_mps", "is_cpu",
)
_METADATA_METHODS = (
    "size", "dim", "numel", "nelement", "is_floating_point", "is_complex", "data_ptr", "stride",
    "element_size", "is_contiguous", "get_device", "__len__", "storage_offset", "untyped_storage",
)
_METADATA = {getattr(Tensor, n).__get__ for n in _METADATA_ATTRS if hasattr(Tensor, n)} | {
    getattr(Tensor, n) for n in _METADATA_METHODS if hasattr(Tensor, n)
}
"""Torch functions that read a tensor's metadata, not its values (a dtype check is no use of θ)."""


class _ReadWatch(TorchFunctionMode):
    """Finds perturbed tensors read by a torch op while not materialised, and hands the op ``θ + Σ s·z``."""

    def __init__(self, owner: JustInTimePerturbation) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        owner = self.owner
        if not owner._internal and func not in _METADATA:

            def substitute(leaf: Any) -> Any:
                if isinstance(leaf, Tensor):
                    index = owner._index.get(id(leaf))
                    if index is not None:
                        owner._touched = True
                        if index not in owner._saved:
                            return owner._outside_read(index)
                return leaf

            args, kwargs = tree_map(substitute, (args, kwargs))
        return func(*args, **kwargs)


class JustInTimePerturbation(Perturber):
    """Exact perturbation: ``θ + Σ s·z`` materialised per module during its forward; θ never written.

    Args:
        params: the perturbed tensors (their position is the direction index).
        directions: the direction family (``accumulate_`` adds ``s·z`` to a working tensor).
        owners: explicit owning modules of tensors that are not ``nn.Parameter`` s of a module
            (``{id(tensor): module}``, e.g. QZO's scales); a tensor with no owner found is
            materialised for the whole forward.

    Attributes:
        whole_forward: indices of tensors materialised for the whole forward (read outside their
            owner's forward, or owned by no module); found on the first estimate.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        directions: Directions,
        owners: dict[int, nn.Module] | None = None,
    ) -> None:
        super().__init__(params, directions)
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._by_module: dict[int, list[int]] = {}
        for tensor_id, module in (owners or {}).items():
            if tensor_id in self._index:
                self._by_module.setdefault(id(module), []).append(self._index[tensor_id])
        explicit = {i for ids in self._by_module.values() for i in ids}
        self.whole_forward: set[int] = {
            i for i, p in enumerate(self.params) if not isinstance(p, nn.Parameter) and i not in explicit
        }
        self.verified = False
        self._terms: Terms = ()
        self._saved: dict[int, Tensor] = {}
        self._depth: dict[int, int] = {}
        self._internal = False
        self._touched = False
        self._outside_reads: dict[int, Tensor] = {}
        self._owned_cache: dict[int, tuple[nn.Module, list[int]]] = {}

    # ------------------------------------------------------------------ materialisation
    def source(self, index: int) -> Tensor:
        """θ of tensor ``index`` where the forward runs (the parameter itself; offload fetches it)."""
        return self.params[index].detach()

    def materialize(self, index: int) -> Tensor:
        """``θ + Σ s·z`` of tensor ``index`` as a new tensor in its dtype (one rounding for bf16/fp16)."""
        src = self.source(index)
        compute = torch.float32 if src.dtype in (torch.bfloat16, torch.float16) else src.dtype
        out = src.to(compute, copy=True)
        for key, scale in self._terms:
            s = _scale_at(scale, index)
            if s:
                self.directions.accumulate_(out, src, index, key, s)
        return out if out.dtype == src.dtype else out.to(src.dtype)

    def _swap_in(self, index: int) -> None:
        depth = self._depth.get(index, 0)
        if depth == 0:
            p = self.params[index]
            self._saved[index] = p.data
            p.data = self.materialize(index)
        self._depth[index] = depth + 1

    def _swap_out(self, index: int) -> None:
        depth = self._depth.get(index, 0) - 1
        if depth > 0:
            self._depth[index] = depth
            return
        self._depth.pop(index, None)
        saved = self._saved.pop(index, None)
        if saved is not None:
            self.params[index].data = saved

    def _outside_read(self, index: int) -> Tensor:
        """``θ + Σ s·z`` for a read outside the owner's forward (kept until the forward ends)."""
        if index not in self._outside_reads:
            self._internal = True
            try:
                self._outside_reads[index] = self.materialize(index)
            finally:
                self._internal = False
        return self._outside_reads[index]

    def _owned(self, module: nn.Module) -> list[int]:
        """Indices of the perturbed tensors ``module`` registers (cached per module: the hooks run
        for every module of every forward, so the host cost matters at 1B+ parameters)."""
        key = id(module)
        owned = self._owned_cache.get(key)
        if owned is None or owned[0] is not module:
            found = [
                i for p in module._parameters.values() if p is not None and (i := self._index.get(id(p))) is not None
            ]
            owned = self._owned_cache[key] = (module, found + self._by_module.get(key, []))
        if not self.whole_forward:
            return owned[1]
        return [i for i in owned[1] if i not in self.whole_forward]

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        owned = self._owned(module)
        if owned:
            self._internal, self._touched = True, True
            try:
                for i in owned:
                    self._swap_in(i)
            finally:
                self._internal = False

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        owned = self._owned(module)
        if owned:
            self._internal = True
            try:
                for i in owned:
                    self._swap_out(i)
            finally:
                self._internal = False

    # ------------------------------------------------------------------ evaluation
    def _run(self, closure: Callable[[], Any], watch: bool) -> Any:
        # torch's fused MultiheadAttention / TransformerEncoderLayer fast path (eval mode) reads the
        # sublayers' weights without calling their forwards: off while a perturbed forward runs
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        hooks = [
            nn.modules.module.register_module_forward_pre_hook(self._pre_hook),
            nn.modules.module.register_module_forward_hook(self._post_hook, always_call=True),
        ]
        try:
            self._internal = True
            for i in sorted(self.whole_forward):
                self._swap_in(i)
            self._internal = False
            if watch:
                with _ReadWatch(self):
                    return _loss_of(closure)
            return _loss_of(closure)
        finally:
            for h in hooks:
                h.remove()
            torch.backends.mha.set_fastpath_enabled(fastpath)
            self._internal = True
            for i in list(self._saved):  # whole-forward tensors, and any a failed forward left swapped
                self._depth[i] = 1
                self._swap_out(i)
            self._internal = False

    def loss_at(self, closure: Callable[[], Any], terms: Terms) -> Any:
        self._terms = list(terms)
        if self.verified:
            return self._run(closure, watch=False)
        self._touched, self._outside_reads = False, {}
        try:
            loss = self._run(closure, watch=True)
        finally:
            self.whole_forward |= set(self._outside_reads)  # from now on: materialised for the whole forward
            self._outside_reads = {}
        if self._touched:
            self.verified = True
        return loss
