"""``zobi``: the LightningCLI entry point (``zobi fit --config recipes/quickstart.yaml``).

Any LightningModule / LightningDataModule can be named by ``class_path`` in a recipe; callbacks
such as ``lightning_zobi.ZeroOrder`` go in ``trainer.callbacks`` or on the command line
(``--trainer.callbacks+=lightning_zobi.ZeroOrder --trainer.callbacks.lr=1e-4``).

What ``zobi`` adds to a plain ``LightningCLI``, so that recipes need none of it:

* **one run folder per recipe**: ``recipes/<family>/<name>.yaml`` runs in ``runs/<family>/<name>/``
  (``recipes/<name>.yaml`` in ``runs/<name>/``) unless ``trainer.default_root_dir`` is given. It
  holds ``config.yaml`` (re-runs as is: every default is a ``class_path``, never an instance),
  ``checkpoints/`` (``last.ckpt`` always, so ``--ckpt_path last`` resumes at the saved step in the
  same folder), ``logs/version_N/`` (TensorBoard where installed, and CSV), ``summary.json`` and
  the PNG plots of :class:`~lightning_zobi.lightning.callbacks.report.RunReport`;
* checkpoints written atomically (:class:`~lightning_zobi.lightning.checkpoint_io.AtomicCheckpointIO`);
* errors in a config (a typo'd rule name, an unknown key) and our own validation errors raised while
  the run is set up, printed in a few lines instead of tracebacks (``ZOBI_TRACEBACK=1`` shows them);
* the warnings that are not the user's concern filtered, a progress bar without ``Epoch 3/-2``;
* ``zobi report RUN_DIR [RUN_DIR ...]``: draw a run's plots again, and compare runs on one figure;
* ``zobi chain NAME``: run a chain of recipes in order (``zobi chain --list``).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

RUNS_ROOT = "runs"
ATOMIC_CHECKPOINT_IO = {"class_path": "lightning_zobi.lightning.checkpoint_io.AtomicCheckpointIO"}

CHAINS: dict[str, tuple[str, ...]] = {
    "llm-unlearning": ("llm/learn_facts", "llm/retain_only", "llm/unlearn_*"),
    "diffusion": (
        "diffusion/judge",
        "diffusion/teacher",
        "diffusion/prune",
        "diffusion/two_phase",
        "diffusion/distill_unlearn",
    ),
}
"""Recipe chains (paths under ``recipes/``, globs allowed): each stage reads what the one before exported."""

CHAIN_COMPARE: dict[str, tuple[str, ...]] = {
    "llm-unlearning": ("llm/unlearn_*",),
    "diffusion": ("diffusion/prune", "diffusion/two_phase", "diffusion/distill_unlearn"),
}
"""The stages whose runs a finished chain overlays on one figure (``runs/<family>/compare.png``)."""

CHAIN_HELP = {
    "llm-unlearning": "teach a tiny Llama the facts, train the retain-only reference, then every unlearning recipe",
    "diffusion": "digit judge, teacher UNet, then the students: pruned, two-phase, one-phase (bilevel)",
}

DESCRIPTION = (
    "zobi fit|validate|test|predict --config RECIPE [--key=value ...]: LightningCLI; runs go to runs/<family>/<recipe>/. "
    "Also: `zobi report RUN_DIR [RUN_DIR ...]` (plots, comparison) and `zobi chain NAME` (a chain of recipes; "
    "`zobi chain --list`)."
)

_QUIET_WARNINGS = (
    r".*Unable to serialize instance",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r".*'set_vital' is deprecated",
    r".*isinstance\(treespec, LeafSpec\)",
    r".*Checkpoint directory .* exists and is not empty",
    r"LightningCLI's args parameter is intended",  # main(args) from Python (tests, `zobi chain`) is how we call it
    r"Experiment logs directory .* exists and is not empty",  # our TB and CSV loggers share logs/version_N
)
_QUIET_INFO = ("💡 Tip: For seamless cloud",)


def _quiet() -> None:
    """Filter Lightning's and dependencies' notices that are not the user's concern (a recipe cannot act on them)."""
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(_QUIET_INFO)

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in log.filters):
            log.addFilter(_Drop())


# ---------------------------------------------------------------------- run folders
def _recipes_dir() -> Path:
    here = Path.cwd() / "recipes"
    return here if here.is_dir() else Path(__file__).resolve().parents[1] / "recipes"


def run_dir_for(config_path: str | os.PathLike[str] | None, fallback: str = "cli") -> Path:
    """``runs/<family>/<name>`` for ``recipes/<family>/<name>.yaml`` (``runs/<name>`` for ``recipes/<name>.yaml``).

    A config outside a ``recipes`` folder runs in ``runs/<its folder's name>/<name>``.
    """
    if config_path is None:
        return Path(RUNS_ROOT) / fallback
    path = Path(os.fspath(config_path)).resolve()
    parts = path.with_suffix("").parts
    if "recipes" in parts:
        tail = parts[len(parts) - 1 - parts[::-1].index("recipes") + 1 :]
        return Path(RUNS_ROOT, *tail)
    return Path(RUNS_ROOT, path.parent.name, path.stem)


def default_loggers(run_dir: str | os.PathLike[str], name: str = "logs") -> list[Any]:
    """TensorBoard (where installed) and CSV loggers writing to ``<run_dir>/<name>/version_N`` (one N for both).

    ``fit`` logs to ``logs/``; ``validate``/``test``/``predict`` to a folder named after themselves, so their
    metrics do not enter the training curves that ``RunReport`` stitches from ``logs/version_*``.
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    logs = Path(run_dir) / name
    taken = [int(m.group(1)) for p in logs.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    version = max(taken, default=-1) + 1
    loggers: list[Any] = []
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(run_dir, name=name, version=version, default_hp_metric=False))
    loggers.append(CSVLogger(run_dir, name=name, version=version))
    return loggers


class RunConfigCallback(SaveConfigCallback):
    """Save ``config.yaml`` in the log folder (Lightning's place) and, for ``fit``, at the top of the run folder.

    ``validate``/``test`` configs stay in their own log folders: theirs have keys (``verbose``) that ``fit``
    refuses, so the run folder's ``config.yaml`` is always the one that re-runs the training.
    """

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.parser.save(
            self.config, root / self.config_filename, skip_none=False, overwrite=True, multifile=False
        )


class _SetupDone(Callback):
    """Marks the end of set-up (first sanity-check or training batch): later errors keep their traceback."""

    def __init__(self) -> None:
        self.done = False

    def on_sanity_check_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.done = True

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.done = True


class SetupError(Exception):
    """A configuration or validation error met before training starts: printed without a traceback."""


class ZobiCLI(LightningCLI):
    """LightningCLI with zobi's run folder, checkpointing, report, quiet logs and short errors (module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from lightning_zobi.lightning.callbacks.report import RunReport
        from lightning_zobi.lightning.checkpoint_io import RunCheckpoint

        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(RunReport, "report")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg["trainer"]
        if trainer.get("default_root_dir") is None:
            configs = cfg.get("config") or []
            model = cfg.get("model")
            name = str(getattr(model, "class_path", "") or "model").rsplit(".", 1)[-1]
            trainer["default_root_dir"] = str(
                run_dir_for(configs[-1] if configs else None, fallback=f"cli/{name}")
            )
        if cfg.get("checkpoint") is not None and cfg["checkpoint"].get("dirpath") is None:
            cfg["checkpoint"]["dirpath"] = str(Path(trainer["default_root_dir"]) / "checkpoints")
        max_steps, every = trainer.get("max_steps") or -1, trainer.get("log_every_n_steps")
        if max_steps > 0 and every is not None and every > max_steps:  # a short run would log nothing
            trainer["log_every_n_steps"] = max(1, max_steps // 5)
        interval = trainer.get("val_check_interval")
        step_based = trainer.get("check_val_every_n_epoch") is None
        if step_based and max_steps > 0 and type(interval) is int and interval > max_steps:
            trainer["val_check_interval"] = max_steps  # ... and never validate: validate once, at the end

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as err:
            raise SetupError(str(err)) from err

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        from lightning_zobi.lightning.callbacks.report import RunProgressBar, RunTQDMProgressBar

        if config.get("logger") in (None, True):
            name = "logs" if self.subcommand in (None, "fit") else str(self.subcommand)
            config["logger"] = default_loggers(config["default_root_dir"], name)
        if config.get("enable_checkpointing") is False:  # the recipe turned checkpointing off: no last.ckpt
            forced = self._get(self.config_init, "checkpoint", default=None)
            callbacks = [cb for cb in callbacks if cb is not forced]
        given = list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(cb, ProgressBar) for cb in given
        ):
            from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

            # ahead of RunReport: its teardown (which prints the summary) then runs after the bar stopped
            callbacks.insert(0, RunProgressBar() if _RICH_AVAILABLE else RunTQDMProgressBar())
        self.setup_done = _SetupDone()
        callbacks.append(self.setup_done)
        return super()._instantiate_trainer(config, callbacks)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except (ValueError, TypeError, MisconfigurationException, FileNotFoundError) as err:
            if getattr(self, "setup_done", None) is not None and not self.setup_done.done:
                raise SetupError(str(err)) from err
            raise


# ---------------------------------------------------------------------- short errors
def short_error(message: str) -> str:
    """jsonargparse's nested message cut to what the user must change (a few lines)."""
    lines = [ln.rstrip() for ln in message.splitlines() if ln.strip()]
    literal = re.compile(r"Expected a (?:typing\.)?Literal\[(.*)\]\. Got value: (.*)")
    for i, line in enumerate(lines):
        m = literal.search(line)
        if not m:
            continue
        choices = ", ".join(c.strip().strip("'\"") for c in m.group(1).split(","))
        keys, owner = [], ""
        indent = len(line) - len(line.lstrip())
        for prev in reversed(lines[:i]):  # walk up to the enclosing keys / class
            p_indent = len(prev) - len(prev.lstrip())
            if p_indent >= indent:
                continue
            indent = p_indent
            k = re.search(r'Parser key "([^"]+)"', prev)
            c = re.search(r"class_path '([^']+)'", prev)
            if k:
                keys.append(k.group(1))
            elif c and not owner:
                owner = c.group(1).rsplit(".", 1)[-1]
        key = ".".join(reversed(keys))
        where = f"{owner}({keys[0]}=...)" if owner and keys else key
        return f"{where}: {m.group(2).strip()!r} is not one of: {choices}.\n(config key {key})"
    option = re.compile(r"Option '([^']+)' is not accepted")
    for i, line in enumerate(lines):
        m = option.search(line)
        if not m:
            continue
        owner = next(
            (c.group(1) for prev in reversed(lines[:i]) if (c := re.search(r"class_path '([^']+)'", prev))),
            "",
        )
        key = next(
            (k.group(1) for prev in reversed(lines[:i]) if (k := re.search(r'Parser key "([^"]+)"', prev))),
            "",
        )
        accepted = _init_args(owner)
        hint = difflib.get_close_matches(m.group(1), accepted, n=1)
        text = f"{owner.rsplit('.', 1)[-1] or key}: option {m.group(1)!r} is not accepted"
        text += f"; did you mean {hint[0]!r}?" if hint else ""
        if accepted:
            text += f"\n(options: {', '.join(accepted)})"
        return text + (f"\n(config key {key})" if key else "")
    # anything else: the specific lines, without the alternatives that failed anyway
    noise = (
        "Subtypes:",
        "Errors:",
        "Given value",
        "Expected a <class 'NoneType'>",
        "Does not validate against",
        "Not a valid subclass",
        "Subclass types expect",
        "a class path",
        "a dict",
    )
    kept = [ln.strip().removeprefix("- ") for ln in lines]
    kept = [ln for ln in kept if not ln.startswith(noise) and "'lightning.Callback'" not in ln]
    return "\n".join(kept[:4]) if kept else lines[0].strip()


def _init_args(class_path: str) -> list[str]:
    """The ``__init__`` argument names of ``class_path`` (empty when it does not import)."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def _fail(prog: str, message: str, code: int = 2) -> None:
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(code)


# ---------------------------------------------------------------------- entry points
def run_cli(args: list[str] | None = None) -> ZobiCLI:
    """Parse ``args`` (``sys.argv`` when None), run the subcommand, return the CLI (its ``trainer``, ``model``)."""
    from lightning_zobi.lightning.callbacks.zero_order import refresh_rule_names

    _quiet()
    refresh_rule_names()  # rules registered after the callbacks were imported are choices too
    argv = sys.argv[1:] if args is None else list(args)
    prog = "zobi " + (argv[0] if argv and not argv[0].startswith("-") else "")
    traceback = os.environ.get("ZOBI_TRACEBACK", "") not in ("", "0")
    try:
        return ZobiCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunConfigCallback,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False, "description": DESCRIPTION},
            args=args,
            auto_configure_optimizers=False,
            trainer_defaults={"plugins": [ATOMIC_CHECKPOINT_IO]},
        )
    except ArgumentError as err:
        if traceback:
            raise
        _fail(prog.strip(), short_error(str(err)) + f"\n(`{prog.strip()} --help` lists every option)")
    except SetupError as err:
        if traceback:
            raise
        _fail(prog.strip(), short_error(str(err)))
    raise AssertionError("unreachable")


def main(args: list[str] | None = None) -> None:
    """``zobi``: ``fit|validate|test|predict`` (LightningCLI), ``report`` and ``chain``."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "report":
        report_main(argv[1:])
        return
    if argv and argv[0] == "chain":
        chain_main(argv[1:])
        return
    run_cli(args)


def report_main(argv: list[str]) -> None:
    """``zobi report RUN_DIR [RUN_DIR ...] [--out compare.png]``."""
    from lightning_zobi.lightning.run_plots import compare_runs, render_run

    parser = argparse.ArgumentParser(
        prog="zobi report",
        description="Draw a run folder's plots again from its logs (loss.png, unlearning.png, zo.png, bilevel.png); "
        "with several folders, also overlay them on one figure.",
    )
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="a folder a `zobi fit` run wrote (runs/...)"
    )
    parser.add_argument(
        "--out", default=None, help="comparison figure (default: <common parent>/compare.png)"
    )
    ns = parser.parse_args(argv)
    for run_dir in ns.run_dirs:
        try:
            written = render_run(run_dir)
        except FileNotFoundError as err:
            _fail("zobi report", str(err))
        print(
            f"{run_dir}: "
            + (", ".join(p.name for p in written) if written else "no plots (matplotlib missing?)")
        )
    if len(ns.run_dirs) > 1:
        out = ns.out or str(
            Path(os.path.commonpath([os.path.abspath(d) for d in ns.run_dirs])) / "compare.png"
        )
        path = compare_runs(ns.run_dirs, out)
        print(
            f"compared {len(ns.run_dirs)} runs: {path}" if path else "nothing to compare (no shared metric)"
        )


def chain_stages(name: str, recipes: Path | None = None) -> list[Path]:
    """The recipe files of chain ``name``, in run order."""
    if name not in CHAINS:
        raise ValueError(f"chain {name!r} is unknown; choose one of: {', '.join(CHAINS)}.")
    recipes = recipes or _recipes_dir()
    stages: list[Path] = []
    for pattern in CHAINS[name]:
        found = sorted(recipes.glob(pattern + ".yaml"))
        if not found:
            raise FileNotFoundError(f"chain {name!r}: no recipe matches recipes/{pattern}.yaml")
        stages.extend(p for p in found if p not in stages)
    return stages


def chain_main(argv: list[str]) -> None:
    """``zobi chain NAME [--from STAGE] [--only STAGE ...] [--dry-run] [fit overrides ...]``."""
    listing = "\n".join(f"  {n}: {' -> '.join(CHAINS[n])}\n      {CHAIN_HELP[n]}" for n in CHAINS)
    parser = argparse.ArgumentParser(
        prog="zobi chain",
        description="Run a chain of recipes in order, each as `zobi fit --config recipes/<stage>.yaml [overrides]`.",
        epilog="chains:\n" + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", nargs="?", choices=list(CHAINS), help="the chain")
    parser.add_argument("--list", action="store_true", help="list the chains and their stages")
    parser.add_argument(
        "--from", dest="start", default=None, help="start at this stage (e.g. llm/unlearn_ga)"
    )
    parser.add_argument("--only", nargs="+", default=None, help="run only these stages")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    ns, overrides = parser.parse_known_args(argv)
    if ns.list or ns.name is None:
        print("chains:\n" + listing)
        return
    try:
        stages = chain_stages(ns.name)
    except (ValueError, FileNotFoundError) as err:
        _fail("zobi chain", str(err))
    recipes = _recipes_dir()
    names = [p.relative_to(recipes).with_suffix("").as_posix() for p in stages]
    if ns.start is not None:
        if ns.start not in names:
            _fail("zobi chain", f"--from {ns.start!r} is not a stage of {ns.name}: {', '.join(names)}")
        stages, names = stages[names.index(ns.start) :], names[names.index(ns.start) :]
    if ns.only is not None:
        unknown = [s for s in ns.only if s not in names]
        if unknown:
            _fail("zobi chain", f"--only {unknown} not stages of {ns.name}: {', '.join(names)}")
        stages = [p for p, n in zip(stages, names, strict=False) if n in ns.only]
        names = [n for n in names if n in ns.only]
    for i, (path, stage) in enumerate(zip(stages, names, strict=False), 1):
        command = [sys.executable, "-m", "lightning_zobi.cli", "fit", "--config", str(path), *overrides]
        print(f"[{i}/{len(stages)}] zobi fit --config {path} {' '.join(overrides)}".rstrip(), flush=True)
        if ns.dry_run:
            continue
        code = subprocess.call(command)
        if code:
            _fail(
                "zobi chain", f"stage {stage} failed (exit {code}); rerun from it with --from {stage}", code
            )
    leaves = {p for pattern in CHAIN_COMPARE[ns.name] for p in recipes.glob(pattern + ".yaml")}
    done = [run_dir_for(p) for p in stages if p in leaves and (run_dir_for(p) / "summary.json").exists()]
    if not ns.dry_run and len(done) > 1:
        report_main([str(r) for r in done])


if __name__ == "__main__":
    main()
