"""Is a local model directory complete? Checked from file names and safetensors headers, before any weight loads.

A copy cut short, or a download that lost a shard, otherwise loads with some layers left at random values
(transformers only warns), and then fails deep inside peft with an ``AttributeError`` about a
``Parameter``. :func:`check_model_files` names ``model.pretrained`` and what is missing instead:

    meowdread fit --config configs/tiny.yaml --model.pretrained /data/phi3-copy
    meowdread: error: /data/phi3-copy: model.pretrained: the weights lack 9 of the model's 21 tensors (…)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from meowdread.ranges import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_model_files(path: Path) -> None:
    """``config.json``, a tokenizer, every weight file an index lists, and every tensor the model has."""
    key = "model.pretrained"
    if not (path / "config.json").is_file():
        raise ConfigError(key, "not a model directory (it has no config.json)", path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(key, f"no tokenizer in the directory (none of {', '.join(TOKENIZER_FILES)})", path)
    files = weight_files(path)
    if not files:
        raise ConfigError(key, "no weights in the directory (no model.safetensors, nor an index of shards)", path)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(
            key, f"{len(missing)} of the {len(files)} weight files its index lists are missing ({missing[0]})", path
        )
    if all(f.suffix == ".safetensors" for f in files):
        saved = _saved_tensors(path, files)
        expected, known = _model_tensors(path)
        if expected and saved <= known:  # other names (an older layout transformers renames): cannot tell
            lacking = sorted(expected - saved, key=_natural)
            if lacking:
                raise ConfigError(
                    key,
                    f"the weights lack {len(lacking)} of the model's {len(expected)} tensors ({lacking[0]}): the "
                    "copy or download is incomplete; fetch the model again",
                    path,
                )


def weight_files(path: Path) -> list[Path]:
    """The weight files of a directory: one ``model.safetensors``, or the shards its index names."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (path / index).is_file():
            try:
                shards = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"].values()
            except (ValueError, KeyError, AttributeError) as err:
                raise ConfigError("model.pretrained", f"{index} is not a shard index ({err})", path) from None
            return [path / name for name in sorted(set(shards))]
        if (path / single).is_file():
            return [path / single]
    return []


def _saved_tensors(path: Path, files: list[Path]) -> set[str]:
    from safetensors import SafetensorError, safe_open

    names: set[str] = set()
    for file in files:
        try:
            with safe_open(file, "pt") as f:  # reads the header only
                names.update(f.keys())
        except (SafetensorError, OSError) as err:
            problem = f"{file.name} is not a readable safetensors file ({str(err).splitlines()[0]})"
            raise ConfigError("model.pretrained", problem, path) from None
    return names


def _model_tensors(path: Path) -> tuple[set[str], set[str]]:
    """The tensors a checkpoint of this config holds (tied weights once), and every name the model knows.

    The model is built on the meta device, which allocates nothing. A config this cannot build (remote code,
    a model type this transformers lacks) is left to ``from_pretrained`` to report: (empty, empty)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, OSError, ImportError, TypeError):
        return set(), set()
    every = set(model.state_dict())
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    expected = {n for n in every - aliases if not any(p.search(n) for p in ignored)}
    return expected, every


def _natural(name: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
