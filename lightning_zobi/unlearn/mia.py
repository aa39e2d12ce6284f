"""Membership-inference attacks (MIAs) on a causal LM and MUSE's privacy-leakage score.

Each attack gives every sample a score signed like a loss (higher: less likely a training member),
as open-unlearning does (``src/evals/metrics/mia/``), and :class:`MembershipAUC` turns scores of
members (the forget set) and non-members (the hold-out set) into an AUC: 1.0 when every forget
sample looks more "seen" than every hold-out one, ≈ 0.5 when the forget set looks unseen.
It equals open-unlearning's ``roc_auc_score(labels=[0]*forget + [1]*holdout, scores)``.

Attacks (per-sample scores; ``token_logp`` are the next-token log-probabilities of the labelled
tokens except the last one, which is the end-of-sequence token in QA data, as open-unlearning's
``tokenwise_logprobs``; ``avg_loss`` is the mean NLL over all labelled tokens, its
``evaluate_probability``):

* LOSS: ``avg_loss`` (Yeom et al., CSF 2018; :class:`~lightning_zobi.unlearn.metrics.LossMIA`).
* min-k %: ``-mean`` of the ``max(1, int(k·n))`` smallest token log-probabilities ("Detecting
  Pretraining Data from Large Language Models", Shi et al., arXiv 2310.16789); open-unlearning's
  TOFU/MUSE configs use ``k = 0.4``.
* min-k %++: the same over ``(log p(x_t) - μ_t) / σ_t`` with ``μ_t = E_{z~p_t} log p_t(z)`` and
  ``σ_t² = E log² p_t(z) - μ_t²`` (σ² floored at 1e-6) ("Min-K%++", Zhang et al., arXiv 2404.02936).
* zlib: ``avg_loss / len(zlib.compress(text))`` with the answer text in UTF-8 (Carlini et al.,
  "Extracting Training Data from Large Language Models", USENIX Security 2021).
* reference: ``avg_loss(model) - avg_loss(reference)`` (the loss difference; a reference model
  trained without the forget set calibrates per-sample difficulty).
* grad-norm: the mean over parameter tensors of ``‖∇_θ ℓ‖_p`` for the per-sample loss
  ``ℓ = -mean(token_logp)`` (arXiv 2402.17012, as open-unlearning's ``gradnorm.py`` cites; ``p = 2``).
  open-unlearning switches the model to train mode for it (dropout on, if the model has any); we
  leave the mode as it is, so the score is deterministic.

:func:`privleak`: MUSE's PrivLeak, ``((1 - AUC) - (1 - AUC_ref)) / (1 - AUC_ref) · 100`` with the
forget-vs-hold-out min-k % AUC of the unlearned model and of the retain-only model (0: leaks as
little as a model that never saw the forget set). open-unlearning's ``privleak`` with its
``ref_value`` 0.5 when no retain-model log is given.

Memory: per-sample scalars; min-k %++ keeps one ``(T, V)`` log-softmax per batch row while scoring;
grad-norm runs one backward per sample (the model's gradients are overwritten and zeroed).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import BinaryAUROC

MIA_ATTACKS = ("loss", "min_k", "min_k_plus_plus", "zlib", "reference", "gradnorm")


# ---------------------------------------------------------------------------- token statistics
def labelled_positions(labels: Tensor, drop_last: bool = True) -> list[Tensor]:
    """Per row, the label positions scored by the attacks (all labelled ones but the last, by default).

    ``labels``: ``(B, T)`` with ``-100`` on unscored positions; position ``t`` is predicted by the
    logits at ``t - 1``. A row whose first labelled position is 0 cannot be scored and raises.
    """
    rows = []
    for i, row in enumerate(labels):
        pos = (row != -100).nonzero(as_tuple=True)[0]
        if drop_last:
            pos = pos[:-1]
        if pos.numel() and int(pos[0]) == 0:
            raise ValueError(f"row {i}: position 0 is labelled, but no logit predicts the first token.")
        rows.append(pos)
    return rows


def token_logprobs(logits: Tensor, labels: Tensor, drop_last: bool = True) -> list[Tensor]:
    """Per row, ``log p(x_t | x_<t)`` of the scored labelled tokens (a list of ``(n_i,)`` tensors)."""
    return [t for t, _ in _scored_logprobs(logits, labels, drop_last)]


def vocab_logprobs(logits: Tensor, labels: Tensor, drop_last: bool = True) -> list[Tensor]:
    """Per row, the full next-token log-distribution at each scored position (``(n_i, V)`` tensors)."""
    return [v for _, v in _scored_logprobs(logits, labels, drop_last)]


def _scored_logprobs(logits: Tensor, labels: Tensor, drop_last: bool = True) -> list[tuple[Tensor, Tensor]]:
    """Per row, (token log-probabilities ``(n_i,)``, vocabulary log-distributions ``(n_i, V)``), one log-softmax."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, pos in enumerate(labelled_positions(labels, drop_last)):
        vocab = logp[i, pos - 1]
        out.append((vocab.gather(-1, labels[i, pos].unsqueeze(-1)).squeeze(-1), vocab))
    return out


def scored_texts(labels: Tensor, tokenizer: Any) -> list[str]:
    """The labelled tokens of each row decoded with special tokens skipped (open-unlearning's zlib text)."""
    return [tokenizer.decode(row[row != -100].tolist(), skip_special_tokens=True) for row in labels]


def average_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean NLL over *all* labelled tokens per row, ``(B,)`` (open-unlearning's ``avg_loss``)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    mask = target != -100
    nll = -logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    return nll.sum(-1) / mask.sum(-1).clamp_min(1)


# ---------------------------------------------------------------------------- per-sample scores
def _bottom_k_mean(values: Tensor, k: float) -> Tensor:
    if not 0 < k <= 1:
        raise ValueError(f"k={k!r} is invalid: the share of lowest-probability tokens must be in (0, 1].")
    if values.numel() == 0:
        return values.new_zeros(())
    num = max(1, int(values.numel() * k))
    return -values.sort().values[:num].mean()


def min_k_scores(token_lp: Sequence[Tensor], k: float = 0.4) -> Tensor:
    """min-k % score per sample: ``-mean`` of the ``max(1, int(k·n))`` lowest token log-probabilities."""
    return torch.stack([_bottom_k_mean(lp.float(), k) for lp in token_lp])


def min_k_plus_plus_scores(token_lp: Sequence[Tensor], vocab_lp: Sequence[Tensor], k: float = 0.4) -> Tensor:
    """min-k %++ score per sample: min-k % over ``(log p(x_t) - μ_t) / σ_t`` (see the module docstring)."""
    scores = []
    for lp, vlp in zip(token_lp, vocab_lp, strict=True):
        if lp.numel() == 0:
            scores.append(lp.new_zeros(()))
            continue
        p = vlp.float().exp()
        mu = (p * vlp).sum(-1)
        sigma2 = ((p * vlp.float().square()).sum(-1) - mu.square()).clamp_min(1e-6)
        scores.append(_bottom_k_mean((lp.float() - mu) / sigma2.sqrt(), k))
    return torch.stack(scores)


def zlib_scores(avg_loss: Tensor, texts: Sequence[str]) -> Tensor:
    """zlib score per sample: ``avg_loss / len(zlib.compress(text.encode("utf-8")))``."""
    if len(texts) != avg_loss.numel():
        raise ValueError(f"{len(texts)} texts for {avg_loss.numel()} losses.")
    sizes = torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=torch.float64)
    return avg_loss.double() / sizes.to(avg_loss.device)


def reference_scores(avg_loss: Tensor, ref_avg_loss: Tensor) -> Tensor:
    """Reference-model score per sample: ``avg_loss(model) - avg_loss(reference)``."""
    return avg_loss - ref_avg_loss


def gradnorm_scores(model: nn.Module, batch: Mapping[str, Tensor], p: float = 2.0) -> Tensor:
    """Grad-norm score per sample: the mean over parameter tensors of ``‖∇ℓ‖_p``, ``ℓ = -mean(token_logp)``.

    One forward and backward per row (rows are independent: padding does not leak between
    samples). Overwrites and then zeroes the model's ``.grad``; run it outside training.
    """
    if p not in (1, 2, float("inf")):
        raise ValueError(f"p={p!r} is invalid: use 1, 2 or inf.")
    params = [q for q in model.parameters() if q.requires_grad]
    if not params:
        raise ValueError("gradnorm_scores needs parameters with requires_grad=True.")
    scores = []
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model(
                input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]
            ).logits
            (lp,) = token_logprobs(logits, batch["labels"][i : i + 1])
            (-lp.mean()).backward()
        norms = [q.grad.detach().float().norm(p=p) for q in params if q.grad is not None]
        scores.append(torch.stack(norms).mean())
    model.zero_grad(set_to_none=True)
    return torch.stack(scores)


def logit_mia_scores(
    logits: Tensor, labels: Tensor, texts: Sequence[str], k: float = 0.4
) -> dict[str, Tensor]:
    """The attacks that need only the model's logits, from one forward: ``{attack: (B,) scores}``.

    ``loss``, ``min_k``, ``min_k_plus_plus`` and ``zlib`` (``texts``: the scored text of each row,
    :func:`scored_texts`). What :class:`~lightning_zobi.unlearn.metrics.UnlearningEvaluator`
    accumulates for every evaluation batch; one log-softmax over the logits.
    """
    scored = _scored_logprobs(logits, labels)
    token_lp = [t for t, _ in scored]
    avg = average_loss(logits, labels)
    return {
        "loss": avg,
        "min_k": min_k_scores(token_lp, k),
        "min_k_plus_plus": min_k_plus_plus_scores(token_lp, [v for _, v in scored], k),
        "zlib": zlib_scores(avg, texts).to(avg.dtype),
    }


@torch.no_grad()
def mia_scores(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    attack: str,
    k: float = 0.4,
    texts: Sequence[str] | None = None,
    reference: nn.Module | None = None,
) -> Tensor:
    """Scores of one attack (of :data:`MIA_ATTACKS` but grad-norm) on a batch with ``input_ids``/``attention_mask``/``labels``.

    ``texts``: the scored text of each row (zlib); ``reference``: the reference model (reference).
    """
    if attack not in MIA_ATTACKS:
        raise ValueError(f"attack={attack!r} is invalid: choose one of {MIA_ATTACKS}.")
    if attack == "gradnorm":
        raise ValueError("attack='gradnorm' needs gradients: call gradnorm_scores(model, batch).")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = model(**inputs).logits
    labels = batch["labels"]
    if attack == "loss":
        return average_loss(logits, labels)
    if attack == "min_k":
        return min_k_scores(token_logprobs(logits, labels), k)
    if attack == "min_k_plus_plus":
        scored = _scored_logprobs(logits, labels)
        return min_k_plus_plus_scores([t for t, _ in scored], [v for _, v in scored], k)
    if attack == "zlib":
        if texts is None:
            raise ValueError("attack='zlib' needs texts=<the scored text of each row>.")
        return zlib_scores(average_loss(logits, labels), texts)
    if reference is None:
        raise ValueError("attack='reference' needs reference=<a model trained without the forget set>.")
    return reference_scores(average_loss(logits, labels), average_loss(reference(**inputs).logits, labels))


# ---------------------------------------------------------------------------- aggregation
class MembershipAUC(BinaryAUROC):
    """AUC of an attack: members (forget, label 1) vs non-members (hold-out, label 0).

    ``update(scores, members)`` with loss-like scores ``(B,)`` (higher: less likely a member) and a
    bool for the whole batch or a ``(B,)`` tensor. The AUROC is of ``-scores``, which equals
    open-unlearning's ``roc_auc_score([0]*forget + [1]*holdout, scores)``.
    """

    def update(self, scores: Tensor, members: Tensor | bool) -> None:  # type: ignore[override]
        if isinstance(members, bool):
            members = torch.full(scores.shape, int(members), dtype=torch.long, device=scores.device)
        super().update(_as_probability(-scores), members.long())


def _as_probability(x: Tensor) -> Tensor:
    """A strictly increasing map of ``x`` into (0, 1), in float64 (an AUC depends only on the order).

    ``BinaryAUROC`` applies a sigmoid to a batch only when some value of that batch lies outside
    [0, 1]: signed scores (the reference attack's loss difference) would be squashed in one
    ``update`` and not in the next, and the AUC would compare unlike values. Mapping every batch
    the same way first avoids that; ``atan`` keeps scores up to ~1e15 apart in float64, where a
    sigmoid ties everything above ~37.
    """
    return 0.5 + torch.atan(x.double()) / math.pi


def privleak(auc: float, reference_auc: float = 0.5) -> float:
    """MUSE's PrivLeak in percent: ``((1 - auc) - (1 - ref)) / (1 - ref + 1e-10) · 100``.

    ``auc``: the unlearned model's forget-vs-hold-out :class:`MembershipAUC` (min-k % in MUSE);
    ``reference_auc``: the retain-only model's (open-unlearning's default 0.5). Negative: the
    forget set still looks more "seen" than to the reference (under-unlearning); positive:
    less (over-unlearning).
    """
    score, ref = 1.0 - float(auc), 1.0 - float(reference_auc)
    return (score - ref) / (ref + 1e-10) * 100.0
