"""Forget/retain objectives for unlearning facts from a `transformers` causal LM.

An unlearning objective is ``forget_weight · F(θ; forget batch) + alpha · R(θ; retain batch)``:
``F`` removes what the forget set taught, ``R`` keeps everything else. Every term here is a
plain, minimized scalar built from one forward pass, so it works with a first-order optimizer and,
unchanged, inside a zeroth-order closure (``ZeroOrder``: forward passes only), and its two halves
are the upper (``F``) and lower (``R``) losses of the bilevel track.

Forget terms (``forget=``):

* ``"ga"``: gradient ascent, ``-NLL(forget)``. "Knowledge Unlearning for Mitigating Privacy Risks
  in Language Models" (Jang et al., ACL 2023, arXiv 2210.01504). Unbounded below: it collapses the
  model unless stopped early or balanced by a retain term.
* ``"npo"``: negative preference optimization, ``-(2/β) E log σ(-β log(π_θ(y|x) / π_ref(y|x)))``
  with sequence log-likelihoods. "Negative Preference Optimization: From Catastrophic Collapse to
  Effective Unlearning" (Zhang et al., 2024, arXiv 2404.05868). Bounded; its gradient is GA's
  reweighted by how far the sample is already forgotten relative to a frozen reference.
* ``"simnpo"``: reference-free, length-normalized NPO, ``-(2/β) E log σ(-(β/|y|) log π_θ(y|x) - γ)``.
  "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning" (Fan et
  al., 2024, arXiv 2410.07163).
* ``"rmu"``: representation misdirection, ``E‖h_ℓ(x_f) - c·u‖²`` pushes the layer-ℓ hidden states of
  forget text towards a fixed random direction ``u`` scaled by ``c``. "The WMDP Benchmark:
  Measuring and Reducing Malicious Use With Unlearning" (Li et al., 2024, arXiv 2403.03218).
  The hidden states come from a forward hook that stops the forward after layer ℓ. Defaults are
  open-unlearning's (``configs/trainer/RMU.yaml``, ``src/trainer/unlearn/rmu.py``): the output of
  decoder layer 7, ``c = 2``, the squared error averaged per sample over its answer tokens
  (``labels != -100``) and then over the batch (``rmu_tokens="answer"``). The WMDP original
  (``rmu/unlearn.py`` and its Zephyr-7B run) steers layer 7 with ``c = 6.5``, retain weight
  ``α = 1200``, trains only ``layers.5-7.mlp.down_proj`` and averages over every position,
  padding included (``rmu_tokens="all"``): :data:`RMU_PRESETS` holds both. Layer 7 needs a model
  with 8+ layers: the tiny recipes set ``rmu_layer: -1`` and ``rmu_coeff: 20`` (the last layer of
  a 2-layer model, whose hidden states have a larger norm). ``rmu_tokens="attention"`` is this
  library's earlier convention (every attention-masked token, pooled over the batch).
* ``"idk"``: fine-tune the forget questions towards "I don't know"-style refusals, ``NLL(idk)``,
  the IDK target of "TOFU: A Task of Fictitious Unlearning for LLMs" (Maini et al., 2024,
  arXiv 2401.06121). Needs ``idk_*`` keys in the forget batch (``ForgetQADataset`` makes them).

Retain terms (``retain=``): ``"nll"`` (gradient difference when paired with GA: "Continual
Learning and Private Unlearning", Liu et al., CoLLAs 2022, arXiv 2203.12817, TOFU's GradDiff),
``"kl"`` (``KL(π_ref ‖ π_θ)`` per token on retain text, TOFU's "KL minimization"), ``"rmu"``
(``‖h_ℓ(x_r) - h_ℓ^ref(x_r)‖²``, RMU's retain term) and ``"none"``.

Deliberate differences from the reference code (TOFU ``dataloader.py``, open-unlearning
``src/trainer/``), each with the exact relation (tests: ``tests/test_unlearn_llm.py``):

* **KL retain normalisation.** Ours averages ``KL(π_ref ‖ π_θ)`` over the next-token
  distributions of the attention-masked positions that predict a token (``t < T - 1``). TOFU and
  open-unlearning (``compute_kl_divergence``) call ``kl_div(..., reduction="batchmean")`` on the
  ``(B·T, V)`` rows: the mean over *every* position, padding and the last one included, so their
  value shrinks as padding grows. On unpadded rows of length ``T`` theirs equals
  ``((T - 1)·ours + mean over rows of the last position's KL) / T``.
* **IDK loss scale.** Ours is ``forget_weight · NLL(idk) + alpha · NLL(retain)``, each a mean over
  its own tokens. TOFU's ``idk`` concatenates the two batches and takes one token-weighted mean,
  ``(n_idk·NLL(idk) + n_ret·NLL(retain)) / (n_idk + n_ret)``: half of ours (``alpha = 1``) when
  the token counts are equal; scale ``lr`` (or both weights) by 1/2 to match it.
* **SimNPO's margin.** Ours follows the paper, ``-(2/β) log σ(-(β/|y|) log π_θ - γ)``; open-unlearning
  subtracts ``delta`` before multiplying by ``β``: ``-(2/β) log σ(β (NLL/|y| - delta))``. The two are
  equal when ``gamma = beta · delta`` (identical at 0).

The named methods of :data:`METHODS` pair them as the papers do (``grad_diff`` = GA + NLL,
``kl`` = GA + KL, ``npo`` = NPO + NLL, ...); any pair can be chosen explicitly.

Memory: a frozen reference model (one more copy of the weights, or none for a LoRA model whose
reference is the adapter-disabled base) for ``npo``, ``kl`` and ``rmu``; the terms themselves keep
one forward's activations (none under ZO); RMU's direction ``u`` is one hidden-size vector.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORGET_TERMS = ("ga", "npo", "simnpo", "rmu", "idk")
FORGET_TERM_FUNCTIONS: dict[str, Callable[..., Tensor]] = {}
"""Forget terms registered by other modules (:func:`register_forget_term`), ``fn(model, batch, reference, **kw)``."""
_REFERENCE_TERMS: set[str] = set()
_TERM_DEFAULTS: dict[str, dict[str, float]] = {}
RETAIN_TERMS = ("none", "nll", "kl", "rmu")
RMU_TOKENS = ("answer", "attention", "all")
"""Which positions RMU's squared error averages over (see :func:`rmu_activation_loss`)."""

RMU_PRESETS: dict[str, dict[str, Any]] = {
    "open-unlearning": {
        "rmu_layer": 7,
        "rmu_coeff": 2.0,
        "rmu_tokens": "answer",
        "alpha": 1.0,
        "trainable": None,  # configs/trainer/RMU.yaml: trainable_params_regex ".*"
    },
    "wmdp": {
        "rmu_layer": 7,
        "rmu_coeff": 6.5,
        "rmu_tokens": "all",
        "alpha": 1200.0,
        "trainable": r"layers\.(5|6|7)\.mlp\.down_proj",
    },
}
"""RMU hyper-parameters of the two references, for 32-layer 7B models (Llama-2 / Zephyr).

``open-unlearning``: ``configs/trainer/RMU.yaml`` (its class default ``steering_coeff=20`` is
overridden to 2 there). ``wmdp``: ``centerforaisafety/wmdp`` ``rmu/unlearn.py`` defaults
(``layer_id=7``, ``layer_ids=5,6,7``, ``param_ids=6``: ``mlp.down_proj``) with the Zephyr-7B
command of its README (``--steering_coeffs 6.5 --alpha 1200``).
"""

METHODS: dict[str, tuple[str, str]] = {
    "ga": ("ga", "none"),
    "grad_diff": ("ga", "nll"),
    "kl": ("ga", "kl"),
    "npo": ("npo", "nll"),
    "simnpo": ("simnpo", "nll"),
    "rmu": ("rmu", "rmu"),
    "idk": ("idk", "nll"),
}
"""Method name -> (forget term, default retain term), as each method's paper pairs them."""

_MODEL_KEYS = ("input_ids", "attention_mask")


# ---------------------------------------------------------------------------- log-likelihoods
def answer_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence sum of next-token log-probabilities of the labelled tokens, and their count.

    ``logits``: ``(B, T, V)``; ``labels``: ``(B, T)`` with ``-100`` on unscored positions (the
    transformers convention: position ``t`` of the logits predicts label ``t + 1``).
    Returns ``(logp_sum, n_tokens)``, both ``(B,)``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be (B, T, V) and (B, T)."
        )
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    token_logp = torch.log_softmax(shift_logits, dim=-1).gather(-1, shift_labels.clamp_min(0).unsqueeze(-1))
    token_logp = token_logp.squeeze(-1) * mask
    return token_logp.sum(-1), mask.sum(-1)


def sequence_logprobs(
    model: nn.Module, batch: Mapping[str, Tensor], prefix: str = ""
) -> tuple[Tensor, Tensor]:
    """``answer_logprobs`` of ``model`` on ``batch[prefix + "input_ids" | "attention_mask" | "labels"]``."""
    logits = model(
        input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"]
    ).logits
    return answer_logprobs(logits, batch[prefix + "labels"])


def mean_nll(logp_sum: Tensor, n_tokens: Tensor) -> Tensor:
    """Mean negative log-likelihood per labelled token over the whole batch (the usual LM loss)."""
    return -logp_sum.sum() / n_tokens.sum().clamp_min(1)


# ---------------------------------------------------------------------------- loss terms
def npo_loss(logp: Tensor, ref_logp: Tensor, beta: float) -> Tensor:
    """NPO: ``(2/β) mean log(1 + (π_θ/π_ref)^β) = -(2/β) mean log σ(-β (logp - ref_logp))``.

    ``logp``/``ref_logp``: per-sequence log-likelihoods ``(B,)`` of the model and the frozen
    reference. Equal to ``(2/β) log 2`` at the reference; → 0 as the forget answers become
    unlikely; its gradient is GA's times ``2 σ(β (logp - ref_logp))``, which fades as they do.

    Computed in float64 (``B`` numbers, free): near the reference the loss is ``(2/β) log 2 ≈ 13.86``
    plus a change of order ``logp - ref_logp``, which fp32 (ulp ≈ 1e-6 at 13.86) rounds away. A
    zeroth-order step sees only the difference of two such losses, so on a model that knows its
    answers well (``logp`` ≈ −1e-4) an fp32 NPO gives every ZO estimate exactly 0.
    """
    if not beta > 0:
        raise ValueError(f"beta={beta!r} is invalid: NPO's temperature must be > 0 (the paper uses 0.1).")
    delta = (logp - ref_logp.detach()).double()
    return -(2.0 / beta) * F.logsigmoid(-beta * delta).mean()


def simnpo_loss(logp_sum: Tensor, n_tokens: Tensor, beta: float, gamma: float = 0.0) -> Tensor:
    """SimNPO: ``-(2/β) mean log σ(-(β/|y|) log π_θ(y|x) - γ)``, no reference model.

    Length normalization (``/|y|``) stops long answers from dominating; ``γ`` is a reward margin.
    """
    if not beta > 0:
        raise ValueError(
            f"beta={beta!r} is invalid: SimNPO's temperature must be > 0 (the paper uses 2.5 on TOFU)."
        )
    avg_logp = (logp_sum / n_tokens.clamp_min(1)).double()  # float64 as npo_loss: the log 2 offset
    return -(2.0 / beta) * F.logsigmoid(-beta * avg_logp - gamma).mean()


def kl_to_reference(logits: Tensor, ref_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean per-token ``KL(π_ref ‖ π_θ)`` of the next-token distributions over ``mask``-ed positions.

    ``mask``: ``(B, T)`` marks the positions whose next-token distribution counts (e.g. the
    attention mask). Zero iff the model's distributions equal the reference's there.
    """
    logq = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    logp_ref = torch.log_softmax(ref_logits[:, :-1].float().detach(), dim=-1)
    kl = F.kl_div(logq, logp_ref, reduction="none", log_target=True).sum(-1)
    m = mask[:, 1:].to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


def masked_mse(hidden: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over unmasked tokens of the squared L2 distance ``‖hidden - target‖²`` / hidden size, pooled over the batch."""
    per_token = ((hidden.float() - target.float()) ** 2).mean(-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)


def per_sample_masked_mse(hidden: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``‖hidden - target‖²`` / hidden size averaged per sample over its masked tokens, then over samples.

    open-unlearning's ``RMU.compute_activation_loss`` as its comments describe it: a short answer
    weighs as much as a long one. Its code divides a ``(B,)`` sum by a ``(B, 1)`` count, which
    broadcasts to ``(B, B)`` and yields ``mean(S)·mean(1/n)``: the same value when every row has
    the same number of masked tokens, not otherwise (we keep the per-sample mean). A row with no
    masked token contributes 0 (open-unlearning divides by zero there: NaN).
    """
    per_token = ((hidden.float() - target.float()) ** 2).mean(-1)
    m = mask.to(per_token.dtype)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp_min(1)).mean()


def rmu_token_mask(batch: Mapping[str, Tensor], tokens: str = "answer", prefix: str = "") -> Tensor:
    """The positions RMU scores: ``"answer"`` (``labels != -100``), ``"attention"`` (the attention mask) or ``"all"``."""
    if tokens == "answer":
        if prefix + "labels" not in batch:
            raise ValueError(
                "rmu_tokens='answer' needs labels (-100 outside the answer) in the batch; "
                "pass rmu_tokens='attention' for unlabelled text."
            )
        return batch[prefix + "labels"] != -100
    if tokens == "attention":
        return batch[prefix + "attention_mask"].bool()
    if tokens == "all":
        return torch.ones_like(batch[prefix + "input_ids"], dtype=torch.bool)
    raise ValueError(f"rmu_tokens={tokens!r} is invalid: choose one of {RMU_TOKENS}.")


def rmu_activation_loss(
    hidden: Tensor, target: Tensor, batch: Mapping[str, Tensor], tokens: str = "answer"
) -> Tensor:
    """RMU's squared error between layer activations and their target, averaged as ``tokens`` says.

    ``"answer"``: per sample over its answer tokens, then over samples (open-unlearning);
    ``"all"``: over every position, padding included (the WMDP original's ``mse_loss``; equal to
    the per-sample mean since every row has the same length); ``"attention"``: over the
    attention-masked tokens pooled across the batch (this library's earlier convention).
    """
    mask = rmu_token_mask(batch, tokens)
    if tokens == "attention":
        return masked_mse(hidden, target, mask)
    return per_sample_masked_mse(hidden, target, mask)


def control_vector(hidden_size: int, coeff: float, seed: int = 0) -> Tensor:
    """RMU's target ``c·u``: ``u`` uniform on [0, 1)^d, normalized to unit length, fixed by ``seed``."""
    if not coeff > 0:
        raise ValueError(f"rmu_coeff={coeff!r} is invalid: the steering coefficient c must be > 0.")
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=gen)
    return coeff * u / u.norm()


# ---------------------------------------------------------------------------- hidden states by hook
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM (Llama ``model.layers``, OPT ``decoder.layers``, GPT-2 ``h``).

    Found as the largest ``nn.ModuleList`` whose name ends in ``layers`` or ``h``, so peft-wrapped
    models work too.
    """
    best: nn.ModuleList | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise ValueError(
            f"Found no decoder-layer ModuleList in {type(model).__name__}; pass a Llama/OPT/GPT-2-style model."
        )
    return best


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass once the wanted layer has run."""


@contextmanager
def capture_hidden(model: nn.Module, layer: int, stop: bool = True) -> Iterator[dict[str, Tensor]]:
    """Capture the output hidden states of decoder layer ``layer`` (negative: from the end).

    Yields a dict whose ``"hidden"`` holds ``(B, T, H)`` after a forward run inside the block. With
    ``stop=True`` the hook ends the forward right after that layer (the rest of the network is not
    run: less time and memory); call the model through :func:`run_to_layer` then.
    """
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(
            f"rmu_layer={layer!r} is out of range: the model has {len(layers)} decoder layers (the default 7 "
            "is the references' layer for 32-layer 7B models); pass rmu_layer=-1 (the last) or an index below "
            f"{len(layers)}."
        )
    store: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store["hidden"] = output[0] if isinstance(output, (tuple, list)) else output
        if stop:
            raise _StopForward

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def run_to_layer(model: nn.Module, batch: Mapping[str, Tensor], layer: int, prefix: str = "") -> Tensor:
    """Hidden states after decoder layer ``layer`` of ``model`` on the batch (forward stops there)."""
    with capture_hidden(model, layer, stop=True) as store:
        try:
            model(input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"])
        except _StopForward:
            pass
    if "hidden" not in store:
        raise RuntimeError(f"decoder layer {layer} did not run during the forward pass.")
    return store["hidden"]


# ---------------------------------------------------------------------------- the objective
@dataclass
class UnlearningObjective:
    """``forget_weight · F + alpha · R``: a forget term and a retain term, evaluated on a causal LM.

    Args:
        forget: forget term, one of :data:`FORGET_TERMS`.
        retain: retain term, one of :data:`RETAIN_TERMS`.
        alpha: weight of the retain term.
        forget_weight: weight of the forget term.
        beta: temperature of NPO (paper: 0.1) / SimNPO (paper: 2.5 on TOFU).
        gamma: SimNPO's reward margin.
        rmu_layer: decoder layer whose output RMU steers (negative counts from the end); 7 as
            open-unlearning and WMDP (for 32-layer models: a tiny model needs ``-1`` or so).
        rmu_coeff: RMU's steering coefficient ``c`` (open-unlearning's 2; WMDP's Zephyr run 6.5;
            a few times the layer's typical activation norm).
        rmu_seed: seed of RMU's random direction ``u``.
        rmu_tokens: positions RMU's squared error averages over, one of :data:`RMU_TOKENS`:
            ``"answer"`` (open-unlearning, default), ``"all"`` (WMDP) or ``"attention"``
            (this library's earlier convention); see :func:`rmu_activation_loss`.
        term_kwargs: hyper-parameters of a registered forget term (IdkDPO's ``beta``, SatImp's
            ``beta1``/``beta2``, ...), over the term's own defaults.

    Call it as ``objective(model, forget_batch, retain_batch, reference)``; it returns a dict with
    ``loss``, ``forget`` and ``retain``. ``reference`` is a frozen copy of the model before
    unlearning, needed when :attr:`needs_reference`.
    """

    forget: str = "ga"
    retain: str = "nll"
    alpha: float = 1.0
    forget_weight: float = 1.0
    beta: float = 0.1
    gamma: float = 0.0
    rmu_layer: int = 7
    rmu_coeff: float = 2.0
    rmu_seed: int = 0
    rmu_tokens: str = "answer"
    term_kwargs: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.forget not in FORGET_TERMS:
            raise ValueError(f"forget={self.forget!r} is not a forget term; choose one of {FORGET_TERMS}.")
        if self.retain not in RETAIN_TERMS:
            raise ValueError(f"retain={self.retain!r} is not a retain term; choose one of {RETAIN_TERMS}.")
        for name in ("alpha", "forget_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} is invalid: use a finite weight >= 0.")
        if self.forget in ("npo", "simnpo") and not self.beta > 0:
            raise ValueError(f"beta={self.beta!r} is invalid: {self.forget} needs a temperature > 0.")
        if self.rmu_tokens not in RMU_TOKENS:
            raise ValueError(f"rmu_tokens={self.rmu_tokens!r} is invalid: choose one of {RMU_TOKENS}.")
        if self.forget == "rmu" and not self.rmu_coeff > 0:
            raise ValueError(
                f"rmu_coeff={self.rmu_coeff!r} is invalid: the steering coefficient must be > 0."
            )
        self._control: Tensor | None = None

    @classmethod
    def from_method(cls, method: str, retain: str | None = None, **kwargs: Any) -> UnlearningObjective:
        """The objective of a named method of :data:`METHODS`, optionally with another retain term."""
        if method not in METHODS:
            raise ValueError(f"objective={method!r} is not a known method; choose one of {sorted(METHODS)}.")
        forget, default_retain = METHODS[method]
        return cls(forget=forget, retain=retain if retain is not None else default_retain, **kwargs)

    @property
    def needs_reference(self) -> bool:
        """Whether a frozen reference model must be passed (NPO, KL, RMU)."""
        return self.forget in ("npo", "rmu") or self.forget in _REFERENCE_TERMS or self.retain in ("kl", "rmu")

    def _require(self, reference: nn.Module | None, term: str) -> nn.Module:
        if reference is None:
            raise ValueError(
                f"the {term!r} term needs a frozen reference model; pass reference=<model before unlearning>."
            )
        return reference

    def control(self, hidden: Tensor) -> Tensor:
        """RMU's fixed target ``c·u`` (made once, on the hidden states' device and dtype)."""
        if self._control is None or self._control.shape[-1] != hidden.shape[-1]:
            self._control = control_vector(hidden.shape[-1], self.rmu_coeff, self.rmu_seed)
        return self._control.to(device=hidden.device, dtype=hidden.dtype)

    # -------------------------------------------------------------- the two halves
    def forget_loss(
        self, model: nn.Module, batch: Mapping[str, Tensor], reference: nn.Module | None = None
    ) -> Tensor:
        """The forget term ``F`` on a forget batch (the bilevel upper loss)."""
        if self.forget in FORGET_TERM_FUNCTIONS:
            kwargs = {**_TERM_DEFAULTS.get(self.forget, {}), **(self.term_kwargs or {})}
            return FORGET_TERM_FUNCTIONS[self.forget](model, batch, reference, **kwargs)
        if self.forget == "rmu":
            hidden = run_to_layer(model, batch, self.rmu_layer)
            return rmu_activation_loss(hidden, self.control(hidden).expand_as(hidden), batch, self.rmu_tokens)
        if self.forget == "idk":
            if "idk_input_ids" not in batch:
                raise ValueError(
                    "forget='idk' needs idk_input_ids/idk_attention_mask/idk_labels in the forget batch "
                    "(use ForgetQADataset / UnlearningDataModule)."
                )
            return mean_nll(*sequence_logprobs(model, batch, prefix="idk_"))
        logp, n = sequence_logprobs(model, batch)
        if self.forget == "ga":
            return -mean_nll(logp, n)
        if self.forget == "simnpo":
            return simnpo_loss(logp, n, self.beta, self.gamma)
        ref = self._require(reference, "npo")
        with torch.no_grad():
            ref_logp, _ = sequence_logprobs(ref, batch)
        return npo_loss(logp, ref_logp, self.beta)

    def retain_loss(
        self, model: nn.Module, batch: Mapping[str, Tensor], reference: nn.Module | None = None
    ) -> Tensor:
        """The retain term ``R`` on a retain batch (the bilevel lower loss; NLL when the method has none)."""
        if self.retain == "kl":
            ref = self._require(reference, "kl")
            inputs = {k: batch[k] for k in _MODEL_KEYS}
            logits = model(**inputs).logits
            with torch.no_grad():
                ref_logits = ref(**inputs).logits
            return kl_to_reference(logits, ref_logits, batch["attention_mask"])
        if self.retain == "rmu":
            ref = self._require(reference, "rmu")
            hidden = run_to_layer(model, batch, self.rmu_layer)
            with torch.no_grad():
                ref_hidden = run_to_layer(ref, batch, self.rmu_layer)
            return rmu_activation_loss(hidden, ref_hidden, batch, self.rmu_tokens)
        return mean_nll(*sequence_logprobs(model, batch))

    def __call__(
        self,
        model: nn.Module,
        forget_batch: Mapping[str, Tensor],
        retain_batch: Mapping[str, Tensor] | None = None,
        reference: nn.Module | None = None,
    ) -> dict[str, Tensor]:
        """``{"loss": forget_weight·F + alpha·R, "forget": F, "retain": R}`` (R is 0 for ``retain="none"``)."""
        f = self.forget_loss(model, forget_batch, reference)
        if self.retain == "none" or self.alpha == 0:
            r = torch.zeros((), device=f.device)
        else:
            if retain_batch is None:
                raise ValueError(
                    f"retain={self.retain!r} needs a retain batch; pass retain_batch or use retain='none'."
                )
            r = self.retain_loss(model, retain_batch, reference)
        return {"loss": self.forget_weight * f + self.alpha * r, "forget": f.detach(), "retain": r.detach()}


# ---------------------------------------------------------------------------- first-order head over a forward-only body
def untie_lm_head(model: nn.Module) -> bool:
    """Give a causal LM its own output head, a copy of the input embedding it was tied to; in place.

    With a tied head (``tie_word_embeddings=True``, e.g. small Llamas) a first-order update of
    ``lm_head`` is a first-order update of the input embedding, so its backward runs through the
    whole network and keeps every layer's activations. Untied, the backward of a loss with only
    the head requiring grad stops at the head: it needs only the final hidden states. That is what
    makes "first-order head, zeroth-order body" (``zo_fo_hybrid`` with ``fo_params`` = the head) a
    memory-frugal unlearner. Returns True if the head was tied (and is now a separate copy).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embed is None:
        raise ValueError(
            f"{type(model).__name__} has no input/output embeddings to untie (not a causal LM?)."
        )
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        text = config.get_text_config() if hasattr(config, "get_text_config") else None
        if text is not None:
            text.tie_word_embeddings = False
    if head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    return True


def forward_only_fraction(model: nn.Module, first_order: str | None) -> float:
    """Share of ``model``'s parameter elements that no backward pass reaches.

    ``first_order``: regex over parameter names of the first-order part (``None``: none, a pure ZO
    run, 1.0; ``""``: everything, a first-order run, 0.0). A tied tensor counts once, as first-order
    if any of its names matches (a tied ``lm_head`` makes the input embedding first-order too).
    """
    import re

    pattern = re.compile(first_order) if first_order is not None else None
    sizes: dict[int, int] = {}
    first: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        sizes[id(p)] = p.numel()
        if pattern is not None and pattern.search(name):
            first.add(id(p))
    total, fo = sum(sizes.values()), sum(sizes[i] for i in first)
    if total == 0:
        raise ValueError(f"{type(model).__name__} has no parameters.")
    return 1.0 - fo / total


# ---------------------------------------------------------------------------- weights between stages
def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load weights saved by an earlier stage into ``model`` (in place) and return it.

    ``path``: a Lightning ``.ckpt`` (its ``state_dict``, read with ``weights_only=True``; a leading
    ``model.`` is stripped, as ``CausalLMModule`` stores its network under ``model``), a
    ``.safetensors`` file, or a directory holding ``model.safetensors``. A peft-wrapped ``model``
    receives base-model weights in its base model. Keys must match exactly, except tied weights that
    a safetensors export stored once.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists():
        raise ValueError(
            f"init_from={str(path)!r} does not exist: pass a .ckpt, a .safetensors file or its folder."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"init_from={str(path)!r} holds no state dict.")
    if state and all(k.startswith("model.") for k in state) and not _matches(model, state):
        state = {k[len("model.") :]: v for k, v in state.items()}
    target = model
    if not _matches(model, state) and hasattr(model, "get_base_model"):
        target = model.get_base_model()
    missing, unexpected = target.load_state_dict(state, strict=False)
    loaded = {t.data_ptr() for k, t in target.state_dict().items() if k in state}
    missing = [k for k in missing if target.state_dict()[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(
            f"init_from={str(path)!r} does not fit {type(target).__name__}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Build the same architecture (model=...) as the stage that saved it."
        )
    return model


def _matches(model: nn.Module, state: Mapping[str, Tensor]) -> bool:
    keys = set(model.state_dict())
    return bool(keys) and len(keys & set(state)) >= 0.5 * len(state)


def register_forget_term(
    name: str,
    fn: Callable[..., Tensor],
    *,
    method: tuple[str, str] | None = None,
    needs_reference: bool = False,
    defaults: Mapping[str, float] | None = None,
) -> None:
    """Add a forget term ``fn(model, batch, reference, **hyper-parameters) -> loss`` (and a method).

    ``method=(forget, retain)`` also names a method of :data:`METHODS` after the term, so
    ``UnlearningModule(objective=name)`` and recipes can select it. Used by
    :mod:`lightning_zobi.unlearn.objectives_extra` (IdkDPO, UNDIAL, WGA, SatImp, CE-U).
    """
    global FORGET_TERMS
    if name not in FORGET_TERMS:
        FORGET_TERMS = (*FORGET_TERMS, name)
    FORGET_TERM_FUNCTIONS[name] = fn
    if needs_reference:
        _REFERENCE_TERMS.add(name)
    _TERM_DEFAULTS[name] = dict(defaults or {})
    if method is not None:
        METHODS[name] = method
