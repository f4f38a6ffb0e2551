"""The ``meowdread`` command: a LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

    meowdread fit --config configs/tiny.yaml
    meowdread predict --config configs/tiny.yaml --ckpt_path last
    meowdread fit --config configs/tiny.yaml --print_config

``--ckpt_path last`` means the ``last.ckpt`` of the newest run under the logger's directory; ``fit`` then
resumes that run in its own directory, so its TensorBoard curves continue.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from meowdread.data import CatCorpusDataModule, CorpusError
from meowdread.model import QLoraModule


def find_last_checkpoint(root: str | Path) -> Path | None:
    """The newest ``*/checkpoints/last.ckpt`` below ``root``."""
    found = sorted(Path(root).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


class MeowCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer must be the model's own.
        parser.link_arguments("model.pretrained", "data.pretrained")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is None or config.get("ckpt_path") != "last":
            return
        logger = config.trainer.get("logger")
        init = logger.get("init_args") if hasattr(logger, "get") else None
        if init is None:
            raise ValueError("--ckpt_path last needs trainer.logger set to a TensorBoardLogger, as in configs/")
        root = Path(init.get("save_dir") or ".") / (init.get("name") or "lightning_logs")
        last = find_last_checkpoint(root)
        if last is None:
            raise FileNotFoundError(f"--ckpt_path last: no */checkpoints/last.ckpt under {root}; run fit first")
        config.ckpt_path = str(last)
        if self.subcommand == "fit":  # resume in the same run directory
            init.version = last.parent.parent.name
        print(f"--ckpt_path last: {last}", file=sys.stderr)


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
# Under DDP every rank runs the same code on the same data: say each thing once, as Lightning does.
_log_handler.addFilter(lambda record: rank_zero_only.rank == 0)


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
            args=args,
        )
    except (CorpusError, FileNotFoundError, ValueError) as err:
        if os.environ.get("MEOWDREAD_DEBUG"):
            raise
        print(f"meowdread: error: {err}\n(set MEOWDREAD_DEBUG=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
