"""The ``meowdread`` command end to end on the embedded tiny Phi-3 (offline, CPU, real 4-bit layers)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from meowdread.cli import main

from .conftest import CORPUS, PROMPTS, REPO, tiny_args

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
EPOCHS = 3
SAMPLE_METRICS = [
    "cat_lingo_share",
    "cat_lingo_per_100_words",
    "angst_share",
    "angst_per_100_words",
    "coherence_ppl",
    "distinct_1",
    "distinct_2",
    "memorized_share",
]


@pytest.fixture(autouse=True, scope="module")
def bare_argv():
    """main(args) must not see pytest's own command line."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["meowdread"])
        yield


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_says_how_to_run_it(config, capsys):
    first = config.read_text().splitlines()[0]
    assert first.startswith("# "), "each config starts with a comment"
    assert f"meowdread fit --config configs/{config.name}" in config.read_text()
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["class_path"] == "meowdread.model.QLoraModule"  # the default in subclass mode
    assert resolved["data"]["class_path"] == "meowdread.data.CatCorpusDataModule"
    assert "pretrained" not in resolved["data"]["init_args"]  # linked to model.pretrained: the model's tokenizer
    assert resolved["model"]["init_args"]["trust_remote_code"] is False


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_no_config_keeps_a_copy_of_last_ckpt(config):
    """A ModelCheckpoint that monitors nothing keeps its newest epoch=N-step=M.ckpt unless save_top_k is 0: a
    byte-identical copy of last.ckpt, which costs a checkpoint's size for nothing."""
    callbacks = yaml.safe_load(config.read_text())["trainer"].get("callbacks") or []
    for callback in callbacks:
        if callback["class_path"].endswith("ModelCheckpoint"):
            init = callback.get("init_args") or {}
            assert init.get("monitor") or init.get("save_top_k") == 0, init


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_spells_out_every_option(config):
    """So a user reading a config sees every knob, and a new option cannot be added without a value here."""
    import inspect

    from meowdread.data import CatCorpusDataModule
    from meowdread.model import QLoraModule

    resolved = yaml.safe_load(config.read_text())
    for section, cls, linked in (("model", QLoraModule, set()), ("data", CatCorpusDataModule, {"pretrained"})):
        options = set(inspect.signature(cls.__init__).parameters) - {"self"} - linked
        assert options <= set(resolved[section]), f"{section}: {sorted(options - set(resolved[section]))}"


def test_the_gpu_recipe_is_sprint_1s():
    config = yaml.safe_load((REPO / "configs" / "phi3_qlora.yaml").read_text())
    model, trainer = config["model"], config["trainer"]
    assert model["pretrained"] == "microsoft/Phi-3-mini-4k-instruct"
    assert model["quantization"] == {
        "load_in_4bit": True,
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "bfloat16",
    }
    assert (model["lora"]["r"], model["lora"]["alpha"], model["lora"]["dropout"]) == (16, 32, 0.05)
    assert model["lora"]["target_modules"] == "all-linear"
    # Sprint 1's PagedAdamW32bit is the same 32-bit AdamW; paging its state only cost time (benchmarks/).
    assert model["optimizer"] == {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.0002}}
    assert model["scheduler"]["init_args"]["warmup_ratio"] == 0.03
    assert (trainer["max_epochs"], trainer["gradient_clip_val"], trainer["precision"]) == (3, 0.3, "bf16-mixed")


def cli(subcommand: str, root: Path, *extra: str) -> None:
    main(tiny_args(subcommand, root, *extra))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``fit`` then ``predict --ckpt_path last`` through the CLI, as README command 1 does: the run's directory
    and its ``predictions/``."""
    root = tmp_path_factory.mktemp("runs")
    cli("fit", root)
    cli("predict", root, "--ckpt_path", "last")
    runs = sorted((root / "lightning_logs").iterdir())
    assert [r.name for r in runs] == ["version_0"]  # predict makes no TensorBoard run of its own
    return [runs[0], runs[0] / "predictions"]


def test_predict_writes_next_to_its_run_and_adds_nothing_to_tensorboard(run):
    assert {p.name for p in run[1].iterdir()} == {
        "config.yaml",  # predict's own resolved config
        "predictions.jsonl",
        "predictions.md",
        "predictions_summary.json",
    }
    assert len(list(run[0].glob("events.out.tfevents.*"))) == 1  # fit's alone
    assert {p.name for p in (run[0] / "checkpoints").iterdir()} == {"last.ckpt"}  # no byte-identical epoch copy


def events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_fit_writes_scalars_samples_config_checkpoint_and_adapter(run):
    fit_dir = run[0]
    acc = events(fit_dir)
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/ppl", "samples/seconds", "perf/trained_tokens_per_s"} <= scalars
    samples = acc.Tensors("samples/text_summary")
    assert len(samples) == EPOCHS + 1  # before training, then after every validation epoch
    first = samples[0].tensor_proto.string_val[0].decode()
    assert "before training" in first and "| What is the meaning of the nap? |" in first
    assert (fit_dir / "config.yaml").is_file()
    assert (fit_dir / "checkpoints" / "last.ckpt").is_file()
    assert {p.name for p in (fit_dir / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}


def test_training_loss_falls_on_the_tiny_corpus(run):
    acc = events(run[0])
    train = [e.value for e in acc.Scalars("train/loss")]
    val = [e.value for e in acc.Scalars("val/loss")]
    assert len(val) == EPOCHS
    # A random 2-layer base with a frozen output layer leaves LoRA little room: a few tenths of a nat in
    # 3 epochs (ln 2048 = 7.6 is the uniform guess). Falling every epoch is the behaviour checked.
    assert all(later < earlier for earlier, later in zip(val, val[1:], strict=False)), val
    assert val[-1] < val[0] - 0.1, val
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 0.3, train


def test_fit_logs_every_sample_metric_for_the_base_model_and_each_epoch(run):
    acc = events(run[0])
    texts = acc.Tensors("samples/text_summary")
    assert texts[0].step == 0 and "base model (adapter disabled)" in texts[0].tensor_proto.string_val[0].decode()
    steps = [t.step for t in texts]
    assert len(steps) == EPOCHS + 1 and steps == sorted(set(steps))
    for name in SAMPLE_METRICS:
        values = acc.Scalars(f"samples/{name}")
        assert [v.step for v in values] == steps, name  # the base row at step 0, then every epoch
        assert all(math.isfinite(v.value) for v in values), name
    share = [v.value for v in acc.Scalars("samples/cat_lingo_share")]
    assert all(0 <= v <= 1 for v in share)
    ppl = [v.value for v in acc.Scalars("samples/coherence_ppl")]
    assert all(v > 1 for v in ppl)


def hparams_tab(logdir: Path) -> list:
    """The rows of TensorBoard's HParams tab for ``logdir``, as TensorBoard's own backend lists them."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    tb = base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=provider)
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100, allowed_statuses=[api_pb2.STATUS_SUCCESS])
    handler = list_session_groups.Handler(context.RequestContext(), backend_context.Context(tb), "", request)
    return list(handler.run().session_groups)


def test_fit_writes_one_hparams_row_with_the_final_metrics(run):
    rows = hparams_tab(run[0].parent)
    assert [row.name for row in rows] == ["version_0"]  # the fit run; predict adds no row
    params = {k: getattr(v, v.WhichOneof("kind")) for k, v in rows[0].hparams.items()}
    # Integers as text, which the tab prints as they are (it prints numbers with 5 digits: "16.000").
    assert params["lora/r"] == "16" and params["optimizer/lr"] == 0.003 and params["batch_size"] == "8"
    assert params["trainer/max_epochs"] == str(EPOCHS) and params["pretrained"] == "embedded:tiny-phi3"
    assert params["lexicon_versions/cat_lingo"] == "1" and params["lexicon_versions/angst"] == "1"
    metrics = {m.name.tag: m.value for m in rows[0].metric_values}
    assert set(metrics) == {"val/loss", "val/ppl", *(f"samples/{name}" for name in SAMPLE_METRICS)}
    acc = events(run[0])
    assert metrics["val/loss"] == pytest.approx(acc.Scalars("val/loss")[-1].value)  # the last epoch's
    for name in SAMPLE_METRICS:
        assert metrics[f"samples/{name}"] == pytest.approx(acc.Scalars(f"samples/{name}")[-1].value), name
    assert not [tag for tag in acc.Tags()["scalars"] if tag.startswith("hp/")]  # no one-point copies


def test_predict_writes_jsonl_and_markdown_for_every_prompt(run):
    predict_dir = run[1]
    prompts = [p for p in PROMPTS.read_text().splitlines() if p.strip()]
    rows = [json.loads(line) for line in (predict_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert all(r["answer"] for r in rows)
    assert rows[0]["sampling"] == {
        "max_new_tokens": 48,
        "temperature": 0.7,
        "top_p": 0.9,
        "do_sample": True,
        "seed": 1234,
        "engine": "auto",
    }
    markdown = (predict_dir / "predictions.md").read_text()
    assert all(f"## {p}" in markdown for p in prompts)
    assert "version_0/checkpoints/last.ckpt" in markdown


def test_predict_scores_every_answer_and_summarises_them(run):
    from meowdread.metrics import words

    rows = [json.loads(line) for line in (run[1] / "predictions.jsonl").read_text().splitlines()]
    for row in rows:
        scores = row["scores"]
        assert scores["words"] == len(words(row["answer"]))
        assert set(scores["markers"]) == {"cat_lingo", "angst"}
        assert scores["coherence_ppl"] > 1
        assert scores["copied_words"] == 0 or scores["copied_words"] >= 8
        assert row["lexicons"] == {"cat_lingo": 1, "angst": 1}
    summary = json.loads((run[1] / "predictions_summary.json").read_text())
    assert summary["answers"] == len(rows) and set(summary["answers_metrics"]) == set(SAMPLE_METRICS)
    assert summary["answers_metrics"]["cat_lingo_share"] == pytest.approx(
        sum(bool(r["scores"]["markers"]["cat_lingo"]) for r in rows) / len(rows)
    )
    assert "base_metrics" not in summary
    markdown = (run[1] / "predictions.md").read_text()
    assert f"## Summary over {len(rows)} answers" in markdown and "| coherence_ppl |" in markdown
    assert "scores: cat_lingo " in markdown


def test_predict_with_compare_base_puts_the_base_models_answers_beside(run, tmp_path):
    """The base answers are those of the base model (a fresh LoRA adds nothing), though the checkpoint's
    hyperparameters, which LightningCLI applies over the command line, do not carry the flag."""
    prompts = tmp_path / "prompts.txt"  # the first batch of run[1]'s prompts, so its answers are the same
    prompts.write_text("\n".join(PROMPTS.read_text().splitlines()[:8]) + "\n")
    # A copy (run[1] stays as it is), as a checkpoint other than last.ckpt, in a run that has a report of last's.
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "epoch0.ckpt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(run[0] / "checkpoints" / "last.ckpt", ckpt)
    last_report = ckpt.parent.parent / "predictions" / "predictions.md"
    last_report.parent.mkdir()
    last_report.write_text("last.ckpt's report\n")
    cli("predict", tmp_path, "--data.prompts", str(prompts), "--ckpt_path", str(ckpt), "--model.compare_base", "true")
    cli("predict", tmp_path, "--data.prompts", str(prompts))  # a fresh LoRA: the base model itself
    # The first next to the checkpoint's run, in a folder of its own; the second (no run) in the logger's one.
    compared, base = ckpt.parent.parent / "predictions-epoch0", tmp_path / "lightning_logs" / "predictions"
    assert last_report.read_text() == "last.ckpt's report\n"
    rows = [json.loads(line) for line in (compared / "predictions.jsonl").read_text().splitlines()]
    alone = [json.loads(line)["answer"] for line in (base / "predictions.jsonl").read_text().splitlines()]
    trained = [json.loads(line)["answer"] for line in (run[1] / "predictions.jsonl").read_text().splitlines()][:8]
    assert [r["base"]["answer"] for r in rows] == alone
    assert [r["answer"] for r in rows] == trained  # answering with the base too changes nothing else
    assert alone != trained
    assert all(set(r["base"]["scores"]) == set(r["scores"]) for r in rows)
    summary = json.loads((compared / "predictions_summary.json").read_text())
    assert set(summary["base_metrics"]) == set(summary["answers_metrics"]) == set(SAMPLE_METRICS)
    markdown = (compared / "predictions.md").read_text()
    assert "| metric | answers | base model (adapter disabled) |" in markdown
    assert markdown.count("| answer | base model (adapter disabled) |") == len(rows)


def test_fit_with_ckpt_path_last_resumes_in_the_same_run_directory(run, tmp_path):
    shutil.copytree(run[0], tmp_path / "lightning_logs" / "version_0")  # keep the shared run as it is
    cli("fit", tmp_path, "--ckpt_path", "last", "--trainer.max_epochs", str(EPOCHS + 1))
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    acc = events(tmp_path / "lightning_logs" / "version_0")
    val = acc.Scalars("val/loss")
    assert len(val) == EPOCHS + 1
    # The base row stays the only one at step 0; the resumed weights' samples continue the curve.
    steps = [e.step for e in acc.Scalars("samples/angst_share")]
    assert steps[0] == 0 and steps.count(0) == 1 and len(steps) == EPOCHS + 3, steps  # + resumed, + epoch


def test_a_bad_lexicon_stops_fit_with_one_line_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli("fit", tmp_path, "--data.lexicons", json.dumps([str(tmp_path / "missing.json")]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "missing.json: lexicon file not found" in err and "Traceback" not in err
    assert "LoRA:" not in err  # the model was never loaded


def test_predict_from_the_exported_adapter_matches_predict_from_the_checkpoint(run, tmp_path):
    shutil.copytree(run[0] / "adapter", tmp_path / "adapter")  # not in a run: so not beside run[1]'s predictions
    cli("predict", tmp_path, "--model.adapter", str(tmp_path / "adapter"))
    from_adapter = (tmp_path / "lightning_logs" / "predictions" / "predictions.jsonl").read_text().splitlines()
    from_ckpt = (run[1] / "predictions.jsonl").read_text().splitlines()
    answers = [[json.loads(line)["answer"] for line in lines] for lines in (from_adapter, from_ckpt)]
    assert answers[0] == answers[1]  # same weights, same seeded sampler


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_from_a_checkpoint(run, tmp_path, subcommand, capsys):
    cli(subcommand, tmp_path, "--ckpt_path", str(run[0] / "checkpoints" / "last.ckpt"))
    stage = "val" if subcommand == "validate" else "test"
    acc = events(tmp_path / "lightning_logs" / "version_0")
    assert {f"{stage}/loss", f"{stage}/ppl"} <= set(acc.Tags()["scalars"])
    assert "samples/text_summary" not in acc.Tags()["tensors"]  # samples belong to fit


def test_show_examples_prints_the_trained_spans(tmp_path, capsys):
    # fast_dev_run still saves a checkpoint into default_root_dir (the working directory unless set)
    smoke = ["--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path)]
    cli("fit", tmp_path, "--data.show_examples", "1", *smoke)
    out = capsys.readouterr().out
    assert "<|assistant|>\n⟦" in out and "<|end|>⟧" in out
    assert not (tmp_path / "adapter").exists() and not Path("adapter").exists()  # smoke runs export nothing


def test_export_merges_the_last_checkpoint_into_a_model_stock_transformers_loads(run, tmp_path, capsys, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from meowdread.chat_format import ChatFormat
    from meowdread.data import collate
    from meowdread.embedded import resolve_pretrained
    from meowdread.formats import read_corpus
    from meowdread.model import QuantizationSettings

    root, out = run[0].parent.parent, tmp_path / "exported"
    cli("export", root, "--ckpt_path", "last", "--output", str(out))
    summary = capsys.readouterr().out
    assert f"version_0/checkpoints/last.ckpt merged into embedded:tiny-phi3 (bfloat16) to {out}" in summary

    # The fit's own adapter (the same weights as last.ckpt) on the 4-bit base, through stock peft.
    base = AutoModelForCausalLM.from_pretrained(
        resolve_pretrained("embedded:tiny-phi3"),
        quantization_config=QuantizationSettings().to_transformers(),
        dtype=torch.bfloat16,
        device_map={"": "cpu"},
    )
    adapted = PeftModel.from_pretrained(base, run[0] / "adapter").eval()
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    batch = collate([ChatFormat.of(tokenizer).encode(c) for c in read_corpus(CORPUS)[:4]], tokenizer.pad_token_id)
    keep = batch["attention_mask"].bool()
    with torch.inference_mode():
        reference = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[keep].float()
        with adapted.disable_adapter():
            plain = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[keep].float()
        ours = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[keep].float()
    assert (plain - reference).norm() > 0.5 * reference.norm()  # the checkpoint's LoRA matters (a fresh one is 0)
    assert (ours - reference).norm() < 2e-2 * reference.norm()  # bf16 tolerance: see tests/test_export.py

    with pytest.raises(SystemExit) as exit_:
        cli("export", root, "--ckpt_path", "last", "--output", str(out))
    assert exit_.value.code == 2 and "not empty; add --overwrite" in capsys.readouterr().err
    before = (out / "model.safetensors").stat().st_ino
    cli("export", root, "--ckpt_path", "last", "--output", str(out), "--overwrite")
    assert (out / "model.safetensors").stat().st_ino != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no staging or old directory left


@pytest.mark.parametrize(
    "tool, args, message",
    [
        ("chat", ["--ckpt_path", "missing.ckpt"], "missing.ckpt: ckpt_path: not found"),
        ("chat", ["--ckpt_path", "last"], "--ckpt_path last: no */checkpoints/last.ckpt under"),
        ("chat", ["--ckpt_path", str(CORPUS)], "cat_corpus.jsonl: ckpt_path: not a complete checkpoint"),
        ("export", ["--output", "{tmp}/out"], "export: nothing to merge: give --ckpt_path"),
        (
            "export",
            ["--model.adapter", "{tmp}/adapter", "--gguf_type", "q8_0", "--output", "{tmp}/out"],
            "--gguf_type q8_0 is for --format gguf",
        ),
        ("export", ["--model.adapter", "{tmp}/adapter", "--output", str(REPO)], "is not empty; add --overwrite"),
    ],
)
def test_bad_input_to_chat_and_export_is_one_readable_line(tool, args, message, tmp_path, capsys):
    (tmp_path / "adapter").mkdir()  # what the pre-flight check of model.adapter looks for; never loaded here
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "adapter" / name).write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        cli(tool, tmp_path, *[a.format(tmp=tmp_path) for a in args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
