"""ZO past the accelerator's memory: parameters in host memory, on the device only while used.

A ZO step needs no gradient and no optimizer state, so the only large tensors are the weights.
:class:`ParameterOffload` keeps them in (pinned) host memory; a tensor is copied to the device just
before the module that reads it runs and dropped when it returns, so the device holds the
activations of one forward plus about one block of weights (ZO2, "ZO2: Scalable Zeroth-Order
Fine-Tuning for Extremely Large Language Models with Limited GPU Memory", arXiv 2503.12668, streams
blocks the same way). Copies run on a side stream ``prefetch`` tensors ahead, in the order the
first forward asked for them, so the transfer of the next block overlaps the compute of this one.

In a ZO step (:class:`OffloadedJustInTime`, the exact perturbation of offloaded tensors) each
arriving tensor is perturbed on the device; the update fetches each tensor, applies the rule on the
device (with stochastic rounding for bf16/fp16) and writes it back: per step two host→device copies
for the forwards and one round trip for the update. Outside ZO steps (validation, generation) hooks
on the owning modules fetch the weights unperturbed.

Rules that keep state (momentum, Adam, LOZO-M, the FO hybrid) are refused: their state would have
to be streamed too. Memory on the device: the activations, the in-flight tensors (≤ ``prefetch``+1
blocks) and their perturbed copies; on the host: the weights, pinned.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_zobi.zo.directions import Directions
from lightning_zobi.zo.perturbation import JustInTimePerturbation
from lightning_zobi.zo.rounding import stochastic_round

STATELESS_RULES = ("ZOSGD", "ZOSign", "ZOSGDCons", "LOZO", "SparseZO")


class ParameterOffload:
    """Host-resident parameters, fetched to ``device`` on demand (with prefetch on CUDA).

    Args:
        params: the tensors to keep on the host (the ZO optimizer's parameters).
        device: where the forward runs (``"cuda"``; ``"cpu"`` works too, for tests).
        prefetch: tensors copied ahead of use, in the recorded forward order.
        pin: pin host memory (default: when ``device`` is CUDA), needed for asynchronous copies.
    """

    def __init__(
        self, params: Sequence[Tensor], device: str | torch.device, prefetch: int = 8, pin: bool | None = None
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.params = list(params)
        self.prefetch = int(prefetch)
        cuda = self.device.type == "cuda"
        pin = cuda if pin is None else pin
        self._ids = {id(p): i for i, p in enumerate(self.params)}
        with torch.no_grad():
            for p in self.params:
                host = p.data.to("cpu", copy=p.device.type != "cpu")
                p.data = host.pin_memory() if pin else host
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._inflight: dict[int, tuple[Tensor, Any]] = {}
        self.order: list[int] | None = None
        self._seen: list[int] = []
        self.bytes_to_device = 0
        self.bytes_to_host = 0
        self._handles: list[RemovableHandle] = []
        self._plain_saved: dict[int, Tensor] = {}
        self.active = False

    def holds(self, param: Tensor) -> bool:
        return id(param) in self._ids

    def _copy(self, index: int) -> tuple[Tensor, Any]:
        host = self.params[index].data
        self.bytes_to_device += host.numel() * host.element_size()
        if self._stream is None:
            return host.to(self.device, copy=True), None
        with torch.cuda.stream(self._stream):
            dev = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return dev, event

    def fetch(self, index: int, in_index_order: bool = False) -> Tensor:
        """Tensor ``index`` on the device (waiting for its prefetch), and start the next copies.

        The next copies follow the recorded forward order, or the parameter order for the update
        pass (``in_index_order``); at most ``prefetch`` copies are in flight.
        """
        if self.order is None and not in_index_order:
            self._seen.append(index)
        dev, event = self._inflight.pop(index, None) or self._copy(index)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            dev.record_stream(torch.cuda.current_stream(self.device))
        if self.prefetch:
            if in_index_order:
                upcoming: Sequence[int] = range(index + 1, min(index + 1 + self.prefetch, len(self.params)))
            elif self.order is not None and index in self._position:
                position = self._position[index]
                upcoming = self.order[position + 1 : position + 1 + self.prefetch]
            else:
                upcoming = ()
            for j in upcoming:
                if len(self._inflight) >= self.prefetch:
                    break
                if j not in self._inflight:
                    self._inflight[j] = self._copy(j)
        return dev

    def end_forward(self) -> None:
        """Record the order of the first full forward (for prefetch) and drop unused prefetches."""
        if self.order is None and self._seen:
            self.order = list(dict.fromkeys(self._seen))
            self._position = {i: k for k, i in enumerate(self.order)}
        self._inflight.clear()

    def store(self, host: Tensor, value: Tensor) -> None:
        """Write ``value`` (on the device) back into the host tensor ``host``."""
        self.bytes_to_host += host.numel() * host.element_size()
        host.copy_(value, non_blocking=False)

    # ------------------------------------------------------------ plain forwards (no ZO step)
    def _pre(self, module: nn.Module, args: Any) -> None:
        if self.active:
            return
        for p in module._parameters.values():
            i = self._ids.get(id(p)) if p is not None else None
            if i is not None and i not in self._plain_saved:
                self._plain_saved[i] = p.data
                p.data = self.fetch(i)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.active:
            return
        for p in module._parameters.values():
            i = self._ids.get(id(p)) if p is not None else None
            if i is not None and i in self._plain_saved:
                p.data = self._plain_saved.pop(i)

    def install(self, module: nn.Module) -> None:
        """Hooks that fetch the weights for forwards outside ZO steps (validation, generation)."""
        for sub in module.modules():
            if any(p is not None and id(p) in self._ids for p in sub._parameters.values()):
                self._handles.append(sub.register_forward_pre_hook(self._pre))
                self._handles.append(sub.register_forward_hook(self._post, always_call=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class OffloadedJustInTime(JustInTimePerturbation):
    """Exact perturbation of host-resident tensors: fetched to the device, perturbed there, dropped after."""

    def __init__(
        self,
        params: Sequence[Tensor],
        directions: Directions,
        offload: ParameterOffload,
        owners: dict[int, nn.Module] | None = None,
    ) -> None:
        super().__init__(params, directions, owners)
        self.offload = offload

    def source(self, index: int) -> Tensor:
        return self.offload.fetch(index)

    def loss_at(self, closure: Any, terms: Any) -> Any:
        self.offload.active = True
        try:
            return super().loss_at(closure, terms)
        finally:
            self.offload.active = False
            self.offload.end_forward()


@contextmanager
def offloaded_writable(
    offload: ParameterOffload, param: Tensor, generator_for: Any, rounding: bool
) -> Iterator[Tensor]:
    """The update of one host-resident parameter, done on the device and written back.

    While the rule runs, ``param`` points at its device copy (so directions are drawn on the
    device, as in the forwards); bf16/fp16 updates are computed in fp32 and stochastically rounded.
    """
    index = offload._ids[id(param)]
    host = param.data
    dev = offload.fetch(index, in_index_order=True)
    param.data = dev
    try:
        half = rounding and dev.dtype in (torch.bfloat16, torch.float16)
        work = dev.float() if half else dev
        yield work
        if half:
            dev.copy_(stochastic_round(work, dev.dtype, generator_for(dev.device)))
        offload.store(host, dev)
    finally:
        param.data = host


def offload_parameters(
    optimizer: Any, module: nn.Module, device: str | torch.device = "cuda", prefetch: int = 8
) -> ParameterOffload:
    """Keep ``optimizer``'s parameters in host memory and stream them to ``device`` for each forward.

    ``module`` is the model (its buffers and any parameter the optimizer does not hold stay where
    they are: move the model to ``device`` first). Returns the :class:`ParameterOffload`, whose
    ``bytes_to_device``/``bytes_to_host`` count the traffic.
    """
    name = type(optimizer).__name__
    if not any(name == rule or name.endswith(rule) for rule in STATELESS_RULES):
        raise ValueError(
            f"{name} keeps optimizer state per parameter, which offload would have to stream too; offload "
            "supports the stateless rules zo_sgd, zo_sign, zo_sgd_cons, lozo and sparse_zo."
        )
    if getattr(optimizer, "perturbation", "exact") != "exact":
        raise ValueError("offload needs perturbation='exact' (the weights live on the host and are never perturbed there).")
    offload = ParameterOffload(optimizer._params(), device, prefetch=prefetch)
    offload.install(module)
    optimizer.offload = offload
    optimizer._perturbers.clear()
    return offload
