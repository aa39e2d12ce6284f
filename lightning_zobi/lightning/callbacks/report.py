"""``RunReport``: what a run did, in one folder: ``summary.json``, a printed summary and PNG plots.

At the end of ``fit`` the callback reads the metrics every CSV logger of the run folder wrote
(``<run>/logs/version_*/metrics.csv``, stitched across resumes: a later version replaces the
earlier ones from the step it starts at) and writes into the run folder

* ``summary.json`` (and the same, printed): each logged metric from its first to its last value,
  the steps run (start → end: a resumed run starts at its checkpoint's step), training forward
  passes of the module's model, ZO non-finite skips, seconds per training step, peak memory, the
  checkpoints written;
* ``loss.png`` (training / validation losses), ``unlearning.png`` (forget / retain / holdout
  metrics, when logged), ``zo.png`` (mean |projected gradient| per step and the non-finite skips,
  under ``ZeroOrder``/``QZO``), ``bilevel.png`` (the bilevel solver's f, g, gap, γ);
* ``samples.png``: after each validation, the module's ``last_samples`` (a diffusion module's
  class-conditional samples) as a grid whose rows are labelled with their class.

``zobi report RUN_DIR [RUN_DIR ...]`` renders the plots again from the files alone
(:func:`render_run`) and overlays several runs on one figure (:func:`compare_runs`).

Lightning internals relied on: loggers are finalized only after ``on_fit_end`` (``trainer/call.py``
``_call_teardown_hook``), so the callback flushes them (``logger.save()``) before reading the CSV.
Matplotlib is optional (``pip install lightning-zobi[report]``): without it the summary is still
written and one line says why there are no plots.

Memory: a few floats per step; the figures are drawn after training.
"""

from __future__ import annotations

import csv
import json
import math
import re
import resource
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

Series = dict[str, list[tuple[int, float]]]
"""metric name -> [(step, value), ...] sorted by step."""

SUMMARY_FILE = "summary.json"
UNLEARN_WORDS = ("forget", "retain", "holdout")
UNLEARN_EXTRA = ("mia_auc", "model_utility")
"""Unlearning metrics whose name says neither forget nor retain (membership inference, model utility)."""
_VERSION = re.compile(r"version_(\d+)$")


# ---------------------------------------------------------------------- reading the logs
def _read_csv(path: Path) -> Series:
    series: Series = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step_text = row.get("step") or ""
            if not step_text:
                continue
            step = int(float(step_text))
            for key, text in row.items():
                if key in ("step", "epoch") or key is None or text in ("", None):
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                series.setdefault(key, []).append((step, value))
    return series


def _version_key(path: Path) -> tuple[int, str]:
    match = _VERSION.search(path.parent.name)
    return (int(match.group(1)) if match else -1, str(path))


def read_metrics(run_dir: str | Path) -> Series:
    """The training metrics of ``run_dir`` (``logs/version_*/metrics.csv``), stitched in version order.

    A later version (a resumed run, or a fresh run in the same folder) replaces the earlier
    versions' points from its own first step on, so a resume continues the curve and a re-run from
    step 0 replaces it.
    """
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("logs/version_*/metrics.csv"), key=_version_key)
    if not files:  # a folder not written by `zobi` (Lightning's lightning_logs/version_N, a bare metrics.csv)
        files = sorted(run_dir.rglob("metrics.csv"), key=_version_key)
    merged: Series = {}
    for path in files:
        new = _read_csv(path)
        if not new:
            continue
        first = min(points[0][0] for points in new.values() if points)
        merged = {k: [(s, v) for s, v in pts if s < first] for k, pts in merged.items()}
        for key, pts in new.items():
            merged.setdefault(key, []).extend(pts)
    return {k: sorted(v, key=lambda p: p[0]) for k, v in merged.items() if v}


def _finite(points: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(s, v) for s, v in points if math.isfinite(v)]


def metric_ranges(series: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, dict[str, float]]:
    """``{name: {start, end, start_step, end_step}}`` over each metric's finite logged values."""
    out: dict[str, dict[str, float]] = {}
    for key in sorted(series):
        pts = _finite(series[key])
        if pts:
            out[key] = {
                "start": pts[0][1],
                "end": pts[-1][1],
                "start_step": pts[0][0],
                "end_step": pts[-1][0],
            }
    return out


# ---------------------------------------------------------------------- plots
def _plt() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def metric_groups(keys: Iterable[str]) -> dict[str, list[str]]:
    """Which logged keys go on which figure: ``loss``, ``unlearning``, ``zo``, ``bilevel``."""
    groups: dict[str, list[str]] = {"loss": [], "unlearning": [], "zo": [], "bilevel": []}
    for key in sorted(keys):
        low = key.lower()
        if low.startswith("zo/"):
            groups["zo"].append(key)
        elif low.startswith("bilevel/"):
            groups["bilevel"].append(key)
        elif any(word in low for word in UNLEARN_WORDS + UNLEARN_EXTRA):
            groups["unlearning"].append(key)
        elif "loss" in low and not low.endswith("_epoch"):
            groups["loss"].append(key)
    return {k: v for k, v in groups.items() if v}


_UNLEARN_TITLES = {
    "unlearn": "training loss terms",
    "em": "exact match",
    "prob": "answer probability",
    "rougeL": "ROUGE-L recall",
    "truth_ratio": "truth ratio",
    "truth_score": "truth score",
    "mia_auc": "loss MIA AUC (forget vs holdout)",
    "model_utility": "model utility",
    "forget_quality": "forget quality (KS p-value)",
}


def _panels(group: str, keys: list[str]) -> list[tuple[str, list[str]]]:
    """Split one group into panels of comparable scale: (title, keys)."""
    if group == "loss":
        train = [k for k in keys if not k.lower().startswith(("val", "test"))]
        val = [k for k in keys if k not in train]
        return [(t, ks) for t, ks in (("training loss", train), ("validation loss", val)) if ks]
    if group == "unlearning":
        by_metric: dict[str, list[str]] = {}
        for key in keys:  # val/forget/em and val/retain/em share a panel "em"
            parts = [p for p in key.split("/") if p and p.lower() not in UNLEARN_WORDS + ("val", "train")]
            by_metric.setdefault("/".join(parts) or key, []).append(key)
        return sorted((_UNLEARN_TITLES.get(k, k), v) for k, v in by_metric.items())
    if group == "zo":
        grads = [k for k in keys if "projected_grad" in k]
        skips = [k for k in keys if "nonfinite" in k]
        rest = [k for k in keys if k not in grads + skips]
        panels = [("mean |projected gradient|", grads), ("non-finite losses skipped (total)", skips)]
        return [(t, ks) for t, ks in panels + [(k, [k]) for k in rest] if ks]
    return [(k.split("/", 1)[-1], [k]) for k in keys]


def _figure(plt: Any, n: int, title: str) -> tuple[Any, list[Any]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, flat[:n]


def _draw(ax: Any, points: Sequence[tuple[int, float]], label: str, **kwargs: Any) -> None:
    """A curve; a noisy one (> 30 points) faint, with its running mean over ~1/20 of the run on top."""
    pts = _finite(points)
    if not pts:
        return
    steps, values = (list(x) for x in zip(*pts, strict=True))
    if len(pts) <= 30:
        ax.plot(steps, values, label=label, marker="o" if len(pts) <= 12 else None, markersize=3, **kwargs)
        return
    (line,) = ax.plot(steps, values, alpha=0.3, linewidth=0.8, **kwargs)
    width = max(2, len(pts) // 20)
    mean = [
        sum(values[max(0, i - width + 1) : i + 1]) / len(values[max(0, i - width + 1) : i + 1])
        for i in range(len(values))
    ]
    ax.plot(steps, mean, color=line.get_color(), label=f"{label} (mean of {width})", **kwargs)


def _style(ax: Any, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_series(series: Series, out_dir: str | Path, title: str = "") -> list[Path]:
    """One PNG per metric group present in ``series``; returns the files written."""
    plt = _plt()
    if plt is None:
        return []
    out_dir = Path(out_dir)
    written = []
    for group, keys in metric_groups(series).items():
        panels = _panels(group, keys)
        fig, axes = _figure(plt, len(panels), f"{title}: {group}" if title else group)
        for ax, (panel, panel_keys) in zip(axes, panels, strict=False):
            for key in panel_keys:
                _draw(ax, series[key], key)
            positive = all(v > 0 for k in panel_keys for _, v in _finite(series[k]))
            if group == "zo" and "projected" in panel and positive:
                ax.set_yscale("log")
            _style(ax, panel)
        fig.tight_layout()
        path = out_dir / f"{group}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path | None:
    """Overlay several runs' metrics, one panel per metric logged by at least one run, in ``out`` (PNG)."""
    plt = _plt()
    if plt is None:
        return None
    runs = {_run_label(Path(d), run_dirs): read_metrics(d) for d in run_dirs}
    keys = sorted({k for s in runs.values() for group in metric_groups(s).values() for k in group})
    if not keys:
        return None
    fig, axes = _figure(plt, len(keys), "runs compared: " + ", ".join(runs))
    for ax, key in zip(axes, keys, strict=False):
        for label, series in runs.items():
            if key in series:
                _draw(ax, series[key], label)
        _style(ax, key)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _run_label(path: Path, all_dirs: Sequence[str | Path]) -> str:
    """The shortest tail of ``path`` that tells it apart from the other runs."""
    parts = path.resolve().parts
    others = [Path(d).resolve().parts for d in all_dirs if Path(d).resolve() != path.resolve()]
    for n in range(1, len(parts) + 1):
        if all(o[-n:] != parts[-n:] for o in others):
            return "/".join(parts[-n:])
    return str(path)


def labelled_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    path: str | Path,
    title: str,
    names: Mapping[int, str] | None = None,
) -> Path | None:
    """Samples ``(N, C, H, W)`` in [-1, 1] as a grid, one row per class, each row labelled."""
    plt = _plt()
    if plt is None:
        return None
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    labels = labels.detach().cpu()
    classes = labels.unique(sorted=True).tolist()
    rows = [images[labels == c] for c in classes]
    cols = max(len(r) for r in rows)
    cell, left, top = 0.5, 1.0, 0.45  # inches: one image, the row labels, the title
    width, height = cell * cols + left + 0.1, cell * len(rows) + top + 0.1
    fig, axes = plt.subplots(len(rows), cols, figsize=(width, height), squeeze=False)
    grey = images.shape[-1] == 1
    for i, (cls, row) in enumerate(zip(classes, rows, strict=False)):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(row):
                img = row[j].numpy()
                ax.imshow(img[..., 0] if grey else img, cmap="gray" if grey else None, vmin=0, vmax=1)
        name = names.get(int(cls), str(cls)) if names else str(cls)
        axes[i][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(
        left=left / width,
        right=1 - 0.1 / width,
        bottom=0.1 / height,
        top=1 - top / height,
        wspace=0.08,
        hspace=0.08,
    )
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_run(run_dir: str | Path) -> list[Path]:
    """Draw a run folder's plots again from its ``metrics.csv`` files (``zobi report``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"{str(run_dir)!r} is not a run folder: pass the folder a `zobi fit` run wrote into."
        )
    series = read_metrics(run_dir)
    if not series:
        raise FileNotFoundError(
            f"{str(run_dir)!r} holds no metrics.csv: it is not a run folder, or the run had no CSV logger."
        )
    return plot_series(series, run_dir, title=run_dir.name)


# ---------------------------------------------------------------------- summary text
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
