"""No silent-wrong Lightning path: ZeroOrder / QZO on the models and flags users bring (issue 16).

Real models built from configs with their default dropout (GPT-2, OPT, a BERT encoder), Lightning's
demo modules, a user's own small (and own 4-bit) module, a bf16-true module; a 2-process gloo run
with ``strategy="ddp"``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from conftest import PlainRegression, quiet_trainer, regression_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_zobi import ZeroOrder, ZODDPStrategy
from lightning_zobi.lightning.callbacks.zero_order import is_no_decay
from lightning_zobi.zo import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")

GPT2 = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
OPT = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    ffn_dim=64,
    num_attention_heads=2,
    max_position_embeddings=64,
    word_embed_proj_dim=32,
)
BERT = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    num_labels=2,
)


def hf_model(kind: str) -> nn.Module:
    """A tiny transformers model from its config, default dropout kept (GPT-2/OPT/BERT: 0.1)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))
    if kind == "opt":
        return transformers.OPTForCausalLM(transformers.OPTConfig(**OPT))
    return transformers.BertForSequenceClassification(transformers.BertConfig(**BERT))


class HFModule(pl.LightningModule):
    """What a user writes around a transformers model: the model's own loss, AdamW on all parameters."""

    def __init__(self, kind: str = "gpt2", lr: float = 1e-3, weight_decay: float = 0.01) -> None:
        super().__init__()
        self.kind, self.lr, self.weight_decay = kind, lr, weight_decay
        self.model = hf_model(kind)

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        if self.kind == "bert":
            return self.model(input_ids=ids, labels=labels).loss
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def token_loader(n: int = 16, length: int = 16, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Sequences that repeat a short per-sequence pattern (learnable by a tiny LM), labels = first token parity."""
    gen = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, 128, (n, 4), generator=gen)
    ids = pattern.repeat(1, length // 4)
    return DataLoader(TensorDataset(ids, ids[:, 0] % 2), batch_size=batch_size)


def boring() -> BoringModel:
    torch.manual_seed(0)
    return BoringModel()


# ---------------------------------------------------------------------- strategies
@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_refusal")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(__file__).parent / "_ddp_refusal_worker.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_plain_ddp_with_zero_order_fails_at_setup_on_every_rank(ddp_ranks: list[dict]) -> None:
    for rank in ddp_ranks:
        assert rank["error_type"] == "ValueError"
        assert 'strategy="zo_ddp"' in rank["error"] and "diverge" in rank["error"]
        assert rank["global_step"] == 0 and not rank["moved"]  # refused before any step


@pytest.mark.parametrize(
    "strategy",
    [
        DDPStrategy(start_method="spawn"),
        DDPStrategy(),
        FSDPStrategy(),
    ],
    ids=["ddp_spawn", "ddp", "fsdp"],
)
def test_multi_process_strategies_are_refused_naming_zo_ddp(strategy) -> None:
    trainer = SimpleNamespace(
        strategy=strategy, precision="32-true", accumulate_grad_batches=1, gradient_clip_val=None
    )
    with pytest.raises(ValueError, match=f'strategy={type(strategy).__name__}.*strategy="zo_ddp"'):
        ZeroOrder(lr=1e-3).setup(trainer, boring(), "fit")


def test_deepspeed_is_refused() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    try:
        strategy = DeepSpeedStrategy()
    except Exception as exc:  # noqa: BLE001 - deepspeed is not a dependency
        pytest.skip(f"DeepSpeedStrategy unavailable: {exc}")
    trainer = SimpleNamespace(
        strategy=strategy, precision="32-true", accumulate_grad_batches=1, gradient_clip_val=None
    )
    with pytest.raises(ValueError, match="zo_ddp"):
        ZeroOrder().setup(trainer, boring(), "fit")


def test_zo_ddp_and_one_process_pass_the_check() -> None:
    for strategy in (ZODDPStrategy(), None):
        trainer = SimpleNamespace(
            strategy=strategy, precision="32-true", accumulate_grad_batches=1, gradient_clip_val=None
        )
        ZeroOrder(lr=1e-3).setup(trainer, boring(), "fit")


# ---------------------------------------------------------------------- resume
def _checkpointed_run(tmp_path: Path, seed: int = 3, steps: int = 4) -> Path:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=steps)
    trainer = quiet_trainer(
        max_steps=steps,
        callbacks=[ZeroOrder(lr=1e-3, seed=seed), ckpt],
        enable_checkpointing=True,
        limit_val_batches=0,
    )
    trainer.fit(boring())
    return tmp_path / "last.ckpt"


def test_resuming_a_zo_checkpoint_without_the_callback_is_refused(tmp_path: Path) -> None:
    path = _checkpointed_run(tmp_path)
    module = boring()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = quiet_trainer(max_steps=8, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="zeroth-order checkpoint .*ZeroOrder"):
        trainer.fit(module, ckpt_path=path)
    # it stopped before the first first-order update (the weights are the checkpoint's)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert torch.equal(module.layer.weight, state["layer.weight"])
    assert not torch.equal(module.layer.weight, before[0])
    # and weights-only is the documented way to go first-order from it
    fresh = BoringModel.load_from_checkpoint(path)
    quiet_trainer(max_steps=2, limit_val_batches=0).fit(fresh)


def test_resume_with_another_seed_warns_once_and_keeps_the_checkpoint_seed(tmp_path: Path) -> None:
    path = _checkpointed_run(tmp_path, seed=3)
    trainer = quiet_trainer(max_steps=6, callbacks=[ZeroOrder(lr=1e-3, seed=5)], limit_val_batches=0)
    with pytest.warns(UserWarning) as record:
        trainer.fit(boring(), ckpt_path=path)
    seed_lines = [str(w.message) for w in record if "seed" in str(w.message)]
    assert len(seed_lines) == 1 and "\n" not in seed_lines[0]
    assert "seed=5" in seed_lines[0] and "uses seed 3" in seed_lines[0]
    assert trainer.optimizers[0].seed == 3 and trainer.optimizers[0].zo_step == 6


def test_resume_with_the_same_seed_is_silent(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    path = _checkpointed_run(tmp_path, seed=3)
    quiet_trainer(max_steps=6, callbacks=[ZeroOrder(lr=1e-3, seed=3)], limit_val_batches=0).fit(
        boring(), ckpt_path=path
    )
    assert not [w for w in recwarn if "seed" in str(w.message)]


# ---------------------------------------------------------------------- lr and weight decay
def test_no_lr_warns_with_the_zo_range(caplog: pytest.LogCaptureFixture) -> None:
    trainer = quiet_trainer(max_steps=2, callbacks=[ZeroOrder()], limit_val_batches=0)
    with pytest.warns(
        UserWarning, match=r"lr 0.1 is used .*1e-7..1e-6 for full-parameter tuning .*1e-4..1e-3 for LoRA"
    ):
        trainer.fit(boring())


@pytest.mark.parametrize("kind", ["gpt2", "opt", "bert"])
def test_adamw_on_all_parameters_gets_mezo_weight_decay(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    module = HFModule(kind)
    with caplog.at_level(logging.INFO):
        trainer = quiet_trainer(max_steps=1, callbacks=[ZeroOrder(lr=1e-4)], limit_val_batches=0)
        trainer.fit(module, token_loader())
    decayed, plain = trainer.optimizers[0].param_groups
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    names = dict((p, n) for n, p in module.named_parameters())
    assert all(p.ndim == 2 and not is_no_decay(names[p], p) for p in decayed["params"])
    assert all(is_no_decay(names[p], p) for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(module.parameters()))
    norms = [n for n in names.values() if "norm" in n.lower() or ".ln_" in n]
    assert norms and all(any(names[p] == n for p in plain["params"]) for n in norms)
    (line,) = [r.getMessage() for r in caplog.records if "inherited from AdamW" in r.getMessage()]
    assert f"weight decay on {len(decayed['params'])} tensors, none on {len(plain['params'])}" in line
    assert "split off" in line and "\n" not in line


def test_user_separated_groups_are_kept(caplog: pytest.LogCaptureFixture) -> None:
    module = HFModule("gpt2")
    decay = [p for n, p in module.named_parameters() if not is_no_decay(n, p)]
    rest = [p for n, p in module.named_parameters() if is_no_decay(n, p)]
    # the user's own split: even 2-D embeddings undecayed, as some recipes do
    wte = module.model.transformer.wte.weight
    groups = [
        {"params": [p for p in decay if p is not wte], "weight_decay": 0.1},
        {"params": [*rest, wte], "weight_decay": 0.0},
    ]
    module.configure_optimizers = lambda: torch.optim.AdamW(groups, lr=1e-3)
    trainer = quiet_trainer(max_steps=1, callbacks=[ZeroOrder(lr=1e-4)], limit_val_batches=0)
    trainer.fit(module, token_loader())
    got = trainer.optimizers[0].param_groups
    assert [g["weight_decay"] for g in got] == [0.1, 0.0]
    assert any(p is wte for p in got[1]["params"])


# ---------------------------------------------------------------------- manual optimization
class ManualRegression(PlainRegression):
    """Manual optimization, stepping through a closure that returns the loss (the supported pattern)."""

    def __init__(self, with_closure: bool = True) -> None:
        super().__init__(with_scheduler=False)
        self.automatic_optimization = False
        self.with_closure = with_closure

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss_of = lambda: nn.functional.mse_loss(self.net(x), y)  # noqa: E731
        if self.with_closure:
            loss = opt.step(closure=loss_of)
        else:  # the first-order pattern: backward, then step without a closure
            loss = loss_of()
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()
        self.losses.append(float(loss))


def test_manual_optimization_with_a_closure_trains() -> None:
    torch.manual_seed(0)
    module = ManualRegression()
    trainer = quiet_trainer(
        max_steps=120, callbacks=[ZeroOrder(lr=0.05, queries=2, seed=1)], limit_val_batches=0
    )
    trainer.fit(module, regression_loader())
    assert trainer.global_step == 120 and trainer.optimizers[0].zo_step == 120
    first, last = sum(module.losses[:16]) / 16, sum(module.losses[-16:]) / 16
    assert last < 0.7 * first
    assert all(p.grad is None for p in module.parameters())


def test_manual_optimization_without_a_closure_names_the_pattern() -> None:
    torch.manual_seed(0)
    trainer = quiet_trainer(max_steps=2, callbacks=[ZeroOrder(lr=0.05)], limit_val_batches=0)
    with pytest.raises(ValueError, match=r"opt\.step\(closure=lambda: self\.loss\(batch\)\)"):
        trainer.fit(ManualRegression(with_closure=False), regression_loader())


# ---------------------------------------------------------------------- QZO: a user's own 4-bit module
class OwnQuantized(pl.LightningModule):
    """A user's own module quantized with ``quantize_linear_4bit_`` (no on_load_checkpoint of its own)."""

    def __init__(self) -> None:
        super().__init__()
        from lightning_zobi.quant import quantize_linear_4bit_

        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
        quantize_linear_4bit_(self.net, skip=None)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def _quant_loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=gen)
    return DataLoader(TensorDataset(x, x[:, :1].sin()), batch_size=32)


def test_qzo_resumes_a_users_own_4bit_module(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from lightning_zobi import QZO

    def fit(steps: int, root: Path, ckpt_path: Path | None = None) -> OwnQuantized:
        module = OwnQuantized()
        trainer = quiet_trainer(
            max_steps=steps,
            callbacks=[QZO(lr=1e-2, seed=2)],
            enable_checkpointing=True,
            default_root_dir=root,
        )
        trainer.fit(module, _quant_loader(), ckpt_path=ckpt_path)
        return module

    def absmax(module: nn.Module) -> list[torch.Tensor]:
        return [m.weight.quant_state.absmax.clone() for m in module.net if hasattr(m, "weight")]

    fit(2, tmp_path / "a")
    (ckpt,) = (tmp_path / "a").rglob("*.ckpt")
    resumed = fit(
        4, tmp_path / "b", ckpt_path=ckpt
    )  # failed with Unexpected key(s) "net.0.weight.absmax", ...
    straight = fit(4, tmp_path / "c")
    for a, b, c in zip(absmax(resumed), absmax(straight), absmax(OwnQuantized()), strict=True):
        assert torch.equal(a, b) and not torch.equal(a, c)  # trained, and resumed exactly
    assert "on_load_checkpoint" not in vars(resumed)  # the callback's wrapper was removed


# ---------------------------------------------------------------------- gradient clipping
class Recorder(pl.Callback):
    """Collects each step's projected gradients (after any clamp) and, optionally, pins the direction."""

    def __init__(self, pin_step: bool = False) -> None:
        self.grads: list[float] = []
        self.pin_step = pin_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.pin_step:  # the same direction every step (with lr = 0: the same θ too)
            trainer.optimizers[0].zo_step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.grads.extend(trainer.optimizers[0].last_estimate.projected_grads)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clip_val_clamps_the_projected_gradient(algorithm: str, plain_module) -> None:
    free, clipped = Recorder(), Recorder()
    quiet_trainer(max_steps=10, callbacks=[ZeroOrder(lr=0.02, seed=1), free], limit_val_batches=0).fit(
        plain_module, regression_loader()
    )
    torch.manual_seed(0)
    module = PlainRegression()
    zo = ZeroOrder(lr=0.02, seed=1)
    trainer = quiet_trainer(
        max_steps=10,
        callbacks=[zo, clipped],
        gradient_clip_val=0.05,
        gradient_clip_algorithm=algorithm,
        limit_val_batches=0,
    )
    trainer.fit(module, regression_loader())
    assert trainer.optimizers[0].projected_grad_clip == 0.05
    assert max(abs(g) for g in free.grads) > 0.05  # the bound bites ...
    assert all(-0.05 <= g <= 0.05 for g in clipped.grads)  # ... and holds
    assert trainer.gradient_clip_val == 0.05 and trainer.gradient_clip_algorithm == algorithm  # restored


def test_gradient_clip_val_tightens_qzo_clip() -> None:
    pytest.importorskip("bitsandbytes")
    from lightning_zobi import QZO

    trainer = quiet_trainer(max_steps=1, callbacks=[QZO(lr=1e-2, clip=100.0)], gradient_clip_val=0.5)
    trainer.fit(OwnQuantized(), _quant_loader())
    assert trainer.optimizers[0].clip == 0.5


# ---------------------------------------------------------------------- the core's options through the callback
def test_core_options_reach_the_rule_and_the_module_is_attached(plain_module) -> None:
    zo = ZeroOrder(
        lr=0.02, forward_mode="eval", rng="independent", perturbation="inplace", stochastic_rounding=False
    )
    trainer = quiet_trainer(max_steps=2, callbacks=[zo], limit_val_batches=0)
    trainer.fit(plain_module, regression_loader())
    opt = trainer.optimizers[0]
    assert (opt.forward_mode, opt.rng, opt.perturbation, opt.stochastic_rounding) == (
        "eval",
        "independent",
        "inplace",
        False,
    )
    assert opt.module is plain_module
    assert plain_module.training  # eval mode only inside the ZO forwards
    with pytest.raises(ValueError, match="rng='same'"):
        ZeroOrder(rng="same")


def _gpt2_g_at_a_fixed_direction(rng: str, steps: int = 16, global_seed: int = 0, **kwargs) -> list[float]:
    """g of the step-0 direction at the initial θ (lr = 0), once per batch, fresh dropout draws each step."""
    module = HFModule("gpt2")
    rec = Recorder(pin_step=True)
    torch.manual_seed(global_seed)
    trainer = quiet_trainer(
        max_steps=steps,
        callbacks=[ZeroOrder(lr=0.0, seed=4, rng=rng, **kwargs), rec],
        limit_val_batches=0,
    )
    trainer.fit(module, _same_batch(steps))
    return rec.grads


def _same_batch(steps: int) -> DataLoader:
    ids, labels = next(iter(token_loader(n=8, batch_size=8)))
    return DataLoader(TensorDataset(ids.repeat(steps, 1), labels.repeat(steps)), batch_size=8)


def test_shared_rng_makes_the_projected_gradient_the_directional_derivative_of_one_draw() -> None:
    shared = _gpt2_g_at_a_fixed_direction("shared")
    again = _gpt2_g_at_a_fixed_direction("shared")
    independent = _gpt2_g_at_a_fixed_direction("independent")
    evaluated = _gpt2_g_at_a_fixed_direction("shared", forward_mode="eval")
    assert shared == again  # same step, seed and draws: bit-identical estimates
    assert len(set(evaluated)) == 1  # eval-mode forwards: no draw at all, one value
    spread = lambda g: torch.tensor(g).std().item()  # noqa: E731
    # GPT-2 at its default dropout 0.1: fresh masks per step move g a little with shared draws;
    # independent ± masks add (L(mask1) − L(mask2)) / 2ε, which swamps it
    assert spread(independent) > 4 * spread(shared), (spread(shared), spread(independent))
    assert abs(sum(shared) / len(shared) - evaluated[0]) < 0.5 * abs(evaluated[0])


def _gpt2_top_block_fit(rng: str, steps: int = 300) -> tuple[float, float]:
    """Eval-mode loss before/after ZO on GPT-2's top block (dropout 0.1 during training), same seeds."""
    module = HFModule("gpt2")
    ids, _ = next(iter(token_loader(n=8, batch_size=8)))

    def eval_loss() -> float:
        module.eval()
        with torch.no_grad():
            loss = module.model(input_ids=ids, labels=ids).loss.item()
        module.train()  # Lightning keeps the mode it finds: train with dropout on
        return loss

    before = eval_loss()
    torch.manual_seed(0)
    trainer = quiet_trainer(
        max_steps=steps,
        callbacks=[ZeroOrder(lr=1e-2, seed=0, params=r"\.h\.1\.", rng=rng)],
        limit_val_batches=0,
    )
    trainer.fit(module, _same_batch(steps))
    return before, eval_loss()


def test_gpt2_with_default_dropout_learns_with_shared_rng_and_not_with_independent() -> None:
    before, shared = _gpt2_top_block_fit("shared")
    _, independent = _gpt2_top_block_fit("independent")
    assert before - shared > 0.1, (before, shared)
    assert before - independent < 0.3 * (before - shared), (before, shared, independent)


# ---------------------------------------------------------------------- precision
class Bf16Regression(PlainRegression):
    """A user's small module trained in bf16 weights (precision="bf16-true")."""


@pytest.mark.parametrize("perturbation", ["exact", "inplace"])
def test_bf16_true_module_lr0_is_bit_identical_only_with_exact_perturbation(perturbation: str) -> None:
    torch.manual_seed(0)
    module = Bf16Regression(with_scheduler=False)
    trainer = quiet_trainer(
        max_steps=50,
        precision="bf16-true",
        limit_val_batches=0,
        callbacks=[ZeroOrder(lr=0.0, eps=1e-2, perturbation=perturbation)],
    )
    before = None

    class Snap(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            nonlocal before
            before = [p.detach().clone() for p in pl_module.parameters()]

    trainer.callbacks.append(Snap())
    trainer.fit(module, regression_loader())
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    same = all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert same == (perturbation == "exact")  # in-place ±εz rounds in bf16: the weights random-walk


@pytest.mark.parametrize("perturbation", ["inplace", "exact"])
def test_demo_transformer_eval_mode_forwards_see_no_dropout(perturbation: str) -> None:
    """Lightning's demo ``LightningTransformer`` (dropout 0.2): forward_mode="eval" as MeZO, train mode kept outside."""
    from lightning.pytorch.demos.transformer import LightningTransformer

    class OfflineTransformer(LightningTransformer):
        def prepare_data(self) -> None:  # the demo downloads WikiText-2; random tokens do here
            pass

    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 64, (1, 8, 12), generator=gen).repeat(6, 1, 1)
    data = DataLoader(TensorDataset(inputs, inputs.roll(-1, dims=-1)), batch_size=None)
    grads = {}
    for mode in ("train", "eval"):
        torch.manual_seed(0)
        module = OfflineTransformer(vocab_size=64)
        rec = Recorder(pin_step=True)
        zo = ZeroOrder(lr=0.0, forward_mode=mode, perturbation=perturbation)
        trainer = quiet_trainer(max_steps=6, callbacks=[zo, rec], limit_val_batches=0)
        trainer.fit(module, data)
        assert module.training and all(m.training for m in module.modules())
        grads[mode] = torch.tensor(rec.grads)
    # reference: the directional derivative with dropout off, by plain in-place central differences
    torch.manual_seed(0)
    reference = OfflineTransformer(vocab_size=64).eval()
    opt = build_optimizer(
        "zo_sgd", reference.parameters(), lr=0.0, perturbation="inplace", rng="independent", seed=0
    )
    x, y = inputs[0], inputs[0].roll(-1, dims=-1)
    opt.step(lambda: reference.training_step((x, y), 0))
    g = opt.last_estimate.projected_grads[0]
    # eval-mode forwards: no dropout draw, the same g at the same θ and z, and the right one
    torch.testing.assert_close(grads["eval"], torch.full_like(grads["eval"], g), rtol=2e-3, atol=2e-3)
    assert grads["train"].std() > 10 * grads["eval"].std()  # train mode: a fresh (shared) draw per step
