"""Distillation from an unpruned teacher UNet into its pruned student, plus the plain denoising loss.

The fine-tuning recovery of a pruned diffusion model (the *lower* level of "Efficient Fine-Tuning and
Concept Suppression for Pruned Diffusion Models", Shirkavand et al., CVPR 2025, arXiv 2412.15341) is
the knowledge distillation of BK-SDM ("BK-SDM: A Lightweight, Fast, and Cheap Version of Stable
Diffusion", Kim et al., arXiv 2305.15798): on the same noisy input the student matches

* the teacher's noise prediction (output-level KD, :func:`output_distillation_loss`),
* the teacher's activations after every down block, the mid-block and every up block
  (feature-level KD, :class:`FeatureDistiller`), and
* the true noise (the DDPM denoising loss, :func:`denoising_loss`).

A channel-pruned student has narrower feature maps than its teacher, so :class:`FeatureDistiller`
maps each student feature to the teacher's width with a learnable 1x1 convolution (a FitNets
"hint" regressor, Romero et al., arXiv 1412.6550); where widths agree (block removal) it compares
them directly. Blocks the student lacks (a removed mid-block) are skipped.

Memory: one stored activation per hooked block for each of teacher and student (the teacher's under
``torch.no_grad``), and the 1x1 adapters (``C_s * C_t`` weights per block).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def denoising_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """DDPM's simple loss: mean squared error between the predicted and the true noise (or v / x0 target)."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}: "
            "the UNet's out_channels must match the noised input's channels."
        )
    return F.mse_loss(prediction.float(), target.float())


def output_distillation_loss(student_prediction: Tensor, teacher_prediction: Tensor) -> Tensor:
    """Output-level KD: MSE between student and (detached) teacher noise predictions on the same input."""
    return denoising_loss(student_prediction, teacher_prediction.detach())


def unet_feature_blocks(unet: nn.Module) -> dict[str, nn.Module]:
    """The blocks whose outputs feature KD compares: ``down.{i}``, ``mid`` (if present), ``up.{i}``."""
    blocks: dict[str, nn.Module] = {f"down.{i}": b for i, b in enumerate(unet.down_blocks)}
    if getattr(unet, "mid_block", None) is not None:
        blocks["mid"] = unet.mid_block
    blocks.update({f"up.{i}": b for i, b in enumerate(unet.up_blocks)})
    return blocks


@contextmanager
def record_features(unet: nn.Module, names: list[str] | None = None) -> Iterator[dict[str, Tensor]]:
    """Context manager: a dict that fills with the hidden-state output of each named block during forwards.

    Down blocks return ``(hidden, skips)``; only ``hidden`` is kept.
    """
    blocks = unet_feature_blocks(unet)
    store: dict[str, Tensor] = {}
    handles = []
    for name, block in blocks.items():
        if names is not None and name not in names:
            continue

        def hook(_module: nn.Module, _inputs: object, output: object, name: str = name) -> None:
            store[name] = output[0] if isinstance(output, tuple) else output

        handles.append(block.register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


class FeatureDistiller(nn.Module):
    """Feature-level KD between a teacher and a student UNet: mean over shared blocks of MSE(adapt(s), t).

    Build it once from both models (it probes one forward of each to read the feature widths and
    creates a 1x1 conv per block where the widths differ). Use :meth:`loss` with the feature dicts
    recorded by :func:`record_features` during the student's and the teacher's forwards. Its
    adapters are trainable and belong in the student's optimizer.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, forward_kwargs: dict[str, Tensor]) -> None:
        super().__init__()
        shared = [n for n in unet_feature_blocks(student) if n in unet_feature_blocks(teacher)]
        if not shared:
            raise ValueError(
                "teacher and student share no down/mid/up block names: feature KD has nothing to compare."
            )
        with torch.no_grad():
            with record_features(teacher, shared) as t_feats:
                teacher(**forward_kwargs)
            with record_features(student, shared) as s_feats:
                student(**forward_kwargs)
        self.names = shared
        self.adapters = nn.ModuleDict()
        for name in shared:
            c_s, c_t = s_feats[name].shape[1], t_feats[name].shape[1]
            if s_feats[name].shape[2:] != t_feats[name].shape[2:]:
                raise ValueError(
                    f"block {name}: student features {tuple(s_feats[name].shape)} and teacher features "
                    f"{tuple(t_feats[name].shape)} differ in resolution; feature KD needs the same spatial size."
                )
            if c_s != c_t:
                adapter = nn.Conv2d(c_s, c_t, kernel_size=1, bias=False)
                self.adapters[name.replace(".", "_")] = adapter

    def loss(self, student_features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> Tensor:
        """Mean over the shared blocks of the MSE between adapted student and detached teacher features."""
        terms = []
        for name in self.names:
            if name not in student_features or name not in teacher_features:
                raise ValueError(
                    f"feature of block {name!r} was not recorded: run both forwards inside record_features(...)."
                )
            s = student_features[name]
            key = name.replace(".", "_")
            if key in self.adapters:
                s = self.adapters[key](s.to(self.adapters[key].weight.dtype))
            terms.append(F.mse_loss(s.float(), teacher_features[name].detach().float()))
        return torch.stack(terms).mean()
