"""The chat format of a model, read from its tokenizer: how a conversation becomes ids and labels, where an
assistant turn ends, and which ids a sampler stops on.

Nothing here is specific to one model family. The turn end is the special token that the tokenizer's own
chat template writes right after an assistant reply: ``<|end|>`` for Phi-3, ``<|im_end|>`` for ChatML models
(SmolLM2, Qwen2), ``<|eot_id|>`` for Llama 3, ``</s>`` for Mistral. It is labelled and trained with every
reply, and generation stops on it as well as on the end-of-text token: a model that was never taught to end
a turn talks until ``max_new_tokens`` (transformers #30628, trl #1623). Labels come from turn boundaries
(character offsets of each reply), never from comparing ids, because the pad token of many chat models *is*
an end token (Phi-3: ``<|endoftext|>``; SmolLM2: ``<|im_end|>``), and masking pads by id would mask the ends.

Special-token text inside a message (a user typing ``<|end|>``) is kept as text, in training and in sampling
alike: :meth:`ChatFormat.escape` puts a word joiner (U+2060, invisible) after its first character, so the
tokenizer cannot match it as a control token and no message can inject a turn.

    python -c "from meowdread.chat_format import ChatFormat; from meowdread.data import load_tokenizer; \\
        print(ChatFormat.of(load_tokenizer('embedded:tiny-phi3')))"
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100  # label of a token that is not trained on (F.cross_entropy's ignore_index)
WORD_JOINER = "\u2060"
Message = dict[str, str | bool]  # role, content; "train": False on an assistant turn that is context only

# Sentinels rendered through the template to read its structure; plain words no tokenizer treats specially.
_REPLY, _USER, _SYSTEM = "meowdreadreplysentinel", "meowdreadusersentinel", "meowdreadsystemsentinel"


class ChatFormatError(ValueError):
    """The tokenizer's chat template cannot be used for training (no template, or no turn end found)."""


@dataclass(frozen=True, eq=False)
class ChatFormat:
    """What meowdread needs to know about a tokenizer's chat template; build it with :meth:`of`."""

    tokenizer: Any = field(repr=False)
    turn_end: str
    """The special token that closes an assistant turn, labelled and trained with the reply."""
    turn_end_id: int
    stop_ids: tuple[int, ...]
    """Every id a sampler stops on: the turn end, then the tokenizer's end-of-text token."""
    pad_id: int
    """The tokenizer's pad id, or the turn end's when it has none (labels never depend on it)."""
    control_tokens: tuple[str, ...] = field(repr=False)
    """Special-token strings that :meth:`escape` defuses inside message text, longest first."""
    default_system: str | None
    """The system prompt the template inserts when a conversation has none (SmolLM2's does), else None.
    Training and sampling render through the same template, so both see it alike."""

    @classmethod
    def of(cls, tokenizer) -> ChatFormat:
        """The format of ``tokenizer``, read once and cached for the tokenizer's lifetime."""
        try:
            return _CACHE[tokenizer]
        except KeyError:
            pass
        except TypeError:  # not weak-referenceable: read it each time
            return cls.from_tokenizer(tokenizer)
        fmt = _CACHE[tokenizer] = cls.from_tokenizer(tokenizer)
        return fmt

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatFormat:
        if not getattr(tokenizer, "chat_template", None):
            raise ChatFormatError(
                f"model.pretrained: the tokenizer of {tokenizer.name_or_path!r} has no chat template; "
                "meowdread trains chat models (an instruct or chat checkpoint has one)"
            )
        specials = set(tokenizer.all_special_tokens)
        specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        control = tuple(sorted((t for t in specials if len(t) > 1), key=len, reverse=True))

        conversation = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _REPLY}]
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        after = text[text.index(_REPLY) + len(_REPLY) :]
        turn_end = next(
            (t for t in _leading_tokens(tokenizer, after) if t in specials),
            None,
        )
        if turn_end is None:
            raise ChatFormatError(
                f"model.pretrained: the chat template of {tokenizer.name_or_path!r} writes {after[:40]!r} after "
                "an assistant reply: no special token closes the turn, so meowdread cannot tell where a reply "
                "ends (set a chat template that closes assistant turns with an end token)"
            )
        turn_end_id = tokenizer.convert_tokens_to_ids(turn_end)
        stops = [turn_end_id]
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
            stops.append(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else turn_end_id
        return cls(
            tokenizer=tokenizer,
            turn_end=turn_end,
            turn_end_id=turn_end_id,
            stop_ids=tuple(stops),
            pad_id=pad,
            control_tokens=control,
            default_system=_default_system(tokenizer),
        )

    # ----------------------------------------------------------------- text
    def escape(self, text: str) -> str:
        """``text`` with every special-token string in it defused (a word joiner after its first character)."""
        for token in self.control_tokens:
            if token in text:
                text = text.replace(token, token[0] + WORD_JOINER + token[1:])
        return text

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages`` (contents escaped), with the assistant header if asked."""
        escaped = [{"role": m["role"], "content": self.escape(m["content"])} for m in messages]
        return self.tokenizer.apply_chat_template(escaped, tokenize=False, add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Ids of ``messages`` rendered with the generation prompt: what a sampler continues."""
        return self.tokenizer(self.render(messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]

    def encode(self, messages: Sequence[Message]) -> dict[str, list[int]]:
        """Token ids and labels for one conversation: labels copy the ids on assistant spans, else -100.

        Each assistant span runs from the first character of the reply to the end of the turn end that
        closes it, found by rendering the conversation's prefix with the generation prompt, so the template
        stays the tokenizer's own. A token is trained on if it overlaps a span. An assistant message with
        ``"train": False`` (the turns of a conversational prompt) is context, not a span.
        """
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or message.get("train", True) is False:
                continue
            start = len(self.render(messages[:i], add_generation_prompt=True))
            content = self.escape(message["content"])
            if not text.startswith(content, start):
                raise ChatFormatError(
                    "the chat template does not render a conversation's prefixes as its prefixes (it changes "
                    "earlier turns, or strips the reply's whitespace), so replies cannot be located"
                )
            end = text.find(self.turn_end, start + len(content))
            if end < 0:
                raise ChatFormatError(f"the chat template does not close this assistant turn with {self.turn_end!r}")
            spans.append((start, end + len(self.turn_end)))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [
            token if any(s < span_end and e > span_start for span_start, span_end in spans) else IGNORE_INDEX
            for token, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ]
        return {"input_ids": list(enc["input_ids"]), "labels": labels}

    def __str__(self) -> str:
        names = self.tokenizer.convert_ids_to_tokens(list(self.stop_ids))
        system = f", default system prompt {self.default_system!r}" if self.default_system else ""
        return f"turn end {self.turn_end!r}, stops on {names}, pad id {self.pad_id}{system}"


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _leading_tokens(tokenizer, text: str) -> list[str]:
    """The tokens ``text`` starts with, up to its first non-whitespace ordinary token."""
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
    specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    lead = []
    for token in tokens:
        lead.append(token)
        if token not in specials and tokenizer.convert_tokens_to_string([token]).strip():
            break
    return lead


def _default_system(tokenizer) -> str | None:
    """The system prompt the template writes when a conversation has none, if it writes one."""
    user = [{"role": "user", "content": _USER}]
    try:
        with_system = tokenizer.apply_chat_template([{"role": "system", "content": _SYSTEM}, *user], tokenize=False)
    except Exception:  # a template that refuses system turns inserts none either
        return None
    without = tokenizer.apply_chat_template(user, tokenize=False)
    head, _, tail = with_system.partition(_SYSTEM)
    if without.startswith(head) and without.endswith(tail) and len(without) > len(head) + len(tail):
        return without[len(head) : len(without) - len(tail)]
    return None
