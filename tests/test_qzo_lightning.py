"""QZO through Lightning: the callback on 4-bit causal-LM and diffusion modules, recipes, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

bnb = pytest.importorskip("bitsandbytes")

from conftest import quiet_trainer  # noqa: E402

from lightning_zobi.cli import main  # noqa: E402
from lightning_zobi.lightning.callbacks.qzo import QZO  # noqa: E402
from lightning_zobi.lightning.datamodules.facts import FactsDataModule  # noqa: E402
from lightning_zobi.lightning.modules.quantized import (  # noqa: E402
    TINY_UNET,
    QuantizedCausalLMModule,
    QuantizedDenoiserModule,
)
from lightning_zobi.quant import QZOOptimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SMALL_LLAMA = dict(
    model_type="llama",
    vocab_size=259,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    initializer_range=0.1,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=1,
)

SMALL_UNET = {**TINY_UNET, "sample_size": 8, "block_out_channels": (16, 32), "cross_attention_dim": 16}
"""The module's tiny denoiser at half the width (8×8 digits), for fast tests."""


def snapshot(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(4-bit codes per layer, every ordinary float parameter), cloned."""
    codes = {n: m.weight.data.clone() for n, m in module.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    floats = {n: p.detach().clone() for n, p in module.named_parameters() if p.dtype.is_floating_point}
    return codes, floats


def assert_only_scales_changed(module: torch.nn.Module, before: tuple[dict, dict]) -> None:
    codes, floats = before
    now_codes, now_floats = snapshot(module)
    assert codes.keys() == now_codes.keys() and codes
    for name in codes:
        assert torch.equal(codes[name], now_codes[name]), f"codes of {name} changed"
    for name in floats:
        assert torch.equal(floats[name], now_floats[name]), f"{name} changed"


def test_qzo_callback_fine_tunes_a_4bit_causal_lm_through_its_scales() -> None:
    torch.manual_seed(0)
    module = QuantizedCausalLMModule(model=SMALL_LLAMA, double_quant=True)
    data = FactsDataModule(num_people=10, batch_size=8, max_length=64)
    callback = QZO(lr=5e-2, eps=1e-3)
    trainer = quiet_trainer(max_steps=15, callbacks=[callback], limit_val_batches=1)
    before = snapshot(module)
    val0 = trainer.validate(module, datamodule=data, verbose=False)[0]["val_loss"]
    trainer.fit(module, datamodule=data)
    logged = dict(trainer.callback_metrics)
    val1 = trainer.validate(module, datamodule=data, verbose=False)[0]["val_loss"]

    (opt,) = trainer.optimizers
    assert isinstance(opt, QZOOptimizer) and opt.zo_step == 15
    layers = [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]
    held = {id(p) for p in opt._params()}
    assert held == {
        id(m.weight.quant_state.absmax) for m in layers
    }  # the scales, un-nested, are the parameters
    assert all(m.weight.quant_state.absmax.dtype == torch.float32 for m in layers)
    assert_only_scales_changed(module, before)
    assert val1 < val0 - 0.08, (val0, val1)
    for key in ("qzo/clip_fraction", "qzo/clipped", "qzo/raw_projected_grad", "zo/projected_grad"):
        assert key in logged, key
    assert float(logged["qzo/clip_fraction"]) == 0.0  # |d| stays far below the default C = 100


def test_qzo_callback_clips_and_logs_how_often() -> None:
    module = QuantizedCausalLMModule(model=SMALL_LLAMA)
    data = FactsDataModule(num_people=10, batch_size=8, max_length=64)
    callback = QZO(lr=1e-2, eps=1e-3, clip=1e-6)
    trainer = quiet_trainer(max_steps=3, callbacks=[callback], limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    (opt,) = trainer.optimizers
    assert opt.clipped_total == 3 and opt.queries_total == 3
    assert float(trainer.callback_metrics["qzo/clip_fraction"]) == 1.0
    assert float(trainer.callback_metrics["qzo/clipped"]) == 1.0


def test_qzo_callback_on_the_fused_path() -> None:
    """``QZO(fused=True)``: the fused optimizer (Triton's interpreter on CPU) trains the same scales only."""
    pytest.importorskip("triton")
    from lightning_zobi.quant.qzo_fused import FusedQZOOptimizer

    torch.manual_seed(0)
    module = QuantizedCausalLMModule(model=SMALL_LLAMA, double_quant=True)
    data = FactsDataModule(num_people=10, batch_size=8, max_length=64)
    trainer = quiet_trainer(max_steps=4, callbacks=[QZO(lr=5e-2, eps=1e-3, fused=True)], limit_val_batches=0)
    before = snapshot(module)
    scales0 = [
        m.weight.quant_state.absmax.clone() for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)
    ]
    trainer.fit(module, datamodule=data)
    (opt,) = trainer.optimizers
    assert isinstance(opt, FusedQZOOptimizer) and opt.zo_step == 4 and not opt.perturbed
    scales1 = [m.weight.quant_state.absmax for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(not torch.equal(a, b) for a, b in zip(scales0, scales1, strict=True))
    assert min(float(s.min()) for s in scales1) >= 0.0
    assert_only_scales_changed(module, before)
    assert "qzo/clip_fraction" in trainer.callback_metrics


def test_qzo_on_a_module_without_quantized_layers_fails_clearly(plain_module) -> None:
    from conftest import regression_loader

    trainer = quiet_trainer(max_steps=1, callbacks=[QZO()])
    with pytest.raises(ValueError, match="No quantized layer"):
        trainer.fit(plain_module, train_dataloaders=regression_loader())


def test_qzo_fine_tunes_a_4bit_diffusion_unet_on_the_denoising_loss() -> None:
    module = QuantizedDenoiserModule(unet=SMALL_UNET, num_images=64, batch_size=16)
    n_linear = sum(isinstance(m, bnb.nn.Linear4bit) for m in module.unet.modules())
    assert n_linear > 10
    images, labels = next(iter(module.val_dataloader()))

    def fixed_loss() -> float:
        with torch.no_grad():
            return module.denoising_loss(images, labels, torch.Generator().manual_seed(123)).item()

    # the two forwards of one ZO step see the same noise and timesteps
    gen = module._generator(0, 0)
    again = module._generator(0, 0)
    assert torch.equal(torch.randn(4, generator=gen), torch.randn(4, generator=again))

    before = snapshot(module)
    loss0 = fixed_loss()
    trainer = quiet_trainer(max_steps=25, callbacks=[QZO(lr=0.2, eps=1e-3)], limit_val_batches=0)
    trainer.fit(module)
    loss1 = fixed_loss()
    assert loss1 < loss0 - 0.03, (loss0, loss1)
    assert_only_scales_changed(module, before)


def test_local_checkpoints_load_as_4bit(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    from lightning_zobi.lightning.modules.causal_lm import build_causal_lm

    build_causal_lm(SMALL_LLAMA).save_pretrained(tmp_path / "llm")
    lm = QuantizedCausalLMModule(model=str(tmp_path / "llm"))  # transformers' BitsAndBytesConfig path
    layers = [m for m in lm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 and not any(m.support_avx512bf16_for_cpu for m in layers)

    UNet2DConditionModel(**SMALL_UNET).save_pretrained(tmp_path / "pipe" / "unet")
    den = QuantizedDenoiserModule(unet=str(tmp_path / "pipe"), subfolder="unet")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in den.unet.modules()) > 10
    with pytest.raises(ValueError, match="not a local directory"):
        QuantizedDenoiserModule(unet=str(tmp_path / "missing"))


@pytest.mark.parametrize("recipe", ["qzo/llm.yaml", "qzo/diffusion.yaml"])
def test_qzo_recipes_run_and_checkpoint(recipe: str, tmp_path: Path) -> None:
    main(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / recipe),
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.val_check_interval=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    # the recipe's own checkpoint and zobi's last.ckpt (a link to the latest) hold the same step
    ckpts = sorted(tmp_path.rglob("*.ckpt"))
    assert ckpts and any(p.name == "last.ckpt" for p in ckpts)
    ckpt = next(p for p in ckpts if p.name == "last.ckpt")
    state = torch.load(ckpt, weights_only=True)
    (opt_state,) = state["optimizer_states"]
    assert opt_state["zo"]["step"] == 2 and opt_state["qzo"]["queries_total"] == 2
    assert any(k.endswith(".weight.absmax") for k in state["state_dict"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_diffusers_bitsandbytes_config_path_on_gpu(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(**SMALL_UNET).save_pretrained(tmp_path / "unet")
    den = QuantizedDenoiserModule(unet=str(tmp_path / "unet"))
    layers = [m for m in den.unet.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" for m in layers)


def test_checkpoint_restores_trained_scales_and_resume_continues(tmp_path: Path) -> None:
    def run(max_steps: int, ckpt_path: str | None = None, root: Path = tmp_path) -> QuantizedCausalLMModule:
        module = QuantizedCausalLMModule(model=SMALL_LLAMA, double_quant=True)
        dataset = FactsDataModule(num_people=10, max_length=64).train_dataloader().dataset
        # a fixed batch order: ZO's loss difference resolves float32 rounding, so even the order of
        # the summands inside a batch would show in the scales
        loader = DataLoader(dataset, batch_size=len(dataset), shuffle=False)  # one batch per epoch
        trainer = quiet_trainer(
            max_steps=max_steps,
            callbacks=[QZO(lr=5e-2, eps=1e-3, seed=1)],
            limit_val_batches=0,
            enable_checkpointing=True,
            default_root_dir=root,
        )
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
        return module

    def scales(module: torch.nn.Module) -> list[torch.Tensor]:
        return [m.weight.quant_state.absmax for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]

    first = run(2, root=tmp_path / "a")
    (ckpt,) = list((tmp_path / "a").rglob("*.ckpt"))
    fresh = QuantizedCausalLMModule(model=SMALL_LLAMA, double_quant=True)
    state = torch.load(ckpt, weights_only=True)
    fresh.on_load_checkpoint(state)
    fresh.load_state_dict(state["state_dict"])  # strict: every saved key was consumed
    for a, b in zip(scales(first), scales(fresh), strict=True):
        assert torch.equal(a, b)

    resumed = run(4, ckpt_path=str(ckpt), root=tmp_path / "b")
    straight = run(4, root=tmp_path / "c")
    for a, b in zip(scales(resumed), scales(straight), strict=True):
        assert torch.equal(a, b)  # seeds + step counter in the checkpoint: the resumed run is the same run
