"""The ``meowdread`` command's entry point (also ``python -m meowdread``).

``meowdread`` and ``meowdread --help`` answer here, from this file alone, in a fraction of a second: torch,
Lightning and transformers are imported only when a subcommand runs, by :func:`meowdread.cli.main`, which gets
the rest of the command line (``meowdread fit --help`` lists fit's options).
"""

from __future__ import annotations

import argparse
import sys

# One line each; the subcommand's own --help has the details.
SUBCOMMANDS = {
    "fit": "train the LoRA adapter: checkpoints, adapter/, TensorBoard",
    "validate": "one pass over the validation split: val/loss, val/ppl",
    "test": "the same pass, as Lightning's test loop",
    "predict": "answer data.prompts, scored, into the run's predictions/",
    "chat": "talk with the tuned model (--jsonl for scripts)",
    "export": "merge the LoRA into the base: a standalone model folder",
}


def overview() -> argparse.ArgumentParser:
    """The top-level parser, for its help: the subcommands and meowdread's own flags."""
    parser = argparse.ArgumentParser(
        prog="meowdread",
        description="QLoRA fine-tuning of a chat model with PyTorch Lightning. Every subcommand reads the same "
        "YAML configs (--config, repeatable) and --section.key value overrides.",
        epilog="`meowdread SUBCOMMAND --help` lists its options. Example: meowdread fit --config configs/tiny.yaml",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' routine notices too (MEOWDREAD_DEBUG=1 also shows tracebacks)",
    )
    subcommands = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
    for name, line in SUBCOMMANDS.items():
        subcommands.add_parser(name, help=line, add_help=False)
    return parser


def wants_overview(args: list[str]) -> bool:
    """No subcommand, only ``--help`` (and ``--verbose``)."""
    rest = [a for a in args if a != "--verbose"]
    return not rest or rest[0] in ("-h", "--help")


def main(args: list[str] | None = None) -> None:
    if wants_overview(sys.argv[1:] if args is None else args):
        overview().print_help()
        return
    from meowdread import cli  # torch, Lightning, transformers: only now

    cli.main(args)  # None: the command line, which Lightning's DDP launcher runs again in its processes


if __name__ == "__main__":
    main()
