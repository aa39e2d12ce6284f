"""``RunReport``: what a run did, in one folder: ``summary.json``, a printed summary and PNG plots.

At the end of ``fit`` the callback reads the metrics every CSV logger of the run folder wrote
(``<run>/logs/version_*/metrics.csv``, stitched across resumes: a later version replaces the
earlier ones from the step it starts at) and writes into the run folder

* ``summary.json`` (and the same, printed): each logged metric from its first to its last value
  (and the unlearning metrics once more under open-unlearning's names, ``open_unlearning``),
  the steps run (start → end: a resumed run starts at its checkpoint's step), training forward
  passes of the module's model, ZO non-finite skips, seconds per training step, peak memory, the
  checkpoints written;
* ``loss.png`` (training / validation losses), ``unlearning.png`` (forget / retain / holdout
  metrics, when logged), ``zo.png`` (mean |projected gradient| per step and the non-finite skips,
  under ``ZeroOrder``/``QZO``), ``bilevel.png`` (the bilevel solver's f, g, gap, γ);
* ``samples.png``: after each validation, the module's ``last_samples`` (a diffusion module's
  class-conditional samples) as a grid whose rows are labelled with their class.

``zobi report RUN_DIR [RUN_DIR ...]`` renders the plots again from the files alone and overlays
several runs on one figure (:mod:`lightning_zobi.lightning.run_plots`, which reads the logs and
draws every plot).

Lightning internals relied on: loggers are finalized only after ``on_fit_end`` (``trainer/call.py``
``_call_teardown_hook``), so the callback flushes them (``logger.save()``) before reading the CSV.
Matplotlib is optional (``pip install lightning-zobi[report]``): without it the summary is still
written and one line says why there are no plots.

Memory: a few floats per step; the figures are drawn after training.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_zobi.lightning.run_plots import (
    SUMMARY_FILE,
    _plt,  # matplotlib, imported on first use
    labelled_grid,
    metric_ranges,
    plot_series,
    read_metrics,
)
from lightning_zobi.unlearn.names import open_unlearning_view


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as the lines printed at the end of ``fit``."""
    lines = [f"Run summary: {summary['run_dir']}"]
    steps = summary["steps"]
    lines.append(
        f"  steps            {steps['start']} -> {steps['end']} ({steps['run']} this run"
        + (f", resumed from {summary['resumed_from']}" if summary.get("resumed_from") else "")
        + ")"
    )
    if summary.get("time_per_step_s") is not None:
        lines.append(
            f"  time per step    {summary['time_per_step_s'] * 1e3:.1f} ms (wall {summary['wall_time_s']:.1f} s)"
        )
    fw = summary.get("forward_passes")
    if fw:
        lines.append(
            f"  forward passes   {fw['training']} training ({fw['per_step']:.3g}/step, {fw['module']})"
        )
    if summary.get("nonfinite_skips") is not None:
        lines.append(f"  non-finite skips {summary['nonfinite_skips']}")
    mem = summary.get("peak_memory")
    if mem:
        lines.append(f"  peak memory      {mem['bytes'] / 2**20:.0f} MiB ({mem['kind']})")
    for key, path in summary.get("checkpoints", {}).items():
        lines.append(f"  checkpoint       {path}" + ("" if key == "last" else f"  ({key})"))
    metrics = summary.get("metrics", {})
    if metrics:
        width = max(len(k) for k in metrics)
        lines.append("  metrics (first -> last logged):")
        for key, r in metrics.items():
            lines.append(
                f"    {key:<{width}}  {_fmt(r['start'])} -> {_fmt(r['end'])}  (steps {r['start_step']}..{r['end_step']})"
            )
    named = summary.get("open_unlearning")
    if named:
        width = max(len(k) for k in named)
        lines.append("  unlearning metrics under open-unlearning's names (last logged; lightning_zobi.unlearn.names):")
        lines += [f"    {name:<{width}}  {_fmt(value)}" for name, value in named.items()]
    if summary.get("plots"):
        lines.append("  plots            " + ", ".join(summary["plots"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------- the callback
def _main_model(pl_module: nn.Module) -> tuple[str, nn.Module] | None:
    """The module's child holding the most trainable (else any) parameters: its forwards are counted."""
    best, best_n = None, -1
    for name, child in pl_module.named_children():
        n = sum(p.numel() for p in child.parameters() if p.requires_grad) or sum(
            p.numel() for p in child.parameters()
        )
        if n > best_n:
            best, best_n = (name, child), n
    return best if best_n > 0 else None


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda" and torch.cuda.is_available():
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": f"max allocated on {device}"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"bytes": int(rss if sys.platform == "darwin" else rss * 1024), "kind": "peak RSS of the process"}


class RunReport(Callback):
    """Write ``summary.json``, print the summary and draw PNG plots into the run folder at the end of ``fit``.

    The ``zobi`` CLI adds it to every run (``--report.plots=false`` keeps the summary only).

    Args:
        dirpath: where to write (default: ``trainer.default_root_dir``, the run folder).
        plots: draw the PNGs (needs matplotlib).
        print_summary: print the summary at the end of ``fit``.
        sample_grid: write the module's ``last_samples`` as ``samples.png`` after each validation.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        plots: bool = True,
        print_summary: bool = True,
        sample_grid: bool = True,
    ) -> None:
        super().__init__()
        self.dirpath = dirpath
        self.plots = plots
        self.print_summary = print_summary
        self.sample_grid = sample_grid
        self.summary: dict[str, Any] | None = None
        self._reset()

    def _reset(self) -> None:
        self._t_fit = 0.0
        self._t_batch = 0.0
        self._train_time = 0.0
        self._batches = 0
        self._start_step: int | None = None
        self._forwards = 0
        self._model_name = ""
        self._hook: Any = None
        self._samples: Path | None = None

    def run_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath if self.dirpath is not None else trainer.default_root_dir)

    # ------------------------------------------------------------------ hooks, in the order they run
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        self._t_fit = time.perf_counter()
        if pl_module.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        found = _main_model(pl_module)
        if found is not None:
            self._model_name, model = found

            def count(module: nn.Module, args: Any) -> None:
                if (
                    trainer.training
                ):  # not validation; ZO forwards may run in eval mode, so not module.training
                    self._forwards += 1

            self._hook = model.register_forward_pre_hook(count)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start_step is None:  # after a checkpoint is restored: the step this run starts at
            self._start_step = trainer.global_step
        self._t_batch = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._train_time += time.perf_counter() - self._t_batch
        self._batches += 1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        samples = getattr(pl_module, "last_samples", None)
        if not self.sample_grid or samples is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        images, labels = samples
        hparams = getattr(pl_module, "hparams", {})
        get = hparams.get if hasattr(hparams, "get") else (lambda key, default=None: default)
        erasing = get("objective", "unlearn") not in ("denoise", "distill")  # a teacher erases nothing
        forget = get("forget_class") if erasing else None
        names = {
            int(c): f"{int(c)}" + (" (forget)" if forget is not None and int(c) == int(forget) else "")
            for c in labels.unique()
        }
        out = self.run_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        title = f"samples at step {trainer.global_step} (rows: class)"
        self._samples = labelled_grid(images, labels, out / "samples.png", title, names)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:  # loggers are finalized only after on_fit_end
            logger.save()
        run_dir = self.run_dir(trainer)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.summary = self.build_summary(trainer, pl_module, run_dir)
        if self.plots:
            series = read_metrics(run_dir) if self.summary.get("metrics_source") == "csv" else {}
            if _plt() is None:
                rank_zero_info(
                    "RunReport: matplotlib is not installed (pip install 'lightning-zobi[report]'): no plots."
                )
            else:
                paths = plot_series(series, run_dir, title=run_dir.name)
                if self._samples is not None:  # written by this run
                    paths.append(self._samples)
                self.summary["plots"] = [p.name for p in paths]
        (run_dir / SUMMARY_FILE).write_text(json.dumps(self.summary, indent=2) + "\n")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Print the summary (here, not in ``on_fit_end``: a progress bar ahead of this callback has stopped)."""
        if stage == "fit" and self.print_summary and self.summary is not None and trainer.is_global_zero:
            rank_zero_info(format_summary(self.summary))

    # ------------------------------------------------------------------ the summary
    def build_summary(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, run_dir: Path
    ) -> dict[str, Any]:
        start = self._start_step if self._start_step is not None else trainer.global_step
        end = trainer.global_step
        steps_run = end - start
        has_csv = any(isinstance(lg, CSVLogger) for lg in trainer.loggers)
        series = read_metrics(run_dir) if has_csv else {}
        if series:
            metrics = metric_ranges(series)
        else:  # no CSV logger: the last values only
            metrics = {
                k: {"start": float(v), "end": float(v), "start_step": end, "end_step": end}
                for k, v in trainer.callback_metrics.items()
                if isinstance(v, (int, float, torch.Tensor)) and torch.as_tensor(v).numel() == 1
            }
        checkpoints: dict[str, str] = {}
        for cb in trainer.checkpoint_callbacks:
            if not isinstance(cb, ModelCheckpoint):
                continue
            if cb.save_last and cb.last_model_path:
                checkpoints["last"] = cb.last_model_path
            linked = cb.save_last == "link" and cb.best_model_path and not cb.monitor
            if cb.best_model_path and not linked and cb.best_model_path not in checkpoints.values():
                label = f"best {cb.monitor}" if cb.monitor else (cb.filename or "latest")
                checkpoints[label] = cb.best_model_path
        skips = None
        zo_optimizers = [zo for cb in trainer.callbacks for zo in getattr(cb, "zo_optimizers", [])]
        if zo_optimizers:
            skips = int(sum(getattr(zo, "nonfinite_total", 0) for zo in zo_optimizers))
        wall = time.perf_counter() - self._t_fit
        summary: dict[str, Any] = {
            "run_dir": str(run_dir),
            "module": type(pl_module).__name__,
            "resumed_from": trainer.ckpt_path,
            "steps": {"start": start, "end": end, "run": steps_run, "max_steps": trainer.max_steps},
            "wall_time_s": wall,
            "time_per_step_s": self._train_time / self._batches if self._batches else None,
            "forward_passes": (
                {
                    "training": self._forwards,
                    "per_step": self._forwards / steps_run if steps_run else 0.0,
                    "module": f"{type(pl_module).__name__}.{self._model_name}",
                }
                if self._model_name
                else None
            ),
            "nonfinite_skips": skips,
            "peak_memory": _peak_memory(pl_module.device),
            "checkpoints": checkpoints,
            "metrics_source": "csv" if series else "callback_metrics",
            "metrics": metrics,
        }
        named = open_unlearning_view({k: r["end"] for k, r in metrics.items()})
        if named:
            summary["open_unlearning"] = named
        return summary


# ---------------------------------------------------------------------- progress bar
class _StepMetrics:
    """Progress-bar metrics without Lightning's ``v_num``, with ``step`` as ``done/max_steps``."""

    @property
    def total_train_batches(self) -> int | float:
        """Lightning's total, counting the batches a resumed epoch already ran (its bar starts there)."""
        trainer = self.trainer  # type: ignore[attr-defined]
        total = trainer.num_training_batches
        if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            # batches this epoch already ran (a resumed epoch's bar starts there): one optimizer step per batch
            done = trainer.global_step % total if isinstance(total, int) and total > 0 else 0
            return min(total, done + trainer.max_steps - trainer.global_step)
        return total

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        items.pop("v_num", None)
        if trainer.max_steps and trainer.max_steps > 0:
            items = {"step": f"{trainer.global_step}/{trainer.max_steps}", **items}
        return items


class RunProgressBar(_StepMetrics, RichProgressBar):
    """Lightning's rich bar that says ``Epoch 3`` (not ``Epoch 3/-2`` under ``max_steps``) and ``step 27/600``."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = f"Epoch {current_epoch}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            text += f"/{self.trainer.max_epochs - 1}"
        if len(self.validation_description) > len(text):
            text = f"{text:{len(self.validation_description)}}"
        return text


class RunTQDMProgressBar(_StepMetrics, TQDMProgressBar):
    """Lightning's tqdm bar (used when ``rich`` is not installed) without ``v_num``."""
