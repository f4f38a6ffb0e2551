"""Callbacks: answers to fixed prompts and their metrics in TensorBoard during ``fit``, the ``predict`` report
files, and training throughput."""

from __future__ import annotations

import contextlib
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

from meowdread import report
from meowdread.board import log_hparams, scalars_layout
from meowdread.checkpoints import WriteError
from meowdread.generation import SamplingSettings, generate
from meowdread.metrics import Lexicon, SampleMetrics, base_nll
from meowdread.progress import TokenProgress
from meowdread.report import cell, describe_scores, number

log = logging.getLogger(__name__)


def write_atomic(path: Path, text: str) -> None:
    """Write beside ``path`` and rename over it: a crash never leaves half a file where a good one was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise WriteError(path, err) from err
        raise


def build_sample_metrics(datamodule, **kwargs) -> SampleMetrics:
    """The sample metrics of a data module: its lexicons, and its training replies for memorization."""
    lexicons = [Lexicon.load(path) for path in datamodule.hparams.lexicons]
    return SampleMetrics(lexicons, datamodule.train_replies, **kwargs)


class SampleCallback(pl.Callback):
    """Answers fixed prompts before training and after every validation epoch, scores the answers, and logs
    both to TensorBoard.

    - Text ``samples``: each prompt with its answer and the answer's scores, one entry per epoch.
    - Scalars ``samples/<metric>`` (see :class:`meowdread.metrics.SampleMetrics`) and ``samples/seconds``,
      the time the callback took (sampling and scoring).
    - The first entry, at step 0, is the base model: its answers are sampled with the adapter disabled, so
      every curve starts where the model started, also with ``model.adapter``. A run resumed from a
      checkpoint has its step 0 already; its first entry is the resumed weights' answers.
    - At fit's start, the Custom Scalars layout (:func:`meowdread.board.scalars_layout`); at its end, the run's
      hyperparameters with the final ``val/loss``, ``val/ppl`` and sample metrics (the last point of each
      curve) go to TensorBoard's HParams tab: one comparable row per run (:func:`meowdread.board.log_hparams`).
    - ``history`` keeps every entry's prompts, answers and metrics, for the adapter's model card
      (:mod:`meowdread.model_card`), which puts the base model's answers beside the last ones.

    Only rank zero samples; the model's training mode and the RNG state are restored. The latest prompts,
    answers and per-answer scores stay on the callback (``last_prompts``, ``last_answers``, ``last_scores``).

    To score answers another way, subclass it and override :meth:`compute_metrics` (each returned scalar is
    logged as ``samples/<name>`` and goes into the HParams row), :meth:`sample_metrics` (the metric
    collection) or :meth:`generate` (how the answers are sampled); ``examples/extra_metric.py`` adds one.

    Args:
        num_prompts: answer the first N prompts of ``data.prompts`` (all of them if None). More prompts give
            steadier metrics; the prompts are answered in one batch.
        max_new_tokens: overrides ``model.sampling.max_new_tokens`` here, to keep the callback cheap.
    """

    def __init__(self, num_prompts: int | None = None, max_new_tokens: int | None = None):
        self.num_prompts, self.max_new_tokens = num_prompts, max_new_tokens
        self.metrics: SampleMetrics | None = None
        self.latest: dict[str, float] = {}
        self.last_prompts: list[str] = []
        self.last_answers: list[str] = []
        self.last_scores: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []  # {label, step, base, prompts, answers, metrics} per entry

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Here, so that a bad lexicon stops the run before the model loads.
        if stage == "fit" and trainer.is_global_zero:
            self.metrics = self.sample_metrics(trainer, pl_module)

    def sample_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> SampleMetrics:
        """The metrics the answers are scored with (built once, at setup): the data module's lexicons and its
        training replies."""
        return build_sample_metrics(trainer.datamodule, sync_on_compute=False)

    def generate(self, pl_module: pl.LightningModule, prompts: list[str], settings: SamplingSettings) -> list[str]:
        """The answers to ``prompts``, through the one sampler (:func:`meowdread.generation.generate`)."""
        streamer = TokenProgress("sampling", settings.max_new_tokens)  # a line every 10 s of a long sampling
        return generate(pl_module.model, pl_module.tokenizer, prompts, settings, streamer=streamer)

    def compute_metrics(
        self, prompts: list[str], answers: list[str], nll: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Each answer's scores (shown beside it in the ``samples`` text) and the scalars over all answers
        (logged as ``samples/<name>``). ``nll`` and ``tokens`` are each answer's summed negative
        log-likelihood under the base model and its token count."""
        self.metrics.reset()
        scores = self.metrics.update(answers, nll, tokens)
        return scores, self.metrics.compute()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            self.write_layout(trainer)
            self.sample(trainer, pl_module, "base model (adapter disabled), before training", base=True)
        else:
            self.sample(trainer, pl_module, "resumed")

    def write_layout(self, trainer: pl.Trainer) -> None:
        """TensorBoard's Custom Scalars tab (once per run): the loss curves, then each sample metric on a chart of
        its own, whose step 0 is the base model, so that base and tuned sit on one line."""
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(scalars_layout(list(self.metrics.versions)))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.sample(trainer, pl_module, f"epoch {trainer.current_epoch}")

    def settings(self, pl_module: pl.LightningModule) -> SamplingSettings:
        if self.max_new_tokens is None:
            return pl_module.sampling
        return replace(pl_module.sampling, max_new_tokens=self.max_new_tokens)

    def sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule, label: str, base: bool = False) -> None:
        if not trainer.is_global_zero:
            return
        prompts = trainer.datamodule.prompts[: self.num_prompts]
        model, tokenizer = pl_module.model, pl_module.tokenizer
        settings = self.settings(pl_module)
        if base:
            log.info("sampling %d prompts (at most %d tokens each): %s", len(prompts), settings.max_new_tokens, label)
        start = time.perf_counter()
        with trainer.precision_plugin.forward_context():
            with model.disable_adapter() if base else contextlib.nullcontext():
                answers = self.generate(pl_module, prompts, settings)
            nll, tokens = base_nll(model, tokenizer, prompts, answers)
        scores, self.latest = self.compute_metrics(prompts, answers, nll, tokens)
        self.last_prompts, self.last_answers, self.last_scores = prompts, answers, scores
        seconds = time.perf_counter() - start
        self.history.append(
            {"label": label, "step": trainer.global_step, "base": base, "prompts": prompts, "answers": answers}
            | {"metrics": dict(self.latest)}
        )
        summary = " · ".join(f"{k} {number(v)}" for k, v in self.latest.items())
        rows = "\n".join(
            f"| {cell(prompt)} | {cell(answer)} | {describe_scores(score)} |"
            for prompt, answer, score in zip(prompts, answers, scores, strict=True)
        )
        text = (
            f"**{label}**, step {trainer.global_step}, {seconds:.1f} s\n\n{summary}\n\n"
            f"| prompt | answer | scores |\n|---|---|---|\n{rows}"
        )
        metrics = {f"samples/{k}": v for k, v in self.latest.items()} | {"samples/seconds": seconds}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", text, global_step=trainer.global_step)
            logger.log_metrics(metrics, step=trainer.global_step)
        log.info("samples (%s) took %.1f s: %s", label, seconds, summary)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.fast_dev_run or not self.latest:
            return
        # The HParams tab shows each metric's last value: the final epoch's.
        final = [key for key in ("val/loss", "val/ppl") if key in trainer.callback_metrics]
        final += [f"samples/{k}" for k in self.latest]
        params = self.hyperparameters(trainer, pl_module)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                log_hparams(logger, params, final, step=trainer.global_step)

    def hyperparameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The module's and data module's hyperparameters (as Lightning logs them at the start), with the
        optimizer, the trainer's schedule, the samples' settings and the lexicon versions."""
        optimizer = trainer.optimizers[0]
        group = optimizer.param_groups[0]
        settings = self.settings(pl_module)
        given = {**pl_module.hparams, **trainer.datamodule.hparams}
        return {
            **{k: v for k, v in given.items() if not k.startswith("_")},  # not LightningCLI's _instantiator
            "optimizer": {
                "name": type(optimizer).__name__,
                "lr": group.get("initial_lr", group["lr"]),  # the configured rate, before any schedule
                "weight_decay": group.get("weight_decay"),
            },
            "trainer": {
                "max_epochs": trainer.max_epochs,
                "global_step": trainer.global_step,
                "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "world_size": trainer.world_size,
                "precision": trainer.precision,
                "gradient_clip_val": trainer.gradient_clip_val,
            },
            "samples": {
                "prompts": len(trainer.datamodule.prompts[: self.num_prompts]),
                "max_new_tokens": settings.max_new_tokens,
            },
            "lexicon_versions": self.metrics.versions,
        }


def predictions_dir(ckpt_path: str | None, adapter: str | None, logs: str | Path) -> Path:
    """Where ``predict`` writes: ``<run>/predictions`` for a run's ``checkpoints/last.ckpt`` or its ``adapter/``,
    ``<run>/predictions-<name>`` for another checkpoint ``<name>.ckpt`` of the run (an epoch's, the best one),
    so that predicting from two checkpoints of one run keeps both reports; ``<logs>/predictions``
    (``lightning_logs/predictions``) for anything else."""
    if ckpt_path:
        ckpt = Path(ckpt_path)
        if ckpt.parent.name == "checkpoints":
            name = "predictions" if ckpt.stem == "last" else f"predictions-{ckpt.stem}"
            return ckpt.parent.parent / name
    elif adapter:
        run = Path(adapter).parent
        if (run / "checkpoints").is_dir() or (run / "config.yaml").is_file():
            return run / "predictions"
    return Path(logs) / "predictions"


class PredictionWriter(BasePredictionWriter):
    """Writes the ``predict`` report to ``trainer.log_dir``: ``predictions.jsonl``, ``predictions.md`` and
    ``predictions_summary.json`` (see :mod:`meowdread.report`). The CLI runs ``predict`` without a logger and
    with that directory set to :func:`predictions_dir`, so the report sits next to the run it came from.

    Every answer is scored (:class:`meowdread.metrics.SampleMetrics`), and so is the set of them. With
    ``model.compare_base``, the base model's answers are scored too and shown beside them.
    """

    def __init__(self):
        super().__init__(write_interval="epoch")
        self.metrics: SampleMetrics | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before sampling, so that a missing corpus or a bad lexicon costs no answers.
        if stage == "predict" and trainer.is_global_zero:
            self.metrics = build_sample_metrics(trainer.datamodule, sync_on_compute=False)

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        rows = [row for batch in predictions for row in batch]
        columns = {"answers": "answer", "base": "base_answer"} if pl_module.compare_base else {"answers": "answer"}
        prompts = [row["prompt"] for row in rows]
        with trainer.precision_plugin.forward_context():  # each rank scores its own answers
            for column in columns.values():
                nll, tokens = base_nll(pl_module.model, pl_module.tokenizer, prompts, [row[column] for row in rows])
                for row, row_nll, row_tokens in zip(rows, nll.tolist(), tokens.tolist(), strict=True):
                    row[column + "_nll"] = (row_nll, row_tokens)
        if trainer.world_size > 1:  # each rank answered every world_size-th prompt: put them back in file order
            indices = [i for batch in batch_indices[0] for i in batch]
            gathered: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, list(zip(indices, rows, strict=True)))
            rows = [row for _, row in sorted((pair for part in gathered for pair in part), key=lambda p: p[0])]
        out = Path(trainer.log_dir)  # a broadcast from rank zero: every rank must ask
        if not trainer.is_global_zero:
            return
        scores, summaries = {}, {}
        for key, column in columns.items():
            nll = torch.tensor([row[column + "_nll"][0] for row in rows], dtype=torch.float64)
            tokens = torch.tensor([row[column + "_nll"][1] for row in rows], dtype=torch.long)
            self.metrics.reset()
            scores[key] = self.metrics.update([row[column] for row in rows], nll, tokens)
            summaries[key] = self.metrics.compute()
        scored = []
        for i, row in enumerate(rows):
            scored.append({"prompt": row["prompt"], "answer": row["answer"], "scores": scores["answers"][i]})
            if "base" in scores:
                scored[-1]["base"] = {"answer": row["base_answer"], "scores": scores["base"][i]}
        out.mkdir(parents=True, exist_ok=True)
        weights = pl_module.hparams.adapter or trainer.ckpt_path or "(no adapter: fresh LoRA, i.e. the base model)"
        header = {
            "model": pl_module.hparams.pretrained,
            "weights": weights,
            "sampling": asdict(pl_module.sampling),
            "lexicons": self.metrics.versions,
        }
        write_atomic(out / "predictions.jsonl", report.predictions_jsonl(scored, header))
        write_atomic(out / "predictions_summary.json", report.summary_json(scored, summaries, header))
        write_atomic(out / "predictions.md", report.predictions_markdown(scored, summaries, header))
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

    def _in_fit_on_cuda(self, trainer: pl.Trainer) -> bool:
        # Not ``trainer.training``: that is False inside fit's validation loop, which is exactly where the
        # epoch-end samples are drawn.
        return trainer.state.fn == "fit" and trainer.strategy.root_device.type == "cuda"

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop(trainer)
        if self._in_fit_on_cuda(trainer):
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(trainer.strategy.root_device))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_fit_on_cuda(trainer):
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
