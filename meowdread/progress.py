"""Progress that reads well in a terminal and in a log file.

- In a terminal, Lightning's rich bar, with epochs counted from 1 ("Epoch 1/3") and without the logger's
  version number (``v_num``).
- Otherwise (stdout piped or redirected, where a live bar would appear only once, at the end), plain
  ``[meowdread]`` lines: one every quarter of an epoch and at least every 30 s, with the progress bar's metrics.
- Sampling (the sample callback's answers before training and after every epoch) logs a line every 10 s with
  the tokens generated so far.

The CLI adds :func:`default_bar` to the trainer's callbacks unless the config has a progress bar of its own or
``trainer.enable_progress_bar`` is false; ``meowdread.progress.LogProgress`` can also be given in a config's
``trainer.callbacks`` to get the plain lines in a terminal too.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from transformers.generation.streamers import BaseStreamer

log = logging.getLogger(__name__)


def _epoch(trainer: pl.Trainer) -> str:
    """``1/3`` during the first of three epochs."""
    total = trainer.max_epochs
    return f"{trainer.current_epoch + 1}/{total}" if total is not None and total > 0 else f"{trainer.current_epoch + 1}"


def _shown(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


class TerminalBar(RichProgressBar):
    """Lightning's rich bar with epochs counted from 1 and without ``v_num``."""

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's shows "Epoch 0/2" for 3 epochs
        description = f"Epoch {_epoch(self.trainer)}"
        return f"{description:{len(self.validation_description)}}"  # as Lightning pads it, against flicker

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the run directory's number, which the bar has no reason to show
        return items


class LogProgress(ProgressBar):
    """Progress as plain log lines, for a log file or a pipe: one line every ``every_fraction`` of an epoch (or of
    validation, test or predict) and at least every ``every_s`` seconds, and the validation metrics of each
    epoch of ``fit``.

    Args:
        every_s: most seconds between two lines while a loop runs.
        every_fraction: a line each time this share of the loop's batches is done.
    """

    def __init__(self, every_s: float = 30.0, every_fraction: float = 0.25):
        super().__init__()
        self.every_s, self.every_fraction = every_s, every_fraction
        self._enabled = True
        self._start = self._last = 0.0
        self._next_fraction = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _begin(self) -> None:
        self._start = self._last = time.monotonic()
        self._next_fraction = self.every_fraction

    def _advance(self, trainer: pl.Trainer, label: str, done: int, total: int | float, final: bool = False) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        known = isinstance(total, int) or (isinstance(total, float) and math.isfinite(total))
        fraction = done / total if known and total else 0.0
        due = final or now - self._last >= self.every_s or (known and fraction >= self._next_fraction - 1e-9)
        if not due:
            return
        while self._next_fraction <= fraction + 1e-9:
            self._next_fraction += self.every_fraction
        self._last = now
        count = f"{done}/{int(total)} batches ({fraction:.0%})" if known else f"{done} batches"
        metrics = self.get_metrics(trainer, trainer.lightning_module)
        metrics = {k: v for k, v in metrics.items() if k.startswith("train")}  # not the last epoch's val/loss
        tail = f", {_shown(metrics)}" if metrics and trainer.training else ""
        log.info("%s: %s, %.0f s%s", label, count, now - self._start, tail)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._advance(trainer, f"epoch {_epoch(trainer)}", batch_idx + 1, self.total_train_batches)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx=0) -> None:
        if trainer.state.fn != "fit":  # fit's validation is short: its result is the line that matters
            self._advance(trainer, "validate", batch_idx + 1, trainer.num_val_batches[dataloader_idx])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and trainer.state.fn == "fit" and not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            log.info("epoch %s: %s", _epoch(trainer), _shown(metrics) or "validated")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx=0) -> None:
        self._advance(trainer, "test", batch_idx + 1, trainer.num_test_batches[dataloader_idx])

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx=0) -> None:
        self._advance(trainer, "predict", batch_idx + 1, trainer.num_predict_batches[dataloader_idx])


def default_bar() -> ProgressBar:
    """The terminal bar when stdout is a terminal (where Lightning's rich bar draws), plain lines otherwise."""
    if sys.stdout.isatty() and _RICH_AVAILABLE:
        return TerminalBar()
    return LogProgress()


class TokenProgress(BaseStreamer):
    """A ``transformers`` streamer that logs how many tokens a (batched) ``generate`` call has produced, every
    ``every_s`` seconds: long sampling is never silent. Writes nothing for calls shorter than that."""

    def __init__(self, label: str, max_new_tokens: int, every_s: float = 10.0):
        self.label, self.max_new_tokens, self.every_s = label, max_new_tokens, every_s
        self.tokens = -1  # generate first puts the prompt
        self._start = self._last = time.monotonic()

    def put(self, value) -> None:
        self.tokens += 1
        now = time.monotonic()
        if self.tokens > 0 and now - self._last >= self.every_s:
            self._last = now
            log.info("%s: %d/%d tokens, %.0f s", self.label, self.tokens, self.max_new_tokens, now - self._start)

    def end(self) -> None:
        pass


def library_bars() -> None:
    """Outside a terminal, turn off the tqdm bars of transformers and huggingface_hub (loading weights, writing
    shards): redrawn with carriage returns, each is one long line in a log file, and says nothing that the next
    line does not."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
