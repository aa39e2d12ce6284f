"""Checkpoints that are never half-written, and weights exported as safetensors.

Lightning's ``TorchCheckpointIO`` saves through an fsspec transaction that stages the file in the
system temp folder and *moves* it into place: across file systems that move is a copy, so a kill
during it can still leave a truncated ``last.ckpt``. ``AtomicCheckpointIO`` stages the file next to
its destination, ``fsync``s it and ``os.replace``s it over the old one: POSIX guarantees that a
reader then sees either the old or the new checkpoint, whole. Loading uses ``weights_only=True``.

Resuming a ZO checkpoint without the ``ZeroOrder``/``QZO`` callback would silently continue as
first-order training: torch's ``Optimizer.load_state_dict`` ignores the ``"zo"`` entry and
Lightning never looks at it. Nothing of ours is on that path except what a ZO run left in the
checkpoint, so the callbacks tag every saved ZO parameter group with ``"zo_rule"`` (torch copies a
saved group's keys into the loading optimizer's groups), and a global optimizer-step pre-hook
(:func:`install_zo_resume_guard`, installed when ``lightning_zobi`` is imported) refuses a step of
any non-ZO optimizer whose groups carry that tag: the run stops before its first update.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import save_file
from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook

ZO_GROUP_TAG = "zo_rule"
"""Key the ZO callbacks add to each saved parameter group of a ZO optimizer (value: the rule's name)."""

_GUARD: list[Any] = []


def refuse_zo_state_in_first_order_optimizer(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    """Global step pre-hook: a first-order optimizer that loaded a ZO optimizer's state must not step.

    Only the tag is checked (a few dict look-ups per step); ZO optimizers themselves pass.
    """
    from lightning_zobi.zo.optim import ZOOptimizer  # lazy: keeps this module light to import

    for group in optimizer.param_groups:
        rule = group.get(ZO_GROUP_TAG)
        if rule is not None and not isinstance(optimizer, ZOOptimizer):
            raise RuntimeError(
                f"{type(optimizer).__name__} was loaded from a zeroth-order checkpoint (ZO rule {rule!r}) but no ZO "
                "callback is attached, so this resume would silently continue as first-order training: add the "
                "callback that made it, e.g. Trainer(callbacks=[ZeroOrder(...)]) (or QZO), or start a first-order run "
                "from its weights only (Module.load_from_checkpoint(path), then fit without ckpt_path)."
            )


def install_zo_resume_guard() -> None:
    """Register :func:`refuse_zo_state_in_first_order_optimizer` once per process (idempotent)."""
    if not _GUARD:
        _GUARD.append(register_optimizer_step_pre_hook(refuse_zo_state_in_first_order_optimizer))


install_zo_resume_guard()


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and whose loads are ``weights_only``.

    ``Trainer(plugins=[AtomicCheckpointIO()])``; the ``zobi`` CLI installs it by default.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO does not take storage_options (got {storage_options!r}); "
                "use Lightning's TorchCheckpointIO for remote storage."
            )
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        if not Path(path).exists():
            raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist: check --ckpt_path.")
        return pl_load(
            path, map_location=map_location, weights_only=True if weights_only is None else weights_only
        )


class RunCheckpoint(ModelCheckpoint):
    """The ``zobi`` CLI's checkpoint: ``last.ckpt`` always, so ``--ckpt_path last`` resumes at the saved step.

    A ``ModelCheckpoint`` whose defaults differ in two places: ``save_last="link"`` (``last.ckpt`` links to
    the latest checkpoint, one file on disk; a resumed run finds it in ``dirpath`` and overwrites it) and
    ``enable_version_counter=False`` (a re-run in the same folder writes ``last.ckpt``, not ``last-v1.ckpt``).
    Its ``state_key`` is its own, so a recipe may add its own ``ModelCheckpoint`` (e.g. weights-only exports)
    beside it: Lightning refuses two checkpoint callbacks with the same key.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        save_last: bool | Literal["link"] | None = "link",
        save_top_k: int = 1,
        save_weights_only: bool = False,
        mode: str = "min",
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        enable_version_counter: bool = False,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            save_last=save_last,
            save_top_k=save_top_k,
            save_weights_only=save_weights_only,
            mode=mode,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=every_n_epochs,
            enable_version_counter=enable_version_counter,
        )

    @property
    def state_key(self) -> str:
        return "Run" + super().state_key


def export_safetensors(
    module: nn.Module, path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """Write ``module``'s state dict as a safetensors file (shared tensors de-duplicated), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state, seen = {}, {}
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else None
        if key is not None and key in seen:  # tied weights: safetensors refuses aliases
            continue
        if key is not None:
            seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
