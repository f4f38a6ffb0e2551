"""The shipped corpus and prompts: size, shape, variety, and prompts held out of training."""

import itertools
import re

from meowdread.formats import read_corpus, read_prompts

from .conftest import CORPUS, PROMPTS

SPRINT1_PROMPTS = [
    "What is the meaning of the nap?",
    "Explain the empty food bowl.",
    "Why do I chase the laser I can never catch?",
    "Is the box my friend, or my prison?",
    "To meow, or not to meow?",
    "Tell me about the greebles.",
    "If I fits, I sits. But what if... the void fits?",
    "Describe the human's purpose.",
]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def shingles(text: str, n: int = 8) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def test_corpus_size_and_shape():
    conversations = read_corpus(CORPUS)
    assert len(conversations) >= 300
    multi_turn = sum(sum(m["role"] == "assistant" for m in c) > 1 for c in conversations)
    assert multi_turn >= 0.10 * len(conversations)
    assert any(c[0]["role"] == "system" for c in conversations)


def test_no_two_assistant_replies_are_near_duplicates():
    replies = [m["content"] for c in read_corpus(CORPUS) for m in c if m["role"] == "assistant"]
    runs = [shingles(r) for r in replies]
    bags = [set(words(r)) for r in replies]
    for i, j in itertools.combinations(range(len(replies)), 2):
        assert not runs[i] & runs[j], f"replies {i} and {j} share an 8-word run: {sorted(runs[i] & runs[j])[0]}"
        if min(len(bags[i]), len(bags[j])) >= 10:
            jaccard = len(bags[i] & bags[j]) / len(bags[i] | bags[j])
            assert jaccard < 0.5, f"replies {i} and {j} use mostly the same words"


def test_prompts_include_sprint1s_and_are_held_out_of_the_corpus():
    prompts = read_prompts(PROMPTS)
    assert prompts[:8] == SPRINT1_PROMPTS
    assert len(prompts) >= 8 + 16 and len(set(prompts)) == len(prompts)
    user_turns = {" ".join(words(m["content"])) for c in read_corpus(CORPUS) for m in c if m["role"] == "user"}
    for prompt in prompts:
        assert " ".join(words(prompt)) not in user_turns, prompt
