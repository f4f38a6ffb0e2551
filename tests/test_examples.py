"""Every example of ``examples/`` through the stock CLI, as its config's first comment runs it, and its effect.

The runs are short (a few batches of the tiny model, two prompts to sample): enough for each effect to show.
"""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from meowdread.cli import ToolCLI, main
from meowdread.data import CatCorpusDataModule

from .conftest import REPO, tiny_args
from .test_cli import events, hparams_tab

EXAMPLES = REPO / "examples"
SHORT = [
    "--trainer.max_epochs", "1",
    "--trainer.limit_train_batches", "3",
    "--trainer.limit_val_batches", "2",
    "--trainer.num_sanity_val_steps", "0",
    "--trainer.log_every_n_steps", "1",
]  # fmt: skip


class NotedData(CatCorpusDataModule):
    """A data module subclass with an argument of its own, to swap in with ``--data``."""

    def __init__(self, note: str = "", **kwargs):
        super().__init__(**kwargs)


@pytest.fixture(autouse=True, scope="module")
def from_the_repository_root():
    """Each example's command runs from the repository root (``examples`` imports, its paths resolve)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["meowdread"])
        patch.chdir(REPO)
        yield


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("What is the meaning of the nap?\nWhy the box?\n", encoding="utf-8")
    return str(path)


def example(subcommand, root, prompts, *configs: str, extra=()) -> list[str]:
    stacked = [arg for name in configs for arg in ("--config", str(EXAMPLES / name))]
    # default_root_dir: where a fast_dev_run (which has no logger) would put its checkpoints directory
    return tiny_args(
        subcommand, root, *stacked, "--data.prompts", prompts, "--trainer.default_root_dir", str(root), *extra
    )


@pytest.fixture(scope="module")
def neftune_run(tmp_path_factory, prompts):
    """NEFTune and the extra metric stacked in one run, with a data module subclass swapped in."""
    root = tmp_path_factory.mktemp("neftune")
    data = ["--data", "tests.test_examples.NotedData", "--data.note", "swapped in"]
    main(example("fit", root, prompts, "neftune.yaml", "extra_metric.yaml", extra=[*SHORT, *data]))
    return root / "lightning_logs" / "version_0"


def test_a_subclasss_own_arguments_are_in_config_hparams_checkpoint_and_the_hparams_row(neftune_run):
    from meowdread.checkpoints import load_checkpoint_file

    config = yaml.safe_load((neftune_run / "config.yaml").read_text())
    assert config["model"]["class_path"] == "examples.neftune.NEFTuneModule"
    assert config["model"]["init_args"]["noise_alpha"] == 5.0
    assert config["model"]["init_args"]["pretrained"] == "embedded:tiny-phi3"  # tiny.yaml's flat keys still hold
    assert config["data"]["init_args"]["note"] == "swapped in"
    hparams = yaml.safe_load((neftune_run / "hparams.yaml").read_text())
    assert hparams["noise_alpha"] == 5.0 and hparams["note"] == "swapped in" and hparams["lora"]["r"] == 16
    checkpoint = load_checkpoint_file(neftune_run / "checkpoints" / "last.ckpt")  # weights_only=True
    assert checkpoint["hyper_parameters"]["noise_alpha"] == 5.0
    (row,) = hparams_tab(neftune_run.parent)
    params = {k: getattr(v, v.WhichOneof("kind")) for k, v in row.hparams.items()}
    assert params["noise_alpha"] == 5.0 and params["note"] == "swapped in"


def test_neftune_adds_noise_to_the_embeddings_in_training_only(neftune_run, prompts, tokenizer):
    args = example("chat", neftune_run.parent.parent, prompts, "neftune.yaml")[1:]
    module = ToolCLI("chat", [*args, "--ckpt_path", str(neftune_run / "checkpoints" / "last.ckpt")]).load_module()
    assert type(module).__name__ == "NEFTuneModule" and module.noise_alpha == 5.0
    ids = tokenizer(["Why do I sit?", "Is the box my friend?"], padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = module.model.get_input_embeddings()(ids)
        train, again = module.embed(ids, "train"), module.embed(ids, "train")
        assert torch.equal(module.embed(ids, "val"), plain) and torch.equal(module.embed(ids, "test"), plain)
    bound = 5.0 / (ids.shape[1] * plain.shape[-1]) ** 0.5
    noise = (train - plain).float()
    assert noise.abs().max() <= bound * 1.01 and noise.abs().mean() > bound / 4  # uniform in ±bound
    assert not torch.equal(train, again)  # fresh noise every step


def test_an_extra_sample_metric_is_logged_with_the_others_and_in_the_hparams_row(neftune_run):
    acc = events(neftune_run)
    shares = acc.Scalars("samples/question_share")
    assert [s.step for s in shares] == [s.step for s in acc.Scalars("samples/angst_share")]
    assert shares[0].step == 0 and len(shares) == 2  # the base model, then the epoch
    assert all(s.value in (0.0, 0.5, 1.0) for s in shares)  # two prompts answered
    (row,) = hparams_tab(neftune_run.parent)
    metrics = {m.name.tag: m.value for m in row.metric_values}
    assert metrics["hp/question_share"] == pytest.approx(shares[-1].value)


def test_a_sample_callback_subclass_has_its_prompts_checked_before_the_model_loads(tmp_path, prompts, capsys):
    args = example("fit", tmp_path, prompts, "extra_metric.yaml", extra=["--data.prompts", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "data.prompts: file not found" in err and "LoRA:" not in err


def test_kl_to_base_is_logged_on_its_own_and_leaves_val_loss_the_plain_cross_entropy(tmp_path, prompts):
    main(example("fit", tmp_path / "kl", prompts, "kl_to_base.yaml", extra=SHORT))
    run = tmp_path / "kl" / "lightning_logs" / "version_0"
    acc = events(run)
    kl = [e.value for e in acc.Scalars("train/kl")]
    assert len(kl) == 3 and kl[0] == pytest.approx(0, abs=1e-6)  # a fresh LoRA is the base model
    assert all(v > 0 for v in kl[1:]), kl  # trained away from it
    assert not any("kl" in tag for tag in acc.Tags()["scalars"] if not tag.startswith("train/"))
    # The plain module on the same weights gives the same val/loss: the KL is not in it.
    checkpoint = str(run / "checkpoints" / "last.ckpt")
    main(tiny_args("validate", tmp_path / "plain", "--ckpt_path", checkpoint, "--trainer.limit_val_batches", "2"))
    plain = events(tmp_path / "plain" / "lightning_logs" / "version_0").Scalars("val/loss")[-1].value
    assert acc.Scalars("val/loss")[-1].value == pytest.approx(plain, rel=1e-5)


def test_dora_trains_magnitude_vectors(tmp_path, prompts):
    probe = ["--trainer.callbacks+=tests.lora_probe.SaveLoraPerRank", "--trainer.callbacks.dirpath", str(tmp_path)]
    main(example("fit", tmp_path, prompts, "dora.yaml", extra=["--trainer.fast_dev_run", "true", *probe]))
    start, end = torch.load(tmp_path / "rank0-start.pt"), torch.load(tmp_path / "rank0-end.pt")
    magnitudes = [name for name in start if "lora_magnitude_vector" in name]
    assert len(magnitudes) == 2 * 4  # every adapted linear layer of the two decoder layers
    assert any(not torch.equal(start[name], end[name]) for name in magnitudes)


def test_a_prompt_completion_corpus_trains_on_the_completions(tmp_path, prompts, capsys):
    main(example("fit", tmp_path, prompts, "prompt_completion.yaml", extra=["--trainer.fast_dev_run", "true",
                                                                             "--data.show_examples", "1"]))  # fmt: skip
    out = capsys.readouterr().out
    assert "<|assistant|>\n⟦" in out and "<|end|>⟧" in out
    assert "<|user|>\n⟦" not in out  # the prompt is not trained on


def test_the_console_script_imports_a_class_path_from_the_working_directory(tmp_path):
    """``meowdread`` is an installed script: its own directory, not the working one, starts ``sys.path``."""
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "mine.py").write_text(
        "from meowdread.model import QLoraModule\n\n\nclass Mine(QLoraModule):\n"
        "    def __init__(self, mine: int = 1, **kwargs):\n        super().__init__(**kwargs)\n"
    )
    script = tmp_path / "bin" / "meowdread"
    script.parent.mkdir()
    script.write_text("from meowdread.cli import main\n\nmain()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's meowdread, and nothing of tmp_path
    args = ["fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--model", "my_pkg.mine.Mine", "--print_config"]
    done = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    model = yaml.safe_load(done.stdout)["model"]
    assert model["class_path"] == "my_pkg.mine.Mine" and model["init_args"]["mine"] == 1
