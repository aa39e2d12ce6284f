"""Callbacks that change how a LightningModule is optimized (one file per callback family)."""

from lightning_zobi.lightning.callbacks.bilevel import Bilevel
from lightning_zobi.lightning.callbacks.flatness import FlatnessMonitor
from lightning_zobi.lightning.callbacks.qzo import QZO
from lightning_zobi.lightning.callbacks.report import RunProgressBar, RunReport
from lightning_zobi.lightning.callbacks.reweighting import Reweighting
from lightning_zobi.lightning.callbacks.zero_order import ZeroOrder

__all__ = ["QZO", "Bilevel", "FlatnessMonitor", "Reweighting", "RunProgressBar", "RunReport", "ZeroOrder"]
