"""The fused path's exact perturbation: ``θ + Σ s·z`` materialised per run of tensors, θ never written.

Exactness (DESIGN, principle 2): in-place ``θ ± εz`` rounds, and in bf16 that rounding
random-walks the model, so under ``perturbation="exact"`` (the default) no perturbation writes θ.
:class:`FusedJustInTime` hands each module ``θ + Σ s·z`` computed by the fused kernel (the same
Philox directions as the in-place passes, float32 arithmetic, one rounding into a scratch buffer,
one launch per run of a few tensors) while its forward reads it; the update pass
(:class:`~lightning_zobi.zo.fused.step.FusedStep`) is the only write of θ. A central step is then
2 forwards + 2 materialisations + 1 update pass (H200, bf16, Llama-7B shape: 1.31× two forwards,
peak 1.001× inference; in place with the look-ahead fold 1.23×).

Memory: one scratch buffer of at most ``chunk_numel`` elements live per chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_zobi.zo.directions import Directions
from lightning_zobi.zo.perturbation import JustInTimePerturbation


class FusedJustInTime(JustInTimePerturbation):
    """Exact perturbation with fused materialisation: ``θ + Σ s·z`` for a run of tensors in one launch.

    The :class:`~lightning_zobi.zo.perturbation.JustInTimePerturbation` of the fused rules: θ is
    never written; a module's forward reads ``θ + Σ s·z`` computed by the directions'
    ``materialize_chunk`` (the in-place kernel's directions, float32 arithmetic, one rounding).
    The first forward materialises tensor by tensor and records the order in which the forward
    asks for them; from then on a request materialises the next tensors of that order too (same
    dtype and device, contiguous, at most ``chunk_numel`` elements: by default the largest
    perturbed tensor) into one scratch buffer, so a Llama layer costs one to three launches
    instead of nine and the host's launch overhead stays small next to the forward's own.

    Memory: one scratch buffer of at most ``chunk_numel`` elements live per chunk (freed when the
    chunk's last tensor has been swapped back), plus whatever the base class keeps for tensors
    read outside their module.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        directions: Directions,
        owners: dict[int, nn.Module] | None = None,
        chunk_numel: int | None = None,
    ) -> None:
        super().__init__(params, directions, owners)
        numels = [p.numel() for p in self.params]
        self.chunk_numel = max(numels, default=0) if chunk_numel is None else int(chunk_numel)
        self._order: list[int] | None = None
        self._position: dict[int, int] = {}
        self._seen: list[int] = []
        self._ready: dict[int, Tensor] = {}

    def loss_at(self, closure: Callable[[], Any], terms: Any) -> Any:
        self._ready.clear()
        self._seen = []
        try:
            return super().loss_at(closure, terms)
        finally:
            self._ready.clear()
            if self._order is None and self.verified and self._seen:
                order = list(dict.fromkeys(self._seen))
                self._order, self._position = order, {i: k for k, i in enumerate(order)}

    def _chunk(self, index: int) -> list[int]:
        """``index`` and the tensors the recorded order asks for next (same dtype/device, within the budget)."""
        p = self.params[index]
        if self._order is None or index not in self._position or index in self.whole_forward:
            return [index]
        chunk, total = [index], p.numel()
        for j in self._order[self._position[index] + 1 :]:
            q = self.params[j]
            if j in self._ready or j in self._saved or j in self.whole_forward or j == index:
                continue
            if q.dtype != p.dtype or q.device != p.device or not q.is_contiguous():
                break
            if total + q.numel() > self.chunk_numel:
                break
            chunk.append(j)
            total += q.numel()
        return chunk

    def materialize(self, index: int) -> Tensor:
        ready = self._ready.pop(index, None)
        if ready is not None:
            return ready
        if self._order is None:
            self._seen.append(index)
        p = self.params[index]
        fused = getattr(self.directions, "materialize_chunk", None)
        if fused is None or not p.is_contiguous() or p.numel() == 0:
            return super().materialize(index)
        chunk = self._chunk(index)
        tensors = [self.params[i] for i in chunk]
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += -(-t.numel() // 8) * 8  # 8-element aligned views: vector loads in the next forward
        out = torch.empty(total, dtype=p.dtype, device=p.device)
        if not fused(tensors, chunk, self._terms, out, offsets):
            return super().materialize(index)
        views = [out[o : o + t.numel()].view(t.shape) for o, t in zip(offsets, tensors, strict=True)]
        for i, view in zip(chunk[1:], views[1:], strict=True):
            self._ready[i] = view
        return views[0]


__all__ = ["FusedJustInTime"]
