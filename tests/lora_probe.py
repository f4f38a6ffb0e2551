"""A test-only callback: each rank saves its LoRA weights at the start and the end of ``fit``.

The DDP test runs ``meowdread fit`` in subprocesses (Lightning's launcher starts rank 1 by re-running the
command line), so the weights of every rank come back through files, named by rank.
"""

from pathlib import Path

import lightning.pytorch as pl
import torch


class SaveLoraPerRank(pl.Callback):
    """Writes ``<dirpath>/rank<N>-start.pt`` and ``rank<N>-end.pt``: ``{name: tensor}`` of the trainable weights."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, pl_module, "start")  # after DDP has wrapped the module and synced it from rank zero

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, pl_module, "end")

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        weights = {k: p.detach().cpu().clone() for k, p in pl_module.named_parameters() if p.requires_grad}
        torch.save(weights, self.dirpath / f"rank{trainer.global_rank}-{when}.pt")
