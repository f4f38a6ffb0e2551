"""Checkpoint files that survive a crash and cannot run code, a Ctrl-C that saves one, and RNG states to resume.

- :class:`SafeCheckpointIO` writes a checkpoint to ``<name>.tmp`` beside it, fsyncs it and renames it over the
  old one, so a kill or a full disk mid-save leaves the previous checkpoint whole. (Lightning's own
  ``TorchCheckpointIO`` stages the file in the system temp directory and moves it: when that is another
  filesystem, the move is a copy onto the target, which a kill can cut short.) It loads with
  ``torch.load(weights_only=True)`` whatever the caller asks: a checkpoint is tensors and plain values, and
  unpickling anything else could run code. An unreadable file is one :class:`CheckpointError`.
- :class:`SaveOnInterrupt`: the first Ctrl-C lets the optimizer step under way finish, saves ``last.ckpt``
  and exits with code 1; ``--ckpt_path last`` resumes there. A second Ctrl-C quits at once, unsaved.
- :func:`rng_states` and :func:`set_rng_states`: the RNG states a checkpoint carries, so that a resumed run
  draws the same LoRA dropout masks as an uninterrupted one.

The CLI installs the first two for every run:

    meowdread fit --config configs/tiny.yaml                    # Ctrl-C: saves last.ckpt, exits 1
    meowdread fit --config configs/tiny.yaml --ckpt_path last   # goes on from there
"""

from __future__ import annotations

import os
import pickle
import random
import re
import signal
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def umask_modes(directory: Path) -> None:
    """Give the files in ``directory`` the mode a plain ``open()`` gives (``0o666`` less the umask): safetensors
    writes through a temporary file created 0600 (safetensors/safetensors#782), which leaves the weights of an
    adapter or an export unreadable to anyone else, beside 0644 configs."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: ckpt_path: {problem}")


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, with one readable :class:`CheckpointError` for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its directory is at the very end
        raise CheckpointError(path, "not a complete checkpoint (truncated, or not written by torch.save)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            path, f"refused: it holds a pickled object{what}, not only weights, and loading it could run code"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(path, f"not a readable checkpoint ({str(err).splitlines()[0]})") from None


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, durable saves and weights-only loads of local checkpoint files (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own handling
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:  # make the rename itself durable
            os.fsync(directory)
        finally:
            os.close(directory)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_file(path, map_location=map_location)


def lora_misfits(own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> list[str]:
    """How a checkpoint's LoRA weights fail to fit a model's: missing, unexpected, of another shape."""
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    resized = [k for k in sorted(set(own) & set(saved)) if own[k].shape != saved[k].shape]
    problems = [f"{len(missing)} LoRA weights missing ({missing[0]})"] if missing else []
    problems += [f"{len(unexpected)} unexpected ({unexpected[0]})"] if unexpected else []
    if resized:
        k = resized[0]
        shapes = f"{tuple(saved[k].shape)} in the checkpoint, {tuple(own[k].shape)} here"
        problems.append(f"{len(resized)} of another shape ({k}: {shapes})")
    return problems


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """Where ``last.ckpt`` goes: the checkpoint callback's directory, else ``<run dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST))
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def saved_checkpoints(trainer: pl.Trainer) -> list[Path]:
    """The checkpoint files this run's callbacks have written so far, newest last."""
    paths = {
        Path(p)
        for callback in trainer.checkpoint_callbacks
        for p in (getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", ""))
        if p and Path(p).is_file()
    }
    return sorted(paths, key=lambda p: p.stat().st_mtime)


class SaveOnInterrupt(pl.Callback):
    """Ctrl-C during ``fit`` saves ``last.ckpt`` once the optimizer step under way is done, then exits.

    The save waits for a step boundary so that the checkpoint is a state the run really passed through (never
    half an optimizer update or half an accumulation window), which is what makes resuming from it exact.
    Under DDP the ranks agree on the step to stop at, so they all save and stop together.
    """

    def __init__(self):
        self._requested = False
        self._step_at_batch_start = 0
        self._previous_handler: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._requested = False
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._requested:  # the second Ctrl-C: quit now
            self._restore_handler()
            raise KeyboardInterrupt
        self._requested = True
        print(
            "\nmeowdread: Ctrl-C: saving a checkpoint after the current step (Ctrl-C again to quit without saving)",
            file=sys.stderr,
            flush=True,
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._step_at_batch_start:  # inside an accumulation window: not yet
            return
        if not trainer.strategy.reduce_boolean_decision(self._requested, all=False):  # any rank asked
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # the full state: a checkpoint to resume from
        if trainer.is_global_zero:
            print(
                f"meowdread: interrupted at step {trainer.global_step}: saved {path}; resume with --ckpt_path last",
                file=sys.stderr,
                flush=True,
            )
        raise KeyboardInterrupt  # Lightning tears down and exits with code 1

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()


def rng_states() -> dict[str, Any]:
    """The torch (CPU and CUDA), Python and NumPy RNG states, as tensors and plain values (weights-only safe)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
