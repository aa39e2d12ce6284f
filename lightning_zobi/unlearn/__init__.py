"""Unlearning losses and metrics (pure PyTorch): LLM forget/retain objectives and their evaluation."""

from lightning_zobi.unlearn.llm import METHODS, UnlearningObjective, load_weights
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

__all__ = [
    "METHODS",
    "AnswerProbability",
    "ExactMatch",
    "ForgetQuality",
    "LossMIA",
    "ModelUtility",
    "RougeLRecall",
    "TruthRatio",
    "UnlearningEvaluator",
    "UnlearningObjective",
    "evaluate_model",
    "load_weights",
]
