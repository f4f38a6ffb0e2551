"""Embedded models: offline stand-ins for ``microsoft/Phi-3-mini-4k-instruct``.

No hub is reachable here, so ``model.pretrained: embedded:NAME`` builds, deterministically, a
``Phi3ForCausalLM`` with random weights and a byte-level BPE tokenizer trained on the cat corpus
(``data/cat_corpus.jsonl``, or the file ``$MEOWDREAD_TINY_CORPUS`` names). The
tokenizer carries Phi-3's special tokens and chat template. Both are written to a cache directory as an
ordinary Hugging Face checkpoint, which then goes through exactly the same ``from_pretrained`` +
``BitsAndBytesConfig`` path as the real model.

- ``embedded:tiny-phi3``: 2 layers, width 128; the offline default for CPU runs and tests.
- ``embedded:phi3-mini-random``: Phi-3-mini-4k's real shapes (3.8B parameters) with random weights, for
  measuring speed and memory on a GPU without the hub (quality is meaningless). About 7.6 GB on disk.

    python -m meowdread.embedded tiny-phi3     # build (or find) one and print its directory
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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


def cache_root() -> Path:
    """Where built embedded models live: ``$MEOWDREAD_CACHE`` or ``~/.cache/meowdread``."""
    return Path(os.environ.get("MEOWDREAD_CACHE", Path.home() / ".cache" / "meowdread"))


def resolve_pretrained(name: str) -> str:
    """Turn ``model.pretrained`` into something ``from_pretrained`` takes.

    Hub ids and local directories pass through untouched; ``embedded:tiny-phi3`` is built on first use.
    """
    if not name.startswith(EMBEDDED_PREFIX):
        return name
    spec = name[len(EMBEDDED_PREFIX) :]
    if spec not in SPECS:
        raise ValueError(f"model.pretrained: unknown embedded model {name!r}; known: {sorted(SPECS)}")
    corpus = Path(os.environ.get("MEOWDREAD_TINY_CORPUS", DEFAULT_CORPUS))
    return str(build_embedded(spec, corpus))


def build_embedded(name: str, corpus: Path, root: Path | None = None) -> Path:
    """Build embedded model ``name`` for ``corpus`` unless a build of the same inputs is already cached."""
    if not corpus.is_file():
        raise FileNotFoundError(f"{corpus}: the embedded tokenizer is trained on this corpus, and it is missing")
    spec = SPECS[name]
    key = hashlib.sha256(corpus.read_bytes() + json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    root = root or cache_root()
    target = root / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a crash or a parallel build never leaves a half-written model.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    staging.chmod(0o755)
    try:
        tokenizer = _train_tokenizer(corpus, spec)
        tokenizer.save_pretrained(staging)
        _init_model(tokenizer, spec).save_pretrained(staging, max_shard_size="2GB")
        try:
            staging.rename(target)
        except OSError:  # another process finished first; theirs is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


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
