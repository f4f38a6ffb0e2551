"""The ``meowdread`` command: a LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``, plus ``chat``
and ``export`` (:mod:`meowdread.chat`, :mod:`meowdread.export`), which read the same configs.

    meowdread fit --config configs/tiny.yaml
    meowdread predict --config configs/tiny.yaml --ckpt_path last
    meowdread fit --config configs/tiny.yaml --print_config
    meowdread chat --config configs/tiny.yaml --ckpt_path last
    meowdread export --config configs/tiny.yaml --ckpt_path last --output exported/tiny

``--ckpt_path last`` means the ``last.ckpt`` of the newest run under the logger's directory; ``fit`` then
resumes that run in its own directory, so its TensorBoard curves continue.

``--model`` and ``--data`` take a subclass of :class:`~meowdread.model.QLoraModule` or
:class:`~meowdread.data.CatCorpusDataModule` (LightningCLI's subclass mode), the shipped classes by default::

    meowdread fit --config configs/tiny.yaml --model examples.neftune.NEFTuneModule --model.noise_alpha 5

Configs keep their flat ``model:`` and ``data:`` keys; a stacked config swaps a class with ``class_path``.

Bad input is one line on stderr and exit code 2 (``MEOWDREAD_DEBUG=1`` for the traceback); the settings are
checked (:mod:`meowdread.checks`) before the model loads. Checkpoints are written atomically and loaded
weights-only, and Ctrl-C or SIGTERM during ``fit`` saves one (:mod:`meowdread.checkpoints`).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shlex
import sys
import warnings
from argparse import ArgumentError, RawDescriptionHelpFormatter
from pathlib import Path
from types import ModuleType

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, _get_short_description
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from meowdread import chat, export, progress, quiet
from meowdread.__main__ import SUBCOMMANDS, overview, wants_overview
from meowdread.callbacks import predictions_dir
from meowdread.checkpoints import SafeCheckpointIO, SaveOnInterrupt
from meowdread.checks import check_config, explain_parse_error
from meowdread.data import CatCorpusDataModule
from meowdread.model import QLoraModule
from meowdread.ranges import option

log = logging.getLogger("meowdread.cli")  # not __name__, which is __main__ under python -m

TOOLS = {"chat": chat, "export": export}
# `meowdread fit --help` opens with meowdread's line, not the first line of Trainer.fit's docstring, which
# Lightning cuts mid-sentence ("It's separated from fit to make sure you never run on your").
SUBCOMMAND_DESCRIPTIONS = {
    name: {"description": f"meowdread {name}: {line}"} for name, line in SUBCOMMANDS.items() if name not in TOOLS
}


def find_last_checkpoint(root: str | Path) -> Path | None:
    """The newest ``*/checkpoints/last.ckpt`` below ``root``."""
    found = sorted(Path(root).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


class _Parser(LightningArgumentParser):
    """Options must be spelled out: ``--model.lora.rank`` would otherwise be taken for ``rank_pattern``. The
    parsers of the model and data classes are of their parent's class, so they refuse abbreviations too."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)


def _import_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class MeowCLI(LightningCLI):
    """LightningCLI in subclass mode, with the given module and data module classes as the defaults."""

    def __init__(self, model_class=QLoraModule, datamodule_class=CatCorpusDataModule, **kwargs):
        super().__init__(
            model_class,
            datamodule_class,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=_Parser,
            **kwargs,
        )

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
            known = [a.dest for a in (self._parser(subcommand) if subcommand else parser)._actions]
            raise explain_parse_error(str(err), args, known + self._class_keys(str(err))) from None

    @staticmethod
    def _class_keys(message: str) -> list[str]:
        """The flat option names (``model.lora.r``) of the module or data class a parse error is about."""
        found = re.match(r'Parser key "(model|data)":.*?Problem with given class_path \'([\w.]+)\'', message, re.S)
        if not found:
            return []
        from jsonargparse import ArgumentParser

        module, _, name = found.group(2).rpartition(".")
        try:
            inner = ArgumentParser(exit_on_error=False)
            inner.add_class_arguments(getattr(importlib.import_module(module), name), fail_untyped=False)
        except (ImportError, AttributeError, ValueError):
            return []
        return [f"{found.group(1)}.{action.dest}" for action in inner._actions]

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # jsonargparse titles the group of Trainer.<subcommand>'s arguments with the docstring's first line,
        # which Lightning's docstrings wrap mid-sentence ("Useful to"); name the group instead.
        cut = _get_short_description(getattr(klass, subcommand))
        for group in parser._action_groups:
            if cut and group.title == cut:
                group.title = f"arguments of Trainer.{subcommand}"
        return parser

    def _parse_ckpt_path(self) -> None:
        """Lightning would overwrite the configured model settings with the checkpoint's; here the configuration
        stays the truth, and ``check_checkpoint`` refuses a checkpoint that does not fit it."""

    def add_arguments_to_parser(self, parser) -> None:
        # A config's flat ``model:`` and ``data:`` keys are init args of these unless it names a class_path.
        parser.set_defaults(
            {
                "model": {"class_path": _import_path(self._model_class)},
                "data": {"class_path": _import_path(self._datamodule_class)},
            }
        )
        # The tokenizer must be the model's own.
        parser.link_arguments("model.init_args.pretrained", "data.init_args.pretrained")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config.get("ckpt_path") == "last":
            config.ckpt_path = str(self._last_checkpoint(config))
        check_config(self.subcommand, config)
        if self.subcommand == "predict":
            self._predict_without_logger(config)

    def _predict_without_logger(self, config) -> None:
        """predict writes its report (and config.yaml) to the predictions folder of the run it predicts from,
        with no logger: a logger would make an empty TensorBoard run of every predict."""
        logger = config.trainer.get("logger")
        init = logger.get("init_args") if hasattr(logger, "get") else None
        logs = Path(init.get("save_dir") or ".") / (init.get("name") or "lightning_logs") if init else None
        logs = logs or config.trainer.default_root_dir or "."
        out = predictions_dir(config.get("ckpt_path"), option(config, "model.adapter"), logs)
        config.trainer.logger = False
        config.trainer.default_root_dir = str(out)

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
        log.info("--ckpt_path last: %s", last)
        return last

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # In subclass mode, jsonargparse reports an error of the module's or data module's __init__ as one
            # alternative of a union that did not validate; the error itself is the cause.
            if "Does not validate against any of the Union subtypes" in str(err) and err.__cause__ is not None:
                raise err.__cause__ from None
            raise

    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, progress.default_bar()])
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # unless the config chose another
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """Keeps the line breaks of the tool's docstring in ``--help``."""


class ToolCLI(MeowCLI):
    """``meowdread chat`` and ``meowdread export``: the configs and overrides of ``fit``/``predict``, plus
    ``--ckpt_path`` and the tool's own options. No Trainer method runs; the tool gets the module from
    :meth:`load_module`, built as ``fit`` builds it."""

    def __init__(self, name: str, args: list[str]):
        self.tool: ModuleType = TOOLS[name]
        with warnings.catch_warnings():
            # LightningCLI warns when given args while sys.argv has some: here args are sys.argv minus the tool.
            warnings.filterwarnings("ignore", "LightningCLI's args parameter")
            super().__init__(
                save_config_callback=None,
                run=False,
                args=args,
                parser_kwargs={
                    "prog": f"meowdread {name}",
                    "description": self.tool.__doc__,
                    "formatter_class": _HelpFormatter,
                },
            )

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="a checkpoint of fit, whose LoRA weights are loaded; 'last' is the newest run's last.ckpt",
        )
        self.tool.add_arguments(parser)

    def load_module(self) -> QLoraModule:
        """The 4-bit base + LoRA on the trainer's device, with the weights of --ckpt_path or --model.adapter."""
        module, ckpt_path = self.model, self.config.ckpt_path  # checked by check_config
        module.trainer = self.trainer  # so that configure_model loads onto the trainer's device
        # The contexts Lightning's own call of configure_model uses (e.g. the default dtype of bf16-true).
        with self.trainer.strategy.tensor_init_context(), self.trainer.precision_plugin.module_init_context():
            module.configure_model()
        if ckpt_path:
            module.load_lora_weights(ckpt_path)
            log.info("LoRA weights from %s", ckpt_path)
        elif not module.hparams.adapter:
            log.warning("no --ckpt_path or --model.adapter: a fresh LoRA changes nothing, this is the base model")
        return module.eval()


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


def resume_command(argv: list[str]) -> str:
    """The command line that resumes this run: the same one, with ``--ckpt_path last``."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--ckpt_path="):
            skip = False
            continue
        skip = arg == "--ckpt_path"
        if not skip:
            kept.append(arg)
    return shlex.join(["meowdread", *kept, "--ckpt_path", "last"])


def main(args: list[str] | None = None) -> None:
    """``meowdread``: see ``meowdread --help`` (:mod:`meowdread.__main__`) and ``meowdread SUBCOMMAND --help``."""
    argv, verbose = quiet.verbose_requested(sys.argv[1:] if args is None else list(args))
    if args is None:
        sys.argv[1:] = argv  # without --verbose, which LightningCLI does not know
    else:
        args = argv
    if wants_overview(argv):
        overview().print_help()
        return
    quiet.install(verbose)
    progress.library_bars()
    package_log = logging.getLogger("meowdread")
    package_log.addHandler(_log_handler)  # a no-op when already added
    package_log.setLevel(logging.INFO)
    # bitsandbytes suggests a faster CPU kernel from the `kernels` package, which downloads it from the hub:
    # noise for an offline run, and not something to install here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # A class path such as --model my_pkg.MyModule imports from the working directory, as under `python -m`;
    # appended last, so that nothing there shadows an installed module.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    interrupt = SaveOnInterrupt(resume_command(argv))
    # SIGTERM from here on: a message and exit 143, or during fit's training a checkpoint first.
    with interrupt.listening():
        try:
            if argv and argv[0] in TOOLS:
                cli = ToolCLI(argv[0], argv[1:])
                cli.tool.run(cli)
            else:
                MeowCLI(
                    save_config_kwargs={"overwrite": True},
                    trainer_defaults={"callbacks": [interrupt]},
                    parser_kwargs={
                        "description": "QLoRA fine-tuning of Phi-3. Also: `meowdread chat` and "
                        "`meowdread export`, with the same configs (add --help to either).",
                        **SUBCOMMAND_DESCRIPTIONS,
                    },
                    args=args,
                )
        except Exception as err:
            failed_write = interrupt.explain_failure(err)  # a full disk, from whichever library
            bad_input = isinstance(err, (ValueError, OSError, FloatingPointError, MisconfigurationException))
            if os.environ.get("MEOWDREAD_DEBUG") or not (failed_write or bad_input):
                raise
            message = failed_write or " ".join(str(err).split()) or type(err).__name__
            print(f"meowdread: error: {message}\n(set MEOWDREAD_DEBUG=1 for the traceback)", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:  # outside fit's training loop, where SaveOnInterrupt does not listen
            print("meowdread: interrupted", file=sys.stderr)
            raise SystemExit(130) from None


if __name__ == "__main__":
    main()
