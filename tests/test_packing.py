"""Padding-free batches (``data.padding_free``) give the padded batches' loss and gradients (CPU).

The GPU path (PyTorch's variable-length FlashAttention kernel) is checked against the same padded step in
``test_gpu.py``.
"""

import pytest
import torch

from meowdread.chat_format import IGNORE_INDEX, ChatFormat
from meowdread.data import collate
from meowdread.model import LoraSettings, QLoraModule
from meowdread.packing import collate_packed

from .conftest import REPO
from .test_cli import cli
from .test_model import TINY

REPLIES = ("I fits, therefore I sits.", "The void fits too, and it is very large " * 3, "Meow?")


def examples_of(tokenizer, replies=REPLIES):
    chat = ChatFormat.of(tokenizer)
    return [
        chat.encode([{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": r}])
        for i, r in enumerate(replies)
    ]


def test_a_packed_row_is_the_examples_end_to_end(tokenizer):
    examples = examples_of(tokenizer)
    batch = collate_packed(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["input_ids"][0].tolist() == [t for e in examples for t in e["input_ids"]]
    assert batch["cu_seq_lens"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert batch["cu_seq_lens"].dtype == torch.int32 and batch["max_length"] == max(lengths)
    starts = batch["cu_seq_lens"][:-1].tolist()
    assert [batch["position_ids"][0, s].item() for s in starts] == [0, 0, 0]
    assert batch["position_ids"][0, starts[1] - 1].item() == lengths[0] - 1
    # Each example's labels, except that no example's first token is the target of the one before it.
    labels = batch["labels"][0].tolist()
    for e, s in zip(examples, starts, strict=True):
        assert labels[s] == IGNORE_INDEX
        assert labels[s + 1 : s + len(e["labels"])] == e["labels"][1:]
    trained = sum(label != IGNORE_INDEX for e in examples for label in e["labels"][1:])
    assert sum(label != IGNORE_INDEX for label in labels) == trained


def step(module, batch):
    module.zero_grad()
    loss, tokens = module.model_step(batch, "train")
    (loss / tokens).backward()
    grads = {k: p.grad.clone() for k, p in module.named_parameters() if p.requires_grad}
    return loss.detach(), tokens, grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_padding_free_step_gives_the_padded_steps_loss_and_gradients(tokenizer, attn):
    """Same examples in one row: same summed loss, trained tokens and LoRA gradients. Attention that leaked from
    one example into the next, or positions that did not restart, would change them."""
    torch.manual_seed(0)
    module = QLoraModule(
        pretrained=TINY, lora=LoraSettings(dropout=0.0), gradient_checkpointing=True, attn_implementation=attn
    )
    module.configure_model()
    for name, p in module.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # so that the gradients of lora_A are not zero
    module.train()
    examples = examples_of(tokenizer)
    padded = step(module, collate(examples, pad_id=tokenizer.pad_token_id))
    packed = step(module, collate_packed(examples))
    torch.testing.assert_close(packed[0], padded[0], rtol=2e-3, atol=1e-3)
    assert packed[1] == padded[1]
    for key, grad in padded[2].items():  # bf16 matmuls of other shapes round differently: <1% here
        assert (packed[2][key] - grad).norm() < 0.02 * grad.norm(), key


def test_a_sliding_window_is_kept_inside_each_example(tokenizer):
    """Phi-3-mini-4k attends within 2,047 positions. With a window of 6 here, the packed step (a banded mask per
    example) must give the padded step's (transformers' sliding-window mask) loss and gradients."""
    torch.manual_seed(0)
    module = QLoraModule(pretrained=TINY, lora=LoraSettings(dropout=0.0), gradient_checkpointing=False)
    module.configure_model()
    module.model.config.sliding_window = 6
    for name, p in module.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    module.train()
    examples = examples_of(tokenizer)
    assert min(len(e["input_ids"]) for e in examples) > 6
    padded = step(module, collate(examples, pad_id=tokenizer.pad_token_id))
    packed = step(module, collate_packed(examples))
    torch.testing.assert_close(packed[0], padded[0], rtol=2e-3, atol=1e-3)
    for key, grad in padded[2].items():
        assert (packed[2][key] - grad).norm() < 0.02 * grad.norm(), key
    module.model.config.sliding_window = None
    unwindowed = step(module, collate(examples, pad_id=tokenizer.pad_token_id))
    assert not torch.allclose(unwindowed[0], padded[0], rtol=2e-3)  # the window changes the loss: it is tested


def test_after_a_packed_step_padded_calls_attend_as_before(tokenizer):
    """The packable attention passes every call without example boundaries to the wrapped implementation."""
    torch.manual_seed(0)
    module = QLoraModule(pretrained=TINY, lora=LoraSettings(dropout=0.0), gradient_checkpointing=False)
    module.configure_model()
    module.eval()
    examples = examples_of(tokenizer)
    padded = collate(examples, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        before = module(padded["input_ids"], padded["attention_mask"])
        module.model_step(collate_packed(examples), "val")
        assert module.model.config._attn_implementation == "packable_sdpa"
        after = module(padded["input_ids"], padded["attention_mask"])
    torch.testing.assert_close(after, before)


def test_the_gpu_configs_speed_settings_fit_through_the_cli(tmp_path):
    """``data.padding_free`` and ``model.kernels: fused``, as configs/phi3_qlora.yaml sets them."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Why do I sit?\nWhat is the void?\n", encoding="utf-8")  # two: samples are not tested here
    cli(
        "fit", tmp_path, "--data.padding_free", "true", "--model.kernels", "fused", "--trainer.max_epochs", "1",
        "--data.prompts", str(prompts),
    )  # fmt: skip
    run = tmp_path / "lightning_logs" / "version_0"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    config = (run / "config.yaml").read_text()
    assert "padding_free: true" in config and "kernels: fused" in config


def test_neftune_refuses_padding_free_batches(tmp_path, capsys):
    """Its noise bound is per sequence length, which a packed row does not keep (transformers#34659)."""
    with pytest.raises(SystemExit):
        cli(
            "fit", tmp_path, "--config", str(REPO / "examples" / "neftune.yaml"), "--data.padding_free", "true",
            "--trainer.max_epochs", "1",
        )  # fmt: skip
    assert "NEFTune scales its noise by each sequence's length" in capsys.readouterr().err


def test_padding_free_and_fused_layers_on_a_grouped_query_model_with_biases(tmp_path, tokenizer):
    """A tiny Qwen2 (4 query heads sharing 2 key/value heads; q, k and v projections with a bias): the packed,
    fused step against the padded step of peft's own layers."""
    from .conftest import CORPUS
    from .tiny_models import build_model_dir, build_tokenizer

    directory = build_model_dir("qwen2", CORPUS, tmp_path / "qwen2")
    qwen_tokenizer = build_tokenizer("qwen2", CORPUS)
    examples = examples_of(qwen_tokenizer)

    def run(kernels, batch):
        torch.manual_seed(0)
        module = QLoraModule(
            pretrained=str(directory), lora=LoraSettings(dropout=0.0), gradient_checkpointing=True, kernels=kernels
        )
        module.configure_model()
        for name, p in module.model.named_parameters():
            if "lora_B" in name or name.endswith("base_layer.bias"):
                p.data.normal_(0, 0.05)  # (transformers initialises biases to zero, which would test nothing)
        fused = [m for m in module.model.modules() if hasattr(m, "_meowdread_peft_forward")]
        assert len(fused) == (2 * 7 if kernels == "fused" else 0)
        assert kernels == "torch" or any(m.get_base_layer().bias is not None for m in fused)
        module.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return step(module, batch)

    padded = run("torch", collate(examples, pad_id=qwen_tokenizer.pad_token_id))
    packed = run("fused", collate_packed(examples))
    torch.testing.assert_close(packed[0], padded[0], rtol=5e-3, atol=0)
    assert packed[1] == padded[1]
    for key, grad in padded[2].items():
        assert (packed[2][key] - grad).norm() < 0.03 * grad.norm(), key
