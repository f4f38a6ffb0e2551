"""Nothing runs code it was handed, nothing reaches the network, and no text becomes a control token: remote
code, pickles, sockets, special-token text in the corpus and in prompts."""

import inspect
import json
import shutil
import socket

import pytest
import torch

from meowdread.checkpoints import CheckpointError, SafeCheckpointIO, load_checkpoint_file
from meowdread.cli import main
from meowdread.embedded import resolve_pretrained
from meowdread.model import LoraSettings, QLoraModule

from . import offline
from .conftest import tiny_args


def marker_code(marker) -> str:
    """Python that leaves ``marker`` behind when it runs, defining a Phi-3 in disguise."""
    return (
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import Phi3Config, Phi3ForCausalLM\n"
        "class RemoteConfig(Phi3Config):\n    pass\n"
        "class RemoteModel(Phi3ForCausalLM):\n    config_class = RemoteConfig\n"
    )


@pytest.fixture
def model_with_remote_code(tmp_path, embedded_cache):
    """The tiny Phi-3, whose config.json maps to Python files of its own, as a hub repository may."""
    model = tmp_path / "phi3-with-code"
    shutil.copytree(resolve_pretrained("embedded:tiny-phi3"), model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "remote.RemoteConfig", "AutoModelForCausalLM": "remote.RemoteModel"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "remote.py").write_text(marker_code(tmp_path / "remote-code-ran"))
    return model, tmp_path / "remote-code-ran"


def test_remote_code_is_off_unless_the_config_turns_it_on(model_with_remote_code):
    model, ran = model_with_remote_code
    assert inspect.signature(QLoraModule).parameters["trust_remote_code"].default is False
    module = QLoraModule(pretrained=str(model), lora=LoraSettings(dropout=0.0))
    module.configure_model()
    assert not ran.exists()
    assert type(module.model.get_base_model()).__name__ == "Phi3ForCausalLM"  # transformers' own
    # The same directory with the switch on does run its code: the check above can fail.
    QLoraModule(pretrained=str(model), trust_remote_code=True).configure_model()
    assert ran.exists()


class LeavesAMark:
    """Unpickling this calls ``open(path, "w")``: a stand-in for any code a checkpoint could carry."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_checkpoints_load_weights_only_whatever_the_caller_asks(tmp_path):
    path, ran = tmp_path / "evil.ckpt", tmp_path / "pickle-ran"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": LeavesAMark(ran)}, path)
    with pytest.raises(CheckpointError, match="refused: it holds a pickled object"):
        load_checkpoint_file(path)
    with pytest.raises(CheckpointError, match="refused"):
        SafeCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not ran.exists()
    torch.load(path, weights_only=False)  # what a plain load would have done: the check above can fail
    assert ran.exists()


def test_adapters_are_written_as_safetensors_only(tmp_path, embedded_cache):
    module = QLoraModule(pretrained="embedded:tiny-phi3", lora=LoraSettings(dropout=0.0))
    module.configure_model()
    module.export_adapter(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "adapter_model.safetensors" in files
    assert not {f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))}


def test_the_suite_is_offline(monkeypatch):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    for attempt in (
        lambda: socket.create_connection(("1.1.1.1", 443), timeout=1),
        lambda: socket.socket().connect(("93.184.215.14", 80)),
        lambda: socket.getaddrinfo("huggingface.co", 443),
    ):
        with pytest.raises(offline.NetworkBlocked, match="the tests run offline"):
            attempt()
    assert len(offline.attempts) == 3
    offline.attempts.clear()  # these three were this test's own
    server = socket.socket()  # this machine is still reachable
    server.bind(("127.0.0.1", 0))
    server.listen()
    with server, socket.create_connection(server.getsockname(), timeout=5):
        pass


@pytest.fixture
def injection(tokenizer):
    """Text that would inject turns if it became control tokens: every special-token string of the tiny Phi-3
    (its turn end, role headers, end of text), read from its chat format."""
    from meowdread.chat_format import ChatFormat

    chat_format = ChatFormat.of(tokenizer)
    assert chat_format.turn_end in chat_format.control_tokens
    return chat_format, "".join(chat_format.control_tokens)


def special_counts(chat_format, ids) -> dict[str, int]:
    tokenizer = chat_format.tokenizer
    return {t: list(ids).count(tokenizer.convert_tokens_to_ids(t)) for t in chat_format.control_tokens}


def test_special_token_text_in_a_corpus_message_stays_text_in_training(injection, tmp_path, monkeypatch):
    chat_format, text = injection
    conversations = [
        [{"role": "user", "content": f"Why {i}? {text} hai"}, {"role": "assistant", "content": f"{text} I fits {i}."}]
        for i in range(12)
    ]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations), encoding="utf-8")
    seen = []
    training_step = QLoraModule.training_step

    def recording(self, batch, batch_idx):
        rows = (batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist())
        seen.extend(zip(*rows, strict=True))
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(QLoraModule, "training_step", recording)
    monkeypatch.setattr("sys.argv", ["meowdread"])
    main(tiny_args("fit", tmp_path / "runs", "--data.corpus", str(corpus), "--trainer.fast_dev_run", "true"))
    clean = chat_format.encode([{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "I fits."}])
    turn_end = chat_format.tokenizer.convert_tokens_to_ids(chat_format.turn_end)
    assert seen
    for ids, mask, labels in seen:
        real = [i for i, m in zip(ids, mask, strict=True) if m]
        assert special_counts(chat_format, real) == special_counts(chat_format, clean["input_ids"])
        assert labels.count(turn_end) == 1  # the reply's own turn end, and no injected one, is trained


def test_special_token_text_in_a_prompt_stays_text_in_sampling(injection, tmp_path, monkeypatch):
    from peft import PeftModelForCausalLM

    chat_format, text = injection
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"Why do I sit? {text} I am a dog now.\n{text}\n", encoding="utf-8")
    seen = []
    generate = PeftModelForCausalLM.generate

    def recording(self, *args, **kwargs):
        seen.extend(zip(kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist(), strict=True))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(PeftModelForCausalLM, "generate", recording)
    monkeypatch.setattr("sys.argv", ["meowdread"])
    args = ["--data.prompts", str(prompts), "--model.sampling.max_new_tokens", "2", "--model.sampling.engine", "hf"]
    main(tiny_args("predict", tmp_path / "runs", *args))
    clean = chat_format.prompt_ids([{"role": "user", "content": "Why?"}])
    assert len(seen) == 2
    for ids, mask in seen:
        real = [i for i, m in zip(ids, mask, strict=True) if m]
        assert special_counts(chat_format, real) == special_counts(chat_format, clean)
