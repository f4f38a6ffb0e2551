"""Checks of the parsed configuration, run before anything heavy loads: each bad setting is one clear error.

``meowdread`` runs :func:`check_config` between parsing the configuration and building the trainer and the
model, so a typo costs a second, not a model load, and an hour of training never ends unable to save. Each
error names the file (where there is one) and the config key, as the corpus errors of :mod:`meowdread.data`
name the file, the line and the field. :func:`explain_parse_error` does the same for jsonargparse's own
errors (an unknown key, a value of the wrong type), which would otherwise print the whole usage.

    meowdread fit --config configs/phi3_qlora.yaml   # on a machine without CUDA: one line, and a hint
"""

from __future__ import annotations

import difflib
import importlib
import logging
import re
import tempfile
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml

from meowdread.checkpoints import load_checkpoint_file
from meowdread.data import read_prompts
from meowdread.embedded import EMBEDDED_PREFIX

log = logging.getLogger(__name__)

CPU_HINT = "this machine has no CUDA GPU: on this machine use configs/tiny.yaml"


class ConfigError(ValueError):
    """A bad setting; the message names the file it comes from, where there is one, and the key."""

    def __init__(self, key: str, problem: str, path: str | Path | None = None):
        super().__init__(f"{path}: {key}: {problem}" if path else f"{key}: {problem}")


def init_args(config: Any, key: str) -> Any:
    """The settings of ``config.model`` or ``config.data``: the ``init_args`` of its ``class_path`` (the CLI
    runs in subclass mode), or the namespace itself where there is no class path."""
    section = config[key]
    return section.init_args if section.get("class_path") else section


def check_config(subcommand: str | None, config: Any) -> None:
    """Every check below, on the namespace of one subcommand (``cli.config[subcommand]``); ``subcommand`` is
    None for ``chat`` and ``export``, which write no run directory."""
    model, data = init_args(config, "model"), init_args(config, "data")
    check_cuda_settings(config)
    if subcommand is not None:
        check_output_dir(config)
    check_pretrained(model.pretrained)
    check_adapter(model.get("adapter"))
    callbacks = config.trainer.get("callbacks") or []
    if subcommand == "predict" or (subcommand == "fit" and any(_samples(c) for c in callbacks)):
        read_prompts(data.prompts)
    ckpt_path = str(config.get("ckpt_path") or "")
    if ckpt_path and ckpt_path.split(":")[0] not in ("best", "hpc", "registry"):  # those are Lightning's to resolve
        check_checkpoint(ckpt_path, model)


def _samples(callback: Any) -> bool:
    """Whether a configured callback is a :class:`meowdread.callbacks.SampleCallback` or a subclass of one."""
    from meowdread.callbacks import SampleCallback

    module, _, name = _class_path(callback).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return False  # the parser imported it already: a class it could not import does not get here
    return isinstance(cls, type) and issubclass(cls, SampleCallback)


def _class_path(value: Any) -> str:
    return str(value.get("class_path", "") if hasattr(value, "get") else value or "")


def check_cuda_settings(config: Any) -> None:
    """GPU-only settings on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    accelerator = _class_path(config.trainer.get("accelerator"))
    if accelerator.lower() in ("gpu", "cuda") or accelerator.endswith("CUDAAccelerator"):
        raise ConfigError("trainer.accelerator", f"{accelerator!r} needs CUDA, and {CPU_HINT}")
    optimizer = _class_path(init_args(config, "model").get("optimizer"))
    if optimizer.startswith("bitsandbytes.optim.Paged"):
        raise ConfigError(
            "model.optimizer", f"{optimizer} pages its state in CUDA memory, and {CPU_HINT} (torch.optim.AdamW)"
        )


def check_output_dir(config: Any) -> None:
    """The run directory's parent must be writable: found out now, not when the first checkpoint is due."""
    logger = config.trainer.get("logger")
    init = logger.get("init_args") if hasattr(logger, "get") else None
    if init is not None and init.get("save_dir") is not None:
        key, path = "trainer.logger.init_args.save_dir", Path(init.save_dir)
    else:
        key, path = "trainer.default_root_dir", Path(config.trainer.get("default_root_dir") or ".")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(key, f"cannot write here ({err.strerror or err})", path) from None


def check_pretrained(pretrained: str) -> None:
    """A local model directory that exists, or a hub id that can be had (from the cache, when offline)."""
    if pretrained.startswith(EMBEDDED_PREFIX):
        return  # built on demand; an unknown name is reported by meowdread.embedded
    path = Path(pretrained).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError("model.pretrained", "not a model directory (it has no config.json)", path)
        return
    if pretrained.startswith(("/", ".", "~")) or pretrained.count("/") != 1:
        raise ConfigError("model.pretrained", "does not exist (and it is not a hub id org/name)", pretrained)
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(pretrained, "config.json"), str):
        raise ConfigError(
            "model.pretrained",
            "no such local directory, and as a hub id it is not in the Hugging Face cache, which is all "
            "HF_HUB_OFFLINE=1 allows: download it once online, or give a local directory",
            pretrained,
        )


def check_adapter(adapter: str | None) -> None:
    """A peft adapter directory with its weights in safetensors (a pickled ``.bin`` could run code)."""
    if not adapter:
        return
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise ConfigError("model.adapter", "not an adapter directory (no adapter_config.json)", path)
    if not (path / "adapter_model.safetensors").is_file():
        raise ConfigError(
            "model.adapter",
            "no adapter_model.safetensors: adapter weights are only loaded from safetensors, never from "
            "pickle files such as adapter_model.bin",
            path,
        )


def check_checkpoint(ckpt_path: str | Path, model: Any) -> None:
    """A complete, weights-only checkpoint of a LoRA adapter of the configured shape.

    Lightning's CLI would quietly replace the configured model settings with those saved in the checkpoint;
    meowdread keeps the configuration as the truth and refuses a checkpoint of another adapter shape.
    """
    hparams = load_checkpoint_file(ckpt_path, mmap=True).get("hyper_parameters", {})
    # Started from a saved adapter, the adapter's own shape counts, not model.lora: the load checks that one.
    saved = hparams.get("lora", {}) if not (hparams.get("adapter") or model.get("adapter")) else {}
    configured = model.lora
    for key in ("r", "alpha", "target_modules"):
        before, now = saved.get(key), configured.get(key)
        same = sorted(before) == sorted(now) if key == "target_modules" and before else before == now
        if before is not None and not same:
            raise ConfigError(
                "ckpt_path",
                f"trained with model.lora.{key}={before}, and this configuration has {now}: pass "
                f"--model.lora.{key} or the run's config.yaml",
                ckpt_path,
            )
    if hparams.get("pretrained") not in (None, model.pretrained):
        log.warning(
            "%s: trained on %s, now loaded onto %s: fine if they are the same model",
            ckpt_path,
            hparams["pretrained"],
            model.pretrained,
        )


def explain_parse_error(message: str, args: Iterable[str], known_keys: Iterable[str]) -> ConfigError:
    """One line for a jsonargparse error, naming the config file that set the key, if one did."""
    args, message = list(args), _unwrap_subclass_error(message)
    if message.startswith("Problems parsing config"):
        for config in _config_files(args):
            try:
                yaml.safe_load(Path(config).read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as err:
                mark = getattr(err, "problem_mark", None)
                where = f"{config}:{mark.line + 1}" if mark else config
                return ConfigError("--config", f"not valid YAML ({getattr(err, 'problem', err)})", where)
    unknown = re.search(r"does not accept option '([^']+)'|unrecognized arguments: --([^\s=]+)", message)
    if unknown:
        key = unknown.group(1) or unknown.group(2)
        close = difflib.get_close_matches(key, list(known_keys), n=1, cutoff=0.75)
        section = key.split(".")[0] if key.startswith(("model.", "data.")) else ""  # their options: --model.help
        problem = "unknown option" + (
            f" (did you mean {close[0]}?)" if close else f"; see --{section}{'.' * bool(section)}help"
        )
        return ConfigError(key, problem, _source(key, args))
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if not keys:
        return ConfigError("command line", " ".join(message.split()))
    key = keys[0] + "".join(f".init_args.{inner}" for inner in keys[1:])
    return ConfigError(key, _describe_value_error(message.split(f'Parser key "{keys[-1]}"')[-1]), _source(key, args))


def _unwrap_subclass_error(message: str) -> str:
    """The error inside a ``model``/``data`` class (subclass mode), as if its options were the parser's own:
    ``Parser key "model": … Problem with given class_path '…': Parser key "lora.r": …`` becomes
    ``Parser key "model.lora.r": …``, and the ``null`` alternative of the outer union is dropped."""
    found = re.match(
        r'Parser key "(model|data)":.*?- Problem with given class_path \'[^\']+\':\n(.*?)\n\s*- Expected a '
        r"<class 'NoneType'>",
        message,
        re.S,
    )
    if not found:
        return message
    prefix, inner = found.group(1), textwrap.dedent(found.group(2)).strip()
    group = re.fullmatch(r"Group '([^']+)' does not accept option '([^']+)'", inner)
    if group:
        return f"does not accept option '{prefix}.{group.group(1)}.{group.group(2)}'"
    if inner.startswith("unrecognized arguments: --"):
        return inner.replace("--", f"--{prefix}.", 1)
    if inner.startswith('Parser key "'):
        return inner.replace('Parser key "', f'Parser key "{prefix}.', 1)
    return message


def _describe_value_error(detail: str) -> str:
    value = re.search(r"(?:Given|Got) value: (.*?)\.?(?: Got value:|$)", detail, re.M)
    given = repr(value.group(1)) if value else "it"
    missing = re.search(r"No module named '[^']+'|has no attribute '[^']+'", detail)
    if missing:
        return f"cannot import {given} ({missing.group(0)})"
    expected = []
    for kind in re.findall(r"Expected an? (<class '[\w.]+'>|typing\.Literal\[[^\]]*\])", detail):
        name = re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", kind).replace("NoneType", "null")
        name = re.sub(r"typing\.Literal\[(.*)\]", r"one of \1", name)
        if name not in expected:
            expected.append(name)
    if expected:
        return f"expected {' or '.join(expected)}, got {given}"
    return " ".join(detail.strip(": \n").split())[:300]


def _config_files(args: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _plain(key: str) -> str:
    return key.replace(".init_args.", ".")  # `--model.optimizer.lr` is short for `--model.optimizer.init_args.lr`


def _source(key: str, args: list[str]) -> str | None:
    """The config file that sets ``key`` last, or None if the command line does (or nothing can tell)."""
    given = {_plain(arg[2:].split("=")[0].rstrip("+")) for arg in args if arg.startswith("--")}
    if _plain(key) in given:
        return None
    for config in reversed(_config_files(args)):
        try:
            node = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        for part in key.split("."):
            if isinstance(node, dict) and part not in node and isinstance(node.get("init_args"), dict):
                node = node["init_args"]
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return config
    return None
