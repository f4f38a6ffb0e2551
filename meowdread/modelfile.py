"""An Ollama ``Modelfile`` for an exported GGUF: ``FROM`` the file, the chat template as a Go ``TEMPLATE``, the
template's default system prompt as ``SYSTEM``, one ``PARAMETER stop`` for every id the sampler stops on, and
the temperature and top-p of ``model.sampling``.

    ollama create meowcat -f exported/phi3/Modelfile && ollama run meowcat

The Go template is read off the model's own Jinja chat template, for no model family in particular: a
conversation of sentinel messages is rendered, and the text around each message, split at the turn-end token
(:class:`meowdread.chat_format.ChatFormat`), gives that role's prefix and suffix. The result is checked by
rendering conversations both ways; a template that this cannot reproduce (one that writes no turn end after
every message, say) gets no ``TEMPLATE`` line and a warning, and Ollama falls back to its own guess from the
GGUF's ``tokenizer.chat_template``.
"""

from __future__ import annotations

import json
import logging
import re

log = logging.getLogger(__name__)

_MARK = "meowdreadmodelfilemark{}"  # a plain word no tokenizer treats specially, numbered per message


def modelfile(tokenizer, gguf_name: str = "model.gguf", sampling=None) -> str:
    """The text of a ``Modelfile`` that runs ``./gguf_name`` with ``tokenizer``'s chat format, and samples as
    ``sampling`` (a :class:`meowdread.generation.SamplingSettings`) says, if given."""
    from meowdread.chat_format import ChatFormat

    chat = ChatFormat.of(tokenizer)
    lines = [f"FROM ./{gguf_name}"]
    template = ollama_template(tokenizer, chat.turn_end, chat.default_system)
    if template is None:
        log.warning("Modelfile: the chat template could not be written as a Go template; Ollama will guess it")
    else:
        lines.append(f'TEMPLATE """{template}"""')
    if chat.default_system:
        lines.append(f'SYSTEM """{chat.default_system}"""')
    lines += [f"PARAMETER stop {json.dumps(token)}" for token in tokenizer.convert_ids_to_tokens(list(chat.stop_ids))]
    if sampling is not None:  # as predict and chat sample; temperature 0 is greedy in Ollama
        lines.append(f"PARAMETER temperature {sampling.temperature if sampling.do_sample else 0}")
        lines += [f"PARAMETER top_p {sampling.top_p}"] if sampling.do_sample else []
    return "\n".join(lines) + "\n"


def ollama_template(tokenizer, turn_end: str, default_system: str | None = None) -> str | None:
    """``tokenizer``'s chat template as an Ollama Go template over ``.Messages``, or None if it cannot be."""
    roles = ["system", "user", "assistant", "user"]
    try:
        parts = _parts(tokenizer, roles, turn_end)
    except Exception:  # noqa: BLE001 - a template that refuses a system message raises whatever it likes
        roles = roles[1:]
        parts = _parts(tokenizer, roles, turn_end)
    if parts is None:
        return None
    preamble, wrap, generation = parts
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{prefix}{{{{ .Content }}}}{suffix}'
        for i, (role, (prefix, suffix)) in enumerate(wrap.items())
    )
    template = f"{preamble}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{generation}"
    # Check it on conversations other than the one it was read from, as Ollama will fill it in.
    checks = [["user"], ["user", "assistant", "user"], roles]
    for check in checks:
        messages = [{"role": r, "content": f"words {i} and more"} for i, r in enumerate(check)]
        if default_system and messages[0]["role"] != "system" and "system" in wrap:
            messages.insert(0, {"role": "system", "content": default_system})  # Ollama's SYSTEM line
        ours = preamble + "".join(wrap[m["role"]][0] + m["content"] + wrap[m["role"]][1] for m in messages)
        if ours + generation != _render(tokenizer, messages):
            return None
    return template


def _render(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _parts(tokenizer, roles: list[str], turn_end: str):
    """``(preamble, {role: (prefix, suffix)}, generation prompt)`` read from one rendered conversation."""
    marks = [_MARK.format(i) for i in range(len(roles))]
    text = _render(tokenizer, [{"role": r, "content": m} for r, m in zip(roles, marks, strict=True)])
    pieces = re.split("|".join(marks), text)  # the text before, between and after the messages
    if len(pieces) != len(roles) + 1:
        return None
    ends = [re.match(rf"(.*?{re.escape(turn_end)}\s*)(.*)", piece, re.DOTALL) for piece in pieces[1:]]
    if not all(ends):  # a message with no turn end after it
        return None
    bos = tokenizer.bos_token or ""
    preamble = bos if bos and pieces[0].startswith(bos) else ""
    prefixes = [pieces[0][len(preamble) :]] + [end.group(2) for end in ends[:-1]]
    wrap: dict[str, tuple[str, str]] = {}
    for role, prefix, end in zip(roles, prefixes, ends, strict=True):
        if wrap.setdefault(role, (prefix, end.group(1))) != (prefix, end.group(1)):
            return None  # the same role wrapped two ways (a template that numbers turns, say)
    return preamble, wrap, ends[-1].group(2)
