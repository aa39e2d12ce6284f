"""The Lightning layer: callbacks, strategies, modules and datamodules (the only package importing lightning)."""
