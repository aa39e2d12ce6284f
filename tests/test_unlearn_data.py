"""TOFU / MUSE / WMDP loaders and datamodules on the shipped fixtures (tests/fixtures/, the hub schema)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_zobi.data.benchmarks import (
    MUSE_SPLITS,
    load_muse,
    load_tofu,
    load_wmdp_corpus,
    load_wmdp_questions,
    mcq_prompt,
)
from lightning_zobi.data.facts import encode_qa
from lightning_zobi.lightning.datamodules.muse import MUSEDataModule
from lightning_zobi.lightning.datamodules.tofu import TOFUDataModule
from lightning_zobi.lightning.datamodules.unlearning import UnlearningDataModule
from lightning_zobi.lightning.datamodules.wmdp import WMDPDataModule
from lightning_zobi.lightning.modules.unlearning import UnlearningModule

FIX = Path(__file__).resolve().parent / "fixtures"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tofu_fixture_has_the_hub_configs_and_columns():
    tofu = FIX / "tofu"
    for n in ("01", "05", "10"):
        assert set(_rows(tofu / f"forget{n}_perturbed.json")[0]) >= {
            "question",
            "answer",
            "paraphrased_answer",
            "paraphrased_question",
            "perturbed_answer",
        }
        assert set(_rows(tofu / f"holdout{n}.json")[0]) == {"question", "answer"}
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        assert set(_rows(tofu / f"{name}.json")[0]) == {"question", "answer", "perturbed_answer"}
    s = load_tofu(tofu, "forget05", world_sets=True)
    assert len(s.forget) == 6 and len(s.retain) == 9 and len(s.holdout) == 3
    assert {p.question for p in s.forget}.isdisjoint({p.question for p in s.retain})
    assert len(s.forget_eval[0].perturbed_answers) == 3 and len(s.real_authors) == 3
    assert s.paraphrased["forget"][0] == _rows(tofu / "forget05_perturbed.json")[0]["paraphrased_answer"]


def test_partial_tofu_directory_names_the_missing_piece(tmp_path):
    shutil.copytree(FIX / "tofu", tmp_path / "tofu")
    (tmp_path / "tofu" / "holdout10.json").unlink()
    with pytest.raises(FileNotFoundError, match="holdout10"):
        load_tofu(tmp_path / "tofu", "forget10")
    rows = _rows(FIX / "tofu" / "retain_perturbed.json")
    (tmp_path / "tofu" / "retain_perturbed.json").write_text(
        "\n".join(json.dumps({k: v for k, v in r.items() if k != "perturbed_answer"}) for r in rows)
    )
    with pytest.raises(ValueError, match=r"retain_perturbed.*\['perturbed_answer'\]"):
        load_tofu(tmp_path / "tofu", "forget01")
    with pytest.raises(FileNotFoundError, match="neither a local directory"):
        load_tofu(tmp_path / "no" / "such" / "dir")
    with pytest.raises(ValueError, match="forget_split"):
        load_tofu(FIX / "tofu", "forget20")


def test_muse_and_wmdp_fixtures_load_every_split():
    for config, (splits, columns) in MUSE_SPLITS.items():
        for split in splits:
            ds = load_muse(FIX / "muse_news", config, split)
            assert len(ds) >= 1 and set(columns) <= set(ds.column_names)
    with pytest.raises(ValueError, match="has no split"):
        load_muse(FIX / "muse_news", "verbmem", "retain")
    q = load_wmdp_questions(FIX / "wmdp", "cyber")
    assert q[0]["choices"][q[0]["answer"]] == "443"
    assert mcq_prompt(q[0]["question"], q[0]["choices"]).endswith("C. 22\nD. 25\nAnswer:")
    assert len(load_wmdp_corpus(FIX / "wmdp", "cyber", "forget")) == 2
    with pytest.raises(FileNotFoundError, match="bio-forget-corpus"):
        load_wmdp_corpus(FIX / "wmdp", "bio", "forget")


def _shapes(batch):
    return {k: {kk: (v.dtype, v.shape[1:]) for kk, v in part.items()} for k, part in batch.items()}


def test_tofu_batches_are_the_unlearning_modules_batches():
    dm = TOFUDataModule(FIX / "tofu", "forget01", forget_batch_size=2, retain_batch_size=4, max_length=64)
    ref = UnlearningDataModule(num_people=10, forget_batch_size=2, retain_batch_size=4, max_length=64)
    batch, _, _ = next(iter(dm.train_dataloader()))
    ref_batch, _, _ = next(iter(ref.train_dataloader()))
    assert _shapes(batch) == _shapes(ref_batch)
    val = dm.val_dataloader()
    assert [next(iter(loader))["split"][0] for loader in val] == [
        "forget",
        "retain",
        "holdout",
        "real_authors",
        "world_facts",
    ]
    # the world sets score the answer itself against the perturbed ones (TOFU's ra/wf truth ratio)
    ra = val[3].dataset[0]
    assert torch.equal(ra["true_input_ids"], ra["input_ids"]) and ra["pert_input_ids"].shape[0] == 3
    short = TOFUDataModule(FIX / "tofu", "forget01", world_sets=False, max_length=64)
    assert [ds.split for ds in short.eval_datasets()] == ["forget", "retain", "holdout"]
    ref_item = ref.val_dataloader()[0].dataset[0]
    item = val[0].dataset[0]
    assert set(item) == set(ref_item)
    # TOFU's truth ratio scores the paraphrased answer, not the answer
    pair = dm.splits.forget_eval[0]
    want = encode_qa(f"Q: {pair.question}\nA:", dm.splits.paraphrased["forget"][0], dm.tokenizer, 64)
    assert torch.equal(item["true_input_ids"], want["input_ids"])
    assert not torch.equal(item["true_input_ids"], item["input_ids"])


def test_muse_and_wmdp_datamodules_chunk_the_corpora():
    muse = MUSEDataModule(FIX / "muse_news", max_length=32, forget_batch_size=2, retain_batch_size=2)
    batch, _, _ = next(iter(muse.train_dataloader()))
    assert batch["forget"]["input_ids"].shape == (2, 32)
    lab, mask = batch["forget"]["labels"], batch["forget"]["attention_mask"].bool()
    assert torch.equal(lab[mask], batch["forget"]["input_ids"][mask]) and (lab[~mask] == -100).all()
    wmdp = WMDPDataModule(FIX / "wmdp", max_length=32)
    assert len(wmdp.forget_set) >= 2 and len(wmdp.retain_set) >= 3
    with pytest.raises(ValueError, match="retain_split"):
        MUSEDataModule(FIX / "muse_news", retain_split="forget")


def test_unlearning_module_fits_and_validates_on_tofu_fixture(tmp_path):
    dm = TOFUDataModule(FIX / "tofu", "forget01", forget_batch_size=2, retain_batch_size=4, max_length=64)
    module = UnlearningModule(objective="npo", max_new_tokens=4)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    metrics = trainer.validate(module, dm, verbose=False)
    logged = {k.split("/", 1)[1] for d in metrics for k in d}
    assert {"forget/prob", "retain/truth_ratio", "model_utility", "mia_auc"} <= logged


def test_zobi_fit_on_tofu_fixture_prints_open_unlearning_names(tmp_path, caplog):
    """Issue 17 acceptance: the TOFU recipe runs on the shipped fixture and reports open-unlearning's names."""
    import logging

    from lightning_zobi.cli import main

    root = Path(__file__).resolve().parents[1]
    with caplog.at_level(logging.INFO):
        main(
            [
                "fit",
                "--config",
                str(root / "recipes" / "llm" / "tofu" / "npo.yaml"),
                "--data.path",
                str(FIX / "tofu"),
                "--data.forget_split",
                "forget01",
                "--model.max_new_tokens=4",
                "--trainer.max_epochs=1",
                "--trainer.check_val_every_n_epoch=1",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.enable_progress_bar=false",
                "--report.plots=false",
            ]
        )
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    named = summary["open_unlearning"]
    tofu_names = {
        "forget_Q_A_Prob",
        "forget_Q_A_ROUGE",
        "forget_Truth_Ratio",
        "model_utility",
        "privleak",
        "extraction_strength",
        "exact_memorization",
        "mia_loss",
        "mia_min_k",
        "mia_min_k_plus_plus",
        "mia_zlib",
        "ra_Q_A_Prob_normalised",
        "wf_Truth_Ratio",
    }
    assert tofu_names <= set(named)
    # open-unlearning's model_utility is our 9-way tofu_model_utility, not the 3-way model_utility
    assert named["model_utility"] == summary["metrics"]["val/tofu_model_utility"]["end"]
    printed = caplog.text
    assert "open-unlearning's names" in printed
    for name in ("forget_Q_A_Prob", "forget_Truth_Ratio", "model_utility", "privleak"):
        assert f"    {name} " in printed
