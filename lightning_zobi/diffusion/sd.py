"""Stable Diffusion parts for the text-conditioned path: tiny ones from configs (tests, smoke runs) or a local folder.

The tiny set mirrors what diffusers' own pipeline tests build (a two-stage ``UNet2DConditionModel``
with cross-attention, a two-stage ``AutoencoderKL``, a 5-layer ``CLIPTextModel`` of width 32), so
the whole SD training/sampling path runs in seconds on a CPU and without any hub download. Instead
of the hub's tiny CLIP tokenizer, :func:`word_tokenizer` builds a word-level ``tokenizers`` vocabulary
from the prompts it must cover. Real checkpoints go through :func:`load_sd_components` on a local
``StableDiffusionPipeline`` folder.

Memory: the tiny set is about 0.5 M parameters (2 MB in float32).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from lightning_zobi.data.images import DEFAULT_PROMPT_TEMPLATE, DIGIT_NAMES

SPECIAL_TOKENS = ("<bos>", "<pad>", "<eos>", "<unk>")


def word_tokenizer(texts: Iterable[str], max_length: int = 16):
    """A ``PreTrainedTokenizerFast`` with one id per whitespace-separated word of ``texts`` (ids 0-3 special).

    Ids match the tiny ``CLIPTextConfig`` (bos 0, pad 1, eos 2); unknown words map to ``<unk>``.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for text in texts:
        for word in text.lower().split():
            vocab.setdefault(word, len(vocab))
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def tiny_sd_components(
    sample_size: int = 32, seed: int = 0, prompts: Iterable[str] | None = None
) -> dict[str, Any]:
    """Randomly initialized tiny SD parts: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``.

    ``sample_size`` is the image side; the VAE halves it once (latent side ``sample_size // 2``).
    ``prompts`` (default: the ten digit prompts plus "") fixes the tokenizer's vocabulary.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if not isinstance(sample_size, int) or sample_size < 16 or sample_size % 8:
        raise ValueError(f"sample_size={sample_size!r} is invalid: use a multiple of 8 >= 16 (e.g. 32).")
    torch.manual_seed(seed)
    latent = sample_size // 2
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=64,
            max_position_embeddings=16,
        )
    )
    if prompts is None:
        prompts = [DEFAULT_PROMPT_TEMPLATE.format(name=n) for n in DIGIT_NAMES]
    tokenizer = word_tokenizer(prompts, max_length=16)
    if len(tokenizer) > text_encoder.config.vocab_size:
        raise ValueError(
            f"prompts use {len(tokenizer)} distinct words; the tiny text encoder has a vocabulary of "
            f"{text_encoder.config.vocab_size}: pass fewer distinct words."
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def load_sd_components(path: str | Path) -> dict[str, Any]:
    """The parts of a local ``StableDiffusionPipeline`` folder (``from_pretrained`` on its subfolders)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    root = Path(path)
    missing = [
        s for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (root / s).is_dir()
    ]
    if missing:
        raise ValueError(f"path={str(path)!r} is not a Stable Diffusion folder (missing {missing}).")
    return {
        "unet": UNet2DConditionModel.from_pretrained(root / "unet"),
        "vae": AutoencoderKL.from_pretrained(root / "vae"),
        "text_encoder": CLIPTextModel.from_pretrained(root / "text_encoder"),
        "tokenizer": AutoTokenizer.from_pretrained(root / "tokenizer"),
        "scheduler": DDIMScheduler.from_pretrained(root / "scheduler"),
    }


def sd_pipeline(unet, vae, text_encoder, tokenizer, scheduler):
    """A ``StableDiffusionPipeline`` around the given parts (no safety checker: tiny random models)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
