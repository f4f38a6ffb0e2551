"""Tiny random chat models of other families, for testing that one code path serves them all.

Each is a 2-layer model of the family's transformers class with a BPE tokenizer trained on a slice of the cat
corpus, carrying the family's special tokens and a chat template of its kind, saved as an ordinary Hugging
Face directory that ``--model.pretrained DIR`` takes:

- ``llama``: ``LlamaForCausalLM`` with ChatML, tied embeddings, grouped-query attention and SmolLM2's habit
  of inserting a default system prompt; ``<|im_end|>`` is eos and pad.
- ``qwen2``: ``Qwen2ForCausalLM`` (q/k/v biases) with ChatML and no default system prompt; eos
  ``<|endoftext|>``, pad ``<|endoftext|>``.
- ``mistral``: ``MistralForCausalLM`` with ``[INST]`` turns closed by ``</s>`` (eos) and no pad token.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# SmolLM2-135M-Instruct's template, in substance: a default system prompt when the conversation has none.
CHATML_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful cat.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Mistral-instruct's kind: a system message is put before the first user message.
INST = (
    "{{ bos_token }}{% set system = '' %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + (system if loop.index0 == 1 else '') + message['content']"
    " + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

FAMILIES = {
    "llama": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "tokens": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"},
        "template": CHATML_DEFAULT_SYSTEM,
        "turn_end": "<|im_end|>",
    },
    "qwen2": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "tokens": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        "template": CHATML,
        "turn_end": "<|im_end|>",
    },
    "mistral": {
        "specials": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        "tokens": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        "template": INST,
        "turn_end": "</s>",
    },
}


def _texts(corpus: Path, limit: int = 120):
    for line in corpus.read_text(encoding="utf-8").splitlines()[:limit]:
        for message in json.loads(line)["messages"]:
            yield message["content"]


def build_tokenizer(family: str, corpus: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(corpus), trainer=trainer)
    named = set(spec["tokens"].values())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=[t for t in spec["specials"] if t not in named],
        chat_template=spec["template"],
        model_max_length=512,
        **spec["tokens"],
    )


def build_model_dir(family: str, corpus: Path, directory: Path) -> Path:
    """Save a tiny random model of ``family`` with its tokenizer to ``directory``."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tokenizer = build_tokenizer(family, corpus)
    ids = tokenizer.convert_tokens_to_ids
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention, as in the real ones
        "max_position_embeddings": 512,
        "eos_token_id": ids(FAMILIES[family]["turn_end"]),
    }
    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[family]
    config = config_class(**shape, tie_word_embeddings=family == "llama")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_class(config).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
