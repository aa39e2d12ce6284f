"""Closed-form concept erasure in the cross-attention key/value projections: UCE and MACE's refinement.

Both methods edit only the ``attn2.to_k`` / ``attn2.to_v`` weights of a text-conditioned UNet (the
layers that read the text embeddings) with one ridge-regression solve per layer; no gradient, no data.
For a projection ``W`` (``d_out x d_in``), erased inputs ``c_i`` with targets ``v_i*``, preserved
inputs ``c_p``, scales ``α`` (erase), ``β`` (preserve) and ``λ`` (stay near ``W_old``)::

    W = (λ W_old + α Σ v_i* c_iᵀ + β Σ W_old c_p c_pᵀ) (λ I + α Σ c_i c_iᵀ + β Σ c_p c_pᵀ)⁻¹

the minimizer of ``α Σ |W c_i − v_i*|² + β Σ |W c_p − W_old c_p|² + λ |W − W_old|_F²``
(:func:`closed_form_update`). The two methods differ in which token embeddings they feed it:

* UCE, "Unified Concept Editing in Diffusion Models" (Gandikota et al., WACV 2024, arXiv 2308.14761;
  transcribed from ``trainscripts/uce_sd_erase.py`` of rohitgandikota/unified-concept-editing):
  ``c_i`` is the text embedding of the *last word token* of each erased concept prompt, ``v_i* =
  W_old c_guide`` the original projection of the guide concept's last token (``""`` = erase to the
  unconditional prompt), ``c_p`` the last tokens of the preserved concepts. Defaults α = β = 1, λ = 0.5
  (the script's). :func:`uce_erase_`.
* MACE's closed-form cross-attention refinement (CFR), "MACE: Mass Concept Erasure in Diffusion
  Models" (Lu et al., CVPR 2024, arXiv 2403.06381; transcribed from ``src/cfr_utils.py`` of
  Shilin-LU/MACE): each erase prompt is paired with the same prompt with the concept replaced by a
  mapping concept; ``c_i`` are the erase prompt's embeddings at the tokens the two prompts *share*
  (common prefix, common suffix and every position after it, padding included: where the concept's
  residual information hides in a causal text encoder) and ``v_i*`` the original projections of the
  mapping prompt's embeddings at the aligned positions; preservation is the same sums over generic
  prompts (MACE caches them over MS-COCO captions) with weight β. The concept word's own tokens are
  left to MACE's LoRA stage, which is **out of scope here** (as are its Grounded-SAM masks and LoRA
  fusion): :func:`mace_refine_` is the CFR step alone (``all_words=True`` reproduces MACE's option
  that maps every position instead). MACE's configs use λ = 1e3 with β = 0 for objects.

The solve runs in float64 (the weights are written back in their dtype). Memory: per layer two
``d_in x d_in`` and ``d_out x d_in`` float64 matrices (SD-1.5: ``768²`` → 4.7 MB each); the text
embeddings of the prompts given.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

_KV = re.compile(r"(^|\.)attn2\.to_(k|v)$")

Encoder = Callable[[Sequence[str]], tuple[Tensor, Tensor, Tensor]]
"""``prompts -> (hidden (N, L, D), input_ids (N, L), attention_mask (N, L))`` at the padded length L."""


# ---------------------------------------------------------------------------------------------- the math
def closed_form_update(
    weight: Tensor,
    erase_inputs: Tensor,
    erase_targets: Tensor,
    preserve_inputs: Tensor | None = None,
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lamb: float = 0.5,
    preserve_targets: Tensor | None = None,
) -> Tensor:
    """The edited weight ``(λ W + α Σ v cᵀ + β Σ v_p c_pᵀ)(λ I + α Σ c cᵀ + β Σ c_p c_pᵀ)⁻¹`` (float64 solve).

    Args:
        weight: ``W_old``, ``(d_out, d_in)``.
        erase_inputs: ``c_i`` stacked as rows, ``(N, d_in)``.
        erase_targets: ``v_i*`` as rows, ``(N, d_out)``.
        preserve_inputs: ``c_p`` as rows, ``(M, d_in)`` (None: no preservation term).
        erase_scale / preserve_scale / lamb: ``α``, ``β``, ``λ``; ``λ > 0`` keeps the system invertible
            when fewer than ``d_in`` independent inputs are given (UCE's default 0.5).
        preserve_targets: ``v_p`` (default ``W_old c_p``: preserved outputs unchanged).

    Returns the new weight in ``weight``'s dtype and device.
    """
    if weight.ndim != 2:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}: pass a 2-D (d_out, d_in) projection weight."
        )
    d_out, d_in = weight.shape
    if erase_inputs.ndim != 2 or erase_inputs.shape[1] != d_in:
        raise ValueError(f"erase_inputs has shape {tuple(erase_inputs.shape)}; expected (N, {d_in}).")
    if erase_targets.shape != (erase_inputs.shape[0], d_out):
        raise ValueError(
            f"erase_targets has shape {tuple(erase_targets.shape)}; expected ({erase_inputs.shape[0]}, {d_out})."
        )
    if lamb < 0 or erase_scale < 0 or preserve_scale < 0:
        raise ValueError(
            f"lamb={lamb!r}, erase_scale={erase_scale!r}, preserve_scale={preserve_scale!r}: use values >= 0."
        )
    w = weight.detach().double()
    c = erase_inputs.detach().double().to(w.device)
    v = erase_targets.detach().double().to(w.device)
    mat1 = lamb * w + erase_scale * v.T @ c
    mat2 = lamb * torch.eye(d_in, dtype=torch.float64, device=w.device) + erase_scale * c.T @ c
    if preserve_inputs is not None and preserve_inputs.numel():
        cp = preserve_inputs.detach().double().to(w.device)
        if cp.ndim != 2 or cp.shape[1] != d_in:
            raise ValueError(f"preserve_inputs has shape {tuple(cp.shape)}; expected (M, {d_in}).")
        vp = cp @ w.T if preserve_targets is None else preserve_targets.detach().double().to(w.device)
        mat1 = mat1 + preserve_scale * vp.T @ cp
        mat2 = mat2 + preserve_scale * cp.T @ cp
    # W = mat1 mat2⁻¹  ⇔  mat2ᵀ Wᵀ = mat1ᵀ (mat2 is symmetric)
    new = torch.linalg.solve(mat2, mat1.T).T
    return new.to(weight.dtype)


def cross_attention_projections(unet: nn.Module) -> dict[str, nn.Linear]:
    """The cross-attention key and value projections (``...attn2.to_k`` / ``...attn2.to_v``) by name."""
    found = {n: m for n, m in unet.named_modules() if _KV.search(n) and isinstance(m, nn.Linear)}
    if not found:
        raise ValueError(
            f"{type(unet).__name__} has no attn2.to_k / attn2.to_v layers: closed-form erasure needs a "
            "text-conditioned UNet (UNet2DConditionModel) with cross-attention."
        )
    return found


@dataclass
class EditReport:
    """What an edit did: the layers written, how many input rows each term had, and the settings."""

    method: str
    layers: list[str]
    erase_rows: int
    preserve_rows: int
    settings: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def edit_projections_(
    unet: nn.Module,
    erase_inputs: Tensor,
    guide_inputs: Tensor,
    preserve_inputs: Tensor | None = None,
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lamb: float = 0.5,
    method: str = "closed_form",
) -> EditReport:
    """Edit every cross-attention K/V projection in place: ``c_i`` (rows of ``erase_inputs``) → ``W_old g_i``.

    ``guide_inputs`` are the text embeddings whose *original* projections are the targets (row ``i``
    pairs with row ``i`` of ``erase_inputs``); preserved rows keep their original projections.
    """
    if erase_inputs.shape != guide_inputs.shape:
        raise ValueError(
            f"erase_inputs {tuple(erase_inputs.shape)} and guide_inputs {tuple(guide_inputs.shape)} must pair "
            "row by row: give one guide embedding per erased embedding."
        )
    layers = cross_attention_projections(unet)
    for layer in layers.values():
        w = layer.weight
        targets = guide_inputs.to(w.device).double() @ w.detach().double().T
        layer.weight.copy_(
            closed_form_update(
                w,
                erase_inputs.to(w.device),
                targets,
                None if preserve_inputs is None else preserve_inputs.to(w.device),
                erase_scale=erase_scale,
                preserve_scale=preserve_scale,
                lamb=lamb,
            )
        )
    return EditReport(
        method=method,
        layers=sorted(layers),
        erase_rows=int(erase_inputs.shape[0]),
        preserve_rows=0 if preserve_inputs is None else int(preserve_inputs.shape[0]),
        settings={"erase_scale": erase_scale, "preserve_scale": preserve_scale, "lamb": lamb},
    )


# ---------------------------------------------------------------------------------------------- prompts
def prompt_encoder(text_encoder: nn.Module, tokenizer: Any) -> Encoder:
    """An :data:`Encoder` over a transformers text encoder and tokenizer (padded to ``model_max_length``)."""

    @torch.no_grad()
    def encode(prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        tok = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = next(text_encoder.parameters()).device
        hidden = text_encoder(tok.input_ids.to(device))[0].float()
        return hidden, tok.input_ids, tok.attention_mask

    return encode


def last_word_index(input_ids: Tensor, attention_mask: Tensor, eos_token_id: int | None) -> int:
    """UCE's token: the last non-padding token, stepping back over a trailing eos (0 for an empty prompt)."""
    last = int(attention_mask.sum()) - 1
    if eos_token_id is not None and last >= 0 and int(input_ids[last]) == eos_token_id:
        last -= 1
    return max(last, 0)


def uce_embeddings(encode: Encoder, prompts: Sequence[str], eos_token_id: int | None = None) -> Tensor:
    """Text embedding of each prompt's last word token (``(N, D)``), as UCE's script takes it."""
    if not prompts:
        return torch.empty(0)
    hidden, ids, mask = encode(prompts)
    rows = [hidden[i, last_word_index(ids[i], mask[i], eos_token_id)] for i in range(len(prompts))]
    return torch.stack(rows)


def find_matching_indices(old: Sequence[int], new: Sequence[int]) -> tuple[list[int], list[int]]:
    """MACE's token alignment: positions of the common prefix and the common suffix in ``old`` and ``new``."""
    start = 0
    for a, b in zip(old, new, strict=False):
        if a != b:
            break
        start += 1
    end_old, end_new = len(old) - 1, len(new) - 1
    while end_old >= start and end_new >= start and old[end_old] == new[end_new]:
        end_old -= 1
        end_new -= 1
    return list(range(start)) + list(range(end_old + 1, len(old))), list(range(start)) + list(
        range(end_new + 1, len(new))
    )


def aligned_positions(
    old_ids: Sequence[int], new_ids: Sequence[int], length: int
) -> tuple[list[int], list[int]]:
    """MACE's extended indices: the matching positions, then every later position up to ``length``.

    The prompt that ends later keeps positions to ``length``; the other is cut so both lists have the
    same size (position ``k`` of one pairs with position ``k`` of the other).
    """
    old_idx, new_idx = find_matching_indices(list(old_ids), list(new_ids))
    if not old_idx or not new_idx:
        # no shared token (possible only without bos/eos): align from the first position
        old_idx, new_idx = [0], [0]
    lo, ln = old_idx[-1], new_idx[-1]
    if lo >= ln:
        old_ext = old_idx + list(range(lo + 1, length))
        new_ext = new_idx + list(range(ln + 1, length - (lo - ln)))
    else:
        new_ext = new_idx + list(range(ln + 1, length))
        old_ext = old_idx + list(range(lo + 1, length - (ln - lo)))
    return old_ext, new_ext


def mace_embeddings(
    encode: Encoder,
    tokenize: Callable[[str], Sequence[int]],
    erase_prompts: Sequence[str],
    mapping_prompts: Sequence[str],
    all_words: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(contexts, guides)``, each ``(R, D)``: the aligned token embeddings of erase and mapping prompts.

    ``tokenize(text)`` gives the unpadded ids (as MACE calls the tokenizer). ``all_words=True``:
    every position of the erase prompt against the same position of the mapping prompt.
    """
    if len(erase_prompts) != len(mapping_prompts) or not erase_prompts:
        raise ValueError(
            f"got {len(erase_prompts)} erase prompts and {len(mapping_prompts)} mapping prompts: give one "
            "mapping prompt (the concept replaced by its mapping concept) per erase prompt."
        )
    hidden_old, _, _ = encode(erase_prompts)
    hidden_new, _, _ = encode(mapping_prompts)
    length = hidden_old.shape[1]
    contexts, guides = [], []
    for i, (old, new) in enumerate(zip(erase_prompts, mapping_prompts, strict=True)):
        if all_words:
            old_pos = new_pos = list(range(length))
        else:
            old_pos, new_pos = aligned_positions(tokenize(old), tokenize(new), length)
        contexts.append(hidden_old[i, old_pos])
        guides.append(hidden_new[i, new_pos])
    return torch.cat(contexts), torch.cat(guides)


def preservation_embeddings(encode: Encoder, prompts: Sequence[str]) -> Tensor:
    """Every position's embedding of each prompt, ``(N * L, D)`` (MACE's preservation cache, ``all_words``)."""
    if not prompts:
        return torch.empty(0)
    hidden, _, _ = encode(prompts)
    return hidden.reshape(-1, hidden.shape[-1])


# ---------------------------------------------------------------------------------------------- methods
def _tokenizer_parts(tokenizer: Any) -> tuple[int | None, Callable[[str], Sequence[int]]]:
    return getattr(tokenizer, "eos_token_id", None), lambda text: tokenizer(text).input_ids


def uce_erase_(
    unet: nn.Module,
    text_encoder: nn.Module,
    tokenizer: Any,
    edit_concepts: Sequence[str],
    guide_concepts: Sequence[str] | str = "",
    preserve_concepts: Sequence[str] = (),
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lamb: float = 0.5,
) -> EditReport:
    """UCE (arXiv 2308.14761): map each edit concept's last-token embedding to its guide's, keep the preserved.

    Args:
        unet: the text-conditioned UNet, edited in place (its ``attn2.to_k``/``to_v`` weights).
        text_encoder / tokenizer: the pipeline's (the embeddings the UNet reads).
        edit_concepts: prompts of the concepts to erase (e.g. ``["three"]`` or caption-style
            expansions ``["a digit three", ...]``, UCE's ``--expand_prompts``).
        guide_concepts: one guide per edit concept, or one string for all (``""``: the unconditional
            prompt, UCE's default for objects).
        preserve_concepts: prompts whose outputs must not move.
        erase_scale / preserve_scale / lamb: α, β, λ of :func:`closed_form_update` (script defaults).
    """
    edit = list(edit_concepts)
    if not edit:
        raise ValueError("edit_concepts is empty: give at least one prompt to erase, e.g. ['three'].")
    guides = [guide_concepts] * len(edit) if isinstance(guide_concepts, str) else list(guide_concepts)
    if len(guides) == 1 and len(edit) > 1:
        guides = guides * len(edit)
    if len(guides) != len(edit):
        raise ValueError(
            f"{len(edit)} edit_concepts but {len(guides)} guide_concepts: give one guide, or one per concept."
        )
    eos, _ = _tokenizer_parts(tokenizer)
    encode = prompt_encoder(text_encoder, tokenizer)
    c = uce_embeddings(encode, edit, eos)
    g = uce_embeddings(encode, guides, eos)
    p = uce_embeddings(encode, list(preserve_concepts), eos) if preserve_concepts else None
    report = edit_projections_(
        unet, c, g, p, erase_scale=erase_scale, preserve_scale=preserve_scale, lamb=lamb, method="uce"
    )
    report.settings.update(edit=edit, guide=guides, preserve=list(preserve_concepts))
    return report


def mace_refine_(
    unet: nn.Module,
    text_encoder: nn.Module,
    tokenizer: Any,
    erase_prompts: Sequence[str],
    mapping_prompts: Sequence[str],
    preserve_prompts: Sequence[str] = (),
    *,
    preserve_scale: float = 1.0,
    lamb: float = 1e3,
    all_words: bool = False,
) -> EditReport:
    """MACE's closed-form cross-attention refinement (arXiv 2403.06381), without its LoRA stage.

    Args:
        unet / text_encoder / tokenizer: as in :func:`uce_erase_`.
        erase_prompts: prompts that contain the concept (MACE augments the concept into many templates).
        mapping_prompts: the same prompts with the concept replaced by the mapping concept
            (e.g. ``"a red digit three"`` → ``"a red digit"``).
        preserve_prompts: generic prompts whose every token keeps its projection (MACE: MS-COCO
            captions; weight ``preserve_scale``).
        lamb: λ (MACE's object/celebrity configs: 1e3, which keeps ``W`` close to ``W_old`` since the
            erase scale is 1 and each prompt contributes ~L rows).
        all_words: map every position (MACE's ``all_words`` option) instead of the shared tokens.
    """
    _, tokenize = _tokenizer_parts(tokenizer)
    encode = prompt_encoder(text_encoder, tokenizer)
    c, g = mace_embeddings(encode, tokenize, list(erase_prompts), list(mapping_prompts), all_words)
    p = preservation_embeddings(encode, list(preserve_prompts)) if preserve_prompts else None
    report = edit_projections_(
        unet, c, g, p, erase_scale=1.0, preserve_scale=preserve_scale, lamb=lamb, method="mace_cfr"
    )
    report.settings.update(all_words=all_words, prompts=len(list(erase_prompts)))
    return report
