"""``meowdread chat`` driven through stdin: streaming, history, /reset, the context limit (offline, CPU)."""

import io
import json

import pytest
import torch

import meowdread.chat
from meowdread.chat import StreamWriter, chat, prompt_length
from meowdread.cli import main
from meowdread.generation import SamplingSettings, decode_answer, generate

from .conftest import REPO

TINY_CONFIG = str(REPO / "configs" / "tiny.yaml")


class GenerateSpy:
    """Wraps the sampler (or stands in for it) and records every call."""

    def __init__(self, answer=None):
        self.calls = []
        self.answer = answer  # None: call the real sampler; a string: answer that, streamed; an exception: raise

    def __call__(self, model, tokenizer, prompts, settings, streamer=None):
        self.calls.append({"model": model, "prompts": prompts, "settings": settings})
        if isinstance(self.answer, BaseException):
            answer, self.answer = self.answer, "fine."
            raise answer
        if self.answer is None:
            answers = generate(model, tokenizer, prompts, settings, streamer=streamer)
        else:
            answers = [self.answer]
            if streamer is not None:  # as generate streams: the prompt, then the answer's tokens
                streamer.put(torch.tensor([[0]]))
                streamer.put(torch.tensor(tokenizer(self.answer, add_special_tokens=False)["input_ids"]))
                streamer.end()
        self.calls[-1]["answer"] = answers[0]
        return answers


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_chat_streams_answers_keeps_the_history_and_resets(tokenizer, monkeypatch, capsys):
    spy = GenerateSpy()
    monkeypatch.setattr(meowdread.chat, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Why do I sit?\nAnd why here?\n/reset\n\nMeow.\n/exit\nNot read.\n"))
    # A fresh LoRA on the random tiny base: its greedy answers are long and varied, partial UTF-8 included,
    # which the streaming must get right. (The trained tiny model's greedy answers are blank lines.)
    main(
        [
            "chat",
            "--config",
            TINY_CONFIG,
            "--model.sampling.do_sample",
            "false",
            "--model.sampling.max_new_tokens",
            "24",
        ]
    )
    out = capsys.readouterr().out

    assert [c["prompts"] for c in spy.calls] == [
        [[user("Why do I sit?")]],
        [[user("Why do I sit?"), assistant(spy.calls[0]["answer"]), user("And why here?")]],
        [[user("Meow.")]],  # /reset forgot the first two turns
    ]
    answers = [c["answer"] for c in spy.calls]
    assert all(answers) and answers[0] != answers[2]
    assert out == "".join(a + "\n" for a in answers)  # streamed exactly as generate returns it, no prompt noise

    # The second answer is the sampler's answer to the whole conversation, asked directly and not streamed,
    # under the config's bf16-mixed autocast as chat runs it.
    second = spy.calls[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert generate(second["model"], tokenizer, second["prompts"], second["settings"]) == [answers[1]]


def test_a_long_conversation_drops_its_oldest_exchanges_and_says_so(tokenizer, monkeypatch, caplog):
    spy = GenerateSpy(answer="I sit because the box is there.")
    monkeypatch.setattr(meowdread.chat, "generate", spy)
    system = "You are a cat."
    settings = SamplingSettings(max_new_tokens=10)
    turns = ["Why do I sit?", "And why here?", "Why this box?", "Why now?"]
    two_exchanges = [user(turns[0]), assistant(spy.answer), user(turns[1]), assistant(spy.answer), user(turns[2])]
    # Room for the system message and two exchanges plus a question, not for three.
    max_length = prompt_length(tokenizer, [{"role": "system", "content": system}, *two_exchanges]) + 10
    long_message = "meow " * max_length
    stdin = io.StringIO("\n".join([*turns, long_message, "/unknown", "Still here?"]) + "\n")
    stdout = io.StringIO()
    with caplog.at_level("INFO", logger="meowdread"):
        chat(None, tokenizer, settings, max_length=max_length, system=system, stdin=stdin, stdout=stdout)

    sent = [c["prompts"][0] for c in spy.calls]
    assert all(s[0] == {"role": "system", "content": system} for s in sent)  # the system message stays
    assert [s[-1]["content"] for s in sent] == [*turns, "Still here?"]  # the long message is not sent
    assert [len(s) for s in sent] == [2, 4, 6, 6, 6]  # the oldest exchange goes when a third would not fit
    assert sent[3][1] == user(turns[1]) and sent[4][1] == user(turns[2])
    assert all(prompt_length(tokenizer, s) <= max_length - settings.max_new_tokens for s in sent)
    assert caplog.text.count("dropped the 1 oldest exchange") == 2
    assert "message not sent" in caplog.text and "unknown command /unknown" in caplog.text
    assert stdout.getvalue() == f"{spy.answer}\n" * 5


def test_ctrl_c_during_an_answer_drops_that_turn(tokenizer, monkeypatch):
    spy = GenerateSpy(answer=KeyboardInterrupt())
    monkeypatch.setattr(meowdread.chat, "generate", spy)
    stdin = io.StringIO("Why do I sit?\nAnd why here?\n")
    chat(None, tokenizer, SamplingSettings(), max_length=1024, stdin=stdin, stdout=io.StringIO())
    assert spy.calls[1]["prompts"] == [[user("And why here?")]]


def test_chat_help_names_its_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(s in out for s in ("usage: meowdread chat", "--ckpt_path", "--system", "/reset", "--model.sampling"))


def test_a_character_cut_over_tokens_is_streamed_whole_and_never_as_a_replacement_char(tokenizer):
    ids = tokenizer("Le chat 🐱 dort.", add_special_tokens=False)["input_ids"]
    # The byte-level tokenizer splits the emoji over tokens: cut inside it, plain decoding shows �.
    assert any("\ufffd" in tokenizer.decode(ids[:cut]) for cut in range(len(ids)))
    for cut in range(1, len(ids) + 1):
        out = io.StringIO()
        streamer = StreamWriter(tokenizer, out)
        streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, skipped
        for token in ids[:cut]:
            streamer.put(torch.tensor([token]))
            assert "\ufffd" not in out.getvalue()
        streamer.end()
        assert out.getvalue() == decode_answer(tokenizer, ids[:cut])  # what generate returns
        assert "Le chat 🐱 dort.".startswith(out.getvalue())  # an incomplete emoji at the end is left out


def test_piped_chat_with_jsonl_writes_one_json_object_per_message(monkeypatch, capsys):
    spy = GenerateSpy(answer="First line.\n\nSecond line,\nafter a blank one.")
    monkeypatch.setattr(meowdread.chat, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Why do I sit?\n/reset\nAnd why here?\n" + "meow " * 5000 + "\n"))
    main(["chat", "--config", TINY_CONFIG, "--jsonl", "--model.sampling.max_new_tokens", "4"])
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["message"] for r in records] == ["Why do I sit?", "And why here?", "meow " * 4999 + "meow"]
    assert [r["answer"] for r in records[:2]] == [spy.answer] * 2  # newlines and all, on one line each
    assert records[2]["answer"] is None and records[2]["error"].startswith("message not sent")
