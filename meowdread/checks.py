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
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml

from meowdread.chat_format import ChatFormat
from meowdread.checkpoints import load_checkpoint_file
from meowdread.data import load_tokenizer, read_prompts
from meowdread.embedded import EMBEDDED_PREFIX, TINY_PHI3, resolve_pretrained
from meowdread.model_files import check_model_files
from meowdread.packing import packable
from meowdread.ranges import CALLBACK_RANGES, RANGES, ConfigError, check_value, option
from meowdread.speed import check_kernels

log = logging.getLogger(__name__)

CPU_HINT = "this machine has no CUDA GPU: on this machine use configs/tiny.yaml"
# Free space a run directory's disk must have before fit starts: one Phi-3-mini checkpoint at LoRA r 16 is
# 300 MB, its adapter 100 MB. MEOWDREAD_MIN_FREE_MB overrides it (0 turns the check off).
MIN_FREE_MB = 512


def check_config(subcommand: str | None, config: Any) -> None:
    """Every check below, on the namespace of one subcommand (``cli.config[subcommand]``); ``subcommand`` is
    None for ``chat`` and ``export``, which write no run directory."""
    check_ranges(config)
    # Settings that cannot go together, before whether this machine could run either.
    check_kernels(option(config, "model.kernels") or "torch", bool(option(config, "model.compile")))
    check_cuda_settings(config)
    check_machine(config)
    if subcommand is not None:
        check_output_dir(config, need_space=subcommand == "fit")
    check_pretrained(option(config, "model.pretrained"))
    check_adapter(option(config, "model.adapter"))
    callbacks = config.trainer.get("callbacks") or []
    samples = any(_samples(c) for c in callbacks)
    if subcommand == "predict" or (subcommand == "fit" and samples):
        prompts = read_prompts(option(config, "data.prompts"))
        new_tokens = [option(config, "model.sampling.max_new_tokens")]
        if subcommand == "fit":  # the callback's own max_new_tokens, where it sets one
            new_tokens = [option(c, "init_args.max_new_tokens") or new_tokens[0] for c in callbacks if _samples(c)]
        check_prompt_lengths(prompts, option(config, "data.prompts"), option(config, "model.pretrained"), new_tokens)
    if subcommand == "fit" and option(config, "data.padding_free") is True:
        check_packed_rows(option(config, "model.pretrained"), option(config, "data.max_length"), _varlen_kernel(config))
    ckpt_path = str(config.get("ckpt_path") or "")
    if ckpt_path and ckpt_path.split(":")[0] not in ("best", "hpc", "registry"):  # those are Lightning's to resolve
        check_checkpoint(ckpt_path, config)


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
    optimizer = _class_path(option(config, "model.optimizer"))
    if optimizer.startswith("bitsandbytes.optim.Paged"):
        raise ConfigError(
            "model.optimizer", f"{optimizer} pages its state in CUDA memory, and {CPU_HINT} (torch.optim.AdamW)"
        )


def check_ranges(config: Any) -> None:
    """Every numeric option inside its range (:data:`meowdread.ranges.RANGES`), callbacks' options included."""
    for key in RANGES:
        if key == "model.sampling.temperature" and option(config, "model.sampling.do_sample") is False:
            continue  # greedy decoding ignores it
        check_value(key, option(config, key))
    if option(config, "model.lora.target_modules") == []:
        raise ConfigError("model.lora.target_modules", "is empty: name at least one module to adapt")
    for i, callback in enumerate(option(config, "trainer.callbacks") or []):
        ranges = CALLBACK_RANGES.get(_class_path(callback).rsplit(".", 1)[-1], {})
        for name, range_ in ranges.items():
            check_value(f"trainer.callbacks[{i}].init_args.{name}", option(callback, f"init_args.{name}"), range_)


def _on_cpu(config: Any) -> bool:
    accelerator = _class_path(config.trainer.get("accelerator")).lower()
    return accelerator == "cpu" or accelerator.endswith("cpuaccelerator") or not torch.cuda.is_available()


def check_machine(config: Any) -> None:
    """Options this machine cannot honour: a package that is not installed, a feature its device lacks."""
    precision = str(config.trainer.get("precision"))
    if _on_cpu(config) and precision in ("16", "16-mixed"):
        raise ConfigError("trainer.precision", f"{precision!r} (fp16 autocast) needs CUDA: on the CPU use bf16-mixed")
    devices = config.trainer.get("devices")
    if isinstance(devices, str) and devices.lstrip("-").isdigit():  # the command line gives a string
        devices = int(devices)
    if isinstance(devices, int) and not (devices == -1 or devices >= 1):
        raise ConfigError("trainer.devices", f"got {devices}, must be >= 1, -1 (every device) or auto")
    if not _on_cpu(config) and isinstance(devices, int) and devices > torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError("trainer.devices", f"{devices} GPUs asked for, and this machine has {count}")
    if option(config, "model.compile") is True:
        if _on_cpu(config):
            raise ConfigError("model.compile", f"true compiles for CUDA, and {CPU_HINT} (or model.compile false)")
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("model.compile", "true needs Triton: pip install triton, or model.compile false")
    attention = str(option(config, "model.attn_implementation"))
    check_attention(attention, on_cpu=_on_cpu(config))
    if option(config, "data.padding_free") is True and not packable(attention):
        raise ConfigError(
            "data.padding_free",
            f"true needs attention that keeps packed examples apart: sdpa, eager or FlashAttention, not {attention!r}",
        )


def _varlen_kernel(config: Any) -> tuple | None:
    """PyTorch's variable-length attention and its style (:func:`meowdread.packing._varlen`) where packed rows
    will run on it (a GPU), else None."""
    from meowdread.packing import _varlen

    return None if _on_cpu(config) else _varlen()


def check_packed_rows(pretrained: str, max_length: Any, kernel: tuple | None) -> None:
    """What padding-free rows cannot train, from the model's config, before the base loads: attention
    dropout (not supported on packed rows), and with a variable-length ``kernel`` that has no sliding window
    (torch 2.9), examples longer than the model's window."""
    model_config = _model_config(pretrained)
    if model_config is None:
        return
    dropout = getattr(model_config, "attention_dropout", 0.0) or 0.0
    if dropout > 0:
        raise ConfigError(
            "data.padding_free",
            f"true does not train with attention dropout, and {pretrained}'s config sets attention_dropout "
            f"{dropout}: use padded batches (data.padding_free false)",
        )
    window = getattr(model_config, "sliding_window", None)
    if kernel is not None and kernel[1] != "window" and window and isinstance(max_length, int) and max_length > window:
        raise ConfigError(
            "data.max_length",
            f"{max_length} is longer than {pretrained}'s sliding window ({window}), and this torch's "
            f"variable-length attention has none for padding-free rows: set data.max_length to at most "
            f"{window}, use torch 2.10 or newer, or data.padding_free false",
        )


def _model_config(pretrained: str):
    """The transformers config of ``pretrained`` where it can be read without building or downloading a model
    (an embedded stand-in other than the tiny one is built by the data module), else None."""
    if pretrained.startswith(EMBEDDED_PREFIX) and pretrained != TINY_PHI3:
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_pretrained(pretrained), trust_remote_code=False)
    except (OSError, ValueError):
        return None  # not available offline: transformers says so when the model loads


def check_attention(name: str, on_cpu: bool) -> None:
    """A transformers attention backend that exists and, for FlashAttention, is installed and has a GPU."""
    if name in ("sdpa", "eager", "None") or "/" in name:  # org/name: a kernel from the hub, transformers' to load
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.utils import import_utils

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.keys()]
    if name not in known:
        raise ConfigError("model.attn_implementation", f"unknown backend {name!r} (one of {', '.join(known)})")
    version = re.fullmatch(r"flash_attention_(\d)", name)
    if version:
        if on_cpu:
            raise ConfigError("model.attn_implementation", f"{name!r} needs CUDA, and {CPU_HINT} (or sdpa)")
        available = getattr(import_utils, f"is_flash_attn_{version.group(1)}_available", lambda: False)
        if not available():
            package = "flash-attn" if version.group(1) == "2" else f"FlashAttention-{version.group(1)}"
            raise ConfigError(
                "model.attn_implementation",
                f"{name!r} needs the {package} package, which is not installed here: install it, or use sdpa",
            )


def check_output_dir(config: Any, need_space: bool = False) -> None:
    """The run directory's parent must be writable, and for ``fit`` have room for checkpoints: found out now,
    not when the first checkpoint is due."""
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
    raw = os.environ.get("MEOWDREAD_MIN_FREE_MB", str(MIN_FREE_MB))
    if not raw.strip().isdigit():
        raise ConfigError("MEOWDREAD_MIN_FREE_MB", f"must be a whole number of MB, got {raw!r}")
    need = int(raw)
    free = shutil.disk_usage(path).free // 2**20
    if need_space and free < need:
        raise ConfigError(
            key,
            f"{free} MB free on this disk, and fit needs {need} MB for checkpoints and the adapter: free some "
            "space, or choose another save_dir (MEOWDREAD_MIN_FREE_MB sets the minimum)",
            path,
        )


def check_pretrained(pretrained: str) -> None:
    """A local model directory that exists, or a hub id that can be had (from the cache, when offline)."""
    if pretrained.startswith(EMBEDDED_PREFIX):
        return  # built on demand; an unknown name is reported by meowdread.embedded
    path = Path(pretrained).expanduser()
    if path.exists():
        check_model_files(path)
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


def check_prompt_lengths(prompts: list[str], path: str, pretrained: str, new_tokens: list[Any]) -> None:
    """Every prompt, in the chat template, must leave room in the model's context for the answer.

    ``predict`` and the sample callback refuse a prompt that does not fit instead of cutting it (which would
    answer another question): one warning per such prompt, with its number, then the error."""
    config = _model_config(pretrained)  # building an embedded stand-in is the data module's work (once, under DDP)
    if config is None:
        return
    context = getattr(config, "max_position_embeddings", None)
    new = max([n for n in new_tokens if isinstance(n, int)], default=0)
    if not context:
        return
    tokenizer = load_tokenizer(pretrained)
    chat_format = ChatFormat.of(tokenizer)
    too_long = []
    for number, prompt in enumerate(prompts, start=1):
        text = chat_format.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
        # What ChatFormat.prompt_ids gives, without transformers' warning about a sequence this long.
        length = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if length + new > context:
            log.warning(
                "%s: prompt %d is %d tokens in the chat template; %d are left for it",
                path,
                number,
                length,
                context - new,
            )
            too_long.append((number, length))
    if too_long:
        (number, length), n = too_long[0], len(too_long)
        raise ConfigError(
            "data.prompts",
            f"{n} of {len(prompts)} prompts do not fit the model's context ({context} tokens) with max_new_tokens "
            f"{new}: prompt {number} is {length} tokens in the chat template; shorten them, or lower max_new_tokens",
            path,
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


def check_checkpoint(ckpt_path: str | Path, config: Any) -> None:
    """A complete, weights-only checkpoint of a LoRA adapter of the configured shape.

    Lightning's CLI would quietly replace the configured model settings with those saved in the checkpoint;
    meowdread keeps the configuration as the truth and refuses a checkpoint of another adapter shape.
    """
    hparams = load_checkpoint_file(ckpt_path, mmap=True).get("hyper_parameters", {})
    # Started from a saved adapter, the adapter's own shape counts, not model.lora: the load checks that one.
    saved = hparams.get("lora", {}) if not (hparams.get("adapter") or option(config, "model.adapter")) else {}
    for key in ("r", "alpha", "target_modules"):
        before, now = saved.get(key), option(config, f"model.lora.{key}")
        if key == "target_modules" and (isinstance(before, str) or isinstance(now, str)):
            continue  # all-linear names no list: the load compares the adapted module names themselves
        same = sorted(before) == sorted(now) if key == "target_modules" and before else before == now
        if before is not None and not same:
            raise ConfigError(
                "ckpt_path",
                f"trained with model.lora.{key}={before}, and this configuration has {now}: pass "
                f"--model.lora.{key} or the run's config.yaml",
                ckpt_path,
            )
    pretrained = option(config, "model.pretrained")
    if hparams.get("pretrained") not in (None, pretrained):
        log.warning(
            "%s: trained on %s, now loaded onto %s: fine if they are the same model",
            ckpt_path,
            hparams["pretrained"],
            pretrained,
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
    option = re.fullmatch(r"Option '([^']+)' is not accepted", inner)  # a key of the section itself
    if option:
        return f"does not accept option '{prefix}.{option.group(1)}'"
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
