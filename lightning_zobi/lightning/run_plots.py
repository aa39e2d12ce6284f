"""The metrics a run logged and their plots: read a run folder's CSV logs, draw PNGs, compare runs.

Used by :class:`~lightning_zobi.lightning.callbacks.report.RunReport` at the end of ``fit`` and by
``zobi report RUN_DIR [RUN_DIR ...]`` afterwards (:func:`render_run`, :func:`compare_runs`), from the
files alone. Matplotlib is optional (``pip install lightning-zobi[report]``).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

Series = dict[str, list[tuple[int, float]]]
"""metric name -> [(step, value), ...] sorted by step."""

SUMMARY_FILE = "summary.json"
UNLEARN_WORDS = ("forget", "retain", "holdout", "real_authors", "world_facts")
UNLEARN_EXTRA = ("mia_", "model_utility", "privleak")
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
