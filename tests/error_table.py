"""The troubleshooting table's harness: each README row is a case that builds a command line (``case``).

``tests/test_errors.py`` runs every case and holds the real message against the row's.
"""

import json
import re
from collections.abc import Callable

import pytest
import torch

from .conftest import REPO, tiny_args

TINY = str(REPO / "configs" / "tiny.yaml")
GOOD = json.dumps({"messages": [{"role": "user", "content": "Why sit?"}, {"role": "assistant", "content": "I fits."}]})


def readme_rows() -> dict[str, str]:
    """``input`` → ``message`` of the README's troubleshooting table."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("\n## Troubleshooting\n")[1].split("\n## ")[0]
    rows = [re.fullmatch(r"\| (.+?) \| `(.+?)` \| .+ \|", line) for line in section.splitlines()]
    return {row.group(1): row.group(2) for row in rows if row}


# README row → (build, warns): build(tmp_path, *fixtures it names) gives the CLI args; a row that warns runs.
CASES: dict[str, tuple[Callable[..., list[str]], bool]] = {}


def case(row: str, warns: bool = False):
    def register(build):
        CASES[row] = (build, warns)
        return build

    return register


def cli(subcommand: str, tmp_path, *extra: str, config: str = TINY) -> list[str]:
    return tiny_args(subcommand, tmp_path / "runs", *extra, config=config)


def needs_no_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")


def save_dir_on(args: list[str], directory) -> list[str]:
    args[args.index("--trainer.logger.init_args.save_dir") + 1] = str(directory)
    return args
