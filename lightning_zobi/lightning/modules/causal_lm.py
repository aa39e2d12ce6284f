"""``CausalLMModule``: a `transformers` causal LM as a LightningModule, optionally with a peft LoRA adapter."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

TINY_MODELS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        model_type="llama",
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
    ),
    "tiny-opt": dict(
        model_type="opt",
        vocab_size=259,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    ),
}
"""Configs of tiny models built offline; vocab 259 matches the byte-level tokenizer ("bytes")."""


def build_causal_lm(model: str | dict[str, Any], dtype: str | None = None, seed: int = 0) -> PreTrainedModel:
    """A causal LM from a tiny preset name, a config dict (``model_type`` + fields) or a local path.

    Local paths go through ``from_pretrained`` (no ``trust_remote_code``); configs build random
    weights deterministically from ``seed``.
    """
    torch_dtype = getattr(torch, dtype) if dtype else None
    if isinstance(model, str) and model in TINY_MODELS:
        model = TINY_MODELS[model]
    if isinstance(model, dict):
        fields = dict(model)
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise ValueError(
                f"model={model!r} is a config dict without 'model_type' (e.g. 'llama' or 'opt')."
            )
        config = AutoConfig.for_model(model_type, **fields)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    if not os.path.isdir(model):
        raise ValueError(
            f"model={model!r} is neither a tiny preset ({sorted(TINY_MODELS)}), a config dict, nor an existing "
            "local directory. Download the checkpoint first and pass its local path (no hub access at run time)."
        )
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)


def add_lora(
    model: nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str] | None
) -> nn.Module:
    """Wrap ``model`` in a peft LoRA adapter; only the adapter's parameters then require grad."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or ["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def add_ia3(model: nn.Module, target_modules: list[str] | None = None) -> nn.Module:
    """Wrap ``model`` in a peft IA3 adapter (Liu et al., arXiv 2205.05638); only its scales require grad.

    IA3 learns one scale per feature: the input of the MLP's down projection and the outputs of the
    key/value projections (peft's per-architecture defaults when ``target_modules`` is None; of
    given targets, those peft lists as the architecture's feed-forward modules scale their input).
    A few thousand numbers even on a large model, which is what a zeroth-order estimate wants: its
    variance grows with the number of perturbed parameters. ``merge_and_unload()`` folds the scales
    back into the weights.
    """
    from peft import IA3Config, get_peft_model
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD

    feedforward = None
    if target_modules is not None:
        known = FEEDFORWARD.get(getattr(getattr(model, "config", None), "model_type", ""), [])
        feedforward = [m for m in target_modules if m in known]
    config = IA3Config(target_modules=target_modules, feedforward_modules=feedforward, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def add_adapter(
    model: nn.Module,
    lora_r: int = 0,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    lora_target_modules: list[str] | None = None,
    ia3: bool = False,
    ia3_target_modules: list[str] | None = None,
) -> nn.Module:
    """The one adapter the arguments ask for (LoRA if ``lora_r > 0``, IA3 if ``ia3``), or ``model`` itself."""
    if lora_r > 0 and ia3:
        raise ValueError(
            f"lora_r={lora_r} and ia3=True both ask for an adapter: choose one (lora_r=0 for IA3, ia3=False for LoRA)."
        )
    if lora_r > 0:
        return add_lora(model, lora_r, lora_alpha, lora_dropout, lora_target_modules)
    if ia3:
        return add_ia3(model, ia3_target_modules)
    return model


class CausalLMModule(pl.LightningModule):
    """Fine-tune a causal LM on batches with ``input_ids``, ``attention_mask`` and ``labels``.

    A plain first-order module: add ``ZeroOrder`` to the trainer's callbacks to train it with
    forward passes only. ``training_step`` returns the mean token loss of the labelled tokens.

    Args:
        model: a tiny preset ("tiny-llama", "tiny-opt"), a config dict, or a local checkpoint path.
        lr, weight_decay: AdamW hyperparameters (ZeroOrder carries them over unless it sets lr).
        warmup_steps: linear warm-up steps of the LR schedule (0: constant rate).
        decay_steps: if > 0, the rate then decays linearly to 0 at this step (a full-training schedule).
        lora_r: LoRA rank (0 = no adapter, full-parameter training).
        lora_alpha, lora_dropout, lora_target_modules: peft LoRA settings.
        ia3: train a peft IA3 adapter (one scale per feature) instead; ia3_target_modules: its
            targets (None: peft's defaults for the architecture).
        dtype: weights dtype ("bfloat16", "float32"); None keeps the default.
        seed: weight seed for models built from a config.
    """

    def __init__(
        self,
        model: str | dict[str, Any] = "tiny-llama",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        decay_steps: int = 0,
        lora_r: int = 0,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        ia3: bool = False,
        ia3_target_modules: list[str] | None = None,
        dtype: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        net = build_causal_lm(model, dtype=dtype, seed=seed)
        self.model = add_adapter(
            net, lora_r, lora_alpha, lora_dropout, lora_target_modules, ia3, ia3_target_modules
        )

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self.model(**batch).loss
        self.log("val_loss", loss, prog_bar=True)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup, decay = self.hparams.warmup_steps, self.hparams.get("decay_steps", 0)
        if not warmup and not decay:
            return optimizer

        def factor(step: int) -> float:
            rate = min(1.0, (step + 1) / warmup) if warmup else 1.0
            return rate * max(0.0, 1.0 - step / decay) if decay else rate

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
