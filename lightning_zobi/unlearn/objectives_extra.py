"""More forget terms that open-unlearning users compare against: IdkDPO, UNDIAL, WGA, SatImp, CE-U.

Same shape as :mod:`lightning_zobi.unlearn.llm`: each is a plain minimized scalar from forward
passes only (so it runs unchanged in a zeroth-order closure), written twice: a tensor function
(``*_loss``: logits / log-likelihoods in, scalar out; what the tests compare to the references) and
a forget term ``term(model, batch, reference, **hparams)`` on a forget batch of
:class:`~lightning_zobi.data.facts.ForgetQADataset` items (``input_ids``/``attention_mask``/
``labels``, plus ``idk_*`` for IdkDPO). :data:`EXTRA_FORGET_TERMS` and :data:`EXTRA_METHODS` are
what :class:`~lightning_zobi.unlearn.llm.UnlearningObjective` needs to register them.

* ``"idk_dpo"``: DPO with the "I don't know" answer preferred over the true one,
  ``-(2/β) mean log σ(β [(log π(y_idk) - log π_ref(y_idk)) - (log π(y) - log π_ref(y))])``, sequence
  log-likelihoods (TOFU's IdkPO; "Direct Preference Optimization", Rafailov et al., arXiv 2305.18290;
  open-unlearning ``compute_dpo_loss``, β = 0.1).
* ``"undial"``: self-distillation towards the frozen reference's next-token distribution with the
  true token's logit lowered by β, ``CE(π_θ, softmax(z_ref - β·onehot(y)))`` ("UNDIAL: Self-Distillation
  with Adjusted Logits for Robust Unlearning in Large Language Models", Dong et al., arXiv 2402.10052;
  β = 10). Averaged over the labelled tokens; open-unlearning's ``compute_undial_loss`` averages over
  *every* position (prompt and padding too, where the ``-100`` label indexes vocabulary id ``V - 100``).
  The two agree when every position is labelled; ``all_positions=True`` gives the reference's mean.
* ``"wga"``: weighted gradient ascent, ``-mean_t p_t^β · CE_t`` with ``p_t = exp(-CE_t)`` detached
  ("Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go Beyond", Wang et al.,
  arXiv 2502.19301; β = 1).
* ``"satimp"``: ``-mean_t p_t^β1 (1 - p_t)^β2 · CE_t``, weights detached ("Exploring Criteria of
  Loss Reweighting to Enhance LLM Unlearning", Yang et al., arXiv 2505.11953; β1 = 5, β2 = 1).
* ``"ceu"``: cross-entropy unlearning: cross-entropy between the model's next-token distribution
  and its own (detached) distribution with the true token removed, skipping each answer's first
  ``ignore_first_n`` tokens ("Erasing Without Remembering: Safeguarding Knowledge Forgetting in
  LLMs" / CE-U, Yang et al., arXiv 2503.01224; open-unlearning ``ceu.py``, n = 1).

Memory: as the terms of :mod:`lightning_zobi.unlearn.llm`: IdkDPO and UNDIAL need the frozen
reference model (one more forward); UNDIAL/CE-U build one ``(N, V)`` target distribution over the
scored tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_zobi.unlearn.llm import register_forget_term, sequence_logprobs


# ---------------------------------------------------------------------------- tensor losses
def idk_dpo_loss(
    logp_idk: Tensor, ref_logp_idk: Tensor, logp_forget: Tensor, ref_logp_forget: Tensor, beta: float = 0.1
) -> Tensor:
    """IdkDPO: ``-(2/β) mean log σ(β (win_ratio - lose_ratio))``; win = IDK answer, lose = true answer.

    All inputs are per-sequence log-likelihood sums ``(B,)``; the reference's are detached.
    """
    if not beta > 0:
        raise ValueError(
            f"beta={beta!r} is invalid: DPO's temperature must be > 0 (open-unlearning uses 0.1)."
        )
    win = logp_idk - ref_logp_idk.detach()
    lose = logp_forget - ref_logp_forget.detach()
    return -(2.0 / beta) * F.logsigmoid(beta * (win - lose)).mean()


def undial_loss(
    logits: Tensor, ref_logits: Tensor, labels: Tensor, beta: float = 10.0, all_positions: bool = False
) -> Tensor:
    """UNDIAL: cross-entropy to ``softmax(ref_logits - β·onehot(label))`` at each next-token position.

    ``logits``/``ref_logits``: ``(B, T, V)``; ``labels``: ``(B, T)``. Averaged over labelled tokens
    (``all_positions=True``: over all ``B·(T-1)`` positions, open-unlearning's reduction).
    """
    if not beta >= 0:
        raise ValueError(
            f"beta={beta!r} is invalid: UNDIAL's logit penalty must be >= 0 (the paper uses 10)."
        )
    logits, ref = logits[:, :-1].float(), ref_logits[:, :-1].float().detach()
    target = labels[:, 1:]
    valid = target != -100
    index = target.remainder(logits.shape[-1])  # -100 -> V - 100, as Python indexing in the reference
    adjusted = ref.scatter_add(-1, index.unsqueeze(-1), torch.full_like(ref[..., :1], -beta))
    soft = torch.softmax(adjusted, dim=-1)
    per_token = -(soft * torch.log_softmax(logits, dim=-1)).sum(-1)
    if all_positions:
        return per_token.mean()
    return per_token[valid].mean() if valid.any() else per_token.sum() * 0


def _token_ce(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-position next-token CE ``(B, T-1)`` (0 on unlabelled positions) and the labelled mask."""
    target = labels[:, 1:]
    valid = target != -100
    ce = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target.masked_fill(~valid, 0), reduction="none"
    )
    return ce * valid, valid


def wga_loss(logits: Tensor, labels: Tensor, beta: float = 1.0) -> Tensor:
    """WGA: ``-mean over labelled tokens of exp(-CE)^β · CE`` (weights detached)."""
    ce, valid = _token_ce(logits, labels)
    weight = torch.exp(-ce).detach() ** beta
    return -(weight * ce)[valid].mean()


def satimp_loss(logits: Tensor, labels: Tensor, beta1: float = 5.0, beta2: float = 1.0) -> Tensor:
    """SatImp: ``-mean over labelled tokens of p^β1 (1 - p)^β2 · CE`` with ``p = exp(-CE)`` detached."""
    ce, valid = _token_ce(logits, labels)
    p = torch.exp(-ce).detach()
    return -((p**beta1) * (1 - p) ** beta2 * ce)[valid].mean()


def ceu_loss(logits: Tensor, labels: Tensor, ignore_first_n: int = 1) -> Tensor:
    """CE-U: CE between ``π_θ`` and ``softmax(stopgrad(z) with z_y = -inf)`` over the scored tokens.

    The first ``ignore_first_n`` labelled tokens of each row are not scored (arXiv 2503.01224's
    footnote; open-unlearning ``ignore_first_n_answer_tokens``).
    """
    if ignore_first_n < 0:
        raise ValueError(f"ignore_first_n={ignore_first_n!r} is invalid: use a count >= 0.")
    labelled = labels != -100
    skip = labelled & (labelled.cumsum(-1) <= ignore_first_n)
    target = labels.masked_fill(skip, -100)[:, 1:]
    valid = target != -100
    z = logits[:, :-1].float()[valid]
    y = target[valid]
    if y.numel() == 0:
        return logits.sum() * 0
    z_target = z.detach().scatter(-1, y.unsqueeze(-1), float("-inf"))
    return F.cross_entropy(z, torch.softmax(z_target, dim=-1))


# ---------------------------------------------------------------------------- forget terms
def _inputs(batch: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    return {"input_ids": batch[prefix + "input_ids"], "attention_mask": batch[prefix + "attention_mask"]}


def _reference(reference: nn.Module | None, term: str) -> nn.Module:
    if reference is None:
        raise ValueError(
            f"the {term!r} term needs a frozen reference model; pass reference=<model before unlearning>."
        )
    return reference


def idk_dpo_term(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    reference: nn.Module | None = None,
    beta: float = 0.1,
    **_: Any,
) -> Tensor:
    """IdkDPO on a forget batch with ``idk_*`` keys (``ForgetQADataset`` / ``TOFUDataModule`` make them)."""
    if "idk_input_ids" not in batch:
        raise ValueError(
            "forget='idk_dpo' needs idk_input_ids/idk_attention_mask/idk_labels in the forget batch."
        )
    ref = _reference(reference, "idk_dpo")
    logp_idk, _ = sequence_logprobs(model, batch, prefix="idk_")
    logp, _ = sequence_logprobs(model, batch)
    with torch.no_grad():
        ref_idk, _ = sequence_logprobs(ref, batch, prefix="idk_")
        ref_logp, _ = sequence_logprobs(ref, batch)
    return idk_dpo_loss(logp_idk, ref_idk, logp, ref_logp, beta)


def undial_term(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    reference: nn.Module | None = None,
    beta: float = 10.0,
    **_: Any,
) -> Tensor:
    ref = _reference(reference, "undial")
    logits = model(**_inputs(batch)).logits
    with torch.no_grad():
        ref_logits = ref(**_inputs(batch)).logits
    return undial_loss(logits, ref_logits, batch["labels"], beta)


def wga_term(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    reference: nn.Module | None = None,
    beta: float = 1.0,
    **_: Any,
) -> Tensor:
    return wga_loss(model(**_inputs(batch)).logits, batch["labels"], beta)


def satimp_term(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    reference: nn.Module | None = None,
    beta1: float = 5.0,
    beta2: float = 1.0,
    **_: Any,
) -> Tensor:
    return satimp_loss(model(**_inputs(batch)).logits, batch["labels"], beta1, beta2)


def ceu_term(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    reference: nn.Module | None = None,
    ignore_first_n: int = 1,
    **_: Any,
) -> Tensor:
    return ceu_loss(model(**_inputs(batch)).logits, batch["labels"], ignore_first_n)


EXTRA_FORGET_TERMS: dict[str, Callable[..., Tensor]] = {
    "idk_dpo": idk_dpo_term,
    "undial": undial_term,
    "wga": wga_term,
    "satimp": satimp_term,
    "ceu": ceu_term,
}
"""Forget term name -> ``term(model, forget_batch, reference, **hparams)``."""

EXTRA_NEEDS_REFERENCE = frozenset({"idk_dpo", "undial"})
"""The terms that need the frozen pre-unlearning model."""

EXTRA_METHODS: dict[str, tuple[str, str]] = {
    "idk_dpo": ("idk_dpo", "nll"),
    "undial": ("undial", "none"),
    "wga": ("wga", "nll"),
    "satimp": ("satimp", "nll"),
    "ceu": ("ceu", "none"),
}
"""Method -> (forget term, retain term) as open-unlearning pairs them: ``configs/trainer/*.yaml``
(DPO, WGA, SatImp: GradDiff with NLL retain; UNDIAL: alpha 0, i.e. no retain; CE-U: forget only)."""

EXTRA_DEFAULTS: dict[str, dict[str, float]] = {
    "idk_dpo": {"beta": 0.1},
    "undial": {"beta": 10.0},
    "wga": {"beta": 1.0},
    "satimp": {"beta1": 5.0, "beta2": 1.0},
    "ceu": {"ignore_first_n": 1},
}
"""open-unlearning's default hyper-parameters per term (``configs/trainer/<METHOD>.yaml``)."""


for _name, _term in EXTRA_FORGET_TERMS.items():
    register_forget_term(
        _name,
        _term,
        method=EXTRA_METHODS[_name],
        needs_reference=_name in EXTRA_NEEDS_REFERENCE,
        defaults=EXTRA_DEFAULTS.get(_name),
    )
