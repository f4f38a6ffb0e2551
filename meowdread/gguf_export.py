"""``meowdread export --format gguf``: the merged model as one GGUF file, for llama.cpp, Ollama and LM Studio.

    meowdread export --config configs/phi3_qlora.yaml --ckpt_path last --format gguf --output exported/phi3
    meowdread export --config configs/tiny.yaml --ckpt_path last --format gguf --gguf_type q8_0 --output x

The LoRA is first merged into the dequantized base as for ``--format hf`` (:func:`meowdread.export.merge_lora`);
this module then writes that model with the ``gguf`` package, following the tensor names and metadata keys of
llama.cpp's own converter (``convert_hf_to_gguf.py``) for each architecture:

- **Phi-3** (``phi3``): the fused ``qkv_proj`` and ``gate_up_proj`` stay fused (``attn_qkv``, ``ffn_up``: llama.cpp
  splits them at run time); the rotary width, the original context length and the sliding window are stated.
- **Llama family** (``llama``: Llama, SmolLM2, Mistral) and **Qwen2** (``qwen2``): the rows of ``q_proj`` and
  ``k_proj`` of a Llama are permuted per head, because llama.cpp rotates adjacent pairs where transformers
  rotates halves (transformers' GGUF reader undoes it). Tied embeddings write no ``output.weight``: llama.cpp
  reads the embedding matrix for it.

The tokenizer goes into the metadata: the vocabulary, the merges, token types and, for sentencepiece-style
vocabularies (Phi-3-mini, Llama 2, Mistral), scores; the bos/eos/unk/pad ids; the end of a chat turn (``eot``);
and the chat template. ``--gguf_type`` picks f16, bf16 or q8_0 for the matrices; 1-D tensors and norms stay f32,
and a matrix whose rows do not split into q8_0's blocks of 32 is written f16, as llama.cpp does.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# transformers' model_type -> (llama.cpp architecture, whether q/k rows are permuted for llama.cpp's rotary)
ARCHITECTURES = {
    "phi3": ("phi3", False),
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
}
GGUF_TYPES = ("f16", "bf16", "q8_0")

# Byte-level pre-tokenizers by the regex that splits words before the byte mapping; llama.cpp's names for them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_USE_HF = "Use --format hf, then llama.cpp's convert_hf_to_gguf.py"


def check_supported(config) -> tuple[str, bool]:
    """The llama.cpp architecture of a transformers ``config``, and whether q/k are permuted; one clear error
    naming ``--format`` for a model this export cannot write."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        names = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
        raise ValueError(
            f"--format gguf: model_type {model_type!r} ({names}) is not supported: GGUF export writes phi3, llama, "
            f"mistral and qwen2 models. {_USE_HF}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"--format gguf: the rope scaling {rope.get('rope_type')!r} of this {model_type} (a long-context variant) "
            f"is not supported. {_USE_HF}"
        )
    return ARCHITECTURES[model_type]


def save_gguf(directory: Path, model, tokenizer, gguf_type: str, base: str, sampling=None) -> None:
    """``model.gguf`` and its Ollama ``Modelfile`` (:mod:`meowdread.modelfile`) in a new ``directory``; ``base``
    is ``model.pretrained``, which names the model in the file."""
    from meowdread.modelfile import modelfile

    directory.mkdir()
    write_gguf(
        model, tokenizer, directory / "model.gguf", gguf_type, name=base.split(":")[-1].split("/")[-1] + "-meowdread"
    )
    (directory / "Modelfile").write_text(modelfile(tokenizer, "model.gguf", sampling), encoding="utf-8")


def write_gguf(model, tokenizer, path: str | Path, gguf_type: str = "f16", name: str | None = None) -> Path:
    """Write ``model`` (merged, unquantized) and ``tokenizer`` to the GGUF file ``path``; return it."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf_type: {gguf_type!r} is not one of {list(GGUF_TYPES)}")
    config = model.config
    arch, permute = check_supported(config)
    path = Path(path)
    # Converted tensors go to a temporary file as they come, not all into memory (7.6 GB for Phi-3-mini in f16).
    writer = gguf.GGUFWriter(path, arch, use_temp_file=True)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or Path(getattr(config, "name_or_path", "") or "model").name)
    writer.add_file_type(getattr(gguf.LlamaFileType, "MOSTLY_" + gguf_type.upper()))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hyperparameters(writer, config, arch)
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    qtype = getattr(gguf.GGMLQuantizationType, gguf_type.upper())
    for tensor_name, tensor in _gguf_tensors(model, arch, permute):
        data = tensor.detach().float().cpu().numpy()
        # 1-D tensors and norms stay f32, as in llama.cpp (its kernels expect them so).
        target = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 or tensor_name.endswith("_norm.weight") else qtype
        try:
            data = gguf.quants.quantize(data, target)
        except gguf.QuantError:  # rows not a whole number of blocks
            log.info("%s: rows of %d do not split into %s blocks; written f16", tensor_name, data.shape[-1], target)
            target = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(data, target)
        writer.add_tensor(tensor_name, data, raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_hyperparameters(writer, config, arch: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if arch == "phi3":
        rotary = config.rope_parameters.get("partial_rotary_factor", 1.0)
        writer.add_rope_dimension_count(int(rotary * config.hidden_size) // heads)
        writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings or config.max_position_embeddings)
        writer.add_sliding_window(config.sliding_window or 0)  # 0: none (llama.cpp tells Phi-4 apart by it)
    elif arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from transformers' rotate-halves layout to llama.cpp's rotate-pairs layout."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _gguf_tensors(model, arch: str, permute: bool):
    """``(gguf name, tensor)`` for every weight, in llama.cpp's names and layouts."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), config.num_hidden_layers
    )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd when there is no output.weight
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"--format gguf: no llama.cpp name for the tensor {name!r} of this {config.model_type}")
        if permute and ".self_attn.q_proj." in name:
            tensor = _permute_rotary(tensor, heads)
        elif permute and ".self_attn.k_proj." in name:
            tensor = _permute_rotary(tensor, kv_heads)
        yield gguf_name, tensor


def check_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` is sentencepiece-style BPE (True) or byte-level BPE (False); one clear error naming
    ``--format`` for any other kind."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = spec["model"].get("type")
    if kind != "BPE":
        raise ValueError(
            f"--format gguf: a {kind} tokenizer is not supported, only BPE ones (byte-level or with byte fallback)"
        )
    if spec["model"].get("byte_fallback"):
        return True
    _byte_level_pre_tokenizer(spec)
    return False


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The tokenizer in llama.cpp's metadata keys: the vocabulary padded to the embedding's rows, merges, token
    types (and scores for sentencepiece-style BPE), special ids, and the chat template."""
    import gguf

    from meowdread.chat_format import ChatFormat

    sentencepiece = check_tokenizer(tokenizer)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if sentencepiece:  # llama.cpp merges the pair whose result scores highest: the earliest merge
        rank = {}
        for i, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", ""), i)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_byte_level_pre_tokenizer(spec))
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    T = gguf.TokenType
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # embedding rows past the tokenizer (Phi-3: 32064 rows, 32011 tokens)
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            scores.append(-1000.0)
            continue
        if i in added:
            kind = T.CONTROL if added[i].special else T.USER_DEFINED
            if kind == T.USER_DEFINED and sentencepiece:
                token = token.replace("\u2581", " ")  # llama.cpp matches user-defined tokens in raw text
        elif sentencepiece and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            kind = T.BYTE
        elif token == tokenizer.unk_token:
            kind = T.UNKNOWN
        else:
            kind = T.NORMAL
        tokens.append(token)
        types.append(kind)
        scores.append(-float(rank[token]) if sentencepiece and token in rank else 0.0)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if sentencepiece:
        writer.add_token_scores(scores)
    if merges:
        writer.add_token_merges(merges)
    for key, value in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    chat = ChatFormat.of(tokenizer)
    if chat.turn_end_id != tokenizer.eos_token_id:
        writer.add_eot_token_id(chat.turn_end_id)  # llama.cpp stops a chat turn on it
    plain = tokenizer("meow", add_special_tokens=False)["input_ids"]
    marked = tokenizer("meow")["input_ids"]
    writer.add_add_bos_token(len(marked) > len(plain) and marked[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(marked) > len(plain) and marked[-1] == tokenizer.eos_token_id)
    writer.add_chat_template(tokenizer.chat_template)


def _byte_level_pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the way a byte-level BPE tokenizer splits text into words."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") in _SPLIT_PRE_TOKENIZERS:
        return _SPLIT_PRE_TOKENIZERS[steps[0]["pattern"]["Regex"]]
    raise ValueError(
        f"--format gguf: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is none that "
        f"llama.cpp names here (GPT-2, SmolLM, Llama 3, Qwen2). {_USE_HF}"
    )
