"""``FlatnessMonitor``: log a forward-only Hutchinson estimate of ``tr(∇²L)`` every N training steps.

"Zeroth-Order Optimization Finds Flat Minima" (arXiv 2506.05454): ZO-SGD implicitly minimises the
Hessian trace. This callback lets a user watch it (and compare rules, or ZO against first order) with
:func:`lightning_zobi.zo.diagnostics.hessian_trace`: ``2·probes + 1`` extra forwards on the step's
batch, no backward, θ never written.

Hooks: ``on_train_batch_end`` (after the optimizer step, so the trace is that of the updated model
on the batch just used). The loss is the module's ``training_step(batch, batch_idx)`` (the loss, or a
dict with ``"loss"``), run with the module's ``log`` silenced so the probes' perturbed losses are not
logged. Under ``ZeroOrder`` the ZO optimizer's perturber and seed are used; otherwise an exact
perturber over the trainable parameters (the same diagnostic for a first-order run).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_zobi.zo.diagnostics import hessian_trace
from lightning_zobi.zo.optim import ZOOptimizer


class FlatnessMonitor(Callback):
    """Log ``zo/hessian_trace`` (and ``zo/hessian_trace_stderr``) every ``every_n_steps`` steps.

    Args:
        every_n_steps: period in optimizer steps (the trace costs ``2·probes + 1`` forwards).
        probes: Gaussian directions per estimate (its error falls as ``1/√probes``).
        eps: probe scale ε (fp32: 1e-2..1e-3 keeps ``ε²·tr(H)`` above the loss's rounding).
        seed: seed of the probe directions when no ZO optimizer provides one.
    """

    def __init__(self, every_n_steps: int = 50, probes: int = 8, eps: float = 1e-2, seed: int = 0) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} is invalid: use an integer >= 1.")
        if not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes={probes!r} is invalid: use an integer >= 1.")
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps={eps!r} is invalid: use a float > 0 (e.g. 1e-2).")
        self.every_n_steps = every_n_steps
        self.probes = probes
        self.eps = float(eps)
        self.seed = int(seed)
        self.history: list[tuple[int, float, float]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        user_step = type(pl_module).training_step.__get__(pl_module)

        def closure() -> Tensor:
            out = user_step(batch, batch_idx)
            return out["loss"] if isinstance(out, dict) else out

        zo = next((o for o in trainer.optimizers if isinstance(o, ZOOptimizer)), None)
        if zo is None:
            zo = getattr(trainer.optimizers[0], "zo", None) if trainer.optimizers else None
            zo = zo if isinstance(zo, ZOOptimizer) else None
        was_training = pl_module.training
        pl_module.log = _silent  # type: ignore[method-assign]
        pl_module.log_dict = _silent  # type: ignore[method-assign]
        try:
            if zo is not None:
                est = hessian_trace(closure, zo, probes=self.probes, eps=self.eps)
            else:
                params = [p for p in pl_module.parameters() if p.requires_grad]
                est = hessian_trace(
                    closure,
                    params=params,
                    module=pl_module,
                    probes=self.probes,
                    eps=self.eps,
                    seed=self.seed,
                    step=step,
                )
        finally:
            del pl_module.log, pl_module.log_dict
            pl_module.train(was_training)
        self.history.append((step, est.value, est.stderr))
        pl_module.log("zo/hessian_trace", est.value, on_step=True, on_epoch=False)
        if est.stderr == est.stderr:  # not nan
            pl_module.log("zo/hessian_trace_stderr", est.stderr, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [tuple(h) for h in state_dict.get("history", [])]  # type: ignore[misc]


def _silent(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` while the probes run."""
