"""Every recipe parses with the `zobi` LightningCLI; the quickstart runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_zobi.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "zo_lora.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def test_unknown_key_is_reported_plainly(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "recipes" / "quickstart.yaml").read_text().replace("max_steps:", "max_stepz:"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad), "--print_config"])
    assert exit_info.value.code != 0
    assert "max_stepz" in capsys.readouterr().err


def test_quickstart_runs_and_checkpoints(tmp_path):
    main(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / "quickstart.yaml"),
            "--trainer.max_steps=12",
            "--trainer.val_check_interval=6",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert list(tmp_path.rglob("*.ckpt")), "the quickstart must write a checkpoint"
