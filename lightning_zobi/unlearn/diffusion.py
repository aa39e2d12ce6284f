"""Concept-erasure losses for diffusion UNets: ESD, concept ablation, and a SalUn saliency mask.

These are the *upper*-level (suppression) losses of the one-phase objective of "Efficient Fine-Tuning
and Concept Suppression for Pruned Diffusion Models" (Shirkavand et al., CVPR 2025, arXiv 2412.15341);
any of them can be plugged in. A concept is a class label for a class-conditional ``UNet2DModel`` and
a prompt embedding for a text-conditioned ``UNet2DConditionModel``; the losses only see noise
predictions, so they are the same for both.

* ESD, "Erasing Concepts from Diffusion Models" (Gandikota et al., ICCV 2023, arXiv 2303.07345):
  the student's prediction for the concept is pulled towards a frozen model's *negatively guided*
  prediction ``eps(x_t, ∅) - η (eps(x_t, c) - eps(x_t, ∅))``, so sampling with ``c`` moves away from
  ``c``. ESD-u trains the non-cross-attention weights (erases the concept everywhere), ESD-x only the
  cross-attention ones (erases it from its prompt); see :func:`esd_parameter_names`.
* Concept ablation, "Ablating Concepts in Text-to-Image Diffusion Models" (Kumari et al., ICCV 2023,
  arXiv 2303.13516): the student's prediction for the concept matches the frozen model's prediction
  for an *anchor* concept on the same noisy input, so ``c`` now draws the anchor.
* SalUn, "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency" (Fan et al., ICLR
  2024, arXiv 2310.12508): only the weights with the largest forget-loss gradient are updated;
  :func:`saliency_masks` computes the masks, :func:`apply_gradient_masks` enforces them with gradient
  hooks.

Closed-form erasure baselines (no training: one ridge solve per cross-attention K/V projection) live in
:mod:`lightning_zobi.unlearn.closed_form` and are re-exported here: UCE (arXiv 2308.14761,
:func:`uce_erase_`) and MACE's closed-form refinement (arXiv 2403.06381, :func:`mace_refine_`).

Memory: the losses allocate nothing beyond their inputs; a saliency mask is one bool per masked
weight (1 byte each).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_zobi.unlearn.closed_form import closed_form_update, mace_refine_, uce_erase_

__all__ = [
    "ESD_SCOPES",
    "ablation_loss",
    "apply_gradient_masks",
    "closed_form_update",
    "esd_loss",
    "esd_parameter_names",
    "esd_target",
    "mace_refine_",
    "saliency_masks",
    "uce_erase_",
]

ESD_SCOPES = ("esd_u", "esd_x", "all")
_CROSS_ATTENTION = re.compile(r"attn2\.")
_CLASS_CONDITIONING = re.compile(r"^(class_embedding|time_embedding)\.|\.time_emb_proj\.")


def esd_target(eps_uncond: Tensor, eps_concept: Tensor, negative_guidance: float = 1.0) -> Tensor:
    """ESD's negatively guided target ``eps(∅) - η (eps(c) - eps(∅))`` (detached: it comes from the frozen model)."""
    if negative_guidance < 0:
        raise ValueError(
            f"negative_guidance={negative_guidance!r} is invalid: use η >= 0 (ESD uses 1.0; larger erases harder)."
        )
    return (eps_uncond - negative_guidance * (eps_concept - eps_uncond)).detach()


def esd_loss(
    student_eps_concept: Tensor,
    teacher_eps_uncond: Tensor,
    teacher_eps_concept: Tensor,
    negative_guidance: float = 1.0,
) -> Tensor:
    """ESD loss: MSE between the student's prediction for the concept and the negatively guided target."""
    target = esd_target(teacher_eps_uncond, teacher_eps_concept, negative_guidance)
    return F.mse_loss(student_eps_concept.float(), target.float())


def ablation_loss(student_eps_concept: Tensor, teacher_eps_anchor: Tensor) -> Tensor:
    """Concept ablation (model-based): MSE between the student's concept prediction and the teacher's anchor one."""
    return F.mse_loss(student_eps_concept.float(), teacher_eps_anchor.detach().float())


def esd_parameter_names(model: nn.Module, scope: str = "esd_u") -> list[str]:
    """Names of the parameters ESD trains for ``scope``.

    ``"esd_x"``: cross-attention (``attn2``) weights of a text-conditioned UNet; a class-conditional
    ``UNet2DModel`` has no cross-attention, so there it means the conditioning path (class and time
    embeddings and each resnet's ``time_emb_proj``, where the label enters). ``"esd_u"``: every
    other parameter. ``"all"``: everything.
    """
    if scope not in ESD_SCOPES:
        raise ValueError(f"scope={scope!r} is invalid: use one of {ESD_SCOPES}.")
    names = [n for n, _ in model.named_parameters()]
    if scope == "all":
        return names
    has_cross = any(_CROSS_ATTENTION.search(n) for n in names)
    pattern = _CROSS_ATTENTION if has_cross else _CLASS_CONDITIONING
    x_names = [n for n in names if pattern.search(n)]
    if scope == "esd_x":
        if not x_names:
            raise ValueError(
                f"scope='esd_x' selects nothing in {type(model).__name__}: it has neither cross-attention nor "
                "class/time conditioning layers; use scope='esd_u' or 'all'."
            )
        return x_names
    chosen = set(x_names)
    return [n for n in names if n not in chosen]


@torch.no_grad()
def _abs_grads(params: list[nn.Parameter]) -> list[Tensor]:
    return [p.grad.detach().abs() if p.grad is not None else torch.zeros_like(p) for p in params]


def saliency_masks(
    named_params: Iterable[tuple[str, nn.Parameter]],
    forget_loss: Callable[[], Tensor],
    keep_fraction: float = 0.5,
) -> dict[str, Tensor]:
    """SalUn masks: True for the ``keep_fraction`` of weights with the largest |∂ forget_loss / ∂w|.

    The threshold is global over all given parameters (SalUn's choice), so layers that matter for the
    forgotten concept get most of the budget. Gradients are computed once and cleared afterwards.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction={keep_fraction!r} is invalid: use a float in (0, 1], e.g. 0.5.")
    named = [(n, p) for n, p in named_params if p.requires_grad]
    if not named:
        raise ValueError("named_params holds no parameter with requires_grad=True: nothing to mask.")
    params = [p for _, p in named]
    for p in params:
        p.grad = None
    with torch.enable_grad():
        forget_loss().backward(inputs=params)
    grads = _abs_grads(params)
    for p in params:
        p.grad = None
    flat = torch.cat([g.flatten().float() for g in grads])
    k = max(1, int(round(keep_fraction * flat.numel())))
    threshold = torch.topk(flat, k, largest=True, sorted=False).values.min()
    return {n: g >= threshold for (n, _), g in zip(named, grads, strict=True)}


def apply_gradient_masks(model: nn.Module, masks: dict[str, Tensor]) -> list[RemovableHandle]:
    """Register gradient hooks that zero the gradient outside each mask (remove the handles to undo)."""
    params = dict(model.named_parameters())
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise ValueError(
            f"masks name parameters the model does not have: {unknown[:3]}; compute them on this model."
        )
    handles = []
    for name, mask in masks.items():
        param = params[name]
        if mask.shape != param.shape:
            raise ValueError(
                f"mask of {name} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}."
            )
        handles.append(param.register_hook(lambda g, m=mask: g * m.to(g.dtype)))
    return handles
