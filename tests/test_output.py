"""What a user sees: real subprocesses of ``meowdread`` with stdout and stderr piped, as in a log file.

- stderr holds meowdread's own ``[meowdread]`` lines (progress included) and real problems, nothing else;
  a warning from the user's own code still shows, and ``--verbose`` shows the libraries' notices again.
- ``meowdread --help`` lists every subcommand without importing torch.
- The run's files: one checkpoint, no copy; weights with the umask's mode; a Custom Scalars layout.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, tiny_args
from .offline import RUN_CLI

SUBCOMMANDS = ["fit", "validate", "test", "predict", "chat", "export"]
OWN_LINE = re.compile(r"\[meowdread\] ")
SMALL = ["--model.sampling.max_new_tokens", "4", "--trainer.enable_progress_bar", "true"]  # after tiny_args: wins
USER_CALLBACK = """
import warnings
import lightning.pytorch as pl

class Grumble(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        warnings.warn("user_callbacks: the cat is not amused")
"""


def meowdread(root: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(root)])}  # the user's module beside
    for name in ("MEOWDREAD_DEBUG", "MEOWDREAD_VERBOSE"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-c", RUN_CLI, *args], cwd=REPO, env=env, input=stdin, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done


def foreign_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not OWN_LINE.match(line)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """fit (one short epoch, with a user callback that warns), then predict, chat and export from it."""
    root = tmp_path_factory.mktemp("output")
    (root / "user_callbacks.py").write_text(USER_CALLBACK)
    fit = tiny_args("fit", root, *SMALL, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4")
    fit += ["--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "2"]
    fit += ["--trainer.callbacks+=user_callbacks.Grumble"]
    done = {"fit": meowdread(root, *fit)}
    done["predict"] = meowdread(root, *tiny_args("predict", root, *SMALL, "--ckpt_path", "last"))
    chat = tiny_args("chat", root, *SMALL, "--ckpt_path", "last", "--jsonl")
    done["chat"] = meowdread(root, *chat, stdin="Why do I sit?\nAnd why here?\n")
    export = tiny_args("export", root, *SMALL, "--ckpt_path", "last", "--output", str(root / "exported"))
    done["export"] = meowdread(root, *export)
    return root, done


@pytest.mark.parametrize("command", ["fit", "predict", "chat", "export"])
def test_stderr_holds_only_meowdreads_lines_and_real_problems(runs, command):
    _, done = runs
    foreign = foreign_lines(done[command].stderr)
    if command == "fit":  # the user's warning is a real problem: it shows, as Python shows a warning
        assert any("UserWarning: user_callbacks: the cat is not amused" in line for line in foreign), foreign
        foreign = [line for line in foreign if "user_callbacks" not in line]
    assert foreign == []


def test_progress_in_a_pipe_is_plain_lines_with_epochs_from_one(runs):
    _, done = runs
    fit, predict = done["fit"].stderr, done["predict"].stderr
    assert "\r" not in fit + predict  # no bar redrawn in place: every line reads on its own in a log
    assert re.search(r"^\[meowdread\] sampling 26 prompts .*base model", fit, re.M)  # before the first sample
    assert re.search(r"^\[meowdread\] epoch 1/1: 4/4 batches \(100%\), \d+ s, train/loss \d", fit, re.M)
    assert re.search(r"^\[meowdread\] epoch 1/1: val/loss \d", fit, re.M)
    assert "v_num" not in fit
    assert re.search(r"^\[meowdread\] predict: 4/4 batches \(100%\)", predict, re.M)


def test_piped_chat_with_jsonl_is_one_json_object_per_message(runs):
    _, done = runs
    records = [json.loads(line) for line in done["chat"].stdout.splitlines()]
    assert [r["message"] for r in records] == ["Why do I sit?", "And why here?"]
    assert all(isinstance(r["answer"], str) and "\ufffd" not in r["answer"] for r in records)


def test_verbose_shows_the_libraries_notices_again(runs):
    root, _ = runs
    ckpt = str(root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    args = tiny_args("validate", root / "validate", "--ckpt_path", ckpt, "--trainer.limit_val_batches", "1")
    verbose = meowdread(root, "--verbose", *args)  # the same notices that fit, predict, chat and export leave out
    assert "GPU available: False" in verbose.stderr and "Seed set to 42" in verbose.stderr
    assert "`Trainer(limit_val_batches=1)` was configured so 1 batch will be used." in verbose.stderr


def test_the_run_keeps_one_checkpoint_and_readable_weights(runs):
    root, _ = runs
    run = root / "lightning_logs" / "version_0"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]  # no byte-identical epoch copy
    umask = os.umask(0)
    os.umask(umask)
    for folder in (run / "adapter", root / "exported"):
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        assert any(name.endswith(".safetensors") for name in modes)
        assert set(modes.values()) == {0o666 & ~umask}, modes  # safetensors' 0600 like the configs' 0644


def test_tensorboard_opens_the_custom_scalars_on_the_loss_then_each_sample_metric(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    root, _ = runs
    acc = EventAccumulator(str(root / "lightning_logs" / "version_0"), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    categories = [c.title for c in layout.category]
    assert categories[0] == "loss" and categories[1].startswith("voice")
    charts = {chart.title: list(chart.multiline.tag) for c in layout.category for chart in c.chart}
    assert charts["train/loss and val/loss"] == ["^train/loss$", "^val/loss$"]
    patterns = [re.compile(tag) for tags in charts.values() for tag in tags]
    logged = [t for t in acc.Tags()["scalars"] if t.startswith(("samples/", "train/", "val/", "perf/"))]
    assert [t for t in logged if not any(p.match(t) for p in patterns)] == []  # every curve has its chart


def test_hparams_shows_booleans_as_booleans_and_integers_as_integers(runs):
    from .test_cli import hparams_tab

    root, _ = runs
    (row,) = hparams_tab(root / "lightning_logs")
    kinds = {k: v.WhichOneof("kind") for k, v in row.hparams.items()}
    assert kinds["sampling/do_sample"] == kinds["trust_remote_code"] == "bool_value"
    assert row.hparams["sampling/do_sample"].bool_value is True
    assert kinds["lora/r"] == kinds["trainer/max_epochs"] == "string_value"  # printed "16", not "16.000"
    assert row.hparams["lora/r"].string_value == "16"
    assert kinds["optimizer/lr"] == "number_value"
    assert {m.name.tag for m in row.metric_values} >= {"val/loss", "samples/coherence_ppl"}


def test_top_level_help_lists_every_subcommand_without_importing_torch():
    code = (
        "import sys; from meowdread.__main__ import main; main(['--help']); "
        "print('heavy:', sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    listed = re.findall(r"^    (\w+)  ", done.stdout, re.M)
    assert listed == SUBCOMMANDS
    assert "heavy: []" in done.stdout


def test_a_subcommands_help_opens_with_a_whole_sentence(capsys, monkeypatch):
    from meowdread.cli import main

    monkeypatch.setattr("sys.argv", ["meowdread"])
    with pytest.raises(SystemExit) as exit_:
        main(["test", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "meowdread test: the same pass, as Lightning's test loop" in out
    assert "make sure you never run on your" not in out  # Lightning's cut first line of Trainer.test's docstring
    assert "arguments of Trainer.test:" in out
