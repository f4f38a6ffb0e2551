"""Shared fixtures: one embedded tiny Phi-3 per session, built in a temporary cache (offline, ~1 s)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "cat_corpus.jsonl"
PROMPTS = REPO / "data" / "prompts.txt"


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


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
