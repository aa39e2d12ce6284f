"""Largest difference of the issue-17 MIAs / memorization metrics / extra forget terms vs open-unlearning.

Uses the reference transcriptions of tests/test_unlearn_mia.py and tests/test_unlearn_objectives_extra.py on
fixed random inputs (20 seeds; grad-norm on the tiny Llama). Run from the repo root:
`python benchmarks/unlearn_metric_parity.py`; the numbers go to benchmarks/RESULTS.md (parity section).
"""
import sys, zlib, numpy as np, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
import test_unlearn_mia as M, test_unlearn_objectives_extra as O
from sklearn.metrics import roc_auc_score
from lightning_zobi.unlearn import mia, memorization as mem, objectives_extra as X
from lightning_zobi.unlearn.llm import answer_logprobs
from lightning_zobi.lightning.modules.causal_lm import build_causal_lm
d = {}
def up(k, v): d[k] = max(d.get(k, 0.0), float(v))
for s in range(20):
    lg, ids, lb = M._batch(s)
    tok, voc, labs = M.ou_tokenwise(lg, ids, lb)
    ours_t = mia.token_logprobs(lg, lb)
    up("loss (avg_loss)", (mia.average_loss(lg, lb) - M.ou_avg_loss(lg, lb)).abs().max())
    up("min-k % (k=0.4)", np.abs(mia.min_k_scores(ours_t, .4).numpy() - [M.ou_min_k(t, .4) for t in tok]).max())
    up("min-k %++ (k=0.4)", np.abs(mia.min_k_plus_plus_scores(ours_t, mia.vocab_logprobs(lg, lb), .4).numpy() - [M.ou_min_k_pp(t, v, .4) for t, v in zip(tok, voc)]).max())
    texts = [f"text {i} " * (s + 1) for i in range(4)]
    al = M.ou_avg_loss(lg, lb)
    up("zlib", np.abs(mia.zlib_scores(mia.average_loss(lg, lb), texts).numpy() - [float(x) / len(zlib.compress(t.encode())) for x, t in zip(al, texts)]).max())
    em, es = M.ou_em_es(lg, ids, lb)
    up("exact memorization (token)", np.abs(mem.exact_memorization(lg, lb).numpy() - em).max())
    up("extraction strength", np.abs(mem.extraction_strength(lg, lb).numpy() - es).max())
    sc = torch.randn(9, generator=torch.Generator().manual_seed(s))
    a = mia.MembershipAUC(); a.update(sc[:5], True); a.update(sc[5:], False)
    up("MIA AUC aggregation", abs(float(a.compute()) - roc_auc_score([0]*5+[1]*4, sc.numpy())))
    for auc, ref in ((0.1 + 0.04 * s, 0.5), (0.9 - 0.03 * s, 0.3)):
        up("privleak", abs(mia.privleak(auc, ref) - ((1-auc)-(1-ref))/((1-ref)+1e-10)*100))
    tl, pl = -torch.rand(6) * 20, -torch.rand(6, 3) * 20
    tn, pn = torch.randint(1, 9, (6,)), torch.randint(1, 9, (6, 3))
    at, af = np.exp((tl / tn).numpy()), np.exp((pl / pn).numpy())
    up("normalized probability (ra/wf)", np.abs(mem.normalized_probability(tl, tn, pl, pn).numpy() - at / (np.concatenate([at[:, None], af], 1).sum(-1) + 1e-10)).max())
    (lw, yw), (lrw, _), (ll, yl), (lrl, _) = (O._qa(4 * s + i) for i in range(4))
    up("IdkDPO (beta 0.1)", (X.idk_dpo_loss(answer_logprobs(lw, yw)[0], answer_logprobs(lrw, yw)[0], answer_logprobs(ll, yl)[0], answer_logprobs(lrl, yl)[0], .1) - O.ou_dpo((lw, yw), (lrw, yw), (ll, yl), (lrl, yl), .1)).abs())
    lg2, lb2 = O._qa(100 + s); te, _ = O._qa(200 + s); fl, fb = O._qa(300 + s, all_labelled=True)
    up("UNDIAL, all_positions=True (beta 10)", (X.undial_loss(lg2, te, lb2, 10, all_positions=True) - O.ou_undial(lg2, te, lb2, 10)).abs())
    up("UNDIAL default, fully labelled batch", (X.undial_loss(fl, te, fb, 10) - O.ou_undial(fl, te, fb, 10)).abs())
    up("UNDIAL default vs reference, QA batch (by design)", (X.undial_loss(lg2, te, lb2, 10) - O.ou_undial(lg2, te, lb2, 10)).abs())
    up("WGA (beta 1)", (X.wga_loss(lg2, lb2, 1) - O.ou_weighted(lg2, lb2, lambda l: (-l).exp().detach())).abs())
    up("SatImp (5, 1)", (X.satimp_loss(lg2, lb2, 5, 1) - O.ou_weighted(lg2, lb2, lambda l: (-l).exp().detach()**5 * (1-(-l).exp().detach()))).abs())
    up("CE-U (n=1)", (X.ceu_loss(lg2, lb2, 1) - O.ou_ceu(lg2, lb2, 1)).abs())
torch.manual_seed(0); model = build_causal_lm("tiny-llama")
for s in range(3):
    ids = torch.randint(3, 200, (2, 10)); lab = ids.clone(); lab[:, :4] = -100
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab}
    ours = mia.gradnorm_scores(model, b)
    for i in range(2):
        model.zero_grad(); lgt = model(input_ids=ids[i:i+1]).logits
        t, _, _ = M.ou_tokenwise(lgt, ids[i:i+1], lab[i:i+1]); (-t[0].mean()).backward()
        up("grad-norm (p=2)", abs(float(ours[i]) - float(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).mean())))
for k, v in d.items(): print(f"{k}\t{v:.1e}")
