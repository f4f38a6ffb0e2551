"""Shared fixtures: one embedded tiny Phi-3 per session, built in a temporary cache (offline, ~1 s).

The suite runs offline however it is started: ``HF_HUB_OFFLINE=1`` is set before anything imports
huggingface_hub, and every socket connection to another machine raises (``tests/offline.py``); a test that
tried one fails, even if the library it came from swallowed the error.
"""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from . import offline

# Before huggingface_hub and transformers read them, at their import by a test module.
os.environ["HF_HUB_OFFLINE"] = "1"
# Where transformers copies a model's own Python files (test_security loads one): not the user's cache.
os.environ["HF_MODULES_CACHE"] = HF_MODULES = tempfile.mkdtemp(prefix="meowdread-test-hf-modules-")
offline.block_network()  # from collection on

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "cat_corpus.jsonl"
PROMPTS = REPO / "data" / "prompts.txt"


@pytest.fixture(scope="session", autouse=True)
def remove_hf_modules():
    yield
    shutil.rmtree(HF_MODULES, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_network_attempt():
    offline.attempts.clear()
    yield
    assert not offline.attempts, f"a test tried to reach the network: {offline.attempts}"


@pytest.fixture(scope="session", autouse=True)
def embedded_cache(tmp_path_factory):
    """Build embedded models in a fresh cache, so a test run never depends on what a machine has."""
    old = os.environ.get("MEOWDREAD_CACHE")
    os.environ["MEOWDREAD_CACHE"] = str(tmp_path_factory.mktemp("meowdread-cache"))
    yield Path(os.environ["MEOWDREAD_CACHE"])
    if old is None:
        del os.environ["MEOWDREAD_CACHE"]
    else:
        os.environ["MEOWDREAD_CACHE"] = old


@pytest.fixture(scope="session")
def tokenizer(embedded_cache):
    from meowdread.data import load_tokenizer

    return load_tokenizer("embedded:tiny-phi3")


def tiny_args(subcommand: str, save_dir: Path, *extra: str, config: Path | str | None = None) -> list[str]:
    """A ``meowdread`` command line on ``configs/tiny.yaml`` with every data path absolute and runs under
    ``save_dir``, so that it works from any working directory (the DDP test's ranks run in a temporary one)."""
    lexicons = [str(REPO / "data" / "lexicons" / name) for name in ("cat_lingo.json", "angst.json")]  # as configs
    return [
        subcommand,
        "--config", str(config or REPO / "configs" / "tiny.yaml"),
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.enable_progress_bar", "false",
        "--data.corpus", str(CORPUS),
        "--data.prompts", str(PROMPTS),
        "--data.lexicons", json.dumps(lexicons),
        *extra,
    ]  # fmt: skip


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size_mb)`` → a directory on a real filesystem of that size (tmpfs), unmounted afterwards; the
    test is skipped where mounting is not allowed (it needs root)."""
    mounts = []

    def mount(size_mb: int) -> Path:
        directory = tmp_path / f"disk{len(mounts)}"
        directory.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(directory)]
        if shutil.which("mount") is None or subprocess.run(command, capture_output=True).returncode:
            pytest.skip("cannot mount a small tmpfs here (needs root)")
        mounts.append(directory)
        return directory

    yield mount
    for directory in mounts:
        subprocess.run(["umount", "-l", str(directory)], check=False)
