"""The LightningModule: a bitsandbytes 4-bit Phi-3 with peft LoRA adapters, and the training step.

The research surface is small on purpose. ``training_step``, ``validation_step`` and ``test_step`` call
:meth:`QLoraModule.model_step` with the stage (``"train"``, ``"val"``, ``"test"``), which embeds the input
(:meth:`~QLoraModule.embed`), runs the model (with :meth:`~QLoraModule.attention_kwargs`, which a
padding-free batch needs), and calls :meth:`~QLoraModule.compute_loss`. Override one of
these in a subclass, and run it with ``--model my_pkg.MyModule``; its own ``__init__`` arguments become
options and hyperparameters (see ``examples/``).

    meowdread fit --config configs/tiny.yaml
    meowdread fit --config configs/tiny.yaml --config examples/neftune.yaml
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torchmetrics import MeanMetric

from meowdread import packing, speed
from meowdread.adapters import LoraSettings, QuantizationSettings, find_unmatched_targets, linear_names
from meowdread.checkpoints import (
    load_checkpoint_file,
    lora_misfits,
    plain_values,
    rng_states,
    saved_checkpoints,
    set_rng_states,
    umask_modes,
    writing_directory,
)
from meowdread.data import IGNORE_INDEX, load_tokenizer
from meowdread.embedded import resolve_pretrained
from meowdread.generation import SamplingSettings, generate
from meowdread.model_card import write_card
from meowdread.speed import Kernels

log = logging.getLogger(__name__)


class WarmupSchedule(LambdaLR):
    """Linear warm-up over ``warmup_ratio`` of the run, then constant, linear or cosine decay to zero."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_ratio: float = 0.03,
        decay: Literal["constant", "linear", "cosine"] = "constant",
    ):
        warmup = max(1, math.ceil(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0
        after = max(1, total_steps - warmup)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / after)
            if decay == "linear":
                return 1.0 - progress
            if decay == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        super().__init__(optimizer, factor)


class QLoraModule(pl.LightningModule):
    """Phi-3 in 4-bit NF4, adapted with LoRA.

    Args:
        pretrained: hub id, local directory, or ``embedded:tiny-phi3`` (the offline stand-in).
        quantization: how the base is loaded.
        lora: the adapter; ignored when ``adapter`` is given.
        adapter: a saved peft adapter directory to start from (and to predict with).
        gradient_checkpointing: recompute activations in the backward pass to save memory: ``true`` for every
            decoder layer, a number N for the first N only (the others keep their activations: less work, more
            memory), ``false`` for none.
        upcast_frozen_weights: cast the base's unquantized weights (embeddings, norms, lm_head) to fp32,
            as peft's ``prepare_model_for_kbit_training`` does. Costs memory (bnb #1569, trl PR #4457); off by default.
        trust_remote_code: run modelling code from the hub. Phi-3 is native in transformers: keep it off.
        attn_implementation: transformers attention backend (``sdpa``, ``eager``, ``flash_attention_2``).
        compile: ``torch.compile`` each decoder layer for training (regional compilation: one graph reused by
            every layer; validation and sampling stay eager). Fuses the many small kernels of norms, LoRA and
            bitsandbytes between the matmuls; needs Triton on a GPU (a C++ compiler on the CPU).
        kernels: ``fused`` runs each 4-bit LoRA layer as one autograd function in training calls, each
            RMSNorm as one kernel, and Phi-3's rotary embedding and SwiGLU as one kernel each way (Triton on a
            GPU; :mod:`meowdread.fused`, any device); ``liger`` runs the same LoRA layers
            with Liger's Triton RMSNorm and SwiGLU for Phi-3 (needs ``liger-kernel`` and a CUDA GPU);
            ``torch`` keeps peft's and transformers' own modules, and is what ``compile`` needs.
        optimizer: built on the LoRA parameters; paged AdamW in the GPU recipe, AdamW elsewhere.
        scheduler: built with the optimizer and the run's total optimizer steps.
        sampling: how ``predict`` (and by default the sample callback) samples answers.
        compare_base: ``predict`` also answers every prompt with the adapter disabled (the base model), and
            the report puts both side by side.
    """

    def __init__(
        self,
        pretrained: str = "microsoft/Phi-3-mini-4k-instruct",
        quantization: QuantizationSettings = QuantizationSettings(),
        lora: LoraSettings = LoraSettings(),
        adapter: str | None = None,
        gradient_checkpointing: bool | int = True,
        upcast_frozen_weights: bool = False,
        trust_remote_code: bool = False,
        attn_implementation: str = "sdpa",
        compile: bool = False,
        kernels: Kernels = "torch",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: Callable[[Optimizer, int], LRScheduler] = WarmupSchedule,
        sampling: SamplingSettings = SamplingSettings(),
        compare_base: bool = False,
    ):
        super().__init__()
        self.quantization, self.lora, self.sampling = quantization, lora, sampling
        if adapter is None:
            lora.to_peft()  # a bad LoRA setting is one error now, not after the base has loaded
        self.compare_base = compare_base
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        # Every __init__ argument, a subclass's own included: LightningCLI hands over the parsed config, and a
        # module built in Python has its constructor calls read. Then as plain values (settings as dicts,
        # classes as import paths), so that checkpoints load with torch.load(weights_only=True).
        # compare_base is not a hyperparameter: a checkpoint's value must not override the command line's.
        self.save_hyperparameters(ignore=["compare_base"])
        self.save_hyperparameters(plain_values(self.hparams))
        self.strict_loading = False  # checkpoints hold the LoRA weights only; on_load_checkpoint checks them
        self.model = None
        self.tokenizer = None
        self.eval_loss = MeanMetric()
        self._window_loss = torch.zeros(())
        self._window_tokens = torch.zeros(())
        self._rng_to_restore: dict | None = None

    # ----------------------------------------------------------------- building
    def configure_model(self, device: torch.device | str | None = None) -> None:
        """Load the quantized base on this rank's device (or ``device``) and wrap it with LoRA (once)."""
        if self.model is not None:
            return
        from peft import PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM

        hp = self.hparams
        speed.check_kernels(hp.get("kernels", "torch"), hp.compile)
        path = resolve_pretrained(hp.pretrained)
        if not Path(path).exists() and path.count("/") != 1:
            raise FileNotFoundError(f"model.pretrained: {path!r} is neither a directory nor a hub id (org/name)")
        if device is None:
            device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        device = torch.device(device)
        if device.type == "cuda":
            # PyTorch picks cuDNN attention first on Hopper, and cuDNN builds an execution plan for every new
            # sequence length: 2-3 ms of CPU per layer and batch, more than the whole GPU step at these sizes.
            # FlashAttention-2 (no mask: see ``_step``) needs no plan.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.tokenizer = load_tokenizer(hp.pretrained)
        base = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=self.quantization.to_transformers(),
            dtype=getattr(torch, self.quantization.compute_dtype),
            device_map={"": device},
            trust_remote_code=hp.trust_remote_code,
            attn_implementation=hp.attn_implementation,
        )
        base.config.use_cache = False  # generation turns it back on per call
        speed.apply_kernels(base, hp.get("kernels", "torch"))
        self._prepare_base(base)
        if hp.adapter:
            try:
                self.model = PeftModel.from_pretrained(base, hp.adapter, is_trainable=True)
            except (RuntimeError, ValueError) as err:  # size mismatch, or targets that the base does not have
                raise ValueError(
                    f"{hp.adapter}: model.adapter: an adapter of {adapter_base(hp.adapter)!r} does not fit "
                    f"model.pretrained {hp.pretrained!r}: {_first_problem(err)}"
                ) from None
        else:
            unmatched = find_unmatched_targets(base, self.lora.target_modules)
            if unmatched:
                kind = getattr(base.config, "model_type", type(base).__name__)
                raise ValueError(
                    f"model.lora.target_modules: {unmatched} match no module of {hp.pretrained}. Its linear "
                    f"layers ({kind}) are {linear_names(base)}; or use all-linear"
                )
            self.model = get_peft_model(base, self.lora.to_peft())
        speed.apply_lora_kernels(self.model, hp.get("kernels", "torch"))
        if hp.compile:
            speed.compile_training_layers(base.model.layers)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("LoRA: %d trainable parameters on %s", trainable, hp.pretrained)

    def _prepare_base(self, base) -> None:
        """Freeze the base and set up activation checkpointing for k-bit training."""
        # from_pretrained returns the model in eval mode, and Lightning keeps modules' modes: without this,
        # transformers would skip activation checkpointing (it checks ``self.training``) and LoRA dropout.
        base.train()
        for module in base.modules():
            # On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight on its first eval-mode
            # forward, and from then on uses a kernel with no autograd: the gradient through the frozen
            # weight to earlier layers is silently dropped. Keep the differentiable layout.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        if self.hparams.upcast_frozen_weights:
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        base.requires_grad_(False)
        speed.enable_checkpointing(base, self.hparams.gradient_checkpointing)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        scheduler = self.scheduler_factory(optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- steps
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def embed(self, input_ids: torch.Tensor, stage: str) -> torch.Tensor:
        """The input embeddings the model runs on in :meth:`model_step`: the place for noise or other changes
        to the input (NEFTune is one override, ``examples/neftune.py``)."""
        return self.model.get_input_embeddings()(input_ids)

    def compute_loss(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over trained tokens, and how many there were.

        Returning the sum lets the step normalise by the trained tokens of a whole accumulation window (and
        of all ranks), not average per-batch means (transformers PR #34191). Only labelled positions reach the
        fp32 log-softmax, which saves memory over the 32k vocabulary. ``stage`` is ``"train"``, ``"val"`` or
        ``"test"``: a regulariser added only when it is ``"train"`` leaves ``val/loss`` comparable.
        """
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        loss_sum = F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="sum")
        return loss_sum, keep.sum()

    def model_step(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The step that training, validation and test share: :meth:`embed`, the model, :meth:`compute_loss`.

        Returns the summed loss and the number of trained tokens it sums over.
        """
        # Batches are right-padded (``data.collate``): under causal attention no real token can see a pad
        # token after it, so the padding mask changes no logit that has a label. Without it, attention runs
        # the plain causal kernel (FlashAttention-2) instead of a masked one.
        inputs = self.embed(batch["input_ids"], stage)
        logits = self.model(inputs_embeds=inputs, **self.attention_kwargs(batch)).logits
        return self.compute_loss(logits, batch, stage)

    def attention_kwargs(self, batch: dict[str, torch.Tensor]) -> dict:
        """What a forward pass of ``batch`` needs besides its tokens: for a padding-free batch
        (``data.padding_free``) the positions and example boundaries that keep its examples apart (see
        :mod:`meowdread.packing`); nothing for a padded one. Pass them to any other forward of the batch."""
        if not packing.is_packed(batch):
            return {}
        packing.make_packable(self.model.get_base_model())
        return packing.packed_model_kwargs(batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, n_tokens = self.model_step(batch, "train")
        self._window_loss = self._window_loss.to(loss_sum.device) + loss_sum.detach()
        self._window_tokens = self._window_tokens.to(loss_sum.device) + n_tokens
        return loss_sum

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Turn the accumulated gradient of summed losses into the gradient of the window's token mean.

        Lightning divides each micro-batch loss by ``accumulate_grad_batches`` and DDP averages over ranks,
        so the factor is ``accumulate * world / trained tokens of the window on all ranks``. Runs before
        Lightning clips gradients, so clipping sees the true gradient.
        """
        tokens = self.trainer.strategy.reduce(self._window_tokens.float(), reduce_op="sum").clamp(min=1)
        loss = self.trainer.strategy.reduce(self._window_loss, reduce_op="sum") / tokens
        if not torch.isfinite(loss):  # before the update: the weights and the checkpoints stay as they were
            raise FloatingPointError(
                f"training diverged at step {self.trainer.global_step + 1}: the loss is {loss.item()}. Stopped "
                f"before updating the weights; {self._last_good_checkpoint()}. Try a lower "
                "model.optimizer.init_args.lr, or look for odd examples in data.corpus"
            )
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / tokens
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, scale)  # one kernel launch for the 256 LoRA tensors of Phi-3-mini, not 256
        self.log("train/loss", loss, prog_bar=True, sync_dist=False)
        self.log("train/trained_tokens", tokens, reduce_fx="sum", sync_dist=False)
        self._window_loss = torch.zeros((), device=loss.device)
        self._window_tokens = torch.zeros((), device=loss.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n_tokens = self.model_step(batch, "val")
        self.eval_loss.update(loss_sum / n_tokens.clamp(min=1), weight=n_tokens)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n_tokens = self.model_step(batch, "test")
        self.eval_loss.update(loss_sum / n_tokens.clamp(min=1), weight=n_tokens)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        """Token-weighted mean loss over the whole epoch (all ranks), and its perplexity."""
        loss = self.eval_loss.compute()  # gathers every rank's sums: the same value on all of them
        self.eval_loss.reset()
        # sync_dist only averages identical values here; it keeps Lightning from warning under DDP.
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/ppl", torch.exp(loss), sync_dist=True)

    def predict_step(self, batch: dict[str, list[str]], batch_idx: int) -> list[dict[str, str]]:
        """``[{prompt, answer}]``, and ``base_answer`` (the adapter disabled) with ``compare_base``."""
        prompts = batch["prompts"]
        answers = generate(self.model, self.tokenizer, prompts, self.sampling)
        rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
        if self.compare_base:
            with self.model.disable_adapter():
                base = generate(self.model, self.tokenizer, prompts, self.sampling)
            for row, answer in zip(rows, base, strict=True):
                row["base_answer"] = answer
        return rows

    # ----------------------------------------------------------------- checkpoints and export
    def trainable_state_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the LoRA weights: the frozen base is reloaded from ``pretrained`` (Lightning #19149).

        Never saves weights that are not finite, so the checkpoints on disk stay good ones; the RNG states go
        along, for an exact resume.
        """
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        self._check_finite(checkpoint["state_dict"], "a checkpoint")
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint whose LoRA weights do not fit this model, naming the first misfit."""
        own = {name: p for name, p in self.named_parameters() if p.requires_grad}
        problems = lora_misfits(own, checkpoint.get("state_dict", {}))
        if problems:
            ckpt_path = self._trainer.ckpt_path if self._trainer is not None else None
            where = f"{ckpt_path}: ckpt_path: " if ckpt_path else ""
            trained_on = checkpoint.get("hyper_parameters", {}).get("pretrained", "another model")
            raise ValueError(
                f"{where}the checkpoint does not fit this model ({self.hparams.pretrained}, LoRA r={self.lora.r} "
                f"on {self.lora.target_modules}): {'; '.join(problems)}. It was trained on {trained_on}, "
                "with another model.pretrained or model.lora"
            )
        # Restored at the first resumed batch: whatever runs before it (sanity check, samples) draws nothing
        # that the uninterrupted run drew at that point.
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        self._rng_to_restore = checkpoint.get("rng_states") if fitting else None

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def _check_finite(self, state: dict[str, torch.Tensor], what: str) -> None:
        bad = [name for name, value in state.items() if not torch.isfinite(value).all()]
        if bad:
            step = f" by step {self._trainer.global_step}" if self._trainer is not None else ""
            raise FloatingPointError(
                f"training diverged{step}: {len(bad)} LoRA weights are not finite ({bad[0]}), so {what} was not "
                f"written; {self._last_good_checkpoint()}. Try a lower model.optimizer.init_args.lr"
            )

    def _last_good_checkpoint(self) -> str:
        saved = saved_checkpoints(self._trainer) if self._trainer is not None else []
        return f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved yet"

    def load_lora_weights(self, ckpt_path: str | Path) -> None:
        """Load the LoRA weights of a ``fit`` checkpoint into the configured model, outside a Trainer run
        (``chat``, ``export``); checked as on resume."""
        checkpoint = load_checkpoint_file(ckpt_path)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError(f"{ckpt_path}: not a Lightning checkpoint (no state_dict)")
        self.on_load_checkpoint(checkpoint)
        self.load_state_dict(checkpoint["state_dict"], strict=False)  # the base is not in it, by design

    def on_train_end(self) -> None:
        # fast_dev_run is a smoke test with no run directory: nothing to export.
        if self.trainer.fast_dev_run:
            return
        # trainer.log_dir broadcasts rank zero's directory: every rank must ask, or rank zero waits forever.
        run_dir = Path(self.trainer.log_dir)
        if self.trainer.is_global_zero:
            path = self.export_adapter(run_dir / "adapter", trainer=self.trainer)
            log.info("adapter saved to %s", path)

    def export_adapter(self, directory: str | Path, trainer: pl.Trainer | None = None) -> Path:
        """Save the adapter in peft's format with the tokenizer and a model card (:mod:`meowdread.model_card`:
        with ``trainer``'s data, settings, metrics and samples after ``fit``), replacing ``directory`` atomically."""
        directory = Path(directory)
        self._check_finite({n: p for n, p in self.named_parameters() if p.requires_grad}, "the adapter")
        staging = directory.with_name(directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with writing_directory(staging):  # a full disk: one error naming the directory, which is removed
            self.model.save_pretrained(staging, save_embedding_layers=False)  # never resized; "auto" asks the hub
            self.tokenizer.save_pretrained(staging)
            write_card(staging, self, trainer)
        umask_modes(staging)
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            directory.rename(old)
        staging.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
        return directory


def adapter_base(adapter: str | Path) -> str:
    """The base model a peft adapter directory says it was trained on."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    return str(config.get("base_model_name_or_path"))


def _first_problem(err: Exception) -> str:
    """The first informative line of a loading error (torch lists every mismatched tensor)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else repr(err))
    return detail[:300]
