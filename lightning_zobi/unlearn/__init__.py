"""Unlearning losses and metrics (pure PyTorch): LLM forget/retain objectives and their evaluation."""

from lightning_zobi.unlearn.closed_form import (
    closed_form_update,
    cross_attention_projections,
    edit_projections_,
    mace_refine_,
    uce_erase_,
)
from lightning_zobi.unlearn.llm import METHODS, UnlearningObjective, load_weights
from lightning_zobi.unlearn.memorization import (
    ExtractionStrength,
    MultipleChoiceAccuracy,
    NormalizedProbability,
    TokenExactMemorization,
)
from lightning_zobi.unlearn.metrics import (
    AnswerProbability,
    ExactMatch,
    ForgetQuality,
    LossMIA,
    ModelUtility,
    RougeLRecall,
    TruthRatio,
    UnlearningEvaluator,
    evaluate_model,
)
from lightning_zobi.unlearn.mia import MembershipAUC, mia_scores, privleak
from lightning_zobi.unlearn.objectives_extra import EXTRA_FORGET_TERMS, EXTRA_METHODS

__all__ = [
    "EXTRA_FORGET_TERMS",
    "EXTRA_METHODS",
    "METHODS",
    "AnswerProbability",
    "ExactMatch",
    "ExtractionStrength",
    "ForgetQuality",
    "LossMIA",
    "MembershipAUC",
    "ModelUtility",
    "MultipleChoiceAccuracy",
    "NormalizedProbability",
    "RougeLRecall",
    "TokenExactMemorization",
    "TruthRatio",
    "UnlearningEvaluator",
    "UnlearningObjective",
    "closed_form_update",
    "cross_attention_projections",
    "edit_projections_",
    "evaluate_model",
    "load_weights",
    "mace_refine_",
    "mia_scores",
    "privleak",
    "uce_erase_",
]
