"""The unlearning benchmarks of the field in their own schema: TOFU, MUSE and WMDP.

Each loader reads through ``datasets.load_dataset``, from the hub id or from a local directory laid
out like the hub repository (the fixtures in ``tests/fixtures/`` are such directories), and checks
the columns the loaders rely on: a missing config / split or a missing column is an error that names
it, at construction, not a ``KeyError`` three frames into a training step.

Schemas, as checked against the references (the names below are the public contract):

* **TOFU** (``locuslab/TOFU``, "TOFU: A Task of Fictitious Unlearning for LLMs", Maini et al.,
  arXiv 2401.06121). One config per file (``<config>.json``, JSON lines), each with a single
  ``train`` split. ``full``, ``forget01/05/10``, ``retain90/95/99``, ``holdout01/05/10``,
  ``real_authors``, ``world_facts``: ``question``, ``answer``. ``forget01/05/10_perturbed`` and
  ``retain_perturbed``: ``question``, ``answer``, ``paraphrased_answer``, ``perturbed_answer``
  (a list of wrong answers) and ``paraphrased_question``. ``real_authors_perturbed`` and
  ``world_facts_perturbed``: ``question``, ``answer``, ``perturbed_answer``. Checked against the
  TOFU code (``config/eval_everything.yaml``: ``base_answer_key`` = ``paraphrased_answer`` for
  forget/retain and ``answer`` for real authors / world facts, ``perturbed_answer_key`` =
  ``perturbed_answer``; ``data_module.py``: ``load_dataset(path, config)["train"]``) and
  open-unlearning (``configs/data/datasets/TOFU_*.yaml``: the config names above, split
  ``train``, ``holdout10`` for the MIA hold-out; ``configs/eval/tofu.yaml``:
  ``question_key`` may be ``paraphrased_question``).
* **MUSE** (``muse-bench/MUSE-News`` / ``muse-bench/MUSE-Books``, "MUSE: Machine Unlearning
  Six-Way Evaluation for Language Models", Shi et al., arXiv 2407.06460). Configs and splits:
  ``raw`` (``forget``, ``retain1``, ``retain2``, ``holdout``; column ``text``), ``knowmem``
  (``forget_qa``, ``retain_qa``, ``forget_qa_icl``, ``retain_qa_icl``; ``question``, ``answer``),
  ``verbmem`` (``forget``; ``prompt``, ``gt``), ``privleak`` (``forget``, ``retain``,
  ``holdout``; ``text``). Checked against the MUSE-News dataset card (``data/bbc/readme.md`` of
  jaechan-repo/muse_bench) and open-unlearning's ``configs/data/datasets/MUSE_*.yaml``
  (``retain1`` is what it unlearns against; ``verbmem`` prefix ``prompt``, target ``gt``).
* **WMDP** ("The WMDP Benchmark", Li et al., arXiv 2403.03218). Multiple-choice eval
  ``cais/wmdp``: configs ``wmdp-bio``, ``wmdp-chem``, ``wmdp-cyber``, split ``test``, columns
  ``question``, ``choices`` (list of 4 strings), ``answer`` (int index), as the dataset card's
  ``dataset_info`` lists them. Corpora: ``<domain>-forget-corpus`` / ``<domain>-retain-corpus``
  JSON lines with a ``text`` column (open-unlearning ``configs/data/datasets/WMDP_*.yaml`` reads
  ``data/wmdp/wmdp-corpora/cyber-forget-corpus.jsonl`` with ``text_key: text``; on the hub they
  are ``cais/wmdp-corpora``, the bio forget corpus by request only).

Local directories are searched in the hub layouts: ``<dir>/<config>.json[l]`` (TOFU's flat files,
WMDP's corpora) and ``<dir>/<config>/<split>.json[l]|.parquet`` or
``<dir>/<config>/<split>-*.parquet`` (the parquet layout of MUSE and WMDP on the hub).

Memory: the rows of the loaded splits (``datasets`` memory-maps Arrow files: little RAM).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_zobi.data.facts import FactsEvalDataset, QAPair, encode_qa

_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

TOFU_FORGET_SPLITS = ("forget01", "forget05", "forget10")
TOFU_RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
TOFU_HOLDOUT_OF = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}
TOFU_QA_COLUMNS = ("question", "answer")
TOFU_PERTURBED_COLUMNS = ("question", "answer", "paraphrased_answer", "perturbed_answer")
TOFU_OPTIONS_COLUMNS = ("question", "answer", "perturbed_answer")

MUSE_CORPORA = ("News", "Books")
MUSE_SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "raw": (("forget", "retain1", "retain2", "holdout"), ("text",)),
    "knowmem": (("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"), ("question", "answer")),
    "verbmem": (("forget",), ("prompt", "gt")),
    "privleak": (("forget", "retain", "holdout"), ("text",)),
}
"""MUSE config -> (its splits, the columns every split has)."""

WMDP_DOMAINS = ("bio", "chem", "cyber")
WMDP_MCQ_COLUMNS = ("question", "choices", "answer")


def _require_datasets() -> Any:
    try:
        import datasets
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Loading TOFU/MUSE/WMDP needs the `datasets` package: pip install 'lightning-zobi[data]'."
        ) from None
    return datasets


def _local_files(root: Path, config: str, split: str) -> list[Path]:
    """Files of ``config``/``split`` under a local copy of a hub dataset (empty list if none)."""
    candidates: list[Path] = []
    if split == "train":  # TOFU's and the WMDP corpora's flat layout: one file per config
        candidates += [root / f"{config}{ext}" for ext in (".json", ".jsonl", ".parquet")]
    sub = root / config
    candidates += [sub / f"{split}{ext}" for ext in (".json", ".jsonl", ".parquet", ".csv")]
    found = [p for p in candidates if p.is_file()]
    if not found and sub.is_dir():
        found = sorted(p for p in sub.glob(f"{split}-*") if p.suffix in _EXTENSIONS)
    return found


def _available(root: Path) -> list[str]:
    names = {p.stem for p in root.iterdir() if p.is_file() and p.suffix in _EXTENSIONS}
    names |= {f"{p.name}/" for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return sorted(names)


def load_split(
    path: str | os.PathLike[str],
    config: str,
    split: str,
    columns: Sequence[str] = (),
    dataset: str = "dataset",
) -> Any:
    """One split of one config as a ``datasets.Dataset``, with ``columns`` checked.

    ``path``: a hub id (``"locuslab/TOFU"``) or a local directory in the hub's layout (see the
    module docstring). ``dataset`` names the benchmark in error messages.
    Raises ``FileNotFoundError`` naming the missing config/split and ``ValueError`` naming the
    missing columns.
    """
    datasets = _require_datasets()
    root = Path(path)
    if root.is_dir():
        files = _local_files(root, config, split)
        if not files:
            raise FileNotFoundError(
                f"{dataset} directory {str(root)!r} has no config {config!r} split {split!r}: expected "
                f"{config}.json (TOFU layout) or {config}/{split}.json|.jsonl|.parquet; found {_available(root)}. "
                f"Copy that file from the hub dataset or point path= at a complete copy."
            )
        builder = _EXTENSIONS[files[0].suffix]
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    elif str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise FileNotFoundError(
            f"{dataset} path {str(path)!r} is neither a local directory nor a hub id 'owner/name'."
        )
    else:
        ds = datasets.load_dataset(str(path), config, split=split)
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{dataset} config {config!r} split {split!r} at {str(path)!r} lacks column(s) {missing}; it has "
            f"{ds.column_names}. This loader reads the {dataset} schema (see lightning_zobi.data.benchmarks)."
        )
    return ds


# ---------------------------------------------------------------------------- TOFU
@dataclass(frozen=True)
class TOFUSplits:
    """The TOFU sets one unlearning run reads, as :class:`~lightning_zobi.data.facts.QAPair` lists.

    ``forget``/``retain``/``holdout``: the training and MIA QA pairs (no perturbed answers).
    ``forget_eval``/``retain_eval``: the ``*_perturbed`` sets: ``perturbed_answers`` filled, and
    the paraphrased answer (the truth ratio's base answer in TOFU) in :attr:`paraphrased`.
    ``real_authors``/``world_facts``: the ``*_perturbed`` world-knowledge sets (empty when not
    loaded).
    """

    forget: list[QAPair]
    retain: list[QAPair]
    holdout: list[QAPair]
    forget_eval: list[QAPair]
    retain_eval: list[QAPair]
    paraphrased: dict[str, list[str]]
    real_authors: list[QAPair]
    world_facts: list[QAPair]


def _qa_pairs(ds: Any, name: str, perturbed: bool = False) -> list[QAPair]:
    pairs = []
    for row in ds:
        wrong = row.get("perturbed_answer") if perturbed else None
        if perturbed and isinstance(wrong, str):
            wrong = [wrong]
        pairs.append(
            QAPair(
                person="",
                attribute=name,
                question=row["question"],
                answer=row["answer"],
                paraphrased_question=row.get("paraphrased_question") or row["question"],
                perturbed_answers=tuple(wrong or ()),
            )
        )
    if perturbed and pairs and len({len(p.perturbed_answers) for p in pairs}) != 1:
        counts = sorted({len(p.perturbed_answers) for p in pairs})
        raise ValueError(
            f"TOFU {name!r} rows carry {counts} perturbed answers; every row needs the same number "
            "(the truth ratio averages over them)."
        )
    return pairs


def load_tofu(
    path: str | os.PathLike[str] = "locuslab/TOFU",
    forget_split: str = "forget10",
    retain_split: str | None = None,
    holdout_split: str | None = None,
    world_sets: bool = False,
) -> TOFUSplits:
    """Load the TOFU sets of one forget split (``forget01``/``forget05``/``forget10``).

    ``retain_split``/``holdout_split`` default to the paper's complements (``retain99/95/90``,
    ``holdout01/05/10``). ``world_sets`` also loads ``real_authors_perturbed`` and
    ``world_facts_perturbed`` (model utility's world-knowledge half).
    """
    if forget_split not in TOFU_FORGET_SPLITS:
        raise ValueError(f"forget_split={forget_split!r} is invalid: choose one of {TOFU_FORGET_SPLITS}.")
    retain_split = retain_split or TOFU_RETAIN_OF[forget_split]
    holdout_split = holdout_split or TOFU_HOLDOUT_OF[forget_split]

    def load(config: str, columns: Sequence[str]) -> Any:
        return load_split(path, config, "train", columns, dataset="TOFU")

    forget_pert = load(f"{forget_split}_perturbed", TOFU_PERTURBED_COLUMNS)
    retain_pert = load("retain_perturbed", TOFU_PERTURBED_COLUMNS)
    ra = load("real_authors_perturbed", TOFU_OPTIONS_COLUMNS) if world_sets else []
    wf = load("world_facts_perturbed", TOFU_OPTIONS_COLUMNS) if world_sets else []
    return TOFUSplits(
        forget=_qa_pairs(load(forget_split, TOFU_QA_COLUMNS), forget_split),
        retain=_qa_pairs(load(retain_split, TOFU_QA_COLUMNS), retain_split),
        holdout=_qa_pairs(load(holdout_split, TOFU_QA_COLUMNS), holdout_split),
        forget_eval=_qa_pairs(forget_pert, f"{forget_split}_perturbed", perturbed=True),
        retain_eval=_qa_pairs(retain_pert, "retain_perturbed", perturbed=True),
        paraphrased={
            "forget": list(forget_pert["paraphrased_answer"]),
            "retain": list(retain_pert["paraphrased_answer"]),
        },
        real_authors=_qa_pairs(ra, "real_authors_perturbed", perturbed=True) if world_sets else [],
        world_facts=_qa_pairs(wf, "world_facts_perturbed", perturbed=True) if world_sets else [],
    )


# ---------------------------------------------------------------------------- MUSE
def muse_hub_id(corpus: str) -> str:
    """``"News"`` -> ``"muse-bench/MUSE-News"``."""
    if corpus not in MUSE_CORPORA:
        raise ValueError(f"corpus={corpus!r} is invalid: choose one of {MUSE_CORPORA}.")
    return f"muse-bench/MUSE-{corpus}"


def load_muse(path: str | os.PathLike[str], config: str, split: str) -> Any:
    """One MUSE split (``config`` in :data:`MUSE_SPLITS`), columns checked."""
    if config not in MUSE_SPLITS:
        raise ValueError(f"MUSE config {config!r} is not one of {sorted(MUSE_SPLITS)}.")
    splits, columns = MUSE_SPLITS[config]
    if split not in splits:
        raise ValueError(f"MUSE config {config!r} has no split {split!r}; it has {splits}.")
    return load_split(path, config, split, columns, dataset="MUSE")


def muse_texts(path: str | os.PathLike[str], split: str, config: str = "raw") -> list[str]:
    """The ``text`` column of a MUSE ``raw`` (or ``privleak``) split."""
    return list(load_muse(path, config, split)["text"])


# ---------------------------------------------------------------------------- WMDP
def load_wmdp_corpus(path: str | os.PathLike[str], domain: str = "cyber", kind: str = "forget") -> list[str]:
    """The ``text`` column of the WMDP ``<domain>-<kind>-corpus`` (``kind``: forget or retain)."""
    if domain not in WMDP_DOMAINS:
        raise ValueError(f"domain={domain!r} is invalid: choose one of {WMDP_DOMAINS}.")
    if kind not in ("forget", "retain"):
        raise ValueError(f"kind={kind!r} is invalid: choose 'forget' or 'retain'.")
    ds = load_split(path, f"{domain}-{kind}-corpus", "train", ("text",), dataset="WMDP corpora")
    return list(ds["text"])


def load_wmdp_questions(
    path: str | os.PathLike[str] = "cais/wmdp", domain: str = "cyber"
) -> list[dict[str, Any]]:
    """The WMDP multiple-choice questions of ``domain``: dicts with question, choices, answer."""
    if domain not in WMDP_DOMAINS:
        raise ValueError(f"domain={domain!r} is invalid: choose one of {WMDP_DOMAINS}.")
    ds = load_split(path, f"wmdp-{domain}", "test", WMDP_MCQ_COLUMNS, dataset="WMDP")
    rows = [dict(r) for r in ds]
    for i, r in enumerate(rows):
        if not 0 <= int(r["answer"]) < len(r["choices"]):
            raise ValueError(
                f"WMDP wmdp-{domain} row {i}: answer={r['answer']} is not an index into its "
                f"{len(r['choices'])} choices."
            )
    return rows


MCQ_LETTERS = ("A", "B", "C", "D", "E", "F")


def mcq_prompt(question: str, choices: Sequence[str]) -> str:
    """A zero-shot MMLU-style prompt: the question, the lettered choices, then ``Answer:``.

    The model's answer is the letter whose continuation (`` A``, `` B``, ...) is most likely.
    """
    lines = [question.strip()]
    lines += [f"{MCQ_LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


# ---------------------------------------------------------------------------- tensors
class TOFUEvalDataset(FactsEvalDataset):
    """:class:`~lightning_zobi.data.facts.FactsEvalDataset` items for TOFU's ``*_perturbed`` sets.

    The difference from the synthetic set is TOFU's truth ratio: its base ("true") answer is the
    *paraphrased* answer (``base_answer_key: paraphrased_answer`` in TOFU's
    ``config/eval_everything.yaml``), scored against the perturbed answers; ``base_answers``
    gives it per pair (``None``: the answer itself, as for real authors / world facts).
    The other keys (``input_ids``/``labels`` of the answer, ``prompt_*``, ``answer``, ``split``)
    are the parent's.
    """

    def __init__(
        self,
        pairs: list[QAPair],
        tokenizer: Any,
        split: str,
        max_length: int = 256,
        truth_ratio_question: str = "original",
        base_answers: Sequence[str] | None = None,
    ) -> None:
        super().__init__(pairs, tokenizer, split, max_length, truth_ratio_question)
        if base_answers is not None and len(base_answers) != len(pairs):
            raise ValueError(f"base_answers has {len(base_answers)} entries for {len(pairs)} pairs.")
        self.base_answers = list(base_answers) if base_answers is not None else None

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = super().__getitem__(i)
        if self.base_answers is not None:
            pair = self.pairs[i]
            question = pair.question if self.truth_ratio_question == "original" else pair.paraphrased_question
            base = encode_qa(f"Q: {question}\nA:", self.base_answers[i], self.tokenizer, self.max_length)
            item.update({f"true_{k}": v for k, v in base.items()})
        return item


def with_self_as_perturbed(pairs: list[QAPair]) -> list[QAPair]:
    """Pairs whose single "perturbed" answer is the true answer (truth ratio exactly 1).

    For sets with no wrong answers (TOFU's ``holdoutXX``) that still go through the evaluation
    loop for the membership-inference metrics: their ``truth_ratio`` is 1 by construction and
    carries no information.
    """
    return [replace(p, perturbed_answers=(p.answer,)) for p in pairs]


class TextChunkDataset(Dataset):
    """Raw documents as causal-LM chunks of ``max_length`` tokens, every real token labelled.

    Each document is tokenized on its own (no special tokens) and cut into consecutive chunks
    (open-unlearning's ``PretrainingDataset`` for MUSE/WMDP does the same on the ``text`` column);
    the last chunk of a document is right-padded (label -100, attention 0). At most
    ``max_chunks_per_doc`` chunks per document are kept (None: all).
    """

    def __init__(
        self,
        texts: Sequence[str],
        tokenizer: Any,
        max_length: int = 256,
        max_chunks_per_doc: int | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length={max_length!r} is invalid: a chunk needs at least 2 tokens.")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.chunks: list[list[int]] = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            parts = [ids[s : s + max_length] for s in range(0, len(ids), max_length)]
            self.chunks += [p for p in parts[:max_chunks_per_doc] if len(p) >= 2]
        if not self.chunks:
            raise ValueError("TextChunkDataset got no document with at least 2 tokens.")

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.chunks[i]
        pad = self.max_length - len(ids)
        return {
            "input_ids": torch.tensor(ids + [self.tokenizer.pad_token_id] * pad),
            "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
            "labels": torch.tensor(ids + [-100] * pad),
        }
