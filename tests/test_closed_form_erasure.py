"""UCE / MACE closed-form cross-attention erasure: the formula, its guarantees, and the edit on a tiny SD UNet."""

from __future__ import annotations

import pytest
import torch

from lightning_zobi.unlearn.closed_form import (
    aligned_positions,
    closed_form_update,
    cross_attention_projections,
    edit_projections_,
    find_matching_indices,
    mace_refine_,
    uce_erase_,
)


def _uce_transcription(w_old, erase, guide, preserve, erase_scale, preserve_scale, lamb):
    """UCE's loop from trainscripts/uce_sd_erase.py (one column vector at a time, torch.inverse)."""
    mat1 = lamb * w_old
    mat2 = lamb * torch.eye(w_old.shape[1], dtype=w_old.dtype)
    for c, g in zip(erase, guide, strict=False):
        c_i = c[None].T
        v_i_star = (w_old @ g)[None].T
        mat1 = mat1 + erase_scale * (v_i_star @ c_i.T)
        mat2 = mat2 + erase_scale * (c_i @ c_i.T)
    for c in preserve:
        c_i = c[None].T
        v_i_star = (w_old @ c)[None].T
        mat1 = mat1 + preserve_scale * (v_i_star @ c_i.T)
        mat2 = mat2 + preserve_scale * (c_i @ c_i.T)
    return mat1 @ torch.inverse(mat2)


def _fixed(d_out=6, d_in=5, n_erase=2, n_preserve=2):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    erase = torch.randn(n_erase, d_in, generator=gen, dtype=torch.float64)
    guide = torch.randn(n_erase, d_in, generator=gen, dtype=torch.float64)
    preserve = torch.randn(n_preserve, d_in, generator=gen, dtype=torch.float64)
    return w, erase, guide, preserve


@pytest.mark.parametrize("scales", [(1.0, 1.0, 0.5), (2.0, 0.3, 1e-2), (1.0, 0.0, 3.0)])
def test_formula_matches_uce_transcription(scales):
    erase_scale, preserve_scale, lamb = scales
    w, erase, guide, preserve = _fixed()
    ours = closed_form_update(
        w, erase, guide @ w.T, preserve, erase_scale=erase_scale, preserve_scale=preserve_scale, lamb=lamb
    )
    ref = _uce_transcription(w, erase, guide, preserve, erase_scale, preserve_scale, lamb)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_formula_is_the_ridge_minimizer():
    """The solution zeroes the gradient of α Σ|Wc−v|² + β Σ|Wc_p−W_old c_p|² + λ|W−W_old|²."""
    w, erase, guide, preserve = _fixed()
    a, b, lamb = 1.5, 0.7, 0.4
    new = closed_form_update(w, erase, guide @ w.T, preserve, erase_scale=a, preserve_scale=b, lamb=lamb)
    x = new.clone().requires_grad_(True)
    obj = (
        a * ((erase @ x.T - guide @ w.T) ** 2).sum()
        + b * ((preserve @ x.T - preserve @ w.T) ** 2).sum()
        + lamb * ((x - w) ** 2).sum()
    )
    (grad,) = torch.autograd.grad(obj, x)
    assert grad.abs().max() < 1e-9
    # and a perturbed weight is worse (the minimizer is strict)
    worse = new + 1e-3 * torch.randn_like(new)
    obj_worse = (
        a * ((erase @ worse.T - guide @ w.T) ** 2).sum()
        + b * ((preserve @ worse.T - preserve @ w.T) ** 2).sum()
        + lamb * ((worse - w) ** 2).sum()
    )
    assert obj_worse > obj


def test_small_lambda_maps_erased_to_target_and_keeps_preserved():
    w, erase, guide, preserve = _fixed(d_out=8, d_in=12, n_erase=3, n_preserve=4)
    new = closed_form_update(w, erase, guide @ w.T, preserve, lamb=1e-8)
    torch.testing.assert_close(erase @ new.T, guide @ w.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(preserve @ new.T, preserve @ w.T, rtol=1e-5, atol=1e-5)
    # the control: the erased inputs did move (the edit is not the identity)
    assert (erase @ w.T - guide @ w.T).abs().max() > 0.1


def test_bad_shapes_are_reported():
    w, erase, guide, _ = _fixed()
    with pytest.raises(ValueError, match="erase_targets"):
        closed_form_update(w, erase, guide)  # guide is (N, d_in), not (N, d_out)
    with pytest.raises(ValueError, match="lamb"):
        closed_form_update(w, erase, guide @ w.T, lamb=-1.0)


def test_find_matching_indices_transcription():
    # MACE: [bos, a, photo, of, ship, eos] vs [bos, a, photo, of, ground, eos] -> the concept position drops out
    old, new = [0, 5, 6, 7, 8, 2], [0, 5, 6, 7, 9, 2]
    assert find_matching_indices(old, new) == ([0, 1, 2, 3, 5], [0, 1, 2, 3, 5])
    old_ext, new_ext = aligned_positions(old, new, 10)
    assert old_ext == [0, 1, 2, 3, 5, 6, 7, 8, 9] and new_ext == old_ext
    # mapping concept removed: [bos, a, digit, three, eos] vs [bos, a, digit, eos]
    old_ext, new_ext = aligned_positions([0, 4, 5, 6, 2], [0, 4, 5, 2], 8)
    assert old_ext == [0, 1, 2, 4, 5, 6, 7] and new_ext == [0, 1, 2, 3, 4, 5, 6]
    assert len(old_ext) == len(new_ext)


def _tiny_sd():
    from lightning_zobi.data.captions import caption_tokenizer
    from lightning_zobi.diffusion.sd import tiny_sd_components

    parts = tiny_sd_components(seed=0)
    words = ["a red digit three", "a digit three", "a digit", "a digit five", "a digit seven", "three", ""]
    return parts["unet"].eval(), parts["text_encoder"].eval(), caption_tokenizer(words, max_length=16)


def _kv_outputs(unet, rows):
    return {n: layer(rows) for n, layer in cross_attention_projections(unet).items()}


@torch.no_grad()
def test_uce_on_tiny_unet_maps_concept_to_guide_and_keeps_preserved():
    from lightning_zobi.unlearn.closed_form import prompt_encoder, uce_embeddings

    unet, text, tok = _tiny_sd()
    layers = cross_attention_projections(unet)
    n_attn2 = sum(1 for n, _ in unet.named_modules() if n.endswith("attn2"))
    assert n_attn2 == 6 and len(layers) == 2 * n_attn2  # 2 down, 1 mid, 3 up cross-attention blocks
    encode = prompt_encoder(text, tok)
    c = uce_embeddings(encode, ["a digit three"], tok.eos_token_id)
    g = uce_embeddings(encode, ["a digit"], tok.eos_token_id)
    p = uce_embeddings(encode, ["a digit five", "a digit seven"], tok.eos_token_id)
    before_c, before_g, before_p = _kv_outputs(unet, c), _kv_outputs(unet, g), _kv_outputs(unet, p)
    report = uce_erase_(
        unet, text, tok, ["a digit three"], "a digit", ["a digit five", "a digit seven"], lamb=1e-6
    )
    assert report.erase_rows == 1 and report.preserve_rows == 2 and len(report.layers) == 12
    after_c, after_p = _kv_outputs(unet, c), _kv_outputs(unet, p)
    for name in layers:
        assert (before_c[name] - before_g[name]).abs().max() > 1e-2  # the control: they differed
        torch.testing.assert_close(after_c[name], before_g[name], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(after_p[name], before_p[name], rtol=1e-3, atol=1e-4)


@torch.no_grad()
def test_uce_default_lambda_moves_concept_most_of_the_way():
    from lightning_zobi.unlearn.closed_form import prompt_encoder, uce_embeddings

    unet, text, tok = _tiny_sd()
    encode = prompt_encoder(text, tok)
    c = uce_embeddings(encode, ["a digit three"], tok.eos_token_id)
    g = uce_embeddings(encode, ["a digit"], tok.eos_token_id)
    before_c, before_g = _kv_outputs(unet, c), _kv_outputs(unet, g)
    uce_erase_(unet, text, tok, ["a digit three"], "a digit")
    after_c = _kv_outputs(unet, c)
    for name in before_c:
        gap_before = (before_c[name] - before_g[name]).norm()
        gap_after = (after_c[name] - before_g[name]).norm()
        assert gap_after < 0.5 * gap_before


@torch.no_grad()
def test_mace_cfr_maps_shared_tokens_and_leaves_weights_of_other_layers():
    from lightning_zobi.unlearn.closed_form import mace_embeddings, prompt_encoder

    unet, text, tok = _tiny_sd()
    other = {
        n: p.clone() for n, p in unet.named_parameters() if not n.endswith(("to_k.weight", "to_v.weight"))
    }
    encode = prompt_encoder(text, tok)
    tokenize = lambda s: tok(s).input_ids  # noqa: E731
    c, g = mace_embeddings(encode, tokenize, ["a red digit three"], ["a red digit"])
    assert c.shape == g.shape and c.shape[0] == 15  # 16 positions minus the concept token
    before_g = _kv_outputs(unet, g)
    mace_refine_(unet, text, tok, ["a red digit three"], ["a red digit"], lamb=1e-6)
    after_c = _kv_outputs(unet, c)
    for name in before_g:
        torch.testing.assert_close(after_c[name], before_g[name], rtol=1e-3, atol=1e-3)
    for n, p in unet.named_parameters():
        if n in other:
            assert torch.equal(p, other[n]), n


def test_edit_needs_cross_attention():
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(ValueError, match="cross-attention"):
        edit_projections_(unet, torch.zeros(1, 4), torch.zeros(1, 4))
