"""Triton at run time for the fused ZO path: whether it is here, how a kernel source runs, what it takes.

Triton is optional (the torch path needs none of it): it is imported here, once, inside a
``try``, and the other fused modules take :data:`HAS_TRITON`, ``triton`` and ``tl`` from here, so
a CPU install without Triton still imports :mod:`lightning_zobi` (every fused class then refuses
construction with the torch-path alternative). One kernel source serves both devices:
:func:`compiled_kernel` compiles it with ``triton.jit`` for CUDA tensors and wraps it in Triton's
interpreter for CPU tensors (slow: for the tests), and :class:`_DeviceFunction` lets an interpreted
kernel call a device function. :func:`use_fused` resolves the ``fused=`` switch that
:func:`~lightning_zobi.zo.backends.select_optimizer` and
:func:`~lightning_zobi.quant.backends.qzo_optimizer` pass down.

Memory: none beyond a cache of compiled kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

try:  # Triton is optional: the torch path needs none of it.
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Parameter dtypes the fused kernels update (others take the torch path)."""


if HAS_TRITON:

    class _DeviceFunction(JITFunction):
        """A ``@triton.jit`` device function that Triton's CPU interpreter can call too.

        Compiled kernels inline it as any ``JITFunction``; an interpreted kernel calls it as a
        Python function (``JITFunction.__call__`` refuses that), so one source serves both.
        """

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            from triton.runtime.interpreter import InterpretedFunction

            return InterpretedFunction(self.fn)(*args, **kwargs)


_KERNELS: dict[tuple[Callable, str], Any] = {}


def compiled_kernel(source: Callable, device: torch.device, fallback: str) -> Any:
    """``source`` compiled by ``triton.jit`` for CUDA, or run by Triton's interpreter for CPU tensors (cached).

    ``fallback`` names the torch-path alternative in the error raised when Triton is missing.
    """
    if not HAS_TRITON:
        raise RuntimeError(f"The fused ZO path needs Triton (`pip install triton`); {fallback}.")
    kind = "cuda" if device.type == "cuda" else "interp"
    if (source, kind) not in _KERNELS:
        if kind == "cuda":
            _KERNELS[source, kind] = triton.jit(source)
        else:
            from triton.runtime.interpreter import InterpretedFunction

            _KERNELS[source, kind] = InterpretedFunction(source)
    return _KERNELS[source, kind]


def check_dtype(param: Tensor, fallback: str) -> None:
    """Refuse a parameter dtype the fused kernels cannot update, naming the torch-path ``fallback``."""
    if param.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"The fused ZO path supports {[str(d) for d in SUPPORTED_DTYPES]}, got a {param.dtype} parameter; "
            f"{fallback}."
        )


def fused_available(device: torch.device | str) -> bool:
    """True where the fused kernels run: CUDA devices with Triton (CPU only via the slow interpreter)."""
    device = torch.device(device)
    return HAS_TRITON and device.type == "cuda" and torch.cuda.is_available()


def use_fused(fused: bool | None, params: Iterable[Any]) -> bool:
    """Resolve the ``fused`` switch: ``None`` means "when every parameter is on CUDA and Triton is there"."""
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused={fused!r} must be True, False or None (automatic: fused on CUDA).")
    tensors = []
    for item in params:
        if isinstance(item, dict):
            tensors += [t[1] if isinstance(t, tuple) else t for t in item.get("params", [])]
        else:
            tensors.append(item[1] if isinstance(item, tuple) else item)
    on_cuda = bool(tensors) and all(isinstance(t, Tensor) and t.is_cuda for t in tensors)
    if fused is None:
        return HAS_TRITON and on_cuda and all(t.dtype in SUPPORTED_DTYPES for t in tensors)
    if fused and not HAS_TRITON:
        raise RuntimeError(
            "fused=True needs Triton (`pip install triton`); use fused=None/False for the torch path."
        )
    return fused


__all__ = ["HAS_TRITON", "SUPPORTED_DTYPES", "check_dtype", "compiled_kernel", "fused_available", "use_fused"]
