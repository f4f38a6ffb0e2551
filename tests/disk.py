"""A full disk on demand: :class:`FillTheDisk` is a callback that fills a small filesystem (the ``small_disk``
fixture's tmpfs) at a chosen point of ``fit``, so that the next write there meets a real ENOSPC.

    --trainer.callbacks+ tests.disk.FillTheDisk --trainer.callbacks.directory DISK \
        --trainer.callbacks.when adapter_export
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning.pytorch as pl


def fill_disk(directory: str | Path) -> None:
    """Write a file in ``directory`` until its filesystem is full."""
    with open(Path(directory) / "filler", "ab", buffering=0) as f:
        try:
            while f.write(b"\0" * 65536):
                pass
        except OSError:
            pass


class FillTheDisk(pl.Callback):
    """Fills ``directory``'s filesystem once a checkpoint is in it, or just before the module exports its
    adapter (after every checkpoint of the run)."""

    def __init__(self, directory: str, when: Literal["first_checkpoint", "adapter_export"] = "first_checkpoint"):
        self.directory, self.when = Path(directory), when

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.when == "first_checkpoint" and any(self.directory.glob("*.ckpt")):
            fill_disk(self.directory)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.when == "adapter_export":
            export = pl_module.export_adapter

            def fill_then_export(directory, **kwargs):
                fill_disk(self.directory)
                return export(directory, **kwargs)

            pl_module.export_adapter = fill_then_export
