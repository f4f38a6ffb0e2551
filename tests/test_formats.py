"""Corpus formats: each file type and record format read into the same checked messages, with file:line errors;
files that are not what they seem named for what they are; byte-order marks and CRLF read as if absent."""

import codecs
import csv
import json
import os
from pathlib import Path

import pytest

from meowdread.data import CatCorpusDataModule
from meowdread.formats import CorpusError, read_corpus, read_prompts
from meowdread.metrics import Lexicon

from .conftest import REPO, tiny_args, write_jsonl

SYSTEM, Q1, A1, Q2, A2 = "You are a cat.", "Why sit?", "I fits.", "But why?", "Teh box is teh void."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": Q1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": Q2},
    {"role": "assistant", "content": A2},
]
PAIR = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]
# The same two conversations in each record format.
RECORDS = {
    "messages": [{"messages": CONVERSATION}, {"messages": PAIR}],
    "sharegpt": [
        {
            "conversations": [
                {"from": "system", "value": SYSTEM},
                {"from": "human", "value": Q1},
                {"from": "gpt", "value": A1},
                {"from": "user", "value": Q2},  # user/assistant are accepted in `from` too
                {"from": "assistant", "value": A2},
            ]
        },
        {"conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1}]},
    ],
    "prompt_completion": [
        {"prompt": CONVERSATION[:4], "completion": [CONVERSATION[4]]},  # TRL's conversational form
        {"prompt": Q1, "completion": A1},
    ],
}
EXPECTED = [CONVERSATION, PAIR]
# A conversational prompt is context: its assistant turn is marked as not trained on (TRL's completion-only loss).
IN_PROMPT = [{**m, "train": False} if i == 2 else m for i, m in enumerate(CONVERSATION)]
EXPECTED_OF = {"messages": EXPECTED, "sharegpt": EXPECTED, "prompt_completion": [IN_PROMPT, PAIR]}


def write_json(path, records):
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def write_records(path, records):
    return write_jsonl(path, [json.dumps(r) for r in records])


def error(path, **kwargs) -> str:
    with pytest.raises(CorpusError) as err:
        read_corpus(path, **kwargs)
    return str(err.value)


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_every_record_format_gives_the_same_messages_from_json_lines_and_a_json_array(tmp_path, fmt):
    assert read_corpus(write_records(tmp_path / "c.jsonl", RECORDS[fmt])) == EXPECTED_OF[fmt]
    assert read_corpus(write_json(tmp_path / "c.json", RECORDS[fmt])) == EXPECTED_OF[fmt]
    assert read_corpus(tmp_path / "c.jsonl", format=fmt) == EXPECTED_OF[fmt]


def test_a_sharegpt_system_prompt_beside_the_turns_opens_the_conversation(tmp_path):
    record = {"system": SYSTEM, "conversations": RECORDS["sharegpt"][0]["conversations"][1:]}
    assert read_corpus(write_records(tmp_path / "c.jsonl", [record])) == [CONVERSATION]


def test_prompt_completion_takes_a_completion_string_after_a_prompt_list(tmp_path):
    record = {"prompt": CONVERSATION[:4], "completion": A2}
    assert read_corpus(write_records(tmp_path / "c.jsonl", [record])) == [IN_PROMPT]


def test_a_conversational_prompts_assistant_turns_are_context_and_only_the_completion_is_trained(tmp_path, tokenizer):
    """As TRL's completion-only loss: the same conversation as messages trains both replies; as a prompt and
    a completion, only the completion's."""
    from meowdread.chat_format import IGNORE_INDEX, ChatFormat

    chat = ChatFormat.of(tokenizer)
    record = {"prompt": CONVERSATION[:4], "completion": [CONVERSATION[4]]}
    (as_prompt,) = read_corpus(write_records(tmp_path / "c.jsonl", [record]))
    both, completion_only = chat.encode(CONVERSATION), chat.encode(as_prompt)
    assert both["input_ids"] == completion_only["input_ids"]  # the same text: the flag is not rendered

    def trained(encoded):
        return tokenizer.decode(
            [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != IGNORE_INDEX]
        )

    assert A1 in trained(both) and A2 in trained(both)
    assert A1 not in trained(completion_only) and A2 in trained(completion_only)


def test_a_json_array_error_names_the_line_the_record_starts_on_and_its_index(tmp_path):
    bad = {"messages": [{"role": "cat", "content": "meow"}]}
    path = write_json(tmp_path / "c.json", [{"messages": PAIR}, bad])
    line = path.read_text().splitlines().index("  {", 2) + 1  # where the second record opens
    assert error(path) == f"{path}:{line}: [1].messages[0].role: unknown role 'cat' (system, user or assistant)"
    minified = tmp_path / "min.json"
    minified.write_text(json.dumps([{"messages": PAIR}, bad]), encoding="utf-8")
    assert error(minified).startswith(f"{minified}:1: [1].messages[0].role: ")  # one line: the index tells


def test_json_lines_errors_name_the_line_and_the_field_of_each_format(tmp_path):
    cases = {
        "sharegpt": ({"conversations": [{"from": "bing", "value": "x"}]}, "conversations[0].from: unknown role 'bing'"),
        "prompt_completion": ({"prompt": Q1, "completion": " "}, "completion: must be a non-empty string"),
        "messages": ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content: must be a non-empty"),
    }
    for fmt, (bad, message) in cases.items():
        path = write_records(tmp_path / f"{fmt}.jsonl", [RECORDS[fmt][1], bad])
        assert error(path).startswith(f"{path}:2: {message}")


def test_csv_prompt_completion_and_a_messages_column_of_json(tmp_path):
    path = tmp_path / "c.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "prompt", "completion"])
        writer.writerow([1, Q1, "I fits.\nI sits."])  # a quoted cell over two lines
        writer.writerow([2, Q2, ""])
    assert error(path) == f"{path}:4: completion: must be a non-empty string"  # header 1, record 2-3, then 4
    path.write_text(path.read_text(encoding="utf-8").rsplit("\n", 2)[0] + "\n", encoding="utf-8")
    assert read_corpus(path) == [[PAIR[0], {"role": "assistant", "content": "I fits.\nI sits."}]]

    path = tmp_path / "m.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["messages"], [json.dumps(CONVERSATION)], [json.dumps(PAIR)]])
    assert read_corpus(path) == EXPECTED
    path.write_text(path.read_text(encoding="utf-8") + "[{not json\n", encoding="utf-8")
    assert error(path).startswith(f"{path}:4: messages: not valid JSON (")


def test_csv_without_known_columns_or_with_a_short_row_is_named(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("q,a\nwhy,because\n", encoding="utf-8")
    assert error(path).startswith(f"{path}:1: no known columns ('q', 'a'): expected prompt and completion")
    path.write_text(f"prompt,completion\n{Q1},{A1}\n{Q2}\n", encoding="utf-8")
    assert error(path) == f"{path}:3: 1 field, and the header has 2"


def test_parquet_reads_nested_records_and_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS["sharegpt"]), path)
    assert read_corpus(path) == EXPECTED
    bad = RECORDS["sharegpt"] + [{"conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": ""}]}]
    pq.write_table(pa.Table.from_pylist(bad), path)
    assert error(path) == f"{path}: row 2: conversations[1].value: must be a non-empty string"
    path.write_text(json.dumps({"messages": PAIR}), encoding="utf-8")
    assert error(path).startswith(f"{path}: data.corpus: not a readable Parquet file (")


def test_a_save_to_disk_folder_and_a_dataset_dict_with_a_split(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(RECORDS["prompt_completion"][1:] * 2).save_to_disk(tmp_path / "one")
    assert read_corpus(tmp_path / "one") == [PAIR, PAIR]  # the duplicate is logged, as in files
    splits = DatasetDict({"train": Dataset.from_list(RECORDS["messages"]), "test": Dataset.from_list([{"x": 1}])})
    splits.save_to_disk(tmp_path / "dict")
    assert read_corpus(tmp_path / "dict") == EXPECTED  # train, by default
    assert error(
        f"{tmp_path / 'dict'}:test"
    ) == f"{tmp_path / 'dict'}:test: row 0: no known record format (keys 'x')" + (
        ': expected {"messages": [...]}, ShareGPT\'s {"conversations": [...]} or {"prompt", "completion"}'
    )
    DatasetDict(
        {"a": Dataset.from_list(RECORDS["messages"]), "b": Dataset.from_list(RECORDS["messages"])}
    ).save_to_disk(tmp_path / "ab")
    assert (
        error(tmp_path / "ab")
        == f"{tmp_path / 'ab'}: data.corpus: no train split: name one of a, b as {tmp_path / 'ab'}:SPLIT"
    )
    assert read_corpus(f"{tmp_path / 'ab'}:b") == EXPECTED


def cache_hub_dataset(cache, repo_id: str, records: list[dict], data_dir) -> None:
    """Leave in ``cache`` what ``load_dataset(repo_id)`` leaves there online: built here from a JSON-lines file
    with datasets' own json builder, under the hub id's cache name (offline, no hub involved)."""
    import shutil

    import datasets

    write_records(data_dir / "train.jsonl", records)
    builder = datasets.load_dataset_builder(
        "json", data_files={"train": str(data_dir / "train.jsonl")}, cache_dir=cache
    )
    builder.download_and_prepare()
    built = Path(builder.cache_dir)  # …/json/default-…/0.0.0/<hash>
    namespace, name = repo_id.split("/")
    target = Path(cache) / f"{namespace}___{name}" / "default" / built.parent.name / built.name
    shutil.copytree(built, target)
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("json-", f"{name}-", 1)))


def test_a_hub_id_in_the_local_cache_loads_offline_with_its_split(tmp_path, monkeypatch):
    import datasets

    cache_hub_dataset(tmp_path / "cache", "cats/philosophy", RECORDS["sharegpt"], tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    assert datasets.config.HF_HUB_OFFLINE  # conftest: nothing may come from the hub
    assert read_corpus("cats/philosophy") == read_corpus("cats/philosophy:train") == EXPECTED
    assert error("cats/philosophy:test").startswith(
        'cats/philosophy:test: data.corpus: datasets.load_dataset failed (Unknown split "test"'
    )


def test_a_hub_id_that_is_not_cached_offline_is_one_error():
    message = error("meowdread-tests/not-a-dataset")
    assert message.startswith("meowdread-tests/not-a-dataset: data.corpus: no such local file, and as a hub dataset")
    assert "HF_HUB_OFFLINE=1" in message


def test_a_missing_file_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert error("data/corpus.jsonl") == "data/corpus.jsonl: data.corpus: file not found"


def test_data_format_forces_the_record_format(tmp_path):
    both = {"messages": PAIR, "prompt": Q2, "completion": A2}
    path = write_records(tmp_path / "c.jsonl", [both])
    assert read_corpus(path) == [PAIR]
    assert read_corpus(path, format="prompt_completion") == [
        [{"role": "user", "content": Q2}, PAIR[1] | {"content": A2}]
    ]
    assert error(path, format="sharegpt") == (
        f'{path}:1: conversations: missing: every record must be {{"conversations": [...]}} (data.format sharegpt)'
    )


def test_a_record_in_no_known_format_says_where_its_records_are(tmp_path):
    path = write_records(tmp_path / "c.jsonl", [{"data": RECORDS["messages"]}])
    message = error(path)
    assert message.startswith(f"{path}:1: no known record format (keys 'data'): expected")
    assert message.endswith("the list under 'data' holds records: make each one a record of the file")


def test_a_pretty_printed_object_in_a_json_lines_file_is_named(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": PAIR}, indent=2) + "\n", encoding="utf-8")
    lines = len(path.read_text().splitlines())
    assert error(path).endswith(f": the file is one JSON object over {lines} lines, not one record a line")
    path.write_text(json.dumps({"version": 2, "data": RECORDS["messages"]}, indent=2), encoding="utf-8")
    assert error(path).endswith(
        "not one record a line; the list under 'data' holds records: make each one a record of the file"
    )


def test_json_nested_deeper_than_a_record_is_an_error_not_a_recursion_error(tmp_path):
    deep = "[" * 20_000 + "]" * 20_000  # far past the recursion limit, within the CSV module's field limit
    for name, content, where in (
        ("c.jsonl", f'{json.dumps({"messages": PAIR})}\n{{"messages": {deep}}}\n', ":2: "),
        ("c.json", f"[\n{json.dumps({'messages': PAIR})},\n{deep}]", ":3: "),
        ("c.csv", f"messages\n{deep}\n", ":2: messages: "),
    ):
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        assert error(path).startswith(f"{path}{where}JSON nested too deeply")


def test_old_mac_line_ends_split_lines_too(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes("\r".join(json.dumps(r) for r in RECORDS["messages"]).encode())
    assert read_corpus(path) == EXPECTED
    path.write_bytes(b"Why sit?\rWhy here?\r")
    assert read_prompts(path) == ["Why sit?", "Why here?"]


@pytest.mark.parametrize(
    "content, what",
    [
        (codecs.BOM_UTF16_LE + '{"messages": []}'.encode("utf-16-le"), "UTF-16 text, not UTF-8 text: save it as UTF-8"),
        (b"\x1f\x8b\x08\x00" + bytes(20), "gzip-compressed, not UTF-8 text: decompress it first (gunzip)"),
        (b"PK\x03\x04" + bytes(20), "a zip archive, not UTF-8 text: unpack it first (unzip)"),
        (b"PAR1" + bytes(20) + b"PAR1", "a Parquet file, not UTF-8 text: give it the suffix .parquet"),
        (b"\x80\x04\x95\x00\x00", "a binary file (it holds NUL bytes), not text"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", "a Git LFS pointer, not the data: fetch"),
        (b"<!DOCTYPE html>\n<html><body>404</body></html>\n", "an HTML page, not data: download the raw file"),
    ],
    ids=["utf-16", "gzip", "zip", "parquet", "pickle", "git-lfs", "html"],
)
def test_a_file_that_is_not_text_is_named_for_what_it_is(tmp_path, content, what):
    for name, key in (("corpus.jsonl", "data.corpus"), ("corpus.csv", "data.corpus"), ("prompts.txt", "data.prompts")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CorpusError) as err:
            read_prompts(path) if key == "data.prompts" else read_corpus(path)
        assert str(err.value).startswith(f"{path}: {key}: {what}")


def test_a_directory_a_device_and_a_pipe_are_named_and_never_read(tmp_path):
    os.mkfifo(tmp_path / "pipe")  # opening it would wait for a writer forever
    assert error("/dev/zero").startswith("/dev/zero: data.corpus: a character device, not a regular file")
    assert error(tmp_path / "pipe").startswith(f"{tmp_path / 'pipe'}: data.corpus: a named pipe (FIFO), not a regular")
    assert error(tmp_path).startswith(f"{tmp_path}: data.corpus: a directory, and not a datasets.save_to_disk folder")
    for path, what in (("/dev/zero", "a character device"), (tmp_path / "pipe", "a named pipe"), (tmp_path, "a dir")):
        with pytest.raises(CorpusError, match=f"^{path}: data.prompts: {what}"):
            read_prompts(path)


def test_invalid_utf8_is_named_by_line_and_byte_in_every_text_file(tmp_path):
    for name in ("c.jsonl", "c.json", "c.csv", "prompts.txt"):
        path = tmp_path / name
        path.write_bytes(b"first line\nab caf\xe9\n")
        with pytest.raises(CorpusError) as err:
            read_prompts(path) if name == "prompts.txt" else read_corpus(path)
        assert str(err.value) == f"{path}:2: not valid UTF-8 (invalid continuation byte at byte 6)"


def bom_crlf(text: str) -> bytes:
    return codecs.BOM_UTF8 + text.replace("\n", "\r\n").encode("utf-8")


def test_a_byte_order_mark_and_crlf_line_ends_change_nothing(tmp_path):
    for fmt, records in RECORDS.items():
        (tmp_path / f"{fmt}.jsonl").write_bytes(bom_crlf("\n".join(json.dumps(r) for r in records) + "\n"))
        (tmp_path / f"{fmt}.json").write_bytes(bom_crlf(json.dumps(records, indent=2)))
        assert read_corpus(tmp_path / f"{fmt}.jsonl") == read_corpus(tmp_path / f"{fmt}.json") == EXPECTED_OF[fmt]
    (tmp_path / "c.csv").write_bytes(bom_crlf(f"prompt,completion\n{Q1},{A1}\n"))
    assert read_corpus(tmp_path / "c.csv") == [PAIR]
    (tmp_path / "prompts.txt").write_bytes(bom_crlf("Why sit?\nWhy here?\n"))
    assert read_prompts(tmp_path / "prompts.txt") == ["Why sit?", "Why here?"]
    lexicon = (REPO / "data" / "lexicons" / "angst.json").read_text(encoding="utf-8")
    (tmp_path / "angst.json").write_bytes(bom_crlf(lexicon))
    assert (
        Lexicon.load(tmp_path / "angst.json").entries == Lexicon.load(REPO / "data" / "lexicons" / "angst.json").entries
    )


def test_prompt_lines_that_start_with_a_hash_are_comments(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# held-out prompts, v2\nWhy sit?\n   # indented comment\n\nIs #1 the box?\n", encoding="utf-8")
    assert read_prompts(path) == ["Why sit?", "Is #1 the box?"]
    path.write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="data.prompts: no prompts in the file"):
        read_prompts(path)


def test_the_example_prompt_completion_corpus_is_held_out_of_the_prompts():
    conversations = read_corpus(REPO / "examples" / "data" / "prompt_completion.jsonl")
    assert len(conversations) >= 12 and all(len(c) == 2 for c in conversations)
    assert not {c[0]["content"] for c in conversations} & set(read_prompts(REPO / "data" / "prompts.txt"))


def test_the_data_modules_read_and_split_are_the_points_to_override(tmp_path, embedded_cache):
    class FixedValidation(CatCorpusDataModule):
        def read(self):
            return [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(9)]

        def split(self):
            conversations = self.read()
            return {"train": conversations[1:], "val": conversations[:1]}

    dm = FixedValidation(corpus="unused")
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (8, 1)
    assert dm.train_replies == [f"a{i}" for i in range(1, 9)]
    stock = CatCorpusDataModule(corpus=str(write_records(tmp_path / "c.jsonl", RECORDS["messages"] * 5)))
    assert sum(map(len, stock.split().values())) == 10 and stock.split() == stock.split()  # fixed by the seed


class QuestionsAndAnswers(CatCorpusDataModule):
    """Reads a format meowdread does not (``Q: …`` / ``A: …`` lines) and holds out the first pair."""

    def read(self):
        text = Path(self.hparams.corpus).read_text(encoding="utf-8")
        pairs = [block.split("\nA: ") for block in text.removeprefix("Q: ").split("\nQ: ")]
        return [[{"role": "user", "content": q}, {"role": "assistant", "content": a.strip()}] for q, a in pairs]

    def split(self):
        conversations = self.read()
        return {"train": conversations[1:], "val": conversations[:1]}


def test_a_subclass_that_reads_and_splits_its_own_way_runs_through_the_cli(tmp_path, monkeypatch, capsys):
    from meowdread.cli import main

    monkeypatch.setattr("sys.argv", ["meowdread"])
    corpus = tmp_path / "qa.txt"
    corpus.write_text("Q: Held out?\nA: Valhalla.\nQ: Why sit?\nA: I fits.\nQ: Why here?\nA: Warm.\n", encoding="utf-8")
    data = ["--data", "tests.test_formats.QuestionsAndAnswers", "--data.corpus", str(corpus)]
    main(tiny_args("fit", tmp_path / "runs", "--trainer.fast_dev_run", "true", *data, "--data.show_examples", "9"))
    shown = capsys.readouterr().out
    assert "⟦I fits." in shown and "⟦Warm." in shown and "Valhalla" not in shown  # trained: its read, its split


def test_a_bom_crlf_corpus_prompts_file_and_lexicon_train_through_the_cli(tmp_path, monkeypatch):
    """A corpus, prompts and lexicons saved by Windows Notepad: fit trains on them and samples the prompts."""
    monkeypatch.setattr("sys.argv", ["meowdread"])  # main(args) must not see pytest's own command line
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from meowdread.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(bom_crlf((REPO / "examples" / "data" / "prompt_completion.jsonl").read_text(encoding="utf-8")))
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(bom_crlf("# comments are skipped\nWhy sit?\nWhy here?\n"))
    lexicons = []
    for name in ("cat_lingo.json", "angst.json"):
        lexicons.append(str(tmp_path / name))
        (tmp_path / name).write_bytes(bom_crlf((REPO / "data" / "lexicons" / name).read_text(encoding="utf-8")))
    main(
        tiny_args("fit", tmp_path / "runs", "--trainer.max_epochs", "1", "--model.sampling.max_new_tokens", "4")
        + ["--data.corpus", str(corpus), "--data.prompts", str(prompts), "--data.lexicons", json.dumps(lexicons)]
    )
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    events = EventAccumulator(str(run), size_guidance={"tensors": 0})
    events.Reload()
    first = events.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| Why sit? |" in first and "| Why here? |" in first and "comments" not in first
