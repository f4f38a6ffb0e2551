"""What the ``meowdread`` command leaves out of its output: the libraries' notices that say nothing to a user
of meowdread, each matched by its logger or warning module *and* its message, so that anything else (a real
problem, a warning of your own code) still shows.

``meowdread --verbose ...`` (or ``MEOWDREAD_VERBOSE=1``, or ``MEOWDREAD_DEBUG=1``) shows everything. Each
entry below says why it goes and where it comes from; when an upgrade of a library changes a message, it
simply shows again.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# Notices logged through a library's logger: (logger name, message pattern matched at the start).
_LOG_NOTICES: tuple[tuple[str, str], ...] = (
    # lightning/pytorch/trainer/setup.py `_log_device_info`: true on every run, and `trainer.accelerator`
    # in the config already says which device is used. Real device problems ("GPU available but not used")
    # are warnings, not these lines.
    ("lightning.pytorch.utilities.rank_zero", r"(GPU|TPU|HPU) available: "),
    # lightning/pytorch/trainer/connectors/logger_connector/logger_connector.py: an advertisement, printed
    # whenever the logger is not Lightning's hosted LitLogger.
    ("lightning.pytorch.utilities.rank_zero", r"💡 Tip: For seamless cloud logging"),
    # lightning/pytorch/trainer/connectors/accelerator_connector.py: the config's trainer.precision, restated.
    ("lightning.pytorch.utilities.rank_zero", r"Using (16bit|bfloat16) Automatic Mixed Precision"),
    # lightning/pytorch/trainer/trainer.py `estimated_stepping_batches`: an internal step of the LR schedule.
    ("lightning.pytorch.utilities.rank_zero", r"Loading `train_dataloader` to estimate"),
    # lightning/pytorch/loops/fit_loop.py: the normal end of fit (other reasons to stop, such as "No training
    # batches", still show).
    ("lightning.pytorch.utilities.rank_zero", r"`Trainer.fit` stopped: `max_(epochs|steps)="),
    # lightning/pytorch/trainer/connectors/checkpoint_connector.py: the checkpoint the user named; meowdread
    # says which file `--ckpt_path last` picked.
    ("lightning.pytorch.utilities.rank_zero", r"(Restoring states|Loaded model weights) from the checkpoint"),
    # lightning/pytorch/trainer/setup.py `_init_debugging_flags`: the config's `limit_*_batches: 1`, restated.
    ("lightning.pytorch.utilities.rank_zero", r"`Trainer\(\w+=1\)` was configured so 1 batch will be used"),
    # lightning/fabric/utilities/seed.py: the config's seed_everything, restated.
    ("lightning.fabric.utilities.seed", r"Seed set to "),
    # transformers/integrations/bitsandbytes.py `dequantize_and_replace` (export): the dtype it was asked for.
    ("transformers.integrations.bitsandbytes", r"The modules are dequantized in "),
)

# Warnings: (module the warning is attributed to, message pattern, category). Both patterns match at the start.
_WARNINGS: tuple[tuple[str, str, type[Warning]], ...] = (
    # peft/peft_model.py reads `model.is_gradient_checkpointing`, which transformers 5 deprecated for
    # `is_activation_checkpointing` (transformers/modeling_utils.py): a note for peft's developers.
    (r"transformers\.modeling_utils", r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # lightning/pytorch/utilities/_pytree.py (2.6) still tests for torch's LeafSpec, which torch deprecated:
    # a note for Lightning's developers, raised on every predict and fit.
    (r"lightning\.pytorch\.utilities\._pytree", r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
    # lightning/pytorch/utilities/model_summary/model_summary.py: the summary's size column assumes 32-bit
    # weights under bf16-mixed; meowdread logs the trainable parameter count itself.
    (r"lightning\.pytorch\.utilities\.model_summary", r"Precision bf16-mixed is not supported by the model", Warning),
    # lightning/pytorch/callbacks/model_checkpoint.py `load_state_dict`: predict, chat and export restore a
    # fit checkpoint, whose ModelCheckpoint state names fit's directory; nothing is saved outside fit.
    (r"lightning\.pytorch\.callbacks\.model_checkpoint", r"The dirpath has changed from ", Warning),
)


class _DropNotices(logging.Filter):
    """Drops the records whose message matches one of ``patterns``."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def _log_filters() -> dict[str, _DropNotices]:
    patterns: dict[str, list[str]] = {}
    for name, pattern in _LOG_NOTICES:
        patterns.setdefault(name, []).append(pattern)
    return {name: _DropNotices(p) for name, p in patterns.items()}


_FILTERS = _log_filters()


def verbose_requested(args: list[str]) -> tuple[list[str], bool]:
    """``args`` without meowdread's own ``--verbose`` flag, which LightningCLI does not know, and whether it (or
    ``MEOWDREAD_VERBOSE`` or ``MEOWDREAD_DEBUG``) asks for everything. Only the flag before or right after the
    subcommand counts, so that a value such as ``--system --verbose`` is left alone. The flag is passed on as
    ``MEOWDREAD_VERBOSE=1`` to the processes that Lightning starts for DDP, which inherit the environment."""
    head = 2 if args and not args[0].startswith("-") else 1
    if "--verbose" in args[:head]:
        args = [a for i, a in enumerate(args) if not (i < head and a == "--verbose")]
        os.environ["MEOWDREAD_VERBOSE"] = "1"
    return args, any(os.environ.get(name) for name in ("MEOWDREAD_VERBOSE", "MEOWDREAD_DEBUG"))


def install(verbose: bool = False) -> None:
    """Leave out the notices above (or, with ``verbose``, put them back). Idempotent; call before the libraries
    are imported, so that warnings raised at import are filtered too."""
    for name, drop in _FILTERS.items():
        logger = logging.getLogger(name)
        if verbose:
            logger.removeFilter(drop)
        else:
            logger.addFilter(drop)  # a no-op when already there
    if not verbose:
        for module, message, category in _WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
