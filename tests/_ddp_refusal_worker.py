"""Worker of tests/test_lightning_paths.py, launched as ``torchrun --nproc_per_node=2 _ddp_refusal_worker.py OUT``.

Each rank fits Lightning's ``BoringModel`` with ``ZeroOrder`` under Lightning's plain ``strategy="ddp"``
(gloo, CPU) and writes to ``OUT/rank<r>.json`` the error it got (if any), the ZO steps taken and
whether the parameters moved. Before the refusal this run trained silently and the ranks diverged.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_zobi import ZeroOrder

warnings.filterwarnings("ignore")


def main(out: Path) -> None:
    torch.manual_seed(0)
    module = BoringModel()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_steps=20,
        callbacks=[ZeroOrder(lr=1e-3)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    result = {"error": None, "error_type": None}
    try:
        trainer.fit(module)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        result = {"error": str(exc), "error_type": type(exc).__name__}
    result["global_step"] = trainer.global_step
    result["moved"] = any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    rank = trainer.global_rank
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
