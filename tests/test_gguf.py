"""``meowdread export --format gguf``: LoRA merged, written as GGUF, loaded back by transformers' own GGUF reader
(``from_pretrained(dir, gguf_file=...)``), with the merged model's logits and the tokenizer's ids (offline, CPU)."""

import json
from itertools import pairwise

import pytest
import torch

from meowdread.chat_format import ChatFormat
from meowdread.cli import main
from meowdread.data import collate, load_tokenizer
from meowdread.export import export
from meowdread.formats import read_corpus
from meowdread.model import LoraSettings, QLoraModule

from .conftest import CORPUS, tiny_args
from .test_export import corpus_batch, lora_module, relative_error


def stock(directory, **kwargs):
    """A model as stock transformers loads it, in fp32 (a GGUF with ``gguf_file``)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()


def logits(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


@pytest.fixture(scope="module")
def phi3(tmp_path_factory, embedded_cache):
    """The tiny 4-bit Phi-3 with a perturbed LoRA saved as an adapter, and the merged model's fp32 logits on four
    corpus conversations (and the base's, without the adapter)."""
    root = tmp_path_factory.mktemp("gguf-phi3")
    module = lora_module("bfloat16")
    module.export_adapter(root / "adapter")
    batch = corpus_batch(module.tokenizer)
    with torch.inference_mode(), module.model.disable_adapter():
        base = module(batch["input_ids"], batch["attention_mask"]).float()
    # The reference is the merged HF export of the saved adapter, as stock transformers loads it in fp32.
    saved = QLoraModule(pretrained="embedded:tiny-phi3", adapter=str(root / "adapter"), gradient_checkpointing=False)
    saved.configure_model()
    export(saved, root / "hf")
    return root, batch, logits(stock(root / "hf"), batch), base


@pytest.mark.parametrize(
    "gguf_type, tolerance",
    [
        # bf16 weights are exact in f16 but for the tiniest (f16 subnormals); measured 3.3e-7.
        ("f16", 1e-5),
        # 8-bit blocks of 32 with one scale each; measured 1.4e-2 on this 128-wide model.
        ("q8_0", 3e-2),
    ],
)
def test_the_gguf_export_loads_back_with_the_merged_models_logits(phi3, gguf_type, tolerance, tmp_path, capsys):
    from transformers import AutoTokenizer

    root, batch, reference, base = phi3
    out = tmp_path / "exported"
    main(
        tiny_args(
            "export", tmp_path / "runs", "--model.adapter", str(root / "adapter"), "--format", "gguf",
            "--gguf_type", gguf_type, "--output", str(out), "--model.sampling.temperature", "0.5",
        )
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    assert "model.gguf" in capsys.readouterr().out
    mask = batch["attention_mask"]
    assert relative_error(base, reference, mask) > 0.5  # the adapter matters, so the match below can fail

    model = stock(out, gguf_file="model.gguf")
    assert type(model).__name__ == "Phi3ForCausalLM"
    assert relative_error(logits(model, batch), reference, mask) < tolerance

    ours, theirs = load_tokenizer("embedded:tiny-phi3"), AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    chat = ChatFormat.of(ours)
    text = chat.render(read_corpus(CORPUS)[0][:2], add_generation_prompt=True)
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours(text, add_special_tokens=False)["input_ids"]
    assert theirs.chat_template == ours.chat_template
    for special in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(theirs, special) == getattr(ours, special), special

    modelfile = (out / "Modelfile").read_text(encoding="utf-8")
    assert modelfile.startswith("FROM ./model.gguf\n") and 'TEMPLATE """' in modelfile
    stops = [json.loads(line.removeprefix("PARAMETER stop ")) for line in modelfile.splitlines() if "stop" in line]
    assert stops == ours.convert_ids_to_tokens(list(chat.stop_ids)) and chat.turn_end in stops
    assert "PARAMETER temperature 0.5\nPARAMETER top_p 0.9\n" in modelfile  # model.sampling, as predict samples


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_tiny_models_of_the_llama_family_and_qwen2_round_trip(family, tmp_path, embedded_cache):
    """Llama (SmolLM2's shape in small: grouped-query attention, tied embeddings, ChatML with a default system
    prompt), Qwen2 (q/k/v biases) and Mistral ([INST] turns), each with a LoRA merged: q/k are permuted for
    llama.cpp (and back by transformers' reader) where the architecture wants it, and tied embeddings write no
    output.weight."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meowdread.gguf_export import write_gguf
    from meowdread.modelfile import modelfile

    from .tiny_models import FAMILIES, build_model_dir

    module = QLoraModule(
        pretrained=str(build_model_dir(family, CORPUS, tmp_path / family)),
        lora=LoraSettings(dropout=0.0),
        gradient_checkpointing=False,
    )
    module.configure_model()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    tokenizer, chat = module.tokenizer, ChatFormat.of(module.tokenizer)
    batch = collate([chat.encode(c) for c in read_corpus(CORPUS)[:4]], pad_id=chat.pad_id)
    export(module, tmp_path / "hf")  # merged, in bf16
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    write_gguf(merged, tokenizer, tmp_path / "model.gguf", "f16")

    names = [t.name for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors]
    assert ("output.weight" in names) == (family != "llama") and "blk.0.attn_q.weight" in names
    assert ("blk.0.attn_q.bias" in names) == (family == "qwen2")
    model = stock(tmp_path, gguf_file="model.gguf")
    assert model.config.tie_word_embeddings == (family == "llama")
    reference = logits(stock(tmp_path / "hf"), batch)
    assert relative_error(logits(model, batch), reference, batch["attention_mask"]) < 1e-5

    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    text = chat.render(read_corpus(CORPUS)[0], add_generation_prompt=True)
    assert theirs(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    text = modelfile(tokenizer)
    assert f'PARAMETER stop "{FAMILIES[family]["turn_end"]}"' in text
    assert ('TEMPLATE """' in text) == (family != "mistral")  # [INST] closes no user turn: no Go template
    assert ('SYSTEM """You are a helpful cat."""' in text) == (family == "llama")


def sentencepiece_style_tokenizer():
    """A tokenizer shaped like Phi-3-mini's (and Llama 2's): BPE over a vocabulary that starts with <unk>, <s>,
    </s> and the 256 byte tokens, with byte fallback, and spaces turned into ▁ by the normalizer; Phi-3's
    special tokens added after it. Trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from meowdread.embedded import PHI3_CHAT_TEMPLATE, PHI3_SPECIAL_TOKENS, _corpus_texts

    first = ["<unk>", "<s>", "</s>"]
    normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=first, show_progress=False)
    learner.train_from_iterator(_corpus_texts(CORPUS), trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    pieces = sorted((t for t in learned["vocab"] if t not in first), key=learned["vocab"].get)
    vocab = {t: i for i, t in enumerate(first + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizer
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(first)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in PHI3_SPECIAL_TOKENS if t.startswith("<|")],
        chat_template=PHI3_CHAT_TEMPLATE,
    )


def llama_cpp_spm_ids(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """What llama.cpp's sentencepiece tokenizer makes of plain ``text`` from a GGUF's tokens and scores: start
    from characters, merge the adjacent pair whose join is a token of the highest score (leftmost on ties)
    until none is, and spell what is left over in byte tokens."""
    ids = {token: i for i, token in enumerate(tokens)}
    symbols = list("\u2581" + text.replace(" ", "\u2581"))
    while True:
        pairs = [(scores[ids[a + b]], -i) for i, (a, b) in enumerate(pairwise(symbols)) if a + b in ids]
        if not pairs:
            break
        i = -max(pairs)[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return [
        j
        for symbol in symbols
        for j in ([ids[symbol]] if symbol in ids else [ids[f"<0x{b:02X}>"] for b in symbol.encode("utf-8")])
    ]


def test_a_sentencepiece_style_vocabulary_round_trips_with_scores_byte_tokens_and_padding(tmp_path):
    """Phi-3-mini's tokenizer is sentencepiece-style BPE, and its embedding has more rows (32064) than the
    tokenizer has tokens (32011): the file holds ``llama`` tokens with scores and byte types, padded to the rows."""
    import gguf
    from transformers import AutoTokenizer

    from meowdread.embedded import SPECS, _init_model
    from meowdread.gguf_export import write_gguf

    tokenizer = sentencepiece_style_tokenizer()
    model = _init_model(tokenizer, {**SPECS["tiny-phi3"], "model_vocab_size": len(tokenizer) + 13})
    model.save_pretrained(tmp_path / "hf")
    write_gguf(model, tokenizer, tmp_path / "model.gguf", "f16")

    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    field = reader.get_field("tokenizer.ggml.model")
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    types = reader.get_field("tokenizer.ggml.token_type")
    types = [int(types.parts[i][0]) for i in types.data]
    assert len(types) == model.config.vocab_size and types[-13:] == [gguf.TokenType.UNUSED] * 13
    assert types[3:259] == [gguf.TokenType.BYTE] * 256 and types[tokenizer.convert_tokens_to_ids("<|end|>")] == 3

    tokens, scores = (reader.get_field(f"tokenizer.ggml.{key}") for key in ("tokens", "scores"))
    tokens = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    scores = [float(scores.parts[i][0]) for i in scores.data]
    for plain in [line for c in read_corpus(CORPUS)[:5] for m in c for line in [m["content"]]] + ["Ça  va 🐈"]:
        assert llama_cpp_spm_ids(plain, tokens, scores) == tokenizer(plain, add_special_tokens=False)["input_ids"]

    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    conversation = [{"role": "user", "content": "Why do  cats sit in boxes? 🐈 Ça va"}]
    text = ChatFormat.of(tokenizer).render(conversation, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert theirs(text, add_special_tokens=False)["input_ids"] == ids
    assert tokenizer.convert_tokens_to_ids("<0xF0>") in ids  # the emoji fell back to bytes
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    reference = logits(stock(tmp_path / "hf"), batch)
    assert (
        relative_error(logits(stock(tmp_path, gguf_file="model.gguf"), batch), reference, batch["attention_mask"])
        < 1e-5
    )
