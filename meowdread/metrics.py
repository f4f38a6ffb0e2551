"""What the adapter does to the answers: torchmetrics ``Metric`` s over sampled text.

- :class:`LexiconMetric`: markers of a lexicon (``data/lexicons/*.json``, see its README) in the answers: the
  share of answers with at least one marker, and markers per 100 words. Used for cat-lingo and angst.
- :class:`Coherence`: perplexity of the answers under the *base* model, the adapter disabled
  (:func:`base_nll`), so gibberish scores badly whatever its style.
- :class:`DistinctNgrams`: distinct-1 and distinct-2 (unique n-grams / all n-grams) over all the answers.
- :class:`Memorization`: the share of answers that copy a run of 8 or more words from a training reply.
- :class:`SampleMetrics` bundles them, with each answer's own scores, for the sample callback and ``predict``.

States are registered with ``add_state(..., dist_reduce_fx=...)``, so ``compute()`` is right under DDP when
every rank updates with its own answers.

Words (:func:`words`): the text is lowercased, curly apostrophes become ``'``, and a word is a run of letters
and digits, with apostrophes kept inside it ("can't", "hooman's"). Everything else separates words.

    python -m pytest tests/test_metrics.py
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from meowdread.chat_format import IGNORE_INDEX, ChatFormat
from meowdread.data import collate
from meowdread.formats import CorpusError

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def words(text: str) -> list[str]:
    """Lowercase words of ``text``: runs of letters and digits, with inner apostrophes kept."""
    return _WORD.findall(text.lower().replace("\u2019", "'").replace("\u2018", "'"))


def _marker_form(word: str) -> str:
    # "Sartre's" is Sartre and "hooman's" is hooman: a possessive (or contracted) 's does not hide a marker.
    return word[:-2] if word.endswith("'s") else word


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    return numerator.double() / denominator if denominator > 0 else torch.zeros((), dtype=torch.float64)


class Lexicon:
    """Marker words and phrases, matched on words: case-insensitive, whole words, leftmost-longest.

    At each word, the longest entry that starts there is counted once and its words are consumed, so a word
    inside a matched phrase is not counted again ("i can haz" is one marker, not also "haz"). Punctuation
    between the words of a phrase does not matter ("if I fits, I sits" is "if i fits i sits").
    """

    def __init__(self, name: str, version: int, entries: Iterable[str], description: str = ""):
        self.name, self.version, self.description = name, version, description
        self.entries: list[tuple[str, ...]] = []
        self._by_first: dict[str, list[tuple[str, ...]]] = defaultdict(list)
        for entry in entries:
            phrase = self.phrase(entry)
            if not phrase:
                raise ValueError(f"the entry {entry!r} has no words")
            if phrase in self._by_first[phrase[0]]:
                raise ValueError(f"{' '.join(phrase)!r} is listed twice")
            self.entries.append(phrase)
            self._by_first[phrase[0]].append(phrase)
        for phrases in self._by_first.values():
            phrases.sort(key=len, reverse=True)

    @staticmethod
    def phrase(entry: str) -> tuple[str, ...]:
        """The words an entry matches (``"Sartre's"`` matches as ``sartre``)."""
        return tuple(_marker_form(w) for w in words(entry))

    @classmethod
    def load(cls, path: str | Path) -> Lexicon:
        """Read ``{"version": int, "description": str, "markers": {category: [entry, ...]}}``; named by its file."""
        path = Path(path)
        if not path.is_file():
            raise CorpusError(path, None, None, "lexicon file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is no part of the JSON
        except json.JSONDecodeError as err:
            raise CorpusError(path, err.lineno, None, f"not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(data, dict):
            raise CorpusError(path, None, None, "must be an object with version, description and markers")
        version, description, markers = data.get("version"), data.get("description"), data.get("markers")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CorpusError(path, None, "version", f"must be a positive integer, got {version!r}")
        if not isinstance(description, str) or not description.strip():
            raise CorpusError(path, None, "description", "must be a non-empty string")
        if not isinstance(markers, dict) or not markers:
            raise CorpusError(path, None, "markers", "must be a non-empty object of {category: [entries]}")
        entries, seen = [], {}
        for category, items in markers.items():
            field = f"markers.{category}"
            if not isinstance(items, list) or not all(isinstance(e, str) for e in items):
                raise CorpusError(path, None, field, "must be a list of strings")
            for entry in items:
                phrase = cls.phrase(entry)
                if not phrase:
                    raise CorpusError(path, None, field, f"the entry {entry!r} has no words")
                if phrase in seen:
                    raise CorpusError(path, None, field, f"{entry!r} is already listed in {seen[phrase]}")
                seen[phrase] = field
            entries += items
        return cls(path.stem, version, entries, description)

    def find(self, answer_words: Sequence[str]) -> list[str]:
        """The markers in a list of :func:`words`, in order, as the lexicon spells them."""
        text = [_marker_form(w) for w in answer_words]
        found, i = [], 0
        while i < len(text):
            for phrase in self._by_first.get(text[i], ()):
                if tuple(text[i : i + len(phrase)]) == phrase:
                    found.append(" ".join(phrase))
                    i += len(phrase)
                    break
            else:
                i += 1
        return found


class LexiconMetric(Metric):
    """Share of answers with at least one marker of ``lexicon``, and markers per 100 words (over all answers)."""

    full_state_update = False

    def __init__(self, lexicon: Lexicon, **kwargs):
        super().__init__(**kwargs)
        self.lexicon = lexicon
        for state in ("answers", "marked", "markers", "words"):
            self.add_state(state, torch.tensor(0), dist_reduce_fx="sum")

    def update(self, answers: Sequence[str]) -> None:
        for answer in answers:
            answer_words = words(answer)
            n = len(self.lexicon.find(answer_words))
            self.answers += 1
            self.marked += int(n > 0)
            self.markers += n
            self.words += len(answer_words)

    def compute(self) -> dict[str, Tensor]:
        return {"share": _ratio(self.marked, self.answers), "per_100_words": 100 * _ratio(self.markers, self.words)}


class Coherence(Metric):
    """Perplexity, ``exp(summed NLL / tokens)`` over all answers' tokens; update it with :func:`base_nll`'s output.

    NaN when no answer has a token.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, nll: Tensor, tokens: Tensor) -> None:
        self.nll += nll.sum().to(self.nll)
        self.tokens += tokens.sum().to(self.tokens)

    def compute(self) -> Tensor:
        if self.tokens == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return torch.exp(self.nll / self.tokens)


@torch.inference_mode()
def base_nll(
    model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 8
) -> tuple[Tensor, Tensor]:
    """Summed negative log-likelihood of each answer's tokens under the base model, and how many tokens.

    ``model`` is the peft model: its adapter is disabled with peft's ``disable_adapter()``, so the base is
    the very same weights (no second copy). Each answer is scored as the assistant's reply to its prompt in
    the chat template, exactly the tokens training would label (:meth:`ChatFormat.encode`), except the
    closing turn end: an answer cut off at ``max_new_tokens`` is not penalised for not ending.
    The model runs in eval mode, in batches of ``batch_size``; its training mode is restored. Returns CPU
    tensors; an empty answer has 0 tokens.
    """
    chat_format = ChatFormat.of(tokenizer)
    examples = []
    for prompt, answer in zip(prompts, answers, strict=True):
        e = chat_format.encode([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
        last = max(i for i, label in enumerate(e["labels"]) if label != IGNORE_INDEX)
        e["labels"][last] = IGNORE_INDEX  # the turn end
        examples.append(e)
    device = next(model.parameters()).device
    nll, tokens = torch.zeros(len(examples), dtype=torch.float64), torch.zeros(len(examples), dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            for start in range(0, len(examples), batch_size):
                batch = collate(examples[start : start + batch_size], pad_id=chat_format.pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                keep = labels != IGNORE_INDEX
                # Only labelled positions reach the fp32 log-softmax, as in QLoraModule.compute_loss.
                losses = F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="none")
                rows = keep.nonzero()[:, 0]
                part = slice(start, start + len(labels))
                nll[part] = (
                    torch.zeros(len(labels), dtype=torch.float64, device=device)
                    .index_add_(0, rows, losses.double())
                    .cpu()
                )
                tokens[part] = keep.sum(1).cpu()
    finally:
        model.train(was_training)
    return nll, tokens


def _hash(gram: Sequence[str]) -> int:
    # A stable 64-bit id (Python's hash() differs between processes), so ranks can pool their n-grams.
    return int.from_bytes(hashlib.blake2b(" ".join(gram).encode(), digest_size=8).digest(), "little", signed=True)


class DistinctNgrams(Metric):
    """distinct-n (Li et al., 2016): unique word n-grams / all n-grams, pooled over all answers, for each n.

    N-grams do not cross from one answer into the next. 0 when there is no n-gram.
    """

    full_state_update = False

    def __init__(self, orders: Sequence[int] = (1, 2), **kwargs):
        super().__init__(**kwargs)
        self.orders = tuple(orders)
        for n in self.orders:
            self.add_state(f"grams_{n}", [], dist_reduce_fx="cat")  # 64-bit hashes of the n-grams

    def update(self, answers: Sequence[str]) -> None:
        tokenized = [words(a) for a in answers]
        for n in self.orders:
            grams = [_hash(w[i : i + n]) for w in tokenized for i in range(len(w) - n + 1)]
            getattr(self, f"grams_{n}").append(torch.tensor(grams, dtype=torch.long))

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for n in self.orders:
            state = getattr(self, f"grams_{n}")
            grams = dim_zero_cat(state) if len(state) else torch.zeros(0, dtype=torch.long)
            out[f"distinct_{n}"] = _ratio(torch.tensor(grams.unique().numel()), torch.tensor(grams.numel()))
        return out


class ReplyIndex:
    """Every run of ``n`` words of the training replies, to find the answers that copy one.

    Built once (one dict entry per position), so checking an answer costs one lookup per word.
    """

    def __init__(self, replies: Iterable[str], n: int = 8):
        self.n = n
        self.replies = [words(r) for r in replies]
        self._runs: dict[tuple[str, ...], list[tuple[int, int]]] = defaultdict(list)
        for r, reply in enumerate(self.replies):
            for p in range(len(reply) - n + 1):
                self._runs[tuple(reply[p : p + n])].append((r, p))

    def longest_copy(self, answer_words: Sequence[str]) -> int:
        """Length of the longest run of words shared with one training reply if it is ``n`` or more, else 0."""
        best, n = 0, self.n
        for i in range(len(answer_words) - n + 1):
            for r, p in self._runs.get(tuple(answer_words[i : i + n]), ()):
                reply = self.replies[r]
                if i and p and answer_words[i - 1] == reply[p - 1]:
                    continue  # inside a run already measured from its start
                k = n
                while i + k < len(answer_words) and p + k < len(reply) and answer_words[i + k] == reply[p + k]:
                    k += 1
                best = max(best, k)
        return best


class Memorization(Metric):
    """Share of answers that share a run of ``index.n`` (8) or more words with a training reply."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, index: ReplyIndex, **kwargs):
        super().__init__(**kwargs)
        self.index = index
        self.add_state("answers", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("copied", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, answers: Sequence[str]) -> None:
        for answer in answers:
            self.answers += 1
            self.copied += int(self.index.longest_copy(words(answer)) > 0)

    def compute(self) -> Tensor:
        return _ratio(self.copied, self.answers)


class SampleMetrics:
    """Every sample metric over one set of answers (an epoch's samples, or one ``predict``).

    ``compute()`` gives ``{<lexicon>_share, <lexicon>_per_100_words (for each lexicon), coherence_ppl,
    distinct_1, distinct_2, memorized_share}``. Keyword arguments go to each ``Metric`` (for instance
    ``sync_on_compute=False`` when one rank scores everything).
    """

    def __init__(self, lexicons: Sequence[Lexicon], replies: Iterable[str], copy_words: int = 8, **kwargs):
        self.lexicons = {lexicon.name: LexiconMetric(lexicon, **kwargs) for lexicon in lexicons}
        self.coherence = Coherence(**kwargs)
        self.distinct = DistinctNgrams((1, 2), **kwargs)
        self.index = ReplyIndex(replies, copy_words)
        self.memorization = Memorization(self.index, **kwargs)

    @property
    def versions(self) -> dict[str, int]:
        """Each lexicon's version: numbers are comparable only between runs with the same versions."""
        return {name: metric.lexicon.version for name, metric in self.lexicons.items()}

    def metrics(self) -> list[Metric]:
        """The torchmetrics ``Metric`` s inside."""
        return [*self.lexicons.values(), self.coherence, self.distinct, self.memorization]

    def update(self, answers: Sequence[str], nll: Tensor, tokens: Tensor) -> list[dict]:
        """Add answers with their :func:`base_nll`, and return each answer's scores (see :meth:`score`)."""
        for metric in (*self.lexicons.values(), self.distinct, self.memorization):
            metric.update(answers)
        self.coherence.update(nll, tokens)
        return [self.score(a, float(s), int(t)) for a, s, t in zip(answers, nll, tokens, strict=True)]

    def score(self, answer: str, nll: float, tokens: int) -> dict:
        """One answer: its word count, the markers of each lexicon, its perplexity under the base model (None
        without tokens), and the longest run of words copied from a training reply (0 if under 8 words)."""
        answer_words = words(answer)
        return {
            "words": len(answer_words),
            "markers": {name: metric.lexicon.find(answer_words) for name, metric in self.lexicons.items()},
            "coherence_ppl": math.exp(nll / tokens) if tokens else None,
            "copied_words": self.index.longest_copy(answer_words),
        }

    def compute(self) -> dict[str, float]:
        out = {}
        for name, metric in self.lexicons.items():
            out.update({f"{name}_{key}": float(value) for key, value in metric.compute().items()})
        out["coherence_ppl"] = float(self.coherence.compute())
        out.update({key: float(value) for key, value in self.distinct.compute().items()})
        out["memorized_share"] = float(self.memorization.compute())
        return out

    def reset(self) -> None:
        for metric in self.metrics():
            metric.reset()
