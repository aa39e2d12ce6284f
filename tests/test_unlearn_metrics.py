"""Unlearning metrics against hand-computed cases, and the evaluation loop on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_zobi.data.facts import FactsEvalDataset, make_splits
from lightning_zobi.lightning.datamodules.facts import load_tokenizer
from lightning_zobi.lightning.modules.causal_lm import build_causal_lm
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
    generate_answers,
    score_batch,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (two threads on busy shared cores are ~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_answer_probability_is_per_token_geometric_mean():
    # sample 1: answer tokens with p = 0.8 and 0.5 -> sqrt(0.4); sample 2: one token with p = 0.25.
    logits = torch.full((2, 3, 4), -1e4)
    logits[0, 0, 1], logits[0, 0, 2] = math.log(0.8), math.log(0.2)
    logits[0, 1, 3], logits[0, 1, 0] = 0.0, 0.0
    logits[1, 1, :] = 0.0
    labels = torch.tensor([[-100, 1, 3], [-100, -100, 2]])
    metric = AnswerProbability()
    metric.update(logits, labels)
    assert metric.compute().item() == pytest.approx((math.sqrt(0.4) + 0.25) / 2, rel=1e-5)


def test_exact_match():
    metric = ExactMatch()
    metric.update(["Quellport", " The  Last Bell ", "ashvane"], ["Quellport", "The Last Bell", "Ashvane"])
    assert metric.compute().item() == pytest.approx(2 / 3)
    folded = ExactMatch(ignore_case=True)
    folded.update(["ashvane"], ["Ashvane"])
    assert folded.compute().item() == 1.0
    with pytest.raises(ValueError, match="same length"):
        metric.update(["a"], ["a", "b"])


def test_rouge_l_recall_uses_torchmetrics_offline():
    metric = RougeLRecall()
    # LCS("the silent harbor", "the silent lantern") = 2 of the target's 3 tokens; second pair: 1 of 1.
    metric.update(["The Silent Harbor", "born in 1850 maybe"], ["The Silent Lantern", "1850"])
    assert metric.compute().item() == pytest.approx((2 / 3 + 1.0) / 2)


def test_truth_ratio_and_reductions():
    # true answer: 2 tokens of p = 0.5; perturbed: per-token p = 0.25 and 0.0625 -> geometric mean 0.125.
    true_logp, true_n = torch.tensor([2 * math.log(0.5)]), torch.tensor([2])
    pert_logp = torch.tensor([[3 * math.log(0.25), math.log(0.0625)]])
    pert_n = torch.tensor([[3, 1]])
    values = {}
    for reduction in TruthRatio.REDUCTIONS:
        metric = TruthRatio(reduction=reduction)
        metric.update(true_logp, true_n, pert_logp, pert_n)
        values[reduction] = metric.compute()
    assert values["none"].flatten().tolist() == pytest.approx([0.25])
    assert values["mean"].item() == pytest.approx(0.25)
    assert values["forget"].item() == pytest.approx(0.25)  # min(R, 1/R)
    assert values["retain"].item() == pytest.approx(0.75)  # max(0, 1 - R)
    with pytest.raises(ValueError, match="reduction"):
        TruthRatio(reduction="median")


def test_forget_quality_is_the_ks_p_value():
    # Two fully separated samples of 3: exact two-sided KS p-value = 2 / C(6, 3) = 0.1.
    reference = torch.tensor([0.1, 0.2, 0.3])
    metric = ForgetQuality(reference)
    ratios = torch.tensor([2.0, 3.0, 4.0])
    # feed ratios R directly: true per-token p = 1 (logp 0), perturbed per-token p = R.
    metric.update(torch.zeros(3), torch.ones(3), ratios.log().unsqueeze(1), torch.ones(3, 1))
    assert metric.compute().item() == pytest.approx(0.1)
    same = ForgetQuality(reference)
    same.update(torch.zeros(3), torch.ones(3), reference.log().unsqueeze(1), torch.ones(3, 1))
    assert same.compute().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        ForgetQuality([0.5])


def test_model_utility_harmonic_mean():
    metric = ModelUtility()
    metric.update(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.5]))
    # means: prob 0.5, rouge 0.75, truth score 0.5 -> 3 / (2 + 4/3 + 2)
    assert metric.compute().item() == pytest.approx(3 / (2 + 4 / 3 + 2))
    zero = ModelUtility()
    zero.update(torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([0.5]))
    assert zero.compute().item() == 0.0


def test_loss_mia_auc():
    metric = LossMIA()
    metric.update(torch.tensor([0.1, 0.35]), True)  # members (forget)
    metric.update(torch.tensor([0.3, 0.4]), torch.tensor([0, 0]))  # non-members (hold-out)
    # member has the lower loss in 3 of the 4 (member, non-member) pairs
    assert metric.compute().item() == pytest.approx(0.75)


@pytest.fixture(scope="module")
def tiny_eval():
    tok = load_tokenizer("bytes")
    splits = make_splits(10, seed=0)
    model = build_causal_lm("tiny-llama", seed=0).eval()
    return tok, splits, model


def test_batched_left_padded_generation_matches_one_by_one(tiny_eval):
    tok, splits, model = tiny_eval
    dataset = FactsEvalDataset(splits.retain[:3], tok, "retain", 64)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(3)])
    together = generate_answers(model, batch["prompt_ids"], batch["prompt_mask"], tok, max_new_tokens=6)
    for i, pair in enumerate(splits.retain[:3]):
        ids = torch.tensor([tok(pair.prompt(), add_special_tokens=False)["input_ids"]])
        alone = generate_answers(model, ids, torch.ones_like(ids), tok, max_new_tokens=6)
        assert together[i] == alone[0]


def test_evaluator_matches_hand_aggregation(tiny_eval):
    tok, splits, model = tiny_eval
    metrics, ratios = evaluate_model(model, tok, splits, max_new_tokens=4, batch_size=3)
    assert ratios.shape == (len(splits.forget),)
    expected = {
        "forget/em",
        "forget/prob",
        "retain/rougeL",
        "holdout/truth_ratio",
        "model_utility",
        "mia_auc",
    }
    assert expected <= set(metrics)
    # recompute forget/prob and the MIA AUC from score_batch by hand
    dataset = FactsEvalDataset(splits.forget, tok, "forget", 64)
    scores = score_batch(model, torch.utils.data.default_collate(list(dataset)), tok, max_new_tokens=4)
    prob = torch.exp(scores["logp"] / scores["n"]).mean()
    assert metrics["forget/prob"] == pytest.approx(prob.item(), rel=1e-5)
    hold = FactsEvalDataset(splits.holdout, tok, "holdout", 64)
    hold_nll = score_batch(model, torch.utils.data.default_collate(list(hold)), tok, max_new_tokens=1)["nll"]
    wins = [(f < h).float() + 0.5 * (f == h).float() for f in scores["nll"] for h in hold_nll]
    assert metrics["mia_auc"] == pytest.approx(torch.stack(wins).mean().item(), abs=1e-6)
    # forget quality against itself is 1; against a shifted reference it drops
    with_ref, _ = evaluate_model(model, tok, splits, reference_ratios=ratios, max_new_tokens=1)
    assert with_ref["forget_quality"] == pytest.approx(1.0)
    evaluator = UnlearningEvaluator(reference_ratios=ratios * 10)
    evaluator.update("forget", scores)
    assert evaluator.compute()["forget_quality"] < 0.05
    with pytest.raises(ValueError, match="split="):
        evaluator.update("train", scores)


def test_rouge_l_recall_stems_as_tofu() -> None:
    """TOFU / open-unlearning score ROUGE-L recall with the Porter stemmer (issue 17)."""
    from lightning_zobi.unlearn.metrics import RougeLRecall

    stemmed, plain = RougeLRecall(), RougeLRecall(use_stemmer=False)
    for metric in (stemmed, plain):
        metric.update(["She writes books about dragons"], ["She wrote a book about dragons."])
    assert float(stemmed.compute()) == pytest.approx(2 / 3, abs=1e-4)
    assert float(plain.compute()) == pytest.approx(0.5, abs=1e-4)


def test_open_unlearning_names_table():
    """Our keys -> open-unlearning's: one name per quantity; the 3-way utility and generation EM are not renamed."""
    from lightning_zobi.unlearn.names import OPEN_UNLEARNING_NAMES, OURS_ONLY, open_unlearning_view

    assert len(set(OPEN_UNLEARNING_NAMES.values())) == len(OPEN_UNLEARNING_NAMES)
    assert OPEN_UNLEARNING_NAMES["tofu_model_utility"] == "model_utility"
    assert "model_utility" not in OPEN_UNLEARNING_NAMES and "model_utility" in OURS_ONLY
    assert "forget/em" not in OPEN_UNLEARNING_NAMES  # a generation match, not exact_memorization
    view = open_unlearning_view(
        {"val/mia_auc": 0.7, "val/forget/truth_score": 0.9, "val/model_utility": 0.3, "train_loss": 1.0}
    )
    assert view == {"forget_Truth_Ratio": 0.9, "mia_loss": 0.7}
    assert list(view) == ["forget_Truth_Ratio", "mia_loss"]  # open-unlearning's order


def test_generation_budget_is_checked(tiny_eval):
    tok, splits, model = tiny_eval
    batch = torch.utils.data.default_collate([FactsEvalDataset(splits.forget, tok, "forget", 64)[0]])
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        score_batch(model, batch, tok, max_new_tokens=0)
    long = score_batch(model, batch, tok, max_new_tokens=8)["generations"][0]
    short = score_batch(model, batch, tok, max_new_tokens=2)["generations"][0]
    n_long, n_short = (len(tok(g, add_special_tokens=False)["input_ids"]) for g in (long, short))
    assert long.startswith(short) and n_short <= 2 < n_long <= 8
