"""``zobi``: the LightningCLI entry point (``zobi fit --config recipes/quickstart.yaml``).

Any LightningModule / LightningDataModule can be named by ``class_path`` in a recipe; callbacks
such as ``lightning_zobi.ZeroOrder`` go in ``trainer.callbacks`` or on the command line
(``--trainer.callbacks+=lightning_zobi.ZeroOrder --trainer.callbacks.lr=1e-4``). Checkpoints are
written atomically (:class:`~lightning_zobi.lightning.checkpoint_io.AtomicCheckpointIO`).
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_zobi.lightning.checkpoint_io import AtomicCheckpointIO


def main(args: list[str] | None = None) -> None:
    """Run the CLI on ``args`` (``sys.argv`` when None)."""
    LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
        trainer_defaults={"plugins": [AtomicCheckpointIO()]},
    )


if __name__ == "__main__":
    main()
