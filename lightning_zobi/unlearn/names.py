"""Our unlearning metric keys and open-unlearning's names for the same numbers.

:class:`~lightning_zobi.unlearn.metrics.UnlearningEvaluator` logs keys such as ``forget/prob`` or
``mia_auc``; open-unlearning (``configs/eval/tofu_metrics/``) reports the same quantities as
``forget_Q_A_Prob`` or ``mia_loss``. :data:`OPEN_UNLEARNING_NAMES` is the mapping, one entry per
quantity that is the same formula on the same inputs (checked against transcriptions of its code:
``tests/test_unlearn_mia.py``, ``tests/test_unlearn_metrics.py``; differences in inputs such as
the prompt format or the generation budget are in the README table). Keys of ours with no
open-unlearning counterpart are listed in :data:`OURS_ONLY` with what they are, so that no key
reads as a reference metric it is not. :func:`open_unlearning_view` renames a metrics dict; the
``zobi`` run summary prints it after a TOFU run.

Memory: none (two dicts).
"""

from __future__ import annotations

from collections.abc import Mapping

OPEN_UNLEARNING_NAMES: dict[str, str] = {
    "forget/prob": "forget_Q_A_Prob",
    "forget/rougeL": "forget_Q_A_ROUGE",
    "forget/truth_score": "forget_Truth_Ratio",
    "forget_quality": "forget_quality",
    "retain/prob": "retain_Q_A_Prob",
    "retain/rougeL": "retain_Q_A_ROUGE",
    "retain/truth_score": "retain_Truth_Ratio",
    "real_authors/prob": "ra_Q_A_Prob",
    "real_authors/prob_normalised": "ra_Q_A_Prob_normalised",
    "real_authors/rougeL": "ra_Q_A_ROUGE",
    "real_authors/truth_score": "ra_Truth_Ratio",
    "world_facts/prob": "wf_Q_A_Prob",
    "world_facts/prob_normalised": "wf_Q_A_Prob_normalised",
    "world_facts/rougeL": "wf_Q_A_ROUGE",
    "world_facts/truth_score": "wf_Truth_Ratio",
    "tofu_model_utility": "model_utility",
    "forget/exact_memorization": "exact_memorization",
    "forget/extraction_strength": "extraction_strength",
    "retain/extraction_strength": "retain_extraction_strength",
    "mia_auc": "mia_loss",
    "mia_min_k": "mia_min_k",
    "mia_min_k_plus_plus": "mia_min_k_plus_plus",
    "mia_zlib": "mia_zlib",
    "mia_reference": "mia_reference",
    "mia_gradnorm": "mia_gradnorm",
    "privleak": "privleak",
}
"""Our evaluator key -> open-unlearning's TOFU metric name (the same formula)."""

OURS_ONLY: dict[str, str] = {
    "model_utility": "harmonic mean of retain prob, ROUGE-L recall and truth score: the retain third of "
    "TOFU's model utility (open-unlearning's model_utility is our tofu_model_utility)",
    "<split>/em": "exact match of the greedy generation with the answer string (not exact_memorization, "
    "which is teacher-forced token accuracy: <split>/exact_memorization)",
    "<split>/truth_ratio": "mean truth ratio R (open-unlearning's *_Truth_Ratio are <split>/truth_score)",
}
"""Our keys with no open-unlearning counterpart, and what each is."""

_RUN_PREFIXES = ("val/", "test/")


def open_unlearning_name(key: str) -> str | None:
    """open-unlearning's name for one of our keys (``val/``/``test/`` prefix allowed), or None."""
    for prefix in _RUN_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    return OPEN_UNLEARNING_NAMES.get(key)


def open_unlearning_view(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics that have an open-unlearning name, under that name, in open-unlearning's order.

    Keys may carry a ``val/`` or ``test/`` prefix; if both a ``val/`` and a ``test/`` key map to
    one name, the later key in ``metrics`` wins.
    """
    found: dict[str, float] = {}
    for key, value in metrics.items():
        name = open_unlearning_name(key)
        if name is not None:
            found[name] = value
    order = list(OPEN_UNLEARNING_NAMES.values())
    return {name: found[name] for name in sorted(found, key=order.index)}
