"""``meowdread export``: the tuned model as one standalone directory, LoRA merged in, with its tokenizer.

    meowdread export --config configs/tiny.yaml --ckpt_path last --output exported/tiny
    meowdread export --config configs/phi3_qlora.yaml --model.adapter lightning_logs/version_0/adapter --output phi3
    meowdread export --config configs/tiny.yaml --ckpt_path last --format gguf --gguf_type q8_0 --output x

``--format gguf`` writes ``model.gguf`` (for llama.cpp, Ollama, LM Studio: :mod:`meowdread.gguf_export`) and an
Ollama ``Modelfile`` (:mod:`meowdread.modelfile`) instead of the safetensors directory.

Stock ``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` load the
result, with no meowdread and no remote code. The base is loaded in 4-bit as in training, its NF4 weights are
dequantized to ``model.quantization.compute_dtype`` (bf16 in both configs): these are the very values the
adapter was trained against, since each matmul dequantizes them to that dtype. The LoRA update is then merged
into them. Merging into the 4-bit weights instead would re-quantize the update and lose most of it (peft
#1043, #2321). The directory is written beside ``--output`` and renamed into place; a non-empty ``--output`` is
replaced only with ``--overwrite``, and only if it holds an exported model (a ``config.json`` or ``model.gguf``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from meowdread.chat_format import ChatFormat
from meowdread.checkpoints import umask_modes


def check_output(output: Path, overwrite: bool = False) -> None:
    """Refuse an ``output`` that cannot be written or must not be replaced, before any slow work."""
    if output.exists():
        if not output.is_dir():
            raise FileExistsError(f"{output}: exists and is not a directory")
        if any(output.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{output}: exists and is not empty; add --overwrite to replace it")
            if not any((output / name).is_file() for name in ("config.json", "model.gguf")):
                raise FileExistsError(
                    f"{output}: holds no config.json or model.gguf, so it is no exported model; not replacing it"
                )
    parent = output.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{output}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{output}: {parent} is not writable")


def merge_lora(peft_model, dtype: torch.dtype):
    """The base model with the LoRA update merged into its weights, in ``dtype``; a 4-bit base is dequantized
    first. Consumes ``peft_model``."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config = peft_model.peft_config[peft_model.active_adapter]
    # The embedding is never resized here; "auto" would look the base id up (on the hub, for a hub id).
    lora = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    # An adapter folder names its base by the id the user gave; the model in hand is that base, loaded.
    config.base_model_name_or_path = None
    base = peft_model.unload()  # the LoRA layers removed, nothing merged
    if getattr(base, "is_quantized", False):
        base.dequantize(dtype=dtype)  # also drops the quantization config
    base.to(dtype)
    unquantized = get_peft_model(base, config)
    missing = [k for k in set_peft_model_state_dict(unquantized, lora).missing_keys if "lora_" in k]
    if missing:
        raise RuntimeError(f"LoRA weights not restored after dequantization: {missing[:3]}")
    return unquantized.merge_and_unload(safe_merge=True).eval()


def export(
    module, output: str | Path, overwrite: bool = False, format: str = "hf", gguf_type: str = "f16"
) -> list[Path]:
    """Write ``module``'s model, LoRA merged, and its tokenizer to ``output``; return the files written.

    ``module`` is a configured :class:`meowdread.model.QLoraModule`; it is consumed (its model is merged).
    ``format`` is ``hf`` (safetensors and tokenizer files) or ``gguf`` (``model.gguf`` of ``gguf_type`` and a
    ``Modelfile``).
    """
    output = Path(output).resolve()  # a name to put ".partial" beside, even for "."
    check_output(output, overwrite)
    model = merge_lora(module.model, getattr(torch, module.quantization.compute_dtype))
    module.model = None
    model.config.use_cache = True  # training turned it off; generation wants it
    # Stock generate() must stop at the end of a turn too, or the model talks on past its answer (Phi-3's own
    # generation config stops on its turn end; many converted checkpoints only on end of text).
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    stops = ChatFormat.of(module.tokenizer).stop_ids
    model.generation_config.eos_token_id = eos + [i for i in stops if i not in eos]
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = ChatFormat.of(module.tokenizer).pad_id

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if format == "gguf":
            from meowdread.gguf_export import save_gguf

            save_gguf(staging, model, module.tokenizer, gguf_type, module.hparams.pretrained, module.sampling)
        else:
            model.save_pretrained(staging)  # safetensors
            module.tokenizer.save_pretrained(staging)
        umask_modes(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = output.with_name(output.name + ".old")
    if output.exists():  # empty, or a previous export and --overwrite (checked above)
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
    staging.rename(output)
    shutil.rmtree(old, ignore_errors=True)
    return sorted(p for p in output.iterdir() if p.is_file())


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def add_arguments(parser) -> None:
    parser.add_argument("--output", type=str, required=True, help="the directory to write the merged model to")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it holds a model")
    parser.add_argument(
        "--format",
        choices=["hf", "gguf"],
        default="hf",
        help="hf: safetensors for transformers; gguf: model.gguf and an Ollama Modelfile, for llama.cpp",
    )
    parser.add_argument(
        "--gguf_type",
        choices=["f16", "bf16", "q8_0"],
        default=None,
        help="--format gguf: the type of the weight matrices (default f16; q8_0: 8-bit, about half the size)",
    )


def _check_gguf(pretrained: str, trust_remote_code: bool) -> None:
    """Refuse a model or tokenizer that GGUF export cannot write, before the model loads."""
    from transformers import AutoConfig

    from meowdread.data import load_tokenizer
    from meowdread.embedded import resolve_pretrained
    from meowdread.gguf_export import check_supported, check_tokenizer

    check_supported(AutoConfig.from_pretrained(resolve_pretrained(pretrained), trust_remote_code=trust_remote_code))
    check_tokenizer(load_tokenizer(pretrained))


def run(cli) -> None:
    """``meowdread export``, given the parsed :class:`meowdread.cli.ToolCLI`."""
    output, overwrite = Path(cli.config.output), cli.config.overwrite
    if not (cli.config.ckpt_path or cli.model.hparams.adapter):
        raise ValueError("export: nothing to merge: give --ckpt_path (a fit checkpoint, or last) or --model.adapter")
    if cli.config.format == "hf" and cli.config.gguf_type is not None:
        raise ValueError(
            f"export: --gguf_type {cli.config.gguf_type} is for --format gguf; --format hf writes safetensors"
        )
    check_output(output, overwrite)  # before loading the model, which takes minutes for Phi-3
    if cli.config.format == "gguf":
        _check_gguf(cli.model.hparams.pretrained, cli.model.hparams.trust_remote_code)
    module = cli.load_module()
    weights = cli.config.ckpt_path or module.hparams.adapter
    base, dtype = module.hparams.pretrained, module.quantization.compute_dtype
    files = export(module, output, overwrite, cli.config.format, cli.config.gguf_type or "f16")
    total = sum(f.stat().st_size for f in files)
    print(f"exported {weights} merged into {base} ({dtype}) to {output}: {len(files)} files, {_size(total)}")
    for f in files:
        print(f"  {f.name}  {_size(f.stat().st_size)}")
