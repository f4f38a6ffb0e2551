"""Bad input through the CLI: one line that names the file, the line and the field; exit code 2; nothing lost.

Each case is a row of the README's troubleshooting table, and the test holds the real message against the
row's (``…`` stands for any text), so the table stays true.
"""

import gzip
import inspect
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from meowdread.cli import main

from . import settings_cases  # noqa: F401 (registers the rows of settings, machines, disks and model files)
from .conftest import REPO, write_jsonl
from .error_table import CASES, GOOD, case, cli, needs_no_cuda, readme_rows


@pytest.fixture(autouse=True)
def bare_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["meowdread"])


def corpus_with(tmp_path, second_line: str) -> str:
    return str(write_jsonl(tmp_path / "corpus.jsonl", [GOOD, second_line]))


def line_case(row: str, line: str) -> None:
    case(row)(lambda tmp_path: cli("fit", tmp_path, "--data.corpus", corpus_with(tmp_path, line)))


line_case("a line that is not JSON", "{not json")
line_case("a record without `messages`", '{"text": "hai"}')
line_case("an unknown role", '{"messages": [{"role": "cat", "content": "meow"}]}')
line_case("content that is not a string", '{"messages": [{"role": "user", "content": 3}]}')
line_case("empty content", '{"messages": [{"role": "user", "content": " "}]}')
line_case(
    "no assistant turn", '{"messages": [{"role": "system", "content": "Be a cat."}, {"role": "user", "content": "a"}]}'
)
line_case(
    "roles out of order",
    '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
)


@case("corpus file missing")
def _(tmp_path):
    return cli("fit", tmp_path, "--data.corpus", str(tmp_path / "missing.jsonl"))


@case("empty corpus")
def _(tmp_path):
    return cli("fit", tmp_path, "--data.corpus", str(write_jsonl(tmp_path / "corpus.jsonl", ["", "  "])))


@case("invalid UTF-8")
def _(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"messages": "caf\xe9"}\n')  # Latin-1, not UTF-8
    return cli("fit", tmp_path, "--data.corpus", str(path))


@case("every example longer than `max_length`")
def _(tmp_path):
    return cli("fit", tmp_path, "--data.max_length", "8")


@case("duplicate conversations", warns=True)
def _(tmp_path):
    others = [GOOD.replace("Why sit?", f"Why sit {i} times?") for i in range(9)]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [GOOD, *others, GOOD])
    return cli("validate", tmp_path, "--data.corpus", str(corpus), "--data.val_fraction", "0.2")


@case("prompts file missing")
def _(tmp_path):
    return cli("fit", tmp_path, "--data.prompts", str(tmp_path / "prompts.txt"))


@case("empty prompts file")
def _(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n \n", encoding="utf-8")
    return cli("predict", tmp_path, "--data.prompts", str(tmp_path / "prompts.txt"))


# Corpus formats (meowdread/formats.py), and files that are not what their name says.
SHAREGPT = json.dumps({"conversations": [{"from": "human", "value": "Why sit?"}, {"from": "gpt", "value": "I fits."}]})
line_case("a line that is not a JSON object", '["hai"]')


def corpus_case(row: str, name: str, content: str | bytes, *extra: str) -> None:
    def build(tmp_path):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return cli("fit", tmp_path, "--data.corpus", str(path), *extra)

    case(row)(build)


corpus_case("an unknown ShareGPT speaker", "corpus.jsonl", f"{SHAREGPT}\n{SHAREGPT.replace('gpt', 'bing')}\n")
corpus_case("a record in no known format", "corpus.jsonl", '{"text": "hai"}\n')
corpus_case("records nested under one key", "corpus.jsonl", json.dumps({"data": [json.loads(GOOD)]}))
corpus_case("a `data.format` that the file is not in", "corpus.jsonl", GOOD, "--data.format", "sharegpt")
corpus_case("a bad record in a JSON array", "corpus.json", json.dumps([json.loads(GOOD), {"messages": []}], indent=1))
corpus_case("one JSON object over several lines", "corpus.jsonl", json.dumps(json.loads(GOOD), indent=2))
corpus_case("a CSV without known columns", "corpus.csv", "q,a\nWhy sit?,I fits.\n")
corpus_case("a CSV row with too few fields", "corpus.csv", "prompt,completion\nWhy sit?,I fits.\nWhy?\n")
corpus_case("a CSV cell that is not JSON", "corpus.csv", 'messages\n"[{not json"\n')
corpus_case("a Parquet file that is not one", "corpus.parquet", GOOD)
corpus_case("a compressed corpus", "corpus.jsonl", gzip.compress(GOOD.encode()))
corpus_case("a Parquet file named `.jsonl`", "corpus.jsonl", b"PAR1" + bytes(8) + b"PAR1")
corpus_case("a binary file named `.jsonl`", "corpus.jsonl", b"\x80\x04\x95\x00\x00")
corpus_case("a UTF-16 corpus", "corpus.jsonl", GOOD.encode("utf-16"))
corpus_case("a Git LFS pointer instead of the corpus", "corpus.jsonl", "version https://git-lfs.github.com/spec/v1\n")
corpus_case("a web page saved instead of the corpus", "corpus.jsonl", "<!DOCTYPE html>\n<html></html>\n")


@case("a bad row in a Parquet file")
def _(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "Why sit?", "completion": "I fits."}, {"prompt": "Why?", "completion": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus.parquet")
    return cli("fit", tmp_path, "--data.corpus", str(tmp_path / "corpus.parquet"))


@case("a corpus directory that is not a `save_to_disk` folder")
def _(tmp_path):
    (tmp_path / "corpus").mkdir()
    return cli("fit", tmp_path, "--data.corpus", str(tmp_path / "corpus"))


@case("a `save_to_disk` folder without a train split")
def _(tmp_path):
    from datasets import Dataset, DatasetDict

    dataset = Dataset.from_list([json.loads(GOOD)])
    DatasetDict({"sft": dataset, "dpo": dataset}).save_to_disk(tmp_path / "corpus")
    return cli("fit", tmp_path, "--data.corpus", str(tmp_path / "corpus"))


@case("a corpus that is a named pipe or a device")
def _(tmp_path):
    os.mkfifo(tmp_path / "corpus.jsonl")
    return cli("fit", tmp_path, "--data.corpus", str(tmp_path / "corpus.jsonl"))


@case("a hub dataset id that is not downloaded, offline")
def _(tmp_path):
    return cli("fit", tmp_path, "--data.corpus", "meowdread-tests/not-a-dataset")


@case("a prompts path that is a directory")
def _(tmp_path):
    (tmp_path / "prompts").mkdir()
    return cli("predict", tmp_path, "--data.prompts", str(tmp_path / "prompts"))


@case("invalid UTF-8 in the prompts file")
def _(tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"Why sit?\nWhy caf\xe9?\n")
    return cli("predict", tmp_path, "--data.prompts", str(tmp_path / "prompts.txt"))


@case("unknown key in a config file")
def _(tmp_path):
    (tmp_path / "mine.yaml").write_text("model:\n  lora:\n    rank: 8\n", encoding="utf-8")
    return cli("fit", tmp_path, "--config", str(tmp_path / "mine.yaml"))


@case("unknown option on the command line")
def _(tmp_path):
    return cli("fit", tmp_path, "--model.lora.rank", "8")


@case("a value of the wrong type")
def _(tmp_path):
    (tmp_path / "mine.yaml").write_text("data:\n  batch_size: eight\n", encoding="utf-8")
    return cli("fit", tmp_path, "--config", str(tmp_path / "mine.yaml"))


@case("a class path that does not exist")
def _(tmp_path):
    return cli("fit", tmp_path, "--model.optimizer", "torch.optim.AdamX")


@case("a config file that is not YAML")
def _(tmp_path):
    (tmp_path / "mine.yaml").write_text("trainer:\n  max_epochs: [1\n", encoding="utf-8")
    return cli("fit", tmp_path, "--config", str(tmp_path / "mine.yaml"))


@case("a LoRA target that matches nothing")
def _(tmp_path):
    return cli("fit", tmp_path, "--model.lora.target_modules", "[q_proj, v_proj]")


@case("a LoRA option that peft does not have")
def _(tmp_path):
    return cli("fit", tmp_path, "--model.lora.extra", '{"use_dorra": true}')


@case("an unknown `init_lora_weights`")
def _(tmp_path):
    return cli("fit", tmp_path, "--model.lora.init_lora_weights", "pisa")


@case("LoRA options that peft refuses together")
def _(tmp_path):
    return cli("fit", tmp_path, "--model.lora.use_dora", "true", "--model.lora.lora_bias", "true")


@case("a model path that does not exist")
def _(tmp_path):
    return cli("fit", tmp_path, "--model.pretrained", str(tmp_path / "phi3"))


@case("a hub id that is not downloaded, offline")
def _(tmp_path):
    return cli("fit", tmp_path, "--model.pretrained", "meowdread-tests/not-a-model")


@case("`embedded:smollm2-135m-instruct` without its package")
def _(tmp_path, monkeypatch):
    from meowdread.embedded import PACKAGED

    monkeypatch.setitem(PACKAGED["smollm2-135m-instruct"], "module", "meowdread_tests_no_such_package")
    return cli("fit", tmp_path, "--model.pretrained", "embedded:smollm2-135m-instruct")


@case("`data.limit` below 2")
def _(tmp_path):
    return cli("fit", tmp_path, "--data.limit", "1")


@case("the GPU recipe without CUDA")
def _(tmp_path):
    needs_no_cuda()
    return cli("fit", tmp_path, config=str(REPO / "configs" / "phi3_qlora.yaml"))


@case("a paged optimizer without CUDA")
def _(tmp_path):
    needs_no_cuda()
    return cli("fit", tmp_path, "--model.optimizer", "bitsandbytes.optim.PagedAdamW32bit")


def fake_checkpoint(path, **lora) -> str:
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj"]} | lora
    torch.save({"state_dict": {}, "hyper_parameters": {"pretrained": "embedded:tiny-phi3", "lora": lora}}, path)
    return str(path)


@case("`--ckpt_path` missing")
def _(tmp_path):
    return cli("fit", tmp_path, "--ckpt_path", str(tmp_path / "last.ckpt"))


@case("`--ckpt_path` truncated")
def _(tmp_path):
    path = tmp_path / "last.ckpt"
    fake_checkpoint(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return cli("fit", tmp_path, "--ckpt_path", str(path))


@case("`--ckpt_path` of another adapter shape")
def _(tmp_path):
    return cli("predict", tmp_path, "--ckpt_path", fake_checkpoint(tmp_path / "last.ckpt", r=4))


class RunsCode:
    """Unpickling this would run ``print``: a stand-in for anything worse."""

    def __reduce__(self):
        return print, ("this ran while loading a checkpoint",)


@case("a checkpoint that holds pickled code")
def _(tmp_path):
    torch.save({"state_dict": {}, "hyper_parameters": {"note": RunsCode()}}, tmp_path / "evil.ckpt")
    return cli("predict", tmp_path, "--ckpt_path", str(tmp_path / "evil.ckpt"))


@case("an adapter directory that is not one")
def _(tmp_path):
    (tmp_path / "adapter").mkdir()
    return cli("predict", tmp_path, "--model.adapter", str(tmp_path / "adapter"))


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, embedded_cache):
    """A Phi-3 of another width with the same tokenizer, and a LoRA checkpoint and adapter of the tiny one."""
    import shutil

    from meowdread.embedded import SPECS, _init_model, resolve_pretrained
    from meowdread.model import LoraSettings, QLoraModule

    root = tmp_path_factory.mktemp("other-base")
    tiny = resolve_pretrained("embedded:tiny-phi3")
    module = QLoraModule(pretrained="embedded:tiny-phi3", lora=LoraSettings(dropout=0.0))
    module.configure_model()
    module.export_adapter(root / "adapter")
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}  # as the configs
    torch.save(
        {
            "state_dict": {k: v for k, v in module.state_dict().items() if k in module.trainable_state_keys()},
            "hyper_parameters": {"pretrained": "embedded:tiny-phi3", "lora": lora},
            "pytorch-lightning_version": "2.6.6",
        },
        root / "last.ckpt",
    )
    base = root / "phi3-narrow"
    _init_model(module.tokenizer, {**SPECS["tiny-phi3"], "hidden_size": 64, "intermediate_size": 128}).save_pretrained(
        base
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(tiny) / name, base / name)
    return root


@case("`--ckpt_path` of another base model")
def _(tmp_path, other_base):
    return cli(
        "predict",
        tmp_path,
        "--model.pretrained",
        str(other_base / "phi3-narrow"),
        "--ckpt_path",
        str(other_base / "last.ckpt"),
    )


@case("an adapter of another base model")
def _(tmp_path, other_base):
    return cli(
        "predict",
        tmp_path,
        "--model.pretrained",
        str(other_base / "phi3-narrow"),
        "--model.adapter",
        str(other_base / "adapter"),
    )


@case("an adapter saved as a pickle (`.bin`)")
def _(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(b"pickle")
    return cli("predict", tmp_path, "--model.adapter", str(tmp_path / "adapter"))


@case("`--format gguf` for a model it does not write")
def _(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from meowdread.data import load_tokenizer

    # A complete model directory (weights and a tokenizer), so that only its architecture is refused.
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=2048)).save_pretrained(tmp_path / "gpt2")
    load_tokenizer("embedded:tiny-phi3").save_pretrained(tmp_path / "gpt2")
    (tmp_path / "adapter").mkdir()  # what the pre-flight check of model.adapter looks for; never loaded here
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "adapter" / name).write_text("{}", encoding="utf-8")
    model = ["--model.pretrained", str(tmp_path / "gpt2"), "--model.adapter", str(tmp_path / "adapter")]
    return cli("export", tmp_path, *model, "--format", "gguf", "--output", str(tmp_path / "out"))


@case("an output directory that cannot be written")
def _(tmp_path):
    (tmp_path / "file").write_text("not a directory", encoding="utf-8")
    args = cli("fit", tmp_path)
    args[args.index("--trainer.logger.init_args.save_dir") + 1] = str(tmp_path / "file" / "runs")
    return args


@case("`model.kernels: fused` or `liger` with `model.compile: true`")
def _(tmp_path):
    return cli("fit", tmp_path, "--model.kernels", "fused", "--model.compile", "true")


@case("`model.kernels: liger` without liger-kernel installed")
def _(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails, installed or not
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    return cli("fit", tmp_path, "--model.kernels", "liger")


def test_every_readme_row_has_a_case_and_every_case_a_row():
    assert sorted(readme_rows()) == sorted(CASES)


@pytest.mark.parametrize("row", sorted(CASES))
def test_bad_input_gives_one_line_that_the_readme_shows(row, tmp_path, capsys, request):
    build, warns = CASES[row]
    needs = [name for name in inspect.signature(build).parameters if name != "tmp_path"]
    args = build(tmp_path, *[request.getfixturevalue(name) for name in needs])
    earlier = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    earlier.parent.mkdir(parents=True, exist_ok=True)
    earlier.write_bytes(b"an earlier run's checkpoint")
    if warns:
        main(args)
        err = capsys.readouterr().err
        found = [line.removeprefix("[meowdread] ") for line in err.splitlines() if "duplicate" in line]
    else:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2, err[-3000:]
        assert "Traceback" not in err and "usage:" not in err
        found = [line.removeprefix("meowdread: error: ") for line in err.splitlines() if line.startswith("meowdread:")]
        assert err.rstrip().endswith("(set MEOWDREAD_DEBUG=1 for the traceback)")
    assert len(found) == 1, err[-3000:]
    expected = readme_rows()[row]
    assert re.fullmatch(re.escape(expected).replace("…", ".*"), found[0]), f"\n{found[0]}\n{expected}"
    assert earlier.read_bytes() == b"an earlier run's checkpoint"  # nothing already written is touched


def test_the_debug_variable_gives_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MEOWDREAD_DEBUG", "1")
    with pytest.raises(ValueError, match="missing.jsonl: data.corpus: file not found"):
        main(cli("fit", tmp_path, "--data.corpus", str(tmp_path / "missing.jsonl")))


def test_help_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0 and "--model.help" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # the options of the module and data classes (subclass mode)
        main(["fit", "--data.help"])
    assert exit_.value.code == 0 and "--data.corpus" in capsys.readouterr().out


def test_an_unknown_key_of_the_data_section_is_named_with_its_file(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text("data:\n  batch_sise: 4\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        main(cli("fit", tmp_path, "--config", str(tmp_path / "mine.yaml")))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"{tmp_path / 'mine.yaml'}: data.batch_sise: unknown option (did you mean data.batch_size?)" in err


def test_the_settings_dataclasses_check_their_ranges_for_python_users():
    from meowdread.adapters import LoraSettings
    from meowdread.generation import SamplingSettings

    with pytest.raises(ValueError, match=re.escape("model.lora.dropout: got 1.5, must be in [0, 1)")):
        LoraSettings(dropout=1.5)
    with pytest.raises(ValueError, match=re.escape("model.sampling.top_p: got 0.0, must be in (0, 1]")):
        SamplingSettings(top_p=0.0)
    SamplingSettings(temperature=0.0, do_sample=False)  # greedy decoding ignores the temperature


@pytest.mark.parametrize(
    ("value", "ok"),
    [(2, True), (2.0, True), (0, True), (0.25, True), (1.0, True), (1.5, False), (2.5, False), (-1, False)],
)
def test_limit_batches_takes_what_lightning_takes(value, ok):
    """A whole float above 1 is a number of batches, as Lightning's _determine_batch_limits reads it:
    jsonargparse gave ``--trainer.limit_val_batches 2`` as 2.0 on the H200 machine (Python 3.12)."""
    from meowdread.ranges import ConfigError, check_value

    if ok:
        check_value("trainer.limit_val_batches", value)
    else:
        with pytest.raises(ConfigError, match="limit_val_batches"):
            check_value("trainer.limit_val_batches", value)
