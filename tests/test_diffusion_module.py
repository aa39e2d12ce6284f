"""DiffusionModule / JudgeModule / DigitsDataModule / SampleGrid: the Lightning side of the diffusion track."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")
import lightning.pytorch as pl  # noqa: E402
from conftest import TINY_UNET, quiet_trainer  # noqa: E402

from lightning_zobi.diffusion.judge import DigitsCNN, load_judge, save_judge  # noqa: E402
from lightning_zobi.diffusion.pruning import load_pruned_unet  # noqa: E402
from lightning_zobi.lightning.callbacks.samples import SampleGrid  # noqa: E402
from lightning_zobi.lightning.datamodules.digits import DigitsDataModule  # noqa: E402
from lightning_zobi.lightning.modules.diffusion import DiffusionModule, JudgeModule  # noqa: E402


def _trainer(**kw):
    warnings.filterwarnings("ignore")
    return quiet_trainer(**kw)


def _batch(n: int = 8) -> dict:
    torch.manual_seed(0)
    retain = {"images": torch.rand(n, 1, 8, 8) * 2 - 1, "labels": torch.arange(n) % 3}
    forget = {"images": torch.rand(n, 1, 8, 8) * 2 - 1, "labels": torch.full((n,), 3)}
    return {"retain": retain, "forget": forget}


def _module(**kw) -> DiffusionModule:
    args = dict(unet=TINY_UNET, prune_ratio=0.5, objective="bilevel", samples_per_class=0, seed=0)
    args.update(kw)
    return DiffusionModule(**args)


@pytest.fixture(scope="module")
def paper():
    return _module(upper_scope="esd_x")


def test_orientation_selects_which_loss_is_upper(paper):
    batch = _batch()
    assert paper.teacher is not None and not any(p.requires_grad for p in paper.teacher.parameters())
    assert sum(p.numel() for p in paper.student.parameters()) < 0.5 * sum(
        p.numel() for p in paper.teacher.parameters()
    )
    torch.testing.assert_close(paper.upper_loss(batch), paper.suppression_loss(batch))
    torch.testing.assert_close(paper.lower_loss(batch), paper.recovery_loss(batch))
    sets = paper.bilevel_parameters()
    assert {id(p) for p in sets["upper"]} < {id(p) for p in sets["lower"]}
    flipped = _module(orientation="suppress_lower", upper_scope="esd_x")
    torch.testing.assert_close(flipped.upper_loss(batch), flipped.recovery_loss(batch))
    torch.testing.assert_close(flipped.lower_loss(batch), flipped.suppression_loss(batch))
    assert len(flipped.bilevel_parameters()["lower"]) < len(flipped.bilevel_parameters()["upper"])


def test_losses_draw_the_same_noise_within_a_step(paper):
    batch = _batch()
    with torch.no_grad():
        assert float(paper.lower_loss(batch)) == float(paper.lower_loss(batch))
        assert float(paper.upper_loss(batch)) == float(paper.upper_loss(batch))


def test_suppression_loss_is_minimized_by_gradient_steps():
    module = _module(unlearn_loss="ablation", anchor_class=1)
    batch = _batch()
    opt = torch.optim.Adam(module.student.parameters(), lr=5e-3)
    first = float(module.suppression_loss(batch).detach())
    for _ in range(8):
        loss = module.suppression_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(module.suppression_loss(batch).detach()) < 0.5 * first


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="objective"):
        _module(objective="erase")
    with pytest.raises(ValueError, match="anchor_class"):
        _module(unlearn_loss="ablation")
    with pytest.raises(ValueError, match="num_class_embeds"):
        DiffusionModule(unet={**TINY_UNET, "num_class_embeds": None})
    with pytest.raises(ValueError, match="forget"):
        _module().suppression_loss({"retain": _batch()["retain"]})


def test_bilevel_callback_trains_the_pruned_student_and_keeps_the_teacher():
    from lightning_zobi.lightning.callbacks.bilevel import Bilevel

    pl.seed_everything(0)
    module = _module(saliency=0.5)
    teacher_before = [p.detach().clone() for p in module.teacher.parameters()]
    student_before = [p.detach().clone() for p in module.student.parameters()]
    callback = Bilevel(solver="penalty", gamma=1.0, inner_steps=1, inner_lr=1e-3, inner_optimizer="adam")
    data = DigitsDataModule(batch_size=16, forget_class=3, forget_batch_size=8)
    _trainer(max_steps=3, limit_val_batches=0, callbacks=[callback]).fit(module, data)
    assert {"f", "g", "gap", "gamma"} <= set(callback.last_logs)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, module.teacher.parameters(), strict=True))
    changed = [
        not torch.equal(a, b) for a, b in zip(student_before, module.student.parameters(), strict=True)
    ]
    assert any(changed)
    # SalUn: half of the weights are masked, so some tensors keep many exact entries
    frozen = sum(
        int((a == b).sum()) for a, b in zip(student_before, module.student.parameters(), strict=True)
    )
    assert frozen > 0.3 * sum(p.numel() for p in module.student.parameters())


class _PhaseProbe(pl.Callback):
    def __init__(self) -> None:
        self.phases: list[tuple[int, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.phases.append((trainer.current_epoch, pl_module.in_suppression_phase()))


def test_two_phase_switches_from_distillation_to_unlearning():
    probe = _PhaseProbe()
    module = _module(objective="two_phase", phase_switch_epoch=1)
    data = DigitsDataModule(batch_size=16, forget_class=3, forget_batch_size=8)
    _trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[probe]).fit(module, data)
    assert probe.phases == [(0, False), (0, False), (1, True), (1, True)]


def test_teacher_fit_with_judge_metrics_sample_grid_and_export(tmp_path):
    torch.manual_seed(0)
    save_judge(DigitsCNN(width=8), tmp_path / "judge")
    module = DiffusionModule(
        unet=TINY_UNET,
        objective="denoise",
        samples_per_class=2,
        sample_steps=2,
        judge=str(tmp_path / "judge"),
        export_dir=str(tmp_path / "teacher"),
    )
    grid = SampleGrid(dirpath=str(tmp_path / "samples"))
    trainer = _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[grid])
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert {"val/forget_recognized", "val/retain_accuracy", "val/fd_retain"} <= set(trainer.callback_metrics)
    assert grid.written and grid.written[0].stat().st_size > 0
    from PIL import Image

    assert Image.open(grid.written[0]).size[1] == 10 * (8 * 4 + 1) + 1  # one row per class
    exported = load_pruned_unet(tmp_path / "teacher")
    inputs = {
        "sample": torch.randn(2, 1, 8, 8),
        "timestep": torch.tensor([5, 50]),
        "class_labels": torch.tensor([1, 10]),
    }
    torch.testing.assert_close(exported(**inputs).sample, module.student.eval()(**inputs).sample)


def test_judge_module_learns_digits(tmp_path):
    pl.seed_everything(0)
    judge = JudgeModule(width=16, export_dir=str(tmp_path / "judge"))
    trainer = _trainer(max_epochs=4)
    trainer.fit(judge, DigitsDataModule(batch_size=64))
    assert float(trainer.callback_metrics["val/acc"]) > 0.85
    loaded = load_judge(tmp_path / "judge")
    assert loaded.feature_dim == 32 and not any(p.requires_grad for p in loaded.parameters())


def test_stable_diffusion_path_with_block_removal_trains_and_samples():
    from lightning_zobi.lightning.callbacks.bilevel import Bilevel

    pl.seed_everything(0)
    module = DiffusionModule(
        stable_diffusion="tiny",
        remove_blocks=1,
        objective="bilevel",
        upper_scope="esd_x",
        samples_per_class=0,
        sample_steps=2,
        feature_weight=0.5,
    )
    assert module.student.mid_block is None and module.teacher.mid_block is not None
    upper = {id(p) for p in module.bilevel_parameters()["upper"]}
    names = [n for n, p in module.student.named_parameters() if id(p) in upper]
    assert names and all("attn2." in n for n in names)
    data = DigitsDataModule(size=32, channels=3, batch_size=4, forget_class=3, forget_batch_size=4)
    callback = Bilevel(solver="vf_free", gamma=1.0)
    _trainer(max_steps=2, limit_val_batches=0, callbacks=[callback]).fit(module, data)
    assert all(torch.isfinite(torch.tensor(v)) for v in callback.last_logs.values())
    images = module.generate(torch.tensor([3, 5]), steps=2)
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1


def test_checkpoint_of_a_pruned_student_reloads(tmp_path):
    """The student is rebuilt from the hyperparameters (same teacher, same magnitude pruning), then loaded."""
    pl.seed_everything(0)
    module = _module(objective="distill")
    data = DigitsDataModule(batch_size=16)
    trainer = _trainer(
        max_steps=1, limit_val_batches=0, enable_checkpointing=True, default_root_dir=str(tmp_path)
    )
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    again = DiffusionModule.load_from_checkpoint(tmp_path / "student.ckpt", weights_only=True)
    for (name, a), b in zip(
        module.student.state_dict().items(), again.student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_module_and_datamodule_hparams_merge_under_a_logger(tmp_path):
    """Lightning refuses same-named hparams with different values; the teacher recipe has exactly that pairing."""
    from lightning.pytorch.loggers import CSVLogger

    module = DiffusionModule(unet=TINY_UNET, objective="denoise", samples_per_class=0)
    trainer = _trainer(max_steps=1, limit_val_batches=0, logger=CSVLogger(str(tmp_path)))
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert trainer.global_step == 1


def test_taylor_pruned_student_and_channel_pruned_sd_unet_in_its_pipeline():
    taylor = _module(objective="distill", prune_importance="taylor")
    assert sum(p.numel() for p in taylor.student.parameters()) < 0.5 * sum(
        p.numel() for p in taylor.teacher.parameters()
    )
    assert torch.isfinite(taylor.recovery_loss(_batch()))
    sd = DiffusionModule(stable_diffusion="tiny", prune_ratio=0.5, objective="distill", samples_per_class=0)
    assert sum(p.numel() for p in sd.student.parameters()) < 0.5 * sum(
        p.numel() for p in sd.teacher.parameters()
    )
    images = sd.generate(torch.tensor([1]), steps=2)  # StableDiffusionPipeline around the pruned UNet
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
