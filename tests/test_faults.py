"""Faults: a killed or interrupted ``fit`` resumes to the same adapter, a diverging one stops cleanly, and a
crash mid-save never leaves half a file where a good one was."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from meowdread.callbacks import write_atomic
from meowdread.checkpoints import SafeCheckpointIO
from meowdread.cli import main
from meowdread.model import LoraSettings, QLoraModule

from .conftest import CORPUS, PROMPTS, REPO, write_jsonl
from .offline import RUN_CLI

BATCHES_PER_EPOCH = 6  # 48 conversations: 46 to train on in batches of 8, 2 held out
SAVE_EVERY = 2


@pytest.fixture(autouse=True)
def bare_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["meowdread"])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """configs/tiny.yaml saving every 2 steps, and a 48-conversation corpus: 2 epochs of 6 steps."""
    root = tmp_path_factory.mktemp("faults")
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    [periodic] = [c for c in config["trainer"]["callbacks"] if "every_n_train_steps" in c.get("init_args", {})]
    periodic["init_args"]["every_n_train_steps"] = SAVE_EVERY
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()][:48]
    write_jsonl(root / "corpus.jsonl", lines)
    return root


def fit_args(small_run, save_dir, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(small_run / "config.yaml"),
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.max_epochs",
        "2",
        "--data.corpus",
        str(small_run / "corpus.jsonl"),
        "--data.prompts",
        str(PROMPTS),
        "--model.lora.dropout",
        "0.1",  # so the RNG state matters: dropout masks must replay the same after a resume
        "--model.sampling.max_new_tokens",
        "4",
        *extra,
    ]


def adapter(save_dir):
    return load_file(save_dir / "lightning_logs" / "version_0" / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(small_run):
    main(fit_args(small_run, small_run / "uninterrupted"))
    return adapter(small_run / "uninterrupted")


def start_fit_and_wait_for_a_checkpoint(small_run, save_dir):
    """A real ``meowdread fit`` in a subprocess, returned once its first ``last.ckpt`` is on disk."""
    log = save_dir.parent / f"{save_dir.name}.stderr"
    with open(log, "w") as stderr:  # a file: a full pipe would block the child
        command = [sys.executable, "-c", RUN_CLI, *fit_args(small_run, save_dir)]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    last = save_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists():  # written by rename, so it is complete once it exists
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    return process, last, log


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_killed_or_interrupted_fit_resumes_to_the_same_adapter(small_run, uninterrupted, how, capsys):
    save_dir = small_run / how
    process, last, log = start_fit_and_wait_for_a_checkpoint(small_run, save_dir)
    process.send_signal(getattr(signal, how))
    code = process.wait(timeout=300)
    log = log.read_text()
    saved = torch.load(last, weights_only=True)
    step = saved["global_step"]
    assert 0 < step % BATCHES_PER_EPOCH, f"not a mid-epoch checkpoint (step {step})"  # the case to test
    if how == "SIGKILL":
        assert code == -signal.SIGKILL
    else:  # Ctrl-C: the step under way finished, then last.ckpt was saved, then exit 1
        assert code == 1, log[-3000:]
        assert f"meowdread: interrupted at step {step}: saved {last}; resume with --ckpt_path last" in log
        assert step > SAVE_EVERY  # saved at the interrupt, not the periodic checkpoint we waited for
    assert not (last.parent.parent / "adapter").exists()  # the run did not finish

    main(fit_args(small_run, save_dir, "--ckpt_path", "last"))
    assert f"--ckpt_path last: {last}" in capsys.readouterr().err
    resumed = adapter(save_dir)
    assert resumed.keys() == uninterrupted.keys()
    at_kill = {k.removeprefix("model.").replace(".default", ""): v for k, v in saved["state_dict"].items()}
    assert any(not torch.allclose(resumed[k], at_kill[k]) for k in resumed)  # it trained after resuming
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(small_run, monkeypatch, capsys):
    save_dir = small_run / "nan"
    last = save_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    seen = {}
    compute_loss = QLoraModule.compute_loss

    def diverging(self, logits, batch, stage):
        loss_sum, n_tokens = compute_loss(self, logits, batch, stage)
        if self.trainer.global_step < 2 * SAVE_EVERY - 1:
            return loss_sum, n_tokens
        seen.setdefault("checkpoint", hashlib.sha256(last.read_bytes()).hexdigest())
        return loss_sum * float("nan"), n_tokens  # in step 4, which is due to be checkpointed

    monkeypatch.setattr(QLoraModule, "compute_loss", diverging)
    with pytest.raises(SystemExit) as exit_:
        main(fit_args(small_run, save_dir))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert (
        f"meowdread: error: training diverged at step {2 * SAVE_EVERY}: the loss is nan. Stopped before updating "
        f"the weights; the last good checkpoint is {last}. Try a lower model.optimizer.init_args.lr" in err
    )
    assert hashlib.sha256(last.read_bytes()).hexdigest() == seen["checkpoint"]  # not overwritten
    assert torch.load(last, weights_only=True)["global_step"] == SAVE_EVERY
    assert not (last.parent.parent / "adapter").exists()


def test_the_adapter_is_never_written_with_weights_that_are_not_finite_or_half_written(tmp_path, embedded_cache):
    module = QLoraModule(pretrained="embedded:tiny-phi3", lora=LoraSettings(dropout=0.0))
    module.configure_model()
    module.export_adapter(tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    name, weight = next((n, p) for n, p in module.named_parameters() if p.requires_grad)
    with torch.no_grad():
        weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=f"1 LoRA weights are not finite \\({name}\\)"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})
    with pytest.raises(FloatingPointError, match="so the adapter was not written"):
        module.export_adapter(tmp_path / "adapter")
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == before
    with torch.no_grad():
        weight[0, 0] = 0.5

    def crash_midway(directory, **kwargs):  # half an adapter on disk, then the process dies
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    module.model.save_pretrained = crash_midway
    with pytest.raises(OSError, match="No space left"):
        module.export_adapter(tmp_path / "adapter")
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == before


def failing_midway(real):
    """A torch.save that writes half its bytes, then finds the disk full."""

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        f.seek(f.tell() // 2)
        f.truncate()
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_a_failed_checkpoint_save_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    io, path = SafeCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", failing_midway(torch.save))
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 2}, path)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary file left behind
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1


def test_failed_prediction_writes_leave_the_previous_files_whole(tmp_path, monkeypatch):
    path = tmp_path / "predictions.jsonl"
    write_atomic(path, '{"prompt": "a", "answer": "b"}\n')
    real_write_text = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, '{"prompt": "c", "answer": "d"}\n' * 1000)
    monkeypatch.undo()
    assert path.read_text() == '{"prompt": "a", "answer": "b"}\n'
    assert os.listdir(tmp_path) == ["predictions.jsonl"]
