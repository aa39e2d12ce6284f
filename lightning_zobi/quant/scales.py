"""Find the quantized layers of a model and expose their continuous scales as plain tensors.

QZO ("Fine-tuning Quantized Neural Networks with Zeroth-order Optimization", Shang et al.,
arXiv 2505.13430) writes a quantized weight as ``w = Δ ⊙ w̄``: discrete codes ``w̄`` that stay
frozen, and continuous per-block/per-group scales ``Δ`` that a zeroth-order optimizer perturbs
and updates in place. Each quantization library stores ``Δ`` differently, so one small
:class:`ScaleAdapter` per backend finds the layers it knows, prepares them (once, at set-up) and
returns the scale tensors the layer's forward reads, so an in-place change is seen by the next
forward and nothing is copied per step.

Backends:

* ``bitsandbytes`` 4-bit (``bnb.nn.Linear4bit``, what ``BitsAndBytesConfig(load_in_4bit=True)``
  in transformers and diffusers produces): ``Δ`` is ``weight.quant_state.absmax``, one float per
  block of 64 weights. With double quantization (``compress_statistics=True`` /
  ``bnb_4bit_use_double_quant=True``) absmax is itself stored as uint8 codes plus a second
  state, which an in-place float update cannot touch; ``unnest=True`` dequantizes it once into a
  float32 tensor (bitsandbytes' own ``dequantize_blockwise``, bit-identical to what the forward
  computes) at a cost of 3 more bytes per 64 weights (≈ 0.05 bytes per weight, +9% over the
  0.53 bytes of a double-quantized nf4 weight). With ``compress_statistics=False`` absmax is
  already float32 and nothing changes. Runs on CPU and CUDA.
* ``torchao`` weight-only tensor subclasses with ``qdata``/``scale`` attributes (e.g. the
  ``IntxUnpackedToInt8Tensor`` of ``IntxWeightOnlyConfig(weight_dtype=torch.int4,
  granularity=PerGroup(g))``, which runs on CPU): ``Δ`` is ``weight.scale``.

Memory: none beyond the one-off un-nesting above; the tensors returned are the layers' own.
"""

from __future__ import annotations

import hashlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass
class ScaleEntry:
    """One quantized layer's continuous scales, as the tensor its forward reads.

    Attributes:
        name: the layer's qualified name in the model (``model.layers.0.mlp.up_proj``).
        module: the layer.
        scale: the scale tensor (float); perturbed and updated in place by QZO.
        codes: the frozen integer codes (never written by QZO).
        backend: the adapter's name.
    """

    name: str
    module: nn.Module
    scale: Tensor
    codes: Tensor
    backend: str


class ScaleAdapter(ABC):
    """Finds one backend's quantized layers and exposes their scales (see the module docstring)."""

    name: str = ""

    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """True if ``module`` is a quantized layer of this backend."""

    @abstractmethod
    def prepare(self, name: str, module: nn.Module) -> ScaleEntry:
        """Make ``module``'s scales perturbable in place (once) and return them."""

    @abstractmethod
    def current_scale(self, module: nn.Module) -> Tensor:
        """The scale tensor ``module``'s forward reads right now."""

    def extra_bytes(self, module: nn.Module) -> int:
        """Bytes :meth:`prepare` added to ``module`` (0 unless it had to un-nest)."""
        return 0


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # pragma: no cover - bitsandbytes is a declared extra
        raise ImportError(
            "The bitsandbytes backend needs `pip install bitsandbytes` (extra `lightning-zobi[quant]`)."
        ) from err
    return bnb


class BitsAndBytes4bitAdapter(ScaleAdapter):
    """bitsandbytes ``Linear4bit`` (nf4/fp4): the scales are ``weight.quant_state.absmax``.

    Args:
        unnest: de-quantize double-quantized absmax to a float32 copy at set-up (3 extra bytes per
            64 weights). ``False`` refuses double-quantized layers with a clear error instead.

    Set-up also turns off bitsandbytes' CPU inference repacking (``support_avx512bf16_for_cpu``):
    in eval mode without grad it would replace absmax by a transposed bfloat16 copy, which would
    both detach the tensor QZO holds and round every perturbation to 8 mantissa bits. A layer that
    was already repacked is unpacked with bitsandbytes' own inverse (its absmax is then the bf16
    rounding, converted back to float32).
    """

    name = "bitsandbytes"

    def __init__(self, unnest: bool = True) -> None:
        self.unnest = unnest
        self._added: dict[int, int] = {}

    def matches(self, module: nn.Module) -> bool:
        try:
            import bitsandbytes as bnb
        except ImportError:
            return False
        return isinstance(module, bnb.nn.Linear4bit)

    def current_scale(self, module: nn.Module) -> Tensor:
        return module.weight.quant_state.absmax

    def extra_bytes(self, module: nn.Module) -> int:
        return self._added.get(id(module), 0)

    def prepare(self, name: str, module: nn.Module) -> ScaleEntry:
        bnb = _bnb()
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is None or not getattr(weight, "bnb_quantized", True):
            raise ValueError(
                f"Layer {name!r} is a bitsandbytes Linear4bit that is not quantized yet (no quant_state). "
                "Move the model to its device first (bitsandbytes quantizes on .to(device)), then set up QZO."
            )
        module.support_avx512bf16_for_cpu = False
        if getattr(state, "packing_format_for_cpu", False):
            weight.data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
            if not state.nested:  # the inverse re-nests nested states but leaves others transposed bf16
                state.absmax = state.absmax.T.reshape(-1).float().contiguous()
            weight.quant_state = state
            module.quant_state = state
            log.warning(
                "QZO: layer %s had been repacked for CPU inference; its absmax went through bfloat16.", name
            )
        if state.nested:
            if not self.unnest:
                raise ValueError(
                    f"Layer {name!r} has double-quantized scales (compress_statistics=True / "
                    "bnb_4bit_use_double_quant=True): its absmax is uint8 codes and cannot be perturbed in place. "
                    "Pass unnest=True (QZO then keeps a float32 copy: 3 more bytes per 64 weights) or quantize "
                    "with compress_statistics=False / bnb_4bit_use_double_quant=False."
                )
            before = state.absmax.nbytes + state.state2.absmax.nbytes  # the 1 KiB nested code map is shared
            absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2)
            absmax = (absmax + state.offset).float()
            state.absmax = absmax.contiguous()
            state.nested = False
            state.state2 = None
            state.offset = None
            self._added[id(module)] = state.absmax.nbytes - before
        if not state.absmax.is_floating_point():
            raise ValueError(
                f"Layer {name!r}: absmax has dtype {state.absmax.dtype}; QZO needs floating-point scales."
            )
        return ScaleEntry(name=name, module=module, scale=state.absmax, codes=weight.data, backend=self.name)


class TorchAOAdapter(ScaleAdapter):
    """torchao weight-only quantized tensors with ``qdata`` codes and a float ``scale`` (``Δ``).

    Covers the CPU-capable ``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig``) and the other
    torchao subclasses that name their codes ``qdata`` and their scales ``scale``. Zero points,
    where present, stay frozen like the codes. Nothing is copied.
    """

    name = "torchao"

    @staticmethod
    def _is_torchao_weight(weight: object) -> bool:
        return (
            isinstance(weight, Tensor)
            and type(weight).__module__.startswith("torchao.")
            and isinstance(getattr(weight, "qdata", None), Tensor)
            and isinstance(getattr(weight, "scale", None), Tensor)
        )

    def matches(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return self._is_torchao_weight(weight) or self._is_torchao_weight(getattr(weight, "data", None))

    def _weight(self, module: nn.Module) -> Tensor:
        weight = module.weight
        return weight if self._is_torchao_weight(weight) else weight.data

    def current_scale(self, module: nn.Module) -> Tensor:
        return self._weight(module).scale

    def prepare(self, name: str, module: nn.Module) -> ScaleEntry:
        weight = self._weight(module)
        if not weight.scale.is_floating_point():
            raise ValueError(
                f"Layer {name!r}: torchao scale has dtype {weight.scale.dtype}; QZO needs floats."
            )
        return ScaleEntry(name=name, module=module, scale=weight.scale, codes=weight.qdata, backend=self.name)


SCALE_ADAPTERS: dict[str, type[ScaleAdapter]] = {
    "bitsandbytes": BitsAndBytes4bitAdapter,
    "torchao": TorchAOAdapter,
}
"""Backend names accepted by ``find_quant_scales(backends=...)`` and ``QZO(backends=...)``."""


@dataclass
class QuantScales:
    """The scales of every quantized layer QZO trains, in a fixed order (the direction index).

    Attributes:
        entries: one :class:`ScaleEntry` per layer.
        extra_bytes: memory the set-up added (un-nested absmax), in bytes.
    """

    entries: list[ScaleEntry]
    extra_bytes: int = 0
    _adapters: dict[str, ScaleAdapter] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.tensors)

    @property
    def tensors(self) -> list[Tensor]:
        """The scale tensors (what the QZO optimizer holds as its parameters)."""
        return [e.scale for e in self.entries]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def numel(self) -> int:
        """Number of trainable scalars."""
        return sum(e.scale.numel() for e in self.entries)

    def check_bound(self) -> None:
        """Raise if a layer's forward no longer reads the tensor QZO holds (e.g. after ``.to()``)."""
        for e in self.entries:
            if self._adapters[e.backend].current_scale(e.module) is not e.scale:
                raise RuntimeError(
                    f"QZO: the scales of layer {e.name!r} were replaced after set-up (the model was moved to "
                    "another device or re-quantized), so updates would be lost. Build the QZO optimizer after "
                    "the model is on its final device (the QZO callback does so at fit start)."
                )

    def codes_fingerprint(self) -> str:
        """SHA-256 over every layer's frozen codes: equal before and after QZO if no code changed."""
        digest = hashlib.sha256()
        for e in self.entries:
            digest.update(e.name.encode())
            digest.update(e.codes.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def find_quant_scales(
    model: nn.Module,
    backends: Sequence[str] | None = None,
    include: str | None = None,
    unnest: bool = True,
) -> QuantScales:
    """Collect (and prepare) the continuous scales of every quantized layer of ``model``.

    Args:
        model: any module containing quantized layers (a transformers/diffusers model, a
            LightningModule...).
        backends: adapter names from :data:`SCALE_ADAPTERS` (default: all).
        include: optional regex over layer names; only matching layers are returned.
        unnest: see :class:`BitsAndBytes4bitAdapter`.

    Raises ValueError when no quantized layer is found, naming the backends that were tried.
    """
    names = list(SCALE_ADAPTERS) if backends is None else list(backends)
    unknown = [b for b in names if b not in SCALE_ADAPTERS]
    if unknown:
        raise ValueError(f"backends={unknown!r} are unknown; choose from {sorted(SCALE_ADAPTERS)}.")
    adapters: dict[str, ScaleAdapter] = {}
    for b in names:
        adapters[b] = BitsAndBytes4bitAdapter(unnest=unnest) if b == "bitsandbytes" else SCALE_ADAPTERS[b]()
    pattern = None
    if include is not None:
        try:
            pattern = re.compile(include)
        except re.error as err:
            raise ValueError(f"include={include!r} is not a valid regex ({err}).") from None
    entries: list[ScaleEntry] = []
    extra = 0
    for name, module in model.named_modules():
        if pattern is not None and not pattern.search(name):
            continue
        for adapter in adapters.values():
            if adapter.matches(module):
                entries.append(adapter.prepare(name, module))
                extra += adapter.extra_bytes(module)
                break
    if not entries:
        where = f" matching include={include!r}" if include is not None else ""
        raise ValueError(
            f"No quantized layer{where} found in {type(model).__name__} (backends tried: {names}). Quantize the "
            "model first, e.g. from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True)) or "
            "lightning_zobi.quant.quantize_linear_4bit_(model)."
        )
    return QuantScales(entries=entries, extra_bytes=extra, _adapters=adapters)
