"""IdkDPO, UNDIAL, WGA, SatImp and CE-U against transcriptions of open-unlearning's losses.

Reference: locuslab/open-unlearning @ d3d7cf9, src/trainer/utils.py (compute_dpo_loss, compute_batch_nll,
compute_undial_loss, compute_wga_loss, compute_satimp_loss) and src/trainer/unlearn/ceu.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_zobi.lightning.modules.causal_lm import build_causal_lm
from lightning_zobi.unlearn.llm import answer_logprobs
from lightning_zobi.unlearn.objectives_extra import (
    EXTRA_FORGET_TERMS,
    EXTRA_METHODS,
    EXTRA_NEEDS_REFERENCE,
    ceu_loss,
    idk_dpo_loss,
    satimp_loss,
    undial_loss,
    wga_loss,
)

V = 120  # >= 100, so the reference's label -100 indexes a real vocabulary id (V - 100)


def _qa(seed=0, b=3, t=10, all_labelled=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, V, generator=g) * 3
    labels = torch.randint(0, V, (b, t), generator=g)
    if not all_labelled:
        for i in range(b):
            labels[i, : 2 + i] = -100  # prompt
            if i % 2:
                labels[i, -1] = -100  # padding
    return logits, labels


# ------------------------------------------------------------------ transcriptions
def ou_batch_nll(logits, labels):
    ce = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    return ce(logits[..., :-1, :].transpose(-1, -2), labels[..., 1:]).sum(dim=-1)


def ou_dpo(win, ref_win, lose, ref_lose, beta):
    win_log_ratio = -(ou_batch_nll(*win) - ou_batch_nll(*ref_win))
    lose_log_ratio = -(ou_batch_nll(*lose) - ou_batch_nll(*ref_lose))
    return -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


def ou_undial(logits, teacher_logits, labels, beta):
    shift_labels = labels[..., 1:]
    shift_logits = logits[..., :-1, :]
    shift_teacher = teacher_logits[..., :-1, :]
    mask = torch.zeros_like(shift_teacher)
    batch_idx = torch.arange(mask.shape[0]).view(-1, 1, 1)
    seq_idx = torch.arange(mask.shape[1]).view(1, -1, 1)
    mask[batch_idx, seq_idx, shift_labels.unsqueeze(-1)] = 1.0
    soft_label = F.softmax(shift_teacher - mask * beta, dim=-1)
    loss = nn.CrossEntropyLoss(reduction="none")(
        shift_logits.reshape(-1, shift_logits.size(-1)), soft_label.reshape(-1, soft_label.size(-1))
    )
    return loss.mean()


def ou_weighted(logits, labels, w):
    shift_logits, shift_labels = logits[..., :-1, :], labels[..., 1:]
    lm = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1)
    )
    return -(w(lm) * lm)[shift_labels.reshape(-1) != -100].mean()


def ou_ceu(logits, labels, n):
    valid_mask = labels != -100
    update_mask = (valid_mask.cumsum(dim=-1) <= n) & valid_mask
    labels = labels.masked_fill(update_mask, -100)[..., 1:]
    logits = logits[..., :-1, :]
    valid = labels != -100
    vl, vy = logits[valid], labels[valid]
    target = vl.detach().clone()
    target.scatter_(dim=-1, index=vy.unsqueeze(-1), value=float("-inf"))
    return F.cross_entropy(input=vl, target=F.softmax(target, dim=-1))


# ------------------------------------------------------------------ tests
def test_idk_dpo_matches_reference():
    (lw, yw), (lrw, _), (ll, yl), (lrl, _) = (_qa(s) for s in range(4))
    ours = idk_dpo_loss(
        answer_logprobs(lw, yw)[0],
        answer_logprobs(lrw, yw)[0],
        answer_logprobs(ll, yl)[0],
        answer_logprobs(lrl, yl)[0],
        0.1,
    )
    want = ou_dpo((lw, yw), (lrw, yw), (ll, yl), (lrl, yl), 0.1)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    # at the reference (model == ref) every log ratio is 0: loss = (2/beta) log 2
    same = answer_logprobs(lw, yw)[0]
    assert float(idk_dpo_loss(same, same, same, same, 0.1)) == pytest.approx(
        20 * torch.log(torch.tensor(2.0)).item()
    )


@pytest.mark.parametrize("beta", [0.0, 10.0])
def test_undial_matches_reference(beta):
    logits, labels = _qa(5)
    teacher, _ = _qa(6)
    torch.testing.assert_close(
        undial_loss(logits, teacher, labels, beta, all_positions=True),
        ou_undial(logits, teacher, labels, beta),
        rtol=1e-5,
        atol=1e-6,
    )
    # fully labelled batch: our default (labelled tokens only) is the reference's number
    full_logits, full_labels = _qa(7, all_labelled=True)
    torch.testing.assert_close(
        undial_loss(full_logits, teacher, full_labels, beta),
        ou_undial(full_logits, teacher, full_labels, beta),
        rtol=1e-5,
        atol=1e-6,
    )
    # on QA batches the default averages over answer tokens only, so it differs from the reference
    assert (
        abs(
            float(undial_loss(logits, teacher, labels, beta))
            - float(ou_undial(logits, teacher, labels, beta))
        )
        > 1e-3
    )


@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_wga_matches_reference(beta):
    logits, labels = _qa(8)
    want = ou_weighted(logits, labels, lambda lm: ((-lm).exp().detach()) ** beta)
    torch.testing.assert_close(wga_loss(logits, labels, beta), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta1,beta2", [(5.0, 1.0), (1.0, 2.0)])
def test_satimp_matches_reference(beta1, beta2):
    logits, labels = _qa(9)
    want = ou_weighted(
        logits, labels, lambda lm: ((-lm).exp().detach()) ** beta1 * (1 - (-lm).exp().detach()) ** beta2
    )
    torch.testing.assert_close(satimp_loss(logits, labels, beta1, beta2), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_ceu_matches_reference(n):
    logits, labels = _qa(10)
    torch.testing.assert_close(ceu_loss(logits, labels, n), ou_ceu(logits, labels, n), rtol=1e-5, atol=1e-6)


def test_gradients_flow_only_where_the_reference_says():
    logits, labels = _qa(11)
    logits.requires_grad_(True)
    wga_loss(logits, labels).backward()
    # WGA's weights are detached: the gradient is -w * dCE, zero on unlabelled positions
    shift_valid = torch.cat([labels[:, 1:] != -100, torch.zeros(labels.shape[0], 1, dtype=torch.bool)], 1)
    assert logits.grad[~shift_valid].abs().max() == 0
    assert logits.grad[shift_valid].abs().max() > 0


def test_terms_run_on_a_model_and_register():
    torch.manual_seed(0)
    model, ref = build_causal_lm("tiny-llama"), build_causal_lm("tiny-llama", seed=1).eval()
    ids = torch.randint(3, 200, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    batch.update({f"idk_{k}": v.flip(0) for k, v in list(batch.items())})
    assert set(EXTRA_FORGET_TERMS) == set(EXTRA_METHODS)
    assert EXTRA_NEEDS_REFERENCE <= set(EXTRA_FORGET_TERMS)
    for name, term in EXTRA_FORGET_TERMS.items():
        loss = term(model, batch, ref)
        assert loss.dim() == 0 and torch.isfinite(loss), name
        loss.backward()
    with pytest.raises(ValueError, match="reference"):
        EXTRA_FORGET_TERMS["undial"](model, batch, None)
    with pytest.raises(ValueError, match="idk_input_ids"):
        EXTRA_FORGET_TERMS["idk_dpo"](
            model, {k: v for k, v in batch.items() if not k.startswith("idk_")}, ref
        )


@pytest.mark.parametrize("method", ["idk_dpo", "undial", "wga", "satimp", "ceu"])
def test_registered_methods_run_through_the_unlearning_module(method):
    """The open-unlearning methods are selectable by name, with their reference and defaults."""
    from lightning_zobi.lightning.datamodules.unlearning import UnlearningDataModule
    from lightning_zobi.lightning.modules.unlearning import UnlearningModule
    from lightning_zobi.unlearn.llm import METHODS, UnlearningObjective

    assert method in METHODS
    torch.manual_seed(0)
    module = UnlearningModule("tiny-llama", objective=method, term_kwargs={"beta": 2.0} if method == "wga" else None)
    assert module.objective.needs_reference == (method in ("idk_dpo", "undial"))
    dm = UnlearningDataModule(num_people=10, forget_batch_size=2, retain_batch_size=2, max_length=48)
    dm.setup("fit")
    batch, _, _ = next(iter(dm.train_dataloader()))
    reference = getattr(module, "reference", None)
    out = module.objective(module.model, batch["forget"], batch["retain"], reference)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    with pytest.raises(ValueError, match="forget='nope'"):
        UnlearningObjective(forget="nope")
