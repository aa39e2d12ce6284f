"""Text-conditioned erasure: the caption set, the ClosedFormErasure callback, and the two benchmarks' smoke modes."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_caption_set_names_its_concepts_and_judges_colour_exactly():
    from lightning_zobi.data.captions import (
        COLOURS,
        all_captions,
        caption,
        caption_tokenizer,
        colour_of,
        concept_kind,
        load_caption_splits,
        to_grey,
        without_concept,
    )
    from lightning_zobi.data.images import load_digits_splits

    splits = load_caption_splits(seed=0)
    train = splits.train
    assert train.images.shape[1:] == (3, 8, 8) and len(train.captions) == len(train)
    assert torch.equal(colour_of(train.images), train.colours)  # the colour judge is exact on real images
    white, grey = torch.ones(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    assert colour_of(torch.cat([white, grey])).tolist() == [-1, -1]  # no dominant channel: not "red"
    grey = load_digits_splits(size=8, channels=1, seed=0).train.images
    torch.testing.assert_close(to_grey(train.images), grey)  # colourize is inverted by the max over channels
    # every full caption names its digit and colour; the test split's captions are always full
    assert all(
        c == caption(int(d), int(k))
        for c, d, k in zip(splits.test.captions, splits.test.digits, splits.test.colours, strict=False)
    )
    full = [caption(int(d), int(k)) for d, k in zip(train.digits, train.colours, strict=False)]
    dropped = sum(c != f for c, f in zip(train.captions, full, strict=False))
    assert 0.3 * len(train) < dropped < 0.5 * len(train)  # 15% + 15% + 10% of the captions drop something
    assert "" in train.captions and "a digit three" in all_captions() and "a red digit" in all_captions()
    assert concept_kind("three") == "digit" and concept_kind("red") == "colour"
    with pytest.raises(ValueError, match="not a word"):
        concept_kind("purple")
    assert without_concept("a red digit three", "three") == "a red digit"
    tok = caption_tokenizer(all_captions())
    ids = tok("a red digit three").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 6
    assert len(COLOURS) == 3


@torch.no_grad()
def test_callback_edits_only_cross_attention_kv_and_maps_the_concept():
    import lightning.pytorch as pl

    from lightning_zobi.lightning.callbacks.closed_form import ClosedFormErasure
    from lightning_zobi.lightning.modules.diffusion import DiffusionModule
    from lightning_zobi.unlearn.closed_form import cross_attention_projections, prompt_encoder, uce_embeddings

    module = DiffusionModule(stable_diffusion="tiny", samples_per_class=0)
    before = {n: p.clone() for n, p in module.student.named_parameters()}
    encode = prompt_encoder(module.text_encoder, module.tokenizer)
    eos = module.tokenizer.eos_token_id
    c = uce_embeddings(encode, ["a handwritten digit three"], eos)
    g = uce_embeddings(encode, ["a handwritten digit"], eos)
    targets = {n: layer(g) for n, layer in cross_attention_projections(module.student).items()}
    cb = ClosedFormErasure(
        method="uce", concepts=["a handwritten digit three"], guides="a handwritten digit", lamb=1e-6
    )
    cb.setup(pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False), module, "validate")
    cb.setup(None, module, "fit")  # a second setup does not edit again
    assert cb.done and cb.report["layers"] == 12
    changed = {n for n, p in module.student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed)
    for n, layer in cross_attention_projections(module.student).items():
        torch.testing.assert_close(layer(c), targets[n], rtol=1e-3, atol=1e-4)
    state = cb.state_dict()
    fresh = ClosedFormErasure(method="uce", concepts=["x"])
    fresh.load_state_dict(state)
    assert fresh.done


def test_callback_rejects_bad_input():
    from lightning_zobi.lightning.callbacks.closed_form import ClosedFormErasure

    with pytest.raises(ValueError, match="concepts is empty"):
        ClosedFormErasure(concepts=[])
    with pytest.raises(ValueError, match="mapping prompt"):
        ClosedFormErasure(method="mace", concepts=["a digit three"], guides="a digit")


@pytest.fixture()
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return ROOT / "benchmarks"


def test_text_erasure_quick_mode_runs_every_row(tmp_path, bench_path):
    sys.modules.pop("diffusion_text_erasure", None)
    import diffusion_text_erasure as bench

    torch.set_num_threads(1)
    out = tmp_path / "te.json"
    results = bench.main(["--quick", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["summary"]) == {key for _, key in bench.ROWS}
    for key, summary in data["summary"].items():
        for metric in bench.METRICS:
            value = summary[metric]["mean"]
            assert value == value, (key, metric)  # finite, not NaN
        assert 0.0 <= summary["forget_recognized"]["mean"] <= 1.0
    assert results["params"]["student"] < results["params"]["teacher"]  # the one-phase student is pruned
    assert "untrained" in data["clip_note"]


def test_sd15_gpu_tiny_mode(tmp_path, bench_path):
    out = tmp_path / "sd15.json"
    sys.argv = ["diffusion_sd15_gpu.py", "--tiny", "--steps", "1", "--warmup", "0", "--out", str(out)]
    runpy.run_path(str(bench_path / "diffusion_sd15_gpu.py"), run_name="__main__")
    data = json.loads(out.read_text())
    modes = data["modes"]
    errors = {m: r["error"].splitlines()[-1] for m, r in modes.items() if "error" in r}
    assert not errors, errors
    assert len(modes) == 8  # every mode reported
    for mode, r in modes.items():
        if mode != "student_speed":
            assert r["finite"], mode
    assert modes["qzo"]["quantized_layers"] > 0 and modes["qzo"]["trainable_scales"] > 0
    assert modes["bilevel"]["student_params"] < modes["bilevel"]["params"]
    assert modes["student_speed"]["student_params"] < modes["student_speed"]["teacher_params"]
    assert "bilevel_step / fo_student_step" in data["ratios"]
