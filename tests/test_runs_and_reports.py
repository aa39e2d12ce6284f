"""Runs a person can see, reproduce and resume (issue 18): run folders, ``--ckpt_path last``, saved configs that
re-run, ``summary.json`` and plots, ``zobi report``, ``zobi chain``, short errors for typos."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch

from lightning_zobi.cli import CHAINS, chain_stages, main, run_cli, run_dir_for, short_error
from lightning_zobi.lightning.callbacks import zero_order
from lightning_zobi.lightning.run_plots import labelled_grid, read_metrics
from lightning_zobi.zo.optim import OPTIMIZERS

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _fit(*args: str):
    return run_cli(["fit", "--config", QUICKSTART, "--trainer.val_check_interval=2", *QUIET, *args])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quickstart for 4 ZO steps in a fresh folder: ``<tmp>/runs/quickstart``."""
    workdir = tmp_path_factory.mktemp("quick")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        _fit("--trainer.max_steps=4")
    return workdir


def test_run_folder_mirrors_the_recipe_path():
    assert run_dir_for(ROOT / "recipes" / "quickstart.yaml") == Path("runs/quickstart")
    assert run_dir_for(ROOT / "recipes" / "llm" / "unlearn_ga.yaml") == Path("runs/llm/unlearn_ga")
    assert run_dir_for("/somewhere/else/mine.yaml") == Path("runs/else/mine")


def test_a_run_folder_holds_config_checkpoint_logs_summary_and_plots(quick_run):
    run = quick_run / "runs" / "quickstart"
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["version_0"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == {"start": 0, "end": 4, "run": 4, "max_steps": 4}
    assert summary["forward_passes"]["training"] == 8  # ZO-SGD, one central query: 2 forwards per step
    assert summary["nonfinite_skips"] == 0
    assert summary["time_per_step_s"] > 0 and summary["peak_memory"]["bytes"] > 0
    assert summary["checkpoints"]["last"].endswith("last.ckpt")
    assert {"train_loss_step", "val_loss", "zo/projected_grad"} <= set(summary["metrics"])
    assert {"loss.png", "zo.png"} <= set(summary["plots"])
    for name in summary["plots"]:
        assert (run / name).read_bytes()[:4] == b"\x89PNG"


def test_validate_logs_beside_the_training_curves(quick_run, monkeypatch):
    monkeypatch.chdir(quick_run)
    run = quick_run / "runs" / "quickstart"
    before = read_metrics(run)
    run_cli(["validate", "--config", QUICKSTART, "--trainer.limit_val_batches=1", *QUIET])
    assert (run / "validate" / "version_0" / "metrics.csv").exists()
    assert read_metrics(run) == before


def test_saved_config_reruns_as_is(quick_run):
    config = quick_run / "runs" / "quickstart" / "config.yaml"
    text = config.read_text()
    assert "Unable to serialize" not in text
    assert "class_path: lightning_zobi.lightning.checkpoint_io.AtomicCheckpointIO" in text
    done = subprocess.run(
        [sys.executable, "-m", "lightning_zobi.cli", "fit", "--config", str(config)],
        cwd=quick_run,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Unable to serialize" not in done.stderr
    summary = json.loads((quick_run / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["steps"]["end"] == 4


def test_print_config_has_no_instances(capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", QUICKSTART, "--print_config"])
    out = capsys.readouterr()
    assert "Unable to serialize" not in out.out + out.err
    assert "AtomicCheckpointIO" in out.out and "save_last: link" in out.out


def test_ckpt_path_last_resumes_at_the_saved_step_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit("--trainer.max_steps=4")
    cli = _fit("--trainer.max_steps=6", "--ckpt_path=last")
    run = tmp_path / "runs" / "quickstart"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"]["start"] == 4 and cli.trainer.global_step == 6
    assert summary["resumed_from"].endswith("last.ckpt")
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["version_0", "version_1"]
    steps = [s for s, _ in read_metrics(run)["train_loss_step"]]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 5  # one curve across the resume
    resumed = _weights(run / "checkpoints" / "last.ckpt")
    # the same 6 steps without a break, in another folder
    _fit("--trainer.max_steps=6", "--trainer.default_root_dir=straight")
    straight = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


def test_short_unlearning_run_writes_forget_retain_summary_and_png(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_cli(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / "llm" / "unlearn_ga_zo.yaml"),
            "--model.init_from=null",
            "--model.retain_model_from=null",
            "--data.num_people=20",
            "--data.eval_retain_size=4",
            "--trainer.max_steps=3",  # the recipe's val_check_interval (30) and log_every_n_steps (10) shrink to fit
            *QUIET,
        ]
    )
    run = tmp_path / "runs" / "llm" / "unlearn_ga_zo"
    summary = json.loads((run / "summary.json").read_text())
    metrics = summary["metrics"]
    assert any("forget" in k for k in metrics) and any("retain" in k for k in metrics)
    assert {"val/forget/em", "val/retain/em"} <= set(metrics) and metrics["val/forget/em"]["end_step"] == 2
    assert metrics["unlearn/forget"]["start_step"] == 0 and metrics["unlearn/forget"]["end_step"] == 2
    assert "unlearning.png" in summary["plots"] and (run / "unlearning.png").stat().st_size > 1000
    # `zobi report` draws them again and compares two runs on one figure
    for name in summary["plots"]:
        (run / name).unlink()
    other = tmp_path / "runs" / "other"
    other.mkdir(parents=True)
    (other / "metrics.csv").write_text("epoch,step,val/forget/em\n0,2,0.5\n")
    main(["report", str(run), str(other), "--out", str(tmp_path / "compare.png")])
    assert (run / "unlearning.png").exists() and (tmp_path / "compare.png").exists()


def test_sample_grid_rows_are_labelled(tmp_path):
    images = torch.rand(12, 1, 8, 8) * 2 - 1
    labels = torch.arange(3).repeat_interleave(4)
    path = labelled_grid(images, labels, tmp_path / "samples.png", "samples", {1: "1 (forget)"})
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"


def test_typo_in_rule_name_is_one_short_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--trainer.callbacks.optimizer=zo_sgdd", "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 5, err
    assert "zo_sgdd" in err[0] and all(rule in err[0] for rule in OPTIMIZERS)
    assert "Traceback" not in "\n".join(err)


def test_typo_in_a_recipe_key_and_setup_errors_are_short(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(QUICKSTART).read_text().replace("optimizer: zo_sgd", "optimzer: zo_sgd"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(bad), "--print_config"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 5 and "did you mean 'optimizer'" in err[0]
    with pytest.raises(SystemExit):  # ZeroOrder's own validation, at instantiation
        main(["fit", "--config", QUICKSTART, "--trainer.callbacks.eps=-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("zobi fit: error: eps=-1.0 is invalid") and len(err) <= 5


def test_literal_choices_match_the_registries(capsys):
    zero_order.refresh_rule_names()
    assert set(get_args(zero_order.ZORuleName)) == set(OPTIMIZERS)
    for rule in sorted(OPTIMIZERS)[-3:]:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", QUICKSTART, f"--trainer.callbacks.optimizer={rule}", "--print_config"])
        assert exit_info.value.code in (0, None) and f"optimizer: {rule}" in capsys.readouterr().out
    message = "Parser key \"solver\":\n  Expected a typing.Literal['penalty', 'vf_free']. Got value: pen"
    assert short_error(message).startswith("solver: 'pen' is not one of: penalty, vf_free.")


def test_chains_name_existing_recipes_in_order(capsys):
    llm = [
        p.relative_to(ROOT / "recipes").with_suffix("").as_posix()
        for p in chain_stages("llm-unlearning", ROOT / "recipes")
    ]
    assert llm[:2] == ["llm/learn_facts", "llm/retain_only"] and "llm/unlearn_ga" in llm
    assert all(s.startswith("llm/unlearn_") for s in llm[2:])
    diffusion = chain_stages("diffusion", ROOT / "recipes")
    assert [p.stem for p in diffusion][:2] == ["judge", "teacher"]
    main(["chain", "diffusion", "--dry-run", "--trainer.max_steps=2"])
    out = capsys.readouterr().out.splitlines()
    assert (
        len(out) == len(diffusion) and out[0].startswith("[1/5] zobi fit --config") and "judge.yaml" in out[0]
    )
    assert out[0].endswith("--trainer.max_steps=2")
    main(["chain", "--list"])
    listing = capsys.readouterr().out
    assert all(name in listing for name in CHAINS)
