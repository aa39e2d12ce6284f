"""Structured pruning and block removal of diffusers UNets (torch-pruning, BK-SDM) on tiny configs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torch_pruning")
from conftest import tiny_cond_unet, tiny_unet2d  # noqa: E402

from lightning_zobi.diffusion.pruning import (  # noqa: E402
    load_pruned_unet,
    measure_unet,
    prune_unet_channels,
    remove_unet_blocks,
    save_pruned_unet,
    unet_example_inputs,
)


def _cond_unet(layers: int = 2):
    return tiny_cond_unet(layers).eval()


def test_channel_pruning_halves_widths_and_keeps_the_model_runnable():
    unet = tiny_unet2d().eval()
    conv1_before = unet.down_blocks[0].resnets[0].conv1.out_channels
    result = prune_unet_channels(unet, ratio=0.5)
    assert unet.down_blocks[0].resnets[0].conv1.out_channels == conv1_before // 2
    # both sides of most convolutions shrink: well under half the parameters remain
    assert result.param_ratio < 0.4
    assert result.params_after == sum(p.numel() for p in unet.parameters())
    inputs = unet_example_inputs(unet, batch_size=3)
    out = unet(**inputs).sample
    assert out.shape == inputs["sample"].shape and torch.isfinite(out).all()
    # diffusers' cached channel counts follow the pruned layers
    up = unet.up_blocks[0].upsamplers[0]
    assert up.channels == up.conv.in_channels
    attn = unet.mid_block.attentions[0]
    assert attn.query_dim == attn.to_q.in_features
    # the output layer is never pruned
    assert unet.conv_out.out_channels == 1


def test_pruned_unet_roundtrips_through_safetensors(tmp_path):
    unet = tiny_unet2d().eval()
    result = prune_unet_channels(unet, ratio=0.5)
    save_pruned_unet(unet, tmp_path / "student", history=result.history)
    assert (tmp_path / "student" / "diffusion_pytorch_model.safetensors").is_file()
    again = load_pruned_unet(tmp_path / "student").eval()
    inputs = unet_example_inputs(unet, batch_size=2)
    torch.testing.assert_close(again(**inputs).sample, unet(**inputs).sample)


def test_taylor_pruning_needs_a_calibration_loss_and_uses_it():
    with pytest.raises(ValueError, match="calibration_loss"):
        prune_unet_channels(tiny_unet2d().eval(), ratio=0.5, importance="taylor")
    unet = tiny_unet2d().eval()
    inputs = unet_example_inputs(unet, batch_size=4)
    result = prune_unet_channels(
        unet, ratio=0.5, importance="taylor", calibration_loss=lambda m: m(**inputs).sample.pow(2).mean()
    )
    assert result.param_ratio < 0.4
    assert all(p.grad is None for p in unet.parameters())


@pytest.mark.parametrize("bad", [-0.1, 1.0, "half"])
def test_bad_ratio_is_refused(bad):
    with pytest.raises(ValueError, match="ratio"):
        prune_unet_channels(tiny_unet2d().eval(), ratio=bad)


def test_block_removal_bk_sdm_keeps_skips_aligned(tmp_path):
    unet = _cond_unet(layers=2)
    before = sum(p.numel() for p in unet.parameters())
    spec = remove_unet_blocks(unet, keep=1)
    assert unet.mid_block is None
    assert [len(b.resnets) for b in unet.down_blocks] == [1, 1]
    assert [len(b.resnets) for b in unet.up_blocks] == [2, 2]
    assert len(unet.down_blocks[1].attentions) == 1 and len(unet.up_blocks[0].attentions) == 2
    assert sum(p.numel() for p in unet.parameters()) < 0.75 * before
    inputs = unet_example_inputs(unet, batch_size=2)
    out = unet(**inputs).sample
    assert out.shape == inputs["sample"].shape
    save_pruned_unet(unet, tmp_path / "bk", block_removal=spec)
    torch.testing.assert_close(load_pruned_unet(tmp_path / "bk").eval()(**inputs).sample, out)
    with pytest.raises(ValueError, match="keep"):
        remove_unet_blocks(_cond_unet(layers=2), keep=3)


def test_channel_pruning_works_on_the_sd_unet_too():
    unet = _cond_unet(layers=1)
    result = prune_unet_channels(unet, ratio=0.5)
    assert result.param_ratio < 0.5
    inputs = unet_example_inputs(unet, batch_size=2)
    assert unet(**inputs).sample.shape == inputs["sample"].shape


def test_measure_unet_reports_fewer_macs_after_pruning():
    unet = tiny_unet2d().eval()
    before = measure_unet(unet, batch_size=4, repeats=2, warmup=1)
    prune_unet_channels(unet, ratio=0.5)
    after = measure_unet(unet, batch_size=4, repeats=2, warmup=1)
    assert after.params < before.params
    assert after.macs < 0.5 * before.macs
    assert after.step_seconds > 0
