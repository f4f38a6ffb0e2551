"""Corpus and prompts files → checked conversations: one reader per file type, one normaliser per record format.

:func:`read_corpus` reads JSON lines, a JSON array, CSV, Parquet, a ``datasets.save_to_disk`` folder or a
hub dataset id, and turns every record (``{"messages"}``, ShareGPT's ``{"conversations"}`` or
``{"prompt", "completion"}``) into ``{"role", "content"}`` messages, checked as the chat template needs them.
A problem is one :class:`CorpusError` line naming the file, the line (or row) and the field; a file that is not
what its name says is named for what it is (:mod:`meowdread.textfiles`).

    meowdread fit --config configs/tiny.yaml --data.corpus my_sharegpt.json
    meowdread fit --config configs/tiny.yaml --data.corpus org/name:train --data.format prompt_completion
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from meowdread.textfiles import CorpusError, Location, check_regular_file, lines, read_text, where

log = logging.getLogger(__name__)

Message = dict[str, str | bool]  # role, content; "train": False on an assistant turn that is context only
Format = Literal["auto", "messages", "sharegpt", "prompt_completion"]
# role, content as the record has it, the fields that hold them, and whether the turn is trained on (False:
# context only)
Turn = tuple[str, Any, str, str, bool]

ROLES = {role: role for role in ("system", "user", "assistant")}
SPEAKERS = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
# format → the keys that make a record one of it, and how such a record looks
SHAPES = {
    "messages": (("messages",), '{"messages": [...]}'),
    "sharegpt": (("conversations",), '{"conversations": [...]}'),
    "prompt_completion": (("prompt", "completion"), '{"prompt", "completion"}'),
}
JSON_COLUMNS = ("messages", "conversations")  # CSV cells that hold a list of turns as JSON text
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".gz", ".zip")
JSON_SPACE = re.compile(r"[ \t\n\r]*")


class _Bad(Exception):
    """A problem with one record; the caller adds the file and the line."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(field, problem)
        self.field, self.problem = field, problem


def read_corpus(path: str | Path, format: Format = "auto") -> list[list[Message]]:
    """The checked conversations of ``path``: a file, a ``save_to_disk`` folder, or a hub id ``org/name[:split]``.

    ``format`` forces the record format; ``auto`` takes that of the first record. Blank lines are skipped,
    duplicates are logged, and a corpus without a conversation is an error.
    """
    if format != "auto" and format not in SHAPES:
        raise ValueError(f"data.format: {format!r} is not one of auto, {', '.join(SHAPES)}")
    why = "like the first record" if format == "auto" else f"(data.format {format})"
    source, records = _open(str(path))
    conversations, seen = [], {}
    for line, prefix, record in records:
        try:
            if format == "auto":
                format = _detect(record)
            messages = _check_turns(_normalise(format, record, why), SHAPES[format][0][0])
        except _Bad as bad:
            raise CorpusError(source, line, f"{prefix}{bad.field or ''}".rstrip(".") or None, bad.problem) from None
        key = json.dumps(messages, sort_keys=True)
        if key in seen:
            first = seen[key]
            at = f"on line {first}" if isinstance(first, int) else f"in {first}"
            log.warning("%s: duplicate of the conversation %s", where(source, line), at)
        seen.setdefault(key, line)
        conversations.append(messages)
    if not conversations:
        raise CorpusError(source, None, "data.corpus", "no conversations in the file")
    return conversations


def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line. Blank lines are skipped, and so are comments: lines whose first non-blank character
    is ``#``."""
    path = Path(path)
    text = read_text(path, "data.prompts")
    prompts = [line.strip() for line in lines(text) if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise CorpusError(path, None, "data.prompts", "no prompts in the file")
    return prompts


def _open(corpus: str) -> tuple[str, Iterable[tuple[Location, str, Any]]]:
    """What names the corpus in errors, and its records as (line, field prefix, record)."""
    path = Path(corpus).expanduser()
    base, colon, split = corpus.rpartition(":")
    if path.exists() or not (colon and base and split and Path(base).expanduser().is_dir()):
        split = ""  # else a save_to_disk folder and one of its splits
    else:
        path = Path(base).expanduser()
    if path.is_dir():
        return corpus, _rows(_load_from_disk(path, split, corpus))
    source = str(path)
    if not path.exists() and not corpus.startswith(("/", ".", "~")) and HUB_ID.fullmatch(corpus):
        if not corpus.split(":")[0].lower().endswith(FILE_SUFFIXES):
            return corpus, _rows(_load_from_hub(corpus))
    if path.suffix.lower() == ".parquet":
        return source, _rows(_read_parquet(path))
    text = read_text(path, "data.corpus")
    return source, _csv_records(path, text) if path.suffix.lower() == ".csv" else _json_records(path, text)


def _json_records(path: Path, text: str) -> Iterator[tuple[Location, str, Any]]:
    """JSON lines, or one JSON array of records (whatever the suffix: the first character tells)."""
    start = JSON_SPACE.match(text).end()
    if text.startswith("[", start):
        yield from _json_array(path, text, start)
        return
    first = True
    for number, line in enumerate(lines(text), start=1):
        if line.strip():
            yield number, "", _loads(path, number, None, line, (lambda: _one_document(text)) if first else None)
            first = False


def _loads(path: Path, line: int, field: str | None, text: str, hint: Callable[[], str] | None = None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        why = hint() if hint else ""
        raise CorpusError(path, line, field, f"not valid JSON ({err.msg}, column {err.colno}){why}") from None
    except RecursionError:
        raise CorpusError(path, line, field, "JSON nested too deeply to be a record") from None


def _one_document(text: str) -> str:
    """Why a JSON-lines file's first line is not JSON, when the whole file is one JSON document."""
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return ""
    n_lines = text.rstrip().count("\n") + 1
    return f": the file is one JSON {_type(document)} over {n_lines} lines, not one record a line{_nested(document)}"


def _json_array(path: Path, text: str, i: int) -> Iterator[tuple[Location, str, Any]]:
    """The records of a JSON array, each with the line it starts on and its index."""
    decoder, line, counted, index = json.JSONDecoder(), 1, 0, 0
    i = JSON_SPACE.match(text, i + 1).end()
    while not (index == 0 and text.startswith("]", i)):
        try:
            record, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise CorpusError(path, err.lineno, None, f"not valid JSON ({err.msg}, column {err.colno})") from None
        except RecursionError:
            raise CorpusError(path, line + text.count("\n", counted, i), None, "JSON nested too deeply") from None
        line, counted = line + text.count("\n", counted, i), i
        yield line, f"[{index}].", record
        index, i = index + 1, JSON_SPACE.match(text, end).end()
        if text.startswith("]", i):
            break
        if not text.startswith(",", i):
            _json_error(path, text, i, "Expecting ',' delimiter or ']'")
        i = JSON_SPACE.match(text, i + 1).end()
    i = JSON_SPACE.match(text, i + 1).end()
    if i < len(text):
        _json_error(path, text, i, "Extra data after the array")


def _json_error(path: Path, text: str, at: int, problem: str):
    err = json.JSONDecodeError(problem, text, at)
    raise CorpusError(path, err.lineno, None, f"not valid JSON ({problem}, column {err.colno})")


def _csv_records(path: Path, text: str) -> Iterator[tuple[Location, str, Any]]:
    """CSV with a header: prompt and completion columns, or a messages or conversations column of JSON text.
    Each record is named by the line it starts on, the header being line 1."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader, [])]
        json_columns = [name for name in JSON_COLUMNS if name in header]
        if header and not json_columns and not {"prompt", "completion"} <= set(header):
            columns = ", ".join(map(repr, header))
            raise CorpusError(
                path,
                1,
                None,
                f"no known columns ({columns}): expected prompt and completion, or messages or conversations "
                "holding JSON",
            )
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                fields = f"{len(row)} field" + ("" if len(row) == 1 else "s")
                raise CorpusError(path, line, None, f"{fields}, and the header has {len(header)}")
            record = dict(zip(header, row, strict=True))
            for name in json_columns:
                record[name] = _loads(path, line, name, record[name])
            yield line, "", record
    except csv.Error as err:
        raise CorpusError(path, reader.line_num, None, f"not valid CSV ({err})") from None


def _rows(rows: Iterable[Any]) -> Iterator[tuple[Location, str, Any]]:
    for i, row in enumerate(rows):
        yield f"row {i}", "", row


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow
    import pyarrow.parquet as pq

    check_regular_file(path, "data.corpus")
    try:
        return pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as err:
        raise CorpusError(path, None, "data.corpus", f"not a readable Parquet file ({err})") from None


def _load_from_disk(path: Path, split: str, name: str):
    if not any((path / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
        raise CorpusError(
            path,
            None,
            "data.corpus",
            "a directory, and not a datasets.save_to_disk folder (it has no state.json or dataset_dict.json): "
            "give a corpus file or such a folder",
        )
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise CorpusError(path, None, "data.corpus", f"not a readable datasets.save_to_disk folder ({err})") from None
    return _pick_split(dataset, split, name)


def _load_from_hub(corpus: str):
    import datasets

    name, _, split = corpus.partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or None)
    except ConnectionError as err:
        problem = (
            "it is not in the Hugging Face cache, which is all HF_HUB_OFFLINE=1 allows: download it once online, "
            "or give a local file"
            if datasets.config.HF_HUB_OFFLINE
            else f"it is not in the local cache, and the hub cannot be reached ({err})"
        )
        raise CorpusError(name, None, "data.corpus", f"no such local file, and as a hub dataset id {problem}") from None
    except FileNotFoundError:
        problem = "no such local file, nor a dataset on the hub that this machine may read"
        raise CorpusError(name, None, "data.corpus", problem) from None
    except (ValueError, OSError) as err:
        raise CorpusError(corpus, None, "data.corpus", f"datasets.load_dataset failed ({err})") from None
    return _pick_split(dataset, split, corpus)


def _pick_split(dataset, split: str, name: str):
    """The split asked for; else ``train``, or the only one."""
    from datasets import DatasetDict

    if not isinstance(dataset, DatasetDict):
        return dataset
    splits = ", ".join(dataset)
    if split and split not in dataset:
        raise CorpusError(name, None, "data.corpus", f"no split {split!r} (it has {splits})")
    if not split and "train" not in dataset and len(dataset) != 1:
        raise CorpusError(name, None, "data.corpus", f"no train split: name one of {splits} as {name}:SPLIT")
    return dataset[split or ("train" if "train" in dataset else next(iter(dataset)))]


def _type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _detect(record: Any) -> str:
    """The format of the first record, from its keys."""
    if not isinstance(record, dict):
        raise _Bad(None, f"must be a JSON object, not {_type(record)}")
    present = {key for key, value in record.items() if value is not None}
    for name, (keys, _) in SHAPES.items():
        if set(keys) <= present:
            return name
    keys = ", ".join(map(repr, record)) or "none"
    shapes = ' {"messages": [...]}, ShareGPT\'s {"conversations": [...]} or {"prompt", "completion"}'
    raise _Bad(None, f"no known record format (keys {keys}): expected{shapes}{_nested(record)}")


def _nested(document: Any) -> str:
    """Where the records are, when a JSON object holds a list of them under a key (``{"data": [...]}``)."""
    for key, value in document.items() if isinstance(document, dict) else ():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            if any(set(keys) <= set(value[0]) for keys, _ in SHAPES.values()):
                return f"; the list under {key!r} holds records: make each one a record of the file"
    return ""


def _normalise(format: str, record: Any, why: str) -> list[Turn]:
    """The turns of a record of ``format``, with their roles in the chat template's names."""
    if not isinstance(record, dict):
        raise _Bad(None, f"must be a JSON object, not {_type(record)}")
    keys, shape = SHAPES[format]
    for key in keys:
        if record.get(key) is None:
            raise _Bad(key, f"missing: every record must be {shape} {why}")
    if format == "messages":
        return _turns(record["messages"], "messages", ROLES, "system, user or assistant")
    if format == "sharegpt":
        turns = _turns(record["conversations"], "conversations", SPEAKERS, "human, gpt or system; or user, assistant")
        system = record.get("system")  # a system prompt beside the turns, as LLaMA-Factory's ShareGPT files have
        return ([("system", system, "system", "system", True)] if system is not None else []) + turns
    turns = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = record[key]
        if isinstance(value, str):
            turns.append((role, value, key, key, True))
        elif isinstance(value, list):
            part = _turns(value, key, ROLES, "system, user or assistant")
            # A conversational prompt is context: its assistant turns are not trained on, only the
            # completion is (TRL's completion-only loss for prompt-completion data).
            turns += [(*turn[:4], False) for turn in part] if key == "prompt" else part
        else:
            raise _Bad(key, "must be a string or a non-empty list of {role, content}")
    return turns


def _turns(value: Any, key: str, roles: dict[str, str], names: str) -> list[Turn]:
    """Turns of ``{role, content}`` (ShareGPT: ``{from, value}``, or ``{role, content}`` too)."""
    sharegpt = roles is SPEAKERS
    if not isinstance(value, list) or not value:
        raise _Bad(key, "must be a non-empty list of " + ("{from, value}" if sharegpt else "{role, content}"))
    turns = []
    for i, message in enumerate(value):
        field = f"{key}[{i}]"
        if not isinstance(message, dict):
            raise _Bad(field, "must be an object with " + ("from and value" if sharegpt else "role and content"))
        role_key, content_key = ("from", "value") if sharegpt and "role" not in message else ("role", "content")
        raw = message.get(role_key)
        role = roles.get(raw) if isinstance(raw, str) else None
        if role is None:
            raise _Bad(f"{field}.{role_key}", f"unknown role {raw!r} ({names})")
        turns.append((role, message.get(content_key), f"{field}.{role_key}", f"{field}.{content_key}", True))
    return turns


def _check_turns(turns: list[Turn], key: str) -> list[Message]:
    """Non-empty text; an optional system turn, then user and assistant in turn, ending with the assistant.

    A turn marked as not trained (an assistant turn of a conversational ``prompt``) becomes a message with
    ``"train": False``, which :meth:`meowdread.chat_format.ChatFormat.encode` leaves out of the labels."""
    for i, (role, content, role_field, content_field, _) in enumerate(turns):
        if not isinstance(content, str) or not content.strip():
            raise _Bad(content_field, "must be a non-empty string")
        expected = ("system", "user") if i == 0 else ("user",) if turns[i - 1][0] != "user" else ("assistant",)
        if role not in expected:
            raise _Bad(role_field, f"{role!r} out of order: expected {' or '.join(expected)}")
    if not any(turn[0] == "assistant" for turn in turns):
        raise _Bad(key, "no assistant turn: nothing to train on")
    if turns[-1][0] != "assistant":
        raise _Bad(turns[-1][2], "the conversation must end with an assistant turn")
    messages = [{"role": role, "content": content} for role, content, *_ in turns]
    for message, (role, *_, trained) in zip(messages, turns, strict=True):
        if role == "assistant" and not trained:
            message["train"] = False
    return messages
