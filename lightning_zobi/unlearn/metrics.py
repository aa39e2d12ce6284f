"""Unlearning metrics for causal LMs as ``torchmetrics`` Metrics, and the loop that feeds them.

The metrics follow "TOFU: A Task of Fictitious Unlearning for LLMs" (Maini et al., 2024,
arXiv 2401.06121), computed per split (forget / retain / hold-out):

* :class:`AnswerProbability`: ``P(answer | question)^(1/|answer|)``, the per-token (geometric-mean)
  probability of the true answer under teacher forcing.
* :class:`ExactMatch` and :class:`RougeLRecall` of greedy generations against the answer (the
  latter is torchmetrics' ``ROUGEScore`` restricted to ROUGE-L recall, TOFU's choice; with NLTK's Porter
  stemmer as TOFU, which is rule-based and needs no downloaded NLTK data).
* :class:`TruthRatio`: ``R = P(perturbed)/P(true)`` with per-token probabilities and the geometric
  mean over the perturbed (wrong) answers. ``R < 1``: the model prefers the truth.
* :class:`ForgetQuality`: the p-value of a two-sample Kolmogorov-Smirnov test between the forget
  set's truth ratios and those of a model trained on retain data only (``scipy.stats.ks_2samp``).
  High (→ 1): the unlearned model is indistinguishable from never having seen the forget set;
  both under- and over-unlearning lower it.
* :class:`ModelUtility`: harmonic mean of answer probability, ROUGE-L recall and truth-ratio score
  ``max(0, 1 - R)`` on retain data: the *retain* third of TOFU's model utility, logged as
  ``model_utility`` (a name kept for the code that reads it; the README's name table says what it
  is). TOFU's own model utility is the harmonic mean of nine values: those three on retain, and on
  the real-authors and world-facts sets the normalized probability
  (:func:`~lightning_zobi.unlearn.memorization.normalized_probability`), ROUGE-L recall and
  ``max(0, 1 - R)`` (open-unlearning ``configs/eval/tofu_metrics/model_utility.yaml``,
  ``hm_aggregate``). The evaluator logs it as ``tofu_model_utility`` whenever it saw those two
  sets (:class:`~lightning_zobi.lightning.datamodules.tofu.TOFUDataModule` loads them).
* :class:`LossMIA`: loss-based membership inference ("Privacy Risk in Machine Learning: Analyzing the
  Connection to Overfitting", Yeom et al., CSF 2018, arXiv 1709.01604) as torchmetrics'
  ``BinaryAUROC`` of the score ``-loss`` for forget (members, label 1) vs hold-out (label 0)
  questions: 1.0 right after learning, ≈ 0.5 when the forget set looks unseen, < 0.5 when it is
  *more* surprising than unseen text (over-unlearning). The other attacks of
  :mod:`lightning_zobi.unlearn.mia` accumulate the same way (:class:`~lightning_zobi.unlearn.mia.MembershipAUC`):
  min-k %, min-k %++ and zlib on every evaluation batch (one forward serves them all); the
  reference-model attack when :func:`score_batch` gets ``reference=``; grad-norm (a backward per
  sample) only when asked, ``gradnorm=True``. ``privleak`` is MUSE's score of the min-k % AUC.
* Token-level **exact memorization** and **extraction strength**
  (:mod:`lightning_zobi.unlearn.memorization`), teacher-forced on the answer tokens, per split.
  They are not :class:`ExactMatch`, which compares a greedy generation with the answer string
  (the ``<split>/em`` keys).

:class:`UnlearningEvaluator` holds them all per split; :func:`score_batch` computes one batch's
per-sample statistics from a model (forwards plus a greedy ``generate``); :func:`evaluate_model`
runs the whole evaluation in plain PyTorch. :mod:`lightning_zobi.unlearn.names` maps the keys to
open-unlearning's metric names.

Generation budget: ``max_new_tokens`` (:func:`score_batch`, :func:`evaluate_model`,
``UnlearningModule(max_new_tokens=...)``) defaults to 32 new tokens, where TOFU / open-unlearning
generate up to 200 (``configs/generation/default.yaml``). 32 covers the package's short fictitious
answers and keeps CPU evaluation cheap; a generation cut short can only lower ROUGE-L recall and
exact match, so pass 200 to compare with published TOFU numbers (TOFU answers run to ~60 words).

Memory: per-sample scalars (a few floats per QA pair); the model forward of one batch (with its
``k`` perturbed answers: ``k + 2`` forwards), one log-softmax over its logits for the MIAs, and one
greedy generation; ``gradnorm=True`` adds one backward per sample (gradients of every parameter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from scipy.stats import ks_2samp
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric
from torchmetrics.functional.text import rouge_score
from torchmetrics.text import ROUGEScore
from torchmetrics.utilities.data import dim_zero_cat

from lightning_zobi.data.facts import FactsEvalDataset, FactsSplits
from lightning_zobi.unlearn.llm import answer_logprobs
from lightning_zobi.unlearn.memorization import (
    exact_memorization,
    extraction_strength,
    normalized_probability,
)
from lightning_zobi.unlearn.mia import (
    MembershipAUC,
    average_loss,
    gradnorm_scores,
    logit_mia_scores,
    privleak,
    scored_texts,
)

SPLITS = ("forget", "retain", "holdout")
WORLD_SPLITS = ("real_authors", "world_facts")
"""TOFU's world-knowledge sets: with retain, the three sets of its 9-way model utility."""
EVAL_SPLITS = SPLITS + WORLD_SPLITS
LOGIT_ATTACKS = ("min_k", "min_k_plus_plus", "zlib")
"""MIAs scored on every evaluation batch (they need only the logits of the answer forward)."""
OPTIONAL_ATTACKS = ("reference", "gradnorm")
"""MIAs scored when :func:`score_batch` is asked (a reference model; a backward per sample)."""


# ---------------------------------------------------------------------------- metrics
class AnswerProbability(MeanMetric):
    """Mean over QA pairs of ``P(answer | question)^(1/|answer|)`` (teacher-forced, answer tokens only).

    ``update(logits, labels)`` with ``labels = -100`` outside the answer, as the training batches.
    """

    def update(self, logits: Tensor, labels: Tensor) -> None:  # type: ignore[override]
        logp, n = answer_logprobs(logits, labels)
        super().update(per_token_probability(logp, n))


class ExactMatch(MeanMetric):
    """Share of generations equal to their answer after stripping white space (optionally case-folded)."""

    def __init__(self, ignore_case: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_case = ignore_case

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:  # type: ignore[override]
        if len(preds) != len(targets):
            raise ValueError(f"preds ({len(preds)}) and targets ({len(targets)}) must have the same length.")
        matches = [
            normalize(p, self.ignore_case) == normalize(t, self.ignore_case)
            for p, t in zip(preds, targets, strict=True)
        ]
        super().update(torch.tensor(matches, dtype=torch.float32))


class RougeLRecall(ROUGEScore):
    """torchmetrics' ROUGE-L, reporting recall only (the share of the answer's tokens the generation recovers).

    With the Porter stemmer by default, as TOFU and open-unlearning score it ("She writes books about
    dragons" against "She wrote a book about dragons." gives 0.667 stemmed, 0.5 unstemmed).
    """

    def __init__(self, use_stemmer: bool = True, **kwargs: Any) -> None:
        super().__init__(rouge_keys=("rougeL",), use_stemmer=use_stemmer, accumulate="best", **kwargs)

    def compute(self) -> Tensor:  # type: ignore[override]
        return super().compute()["rougeL_recall"]


class TruthRatio(Metric):
    """TOFU's truth ratio ``R = (∏_i P(â_i|q)^(1/|â_i|))^(1/k) / P(a|q)^(1/|a|)`` per QA pair.

    ``update(true_logp, true_n, pert_logp, pert_n)``: per-sample log-likelihood sums and token counts
    of the true answer ``(B,)`` and of the ``k`` perturbed answers ``(B, k)``.

    Args:
        reduction: ``"none"`` (all ratios, for KS tests), ``"mean"``, ``"forget"`` (TOFU's forget
            score ``mean min(R, 1/R)``: 1 when the truth is no longer preferred) or ``"retain"``
            (``mean max(0, 1 - R)``: high when the truth is preferred).
    """

    full_state_update = False
    REDUCTIONS = ("none", "mean", "forget", "retain")

    def __init__(self, reduction: str = "none", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if reduction not in self.REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} is invalid: choose one of {self.REDUCTIONS}.")
        self.reduction = reduction
        self.add_state("ratios", default=[], dist_reduce_fx="cat")

    def update(self, true_logp: Tensor, true_n: Tensor, pert_logp: Tensor, pert_n: Tensor) -> None:  # type: ignore[override]
        self.ratios.append(truth_ratio(true_logp, true_n, pert_logp, pert_n).float())

    def values(self) -> Tensor:
        """All ratios seen so far, ``(N,)``."""
        return dim_zero_cat(self.ratios) if self.ratios else torch.zeros(0)

    def compute(self) -> Tensor:
        r = self.values()
        if self.reduction == "none":
            return r
        if self.reduction == "mean":
            return r.mean()
        if self.reduction == "forget":
            return torch.minimum(r, 1 / r).mean()
        return (1 - r).clamp_min(0).mean()


class ForgetQuality(TruthRatio):
    """KS-test p-value between this model's forget-set truth ratios and a retain-only model's.

    ``ForgetQuality(reference)`` with ``reference`` the truth ratios of a model trained on retain
    data only, on the same forget questions; ``update`` as :class:`TruthRatio`.
    """

    def __init__(self, reference: Tensor | Sequence[float], **kwargs: Any) -> None:
        super().__init__(reduction="none", **kwargs)
        reference = torch.as_tensor(reference, dtype=torch.float32).flatten()
        if reference.numel() < 2:
            raise ValueError(f"reference has {reference.numel()} truth ratios; a KS test needs at least 2.")
        self.register_buffer("reference", reference, persistent=False)

    def compute(self) -> Tensor:
        ours = self.values()
        if ours.numel() < 2:
            raise ValueError("ForgetQuality needs at least 2 updated truth ratios before compute().")
        return torch.tensor(ks_pvalue(ours, self.reference))


class ModelUtility(Metric):
    """Harmonic mean of retain-set answer probability, ROUGE-L recall and truth score ``max(0, 1 - R)``.

    ``update(prob, rouge, ratio)`` with per-sample values ``(B,)``. The harmonic mean is 0 as soon
    as one component is 0: a model is only useful if it is good on all three.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("prob", "rouge", "truth", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, prob: Tensor, rouge: Tensor, ratio: Tensor) -> None:  # type: ignore[override]
        if not prob.shape == rouge.shape == ratio.shape:
            raise ValueError(
                f"prob {tuple(prob.shape)}, rouge {tuple(rouge.shape)}, ratio {tuple(ratio.shape)} differ."
            )
        self.prob += prob.double().sum()
        self.rouge += rouge.double().sum()
        self.truth += (1 - ratio.double()).clamp_min(0).sum()
        self.count += prob.numel()

    def compute(self) -> Tensor:
        parts = torch.stack([self.prob, self.rouge, self.truth]) / self.count.clamp_min(1)
        if (parts <= 0).any():
            return torch.tensor(0.0, dtype=torch.float64)
        return len(parts) / (1 / parts).sum()


class LossMIA(MembershipAUC):
    """Loss-based membership-inference AUC: ``BinaryAUROC`` of ``-loss`` with members labelled 1.

    ``update(losses, members)``: per-sample losses ``(B,)`` and a bool/int tensor ``(B,)`` or a
    Python bool for the whole batch (:class:`~lightning_zobi.unlearn.mia.MembershipAUC` with the
    loss as the score).
    """


# ---------------------------------------------------------------------------- helpers
def normalize(text: str, ignore_case: bool = False) -> str:
    """Collapse white space (and case-fold) for exact-match comparison."""
    text = " ".join(text.split())
    return text.lower() if ignore_case else text


def ks_pvalue(ratios: Tensor, reference: Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov p-value between two sets of truth ratios (``scipy.stats.ks_2samp``)."""
    return float(ks_2samp(ratios.cpu().double().numpy(), reference.cpu().double().numpy()).pvalue)


def per_token_probability(logp_sum: Tensor, n_tokens: Tensor) -> Tensor:
    """``exp(logp_sum / n_tokens)``: a sequence's probability normalized to one token."""
    return torch.exp(logp_sum / n_tokens.clamp_min(1))


def truth_ratio(true_logp: Tensor, true_n: Tensor, pert_logp: Tensor, pert_n: Tensor) -> Tensor:
    """Per-sample truth ratio ``R`` (see :class:`TruthRatio`), computed in log space."""
    if pert_logp.dim() != 2 or pert_logp.shape[0] != true_logp.shape[0]:
        raise ValueError(
            f"pert_logp {tuple(pert_logp.shape)} must be (B, k) for true_logp {tuple(true_logp.shape)}."
        )
    log_true = true_logp / true_n.clamp_min(1)
    log_pert = (pert_logp / pert_n.clamp_min(1)).mean(-1)
    return torch.exp(log_pert - log_true)


# ---------------------------------------------------------------------------- scoring a model
def truth_ratio_logprobs(model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Answer log-likelihood sums and token counts for the truth ratio of an evaluation batch.

    Returns ``(true_logp, true_n)`` of the paraphrased true answers, shaped ``(B,)``, and
    ``(pert_logp, pert_n)`` of the ``k`` perturbed (wrong) answers, shaped ``(B, k)``.
    """
    true_logits = model(input_ids=batch["true_input_ids"], attention_mask=batch["true_attention_mask"]).logits
    true_logp, true_n = answer_logprobs(true_logits, batch["true_labels"])
    b, k, t = batch["pert_input_ids"].shape
    pert_logits = model(
        input_ids=batch["pert_input_ids"].reshape(b * k, t),
        attention_mask=batch["pert_attention_mask"].reshape(b * k, t),
    ).logits
    pert_logp, pert_n = answer_logprobs(pert_logits, batch["pert_labels"].reshape(b * k, t))
    return true_logp, true_n, pert_logp.reshape(b, k), pert_n.reshape(b, k)


@torch.no_grad()
def score_batch(
    model: nn.Module,
    batch: Mapping[str, Any],
    tokenizer: Any,
    max_new_tokens: int = 32,
    use_stemmer: bool = True,
    mia_k: float = 0.4,
    reference: nn.Module | None = None,
    gradnorm: bool = False,
) -> dict[str, Any]:
    """Per-sample statistics of ``model`` on a :class:`~lightning_zobi.data.facts.FactsEvalDataset` batch.

    Returns ``nll`` (per-token NLL of the answer, the loss MIA's score), ``logp``/``n`` (answer),
    ``true_logp``/``true_n`` and ``pert_logp``/``pert_n`` (truth-ratio question), ``generations``
    (greedy, decoded), ``rouge`` (per-sample ROUGE-L recall, Porter-stemmed as TOFU unless
    ``use_stemmer=False``), ``token_em`` and ``extraction_strength`` (teacher-forced, answer tokens)
    and the membership scores ``mia/min_k``, ``mia/min_k_plus_plus``, ``mia/zlib`` (``k = mia_k``,
    open-unlearning's 0.4), plus ``mia/reference`` with a ``reference`` model and ``mia/gradnorm``
    with ``gradnorm=True`` (one backward per sample; the model's ``.grad`` are overwritten and
    zeroed: not inside a training step). ``max_new_tokens``: the generation budget (the TOFU
    reference generates up to 200 tokens; 32 keeps CPU evaluation of the package's short
    fictitious answers cheap). The model is put in eval mode for the call.
    """
    if max_new_tokens < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens!r} is invalid: generate at least 1 token (TOFU: 200)."
        )
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        logp, n = answer_logprobs(logits, labels)
        true_logp, true_n, pert_logp, pert_n = truth_ratio_logprobs(model, batch)
        generations = generate_answers(
            model, batch["prompt_ids"], batch["prompt_mask"], tokenizer, max_new_tokens
        )
        attacks = logit_mia_scores(logits, labels, scored_texts(labels, tokenizer), mia_k)
        mia = {f"mia/{a}": attacks[a] for a in LOGIT_ATTACKS}
        if reference is not None:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            ref_logits = reference(**inputs).logits
            mia["mia/reference"] = attacks["loss"] - average_loss(ref_logits, labels)
        if gradnorm:
            mia["mia/gradnorm"] = gradnorm_scores(model, batch)
        memorization = {
            "token_em": exact_memorization(logits, labels),
            "extraction_strength": extraction_strength(logits, labels),
        }
    finally:
        model.train(was_training)
    answers = list(batch["answer"])
    rouge = torch.stack(
        [
            rouge_score(g, a, rouge_keys="rougeL", use_stemmer=use_stemmer)["rougeL_recall"]
            for g, a in zip(generations, answers, strict=True)
        ]
    )
    return {
        "logp": logp,
        "n": n,
        "nll": -logp / n.clamp_min(1),
        "true_logp": true_logp,
        "true_n": true_n,
        "pert_logp": pert_logp,
        "pert_n": pert_n,
        "generations": generations,
        "answers": answers,
        "rouge": rouge.to(logp.device),
        **memorization,
        **mia,
    }


def generate_answers(
    model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, tokenizer: Any, max_new_tokens: int = 32
) -> list[str]:
    """Greedy continuations of left-padded prompts, decoded up to the end-of-sequence token."""
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = []
    for row in out[:, prompt_ids.shape[1] :].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


class UnlearningEvaluator(nn.Module):
    """All unlearning metrics per split, fed by :func:`score_batch` outputs.

    ``update(split, scores)`` for ``split`` in :data:`EVAL_SPLITS` (``forget``, ``retain``,
    ``holdout``, and TOFU's ``real_authors`` / ``world_facts``); ``compute()`` returns a flat dict:

    * per split: ``<split>/prob``, ``<split>/em`` (generation exact match), ``<split>/rougeL``,
      ``<split>/truth_ratio`` (mean R), and from :func:`score_batch`'s teacher-forced statistics
      ``<split>/exact_memorization`` and ``<split>/extraction_strength``;
    * ``<split>/truth_score``: ``mean min(R, 1/R)`` on forget (TOFU's forget truth ratio), ``mean
      max(0, 1 - R)`` on retain / real authors / world facts (TOFU's truth ratio there);
      ``<split>/prob_normalised`` on real authors / world facts;
    * ``model_utility``: the 3-way retain harmonic mean (:class:`ModelUtility`); ``tofu_model_utility``:
      TOFU's 9-way one, once retain, real authors and world facts were all seen;
    * ``mia_auc`` (loss attack) and ``mia_<attack>`` for every attack of :data:`LOGIT_ATTACKS` /
      :data:`OPTIONAL_ATTACKS` scored on both forget and hold-out; ``privleak`` from ``mia_min_k``;
    * ``forget_quality`` when ``reference_ratios`` is set.

    :mod:`lightning_zobi.unlearn.names` maps these keys to open-unlearning's names.

    Args:
        reference_ratios: forget-set truth ratios of a retain-only model (enables ``forget_quality``).
        privleak_reference_auc: the retain-only model's min-k % AUC for ``privleak`` (open-unlearning's
            default without retain-model logs: 0.5).
    """

    def __init__(
        self,
        reference_ratios: Tensor | Sequence[float] | None = None,
        privleak_reference_auc: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0.0 <= privleak_reference_auc < 1.0:
            raise ValueError(
                f"privleak_reference_auc={privleak_reference_auc!r} is invalid: an AUC in [0, 1) (0.5 without a retain model)."
            )
        self.split_metrics = nn.ModuleDict({split: self._split_metrics(split) for split in EVAL_SPLITS})
        self.utility = ModelUtility()
        self.mia = LossMIA()
        self.mias = nn.ModuleDict({a: MembershipAUC() for a in LOGIT_ATTACKS + OPTIONAL_ATTACKS})
        self.privleak_reference_auc = privleak_reference_auc
        self.reference_ratios: Tensor | None = None
        if reference_ratios is not None:
            self.set_reference(reference_ratios)
        self._seen: dict[str, set[str]] = {}

    @staticmethod
    def _split_metrics(split: str) -> nn.ModuleDict:
        metrics = {
            "prob": MeanMetric(),
            "em": ExactMatch(),
            "rougeL": RougeLRecall(),
            "truth_ratio": TruthRatio(reduction="none"),
            "exact_memorization": MeanMetric(nan_strategy="ignore"),  # NaN: a row with no answer token
            "extraction_strength": MeanMetric(),
        }
        if split in WORLD_SPLITS:
            metrics["prob_normalised"] = MeanMetric()
        return nn.ModuleDict(metrics)

    def set_reference(self, reference_ratios: Tensor | Sequence[float]) -> None:
        """Enable ``forget_quality`` against these retain-only forget-set truth ratios (may come after updates)."""
        reference = torch.as_tensor(reference_ratios, dtype=torch.float32).flatten().cpu()
        if reference.numel() < 2:
            raise ValueError(f"reference_ratios has {reference.numel()} values; a KS test needs at least 2.")
        self.reference_ratios = reference

    def update(self, split: str, scores: Mapping[str, Any]) -> None:
        if split not in EVAL_SPLITS:
            raise ValueError(f"split={split!r} is invalid: choose one of {EVAL_SPLITS}.")
        seen = self._seen.setdefault(split, set())
        m = self.split_metrics[split]
        prob = per_token_probability(scores["logp"], scores["n"])
        ratio_args = (scores["true_logp"], scores["true_n"], scores["pert_logp"], scores["pert_n"])
        m["prob"].update(prob)
        m["em"].update(scores["generations"], scores["answers"])
        m["rougeL"].update(scores["generations"], scores["answers"])
        m["truth_ratio"].update(*ratio_args)
        for key, name in (("token_em", "exact_memorization"), ("extraction_strength", "extraction_strength")):
            if key in scores:
                m[name].update(scores[key])
                seen.add(name)
        if split in WORLD_SPLITS:
            m["prob_normalised"].update(normalized_probability(*ratio_args))
        if split == "retain":
            self.utility.update(prob, scores["rouge"], truth_ratio(*ratio_args))
        if split in ("forget", "holdout"):
            self.mia.update(scores["nll"], split == "forget")
            for attack, metric in self.mias.items():
                if f"mia/{attack}" in scores:
                    metric.update(scores[f"mia/{attack}"], split == "forget")
                    seen.add(f"mia/{attack}")

    def truth_ratios(self, split: str = "forget") -> Tensor:
        """Per-sample truth ratios seen on ``split`` (the reference for a later ``forget_quality``)."""
        return self.split_metrics[split]["truth_ratio"].values()

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for split in EVAL_SPLITS:
            if split not in self._seen:
                continue
            m, seen = self.split_metrics[split], self._seen[split]
            ratios = m["truth_ratio"].values()
            out[f"{split}/prob"] = float(m["prob"].compute())
            out[f"{split}/em"] = float(m["em"].compute())
            out[f"{split}/rougeL"] = float(m["rougeL"].compute())
            out[f"{split}/truth_ratio"] = float(ratios.mean())
            for name in ("exact_memorization", "extraction_strength"):
                if name in seen:
                    out[f"{split}/{name}"] = float(m[name].compute())
            if split == "forget":
                out["forget/truth_score"] = float(torch.minimum(ratios, 1 / ratios).mean())
            elif split != "holdout":
                out[f"{split}/truth_score"] = float((1 - ratios).clamp_min(0).mean())
            if split in WORLD_SPLITS:
                out[f"{split}/prob_normalised"] = float(m["prob_normalised"].compute())
        if "retain" in self._seen:
            out["model_utility"] = float(self.utility.compute())
        if {"retain", *WORLD_SPLITS} <= set(self._seen):
            out["tofu_model_utility"] = harmonic_mean([out[key] for key in tofu_utility_keys()])
        if {"forget", "holdout"} <= set(self._seen):
            out["mia_auc"] = float(self.mia.compute())
            for attack, metric in self.mias.items():
                if all(f"mia/{attack}" in self._seen[s] for s in ("forget", "holdout")):
                    out[f"mia_{attack}"] = float(metric.compute())
            if "mia_min_k" in out:
                out["privleak"] = privleak(out["mia_min_k"], self.privleak_reference_auc)
        if self.reference_ratios is not None and "forget" in self._seen:
            out["forget_quality"] = ks_pvalue(self.truth_ratios("forget"), self.reference_ratios)
        return out

    def reset(self) -> None:
        for metrics in self.split_metrics.values():
            for metric in metrics.values():
                metric.reset()
        self.utility.reset()
        self.mia.reset()
        for metric in self.mias.values():
            metric.reset()
        self._seen.clear()


def tofu_utility_keys() -> list[str]:
    """The nine evaluator keys of TOFU's model utility, in open-unlearning's order (``model_utility.yaml``)."""
    keys = ["retain/prob", "retain/rougeL", "retain/truth_score"]
    for split in WORLD_SPLITS:
        keys += [f"{split}/prob_normalised", f"{split}/rougeL", f"{split}/truth_score"]
    return keys


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative values, 0 if any is 0 (``scipy.stats.hmean``, open-unlearning's ``hm_aggregate``)."""
    if not values or any(v < 0 for v in values):
        raise ValueError(f"harmonic_mean needs non-negative values, got {list(values)}.")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def evaluation_loaders(
    splits: FactsSplits,
    tokenizer: Any,
    max_length: int = 64,
    batch_size: int = 64,
    truth_ratio_question: str = "original",
    retain_limit: int | None = None,
) -> dict[str, DataLoader]:
    """One ``DataLoader`` of :class:`FactsEvalDataset` per split (retain optionally cut to ``retain_limit`` pairs)."""
    pairs = {"forget": splits.forget, "retain": splits.retain[:retain_limit], "holdout": splits.holdout}
    return {
        split: DataLoader(
            FactsEvalDataset(p, tokenizer, split, max_length, truth_ratio_question), batch_size=batch_size
        )
        for split, p in pairs.items()
        if p
    }


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    splits: FactsSplits,
    reference_ratios: Tensor | Sequence[float] | None = None,
    max_length: int = 64,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    truth_ratio_question: str = "original",
    retain_limit: int | None = None,
    mia_reference: nn.Module | None = None,
    gradnorm: bool = False,
) -> tuple[dict[str, float], Tensor]:
    """Evaluate ``model`` on every split in plain PyTorch: ``(metrics, forget-set truth ratios)``.

    Pass the second value of a retain-only model's call as ``reference_ratios`` of later calls to
    get ``forget_quality``. ``mia_reference`` (a model trained without the forget set) adds
    ``mia_reference``; ``gradnorm=True`` adds ``mia_gradnorm`` (a backward per sample).
    """
    device = next(model.parameters()).device
    evaluator = UnlearningEvaluator(reference_ratios).to(device)  # its torchmetrics states live with the scores
    loaders = evaluation_loaders(
        splits, tokenizer, max_length, batch_size, truth_ratio_question, retain_limit
    )
    for split, loader in loaders.items():
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            scores = score_batch(
                model, batch, tokenizer, max_new_tokens, reference=mia_reference, gradnorm=gradnorm
            )
            evaluator.update(split, scores)
    return evaluator.compute(), evaluator.truth_ratios("forget")
