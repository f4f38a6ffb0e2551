"""Checkpoint files that survive a crash and cannot run code, a Ctrl-C that saves one, and RNG states to resume.

- :class:`SafeCheckpointIO` writes a checkpoint to ``<name>.tmp`` beside it, fsyncs it and renames it over the
  old one, so a kill or a full disk mid-save leaves the previous checkpoint whole. (Lightning's own
  ``TorchCheckpointIO`` stages the file in the system temp directory and moves it: when that is another
  filesystem, the move is a copy onto the target, which a kill can cut short.) It loads with
  ``torch.load(weights_only=True)`` whatever the caller asks: a checkpoint is tensors and plain values, and
  unpickling anything else could run code. An unreadable file is one :class:`CheckpointError`.
- :class:`SaveOnInterrupt`: the first Ctrl-C or SIGTERM lets the optimizer step under way finish, saves
  ``last.ckpt`` and exits (code 1 for Ctrl-C, 143 for SIGTERM) with the command that resumes there. A second
  Ctrl-C quits at once, unsaved.
- :func:`rng_states` and :func:`set_rng_states`: the RNG states a checkpoint carries, so that a resumed run
  draws the same LoRA dropout masks as an uninterrupted one.

The CLI installs the first two for every run:

    meowdread fit --config configs/tiny.yaml                    # Ctrl-C: saves last.ckpt, exits 1 (SIGTERM: 143)
    meowdread fit --config configs/tiny.yaml --ckpt_path last   # goes on from there
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import zipfile
from collections.abc import Iterator, Mapping
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


class WriteError(OSError):
    """A file or directory that could not be written: the message names it, and a full disk as such."""

    def __init__(self, path: str | Path, err: BaseException):
        self.path = Path(path)
        super().__init__(f"{path}: could not be written ({describe_write_error(err)})")


def is_disk_full(err: BaseException) -> bool:
    """Whether an error from writing a file is a full disk (or quota), whichever library raised it."""
    text = str(err)
    return (
        getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        or "No space left on device" in text
        or "os error 28" in text  # safetensors (Rust)
        or "unexpected pos" in text  # torch.save's zip writer, when a write comes up short
    )


def describe_write_error(err: BaseException) -> str:
    if is_disk_full(err):
        return "no space left on the device"
    return " ".join((getattr(err, "strerror", None) or str(err)).split())[:200] or type(err).__name__


@contextlib.contextmanager
def writing_directory(directory: Path) -> Iterator[None]:
    """Inside, a write that fails (a full disk above all, whichever library reports it) removes ``directory``
    and raises one :class:`WriteError` naming it."""
    try:
        yield
    except Exception as err:
        if not (isinstance(err, OSError) or is_disk_full(err)):
            raise
        shutil.rmtree(directory, ignore_errors=True)
        raise WriteError(directory, err) from err


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
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if isinstance(err, (OSError, RuntimeError)):  # torch's zip writer reports a full disk as RuntimeError
                raise WriteError(path, err) from err
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
    """Ctrl-C or SIGTERM during ``fit`` saves ``last.ckpt`` once the optimizer step under way is done, then exits.

    The save waits for a step boundary so that the checkpoint is a state the run really passed through (never
    half an optimizer update or half an accumulation window), which is what makes resuming from it exact.
    Under DDP the ranks agree on the step to stop at, so they all save and stop together.

    SIGTERM is what SLURM, Kubernetes and spot machines send before they kill a job. Ctrl-C exits with code 1
    (Lightning's), SIGTERM with 143 (128 + 15, as a shell reports a process ended by it), so a scheduler sees
    a failure and can restart the job with the printed resume command. A SIGTERM before training begins (while
    the model loads, during the sanity check or the base model's samples) or after the last step stops at
    once and says that nothing new was saved. :meth:`listening` installs that handler; the CLI runs inside
    it from before it parses the configuration.

    Lightning's own handlers are kept: SIGUSR1, SLURM's requeue signal, stays Lightning's (it saves an
    ``hpc_ckpt`` and requeues the job); Lightning's SIGTERM handler (which would end the epoch loop at the
    next batch, mid-window, with exit code 0) is set aside during training only, and put back after it.
    """

    def __init__(self, resume_command: str | None = None):
        self.resume_command = resume_command or "--ckpt_path last"
        self._requested: int | None = None
        self._step_at_batch_start = 0
        self._previous: dict[int, Any] = {}
        self._trainer: pl.Trainer | None = None
        self._trained = False

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        """Inside, a SIGTERM outside the training loop stops the command at once, with a message."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, self._on_sigterm_outside_training)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm_outside_training(self, signum: int, frame: Any) -> None:
        if self._trained:
            what = "after the last step: the run's checkpoints are saved, the adapter may not be exported"
        elif self._trainer is not None and self._trainer.state.fn == "fit":
            what = "before the first step: nothing new was trained or saved; run the same command again"
        else:
            what = "nothing new was saved; run the same command again"
        print(f"meowdread: stopped by SIGTERM {what}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGTERM)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer, self._trained = trainer, False

    def explain_failure(self, err: BaseException) -> str | None:
        """One line for a write that failed (a full disk above all): what it was writing, and, in ``fit``, the
        newest checkpoint still whole. None for other errors."""
        if isinstance(err, WriteError):
            what, path = str(err), err.path
        elif is_disk_full(err):
            what, path = f"no space left on the device ({' '.join(str(err).split())[:200]})", None
        else:
            return None
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return what
        saved = saved_checkpoints(trainer)
        if path is not None and path.suffix == ".ckpt" and path.is_file():  # the save failed; the old file is whole
            saved = sorted({*saved, path}, key=lambda p: p.stat().st_mtime)
        good = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved yet"
        return f"{what}; {good}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._requested = None
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._requested is not None:
            if signum == signal.SIGINT:  # the second Ctrl-C: quit now
                self._restore_handlers()
                raise KeyboardInterrupt
            return  # a second SIGTERM: the save is under way already
        self._requested = signum
        if signum == signal.SIGTERM and self._trainer is not None:
            launcher = self._trainer.strategy.launcher
            if launcher is not None:  # processes this one started (DDP ranks) get it too, as Lightning does
                launcher.kill(signum)
        again = "Ctrl-C again to quit without saving" if signum == signal.SIGINT else "SIGKILL to quit without saving"
        print(
            f"\nmeowdread: {signal.Signals(signum).name}: saving a checkpoint after the current step ({again})",
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
        requested = self._requested or 0
        if not trainer.strategy.reduce_boolean_decision(bool(requested), all=False):  # any rank asked
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # the full state: a checkpoint to resume from
        if trainer.is_global_zero:
            name = signal.Signals(requested).name if requested else "another rank's signal"
            print(
                f"meowdread: interrupted ({name}) at step {trainer.global_step}: saved {path}; resume with: "
                f"{self.resume_command}",
                file=sys.stderr,
                flush=True,
            )
        if requested == signal.SIGINT:
            raise KeyboardInterrupt  # Lightning tears down and exits with code 1
        raise SystemExit(128 + signal.SIGTERM)  # Lightning tears down and re-raises it

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = True
        self._restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()


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


def plain_values(value: Any) -> Any:
    """``value`` with dataclasses as dicts, tuples as lists and classes or functions as their import paths:
    what ``torch.load(weights_only=True)`` and ``hparams.yaml`` can hold."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): plain_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_values(v) for v in value]
    if isinstance(value, functools.partial):
        return {"class_path": plain_values(value.func), "init_args": plain_values(value.keywords)}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)
