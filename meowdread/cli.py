"""The ``meowdread`` command: a LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

    meowdread fit --config configs/tiny.yaml
    meowdread predict --config configs/tiny.yaml --ckpt_path last
    meowdread fit --config configs/tiny.yaml --print_config

``--ckpt_path last`` means the ``last.ckpt`` of the newest run under the logger's directory; ``fit`` then
resumes that run in its own directory, so its TensorBoard curves continue.

Bad input is one line on stderr and exit code 2 (``MEOWDREAD_DEBUG=1`` for the traceback); the settings are
checked (:mod:`meowdread.checks`) before the model loads. Checkpoints are written atomically and loaded
weights-only, and Ctrl-C during ``fit`` saves one (:mod:`meowdread.checkpoints`).
"""

from __future__ import annotations

import logging
import os
import sys
from argparse import ArgumentError
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from meowdread.checkpoints import SafeCheckpointIO, SaveOnInterrupt
from meowdread.checks import check_config, explain_parse_error
from meowdread.data import CatCorpusDataModule
from meowdread.model import QLoraModule


def find_last_checkpoint(root: str | Path) -> Path | None:
    """The newest ``*/checkpoints/last.ckpt`` below ``root``."""
    found = sorted(Path(root).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


class MeowCLI(LightningCLI):
    def init_parser(self, **kwargs):
        # Raise parse errors instead of printing the whole usage: parse_arguments makes them one line.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            args = sys.argv[1:] if args is None else args
            subcommand = next((a for a in args if a in self.subcommands()), None)
            known = [a.dest for a in self._parser(subcommand)._actions] if subcommand else []
            raise explain_parse_error(str(err), args, known) from None

    def _parse_ckpt_path(self) -> None:
        """Lightning would overwrite the configured model settings with the checkpoint's; here the configuration
        stays the truth, and ``check_checkpoint`` refuses a checkpoint that does not fit it."""

    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer must be the model's own.
        parser.link_arguments("model.pretrained", "data.pretrained")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is None:
            return
        if config.get("ckpt_path") == "last":
            config.ckpt_path = str(self._last_checkpoint(config))
        check_config(self.subcommand, config)

    def _last_checkpoint(self, config) -> Path:
        logger = config.trainer.get("logger")
        init = logger.get("init_args") if hasattr(logger, "get") else None
        if init is None:
            raise ValueError("--ckpt_path last needs trainer.logger set to a TensorBoardLogger, as in configs/")
        root = Path(init.get("save_dir") or ".") / (init.get("name") or "lightning_logs")
        last = find_last_checkpoint(root)
        if last is None:
            raise FileNotFoundError(f"--ckpt_path last: no */checkpoints/last.ckpt under {root}; run fit first")
        if self.subcommand == "fit":  # resume in the same run directory
            init.version = last.parent.parent.name
        print(f"--ckpt_path last: {last}", file=sys.stderr)
        return last

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # unless the config chose another
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (pytest and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


_log_handler = _StderrHandler()
_log_handler.setFormatter(logging.Formatter("[meowdread] %(message)s"))


def main(args: list[str] | None = None) -> None:
    package_log = logging.getLogger("meowdread")
    package_log.addHandler(_log_handler)  # a no-op when already added
    package_log.setLevel(logging.INFO)
    # bitsandbytes suggests a faster CPU kernel from the `kernels` package, which downloads it from the hub:
    # noise for an offline run, and not something to install here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        MeowCLI(
            QLoraModule,
            CatCorpusDataModule,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [SaveOnInterrupt()]},
            args=args,
        )
    except (ValueError, OSError, FloatingPointError, MisconfigurationException) as err:
        if os.environ.get("MEOWDREAD_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"meowdread: error: {message}\n(set MEOWDREAD_DEBUG=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # outside fit's training loop, where SaveOnInterrupt does not listen
        print("meowdread: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
