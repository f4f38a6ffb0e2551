"""Nothing runs code it was handed, and nothing reaches the network: remote code, pickles, sockets."""

import inspect
import json
import shutil
import socket

import pytest
import torch

from meowdread.checkpoints import CheckpointError, SafeCheckpointIO, load_checkpoint_file
from meowdread.embedded import resolve_pretrained
from meowdread.model import LoraSettings, QLoraModule

from . import offline


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
