"""MIAs, privleak and memorization metrics against transcriptions of open-unlearning's code.

References (locuslab/open-unlearning @ d3d7cf9): src/evals/metrics/utils.py (tokenwise_logprobs,
tokenwise_vocab_logprobs, evaluate_probability), src/evals/metrics/mia/{min_k,min_k_plus_plus,zlib,
reference,gradnorm,utils}.py, src/evals/metrics/privacy.py (privleak), src/evals/metrics/memorization.py
(exact_memorization, extraction_strength, probability_w_options); TOFU aggregate_eval_stat.py.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lightning_zobi.lightning.modules.causal_lm import build_causal_lm
from lightning_zobi.unlearn.memorization import (
    ExtractionStrength,
    MultipleChoiceAccuracy,
    NormalizedProbability,
    TokenExactMemorization,
    exact_memorization,
    extraction_strength,
    normalized_probability,
)
from lightning_zobi.unlearn.mia import (
    MembershipAUC,
    average_loss,
    gradnorm_scores,
    mia_scores,
    min_k_plus_plus_scores,
    min_k_scores,
    privleak,
    reference_scores,
    token_logprobs,
    vocab_logprobs,
    zlib_scores,
)

V = 13


def _batch(seed=0, b=4, t=12):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, V, generator=g) * 2
    ids = torch.randint(0, V, (b, t), generator=g)
    labels = ids.clone()
    for i in range(b):  # prompt of 2 + i tokens, then answer, then 1 pad on odd rows
        labels[i, : 2 + i] = -100
        if i % 2:
            labels[i, -1] = -100
    return logits, ids, labels


# ------------------------------------------------------------------ transcriptions (numpy / loops)
def ou_tokenwise(logits, ids, labels):
    lp = torch.log_softmax(logits, -1)[:, :-1, :]
    target = lp.gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    tok, voc, labs = [], [], []
    for i in range(logits.shape[0]):
        idx = (labels[i] != -100).nonzero(as_tuple=True)[0][:-1]
        s, e = idx[0].item(), idx[-1].item()
        tok.append(target[i, s - 1 : e])
        voc.append(lp[i, s - 1 : e])
        labs.append(labels[i][idx])
    return tok, voc, labs


def ou_avg_loss(logits, labels):
    ce = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    losses = ce(logits[..., :-1, :].transpose(-1, -2), labels[..., 1:]).sum(-1)
    return losses / (labels != -100).sum(-1)


def ou_min_k(lp, k):
    lp = lp.float().numpy()
    num_k = max(1, int(len(lp) * k))
    return -np.mean(np.sort(lp)[:num_k])


def ou_min_k_pp(lp, all_probs, k):
    mu = (torch.exp(all_probs) * all_probs).sum(-1)
    sigma = (torch.exp(all_probs) * torch.square(all_probs)).sum(-1) - torch.square(mu)
    sigma = torch.clamp(sigma, min=1e-6)
    scores = (lp.numpy() - mu.numpy()) / torch.sqrt(sigma).numpy()
    num_k = max(1, int(len(scores) * k))
    return -np.mean(sorted(scores)[:num_k])


def test_token_logprobs_match_reference_slicing():
    logits, ids, labels = _batch()
    ref_tok, ref_voc, _ = ou_tokenwise(logits, ids, labels)
    for ours, ref in zip(token_logprobs(logits, labels), ref_tok, strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    for ours, ref in zip(vocab_logprobs(logits, labels), ref_voc, strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(average_loss(logits, labels), ou_avg_loss(logits, labels), rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [0.2, 0.4, 1.0])
def test_min_k_and_min_k_plus_plus(k):
    logits, ids, labels = _batch(1)
    tok, voc, _ = ou_tokenwise(logits, ids, labels)
    ours = min_k_scores(token_logprobs(logits, labels), k)
    np.testing.assert_allclose(ours.numpy(), [ou_min_k(t, k) for t in tok], rtol=0, atol=1e-6)
    ours_pp = min_k_plus_plus_scores(token_logprobs(logits, labels), vocab_logprobs(logits, labels), k)
    np.testing.assert_allclose(
        ours_pp.numpy(), [ou_min_k_pp(t, v, k) for t, v in zip(tok, voc, strict=True)], atol=1e-5
    )
    assert not torch.allclose(ours, ours_pp)  # different statistics


def test_zlib_and_reference_scores():
    logits, _, labels = _batch(2)
    ref_logits = logits.flip(0)
    texts = ["Maren Ostvik was born in Tromso.", "aaaaaaaaaaaaaaaaaaaaaaaa", "x", "The Salt Ledger won."]
    loss = ou_avg_loss(logits, labels)
    want = [float(x) / len(zlib.compress(t.encode("utf-8"))) for x, t in zip(loss, texts, strict=True)]
    np.testing.assert_allclose(zlib_scores(average_loss(logits, labels), texts).numpy(), want, rtol=1e-6)
    want_ref = ou_avg_loss(logits, labels) - ou_avg_loss(ref_logits, labels)
    torch.testing.assert_close(
        reference_scores(average_loss(logits, labels), average_loss(ref_logits, labels)),
        want_ref,
        atol=1e-6,
        rtol=0,
    )


def test_membership_auc_is_open_unlearnings_roc_auc():
    forget = torch.tensor([0.5, 1.0, 2.5, 0.2, 3.0])
    holdout = torch.tensor([1.5, 2.0, 0.1, 4.0])
    auc = MembershipAUC()
    auc.update(forget, True)
    auc.update(holdout, False)
    ref = roc_auc_score([0] * 5 + [1] * 4, np.concatenate([forget.numpy(), holdout.numpy()]))
    assert float(auc.compute()) == pytest.approx(ref, abs=1e-7)
    assert ref != 0.5


def test_privleak_formula():
    # open-unlearning privacy.py: score = 1 - auc; ref = 1 - ref_auc; (score - ref) / (ref + 1e-10) * 100
    for auc, ref_auc in [(0.9, 0.5), (0.3, 0.55), (0.5, 0.5)]:
        want = ((1 - auc) - (1 - ref_auc)) / ((1 - ref_auc) + 1e-10) * 100
        assert privleak(auc, ref_auc) == pytest.approx(want, abs=1e-9)
    assert privleak(0.9) == pytest.approx(-80.0, abs=1e-6)


def test_gradnorm_matches_per_sample_backward():
    torch.manual_seed(0)
    model = build_causal_lm("tiny-llama")
    ids = torch.randint(3, 200, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    ours = gradnorm_scores(model, batch, p=2)
    assert all(p.grad is None for p in model.parameters())  # gradients zeroed afterwards
    want = []
    for i in range(2):  # GradNormAttack with batch_size 1 (its TOFU/MUSE config)
        model.zero_grad()
        logits = model(input_ids=ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1])).logits
        tok, _, _ = ou_tokenwise(logits, ids[i : i + 1], labels[i : i + 1])
        (-torch.mean(tok[0])).backward()
        want.append(
            torch.stack([p.grad.detach().norm(p=2) for p in model.parameters() if p.grad is not None]).mean()
        )
    torch.testing.assert_close(ours, torch.stack(want), rtol=1e-5, atol=1e-7)


def test_mia_scores_dispatch_and_errors():
    torch.manual_seed(0)
    model = build_causal_lm("tiny-llama").eval()
    ids = torch.randint(3, 200, (3, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(
        mia_scores(model, batch, "loss"), ou_avg_loss(logits, labels), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        mia_scores(model, batch, "min_k", k=0.4),
        min_k_scores(token_logprobs(logits, labels), 0.4),
        atol=1e-5,
        rtol=0,
    )
    assert torch.allclose(mia_scores(model, batch, "reference", reference=model), torch.zeros(3), atol=1e-6)
    with pytest.raises(ValueError, match="texts"):
        mia_scores(model, batch, "zlib")
    with pytest.raises(ValueError, match="reference"):
        mia_scores(model, batch, "reference")
    with pytest.raises(ValueError, match="k=0"):
        min_k_scores(token_logprobs(logits, labels), 0)


# ------------------------------------------------------------------ memorization
def ou_em_es(logits, ids, labels):
    _, voc, labs = ou_tokenwise(logits, ids, labels)
    em, es = [], []
    for lp, lab in zip(voc, labs, strict=True):
        preds = torch.argmax(lp, dim=-1)
        em.append(((preds == lab).sum() / len(lab)).item())
        n = len(lab)
        for k in range(n):
            if torch.equal(preds[k:], lab[k:]):
                break
        es.append(1 - k / n)
    return em, es


def test_exact_memorization_and_extraction_strength():
    logits, ids, labels = _batch(3)
    # make row 0 fully memorized and row 2 memorized from its 3rd scored token on
    for i, start in ((0, 0), (2, 2)):
        pos = (labels[i] != -100).nonzero(as_tuple=True)[0][:-1]
        for j, t in enumerate(pos.tolist()):
            if j >= start:
                logits[i, t - 1, labels[i, t]] = 50.0
    em, es = ou_em_es(logits, ids, labels)
    np.testing.assert_allclose(exact_memorization(logits, labels).numpy(), em, atol=1e-7)
    np.testing.assert_allclose(extraction_strength(logits, labels).numpy(), es, atol=1e-7)
    assert es[0] == 1.0 and em[0] == 1.0
    m, e = TokenExactMemorization(), ExtractionStrength()
    m.update(logits, labels)
    e.update(logits, labels)
    assert float(m.compute()) == pytest.approx(np.mean(em), abs=1e-6)
    assert float(e.compute()) == pytest.approx(np.mean(es), abs=1e-6)


def test_normalized_probability_matches_tofu_aggregate():
    g = torch.Generator().manual_seed(4)
    true_logp, pert_logp = -torch.rand(5, generator=g) * 20, -torch.rand(5, 3, generator=g) * 20
    true_n, pert_n = torch.randint(1, 9, (5,), generator=g), torch.randint(1, 9, (5, 3), generator=g)
    # TOFU aggregate_eval_stat.py get_model_utility: true / (true + sum false), per-token probabilities
    # (float32 here, as the references compute it; + 1e-10 as open-unlearning probability_w_options)
    avg_true = np.exp(-(-true_logp / true_n).numpy())
    avg_false = np.exp(-(-pert_logp / pert_n).numpy())
    all_prob = np.concatenate([avg_true[:, None], avg_false], axis=1).sum(-1)
    want = avg_true / (all_prob + 1e-10)
    np.testing.assert_allclose(
        normalized_probability(true_logp, true_n, pert_logp, pert_n).numpy(), want, rtol=1e-6
    )
    metric = NormalizedProbability()
    metric.update(true_logp, true_n, pert_logp, pert_n)
    assert float(metric.compute()) == pytest.approx(want.mean(), rel=1e-6)


def test_multiple_choice_accuracy():
    acc = MultipleChoiceAccuracy()
    acc.update(torch.tensor([[0.1, 0.9, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]), [1, 1, 3])
    assert float(acc.compute()) == pytest.approx(2 / 3)


# ------------------------------------------------------------------ the evaluator accumulates them
def ou_truth_ratio(true_loss, pert_loss):
    """open-unlearning ``truth_ratio``: wrong / (correct + 1e-10) from avg losses (pert: mean over options)."""
    correct, wrong = np.exp(-true_loss), np.exp(-pert_loss.mean(-1))
    return wrong / (correct + 1e-10)


def test_evaluator_accumulates_mias_memorization_and_tofu_utility():
    """UnlearningEvaluator over two batches per split against open-unlearning's formulas on the same logits."""
    from scipy.stats import hmean

    from lightning_zobi.data.facts import FactsEvalDataset, make_splits
    from lightning_zobi.lightning.datamodules.facts import load_tokenizer
    from lightning_zobi.unlearn.metrics import UnlearningEvaluator, score_batch, truth_ratio

    torch.set_num_threads(1)
    tok, splits = load_tokenizer("bytes"), make_splits(10, seed=0)
    model, other = build_causal_lm("tiny-llama", seed=0).eval(), build_causal_lm("tiny-llama", seed=1).eval()
    # utility sets: pairs whose true answer the random model already prefers (R < 1), so that no
    # component of the harmonic mean is 0 and the 9-way mean is tested on non-trivial values
    pool = make_splits(40, seed=0).retain
    everything = torch.utils.data.default_collate(list(FactsEvalDataset(pool, tok, "retain", 64)))
    full = score_batch(model, everything, tok, 1)
    ratios = truth_ratio(full["true_logp"], full["true_n"], full["pert_logp"], full["pert_n"])
    kept = [p for p, r in zip(pool, ratios.tolist(), strict=True) if r < 0.98][:12]
    assert len(kept) == 12
    data = {
        "forget": splits.forget,
        "holdout": splits.holdout,
        "retain": kept[:4],
        "real_authors": kept[4:8],
        "world_facts": kept[8:12],
    }
    ev = UnlearningEvaluator(privleak_reference_auc=0.4)
    ref: dict[str, dict[str, list]] = {}
    for split, pairs in data.items():
        ds = FactsEvalDataset(pairs, tok, split, 64)
        r = ref.setdefault(
            split, {k: [] for k in ("em", "min_k", "mkpp", "zlib", "ref", "gn", "loss", "tr", "np")}
        )
        for rows in ((0, 1), (2, 3)):  # two updates per split: the metrics must accumulate
            batch = torch.utils.data.default_collate([ds[i] for i in rows])
            mia_split = split in ("forget", "holdout")
            scores = score_batch(
                model, batch, tok, 2, reference=other if mia_split else None, gradnorm=mia_split
            )
            if not mia_split:  # a random model generates nothing right: half-right generations, ROUGE-L > 0
                scores["generations"] = [" ".join(a.split()[::2]) for a in scores["answers"]]
                scores["rouge"] = torch.full((len(rows),), 0.5)
            ev.update(split, scores)
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                ref_logits = other(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                tl = model(
                    input_ids=batch["true_input_ids"], attention_mask=batch["true_attention_mask"]
                ).logits
                b, k, t = batch["pert_input_ids"].shape
                pl = model(
                    input_ids=batch["pert_input_ids"].reshape(b * k, t),
                    attention_mask=batch["pert_attention_mask"].reshape(b * k, t),
                ).logits
            labels = batch["labels"]
            tok_lp, voc_lp, _ = ou_tokenwise(logits, batch["input_ids"], labels)
            r["em"] += ou_em_es(logits, batch["input_ids"], labels)[0]
            r["min_k"] += [ou_min_k(x, 0.4) for x in tok_lp]
            r["mkpp"] += [ou_min_k_pp(x, v, 0.4) for x, v in zip(tok_lp, voc_lp, strict=True)]
            loss = ou_avg_loss(logits, labels)
            texts = [tok.decode(row[row != -100].tolist(), skip_special_tokens=True) for row in labels]
            r["zlib"] += [
                float(x) / len(zlib.compress(s.encode("utf-8"))) for x, s in zip(loss, texts, strict=True)
            ]
            r["ref"] += (loss - ou_avg_loss(ref_logits, labels)).tolist()
            r["loss"] += loss.tolist()
            true_loss = ou_avg_loss(tl, batch["true_labels"]).numpy()
            pert_loss = ou_avg_loss(pl, batch["pert_labels"].reshape(b * k, t)).reshape(b, k).numpy()
            r["tr"] += ou_truth_ratio(true_loss, pert_loss).tolist()
            correct, wrong = np.exp(-true_loss), np.exp(-pert_loss).sum(-1)  # probability_w_options
            r["np"] += (correct / (correct + wrong + 1e-10)).tolist()
            if mia_split:
                r["gn"] += gradnorm_scores(model, batch).tolist()
            r.setdefault("rouge", []).extend(scores["rouge"].tolist())
    out = ev.compute()
    members = [0] * len(ref["forget"]["loss"]) + [1] * len(ref["holdout"]["loss"])
    for key, attack in (
        ("min_k", "min_k"),
        ("mkpp", "min_k_plus_plus"),
        ("zlib", "zlib"),
        ("ref", "reference"),
        ("gn", "gradnorm"),
        ("loss", "auc"),
    ):
        want = roc_auc_score(members, ref["forget"][key] + ref["holdout"][key])
        assert out[f"mia_{attack}"] == pytest.approx(want, abs=1e-6), attack
    assert out["privleak"] == pytest.approx(((1 - out["mia_min_k"]) - 0.6) / 0.6 * 100, rel=1e-6)
    assert out["forget/exact_memorization"] == pytest.approx(np.mean(ref["forget"]["em"]), abs=1e-6)
    assert out["forget/truth_score"] == pytest.approx(
        np.mean(np.minimum(ref["forget"]["tr"], 1 / np.array(ref["forget"]["tr"]))), rel=1e-5
    )
    parts = []
    for split in ("retain", "real_authors", "world_facts"):
        truth = np.mean(np.maximum(0, 1 - np.array(ref[split]["tr"])))
        assert out[f"{split}/truth_score"] == pytest.approx(truth, rel=1e-5, abs=1e-7)
        prob = (
            np.mean(np.exp(-np.array(ref[split]["loss"]))) if split == "retain" else np.mean(ref[split]["np"])
        )
        parts += [prob, out[f"{split}/rougeL"], truth]
    assert min(parts) > 0 and len(parts) == 9
    assert out["tofu_model_utility"] == pytest.approx(hmean(parts), rel=1e-5)
    three = hmean([parts[0], float(np.mean(ref["retain"]["rouge"])), parts[2]])
    assert out["model_utility"] == pytest.approx(three, rel=1e-5)  # the retain-only 3-way mean
    assert abs(out["model_utility"] - out["tofu_model_utility"]) > 1e-3
    ev.reset()
    ev.update("forget", scores)
    assert "mia_min_k" not in ev.compute() and "tofu_model_utility" not in ev.compute()
