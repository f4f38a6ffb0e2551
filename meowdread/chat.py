"""``meowdread chat``: talk with the tuned model in the terminal; answers stream as they are generated.

    meowdread chat --config configs/tiny.yaml --ckpt_path last
    meowdread chat --config configs/tiny.yaml --model.adapter lightning_logs/version_0/adapter --system "You are a cat."
    printf 'Why do I sit?\\nAnd why here?\\n' | meowdread chat --config configs/tiny.yaml --ckpt_path last --jsonl

The model is built as ``fit`` builds it, from the same config, and answers through the one sampler,
:func:`meowdread.generation.generate`, with ``model.sampling`` (``--model.sampling.do_sample false`` for
greedy decoding). Each turn sends the whole conversation. When it no longer fits the model's context with
room for ``max_new_tokens``, the oldest exchanges are dropped, and a notice says so. ``/reset`` starts a new
conversation; ``/exit``, Ctrl-D or Ctrl-C at the prompt ends; Ctrl-C during an answer drops that answer.
When stdin is not a terminal there are no prompts, and stdout holds the answers alone, each ended by a
newline; notices go to stderr. An answer can hold newlines itself: for a script, ``--jsonl`` writes one JSON
object a line per message read, ``{"message": ..., "answer": ...}``, with ``"answer": null`` and an ``"error"``
for a message that was not sent.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TextIO

from jsonargparse import ActionYesNo
from transformers.generation.streamers import BaseStreamer

from meowdread.chat_format import ChatFormat
from meowdread.generation import Message, SamplingSettings, decode_answer, generate

log = logging.getLogger(__name__)


class StreamWriter(BaseStreamer):
    """Writes an answer to ``out`` as its tokens come; what it writes is exactly what :func:`generate` returns
    (:func:`meowdread.generation.decode_answer`). One per answer.

    The answer so far is decoded whole at every token, so that a character split over several tokens is written
    once complete, never as U+FFFD. Whitespace at the end is held back until more text follows it."""

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.prompt_skipped = False  # generate puts the prompt's ids first
        self.written = 0  # characters of the answer written so far

    def put(self, value) -> None:
        if not self.prompt_skipped:
            self.prompt_skipped = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._write()

    def end(self) -> None:
        self._write()

    def _write(self) -> None:
        text = decode_answer(self.tokenizer, self.ids)
        self.out.write(text[self.written :])
        self.out.flush()
        self.written = max(self.written, len(text))


def prompt_length(tokenizer, messages: list[Message]) -> int:
    """Tokens of the prompt :func:`generate` builds from ``messages``."""
    return len(ChatFormat.of(tokenizer).prompt_ids(messages))


def fit_to_context(tokenizer, system: list[Message], turns: list[Message], budget: int) -> tuple[list[Message], int]:
    """Drop the oldest user/assistant exchanges of ``turns`` (which end with a user message) until the prompt,
    system message included, has at most ``budget`` tokens. Returns the turns kept and the exchanges dropped;
    the last user message is always kept, so the caller checks whether it fits alone."""
    dropped = 0
    while len(turns) > 1 and prompt_length(tokenizer, system + turns) > budget:
        turns, dropped = turns[2:], dropped + 1
    return turns, dropped


def chat(
    model,
    tokenizer,
    settings: SamplingSettings,
    max_length: int,
    system: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    jsonl: bool = False,
) -> None:
    """Read user messages from ``stdin`` one a line and stream the answers to ``stdout`` until ``/exit`` or
    end of input. ``max_length`` is the model's context in tokens (prompt and answer). With ``jsonl``, each
    message gets one line of JSON instead (see the module's docstring), written when the answer is complete."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    budget = max_length - settings.max_new_tokens
    if budget <= 0:
        raise ValueError(
            f"model.sampling.max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in the "
            f"model's context of {max_length} tokens"
        )
    interactive = stdin.isatty() and not jsonl
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    head = [{"role": "system", "content": system}] if system else []
    turns: list[Message] = []
    while True:
        line = _read_line(stdin, interactive)
        if line is None or line == "/exit":
            break
        if not line:
            continue
        if line == "/reset":
            turns = []
            log.info("history cleared")
            continue
        if line.startswith("/") and " " not in line:
            log.warning("unknown command %s: /reset clears the history, /exit ends", line)
            continue
        kept, dropped = fit_to_context(tokenizer, head, turns + [{"role": "user", "content": line}], budget)
        length = prompt_length(tokenizer, head + kept)
        if length > budget:
            error = (
                f"message not sent: it makes a prompt of {length} tokens, and the model's context of {max_length} "
                f"leaves room for {budget} with max_new_tokens={settings.max_new_tokens}"
            )
            log.warning("%s", error)
            if jsonl:
                _write_json(stdout, {"message": line, "answer": None, "error": error})
            continue
        if dropped:
            log.info("context full: dropped the %d oldest exchange(s) of the conversation", dropped)
        if interactive:
            stdout.write("cat> ")
        streamer = None if jsonl else StreamWriter(tokenizer, stdout)
        try:
            answer = generate(model, tokenizer, [head + kept], settings, streamer=streamer)[0]
        except KeyboardInterrupt:
            stdout.write("\n")
            log.info("interrupted: the answer is dropped")
            turns = kept[:-1]
            continue
        if jsonl:
            _write_json(stdout, {"message": line, "answer": answer})
        else:
            stdout.write("\n")
            stdout.flush()
        turns = kept + [{"role": "assistant", "content": answer}]


def _write_json(out: TextIO, record: dict) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")  # a newline inside the answer is escaped: \\n
    out.flush()


def _read_line(stdin: TextIO, interactive: bool) -> str | None:
    """The next message, stripped; None at end of input (or Ctrl-C at the prompt)."""
    if interactive:
        try:
            return input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()  # the shell's prompt then starts on a line of its own
            return None
    line = stdin.readline()
    return line.strip() if line else None


def add_arguments(parser) -> None:
    parser.add_argument("--system", type=str | None, default=None, help="a system message opening every conversation")
    parser.add_argument(
        "--jsonl",
        action=ActionYesNo,
        default=False,
        help='for scripts: one line of JSON per message, {"message": ..., "answer": ...}, and no prompts',
    )


def run(cli) -> None:
    """``meowdread chat``, given the parsed :class:`meowdread.cli.ToolCLI`."""
    module = cli.load_module()
    log.info("chat with %s: /reset clears the history, /exit or Ctrl-D ends", module.hparams.pretrained)
    # As in predict: generation under the trainer's precision (autocast for bf16-mixed).
    with cli.trainer.precision_plugin.forward_context():
        chat(
            module.model,
            module.tokenizer,
            module.sampling,
            max_length=module.model.config.max_position_embeddings,
            system=cli.config.system,
            jsonl=cli.config.jsonl,
        )
