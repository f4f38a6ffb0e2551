"""Callbacks: answers to fixed prompts in TensorBoard during ``fit``, and the ``predict`` report files."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger

from meowdread.generation import SamplingSettings, generate

log = logging.getLogger(__name__)


def write_atomic(path: Path, text: str) -> None:
    """Write beside ``path`` and rename over it: a crash never leaves half a file where a good one was."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


class SampleCallback(pl.Callback):
    """Answers fixed prompts before training and after every validation epoch, and logs them to TensorBoard.

    One text entry per epoch under ``samples`` (prompt and answer side by side) and the time it took under
    ``samples/seconds``. Only rank zero samples; the model's training mode and the RNG state are restored.

    Args:
        num_prompts: answer the first N prompts of ``data.prompts`` (all of them if None).
        max_new_tokens: overrides ``model.sampling.max_new_tokens`` here, to keep the callback cheap.
    """

    def __init__(self, num_prompts: int | None = 4, max_new_tokens: int | None = None):
        self.num_prompts, self.max_new_tokens = num_prompts, max_new_tokens

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sample(trainer, pl_module, "before training" if trainer.global_step == 0 else "resumed")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.sample(trainer, pl_module, f"epoch {trainer.current_epoch}")

    def sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule, label: str) -> None:
        if not trainer.is_global_zero:
            return
        settings: SamplingSettings = pl_module.sampling
        if self.max_new_tokens is not None:
            settings = replace(settings, max_new_tokens=self.max_new_tokens)
        prompts = trainer.datamodule.prompts[: self.num_prompts]
        start = time.perf_counter()
        with trainer.precision_plugin.forward_context():
            answers = generate(pl_module.model, pl_module.tokenizer, prompts, settings)
        seconds = time.perf_counter() - start
        rows = "\n".join(f"| {_cell(p)} | {_cell(a)} |" for p, a in zip(prompts, answers, strict=True))
        text = f"**{label}**, step {trainer.global_step}, {seconds:.1f} s\n\n| prompt | answer |\n|---|---|\n{rows}"
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", text, global_step=trainer.global_step)
            logger.log_metrics({"samples/seconds": seconds}, step=trainer.global_step)
        log.info("samples (%s) took %.1f s", label, seconds)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.jsonl`` and ``predictions.md`` (prompt, answer, sampling settings) to the run dir."""

    def __init__(self):
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        rows = [row for batch in predictions for row in batch]
        if trainer.world_size > 1:  # each rank answered every world_size-th prompt: put them back in file order
            indices = [i for batch in batch_indices[0] for i in batch]
            gathered: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, list(zip(indices, rows, strict=True)))
            rows = [row for _, row in sorted((pair for part in gathered for pair in part), key=lambda p: p[0])]
        out = Path(trainer.log_dir)  # a broadcast from rank zero: every rank must ask
        if not trainer.is_global_zero:
            return
        out.mkdir(parents=True, exist_ok=True)
        sampling = asdict(pl_module.sampling)
        source = pl_module.hparams.adapter or trainer.ckpt_path or "(no adapter: fresh LoRA, i.e. the base model)"
        lines = [json.dumps({**row, "sampling": sampling}, ensure_ascii=False) for row in rows]
        write_atomic(out / "predictions.jsonl", "\n".join(lines) + "\n")
        md = [
            "# Predictions",
            "",
            f"- model: `{pl_module.hparams.pretrained}`",
            f"- weights: `{source}`",
            f"- sampling: {', '.join(f'{k}={v}' for k, v in sampling.items())}",
            "",
        ]
        for row in rows:
            md += [f"## {row['prompt']}", "", row["answer"] or "*(empty)*", ""]
        write_atomic(out / "predictions.md", "\n".join(md))
        log.info("predictions written to %s", out)
        print(f"predictions: {out / 'predictions.md'}")


class SpeedMonitor(pl.Callback):
    """Trained tokens per second and peak GPU memory, measured on training batches only.

    The clock runs from the start of a training batch to the end of the next one without a gap, so
    validation and the sample callback are not counted; the first ``warmup_steps`` optimizer steps are left
    out. Peak memory is likewise that of training: the peak is set aside before validation (where the
    epoch-end samples are drawn) and reset after it. Logs ``perf/trained_tokens_per_s`` and
    ``perf/peak_mem_gb`` and prints a summary at the end of ``fit``. A trained token is one whose label is
    not -100 (no padding, no prompt). Under DDP, tokens are summed over all ranks and timed on rank zero;
    peak memory is rank zero's.
    """

    def __init__(self, warmup_steps: int = 5):
        self.warmup_steps = warmup_steps
        self.tokens = 0
        self.seconds = 0.0
        self.peak_bytes = 0  # training's peak before the last validation
        self._tokens = None  # on the device, so counting does not synchronise every batch
        self._start = None

    def _sync(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step >= self.warmup_steps and self._start is None:
            self._sync(trainer)
            self._start = time.perf_counter()
            self._tokens = torch.zeros((), dtype=torch.long, device=batch["labels"].device)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._start is not None:
            self._tokens += (batch["labels"][:, 1:] != -100).sum()

    def _stop(self, trainer: pl.Trainer) -> None:
        if self._start is None:
            return
        self._sync(trainer)
        self.seconds += time.perf_counter() - self._start
        # Ranks train on different examples, so their token counts differ: count them all. Every rank gets here
        # together (same hooks, same global step), so the collective cannot leave one waiting.
        self.tokens += int(trainer.strategy.reduce(self._tokens, reduce_op="sum"))
        self._start = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop(trainer)
        if trainer.training and trainer.strategy.root_device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(trainer.strategy.root_device))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.training and trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop(trainer)
        metrics = self.metrics(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """Throughput over all ranks and this rank's training peak memory, so far."""
        metrics = {}
        if self.seconds > 0:
            metrics["perf/trained_tokens_per_s"] = self.tokens / self.seconds
        if trainer.strategy.root_device.type == "cuda":
            peak = max(self.peak_bytes, torch.cuda.max_memory_allocated(trainer.strategy.root_device))
            metrics["perf/peak_mem_gb"] = peak / 2**30
        return metrics

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop(trainer)
        metrics = self.metrics(trainer)
        if trainer.is_global_zero and metrics:
            summary = ", ".join(f"{k.split('/')[1]}={v:.2f}" for k, v in metrics.items())
            print(f"speed: {summary} over {self.tokens} trained tokens in {self.seconds:.1f} s")
