"""The sample metrics, each pinned on handwritten answers with scores worked out by hand."""

import hashlib
import json
import math

import pytest
import torch

from meowdread.data import CorpusError
from meowdread.metrics import (
    Coherence,
    DistinctNgrams,
    Lexicon,
    LexiconMetric,
    Memorization,
    ReplyIndex,
    SampleMetrics,
    base_nll,
    words,
)

from .conftest import REPO

LEXICONS = REPO / "data" / "lexicons"
# Each shipped lexicon's version and the hash of its markers. Editing the markers without bumping the
# version fails here: numbers logged under one version must stay comparable.
PINNED = {
    "cat_lingo": (1, "51f771f4a6eafcb5"),
    "angst": (1, "f6933e4c077548ad"),
}
LOL = Lexicon("lol", 1, ["i can haz", "haz", "cheezburger", "if i fits i sits", "i fits", "sartre", "de beauvoir"])


def markers_hash(path) -> str:
    markers = json.loads(path.read_text(encoding="utf-8"))["markers"]
    return hashlib.sha256(json.dumps(markers, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- words
def test_words_are_lowercase_runs_of_letters_and_digits_with_inner_apostrophes():
    assert words("Teh HOOMAN's can’t—won't!  3 a.m., snake_case Schrödinger 'quoted'") == [
        "teh",
        "hooman's",
        "can't",
        "won't",
        "3",
        "a",
        "m",
        "snake",
        "case",
        "schrödinger",
        "quoted",
    ]
    assert words("") == [] and words(" ... !!") == []


# ----------------------------------------------------------------------------------------------- lexicons
@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("I can haz cheezburger?", ["i can haz", "cheezburger"]),  # "haz" inside the phrase is not counted again
        ("If I fits, I sits.", ["if i fits i sits"]),  # punctuation between a phrase's words does not matter
        ("I FITS. Haz; haz, HAZ", ["i fits", "haz", "haz", "haz"]),  # case; every occurrence counts
        ("I can has cheezburgers", []),  # whole words only: has is not haz, cheezburgers not cheezburger
        ("hazard", []),
        ("i can i fits", ["i fits"]),  # a phrase that does not complete does not hide what follows
        ("Sartre's bad faith", ["sartre"]),  # a possessive 's does not hide a marker
        ("Simone de Beauvoir", ["de beauvoir"]),
        ("", []),
    ],
)
def test_lexicon_matches_whole_words_leftmost_longest_without_double_counting(answer, expected):
    assert LOL.find(words(answer)) == expected


def test_lexicon_metric_share_and_markers_per_100_words():
    metric = LexiconMetric(LOL)
    # words 4, 4, 0, 2 = 10; markers 2, 0, 0, 2 = 4; answers with a marker 2 of 4
    metric.update(["I can haz cheezburger", "nothing here at all", ""])
    metric.update(["Haz! haz."])
    result = metric.compute()
    assert result["share"].item() == 0.5
    assert result["per_100_words"].item() == pytest.approx(40.0)
    metric.reset()
    metric.update([""])
    assert metric.compute()["per_100_words"].item() == 0.0 and metric.compute()["share"].item() == 0.0


@pytest.mark.parametrize("name", sorted(PINNED))
def test_a_changed_lexicon_has_a_new_version(name):
    path = LEXICONS / f"{name}.json"
    lexicon = Lexicon.load(path)
    version, digest = PINNED[name]
    assert (lexicon.version, markers_hash(path)) == (version, digest), (
        f"{path.name} changed: bump its version, say what changed in data/lexicons/README.md, and pin "
        f"({lexicon.version}, {markers_hash(path)!r}) in PINNED"
    )
    assert lexicon.name == name and lexicon.description


def test_shipped_lexicons_on_known_answers():
    cat, angst = Lexicon.load(LEXICONS / "cat_lingo.json"), Lexicon.load(LEXICONS / "angst.json")
    lolcat = words("Oh hai, smol fren! Teh void iz absurd, as Camus sed. If I fits, I sits.")
    assert cat.find(lolcat) == ["oh hai", "smol", "fren", "teh", "iz", "sed", "if i fits i sits"]
    assert angst.find(lolcat) == ["void", "absurd", "camus"]
    assistant = words("As an AI language model, I can explain that cats sleep a lot because they conserve energy.")
    assert cat.find(assistant) == [] and angst.find(assistant) == []
    assert angst.find(words("Simone de Beauvoir read Sartre's Being and Nothingness")) == [
        "simone de beauvoir",
        "sartre",
        "being and nothingness",
    ]


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        ('{"version": 1,\n "description": "x",\n "markers": {"a": ["meow",]}}', None, ":3: not valid JSON"),
        ('{"description": "x", "markers": {"a": ["meow"]}}', "version", "must be a positive integer"),
        ('{"version": 1, "description": "", "markers": {"a": ["meow"]}}', "description", "non-empty"),
        ('{"version": 1, "description": "x", "markers": {"a": "meow"}}', "markers.a", "list of strings"),
        ('{"version": 1, "description": "x", "markers": {"a": ["meow", "..."]}}', "markers.a", "has no words"),
        (
            '{"version": 1, "description": "x", "markers": {"a": ["hooman"], "b": ["Hooman\'s"]}}',
            "markers.b",
            "already listed in markers.a",
        ),
    ],
)
def test_a_bad_lexicon_is_one_error_naming_file_and_field(tmp_path, text, field, problem):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CorpusError) as err:
        Lexicon.load(path)
    message = str(err.value)
    assert message.startswith(str(path)) and problem in message
    if field:
        assert f": {field}: " in message


# ----------------------------------------------------------------------------------------------- distinct-n
def test_distinct_1_and_2_pool_the_answers_without_crossing_from_one_into_the_next():
    metric = DistinctNgrams()
    # unigrams: the cat the cat | a cat -> 6, unique {the, cat, a} = 3 -> 0.5
    # bigrams: (the cat)(cat the)(the cat) | (a cat) -> 4, unique 3 -> 0.75 ((cat a) would cross answers)
    metric.update(["The CAT, the cat!", "a cat"])
    result = metric.compute()
    assert result["distinct_1"].item() == 0.5
    assert result["distinct_2"].item() == 0.75


def test_distinct_of_empty_and_one_word_answers():
    metric = DistinctNgrams()
    metric.update(["", "..."])
    assert metric.compute()["distinct_1"].item() == 0.0 and metric.compute()["distinct_2"].item() == 0.0
    metric.reset()
    metric.update(["meow"])
    assert metric.compute()["distinct_1"].item() == 1.0 and metric.compute()["distinct_2"].item() == 0.0


# ----------------------------------------------------------------------------------------------- memorization
REPLY = "One two three four five six seven eight nine ten."


@pytest.mark.parametrize(
    ("answer", "copied"),
    [
        ("one two three four five six seven and more", 0),  # 7 words: not a copy
        ("so: ONE, two; three four five six seven eight, said the cat", 8),  # 8 words, case and punctuation
        ("well one two three four five six seven eight nine ten", 10),
        ("", 0),
    ],
)
def test_longest_copied_run_counts_from_8_words(answer, copied):
    assert ReplyIndex([REPLY, "something else entirely"]).longest_copy(words(answer)) == copied


def test_a_run_across_two_replies_is_not_a_copy_and_repeats_are_measured_once():
    assert ReplyIndex(["a b c d e", "f g h i j"]).longest_copy(words("a b c d e f g h i j")) == 0
    assert ReplyIndex(["meow " * 20]).longest_copy(words("meow " * 30)) == 20


def test_memorized_share():
    metric = Memorization(ReplyIndex([REPLY]))
    metric.update(["one two three four five six seven eight", "one two three four five six seven", "", REPLY])
    assert metric.compute().item() == 0.5


# ----------------------------------------------------------------------------------------------- coherence
def test_coherence_is_the_token_weighted_perplexity():
    metric = Coherence()
    metric.update(torch.tensor([2.0, 4.0]), torch.tensor([1, 3]))
    metric.update(torch.tensor([0.0]), torch.tensor([0]))  # an empty answer changes nothing
    assert metric.compute().item() == pytest.approx(math.exp(6.0 / 4))
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' own warning
        assert math.isnan(metric.compute().item())


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory, tokenizer):
    """The embedded tiny Phi-3, fully trained for a few steps on the corpus: a base that knows the word
    statistics of cat philosophy, saved as a local model directory."""
    from transformers import AutoModelForCausalLM

    from meowdread.chat_format import ChatFormat
    from meowdread.data import collate
    from meowdread.embedded import resolve_pretrained
    from meowdread.formats import read_corpus

    from .conftest import CORPUS

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-layer model: more threads only wait on each other (on 2 busy cores, 5x slower)
    model = AutoModelForCausalLM.from_pretrained(resolve_pretrained("embedded:tiny-phi3"), dtype=torch.float32)
    examples = [ChatFormat.of(tokenizer).encode(c) for c in read_corpus(CORPUS)[:64]]
    examples = [{k: v[:96] for k, v in e.items()} for e in examples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    try:
        for step in range(12):
            batch = collate(examples[step * 8 % 64 :][:8], tokenizer.pad_token_id)
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("trained-tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def qlora(pretrained="embedded:tiny-phi3"):
    from meowdread.model import LoraSettings, QLoraModule, QuantizationSettings

    # fp32 compute, so that padding and batching cannot change a result through rounding
    module = QLoraModule(
        pretrained=str(pretrained),
        quantization=QuantizationSettings(compute_dtype="float32"),
        lora=LoraSettings(dropout=0.0),
        gradient_checkpointing=False,
    )
    module.configure_model()
    return module


PROMPT = "What is the meaning of the nap?"
SENTENCE = "The hooman sleeps, and I sit in the box, and the box is warm, and that is enough for today."
GIBBERISH = "zxqv plorb wunk fet gribble snazz quorp vlim tranch oobix drell kwam."


def test_gibberish_is_less_coherent_than_a_sentence_like_the_training_replies(trained_base, tokenizer):
    module = qlora(trained_base)
    salad = " ".join(sorted(words(SENTENCE)))  # the same words, in no order
    nll, tokens = base_nll(module.model, tokenizer, [PROMPT] * 3, [SENTENCE, salad, GIBBERISH])
    ppl = (nll / tokens).exp()
    assert ppl[0] < ppl[1] < ppl[2], ppl
    assert ppl[2] > 3 * ppl[0], ppl


def test_base_nll_ignores_the_adapter_and_restores_the_training_mode(tokenizer):
    module = qlora()
    answers = [SENTENCE, GIBBERISH, ""]
    module.model.train()
    before = base_nll(module.model, tokenizer, [PROMPT] * 3, answers)
    assert module.model.training and all(m.training for m in module.model.modules())
    batch = tokenizer([SENTENCE], return_tensors="pt")
    logits = module(batch["input_ids"]).detach()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    assert not torch.allclose(module(batch["input_ids"]).detach(), logits)  # the adapter now matters...
    module.model.eval()
    after = base_nll(module.model, tokenizer, [PROMPT] * 3, answers)
    assert not module.model.training
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # ...but not to the base model's scores
    assert before[1][2] == 0 and before[0][2] == 0  # an empty answer has no tokens


def test_base_nll_does_not_depend_on_batching(tokenizer):
    module = qlora()
    prompts = [PROMPT, "Why?", "Is the box my friend, or my prison, or merely the shape of my longing?"]
    answers = [SENTENCE, "Meow.", GIBBERISH]
    together = base_nll(module.model, tokenizer, prompts, answers, batch_size=8)
    alone = base_nll(module.model, tokenizer, prompts, answers, batch_size=1)
    torch.testing.assert_close(together[0], alone[0], rtol=1e-4, atol=1e-3)
    assert torch.equal(together[1], alone[1])
    assert together[1].tolist() == [
        len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers
    ]  # the answer's own tokens: no prompt, no <|end|>


# ----------------------------------------------------------------------------------------------- all together
def test_sample_metrics_scores_each_answer_and_the_set():
    metrics = SampleMetrics([LOL], [REPLY], sync_on_compute=False)
    answers = ["I can haz cheezburger", "one two three four five six seven eight", ""]
    scores = metrics.update(answers, torch.tensor([4.0, 8.0, 0.0]), torch.tensor([2, 8, 0]))
    assert scores == [
        {"words": 4, "markers": {"lol": ["i can haz", "cheezburger"]}, "coherence_ppl": math.exp(2), "copied_words": 0},
        {"words": 8, "markers": {"lol": []}, "coherence_ppl": math.exp(1), "copied_words": 8},
        {"words": 0, "markers": {"lol": []}, "coherence_ppl": None, "copied_words": 0},
    ]
    result = metrics.compute()
    assert result == pytest.approx(
        {
            "lol_share": 1 / 3,
            "lol_per_100_words": 100 * 2 / 12,
            "coherence_ppl": math.exp(12 / 10),
            "distinct_1": 12 / 12,
            "distinct_2": 10 / 10,
            "memorized_share": 1 / 3,
        }
    )
    assert metrics.versions == {"lol": 1}
    metrics.reset()
    metrics.update(["cheezburger"], torch.tensor([1.0]), torch.tensor([1]))
    assert metrics.compute()["lol_share"] == 1.0  # reset forgets the previous epoch


def test_metrics_pool_over_ranks_with_their_own_reductions():
    """What DDP's sync does: each rank updates with its own answers, then every state is reduced with its
    ``dist_reduce_fx`` (``merge_state`` applies the same reductions in one process)."""
    answers = ["I can haz cheezburger", "the cat the cat", "the cat sat", REPLY, "", "haz haz"]
    single = SampleMetrics([LOL], [REPLY])
    single.update(answers, torch.ones(len(answers)), torch.full((len(answers),), 2))
    ranks = [SampleMetrics([LOL], [REPLY]) for _ in range(2)]
    for rank, metrics in enumerate(ranks):
        mine = answers[rank::2]
        metrics.update(mine, torch.ones(len(mine)), torch.full((len(mine),), 2))
    for pooled, other in zip(ranks[0].metrics(), ranks[1].metrics(), strict=True):
        pooled.merge_state(other)
    assert ranks[0].compute() == pytest.approx(single.compute())
    # 16 distinct bigrams of 18. Both ranks have "the cat": adding per-rank counts would give 17 / 18.
    assert single.compute()["distinct_2"] == pytest.approx(16 / 18)
