"""A full disk on demand: :class:`FillTheDisk` is a callback that fills a small filesystem (the ``small_disk``
fixture's tmpfs) at a chosen point of ``fit``, so that the next write there meets a real ENOSPC.

    --trainer.callbacks+ tests.disk.FillTheDisk --trainer.callbacks.directory DISK --trainer.callbacks.when train_end
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
    """Fills ``directory``'s filesystem once a checkpoint is in it, or when training ends (before the module
    exports its adapter: callbacks' ``on_train_end`` runs first)."""

    def __init__(self, directory: str, when: Literal["first_checkpoint", "train_end"] = "first_checkpoint"):
        self.directory, self.when = Path(directory), when

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.when == "first_checkpoint" and any(self.directory.glob("*.ckpt")):
            fill_disk(self.directory)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.when == "train_end":
            fill_disk(self.directory)
