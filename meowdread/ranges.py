"""The valid range of every numeric setting, checked in one place: one line naming the key, the value and the range.

``meowdread`` checks the parsed configuration against :data:`RANGES` before anything heavy loads
(:func:`meowdread.checks.check_config`), and the settings dataclasses check their own fields when they are
built (:func:`check_fields`), so a Python user of :class:`meowdread.adapters.LoraSettings` or
:class:`meowdread.generation.SamplingSettings` gets the same message:

    meowdread fit --config configs/tiny.yaml --model.lora.dropout 1.5
    meowdread: error: model.lora.dropout: got 1.5, must be in [0, 1)

Keys are written as in the configs (``model.lora.r``); :func:`option` looks through ``init_args`` levels, so
the same key finds ``model.init_args.lora.r`` when the model is given as a class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

_MISSING = object()
SEED_MAX = 2**32 - 1  # numpy's, which Lightning's seed_everything also seeds


class ConfigError(ValueError):
    """A bad setting; the message names the file it comes from, where there is one, and the key."""

    def __init__(self, key: str, problem: str, path: str | Path | None = None):
        super().__init__(f"{path}: {key}: {problem}" if path else f"{key}: {problem}")


@dataclass(frozen=True)
class Range:
    accepts: Callable[[Any], bool]
    text: str  # what the message says a valid value is


def at_least(low: float) -> Range:
    return Range(lambda v: v >= low, f">= {low}")


def above(low: float) -> Range:
    return Range(lambda v: v > low, f"> {low}")


def within(low: float, high: float, brackets: str = "[]") -> Range:
    def accepts(v):
        return (v >= low if brackets[0] == "[" else v > low) and (v <= high if brackets[1] == "]" else v < high)

    return Range(accepts, f"in {brackets[0]}{low}, {high}{brackets[1]}")


def _limit_batches(zero_ok: bool) -> Range:
    """Lightning's ``limit_*_batches``: a number of batches (int) or a share of them (float).

    A whole float above 1 is a number of batches too, as Lightning takes it (``_determine_batch_limits``):
    jsonargparse can hand ``--trainer.limit_val_batches 2`` over as 2.0, since it tries a union's types in
    their order and ``typing`` may return a cached ``Union[float, int]`` for Lightning's ``Union[int, float]``.
    """

    def accepts(v):
        if isinstance(v, int) or (v > 1 and v % 1 == 0):
            return v >= (0 if zero_ok else 1)
        return 0 <= v <= 1 and (zero_ok or v > 0)

    if zero_ok:
        return Range(accepts, "an int >= 0 (batches) or a float in [0, 1] (a share)")
    return Range(accepts, "an int >= 1 (batches) or a float in (0, 1] (a share); 0 would run nothing")


_STOP = "-1 (no limit) or >= 1; 0 would train nothing"
_SEED = within(0, SEED_MAX)

# None is always allowed: it means "unset" (Lightning's default, or the other setting decides).
RANGES: dict[str, Range] = {
    "seed_everything": _SEED,
    "trainer.max_epochs": Range(lambda v: v == -1 or v >= 1, _STOP),
    "trainer.max_steps": Range(lambda v: v == -1 or v >= 1, _STOP),
    "trainer.limit_train_batches": _limit_batches(zero_ok=False),
    "trainer.limit_val_batches": _limit_batches(zero_ok=True),
    "trainer.limit_test_batches": _limit_batches(zero_ok=False),
    "trainer.limit_predict_batches": _limit_batches(zero_ok=False),
    "trainer.accumulate_grad_batches": at_least(1),
    "trainer.gradient_clip_val": at_least(0),
    "trainer.log_every_n_steps": at_least(1),
    "trainer.check_val_every_n_epoch": at_least(1),
    "trainer.num_sanity_val_steps": at_least(-1),
    "model.lora.r": at_least(1),
    "model.lora.alpha": Range(lambda v: v > 0, "> 0 (0 leaves the adapter's update all zero: nothing to train)"),
    "model.lora.dropout": within(0, 1, "[)"),
    "model.optimizer.init_args.lr": Range(lambda v: v > 0, "> 0 (0 would train nothing)"),
    "model.optimizer.init_args.weight_decay": at_least(0),
    "model.optimizer.init_args.momentum": at_least(0),
    "model.optimizer.init_args.eps": above(0),
    "model.scheduler.init_args.warmup_ratio": within(0, 1, "[)"),
    "model.sampling.max_new_tokens": at_least(1),
    "model.sampling.temperature": above(0),
    "model.sampling.top_p": within(0, 1, "(]"),
    "model.sampling.seed": _SEED,
    "data.max_length": at_least(2),
    "data.val_fraction": within(0, 1, "()"),
    "data.batch_size": at_least(1),
    "data.seed": _SEED,
    "data.num_workers": at_least(0),
    "data.show_examples": at_least(0),
}

# Callback options, by the class name's last part: "trainer.callbacks[i].init_args.<name>".
CALLBACK_RANGES: dict[str, dict[str, Range]] = {
    "SampleCallback": {"num_prompts": at_least(1), "max_new_tokens": at_least(1)},
    "SpeedMonitor": {"warmup_steps": at_least(0)},
    "ModelCheckpoint": {"every_n_train_steps": at_least(0), "every_n_epochs": at_least(0), "save_top_k": at_least(-1)},
}


def check_value(key: str, value: Any, range_: Range | None = None) -> None:
    """Raise :class:`ConfigError` unless ``value`` is None or inside the range of ``key``."""
    range_ = range_ or RANGES[key]
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # None means unset; a wrong type is jsonargparse's to report
    if key == "seed_everything" or key.endswith(".seed"):
        ok = isinstance(value, int) and range_.accepts(value)
    else:
        ok = range_.accepts(value)
    if not ok:
        raise ConfigError(key, f"got {value!r}, must be {range_.text}")


def check_fields(settings: Any, prefix: str) -> None:
    """Check a settings dataclass's numeric fields against the ranges of ``prefix.<field>``."""
    for f in fields(settings):
        key = f"{prefix}.{f.name}"
        if key == "model.sampling.temperature" and not getattr(settings, "do_sample", True):
            continue  # greedy decoding ignores it
        if key in RANGES:
            check_value(key, getattr(settings, f.name))


def option(config: Any, key: str, default: Any = None) -> Any:
    """The value of a dotted ``key`` in a parsed configuration, or ``default`` where it is not set.

    Levels named ``init_args`` are looked through when the key does not name them, so ``model.lora.r`` is
    found in ``model.init_args.lora.r`` as well (a model given with ``class_path``)."""
    node = config
    for part in key.split("."):
        found = _child(node, part)
        if found is _MISSING:
            init = _child(node, "init_args")
            found = _child(init, part) if init is not _MISSING else _MISSING
        if found is _MISSING:
            return default
        node = found
    return node


def _child(node: Any, name: str) -> Any:
    if node is None or node is _MISSING:
        return _MISSING
    if isinstance(node, dict):
        return node.get(name, _MISSING)
    return vars(node).get(name, _MISSING) if hasattr(node, "__dict__") else _MISSING
