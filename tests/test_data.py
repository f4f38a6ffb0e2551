"""Unit tests of the data path: chat template, label masks from turn boundaries, collation, sampler."""

import json

import pytest
import torch

from meowdread.chat_format import ChatFormat
from meowdread.data import (
    IGNORE_INDEX,
    LengthGroupedSampler,
    ResumableDataLoader,
    collate,
    format_trained_tokens,
)

from .conftest import write_jsonl

CONVERSATION = [
    {"role": "system", "content": "You are Mittens, who has read Sartre."},
    {"role": "user", "content": "Why do I sit?"},
    {"role": "assistant", "content": "I fits, therefore I sits."},
    {"role": "user", "content": "But why?"},
    {"role": "assistant", "content": "Teh box does not answer. Teh box is teh void."},
]


def trained_runs(tokenizer, example):
    """The decoded text of each contiguous run of trained tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_template_is_phi3s(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert text == (
        "<|system|>\nYou are Mittens, who has read Sartre.<|end|>\n<|user|>\nWhy do I sit?<|end|>\n"
        "<|assistant|>\nI fits, therefore I sits.<|end|>\n<|endoftext|>"
    )
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"  # the trap of PITFALLS 3


def test_multi_turn_masking_is_exact(tokenizer):
    example = ChatFormat.of(tokenizer).encode(CONVERSATION)
    # Exactly each assistant reply with its closing <|end|>: no header, no newline, no user or system text,
    # and not the final <|endoftext|> (which is also the pad token).
    assert trained_runs(tokenizer, example) == [
        "I fits, therefore I sits.<|end|>",
        "Teh box does not answer. Teh box is teh void.<|end|>",
    ]


def test_end_token_is_trained_although_pad_is_an_end_token(tokenizer):
    example = ChatFormat.of(tokenizer).encode(CONVERSATION)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    eot = tokenizer.pad_token_id
    ids, labels = example["input_ids"], example["labels"]
    assert [label for label in labels if label == end] == [end, end]  # both assistant <|end|>s
    assert ids.count(end) == 5  # one per turn; the other three are not trained
    assert ids[-1] == eot and labels[-1] == IGNORE_INDEX


def test_debug_view_marks_trained_tokens(tokenizer):
    example = ChatFormat.of(tokenizer).encode(CONVERSATION[1:3])
    view = format_trained_tokens(tokenizer, example["input_ids"], example["labels"])
    assert view == "<|user|>\nWhy do I sit?<|end|>\n<|assistant|>\n⟦I fits, therefore I sits.<|end|>⟧\n<|endoftext|>"


def test_collate_pads_right_and_masks_padding(tokenizer):
    short = ChatFormat.of(tokenizer).encode(CONVERSATION[1:3])
    long = ChatFormat.of(tokenizer).encode(CONVERSATION)
    batch = collate([short, long], pad_id=tokenizer.pad_token_id)
    n = len(short["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(long["input_ids"]))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert batch["input_ids"][1].tolist() == long["input_ids"]
    assert batch["labels"][0, :n].tolist() == short["labels"]


def test_length_grouped_sampler_is_a_seeded_permutation_with_grouped_lengths():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 400, (300,), generator=gen).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(300))
    assert list(sampler) == epoch0  # same seed and epoch: same order (resumption needs it)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0

    def padded(order):
        batches = [order[i : i + 8] for i in range(0, len(order), 8)]
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    shuffled = torch.randperm(300, generator=gen).tolist()
    assert padded(epoch0) < 0.8 * padded(shuffled)


def test_a_resumed_loader_goes_on_at_the_next_batch_of_the_same_epoch():
    examples = list(range(50))
    lengths = torch.randint(1, 100, (50,), generator=torch.Generator().manual_seed(0)).tolist()

    def loader(batch_size=4):
        return ResumableDataLoader(examples, batch_size=batch_size, sampler=LengthGroupedSampler(lengths, batch_size))

    first = loader()
    first.sampler.set_epoch(2)
    batches = iter(first)
    seen = [next(batches).tolist() for _ in range(5)]
    state = first.state_dict()  # what a checkpoint after the fifth step holds
    rest = [b.tolist() for b in batches]

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # Lightning sets the epoch after building the loader, before iterating
    assert state["batches"] == 5 and [b.tolist() for b in resumed] == rest
    assert len(list(resumed)) == 13  # the skip applies to the resumed epoch only
    stale = loader()
    stale.load_state_dict(state)
    stale.sampler.set_epoch(3)  # the checkpoint's epoch was over: the next one starts at its beginning
    assert len(list(stale)) == 13 and len(seen) == 5
    with pytest.raises(ValueError, match="50 training examples in batches of 4, this run 50 in batches of 8"):
        loader(batch_size=8).load_state_dict(state)


def test_length_grouped_sampler_gives_each_ddp_rank_its_share_of_the_same_batches():
    lengths = torch.randint(20, 400, (301,), generator=torch.Generator().manual_seed(0)).tolist()
    single = list(LengthGroupedSampler(lengths, batch_size=8, seed=3))
    ranks = [list(LengthGroupedSampler(lengths, batch_size=4, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 151  # equal shares: no rank waits for a batch the other lacks
    assert sorted(ranks[0] + ranks[1]) == sorted([*range(301), single[0]])  # padded with one repeat
    # Step k of the two ranks together trains on the examples of step k of one process at batch 8, so the
    # grouping by length survives and the run is the one-process run with its work split.
    for k in range(301 // 8):
        assert sorted(ranks[0][4 * k : 4 * k + 4] + ranks[1][4 * k : 4 * k + 4]) == sorted(single[8 * k : 8 * k + 8])
    # fewer examples than ranks: every rank still gets one, or DDP would wait forever for the empty one
    tiny = [LengthGroupedSampler([5], batch_size=1, num_replicas=3, rank=r) for r in range(3)]
    assert [list(sampler) for sampler in tiny] == [[0], [0], [0]]


def test_overlong_examples_are_dropped_or_truncated_with_a_count(tmp_path, caplog, embedded_cache):
    from meowdread.data import CatCorpusDataModule

    long_reply = "purr " * 200
    lines = [
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})
        for i in range(19)
    ]
    lines.append(
        json.dumps({"messages": [{"role": "user", "content": "long"}, {"role": "assistant", "content": long_reply}]})
    )
    corpus = write_jsonl(tmp_path / "c.jsonl", lines)
    sizes = {}
    for mode in ("drop", "truncate"):
        dm = CatCorpusDataModule(corpus=str(corpus), max_length=64, overlong=mode, val_fraction=0.1, seed=0)
        with caplog.at_level("WARNING"):
            dm.setup("fit")
        sizes[mode] = len(dm.train_set) + len(dm.val_set)
        assert "1 of " in caplog.text and "longer than max_length=64" in caplog.text
        assert max(len(e["input_ids"]) for e in dm.train_set + dm.val_set) <= 64
        caplog.clear()
    assert sizes == {"drop": 19, "truncate": 20}


def test_the_train_val_split_is_fixed_by_the_seed(embedded_cache):
    from meowdread.data import CatCorpusDataModule

    def val_ids(seed):
        dm = CatCorpusDataModule(seed=seed, val_fraction=0.1)
        dm.setup("fit")
        return sorted(tuple(e["input_ids"]) for e in dm.val_set), len(dm.train_set) + len(dm.val_set)

    (same, n), (again, _), (other, _) = val_ids(1), val_ids(1), val_ids(2)
    assert same == again and same != other
    assert len(same) == 33 and n == 330  # 10% held out; nothing dropped at the default max_length=1024


def test_prepare_data_builds_the_embedded_model(tmp_path, monkeypatch):
    """Lightning calls prepare_data on one process per machine first, so DDP ranks do not all build it."""
    from meowdread.data import CatCorpusDataModule
    from meowdread.embedded import cache_root

    monkeypatch.setenv("MEOWDREAD_CACHE", str(tmp_path))
    CatCorpusDataModule(pretrained="embedded:tiny-phi3").prepare_data()
    assert [p.name.split("-")[:2] for p in cache_root().iterdir()] == [["tiny", "phi3"]]


def test_train_replies_are_the_training_splits_in_fit_and_in_predict(tmp_path, embedded_cache):
    """Memorization is checked against what fit trained on, also in predict, where setup reads no corpus."""
    from meowdread.data import CatCorpusDataModule

    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"q{i}"},
                    {"role": "assistant", "content": f"reply {i}"},
                    {"role": "user", "content": "and?"},
                    {"role": "assistant", "content": f"second reply {i}"},
                ]
            }
        )
        for i in range(10)
    ]
    corpus = write_jsonl(tmp_path / "c.jsonl", lines)
    fit = CatCorpusDataModule(corpus=str(corpus), val_fraction=0.2, seed=3)
    fit.setup("fit")
    predict = CatCorpusDataModule(corpus=str(corpus), val_fraction=0.2, seed=3)
    predict.setup("predict")
    assert predict.train_replies == fit.train_replies
    assert len(fit.train_replies) == 2 * 8  # every assistant turn of the 8 training conversations
    val_replies = {fit.tokenizer.decode(e["input_ids"]) for e in fit.val_set}
    assert not any(reply in text for reply in fit.train_replies for text in val_replies)
