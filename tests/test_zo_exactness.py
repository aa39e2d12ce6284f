"""Numerical fidelity of the ZO step: bit-identical at lr=0 in every dtype, sub-ulp updates kept,
both forwards of a query sharing their random draws, tensors read outside their module handled."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_zobi.zo import OPTIMIZERS, ZOSGD, build_optimizer
from lightning_zobi.zo.perturbation import JustInTimePerturbation
from lightning_zobi.zo.rounding import stochastic_round

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RULES = sorted(set(OPTIMIZERS) - {"zo_fo_hybrid"})


def _tiny_llama(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.1,
    )
    return LlamaForCausalLM(config).to(dtype)


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return torch.equal(a.view(view), b.view(view))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", RULES)
def test_lr_zero_leaves_every_parameter_bit_identical(rule: str, dtype: torch.dtype) -> None:
    model = _tiny_llama(dtype).train()  # attention dropout on: the forwards draw random masks
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    before = _snapshot(model)
    opt = build_optimizer(rule, model.parameters(), lr=0.0, eps=1e-2, seed=3, fused=False)
    for _ in range(3):
        loss = opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        assert loss == loss  # finite
    assert all(_bits_equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_in_place_perturbation_drifts_where_exact_does_not(dtype: torch.dtype) -> None:
    """The control: MeZO's in-place θ ± εz moves a half-precision model at lr=0."""
    model = _tiny_llama(dtype)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    before = _snapshot(model)
    opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-2, seed=3, perturbation="inplace")
    for _ in range(20):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    changed = sum(int((a != b).sum()) for a, b in zip(before, model.parameters(), strict=True))
    assert changed > 0.1 * sum(p.numel() for p in before)


def test_stochastic_round_is_unbiased_and_exact_on_representable_values() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.tensor(0.02, dtype=torch.bfloat16).float()
    ulp = float(torch.nextafter(base.bfloat16(), torch.tensor(1.0, dtype=torch.bfloat16)).float() - base)
    value = torch.full((200_000,), float(base) + 0.3 * ulp)
    rounded = stochastic_round(value, torch.bfloat16, gen).float()
    assert set(rounded.unique().tolist()) == {float(base), float(base) + ulp}
    assert abs(float(rounded.mean()) - float(value[0])) < 0.01 * ulp
    exact = torch.randn(1000).bfloat16()
    assert _bits_equal(stochastic_round(exact.float(), torch.bfloat16, gen), exact)
    half = torch.randn(1000).half()
    assert _bits_equal(stochastic_round(half.float(), torch.float16, gen), half)


def test_sub_ulp_updates_are_kept_in_bf16() -> None:
    """lr·g·z far below a bf16 ulp: round-to-nearest loses it, stochastic rounding keeps its mean.

    Loss Σθ: every step moves the mean of θ by −lr·(Σz)²/n (−lr in expectation) while each entry
    moves by ~lr·√n·|z| = 0.1 ulp. Same seeds, so the fp32 run is the reference.
    """
    n, steps, lr = 65536, 400, 2e-8
    shifts = {}
    for name, dtype, sr in (("fp32", torch.float32, False), ("sr", torch.bfloat16, True), ("rn", torch.bfloat16, False)):
        w = nn.Parameter(torch.full((n,), 0.02, dtype=dtype))
        start = float(w.detach().double().mean())
        opt = ZOSGD([w], lr=lr, eps=1e-3, seed=0, stochastic_rounding=sr)
        for _ in range(steps):
            opt.step(lambda w=w: w.double().sum())
        shifts[name] = float(w.detach().double().mean()) - start
    assert shifts["fp32"] < -0.5 * steps * lr
    assert shifts["sr"] == pytest.approx(shifts["fp32"], rel=0.3)
    assert abs(shifts["rn"]) < 0.1 * abs(shifts["fp32"])


def test_stochastic_rounding_is_seeded_so_runs_repeat() -> None:
    def run() -> torch.Tensor:
        model = _tiny_llama(torch.bfloat16)
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
        opt = ZOSGD(model.parameters(), lr=1e-3, eps=1e-2, seed=5)
        torch.manual_seed(7)
        for _ in range(3):
            opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        return torch.cat([p.detach().float().flatten() for p in model.parameters()])

    assert torch.equal(run(), run())


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)  # dropout 0.1
    return GPT2LMHeadModel(config).train()


def test_shared_rng_makes_the_estimate_a_function_of_theta_and_z() -> None:
    """GPT-2 at its default dropout: with shared draws the ± forwards see one mask, the estimate repeats."""
    model = _gpt2()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    estimates = {}
    for rng in ("shared", "independent"):
        gs = []
        for trial in range(4):
            torch.manual_seed(trial)  # a different dropout mask per trial
            opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-3, seed=0, rng=rng)
            opt.step(lambda: model(input_ids=ids, labels=ids).loss)
            gs.append(opt.last_estimate.projected_grads[0])
        estimates[rng] = torch.tensor(gs)
    model.eval()
    opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-3, seed=0)
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    g_eval = opt.last_estimate.projected_grads[0]
    # shared: g varies with the mask only as the true directional derivative does; independent:
    # the difference of two masks' losses (O(1)) divided by 2ε swamps it
    assert estimates["shared"].std() < 0.2 * estimates["independent"].std()
    assert abs(float(estimates["shared"].mean()) - g_eval) < abs(float(estimates["independent"].std()))


def test_shared_rng_leaves_the_generator_one_forward_ahead() -> None:
    w = nn.Parameter(torch.zeros(3))
    opt = ZOSGD([w], lr=0.1, eps=1e-3, seed=0)
    torch.manual_seed(11)
    opt.step(lambda: (w + torch.rand(3)).sum())
    after_step = torch.rand(1)
    torch.manual_seed(11)
    torch.rand(3)
    assert torch.equal(after_step, torch.rand(1))


def test_eval_forward_mode_turns_dropout_off_for_the_forwards_only() -> None:
    model = _gpt2()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    seen = []
    opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-3, forward_mode="eval").attach(model)

    def closure() -> torch.Tensor:
        seen.append(model.training)
        return model(input_ids=ids, labels=ids).loss

    opt.step(closure)
    assert seen == [False, False] and model.training
    with pytest.raises(ValueError, match="attach"):
        ZOSGD(model.parameters(), forward_mode="eval").step(closure)


class _Direct(nn.Module):
    """A parameter used directly (not through a submodule) and a tied weight read by the parent."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) * self.scale
        return (h @ self.embed.weight.T).logsumexp(-1).mean()  # tied weight read outside embed's forward


def test_tensors_read_outside_their_module_see_the_perturbation() -> None:
    torch.manual_seed(0)
    model = _Direct()
    ids = torch.tensor([[1, 2, 3]])
    exact = ZOSGD(model.parameters(), lr=0.0, eps=1e-3, seed=0)
    exact.step(lambda: model(ids))
    inplace = ZOSGD(model.parameters(), lr=0.0, eps=1e-3, seed=0, perturbation="inplace")
    inplace.step(lambda: model(ids))
    g_exact, g_inplace = exact.last_estimate.projected_grads[0], inplace.last_estimate.projected_grads[0]
    assert g_exact == pytest.approx(g_inplace, rel=1e-3, abs=1e-4)
    perturber = exact.perturber()
    assert isinstance(perturber, JustInTimePerturbation) and perturber.verified
    names = [n for n, _ in model.named_parameters()]
    # embed.weight is read by the parent (materialised whole); scale is read inside its owner's forward
    assert perturber.whole_forward == {names.index("embed.weight")}


def test_plain_tensor_without_module_and_closure_called_once_per_forward() -> None:
    w = torch.zeros(5, requires_grad=True)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        return ((w - 1.0) ** 2).sum()

    opt = ZOSGD([w], lr=0.05, eps=1e-3, seed=0)
    for _ in range(200):
        opt.step(closure)
    assert len(calls) == 400
    assert float(((w.detach() - 1.0) ** 2).sum()) < 0.5


def test_bf16_fine_tune_tracks_fp32() -> None:
    """A bf16 linear-regression fine-tune follows the fp32 one; the in-place control does not."""
    torch.manual_seed(0)
    d = 32
    x = torch.randn(256, d)
    w_true = torch.randn(d, d) * 0.1
    y = x @ w_true.T
    w0 = w_true + 0.02 * torch.randn(d, d)

    def run(dtype: torch.dtype, **kwargs: object) -> float:
        lin = nn.Linear(d, d, bias=False)
        lin.weight.data = w0.clone().to(dtype)
        opt = ZOSGD(lin.parameters(), lr=5e-3, eps=1e-3, seed=0, **kwargs)
        xs, ys = x.to(dtype), y.float()
        for _ in range(600):
            opt.step(lambda: ((lin(xs).float() - ys) ** 2).mean())
        with torch.no_grad():
            return float(((lin(xs).float() - ys) ** 2).mean())

    start = float(((x @ w0.T - y) ** 2).mean())
    fp32, bf16 = run(torch.float32), run(torch.bfloat16)
    bf16_inplace_rn = run(torch.bfloat16, perturbation="inplace", stochastic_rounding=False)
    assert fp32 < 0.8 * start
    assert bf16 < 0.8 * start and abs(bf16 - fp32) < 0.25 * (start - fp32)
    assert bf16_inplace_rn > bf16 + 0.3 * (start - fp32)


def test_a_diffusion_loss_with_random_timesteps_sees_one_draw_per_query() -> None:
    """A user's denoising loss draws timesteps and noise from the global RNG inside the closure."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def loss() -> torch.Tensor:
        t = torch.randint(0, 1000, (4,))
        noise = torch.randn_like(x0)
        pred = unet(scheduler.add_noise(x0, noise, t), t).sample
        return torch.nn.functional.mse_loss(pred, noise)

    gaps = {}
    for rng in ("shared", "independent"):
        opt = ZOSGD(unet.parameters(), lr=0.0, eps=1e-3, seed=0, rng=rng)
        gap = []
        for trial in range(4):
            torch.manual_seed(trial)
            opt.step(loss)
            plus, minus = opt.last_estimate.losses
            gap.append(abs(plus - minus))
        gaps[rng] = sum(gap) / len(gap)
    assert gaps["shared"] < 0.05 * gaps["independent"]


class _GPT2Module(__import__("lightning.pytorch", fromlist=["LightningModule"]).LightningModule):
    """A user's module: GPT-2 at its default dropout, AdamW as they would configure it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _gpt2()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_zero_order_callback_bf16_true_lr_zero_is_bit_identical(tmp_path) -> None:
    import lightning.pytorch as pl

    from lightning_zobi import ZeroOrder

    module = _GPT2Module()
    ids = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(3))
    loader = torch.utils.data.DataLoader(ids, batch_size=4)
    trainer = pl.Trainer(
        max_steps=8, precision="bf16-true", callbacks=[ZeroOrder(lr=0.0, eps=1e-2, seed=1)], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    start = None

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal start
            start = _snapshot(pl_module)

    trainer.callbacks.append(Snapshot())
    trainer.fit(module, loader)
    assert trainer.global_step == 8 and start is not None and start[0].dtype == torch.bfloat16
    assert all(_bits_equal(a, b) for a, b in zip(start, module.parameters(), strict=True))


def test_torch_transformer_eval_fast_path_sees_the_perturbation() -> None:
    """nn.TransformerEncoderLayer in eval mode reads its sublayers' weights without their forwards."""
    torch.manual_seed(0)
    layers = [nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).double().eval() for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    grads = {}
    for layer, mode in zip(layers, ("exact", "inplace"), strict=True):
        opt = ZOSGD(layer.parameters(), lr=1e-3, eps=1e-4, seed=0, perturbation=mode)
        for _ in range(3):
            opt.step(lambda layer=layer: layer(x).pow(2).mean())
        grads[mode] = opt.last_estimate.projected_grads[0]
    assert grads["exact"] == pytest.approx(grads["inplace"], rel=1e-5)
    assert abs(grads["exact"]) > 1e-3
