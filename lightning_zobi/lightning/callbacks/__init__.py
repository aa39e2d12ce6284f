"""Callbacks that change how a LightningModule is optimized (one file per callback family)."""

from lightning_zobi.lightning.callbacks.zero_order import ZeroOrder

__all__ = ["ZeroOrder"]
