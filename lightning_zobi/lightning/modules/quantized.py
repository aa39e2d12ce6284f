"""4-bit (bitsandbytes) LightningModules for QZO: a causal LM and a text-conditioned diffusion denoiser.

Both quantize their linear layers with bitsandbytes 4-bit, either while loading a local
checkpoint (``from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))``,
transformers' and diffusers' own path) or, for a model built from a config in memory, with
:func:`lightning_zobi.quant.quantize_linear_4bit_` (the same ``Linear4bit`` layers). Train them
with the :class:`~lightning_zobi.lightning.callbacks.qzo.QZO` callback: "Fine-tuning Quantized
Neural Networks with Zeroth-order Optimization" (Shang et al., arXiv 2505.13430).

Memory: 0.5 byte per quantized weight plus its absmax scale (4 bytes per 64 weights without
double quantization); embeddings, norms, convolutions and ``lm_head`` stay in their dtype.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_zobi.lightning.modules.causal_lm import CausalLMModule
from lightning_zobi.quant.convert import keep_cpu_layout_, load_4bit_state_, quantize_linear_4bit_
from lightning_zobi.zo.directions import derive_seed

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str | None, arg: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"{arg}={name!r} is invalid: choose one of {sorted(_DTYPES)} or None.")
    return _DTYPES[name]


def _bnb_4bit_kwargs(quant_type: str, double_quant: bool, compute: torch.dtype) -> dict[str, Any]:
    """Arguments of a 4-bit ``BitsAndBytesConfig`` (transformers' and diffusers' take the same ones)."""
    return dict(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute,
    )


class QuantizedCausalLMModule(CausalLMModule):
    """A causal LM whose linear layers are bitsandbytes 4-bit (QLoRA's nf4 by default), for QZO.

    ``model`` is a tiny preset / config dict (built in memory, then quantized) or a local
    checkpoint directory (loaded with transformers' ``BitsAndBytesConfig(load_in_4bit=True)``).
    ``training_step``, ``validation_step`` and ``configure_optimizers`` are ``CausalLMModule``'s;
    under the ``QZO`` callback the optimizer only lends its learning rate.

    Args:
        model: tiny preset name, config dict, or local checkpoint path.
        lr, weight_decay, warmup_steps: as for ``CausalLMModule``.
        quant_type: ``"nf4"`` or ``"fp4"``.
        double_quant: double-quantize absmax (``compress_statistics``); QZO un-nests it at set-up.
        compute_dtype: dtype of the 4-bit matmuls (``"float32"``, ``"bfloat16"``); None: the weights'.
        skip_modules: regex of linear layers left unquantized (default ``lm_head``), for in-memory models.
        dtype: dtype of the unquantized parts.
        seed: weight seed for models built from a config.
    """

    def __init__(
        self,
        model: str | dict[str, Any] = "tiny-llama",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        quant_type: str = "nf4",
        double_quant: bool = False,
        compute_dtype: str | None = "float32",
        skip_modules: str | None = r"(^|\.)lm_head$",
        dtype: str | None = None,
        seed: int = 0,
    ) -> None:
        compute = _dtype(compute_dtype, "compute_dtype")
        if isinstance(model, str) and os.path.isdir(model):
            # Quantize while loading (no full-precision copy): transformers' BitsAndBytesConfig path.
            pl.LightningModule.__init__(self)
            self.save_hyperparameters()
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            config = BitsAndBytesConfig(
                **_bnb_4bit_kwargs(quant_type, double_quant, compute or torch.float32)
            )
            self.model = AutoModelForCausalLM.from_pretrained(
                model, quantization_config=config, dtype=_dtype(dtype, "dtype")
            )
            keep_cpu_layout_(self.model)
        else:
            super().__init__(
                model=model,
                lr=lr,
                weight_decay=weight_decay,
                warmup_steps=warmup_steps,
                dtype=dtype,
                seed=seed,
            )
            self.save_hyperparameters()
            quantize_linear_4bit_(
                self.model,
                skip=skip_modules,
                quant_type=quant_type,
                compress_statistics=double_quant,
                compute_dtype=compute,
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the trained 4-bit scales, which ``Linear4bit`` cannot load itself (see ``load_4bit_state_``)."""
        load_4bit_state_(self, checkpoint["state_dict"])


TINY_UNET: dict[str, Any] = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
"""A tiny ``UNet2DConditionModel`` (16×16, 1 channel, cross-attention on 32-d embeddings), as diffusers' tests build."""


def digits_images(size: int = 16, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """scikit-learn's 8×8 digits (shipped offline) as ``[-1, 1]`` images of ``size``² and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images * 2.0 - 1.0, labels


class QuantizedDenoiserModule(pl.LightningModule):
    """A diffusers ``UNet2DConditionModel`` with 4-bit linear layers, trained on the DDPM denoising loss.

    The UNet is the Stable Diffusion denoiser architecture (text-conditioned through
    cross-attention): a tiny one from a config dict for CPU runs, or a local checkpoint (its
    ``subfolder``, e.g. ``"unet"`` of an SD pipeline folder) loaded with diffusers'
    ``BitsAndBytesConfig(load_in_4bit=True)`` on a GPU — diffusers' quantizer requires one, so
    on CPU the checkpoint is loaded and its linear layers quantized in memory instead. Its attention and feed-forward linear layers are 4-bit; convolutions
    stay in full precision. Data: scikit-learn's digits, conditioned on a fixed random embedding
    per class (stand-ins for prompt embeddings).

    The noise and timesteps of a batch are drawn from a generator seeded by ``(seed, global_step,
    batch_idx)``: a zeroth-order step evaluates the loss twice on the same batch, and both
    evaluations must see the same noise, or the loss difference would measure the noise, not the
    perturbation.

    Args:
        unet: a config dict for ``UNet2DConditionModel`` (default :data:`TINY_UNET`) or a local path.
        subfolder: subfolder of a local pipeline folder holding the UNet (e.g. ``"unet"``).
        lr: learning rate the optimizer lends to QZO.
        num_train_timesteps: DDPM schedule length.
        quant_type, double_quant, compute_dtype: bitsandbytes 4-bit settings.
        num_images, batch_size: digits used and batch size of the built-in dataloader.
        seed: weight, embedding and noise seed.
    """

    def __init__(
        self,
        unet: str | dict[str, Any] | None = None,
        subfolder: str | None = None,
        lr: float = 1e-3,
        num_train_timesteps: int = 1000,
        quant_type: str = "nf4",
        double_quant: bool = False,
        compute_dtype: str | None = "float32",
        num_images: int = 256,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from diffusers import DDPMScheduler, UNet2DConditionModel

        compute = _dtype(compute_dtype, "compute_dtype") or torch.float32
        quantized = False  # True once diffusers has loaded the UNet in 4-bit itself
        if isinstance(unet, str):
            if not os.path.isdir(unet):
                raise ValueError(
                    f"unet={unet!r} is not a local directory: pass a config dict or the local path of a "
                    "diffusers UNet (no hub access at run time)."
                )
            if torch.cuda.is_available():
                from diffusers import BitsAndBytesConfig

                config = BitsAndBytesConfig(**_bnb_4bit_kwargs(quant_type, double_quant, compute))
                self.unet = UNet2DConditionModel.from_pretrained(
                    unet, subfolder=subfolder, quantization_config=config
                )
                keep_cpu_layout_(self.unet)
                quantized = True
            else:
                # diffusers' bitsandbytes quantizer refuses to run without a GPU (0.42): load, then
                # quantize the same Linear layers in memory with bitsandbytes on the CPU (below).
                self.unet = UNet2DConditionModel.from_pretrained(unet, subfolder=subfolder)
        else:
            fields = dict(TINY_UNET if unet is None else unet)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.unet = UNet2DConditionModel(**fields)
        if not quantized:
            quantize_linear_4bit_(
                self.unet,
                skip=None,
                quant_type=quant_type,
                compress_statistics=double_quant,
                compute_dtype=compute,
            )
        cfg = self.unet.config
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("class_embeddings", torch.randn(10, 1, cfg.cross_attention_dim, generator=gen))
        self.channels = cfg.in_channels
        self.size = cfg.sample_size

    def denoising_loss(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        """DDPM ε-prediction loss: MSE between the noise added at a random timestep and the UNet's prediction."""
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (images.shape[0],), generator=generator, device=images.device)
        noisy = self.scheduler.add_noise(images, noise, t)
        cond = self.class_embeddings[labels].to(images.dtype)
        pred = self.unet(noisy, t, encoder_hidden_states=cond).sample
        return F.mse_loss(pred.float(), noise.float())

    def _generator(self, batch_idx: int, salt: int) -> torch.Generator:
        seed = derive_seed(self.hparams.seed, self.global_step, batch_idx, salt)
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = self.denoising_loss(images, labels, self._generator(batch_idx, 0))
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        gen = torch.Generator(device=self.device).manual_seed(derive_seed(self.hparams.seed, batch_idx, 1))
        self.log("val_loss", self.denoising_loss(*batch, gen), prog_bar=True)

    def _loader(self, shuffle: bool) -> DataLoader:
        images, labels = digits_images(self.size, self.hparams.num_images)
        if self.channels != 1:
            images = images.expand(-1, self.channels, -1, -1).contiguous()
        gen = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            TensorDataset(images, labels), batch_size=self.hparams.batch_size, shuffle=shuffle, generator=gen
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the trained 4-bit scales, which ``Linear4bit`` cannot load itself (see ``load_4bit_state_``)."""
        load_4bit_state_(self, checkpoint["state_dict"])
