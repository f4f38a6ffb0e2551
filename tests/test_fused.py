"""``kernels: fused`` changes no result: loss and LoRA gradients against peft's own layers (CPU, real NF4)."""

import pytest
import torch

from meowdread.fused import LoraLinear4bit, apply_fused_lora, apply_fused_norms
from meowdread.model import LoraSettings, QLoraModule

from .test_model import TINY, batch_of

REPLIES = ("I fits, therefore I sits.", "The void fits too, and it is very large " * 3)


def module_with(kernels, dropout=0.0, **kwargs):
    torch.manual_seed(0)
    module = QLoraModule(pretrained=TINY, lora=LoraSettings(dropout=dropout), kernels=kernels, **kwargs)
    module.configure_model()
    for name, p in module.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # so that lora_A's gradients are not zero
    module.train()
    return module


def step(module, batch, seed=1):
    torch.manual_seed(seed)  # the same dropout masks in both modules
    module.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, tokens = module.model_step(batch, "train")
    (loss / tokens).backward()
    return loss.detach(), {k: p.grad.clone() for k, p in module.named_parameters() if p.requires_grad}


def assert_same_step(fast, plain, rel=0.02):
    torch.testing.assert_close(fast[0], plain[0], rtol=5e-3, atol=0)
    for key, grad in plain[1].items():  # bf16 rounding in another order: well under 1% here
        error = float((fast[1][key] - grad).norm() / grad.norm())
        assert error <= rel, (key, error)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_fused_step_gives_peft_s_loss_and_gradients(tokenizer, dropout, checkpointing):
    """Every 4-bit LoRA layer and RMSNorm replaced; the same dropout draws (peft's own dropout module)."""
    batch = batch_of(tokenizer, *REPLIES)
    plain = module_with("torch", dropout, gradient_checkpointing=checkpointing)
    fused = module_with("fused", dropout, gradient_checkpointing=checkpointing)
    layers = [m for m in fused.model.modules() if hasattr(m, "_meowdread_peft_forward")]
    norms = [m for m in fused.model.modules() if hasattr(m, "_meowdread_own_forward")]
    assert len(layers) == 2 * 4 and len(norms) == 2 * 2 + 1  # 2 layers x 4 linears; 2 norms each + the final
    assert_same_step(step(fused, batch), step(plain, batch))


@pytest.mark.parametrize("double_quant", [False, True])
def test_the_fused_function_matches_autograd_through_the_plain_formula(double_quant):
    """The hand-written backward against autograd on ``x W^T + s (xd A^T) B^T`` in fp32, W dequantized by
    bitsandbytes itself (the fused path keeps a double-quantized weight's block scales dequantized)."""
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    w = torch.randn(48, 64) / 8
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert state.nested == double_quant
    x = torch.randn(2, 5, 64, requires_grad=True)
    a = (torch.randn(4, 64) / 8).requires_grad_()
    b = (torch.randn(48, 4) / 8).requires_grad_()
    g = torch.randn(2, 5, 48)
    for dropout in (False, True):
        xd = torch.nn.functional.dropout(x, 0.5, training=True) if dropout else None
        out = LoraLinear4bit.apply(x, xd, packed, state, None, a, b, 2.0, torch.float32, torch.float32)
        fused = torch.autograd.grad(out, (x, a, b), g, retain_graph=True)
        dense = bnbf.dequantize_4bit(packed, state)
        ref_out = x @ dense.t() + 2.0 * ((x if xd is None else xd) @ a.t()) @ b.t()
        ref = torch.autograd.grad(ref_out, (x, a, b), g)
        torch.testing.assert_close(out, ref_out)
        for got, want in zip(fused, ref, strict=True):
            torch.testing.assert_close(got, want)


def test_disabled_adapters_and_calls_without_autograd_take_peft_s_forward(tokenizer, monkeypatch):
    """The fused function is plain LoRA on one active adapter, for training calls: inside disable_adapter()
    the layer is the base alone, and without autograd bitsandbytes' inference kernels run."""
    batch = batch_of(tokenizer, *REPLIES)
    fused = module_with("fused")
    plain = module_with("torch")
    calls = []
    apply = LoraLinear4bit.apply
    monkeypatch.setattr(LoraLinear4bit, "apply", lambda *args: calls.append(len(args)) or apply(*args))
    with torch.no_grad():
        torch.testing.assert_close(fused(batch["input_ids"]), plain(batch["input_ids"]), rtol=2e-2, atol=2e-2)
    assert calls == []
    with fused.model.disable_adapter(), plain.model.disable_adapter():
        torch.testing.assert_close(fused(batch["input_ids"]), plain(batch["input_ids"]), rtol=2e-2, atol=2e-2)
    assert calls == []
    fused(batch["input_ids"])
    assert len(calls) == 8  # a training call: every adapted layer
    assert apply_fused_lora(fused.model) == 8 and apply_fused_norms(fused.model) == 0  # nothing wrapped twice
