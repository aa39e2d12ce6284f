"""Largest difference of RMU, the documented KL / IDK / SimNPO relations and the evaluator vs the references.

Issue 17, second part. Fixed random inputs over 20 seeds; the reference transcriptions are those of
tests/test_unlearn_llm.py (open-unlearning ``RMU.compute_activation_loss``) and tests/test_unlearn_mia.py;
the rest is written out below. Run from the repo root: ``python benchmarks/unlearn_objective_parity.py``;
the numbers go to benchmarks/RESULTS.md ("Parity with open-unlearning: RMU, ...").
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import hmean
from sklearn.metrics import roc_auc_score
from torchmetrics.classification import BinaryAUROC

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_unlearn_llm as L  # noqa: E402

from lightning_zobi.unlearn.llm import (  # noqa: E402
    answer_logprobs,
    control_vector,
    kl_to_reference,
    masked_mse,
    mean_nll,
    per_sample_masked_mse,
    simnpo_loss,
)
from lightning_zobi.unlearn.metrics import harmonic_mean  # noqa: E402
from lightning_zobi.unlearn.mia import MembershipAUC  # noqa: E402

largest: dict[str, float] = {}


def record(name: str, value: float | torch.Tensor) -> None:
    largest[name] = max(largest.get(name, 0.0), float(value))


for seed in range(20):
    g = torch.Generator().manual_seed(seed)
    b, t, d, v = 4, 9, 16, 13
    hidden, ref_hidden = torch.randn(b, t, d, generator=g), torch.randn(b, t, d, generator=g)
    control = control_vector(d, 2.0, seed).expand_as(hidden)
    # RMU, every row with the same answer length: ours == open-unlearning's code
    same = torch.zeros(b, t, dtype=torch.bool)
    same[:, 3:8] = True
    record("RMU forget, equal answer lengths", (per_sample_masked_mse(hidden, control, same) - L.ou_rmu_activation_loss(hidden, control, same)).abs())
    record("RMU retain, equal answer lengths", (per_sample_masked_mse(hidden, ref_hidden, same) - L.ou_rmu_activation_loss(hidden, ref_hidden, same)).abs())
    # unequal lengths: ours is the per-sample mean; the reference's broadcast gives mean(S)·mean(1/n)
    uneven = same.clone()
    for i in range(b):
        uneven[i, 3 : 3 + i] = False  # row i keeps 5 - i answer tokens
    per_token = ((hidden - control) ** 2).mean(-1) * uneven
    s, n = per_token.sum(-1), uneven.sum(-1).float()
    record("RMU forget vs per-sample mean (unequal lengths)", (per_sample_masked_mse(hidden, control, uneven) - (s / n).mean()).abs())
    record("RMU forget vs reference code (unequal lengths, by design)", (per_sample_masked_mse(hidden, control, uneven) - L.ou_rmu_activation_loss(hidden, control, uneven)).abs())
    record("RMU 'all' vs WMDP F.mse_loss", (per_sample_masked_mse(hidden, control, torch.ones(b, t, dtype=torch.bool)) - F.mse_loss(hidden, control)).abs())
    record("RMU 'attention' (pooled, ours before) vs per-sample, unequal lengths", (masked_mse(hidden, control, uneven) - per_sample_masked_mse(hidden, control, uneven)).abs())
    # KL: batchmean over B·T rows == ((T-1)·ours + last-position KL) / T on unpadded rows
    logits, ref_logits = torch.randn(b, t, v, generator=g), torch.randn(b, t, v, generator=g)
    theirs = F.kl_div(torch.log_softmax(logits, -1).view(-1, v), torch.log_softmax(ref_logits, -1).view(-1, v), reduction="batchmean", log_target=True)
    last = F.kl_div(torch.log_softmax(logits[:, -1], -1), torch.log_softmax(ref_logits[:, -1], -1), reduction="batchmean", log_target=True)
    ours = kl_to_reference(logits, ref_logits, torch.ones(b, t))
    record("KL: reference vs ((T-1)·ours + last)/T", (theirs - ((t - 1) * ours + last) / t).abs())
    record("KL: reference vs ours (by design)", (theirs - ours).abs())
    # IDK: TOFU's concatenated mean == (n_i·ours_i + n_r·ours_r) / (n_i + n_r)
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    labels[:, :3] = -100
    cat_logits = torch.randn(2 * b, t, v, generator=g)
    tofu = mean_nll(*answer_logprobs(cat_logits, labels))
    lp_i, n_i = answer_logprobs(cat_logits[:b], labels[:b])
    lp_r, n_r = answer_logprobs(cat_logits[b:], labels[b:])
    ours_sum = mean_nll(lp_i, n_i) + mean_nll(lp_r, n_r)
    record("IDK: TOFU vs ours/2 (equal token counts)", (tofu - ours_sum / 2).abs())
    # SimNPO: open-unlearning's delta == our gamma / beta
    logp_sum, n_tok = -torch.rand(6, generator=g) * 30, torch.randint(1, 12, (6,), generator=g)
    beta, delta = 2.5, float(torch.rand(1, generator=g))
    ou = -F.logsigmoid(beta * (-logp_sum / n_tok - delta)).mean() * 2 / beta
    record("SimNPO: open-unlearning(delta) vs ours(gamma = beta·delta)", (simnpo_loss(logp_sum, n_tok, beta, beta * delta) - ou).abs())
    # MIA AUC accumulated over batches of signed scores (the reference attack's loss difference)
    scores = torch.randn(12, generator=g) * 0.05
    auc = MembershipAUC()
    for lo, hi, member in ((0, 3, True), (3, 6, True), (6, 9, False), (9, 12, False)):
        auc.update(scores[lo:hi], member)
    want = roc_auc_score([0] * 6 + [1] * 6, scores.numpy())
    record("MIA AUC over 4 updates of signed scores", abs(float(auc.compute()) - want))
    before = BinaryAUROC()  # MembershipAUC before issue 17's fix: -scores straight into BinaryAUROC
    for lo, hi, member in ((0, 3, 1), (3, 6, 1), (6, 9, 0), (9, 12, 0)):
        before.update(-scores[lo:hi], torch.full((3,), member))
    record("the same, BinaryAUROC of -scores (before the fix)", abs(float(before.compute()) - want))
    # 9-way model utility: harmonic mean as scipy.stats.hmean (open-unlearning's hm_aggregate)
    parts = (torch.rand(9, generator=g) * 0.9 + 0.05).tolist()
    record("TOFU 9-way model utility (harmonic mean)", abs(harmonic_mean(parts) - hmean(parts)))

for name, value in largest.items():
    print(f"{name}\t{value:.1e}")
