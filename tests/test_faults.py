"""Faults: a killed or interrupted ``fit`` resumes to the same adapter, a diverging one stops cleanly, and a
crash mid-save never leaves half a file where a good one was."""

import errno
import hashlib
import os
import shlex
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

from .conftest import CORPUS, PROMPTS, REPO, tiny_args, write_jsonl
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


def start_fit(small_run, save_dir, *extra: str, env: dict[str, str] | None = None):
    """A real ``meowdread fit`` in a subprocess, and the file its stderr goes to."""
    log = save_dir.parent / f"{save_dir.name}.stderr"
    with open(log, "w") as stderr:  # a file: a full pipe would block the child
        command = [sys.executable, "-c", RUN_CLI, *fit_args(small_run, save_dir, *extra)]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    return process, log


def wait_for(process, log, done, what: str) -> None:
    deadline = time.monotonic() + 300
    while not done():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {what} after 300 s"
        time.sleep(0.02)


def start_fit_and_wait_for_a_checkpoint(small_run, save_dir, *extra: str, env: dict[str, str] | None = None):
    """A real ``meowdread fit`` in a subprocess, returned once its first ``last.ckpt`` is on disk."""
    process, log = start_fit(small_run, save_dir, *extra, env=env)
    last = save_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    wait_for(process, log, last.exists, "checkpoint")  # written by rename, so it is complete once it exists
    return process, last, log


# SIGKILL in the fast tier; the two signals that Lightning handles run in the slow one (CI runs both).
@pytest.mark.parametrize(
    "how", ["SIGKILL", pytest.param("SIGINT", marks=pytest.mark.slow), pytest.param("SIGTERM", marks=pytest.mark.slow)]
)
def test_a_killed_or_interrupted_fit_resumes_to_the_same_adapter(small_run, uninterrupted, how, capsys):
    save_dir = small_run / how
    process, last, log = start_fit_and_wait_for_a_checkpoint(small_run, save_dir)
    process.send_signal(getattr(signal, how))
    code = process.wait(timeout=300)
    log = log.read_text()
    saved = torch.load(last, weights_only=True)
    step = saved["global_step"]
    assert 0 < step % BATCHES_PER_EPOCH, f"not a mid-epoch checkpoint (step {step})"  # the case to test
    resume = fit_args(small_run, save_dir, "--ckpt_path", "last")
    if how == "SIGKILL":
        assert code == -signal.SIGKILL
    else:  # Ctrl-C or SIGTERM: the step under way finished, then last.ckpt was saved, then exit 1 or 143
        assert code == (1 if how == "SIGINT" else 128 + signal.SIGTERM), log[-3000:]
        printed = f"meowdread: interrupted ({how}) at step {step}: saved {last}; resume with: "
        assert printed + shlex.join(["meowdread", *resume]) in log, log[-3000:]
        assert step > SAVE_EVERY  # saved at the interrupt, not the periodic checkpoint we waited for
        assert "Traceback" not in log
    assert not (last.parent.parent / "adapter").exists()  # the run did not finish

    main(resume)
    assert f"--ckpt_path last: {last}" in capsys.readouterr().err
    resumed = adapter(save_dir)
    assert resumed.keys() == uninterrupted.keys()
    at_kill = {k.removeprefix("model.").replace(".default", ""): v for k, v in saved["state_dict"].items()}
    assert any(not torch.allclose(resumed[k], at_kill[k]) for k in resumed)  # it trained after resuming
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_sigterm_before_training_says_nothing_was_trained(small_run):
    save_dir = small_run / "early-sigterm"
    # Verbose: Lightning's "Seed set to" line (quiet otherwise) marks the end of the configuration.
    process, log = start_fit(small_run, save_dir, env=os.environ | {"MEOWDREAD_VERBOSE": "1"})
    wait_for(process, log, lambda: "Seed set to" in log.read_text(), "configuration parsed")
    process.send_signal(signal.SIGTERM)  # while the data and the model load
    code = process.wait(timeout=300)
    err = log.read_text()
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "meowdread: stopped by SIGTERM" in err and "nothing new was" in err and "Traceback" not in err, err
    assert not list(save_dir.glob("**/*.ckpt"))


SLURM = {  # what srun sets for a one-task job, so that Lightning runs in its SLURMEnvironment
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "meowdread-test",
    "SLURM_NODELIST": "localhost",
}


@pytest.mark.slow  # a real fit in a subprocess, ~11 s: with the other signal tests in the slow tier
def test_under_slurm_lightning_keeps_its_requeue_signal_and_sigterm_still_saves(small_run):
    save_dir = small_run / "slurm"
    env = os.environ | SLURM | {"PATH": os.environ["PATH"]}
    process, last, log = start_fit_and_wait_for_a_checkpoint(
        small_run, save_dir, "--trainer.default_root_dir", str(save_dir), env=env
    )
    process.send_signal(signal.SIGUSR1)  # SLURM's warning before the time limit: Lightning's requeue handler
    hpc = save_dir / "hpc_ckpt_1.ckpt"
    wait_for(process, log, hpc.exists, "hpc checkpoint")
    time.sleep(0.5)  # Lightning writes the hpc file in place: let the save finish
    process.send_signal(signal.SIGTERM)  # then SLURM ends the job
    code = process.wait(timeout=300)
    err = log.read_text()
    assert code == 128 + signal.SIGTERM, err[-3000:]
    at_requeue = torch.load(hpc, weights_only=True)["global_step"]
    at_term = torch.load(last, weights_only=True)["global_step"]
    assert f"interrupted (SIGTERM) at step {at_term}: saved {last}" in err
    assert 0 < at_requeue <= at_term


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
    with pytest.raises(OSError, match="adapter.partial: could not be written \\(no space left on the device\\)"):
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
    with pytest.raises(OSError, match="last.ckpt: could not be written \\(no space left on the device\\)"):
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
    with pytest.raises(OSError, match="predictions.jsonl: could not be written \\(no space left on the device\\)"):
        write_atomic(path, '{"prompt": "c", "answer": "d"}\n' * 1000)
    monkeypatch.undo()
    assert path.read_text() == '{"prompt": "a", "answer": "b"}\n'
    assert os.listdir(tmp_path) == ["predictions.jsonl"]


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.rglob("*")
        if p.is_file()
    }


def test_failing_runs_leave_every_earlier_file_byte_identical(tmp_path, small_disk, monkeypatch, capsys):
    """An earlier run's checkpoints, adapter, events and predictions survive a bad value, and a real subprocess
    whose disk fills up while it exports its adapter."""
    monkeypatch.setenv("MEOWDREAD_MIN_FREE_MB", "0")  # the disk is small on purpose
    disk = small_disk(64)
    callbacks = [  # no samples in TensorBoard, for speed: predictions, checkpoints and the adapter are written
        {"class_path": "meowdread.callbacks.PredictionWriter"},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
    ]
    (tmp_path / "light.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    short = [
        "--config",
        str(tmp_path / "light.yaml"),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
    ]
    short += ["--model.sampling.max_new_tokens", "4"]
    main(tiny_args("fit", disk, *short))
    main(tiny_args("predict", disk, *short, "--ckpt_path", "last"))
    before = snapshot(disk)
    assert any(name.endswith("adapter/adapter_model.safetensors") for name in before)
    assert any(name.endswith("predictions.jsonl") for name in before)

    with pytest.raises(SystemExit) as exit_:  # a bad value after a good run
        main(tiny_args("fit", disk, *short, "--model.lora.r", "0"))
    assert exit_.value.code == 2
    assert snapshot(disk) == before

    fill = ["--trainer.callbacks+", "tests.disk.FillTheDisk", "--trainer.callbacks.directory", str(disk)]
    command = [
        sys.executable,
        "-c",
        RUN_CLI,
        *tiny_args("fit", disk, *short, *fill, "--trainer.callbacks.when", "adapter_export"),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    run = disk / "lightning_logs" / "version_1"  # predict makes no run of its own
    assert (
        f"meowdread: error: {run}/adapter.partial: could not be written (no space left on the device); the last good "
        f"checkpoint is {run}/checkpoints/last.ckpt" in done.stderr
    ), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (disk / "filler").unlink()
    after = snapshot(disk)
    assert {name: after.get(name) for name in before} == before  # every earlier file, byte for byte
    assert not (run / "adapter").exists() and not (run / "adapter.partial").exists()
