"""Class-conditional sampling with classifier-free guidance for diffusers ``UNet2DModel`` (no pipeline has it).

diffusers' ``DDPMPipeline``/``DDIMPipeline`` do not pass ``class_labels`` to the UNet, so class-conditional
UNets need this small loop: any diffusers scheduler (DDIM by default, 20-50 steps) drives it and the
guidance follows "Classifier-Free Diffusion Guidance" (Ho & Salimans, arXiv 2207.12598):
``eps = eps(x, ∅) + s (eps(x, c) - eps(x, ∅))``, where ``∅`` is the null class the model was trained
with (labels dropped to it with some probability). Each step is one UNet forward on the doubled batch.

Memory: the latents, the doubled batch of one forward, no stored trajectory.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


@torch.no_grad()
def sample_class_conditional(
    unet: nn.Module,
    labels: Tensor,
    scheduler,
    steps: int = 25,
    guidance_scale: float = 2.0,
    null_class: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Generate one image per label; returns images in ``[-1, 1]`` of shape ``(N, C, S, S)``.

    Args:
        unet: class-conditional ``UNet2DModel`` (``num_class_embeds`` set).
        labels: int64 class per sample.
        scheduler: a diffusers scheduler (copied, so the caller's is not mutated).
        steps: denoising steps (UNet forwards).
        guidance_scale: classifier-free guidance ``s``; 1.0 (or ``null_class=None``) disables it.
        null_class: the unconditional label the model was trained with.
        generator: for the initial noise (and stochastic schedulers).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is invalid: use an int >= 1 denoising steps.")
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    param = next(unet.parameters())
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps)
    labels = labels.to(param.device)
    x = torch.randn(
        (labels.shape[0], cfg.in_channels, size, size), generator=generator, device="cpu", dtype=torch.float32
    ).to(param.device, param.dtype)
    x = x * scheduler.init_noise_sigma
    guided = null_class is not None and guidance_scale != 1.0
    cond = torch.cat([labels, torch.full_like(labels, null_class)]) if guided else labels
    was_training = unet.training
    unet.eval()
    for t in scheduler.timesteps:
        inp = torch.cat([x, x]) if guided else x
        inp = scheduler.scale_model_input(inp, t)
        eps = unet(inp, t, class_labels=cond).sample
        if guided:
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    unet.train(was_training)
    return x.float().clamp(-1, 1)
