"""The embedded tiny Phi-3: built offline, deterministically, as an ordinary Phi-3 checkpoint."""

import hashlib
import json

import pytest

from meowdread.embedded import build_embedded, resolve_pretrained

from .conftest import CORPUS


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_two_builds_are_byte_identical_phi3_checkpoints(tmp_path):
    first = build_embedded("tiny-phi3", CORPUS, root=tmp_path / "a")
    second = build_embedded("tiny-phi3", CORPUS, root=tmp_path / "b")
    assert digest(first) == digest(second)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(digest(first))
    config = json.loads((first / "config.json").read_text())
    assert config["model_type"] == "phi3" and config["architectures"] == ["Phi3ForCausalLM"]
    assert build_embedded("tiny-phi3", CORPUS, root=tmp_path / "a") == first  # cached: not rebuilt


def test_hub_ids_and_paths_pass_through_and_unknown_embedded_names_are_refused(tmp_path):
    assert resolve_pretrained("microsoft/Phi-3-mini-4k-instruct") == "microsoft/Phi-3-mini-4k-instruct"
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match="unknown embedded model 'embedded:tiny-llama'"):
        resolve_pretrained("embedded:tiny-llama")
