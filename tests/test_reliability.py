"""Nothing is lost: a SIGKILLed ZO run resumes bit-exactly, saves are atomic, exports are safetensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from lightning_zobi.lightning.checkpoint_io import AtomicCheckpointIO, export_safetensors
from lightning_zobi.lightning.modules.causal_lm import CausalLMModule
from lightning_zobi.zo import ZOSGD, DirectionKey, GaussianDirections

HERE = Path(__file__).resolve().parent

RECIPE = """
seed_everything: 0
model:
  class_path: lightning_zobi.lightning.modules.causal_lm.CausalLMModule
  init_args: {{model: tiny-llama, lr: 1.0e-3}}
data:
  class_path: lightning_zobi.lightning.datamodules.facts.FactsDataModule
  init_args: {{num_people: 10, batch_size: 8, max_length: 48}}
trainer:
  accelerator: cpu
  max_steps: 12
  limit_val_batches: 0
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning_zobi.ZeroOrder
      init_args: {{lr: 1.0e-3, seed: 7, queries: 2}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/ckpt, save_last: true, every_n_train_steps: 4, save_top_k: -1}}
{extra}
"""


def _zobi(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "lightning_zobi.cli", "fit", "--config", str(config), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    (tmp_path / "whole.yaml").write_text(RECIPE.format(root=whole, extra=""))
    kill = "    - class_path: kill_switch.KillAtStep\n      init_args: {step: 10}"
    (tmp_path / "crash.yaml").write_text(RECIPE.format(root=crashed, extra=kill))
    (tmp_path / "resume.yaml").write_text(RECIPE.format(root=crashed, extra=""))

    done = _zobi(tmp_path / "whole.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    died = _zobi(tmp_path / "crash.yaml")
    assert died.returncode == -9, f"expected SIGKILL, got {died.returncode}: {died.stderr[-2000:]}"
    last = _weights(crashed / "ckpt" / "last.ckpt")
    assert torch.load(crashed / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 8
    assert not list((crashed / "ckpt").glob(".*.tmp")), "a temp file was left behind"

    resumed = _zobi(tmp_path / "resume.yaml", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = _weights(whole / "ckpt" / "last.ckpt"), _weights(crashed / "ckpt" / "last.ckpt")
    assert expected.keys() == got.keys()
    assert any(not torch.equal(last[k], got[k]) for k in got), "the resumed run did not train"
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume"


def test_a_crash_during_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is interrupted mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    with pytest.raises(FileNotFoundError, match="--ckpt_path"):
        io.load_checkpoint(tmp_path / "missing.ckpt")


def test_export_safetensors_round_trips_with_tied_weights(tmp_path):
    module = CausalLMModule(model="tiny-llama")
    path = export_safetensors(module.model, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_file(path)
    state = module.model.state_dict()
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[name])
    missing = set(state) - set(loaded)
    assert missing <= {"lm_head.weight"}  # tied to the embedding, stored once


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**40),
    eps=st.floats(1e-5, 1e-1),
    scale=st.floats(1e-3, 1e2),
)
def test_perturb_restore_identity_property(shape, dtype, seed, eps, scale):
    """For any shape, dtype, seed and eps: +εz, −2εz, +εz returns θ within 3u(|θ|+ε|z|)."""
    gen = torch.Generator().manual_seed(seed % 2**31)
    theta = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    p = theta.clone()
    opt = ZOSGD([p.requires_grad_()], lr=0.0, eps=eps, seed=seed)
    opt.step(lambda: (p.double() ** 2).sum())
    u = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[
        dtype
    ]
    z = GaussianDirections().sample(p, 0, DirectionKey(seed, 0, 0)).double()
    bound = 3 * u * (theta.double().abs() + eps * z.abs()) * (1 + 1e-6)
    if dtype == torch.float16:  # subnormals: add fp16's smallest step per rounding
        bound = bound + 3 * 2.0**-24
    assert bool(((p.detach().double() - theta.double()).abs() <= bound).all())
