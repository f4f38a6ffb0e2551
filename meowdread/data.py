"""Corpus → token ids, labels and batches.

A conversation is rendered with the tokenizer's own chat template, tokenized with character offsets, and
labelled from *turn boundaries* (:class:`meowdread.chat_format.ChatFormat`): every assistant turn, its
closing turn-end token included, is trained on; system and user turns, the role headers and padding are
not. The pad token of many chat models is an end token, so comparing ids would mask the ends too.

    meowdread fit --config configs/tiny.yaml --data.show_examples 1   # see which tokens are trained on
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from meowdread.chat_format import IGNORE_INDEX, ChatFormat
from meowdread.embedded import TINY_PHI3, resolve_pretrained
from meowdread.formats import CorpusError, Format, Message, read_corpus, read_prompts
from meowdread.packing import collate_packed

log = logging.getLogger(__name__)


def load_tokenizer(pretrained: str):
    """The tokenizer of ``pretrained`` (a hub id, a directory or ``embedded:NAME``), no remote code.

    A tokenizer without a pad token (some GGUF-converted and Llama ones) pads with its turn end: batched
    generation needs one, and labels never depend on it (see :mod:`meowdread.chat_format`).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(pretrained), trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = ChatFormat.of(tokenizer).turn_end
    return tokenizer


def format_trained_tokens(tokenizer, input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """Debug view: the example's text with trained tokens inside ⟦…⟧ (nanochat's idea)."""
    out, trained = [], False
    for token, label in zip(input_ids, labels, strict=True):
        now = label != IGNORE_INDEX
        if now != trained:
            out.append("⟦" if now else "⟧")
            trained = now
        out.append(tokenizer.decode([token]))
    return "".join(out) + ("⟧" if trained else "")


class LengthGroupedSampler(DistributedSampler):
    """Shuffles, then sorts by length inside windows of ``batch_size * num_replicas * group`` examples.

    Consecutive batches of ``batch_size * num_replicas`` indices have similar lengths, so right padding
    wastes little, while the order still changes every epoch (``set_epoch``, which Lightning calls). The same
    seed and epoch give the same order, which deterministic resumption needs. The one short batch, if any,
    comes last, so it does not shift the batch boundaries of those after it.

    Under DDP (``num_replicas`` > 1), every rank computes the same order and takes every ``num_replicas``-th
    index of it: each optimizer step's examples are those of a single process with ``batch_size *
    num_replicas``, and each rank gets the same number (the order is padded with its first examples, as
    ``DistributedSampler`` pads). Being a ``DistributedSampler``, it is used as it is by Lightning, whose own
    wrapper would shuffle the order again and undo the grouping.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        group: int = 16,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths, self.batch_size, self.group = list(lengths), batch_size, group

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed * 100_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        step = self.batch_size * self.num_replicas  # the examples of one step, over all ranks
        window = step * self.group
        batches = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: -self.lengths[i])
            batches += [chunk[b : b + step] for b in range(0, len(chunk), step)]
        rng.shuffle(batches)
        batches.sort(key=lambda batch: len(batch) < step)  # stable: the short one goes last, the rest stay put
        indices = [i for batch in batches for i in batch]
        indices = (indices * math.ceil(self.total_size / len(indices)))[: self.total_size]
        return iter(indices[self.rank : self.total_size : self.num_replicas])


class ResumableDataLoader(DataLoader):
    """A DataLoader that knows its place in the epoch, so a resumed run goes on at the very next batch instead
    of replaying the epoch from its start.

    The state is the sampler's epoch and how many batches of it were handed out. After ``load_state_dict``,
    the next iteration of that same epoch skips as many batches; this gives the uninterrupted run's batches
    exactly because the sampler's order is a function of its seed and epoch (``LengthGroupedSampler``).
    It draws no number from the global torch RNG when iterated (it has its own ``generator``), so a resumed
    run's dropout masks are the uninterrupted run's too. ``CatCorpusDataModule`` saves and restores the state
    with the checkpoint.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        self._epoch, self._served, self._resume = 0, 0, None

    def __iter__(self) -> Iterator[Any]:
        # A generator: this body runs at the first next(), after Lightning's set_epoch.
        epoch = getattr(self.sampler, "epoch", 0)
        skip = self._resume["batches"] if self._resume and self._resume["epoch"] == epoch else 0
        self._epoch, self._served, self._resume = epoch, skip, None
        batches = super().__iter__()
        for _ in range(skip):
            next(batches)
        for batch in batches:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._served, **self._shape()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self._shape() != {key: state[key] for key in self._shape()}:
            raise ValueError(
                f"data: the checkpoint's epoch has {state['examples']} training examples in batches of "
                f"{state['batch_size']}, this run {self._shape()['examples']} in batches of {self.batch_size}; "
                "resume with the checkpoint's data.corpus, limit, max_length, val_fraction and batch_size"
            )
        self._resume = state

    def _shape(self) -> dict[str, int]:
        return {"examples": len(self.dataset), "batch_size": self.batch_size}


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids (with ``pad_id``) and labels (with -100); the attention mask marks real tokens."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _assistant_replies(conversations: list[list[Message]]) -> list[str]:
    return [m["content"] for messages in conversations for m in messages if m["role"] == "assistant"]


def collate_prompts(prompts: list[str]) -> dict[str, list[str]]:
    return {"prompts": prompts}


class CatCorpusDataModule(pl.LightningDataModule):
    """Chat-formatted corpus → length-grouped, right-padded batches; prompts file → predict batches.

    Args:
        corpus: the conversations: a JSON-lines, JSON, CSV or Parquet file, a ``datasets.save_to_disk`` folder
            or a hub dataset id ``org/name[:split]`` (see README "Data formats").
        format: the records' format: ``messages``, ``sharegpt``, ``prompt_completion``, or ``auto`` to take
            that of the first record.
        prompts: one prompt a line, for ``predict`` and the sample callback; lines starting with ``#`` are comments.
        pretrained: where the tokenizer comes from; the CLI links it to ``model.pretrained``.
        max_length: longest example in tokens, template included.
        overlong: what to do with longer examples: ``drop`` them or ``truncate`` them (counted in the log).
        val_fraction: share of conversations held out for validation (and ``test``), split with ``seed``.
        limit: use only this many conversations of the corpus, drawn with ``seed`` (all of them if None), for
            quick runs such as the CPU demo; the validation share is split from them.
        batch_size: examples per micro-batch (on each rank, under DDP).
        seed: fixes the split and the shuffling.
        num_workers: DataLoader workers.
        show_examples: print this many training examples with their trained tokens marked at setup.
        lexicons: the lexicons the sample metrics count markers of, one metric pair per file (named after it);
            see ``data/lexicons/README.md``.
        padding_free: put each batch's examples end to end in one row instead of padding them to the
            longest (:mod:`meowdread.packing`): the same examples, loss and gradients, without the pad
            tokens' work. Needs ``sdpa`` or ``eager`` attention (run per example) or a FlashAttention backend.
    """

    def __init__(
        self,
        corpus: str = "data/cat_corpus.jsonl",
        format: Format = "auto",
        prompts: str = "data/prompts.txt",
        pretrained: str = TINY_PHI3,
        max_length: int = 1024,
        overlong: Literal["drop", "truncate"] = "drop",
        val_fraction: float = 0.05,
        limit: int | None = None,
        batch_size: int = 8,
        seed: int = 42,
        num_workers: int = 0,
        show_examples: int = 0,
        lexicons: tuple[str, ...] = ("data/lexicons/cat_lingo.json", "data/lexicons/angst.json"),
        padding_free: bool = False,
    ):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction: must be between 0 and 1, got {val_fraction}")
        if limit is not None and limit < 2:
            raise ValueError(f"data.limit: must be at least 2 (a training and a validation conversation), got {limit}")
        self.save_hyperparameters()
        self.tokenizer = None
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []
        self._prompts: list[str] | None = None
        self._train_replies: list[str] | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._train_loader_state: dict | None = None

    def prepare_data(self) -> None:
        # Lightning runs this on one process per machine before the others set up: under DDP, an embedded
        # model is built once (phi3-mini-random is 7.6 GB), not by every rank at the same time.
        resolve_pretrained(self.hparams.pretrained)

    @property
    def prompts(self) -> list[str]:
        if self._prompts is None:
            self._prompts = read_prompts(self.hparams.prompts)
        return self._prompts

    @property
    def train_replies(self) -> list[str]:
        """The assistant replies of the training split, which the memorization metric checks answers against.

        Read from the corpus (split as ``fit`` splits it) when ``setup`` has not done so, as in ``predict``.
        """
        if self._train_replies is None:
            self._train_replies = _assistant_replies(self.split()["train"])
        return self._train_replies

    def read(self) -> list[list[Message]]:
        """Every conversation of the corpus, as checked ``{"role", "content"}`` messages. Override it to read
        data that :func:`meowdread.formats.read_corpus` does not."""
        return read_corpus(self.hparams.corpus, self.hparams.format)

    def split(self) -> dict[str, list[list[Message]]]:
        """``{"train": [...], "val": [...]}``: ``val_fraction`` of :meth:`read`'s conversations held out, drawn
        with ``seed``. Override it to split otherwise (by a field, a fixed validation file, ...)."""
        conversations = self.read()
        if self.hparams.limit is not None and self.hparams.limit < len(conversations):
            conversations = random.Random(self.hparams.seed).sample(conversations, self.hparams.limit)
        n_val = max(1, round(len(conversations) * self.hparams.val_fraction))
        if n_val >= len(conversations):
            raise CorpusError(
                self.hparams.corpus,
                None,
                "data.val_fraction",
                f"{len(conversations)} conversations are too few to split",
            )
        # The permutation of datasets' train_test_split(test_size=n_val, seed=seed), which this split used to
        # be: the same corpus and seed keep giving the same split.
        order = np.random.default_rng(self.hparams.seed).permutation(len(conversations))
        return {
            "train": [conversations[i] for i in order[n_val:]],
            "val": [conversations[i] for i in order[:n_val]],
        }

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.pretrained)
        if stage == "predict" or self.train_set:
            return
        split = self.split()
        self._train_replies = _assistant_replies(split["train"])
        self.train_set = self._encode(split["train"], "train")
        self.val_set = self._encode(split["val"], "val")
        for example in self.train_set[: self.hparams.show_examples]:
            print(format_trained_tokens(self.tokenizer, example["input_ids"], example["labels"]), "\n")

    def _encode(self, conversations: list[list[Message]], name: str) -> list[dict]:
        max_length, truncate = self.hparams.max_length, self.hparams.overlong == "truncate"
        chat_format = ChatFormat.of(self.tokenizer)
        examples, overlong = [], 0
        for messages in conversations:
            e = chat_format.encode(messages)
            if len(e["input_ids"]) > max_length:
                overlong += 1
                if not truncate:
                    continue
                e = {k: v[:max_length] for k, v in e.items()}
                if all(label == IGNORE_INDEX for label in e["labels"]):
                    continue
            examples.append(e)
        if overlong:
            verb = "truncated" if truncate else "dropped"
            log.warning(
                "%s: %d of %d %s examples are longer than max_length=%d and were %s",
                self.hparams.corpus,
                overlong,
                len(conversations),
                name,
                max_length,
                verb,
            )
        if not examples:
            raise CorpusError(
                self.hparams.corpus, None, "data.max_length", f"every {name} example is longer than {max_length} tokens"
            )
        return examples

    def _loader(self, examples: list[dict], sampler=None, loader_class: type[DataLoader] = DataLoader) -> DataLoader:
        if self.hparams.padding_free:
            collate_fn = collate_packed
        else:
            collate_fn = functools.partial(collate, pad_id=self.tokenizer.pad_token_id)
        return loader_class(
            examples,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        lengths = [len(e["input_ids"]) for e in self.train_set]
        # Under DDP each rank takes its share of the same length-grouped order (see LengthGroupedSampler).
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        batch_size, seed = self.hparams.batch_size, self.hparams.seed
        sampler = LengthGroupedSampler(lengths, batch_size, seed, num_replicas=world, rank=rank)
        self._train_loader = self._loader(self.train_set, sampler, ResumableDataLoader)
        if self._train_loader_state is not None:
            self._train_loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        """The training loader's place in its epoch, which Lightning keeps in each checkpoint."""
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Lightning restores this before it asks for the training loader. (It also keeps the loader's state in
        # its loop state, but on resume builds the loader before loading that, and then never loads it.)
        self._train_loader_state = state.get("train_loader")

    def val_dataloader(self) -> DataLoader:
        return self._loader(sorted(self.val_set, key=lambda e: -len(e["input_ids"])))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.prompts, batch_size=self.hparams.batch_size, collate_fn=collate_prompts)
