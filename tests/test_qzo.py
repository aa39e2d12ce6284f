"""QZO core (no Lightning): scale adapters, un-nesting, exact perturb/restore, clipping, learning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from lightning_zobi.quant import (  # noqa: E402
    QZOOptimizer,
    QZORule,
    find_quant_scales,
    keep_cpu_layout_,
    quantize_linear_4bit_,
    qzo_optimizer,
)
from lightning_zobi.zo import OPTIMIZERS, DirectionKey  # noqa: E402


def tiny_lm(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        initializer_range=0.1,  # wide enough init that the quantized layers move the loss
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def quantized_lm(compress_statistics: bool) -> nn.Module:
    model = tiny_lm()
    quantize_linear_4bit_(model, compress_statistics=compress_statistics, compute_dtype=torch.float32)
    return model


def batch() -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss


def qzo_losses(
    model: nn.Module, scales, x: torch.Tensor, lr: float, eps: float = 1e-3, fused: bool | None = False
) -> tuple[float, float]:
    """The loss on ``x`` before and after 15 QZO steps (seed 3) on ``scales``."""
    with torch.no_grad():
        loss0 = lm_loss(model, x).item()
    opt = qzo_optimizer(scales, lr=lr, eps=eps, seed=3, fused=fused)
    for _ in range(15):
        opt.step(lambda: lm_loss(model, x))
    with torch.no_grad():
        return loss0, lm_loss(model, x).item()


def linear4bit(compress_statistics: bool, seed: int = 0) -> tuple[nn.Module, nn.Linear]:
    torch.manual_seed(seed)
    ref = nn.Linear(128, 64)
    q = bnb.nn.Linear4bit(
        128, 64, compress_statistics=compress_statistics, quant_type="nf4", compute_dtype=torch.float32
    )
    q.load_state_dict(ref.state_dict())
    return q.to("cpu"), ref


def test_nested_absmax_is_unnested_exactly_and_costs_3_bytes_per_block() -> None:
    q, _ = linear4bit(compress_statistics=True)
    state = q.weight.quant_state
    assert state.nested and state.absmax.dtype == torch.uint8
    x = torch.randn(3, 128)
    with torch.no_grad():
        before = q(x)
    blocks, nested_bytes = state.absmax.numel(), state.absmax.nbytes + state.state2.absmax.nbytes
    scales = find_quant_scales(q)
    assert len(scales) == 1 and not state.nested
    assert scales.tensors[0] is q.weight.quant_state.absmax
    assert scales.tensors[0].dtype == torch.float32 and scales.tensors[0].numel() == blocks == 128 * 64 // 64
    assert scales.extra_bytes == 4 * blocks - nested_bytes
    with torch.no_grad():
        after = q(x)
    assert torch.equal(before, after)  # bitsandbytes' own dequantization: bit-identical forward


def test_unnest_false_refuses_double_quantized_layers() -> None:
    q, _ = linear4bit(compress_statistics=True)
    with pytest.raises(ValueError, match="double-quantized.*unnest=True"):
        find_quant_scales(q, unnest=False)


def test_float_absmax_is_used_in_place_without_copy() -> None:
    q, _ = linear4bit(compress_statistics=False)
    absmax = q.weight.quant_state.absmax
    scales = find_quant_scales(q, unnest=False)
    assert scales.tensors[0] is absmax and scales.extra_bytes == 0
    x = torch.randn(3, 128)
    with torch.no_grad():
        y0 = q(x) - q.bias
        absmax.mul_(1.25)  # w = Δ ⊙ w̄: scaling every Δ scales the layer's output
        y1 = q(x) - q.bias
    torch.testing.assert_close(y1, 1.25 * y0, rtol=1e-5, atol=1e-6)


def test_cpu_inference_repacking_is_kept_off() -> None:
    q, _ = linear4bit(compress_statistics=False)
    scales = find_quant_scales(q)
    q.eval()
    with torch.no_grad():
        q(torch.randn(2, 128))
    scales.check_bound()  # the forward still reads the tensor QZO holds
    assert q.weight.quant_state.absmax.dtype == torch.float32


def test_already_repacked_layer_is_restored_to_the_standard_layout() -> None:
    q, _ = linear4bit(compress_statistics=False)
    codes = q.weight.data.clone()
    x = torch.randn(2, 128)
    q.eval()
    with torch.no_grad():
        y_packed = q(x)
    if not getattr(q.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    scales = find_quant_scales(q)
    assert torch.equal(q.weight.data, codes)
    assert scales.tensors[0].dtype == torch.float32 and scales.tensors[0].shape == (128,)
    with torch.no_grad():
        torch.testing.assert_close(q(x), y_packed, rtol=2e-2, atol=2e-2)


def test_no_quantized_layer_and_unknown_backend_raise() -> None:
    with pytest.raises(ValueError, match="No quantized layer"):
        find_quant_scales(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="backends"):
        find_quant_scales(nn.Linear(4, 4), backends=["gptq-nope"])
    with pytest.raises(ValueError, match="quant_type"):
        quantize_linear_4bit_(nn.Sequential(nn.Linear(64, 64)), quant_type="int3")


@pytest.mark.parametrize("compress_statistics", [True, False])
def test_perturb_and_restore_with_zero_lr_leaves_codes_and_scales(compress_statistics: bool) -> None:
    model = quantized_lm(compress_statistics)
    scales = find_quant_scales(model)
    fingerprint = scales.codes_fingerprint()
    before = [s.clone() for s in scales.tensors]
    x = batch()
    with torch.no_grad():
        loss0 = lm_loss(model, x).item()
    opt = QZOOptimizer(scales, lr=0.0, eps=1e-3)
    for _ in range(3):
        opt.step(lambda: lm_loss(model, x))
    assert scales.codes_fingerprint() == fingerprint
    for s, b in zip(scales.tensors, before, strict=True):
        # +εz, −2εz, +εz in float32: equal up to the rounding of those three adds
        torch.testing.assert_close(
            s, b, rtol=0, atol=4 * torch.finfo(torch.float32).eps * b.abs().max().item()
        )
    with torch.no_grad():
        assert lm_loss(model, x).item() == pytest.approx(loss0, abs=1e-5)


@pytest.mark.parametrize("compress_statistics", [True, False])
def test_loss_falls_and_only_scales_change(compress_statistics: bool) -> None:
    model = quantized_lm(compress_statistics)
    scales = find_quant_scales(model)
    fingerprint = scales.codes_fingerprint()
    others = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype.is_floating_point}
    start = [s.clone() for s in scales.tensors]
    loss0, loss1 = qzo_losses(model, scales, batch(), lr=5e-2)
    assert loss1 < loss0 - 0.03, (loss0, loss1)
    assert scales.codes_fingerprint() == fingerprint  # 4-bit codes byte-identical
    assert all(not torch.equal(s, b) for s, b in zip(scales.tensors, start, strict=True))
    for n, p in model.named_parameters():
        if n in others:
            assert torch.equal(p, others[n]), n  # embeddings, norms, biases untouched
    assert all(bool((s >= 0).all()) for s in scales.tensors)


def test_clipping_bounds_the_projected_gradient_and_is_counted() -> None:
    model = quantized_lm(compress_statistics=False)
    scales = find_quant_scales(model)
    x = batch()
    lr, eps, clip = 1e-2, 1e-3, 1e-4
    opt = QZOOptimizer(scales, lr=lr, eps=eps, clip=clip, nonnegative=False, seed=7)
    start = [s.clone() for s in scales.tensors]
    opt.step(lambda: lm_loss(model, x))
    raw = opt.last_raw_projected_grads[0]
    assert abs(raw) > clip  # the unclipped estimate exceeds the bound...
    applied = max(-clip, min(clip, raw))
    key = DirectionKey(opt.seed, 0, 0)
    for index, (s, b) in enumerate(zip(scales.tensors, start, strict=True)):
        z = opt.directions.sample(s, index, key)
        # ...and the update used the clipped value: Δ_new − Δ = −lr · clip(d) · z
        torch.testing.assert_close(s - b, -lr * applied * z, rtol=1e-3, atol=1e-6)
    assert opt.last_clipped == 1 and opt.clipped_total == 1 and opt.queries_total == 1
    assert opt.clip_fraction == 1.0
    state = opt.state_dict()
    assert state["qzo"]["clipped_total"] == 1 and state["zo"]["step"] == 1

    fresh = QZOOptimizer(find_quant_scales(model), lr=lr, eps=eps, clip=clip)
    fresh.load_state_dict(state)
    assert fresh.clipped_total == 1 and fresh.queries_total == 1 and fresh.zo_step == 1


def test_no_clipping_when_disabled_and_bad_arguments_raise() -> None:
    model = quantized_lm(compress_statistics=False)
    scales = find_quant_scales(model)
    x = batch()
    opt = QZOOptimizer(scales, lr=1e-3, eps=1e-3, clip=None)
    opt.step(lambda: lm_loss(model, x))
    assert opt.last_clipped == 0 and opt.clip_fraction == 0.0
    for bad in (0.0, -1.0, "big"):
        with pytest.raises(ValueError, match="clip="):
            QZOOptimizer(scales, clip=bad)
    with pytest.raises(TypeError, match="continuous scales"):
        QZOOptimizer([torch.zeros(4, dtype=torch.uint8)])
    assert "qzo" not in OPTIMIZERS  # ZeroOrder(optimizer=...) trains weights; QZO only scales


def test_nonnegative_projection_keeps_scales_at_or_above_zero() -> None:
    model = quantized_lm(compress_statistics=False)
    scales = find_quant_scales(model)
    x = batch()
    opt = QZOOptimizer(scales, lr=1e3, eps=1e-3, clip=None, seed=1)
    opt.step(lambda: lm_loss(model, x))
    assert min(float(s.min()) for s in scales.tensors) == 0.0


def test_replaced_scale_tensor_is_detected() -> None:
    model = quantized_lm(compress_statistics=False)
    scales = find_quant_scales(model)
    opt = QZOOptimizer(scales, lr=1e-3)
    layer = scales.entries[0].module
    layer.weight.quant_state.absmax = layer.weight.quant_state.absmax.clone()
    with pytest.raises(RuntimeError, match="replaced after set-up"):
        opt.step(lambda: lm_loss(model, batch()))


def test_include_regex_selects_layers_and_keep_cpu_layout_counts() -> None:
    model = quantized_lm(compress_statistics=False)
    scales = find_quant_scales(model, include=r"mlp\.")
    assert len(scales) == 3 and all("mlp." in n for n in scales.names)
    assert keep_cpu_layout_(model) == 7


def test_torchao_int4_weight_only_scales_on_cpu() -> None:
    pytest.importorskip("torchao")
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    model = tiny_lm()
    quantize_(model.model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    scales = find_quant_scales(model, backends=["torchao"])
    assert len(scales) == 7 and {e.backend for e in scales.entries} == {"torchao"}
    fingerprint = scales.codes_fingerprint()
    loss0, loss1 = qzo_losses(model, scales, batch(), lr=2e-3, eps=1e-4)
    assert loss1 < loss0 - 0.05
    assert scales.codes_fingerprint() == fingerprint


def test_memory_benchmark_runs_tiny_on_cpu(tmp_path) -> None:
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "qzo_memory.py"
    spec = importlib.util.spec_from_file_location("qzo_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "qzo.json"
    bench.main(["--tiny", "--steps", "1", "--warmup", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    results = {r["mode"]: r for r in report["results"]}
    assert set(results) == {"bf16_inference", "bf16_zo", "bf16_fo_adamw", "qzo", "qzo_fused", "nf4_inference"}
    assert not any("error" in r for r in results.values())
    assert (
        results["qzo_fused"]["optimizer"] == "FusedQZOOptimizer"
        and results["qzo"]["optimizer"] == "QZOOptimizer"
    )
    assert results["qzo_fused"]["step_ratio_to_2_forwards"] > 0
    infer, fo, qzo = results["bf16_inference"], results["bf16_fo_adamw"], results["qzo"]
    assert qzo["model_bytes"] < infer["model_bytes"]  # 4-bit linear layers
    assert fo["peak_bytes"] >= 3 * infer["model_bytes"]  # + gradients + two AdamW moments
    assert qzo["quantized_layers"] == 14 and qzo["trainable_scales"] > 0


def _fused_and_torch_qzo(**kw):
    """A FusedQZOOptimizer and a torch-path QZOOptimizer drawing the same (fused) directions, on float64 scales."""
    pytest.importorskip("triton")
    from lightning_zobi.quant.qzo_fused import FusedQZOOptimizer
    from lightning_zobi.zo.fused import FusedGaussianDirections

    torch.manual_seed(0)
    a = [torch.rand(n, dtype=torch.float64) * 0.1 for n in (300, 64, 4100)]
    b = [t.clone() for t in a]
    fused = FusedQZOOptimizer(a, seed=4, **kw)
    plain = QZOOptimizer(b, seed=4, directions=FusedGaussianDirections(), **kw)
    return fused, plain, a, b


@pytest.mark.parametrize("nonnegative", [True, False])
def test_fused_qzo_equals_the_torch_path_with_clipping_and_projection(nonnegative: bool) -> None:
    """Same directions, same quadratic loss: clip, update and max(Δ, 0) match step for step."""
    kw = dict(lr=0.3, eps=1e-3, clip=2.0, nonnegative=nonnegative)
    fused, plain, a, b = _fused_and_torch_qzo(**kw)
    target = [torch.full_like(t, -0.05) for t in a]  # pulls scales below 0: the projection binds

    def closure(ts):
        return lambda: sum(((t - c) ** 2).sum() for t, c in zip(ts, target, strict=True))

    for _ in range(4):
        fused.step(closure(a))
        plain.step(closure(b))
        assert not fused.perturbed  # never folds: scales are not module parameters
    assert fused.clipped_total == plain.clipped_total > 0  # the bound C was hit
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    lowest = min(float(t.min()) for t in a)
    assert lowest == 0.0 if nonnegative else lowest < 0.0
    assert fused.state_dict()["qzo"]["clipped_total"] == fused.clipped_total


def test_qzo_optimizer_picks_the_path() -> None:
    pytest.importorskip("triton")
    from lightning_zobi.quant.qzo_fused import FusedQZOOptimizer

    scales = [torch.rand(64)]
    assert type(qzo_optimizer(scales, rounds=7)) is QZOOptimizer  # CPU: torch path, fused-only args dropped
    opt = qzo_optimizer(scales, fused=True, rounds=7, clip=50.0)
    assert type(opt) is FusedQZOOptimizer and isinstance(opt, QZORule)
    assert opt.fused_directions.rounds == 7 and opt.clip == 50.0
    with pytest.raises(ValueError, match="clip="):
        qzo_optimizer(scales, fused=True, clip=-1.0)
    with pytest.raises(TypeError, match="continuous scales"):
        qzo_optimizer([torch.zeros(4, dtype=torch.uint8)], fused=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [False, True])
def test_qzo_on_cuda_double_quantized(fused: bool) -> None:
    model = tiny_lm().to("cuda")
    quantize_linear_4bit_(model, compress_statistics=True, compute_dtype=torch.float32)
    scales = find_quant_scales(model)
    assert all(s.is_cuda and s.dtype == torch.float32 for s in scales.tensors)
    fingerprint = scales.codes_fingerprint()
    loss0, loss1 = qzo_losses(model, scales, batch().cuda(), lr=5e-2, fused=fused)
    assert loss1 < loss0 - 0.03
    assert scales.codes_fingerprint() == fingerprint
