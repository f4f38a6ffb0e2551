"""GPU-only: the GPU recipe's own settings (CUDA, activation checkpointing) through the CLI, the CUDA-graph
decoder, and the speed settings that only run on a GPU (Inductor's Triton kernels, Liger's) against the eager
step.

Skipped without CUDA. The tiny model stands in for Phi-3-mini, so this checks the code path, not speed
(for speed, see benchmarks/bench.py).
"""

import json

import pytest
import torch

from meowdread.cli import main
from meowdread.data import read_prompts

from .conftest import CORPUS, PROMPTS, REPO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_the_gpu_recipe_trains_checkpoints_and_predicts_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["meowdread"])
    common = [
        "--config", str(REPO / "configs" / "phi3_qlora.yaml"),
        "--model.pretrained", "embedded:tiny-phi3",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--data.corpus", str(CORPUS), "--data.prompts", str(PROMPTS),
    ]  # fmt: skip
    main(["fit", *common, "--trainer.max_steps", "8", "--trainer.limit_val_batches", "2"])
    run = tmp_path / "lightning_logs" / "version_0"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(".lora_" in key for key in ckpt["state_dict"])
    assert ckpt["optimizer_states"][0]["state"]  # the paged optimizer's state is saved too
    main(["predict", *common, "--ckpt_path", "last", "--model.sampling.max_new_tokens", "16"])
    rows = (tmp_path / "lightning_logs" / "version_0" / "predictions" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == len(read_prompts(PROMPTS)) and json.loads(rows[0])["answer"]


def test_the_cuda_graph_decoder_gives_hf_generates_greedy_tokens(tokenizer):
    """On CUDA, ``engine: auto`` decodes with a captured graph; it must agree with HF generate."""
    from meowdread.generation import SamplingSettings, generate
    from meowdread.model import QLoraModule, QuantizationSettings

    module = QLoraModule(
        pretrained="embedded:tiny-phi3",
        quantization=QuantizationSettings(compute_dtype="float32"),
        gradient_checkpointing=False,
    )
    module.configure_model(device="cuda")
    torch.manual_seed(0)
    for name, p in module.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    prompts = ["Why?", "Is the box my friend, or my prison?", "Meow.", "What is the void?"]
    auto = generate(module.model, tokenizer, prompts, SamplingSettings(max_new_tokens=40, do_sample=False))
    hf = generate(module.model, tokenizer, prompts, SamplingSettings(max_new_tokens=40, do_sample=False, engine="hf"))
    assert auto == hf and any(auto)  # a random tiny model may end an answer at once


def _loss_and_lora_grads(tokenizer, padding_free=False, sliding_window=None, **settings):
    """One bf16-mixed training step of the tiny Phi-3 on CUDA, from the same LoRA weights (and, with
    ``sliding_window``, attention within that many positions, as Phi-3-mini-4k's 2,047)."""
    from meowdread.chat_format import ChatFormat
    from meowdread.data import collate
    from meowdread.model import LoraSettings, QLoraModule
    from meowdread.packing import collate_packed

    torch.manual_seed(0)
    module = QLoraModule(pretrained="embedded:tiny-phi3", lora=LoraSettings(dropout=0.0), **settings)
    module.configure_model(device="cuda")
    module.model.config.sliding_window = sliding_window
    for name, p in module.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    replies = ["I fits, therefore I sits.", "The void fits too, and it is very large " * 4]
    chat_format = ChatFormat.of(tokenizer)
    examples = [
        chat_format.encode([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": r}])
        for i, r in enumerate(replies)
    ]
    batch = collate_packed(examples) if padding_free else collate(examples, pad_id=chat_format.pad_id)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    module.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, tokens = module.model_step(batch, "train")
    (loss / tokens).backward()
    return loss.detach(), {k: p.grad for k, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "fast",
    [
        dict(kernels="liger"),
        dict(kernels="fused"),
        dict(compile=True),
        dict(padding_free=True),
        dict(padding_free=True, compile=True),
        dict(padding_free=True, gradient_checkpointing=True, kernels="fused"),
        dict(padding_free=True, sliding_window=8),
    ],
    ids=[
        "liger",
        "fused",
        "compile",
        "padding-free",
        "padding-free-compile",
        "padding-free-checkpointed-fused",
        "padding-free-sliding-window",
    ],  # fmt: skip
)
def test_the_fast_gpu_step_gives_the_plain_steps_loss_and_gradients(tokenizer, fast):
    """Liger's kernels, the compiled layers and padding-free rows (PyTorch's variable-length FlashAttention
    kernel) are speed settings: loss and LoRA gradients stay the eager padded step's, within bf16 rounding."""
    if fast.get("kernels") == "liger":
        pytest.importorskip("liger_kernel")
    if fast.get("padding_free"):
        from meowdread.packing import _varlen

        assert _varlen() is not None, "this torch has no torch.nn.attention.varlen kernel"
    torch._dynamo.reset()
    window = fast.get("sliding_window")  # the padded reference attends within the same window
    plain_loss, plain = _loss_and_lora_grads(tokenizer, gradient_checkpointing=False, sliding_window=window)
    fast_loss, grads = _loss_and_lora_grads(tokenizer, **{"gradient_checkpointing": False, **fast})
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-2, atol=0)
    for key, grad in plain.items():
        error = (grads[key] - grad).norm() / grad.norm()
        assert error < 5e-2, (key, error)


def test_the_triton_kernels_compute_what_the_pytorch_versions_do_on_cuda():
    """``kernels: fused`` on CUDA runs meowdread's Triton kernels: at Phi-3-mini's shapes (32 query and 32
    key/value heads of 96, SwiGLU 8,192 wide), against the PyTorch versions of the same math."""
    from meowdread import fused
    from meowdread import triton_kernels as tk

    torch.manual_seed(0)
    qkv = torch.randn(2, 300, 96 * 96, device="cuda", dtype=torch.bfloat16)
    cos, sin = (torch.rand(2, 300, 96, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert fused._triton(qkv) is tk
    q, k, v = fused.split_heads(qkv, 32, 32, 96)
    for backward in (False, True):
        torch.testing.assert_close(
            tk.rotary_qkv(q, k, v, cos, sin, backward=backward),
            fused.rotary_qkv_torch(q, k, v, cos, sin, backward=backward),
            rtol=1e-2, atol=1e-2,
        )  # fmt: skip
    gate_up = torch.randn(600, 2 * 8192, device="cuda", dtype=torch.bfloat16) * 3
    grad = torch.randn(600, 8192, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(tk.silu_mul(gate_up), fused.silu_mul_torch(gate_up), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(
        tk.silu_mul_backward(gate_up, grad), fused.silu_mul_backward_torch(gate_up, grad), rtol=1e-2, atol=1e-2
    )
