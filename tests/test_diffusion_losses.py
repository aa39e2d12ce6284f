"""Distillation, concept-erasure losses, SalUn masks and the diffusion unlearning metrics."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
from conftest import tiny_cond_unet, tiny_unet2d  # noqa: E402

from lightning_zobi.diffusion.distill import (  # noqa: E402
    FeatureDistiller,
    denoising_loss,
    output_distillation_loss,
    record_features,
)
from lightning_zobi.diffusion.pruning import prune_unet_channels, unet_example_inputs  # noqa: E402
from lightning_zobi.unlearn.diffusion import (  # noqa: E402
    ablation_loss,
    apply_gradient_masks,
    esd_loss,
    esd_parameter_names,
    esd_target,
    saliency_masks,
)
from lightning_zobi.unlearn.metrics_diffusion import JudgeFrechetDistance, PromptedClassAccuracy  # noqa: E402


def test_output_distillation_is_zero_for_a_copy_and_detaches_the_teacher():
    teacher = tiny_unet2d()
    student = copy.deepcopy(teacher)
    inputs = unet_example_inputs(teacher, 4)
    s, t = student(**inputs).sample, teacher(**inputs).sample
    assert float(output_distillation_loss(s, t)) == pytest.approx(0.0, abs=1e-10)
    loss = output_distillation_loss(s * 1.1, t)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    with pytest.raises(ValueError, match="shape"):
        denoising_loss(s, t[:, :, :4])


def test_feature_distiller_adapts_pruned_widths_and_trains():
    teacher = tiny_unet2d().eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    prune_unet_channels(student, 0.5)
    inputs = unet_example_inputs(teacher, 8)
    distiller = FeatureDistiller(teacher, student, inputs)
    assert "mid" in distiller.names and len(distiller.adapters) > 0
    opt = torch.optim.Adam([*student.parameters(), *distiller.parameters()], lr=1e-2)
    losses = []
    for _ in range(15):
        with record_features(student, distiller.names) as sf:
            student(**inputs)
        with torch.no_grad(), record_features(teacher, distiller.names) as tf:
            teacher(**inputs)
        loss = distiller.loss(sf, tf)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_feature_distiller_without_adapters_is_zero_on_identical_models():
    teacher = tiny_unet2d().eval()
    distiller = FeatureDistiller(teacher, copy.deepcopy(teacher), unet_example_inputs(teacher, 2))
    assert len(distiller.adapters) == 0
    inputs = unet_example_inputs(teacher, 2)
    with record_features(teacher, distiller.names) as feats:
        teacher(**inputs)
    assert float(distiller.loss(feats, feats)) == 0.0


def test_esd_target_is_negative_guidance():
    u, c = torch.zeros(2, 3), torch.ones(2, 3)
    torch.testing.assert_close(esd_target(u, c, 1.0), -torch.ones(2, 3))
    torch.testing.assert_close(esd_target(u, c, 0.0), u)
    # a student predicting the target has zero loss; predicting the concept is penalized
    assert float(esd_loss(-torch.ones(2, 3), u, c, 1.0)) == 0.0
    assert float(esd_loss(c, u, c, 1.0)) == pytest.approx(4.0)
    assert float(ablation_loss(c, c)) == 0.0
    with pytest.raises(ValueError, match="negative_guidance"):
        esd_target(u, c, -1.0)


def test_esd_parameter_scopes():
    unet = tiny_unet2d()
    x = esd_parameter_names(unet, "esd_x")
    u = esd_parameter_names(unet, "esd_u")
    assert "class_embedding.weight" in x and not any("conv1" in n for n in x)
    assert set(x).isdisjoint(u) and len(x) + len(u) == len(list(unet.parameters()))
    cond = tiny_cond_unet(layers=1)
    assert all("attn2." in n for n in esd_parameter_names(cond, "esd_x"))
    assert not any("attn2." in n for n in esd_parameter_names(cond, "esd_u"))
    with pytest.raises(ValueError, match="scope"):
        esd_parameter_names(unet, "esd_z")


def test_saliency_masks_keep_the_requested_fraction_and_block_other_gradients():
    unet = tiny_unet2d()
    inputs = unet_example_inputs(unet, 4)
    named = list(unet.named_parameters())
    masks = saliency_masks(named, lambda: unet(**inputs).sample.pow(2).mean(), keep_fraction=0.2)
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert 0.19 <= kept / total <= 0.21
    handles = apply_gradient_masks(unet, masks)
    unet(**inputs).sample.pow(2).mean().backward()
    for name, p in unet.named_parameters():
        if p.grad is not None:
            assert torch.all(p.grad[~masks[name]] == 0)
    for h in handles:
        h.remove()
    with pytest.raises(ValueError, match="keep_fraction"):
        saliency_masks(named, lambda: unet(**inputs).sample.mean(), keep_fraction=0.0)


def test_prompted_class_accuracy_counts_only_tracked_prompts():
    metric = PromptedClassAccuracy([3])
    prompted = torch.tensor([3, 3, 3, 3, 1, 2])
    predicted = torch.tensor([3, 5, 3, 8, 1, 0])
    metric.update(prompted, predicted)
    assert float(metric.compute()) == pytest.approx(0.5)
    retained = PromptedClassAccuracy([0, 1, 2])
    retained.update(prompted, torch.nn.functional.one_hot(predicted, 10).float())  # logits work too
    assert float(retained.compute()) == pytest.approx(0.5)


def test_judge_frechet_distance_matches_the_gaussian_closed_form():
    torch.manual_seed(0)
    fd = JudgeFrechetDistance(lambda x: x, feature_dim=4)
    real = torch.randn(20000, 4)
    fd.update(real, real=True)
    fd.update(torch.randn(20000, 4) * 2.0 + 1.0, real=False)
    # |mu|^2 = 4; Tr(I + 4I - 2*2I) = 4
    assert float(fd.compute()) == pytest.approx(8.0, rel=0.05)
    same = JudgeFrechetDistance(lambda x: x, feature_dim=4)
    same.update(real[:10000], real=True)
    same.update(real[10000:], real=False)
    assert float(same.compute()) < 0.01
    with pytest.raises(ValueError, match="expected"):
        same.update(torch.randn(3, 5), real=True)
