"""Unlearning objectives: each loss's value, sign and gradient direction on toy models."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_zobi.data.facts import IDK_ANSWERS, FactsEvalDataset, ForgetQADataset, make_splits
from lightning_zobi.lightning.datamodules.facts import encode_qa as encode_qa_from_datamodule
from lightning_zobi.lightning.datamodules.facts import load_tokenizer
from lightning_zobi.lightning.modules.causal_lm import build_causal_lm
from lightning_zobi.unlearn.llm import (
    METHODS,
    RMU_PRESETS,
    UnlearningObjective,
    answer_logprobs,
    capture_hidden,
    control_vector,
    kl_to_reference,
    load_weights,
    masked_mse,
    mean_nll,
    npo_loss,
    run_to_layer,
    sequence_logprobs,
    simnpo_loss,
)
from lightning_zobi.zo import ZOSGD


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (two threads on busy shared cores are ~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ToyLM(nn.Module):
    """A causal-LM-shaped toy: embedding, residual tanh layers in ``layers``, linear head; ``.logits`` out."""

    def __init__(self, vocab: int = 11, hidden: int = 8, n_layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_layers))
        self.head = nn.Linear(hidden, vocab)
        self.head_calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        self.head_calls += 1
        return SimpleNamespace(logits=self.head(h))


def toy_batch(seed: int, prefix: str = "", batch: int = 4, length: int = 6, vocab: int = 11) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100  # the "question"
    labels[0, -1] = -100  # a padded position
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask, f"{prefix}labels": labels}


@pytest.fixture
def toy() -> ToyLM:
    torch.manual_seed(0)
    return ToyLM()


def forget_logp(model: nn.Module, batch: dict) -> float:
    with torch.no_grad():
        logp, _ = sequence_logprobs(model, batch)
    return float(logp.sum())


def sgd_step(model: nn.Module, loss: torch.Tensor, lr: float) -> None:
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad


# ---------------------------------------------------------------------------- log-likelihoods
def test_answer_logprobs_hand_computed():
    # vocab 2; position 0 predicts token 1 with p = 0.8, position 1 predicts token 0 with p = 0.5.
    logits = torch.tensor([[[math.log(0.2), math.log(0.8)], [0.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    logp, n = answer_logprobs(logits, labels)
    assert n.tolist() == [2]
    assert logp.item() == pytest.approx(math.log(0.8) + math.log(0.5), abs=1e-6)


def test_mean_nll_equals_transformers_loss():
    model = build_causal_lm("tiny-llama")
    tok = load_tokenizer("bytes")
    pairs = make_splits(10).forget
    batch = {
        k: torch.stack([encode_qa_from_datamodule(p.prompt(), p.answer, tok, 48)[k] for p in pairs])
        for k in ("input_ids", "attention_mask", "labels")
    }
    with torch.no_grad():
        ours = mean_nll(*sequence_logprobs(model, batch))
        theirs = model(**batch).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


# ---------------------------------------------------------------------------- forget terms
def test_gradient_ascent_is_negative_nll_and_lowers_forget_likelihood(toy):
    batch = toy_batch(1)
    obj = UnlearningObjective(forget="ga", retain="none")
    out = obj(toy, batch)
    assert out["loss"].item() == pytest.approx(-mean_nll(*sequence_logprobs(toy, batch)).item())
    assert out["loss"].item() < 0
    before = forget_logp(toy, batch)
    sgd_step(toy, out["loss"], lr=0.1)
    assert forget_logp(toy, batch) < before


def test_grad_diff_combines_ascent_and_descent(toy):
    forget, retain = toy_batch(1), toy_batch(2)
    obj = UnlearningObjective.from_method("grad_diff", alpha=2.0)
    out = obj(toy, forget, retain)
    f = -mean_nll(*sequence_logprobs(toy, forget))
    r = mean_nll(*sequence_logprobs(toy, retain))
    assert out["forget"].item() == pytest.approx(f.item())
    assert out["retain"].item() == pytest.approx(r.item())
    assert out["loss"].item() == pytest.approx(f.item() + 2.0 * r.item())
    # Descending the retain half alone (forget_weight=0) raises the retain likelihood.
    before = forget_logp(toy, retain)
    sgd_step(
        toy, UnlearningObjective.from_method("grad_diff", forget_weight=0.0)(toy, forget, retain)["loss"], 0.1
    )
    assert forget_logp(toy, retain) > before


def test_npo_value_bound_and_gradient_weights():
    beta = 0.5
    ref = torch.tensor([-3.0, -4.0, -5.0])
    logp = ref.clone().requires_grad_(True)
    loss = npo_loss(logp, ref, beta)
    assert loss.item() == pytest.approx(2 / beta * math.log(2))  # at the reference
    loss.backward()
    # dL/dlogp_i = (2/B) σ(β (logp_i - ref_i)) = 1/B at the reference: GA's direction.
    assert torch.allclose(logp.grad, torch.full((3,), 1 / 3))
    far = (ref - 60.0).requires_grad_(True)  # long forgotten: loss and gradient vanish
    loss_far = npo_loss(far, ref, beta)
    loss_far.backward()
    assert 0 <= loss_far.item() < 1e-6
    assert far.grad.abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="beta"):
        npo_loss(logp, ref, 0.0)


def test_npo_step_lowers_forget_likelihood_and_needs_reference(toy):
    batch = toy_batch(1)
    ref = copy.deepcopy(toy).requires_grad_(False)
    obj = UnlearningObjective.from_method("npo", retain="none", beta=0.1)
    out = obj(toy, batch, reference=ref)
    assert out["loss"].item() == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)
    before = forget_logp(toy, batch)
    sgd_step(toy, out["loss"], lr=0.05)
    assert forget_logp(toy, batch) < before
    with pytest.raises(ValueError, match="reference"):
        obj(toy, batch)


def test_simnpo_hand_computed_and_direction(toy):
    # Two answers: 3 tokens with log-likelihood -6 (avg -2) and 2 tokens with -1 (avg -0.5).
    logp = torch.tensor([-6.0, -1.0], requires_grad=True)
    n = torch.tensor([3, 2])
    loss = simnpo_loss(logp, n, beta=2.0, gamma=0.5)
    expected = (
        -(2 / 2.0)
        * 0.5
        * (math.log(1 / (1 + math.exp(-(4.0 - 0.5)))) + math.log(1 / (1 + math.exp(-(1.0 - 0.5)))))
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert (logp.grad > 0).all()  # descending the loss lowers the log-likelihoods
    batch = toy_batch(1)
    before = forget_logp(toy, batch)
    sgd_step(toy, UnlearningObjective(forget="simnpo", retain="none", beta=2.5)(toy, batch)["loss"], lr=0.1)
    assert forget_logp(toy, batch) < before


def test_idk_trains_towards_refusals(toy):
    batch = toy_batch(1)
    batch.update(toy_batch(5, prefix="idk_"))
    obj = UnlearningObjective(forget="idk", retain="none")
    out = obj(toy, batch)
    assert out["loss"].item() == pytest.approx(mean_nll(*sequence_logprobs(toy, batch, prefix="idk_")).item())
    idk_only = {k[4:]: v for k, v in batch.items() if k.startswith("idk_")}
    before = forget_logp(toy, idk_only)
    sgd_step(toy, out["loss"], lr=0.1)
    assert forget_logp(toy, idk_only) > before
    with pytest.raises(ValueError, match="idk_input_ids"):
        obj(toy, toy_batch(1))


def test_rmu_hook_stops_forward_and_steers_towards_control(toy):
    batch = toy_batch(1)
    calls = toy.head_calls
    hidden = run_to_layer(toy, batch, 0)
    assert hidden.shape == (4, 6, 8)
    assert toy.head_calls == calls  # the forward stopped after layer 0
    with capture_hidden(toy, -1, stop=False) as store:
        toy(batch["input_ids"])
    assert store["hidden"].shape == (4, 6, 8) and toy.head_calls == calls + 1
    ref = copy.deepcopy(toy).requires_grad_(False)
    obj = UnlearningObjective(
        forget="rmu", retain="rmu", rmu_layer=0, rmu_coeff=3.0, alpha=1.0, rmu_tokens="attention"
    )
    out = obj(toy, batch, toy_batch(2), reference=ref)
    assert out["retain"].item() == 0.0  # identical to the reference
    control = control_vector(8, 3.0)
    assert control.norm().item() == pytest.approx(3.0) and (control >= 0).all()
    expected = ((run_to_layer(toy, batch, 0) - control) ** 2).mean(-1)
    mask = batch["attention_mask"].float()
    assert out["forget"].item() == pytest.approx(((expected * mask).sum() / mask.sum()).item(), rel=1e-5)
    before = out["forget"].item()
    for _ in range(5):
        sgd_step(toy, obj(toy, batch, toy_batch(2), reference=ref)["loss"], lr=0.05)
    assert obj(toy, batch, toy_batch(2), reference=ref)["forget"].item() < before
    with pytest.raises(ValueError, match="out of range"):
        run_to_layer(toy, batch, 5)


def ou_rmu_activation_loss(activation1, activation2, mask):
    """open-unlearning ``RMU.compute_activation_loss`` (src/trainer/unlearn/rmu.py), transcribed."""
    squared_diff = torch.nn.functional.mse_loss(activation1, activation2, reduction="none")
    expanded_mask = mask.unsqueeze(-1).expand_as(squared_diff)
    squared_diff_sum = (squared_diff * expanded_mask).mean(dim=2).sum(dim=(1))
    num_tokens = mask.sum(dim=-1, keepdim=True)
    return (squared_diff_sum / num_tokens).mean()


def test_rmu_defaults_and_token_mask_follow_open_unlearning(toy):
    """RMU by default: layer 7, c = 2, per-sample mean over answer tokens (open-unlearning's RMU)."""
    obj = UnlearningObjective(forget="rmu", retain="rmu")
    assert (obj.rmu_layer, obj.rmu_coeff, obj.rmu_tokens) == (7, 2.0, "answer")
    assert RMU_PRESETS["open-unlearning"]["rmu_layer"] == 7 and RMU_PRESETS["wmdp"]["rmu_coeff"] == 6.5
    batch = toy_batch(1)
    batch["labels"][0, -1] = batch["input_ids"][0, -1]  # every row: 4 answer tokens, one padded position
    ref = copy.deepcopy(toy).requires_grad_(False)
    with torch.no_grad():
        ref.layers[0].weight.add_(0.3)  # a reference that differs, so the retain term is not 0
    obj = UnlearningObjective(forget="rmu", retain="rmu", rmu_layer=0, rmu_coeff=3.0)
    hidden = run_to_layer(toy, batch, 0)
    ref_hidden = run_to_layer(ref, batch, 0)
    answer = batch["labels"] != -100
    control = control_vector(8, 3.0).reshape(1, 1, 8).expand_as(hidden)
    want_f = ou_rmu_activation_loss(hidden, control, answer)
    want_r = ou_rmu_activation_loss(hidden, ref_hidden, answer)
    assert obj.forget_loss(toy, batch).item() == pytest.approx(want_f.item(), rel=1e-6)
    assert obj.retain_loss(toy, batch, ref).item() == pytest.approx(want_r.item(), rel=1e-6)
    # rows with different answer lengths: the reference's (B,) / (B, 1) broadcasts to (B, B) and
    # computes mean(S)·mean(1/n); we compute the per-sample mean its comments describe, mean(S/n)
    batch["labels"][1, 2:4] = -100
    answer = batch["labels"] != -100
    per_token = ((hidden - control) ** 2).mean(-1) * answer
    s, n = per_token.sum(-1), answer.sum(-1).float()
    assert obj.forget_loss(toy, batch).item() == pytest.approx((s / n).mean().item(), rel=1e-6)
    theirs = ou_rmu_activation_loss(hidden, control, answer)
    assert theirs.item() == pytest.approx((s.mean() * (1 / n).mean()).item(), rel=1e-6)
    assert abs(masked_mse(hidden, control, answer).item() - (s / n).mean().item()) > 1e-4  # pooled differs
    # WMDP's original: F.mse_loss over every position (padding included)
    wmdp = UnlearningObjective(forget="rmu", rmu_layer=0, rmu_coeff=3.0, rmu_tokens="all")
    want_all = torch.nn.functional.mse_loss(hidden, control)
    assert wmdp.forget_loss(toy, batch).item() == pytest.approx(want_all.item(), rel=1e-6)
    with pytest.raises(ValueError, match="rmu_tokens"):
        UnlearningObjective(forget="rmu", rmu_tokens="labels")
    with pytest.raises(ValueError, match="rmu_layer=-1"):
        UnlearningObjective(forget="rmu").forget_loss(toy, batch)  # layer 7 of a 2-layer model
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="rmu_tokens='attention'"):
        obj.forget_loss(toy, unlabelled)


def test_documented_differences_kl_idk_simnpo(toy):
    """The relations to the references stated in lightning_zobi.unlearn.llm's docstring."""
    # SimNPO: open-unlearning's delta inside beta·(...) equals our gamma = beta·delta
    logp_sum, n = torch.tensor([-3.0, -7.5, -1.2]), torch.tensor([3, 5, 2])
    beta, delta = 2.5, 0.4
    nll = -logp_sum / n - delta
    ou = -torch.nn.functional.logsigmoid(beta * nll).mean() * 2 / beta
    assert simnpo_loss(logp_sum, n, beta, gamma=beta * delta).item() == pytest.approx(ou.item(), rel=1e-6)
    assert simnpo_loss(logp_sum, n, beta, gamma=delta).item() != pytest.approx(ou.item(), rel=1e-3)
    # KL: TOFU / open-unlearning batchmean over all B·T rows = ((T-1)·ours + mean last-position KL) / T
    batch = toy_batch(3)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])  # unpadded rows
    ref = copy.deepcopy(toy).requires_grad_(False)
    with torch.no_grad():
        ref.head.bias.add_(torch.linspace(-1, 1, 11))
    logits, ref_logits = toy(batch["input_ids"]).logits, ref(batch["input_ids"]).logits
    v, t = logits.shape[-1], logits.shape[1]
    cur, tgt = torch.log_softmax(logits, -1).view(-1, v), torch.log_softmax(ref_logits, -1).view(-1, v)
    theirs = torch.nn.functional.kl_div(cur, tgt, reduction="batchmean", log_target=True)
    ours = kl_to_reference(logits, ref_logits, batch["attention_mask"])
    last = torch.nn.functional.kl_div(
        torch.log_softmax(logits[:, -1], -1),
        torch.log_softmax(ref_logits[:, -1], -1),
        reduction="batchmean",
        log_target=True,
    )
    assert theirs.item() == pytest.approx(((t - 1) * ours + last).item() / t, rel=1e-5)
    # IDK: TOFU's mean over the concatenated idk + retain tokens is half of ours for equal counts
    idk, retain = toy_batch(4, prefix="idk_"), toy_batch(5)
    for b in (idk, retain):
        for k in list(b):
            if k.endswith("labels"):
                b[k][0, -1] = b[k.replace("labels", "input_ids")][0, -1]  # same token count in both
    ours_idk = UnlearningObjective(forget="idk", retain="nll", alpha=1.0)(toy, idk, retain)["loss"]
    ids = torch.cat([idk["idk_input_ids"], retain["input_ids"]])
    labels = torch.cat([idk["idk_labels"], retain["labels"]])
    tofu = mean_nll(*answer_logprobs(toy(ids).logits, labels))
    assert tofu.item() == pytest.approx(0.5 * ours_idk.item(), rel=1e-5)


# ---------------------------------------------------------------------------- retain terms
def test_kl_to_reference_zero_at_reference_positive_after_change(toy):
    batch = toy_batch(2)
    ref = copy.deepcopy(toy).requires_grad_(False)
    obj = UnlearningObjective(forget="ga", retain="kl", alpha=1.0)
    assert obj.retain_loss(toy, batch, ref).item() == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        toy.head.bias.add_(torch.linspace(-1, 1, 11))
    kl = obj.retain_loss(toy, batch, ref)
    assert kl.item() > 0
    sgd_step(toy, kl, lr=0.5)  # descending KL moves back towards the reference
    assert obj.retain_loss(toy, batch, ref).item() < kl.item()
    # hand check on one position: KL(p || q) for p = (0.5, 0.5), q = (0.8, 0.2)
    logits = torch.log(torch.tensor([[[0.8, 0.2], [0.8, 0.2]]]))
    ref_logits = torch.zeros(1, 2, 2)
    value = kl_to_reference(logits, ref_logits, torch.ones(1, 2))
    assert value.item() == pytest.approx(0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2), rel=1e-6)


# ---------------------------------------------------------------------------- the objective object
def test_methods_and_bad_arguments():
    assert set(METHODS) == {"ga", "grad_diff", "kl", "npo", "simnpo", "rmu", "idk", "idk_dpo", "undial", "wga", "satimp", "ceu"}
    assert UnlearningObjective.from_method("kl").needs_reference
    assert not UnlearningObjective.from_method("grad_diff").needs_reference
    assert UnlearningObjective.from_method("npo", retain="kl").retain == "kl"
    with pytest.raises(ValueError, match="objective='nope'"):
        UnlearningObjective.from_method("nope")
    with pytest.raises(ValueError, match="forget="):
        UnlearningObjective(forget="ascend")
    with pytest.raises(ValueError, match="alpha"):
        UnlearningObjective(alpha=-1.0)
    with pytest.raises(ValueError, match="beta"):
        UnlearningObjective(forget="npo", beta=0.0)


def test_zeroth_order_step_on_the_objective_unlearns(toy):
    """The same objective as a forward-only closure: ZO-SGD steps lower the forget likelihood."""
    forget, retain = toy_batch(1), toy_batch(2)
    obj = UnlearningObjective.from_method("grad_diff", alpha=0.5)
    before = forget_logp(toy, forget)
    opt = ZOSGD(toy.parameters(), lr=2e-3, eps=1e-3, seed=0)
    for _ in range(40):
        opt.step(lambda: obj(toy, forget, retain)["loss"])
    assert all(p.grad is None for p in toy.parameters())
    assert forget_logp(toy, forget) < before - 1.0


# ---------------------------------------------------------------------------- data and weights
def test_forget_and_eval_datasets():
    tok = load_tokenizer("bytes")
    splits = make_splits(20, seed=3)
    item = ForgetQADataset(splits.forget, tok, 64)[0]
    idk = tok.decode([t for t in item["idk_labels"].tolist() if t >= 0], skip_special_tokens=True).strip()
    assert idk in IDK_ANSWERS
    prompt_ids = tok(splits.forget[0].prompt(), add_special_tokens=False)["input_ids"]
    assert (
        item["idk_input_ids"][: len(prompt_ids)].tolist()
        == prompt_ids
        == item["input_ids"][: len(prompt_ids)].tolist()
    )
    ev = FactsEvalDataset(splits.forget, tok, "forget", 64, truth_ratio_question="paraphrased")[1]
    pair = splits.forget[1]
    assert ev["pert_input_ids"].shape == (3, 64) and ev["split"] == "forget" and ev["answer"] == pair.answer
    prompt = tok.decode(ev["prompt_ids"][ev["prompt_mask"].bool()].tolist())
    assert prompt == pair.prompt() and ev["prompt_mask"][-1] == 1 and ev["prompt_mask"][0] == 0
    assert pair.paraphrased_question in tok.decode(
        ev["true_input_ids"][ev["true_attention_mask"].bool()].tolist()
    )
    with pytest.raises(ValueError, match="truth_ratio_question"):
        FactsEvalDataset(splits.forget, tok, "forget", truth_ratio_question="other")


def test_load_weights_from_ckpt_and_safetensors(tmp_path):
    from safetensors.torch import save_model

    src = build_causal_lm("tiny-llama", seed=1)
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "a.ckpt")
    save_model(src, str(tmp_path / "b.safetensors"))  # stores the tied head once
    for name in ("a.ckpt", "b.safetensors"):
        dst = load_weights(build_causal_lm("tiny-llama", seed=2), tmp_path / name)
        assert all(
            torch.equal(a, b)
            for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True)
        )
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(build_causal_lm("tiny-opt"), tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="does not exist"):
        load_weights(src, tmp_path / "missing.ckpt")


def test_npo_keeps_the_change_a_zo_difference_needs_on_a_confident_model():
    """Near the reference NPO is (2/β)·log 2 ≈ 13.86 plus a change of order logp − ref_logp: in fp32
    the ±1e-7 change a ZO difference sees on a model that knows its answers rounds to exactly 0."""
    ref = torch.tensor([-1e-4, -2e-4, -3e-5])
    plus, minus = npo_loss(ref + 1e-7, ref, 0.1), npo_loss(ref - 1e-7, ref, 0.1)
    assert plus.dtype == torch.float64
    # d/dΔ of -(2/β) logσ(-βΔ) at Δ = 0 is 1: the difference is 2e-7, to fp32's precision of Δ
    assert float(plus - minus) == pytest.approx(2e-7, rel=1e-3)
    n = torch.tensor([10, 10, 10])
    s_plus, s_minus = simnpo_loss(ref * 10 + 1e-6, n, 2.5), simnpo_loss(ref * 10 - 1e-6, n, 2.5)
    assert float(s_plus - s_minus) != 0.0
