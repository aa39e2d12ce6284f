"""Shared test fixtures: a LightningModule written without any knowledge of lightning_zobi."""

from __future__ import annotations

import os
import warnings

# Tiny models run fastest on one intra-op thread (and the suite's subprocesses inherit this)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

torch.set_num_threads(1)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu`-marked tests cleanly when CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class PlainRegression(pl.LightningModule):
    """An ordinary first-order module: linear regression with SGD and a StepLR schedule."""

    def __init__(self, lr: float = 0.05, with_scheduler: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.losses: list[float] = []
        self.loss_requires_grad: list[bool] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.loss_requires_grad.append(loss.requires_grad)
        self.losses.append(float(loss))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        if not self.hparams.with_scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def regression_loader(n: int = 256, batch_size: int = 32, seed: int = 0, shuffle: bool = False) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    w = torch.randn(8, 1, generator=gen)
    y = torch.tanh(x @ w)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def quiet_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A seeded 6 -> 12 -> 3 ReLU MLP, the ZO core's smallest test model."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).to(dtype=dtype, device=device)


def mse_closure(model: nn.Module, seed: int = 1):
    """A closure giving ``model``'s MSE on a fixed random batch (32 x 6 -> 3) in the model's dtype and device."""
    p = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=gen).to(p)
    y = torch.randn(32, 3, generator=gen).to(p)
    return lambda: nn.functional.mse_loss(model(x), y)


@pytest.fixture
def plain_module() -> PlainRegression:
    torch.manual_seed(0)
    return PlainRegression()


TINY_UNET: dict = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=[16, 32],
    layers_per_block=1,
    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    norm_num_groups=4,
    attention_head_dim=8,
    num_class_embeds=11,
)
"""A tiny class-conditional 8x8 UNet2DModel config (10 digit classes + the null class 10)."""


def tiny_unet2d() -> nn.Module:
    """`TINY_UNET` built with seed 0 (imports diffusers lazily: the suite also runs without it)."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DModel(**TINY_UNET)


def tiny_cond_unet(layers: int = 2) -> nn.Module:
    """A tiny text-conditioned ``UNet2DConditionModel`` (8x8 latents, cross-attention on 16-d), seed 0."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=layers,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=4,
    )
