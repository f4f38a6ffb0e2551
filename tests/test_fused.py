"""``kernels: fused`` changes no result: loss and LoRA gradients against peft's own layers (CPU, real NF4)."""

import pytest
import torch

from meowdread.fused import (
    LoraLinear4bit,
    RotaryQKV,
    SiluMul,
    apply_fused_blocks,
    apply_fused_lora,
    apply_fused_norms,
)
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
    changed = [type(m).__name__ for m in fused.model.modules() if hasattr(m, "_meowdread_own_forward")]
    assert len(layers) == 2 * 4  # 2 layers x 4 linears
    assert sorted(changed) == ["Phi3Attention"] * 2 + ["Phi3MLP"] * 2 + ["Phi3RMSNorm"] * 5  # 2 norms each + final
    assert_same_step(step(fused, batch), step(plain, batch))


def test_the_fused_padding_free_step_gives_the_padded_step_of_peft_s_layers(tokenizer):
    """As configs/phi3_qlora.yaml trains: packed rows (positions restarting in each example) through the fused
    attention, MLP and LoRA layers, against padded rows through transformers' and peft's own."""
    from meowdread.data import collate
    from meowdread.packing import collate_packed

    from .test_packing import examples_of

    examples = examples_of(tokenizer)
    # no dropout: a packed row's masks are other draws than a padded batch's
    padded = step(module_with("torch"), collate(examples, pad_id=tokenizer.pad_token_id))
    packed = step(module_with("fused"), collate_packed(examples))
    assert_same_step(packed, padded)


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
    # nothing wrapped twice
    assert apply_fused_lora(fused.model) == 8 and apply_fused_norms(fused.model) == apply_fused_blocks(fused.model) == 0


def phi3_attention(n_kv, partial, attention="sdpa"):
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3RotaryEmbedding

    config = Phi3Config(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=n_kv,
        partial_rotary_factor=partial, max_position_embeddings=64, attention_dropout=0.0,
    )  # fmt: skip
    config._attn_implementation = attention
    torch.manual_seed(0)
    return Phi3Attention(config, layer_idx=0), Phi3RotaryEmbedding(config)


@pytest.mark.parametrize(("n_kv", "partial"), [(4, 1.0), (2, 1.0), (2, 0.75)])
def test_the_fused_rotary_attention_is_transformers_phi3_attention(n_kv, partial):
    """Grouped-query heads and a partial rotary embedding (Phi-3.5/Phi-4-mini rotate 3/4 of each head), rows
    with their own positions: outputs and gradients of the input and of every weight, in fp32."""
    attention, rotary = phi3_attention(n_kv, partial)
    hidden = torch.randn(2, 7, 64, requires_grad=True)
    positions = torch.stack([torch.arange(7), torch.arange(7) + 5])
    cos, sin = rotary(hidden, positions)
    assert cos.shape[-1] == int(16 * partial)  # head_dim 16

    def run():
        out, _ = attention(hidden, (cos, sin), None)
        params = [hidden, *attention.parameters()]
        return out, torch.autograd.grad(out, params, torch.linspace(-1, 1, out.numel()).view_as(out))

    plain = run()
    assert apply_fused_blocks(attention) == 1
    fused = run()
    torch.testing.assert_close(fused[0], plain[0])
    for got, want in zip(fused[1], plain[1], strict=True):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # calls without autograd take transformers' forward
        calls = []
        original = RotaryQKV.apply
        RotaryQKV.apply = lambda *a: calls.append(1) or original(*a)
        try:
            attention(hidden, (cos, sin), None)
        finally:
            RotaryQKV.apply = original
        assert calls == []


def test_the_rotary_function_returns_views_of_one_buffer_in_qkv_layout():
    """What lets the attention kernels read queries, keys and values without a copy."""
    qkv = torch.randn(1, 5, (4 + 2 * 2) * 8)
    cos, sin = torch.rand(1, 5, 8), torch.rand(1, 5, 8)
    q, k, v = RotaryQKV.apply(qkv, cos, sin, 4, 2, 8)
    assert q.shape == (1, 4, 5, 8) and k.shape == v.shape == (1, 2, 5, 8)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert q.transpose(1, 2).stride()[1:] == ((4 + 2 * 2) * 8, 8, 1)  # (tokens, heads, head_dim), as qkv's rows
    torch.testing.assert_close(v, qkv.view(1, 5, 8, 8)[:, :, 6:].transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_is_up_times_silu_of_gate(dtype):
    torch.manual_seed(0)
    gate_up = (torch.randn(3, 4, 2 * 24) * 3).to(dtype).requires_grad_()
    g = torch.randn(3, 4, 24).to(dtype)
    out = SiluMul.apply(gate_up)
    (grad,) = torch.autograd.grad(out, gate_up, g)
    ref_in = gate_up.detach().float().requires_grad_()
    gate, up = ref_in.chunk(2, dim=-1)
    ref = up * torch.nn.functional.silu(gate)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, g.float())
    tol = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}  # one bf16 rounding at the end
    torch.testing.assert_close(out.float(), ref, **tol)
    torch.testing.assert_close(grad.float(), ref_grad, **tol)


TRITON_CHECK = """
import torch
from meowdread import fused, triton_kernels as tk

torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    exact = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)  # bf16: one ulp
    for n_q, n_kv, dim, rot in ((4, 4, 16, 16), (4, 2, 16, 12), (3, 1, 12, 8)):
        qkv = torch.randn(2, 5, (n_q + 2 * n_kv) * dim).to(dtype)
        cos, sin = torch.rand(2, 5, rot).to(dtype), torch.rand(2, 5, rot).to(dtype)
        q, k, v = fused.split_heads(qkv, n_q, n_kv, dim)
        for backward in (False, True):
            want = fused.rotary_qkv_torch(q, k, v, cos, sin, backward=backward)
            got = tk.rotary_qkv(q, k, v, cos, sin, backward=backward)
            torch.testing.assert_close(got, want, **exact)
        # gradients as they come back from attention kernels: contiguous heads in (batch, heads, tokens) order
        grads = [t.contiguous() for t in (q, k, v)]
        torch.testing.assert_close(tk.rotary_qkv(*grads, cos[:1], sin[:1], backward=True),
                                   fused.rotary_qkv_torch(*grads, cos[:1], sin[:1], backward=True),
                                   **exact)
    gate_up = (torch.randn(7, 2 * 1100) * 3).to(dtype)  # more than one column block
    grad = torch.randn(7, 1100).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(tk.silu_mul(gate_up), fused.silu_mul_torch(gate_up), **tol)
    torch.testing.assert_close(tk.silu_mul_backward(gate_up, grad), fused.silu_mul_backward_torch(gate_up, grad), **tol)
print("same")
"""


def test_the_triton_kernels_compute_what_the_pytorch_versions_do():
    """The GPU kernels themselves, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1, which must be
    set before Triton is imported: hence a process of its own): strided views, grouped-query and partial
    rotary heads, both directions."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "same"


@pytest.mark.parametrize("checkpointing", [False, True, 1])
def test_a_checkpointed_layer_dequantizes_each_weight_twice_a_step_not_three_times(
    tokenizer, monkeypatch, checkpointing
):
    """A checkpointed layer keeps the weight its recompute dequantized for its backward, a moment later; a
    layer that is not checkpointed keeps nothing (it would hold every weight for the whole step) and
    dequantizes again in its backward. Either way: two dequantizations a weight a step, no dequantized weight
    alive between the forward and the backward, and the same gradients."""
    import gc
    import weakref

    from meowdread import fused

    batch = batch_of(tokenizer, *REPLIES)
    module = module_with("fused", 0.05, gradient_checkpointing=checkpointing)
    calls, alive = [], []
    dequantize = fused.dequantize

    def counted(packed, state):
        weight = dequantize(packed, state)
        calls.append(packed.data_ptr())
        alive.append(weakref.ref(weight))
        return weight

    monkeypatch.setattr(fused, "dequantize", counted)
    torch.manual_seed(1)
    module.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, tokens = module.model_step(batch, "train")
    gc.collect()
    assert len(calls) == 8 and not [w for w in alive if w() is not None]  # 8 LoRA layers, nothing kept
    (loss / tokens).backward()
    assert len(calls) == 2 * 8 and all(calls.count(c) == 2 for c in calls)
    fast = loss.detach(), {k: p.grad.clone() for k, p in module.named_parameters() if p.requires_grad}
    monkeypatch.setattr(fused, "dequantize", dequantize)
    assert_same_step(fast, step(module_with("torch", 0.05, gradient_checkpointing=checkpointing), batch))
