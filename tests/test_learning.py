"""The real SmolLM2-135M-Instruct learns the corpus on the CPU: a short ``fit`` on 32 conversations lowers the
loss of 12 others that it never saw, and keeps it ending their replies where they end.

The held-out loss is computed here, not by meowdread: each reply is located with the tokenizer's own
template (the prompt rendered with the generation prompt, then the reply up to the first turn end), so a
masking bug in training (labels shifted by one, the turn end left unlabelled) cannot hide in the
measurement. A random model could not show this: only a pretrained one starts from a loss that the voice
of the corpus can lower. Measured (16-core CPU, transformers 5.17): the reply loss falls 4.77 -> 4.36 and the turn end's
4.68 -> 2.05; with labels shifted by one the reply loss rises to 6.10, and with the turn end unlabelled its
loss rises to 7.91, so both broken masks fail (benchmarks/results/smollm2-h200-2026-12-01/README.md). The
thresholds sit between the right run and the broken ones with a wide margin.

    make test-slow        # or: pytest -m slow tests/test_learning.py (a few minutes on 2 cores)
"""

import json
import random

import pytest
import torch

from meowdread.cli import main
from meowdread.model import QLoraModule

from .conftest import CORPUS, REPO

pytestmark = pytest.mark.slow

SMOLLM2 = "embedded:smollm2-135m-instruct"
LEXICONS = [str(REPO / "data" / "lexicons" / name) for name in ("cat_lingo.json", "angst.json")]
# The held-out reply loss (nats a token) must fall by at least this much, and the turn end's loss must not
# rise by more than END_SLACK (measured margins: see the module docstring).
MIN_DROP = 0.15
END_SLACK = 0.0


def token_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_corpus(tokenizer, n_train: int = 32, n_held_out: int = 12, seed: int = 0, max_length: int = 224):
    """``n_train`` conversations to train on and ``n_held_out`` others, single-turn and ``max_length`` tokens
    at most (the shorter half of the corpus: the CPU time goes to more of them)."""
    conversations = [json.loads(line)["messages"] for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    random.Random(seed).shuffle(conversations)
    short = [c for c in conversations if len(token_ids(tokenizer, c)) <= max_length]
    held_out = [c for c in short if sum(m["role"] == "assistant" for m in c) == 1][:n_held_out]
    train = [c for c in short if c not in held_out][:n_train]
    return train, held_out


def reply_losses(model, tokenizer, conversations) -> tuple[float, float]:
    """Mean loss over the reply tokens of the last turn, and mean loss of the turn end that closes it."""
    end = tokenizer.eos_token_id  # the embedded SmolLM2's eos is its turn end (tests/test_embedded.py)
    reply_sum, reply_count, end_sum = 0.0, 0, 0.0
    for messages in conversations:
        prompt = token_ids(tokenizer, messages[:-1], add_generation_prompt=True)
        ids = token_ids(tokenizer, messages)
        assert ids[: len(prompt)] == prompt, "the template does not render the prompt as a prefix"
        stop = ids.index(end, len(prompt)) + 1
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=torch.tensor([ids[:stop]])).logits[0].float()
        targets = torch.tensor(ids[len(prompt) : stop])
        nll = torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : stop - 1], targets, reduction="none")
        reply_sum += nll[:-1].sum().item()
        reply_count += len(targets) - 1
        end_sum += nll[-1].item()
    return reply_sum / reply_count, end_sum / len(conversations)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, embedded_cache):
    """A short ``fit`` of the demo recipe on 32 conversations: the exported adapter and the held-out set."""
    from meowdread.data import load_tokenizer

    root = tmp_path_factory.mktemp("learning")
    train, held_out = split_corpus(load_tokenizer(SMOLLM2))
    corpus = root / "train.jsonl"
    corpus.write_text("".join(json.dumps({"messages": c}) + "\n" for c in train), encoding="utf-8")
    main(
        [
            "fit",
            "--config", str(REPO / "configs" / "smollm2_demo.yaml"),
            "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.enable_progress_bar", "false",
            "--trainer.max_epochs", "2",
            "--model.optimizer.init_args.lr", "0.001",
            "--data.corpus", str(corpus),
            "--data.limit", "null",
            "--data.val_fraction", "0.1",
            "--data.max_length", "224",
            "--data.batch_size", "8",
            "--data.prompts", str(REPO / "data" / "prompts_demo.txt"),
            "--data.lexicons", json.dumps(LEXICONS),
        ]
    )  # fmt: skip
    return root / "lightning_logs" / "version_0" / "adapter", held_out


def test_a_short_cpu_fit_lowers_the_held_out_loss_and_keeps_the_turn_end(trained):
    adapter, held_out = trained
    module = QLoraModule(pretrained=SMOLLM2, adapter=str(adapter), gradient_checkpointing=False)
    module.configure_model("cpu")
    module.model.eval()
    with module.model.disable_adapter():
        base_reply, base_end = reply_losses(module.model, module.tokenizer, held_out)
    tuned_reply, tuned_end = reply_losses(module.model, module.tokenizer, held_out)
    print(f"held-out reply loss {base_reply:.3f} -> {tuned_reply:.3f}, turn end {base_end:.3f} -> {tuned_end:.3f}")
    assert tuned_reply <= base_reply - MIN_DROP, (base_reply, tuned_reply)
    assert tuned_end <= base_end + END_SLACK, (base_end, tuned_end)
