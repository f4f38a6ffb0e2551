"""``kernels: fused``: the 4-bit LoRA linear layer in one autograd function, and RMSNorm in one kernel.

peft's 4-bit LoRA layer runs the frozen matmul through bitsandbytes and then, as separate autograd nodes,
a defensive copy of its output, the two LoRA matmuls, a scaling and an add: four passes over an output that is
up to 16,384 wide, forward, recompute and backward, in each of the 128 adapted layers of Phi-3-mini. The eager
step pays for them twice: in launches and Python, which bound it at batch 32, and in memory traffic, which
bounds it at batch 64 (benchmarks/NOTES.md). :class:`LoraLinear4bit` computes the same
``x W^T + s (dropout(x) A^T) B^T`` with the LoRA product accumulated into the frozen one by ``addmm_``, and a
backward written out: ``dx = g W + s (g B) A``, ``dA = s (g B)^T dropout(x)``, ``dB = s g^T (dropout(x) A^T)``,
the weight dequantized again rather than kept. It saves what peft saves (the dropped-out input and the rank-r
product). Dropout stays peft's own module, called the same way, so the masks are the same random draws.

RMSNorms of the Llama form (``weight * normalize(x.float()).to(dtype)``: Phi-3, Llama, Qwen2, Mistral) run
through ``F.rms_norm``, which on CUDA is one fused kernel each way instead of about eight.

In Phi-3's attention, :class:`RotaryQKV` takes the fused ``qkv_proj`` output to rotated queries and keys and
the values in one kernel, and its backward writes the gradient of ``qkv`` in one more (transformers' path is
about ten elementwise kernels forward, most on strided views, and three zero-filled full-width buffers
backward). Phi-3's MLP computes ``up * silu(gate)`` with :class:`SiluMul`, one kernel each way. On a CUDA GPU
both are Triton kernels (:mod:`meowdread.triton_kernels`); elsewhere the same functions run in PyTorch.

Calls without autograd (validation, sampling) take transformers' and peft's own forwards, and so do layers
or calls that are not plain LoRA on a bitsandbytes 4-bit layer (DoRA and other variants, a LoRA bias,
several active adapters, a disabled or merged adapter). Tests compare loss and gradients with peft's step
(``tests/test_fused.py``).
"""

from __future__ import annotations

import functools
import inspect
import types
import weakref

import torch
import torch.nn.functional as F


class LoraLinear4bit(torch.autograd.Function):
    """``x W^T (+ bias) + scaling * (xd A^T) B^T`` for a frozen NF4/FP4 ``W``, the frozen product in
    ``base_dtype`` and the LoRA branch in ``lora_dtype``; ``xd`` is ``x`` after LoRA dropout (or ``x`` itself,
    passed as None). Returns the output in ``x``'s dtype."""

    @staticmethod
    def forward(ctx, x, xd, packed, quant_state, bias, lora_A, lora_B, scaling, lora_dtype, base_dtype, keep=False):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(base_dtype)
        weight = dequantize(packed, quant_state).to(base_dtype)
        out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias.to(base_dtype), x2, weight.t())
        # keep: this layer is checkpointed, so what it saves is dropped after the forward and kept after
        # the recompute until the layer's backward, a moment later. Saving the dequantized weight then
        # saves the backward its own dequantization (one of three a step), for one layer's weights at a time.
        if not keep:
            del weight
        xd2 = x.reshape(-1, shape[-1]) if xd is None else xd.reshape(-1, shape[-1])
        xd2 = xd2.to(lora_dtype)
        a, b = lora_A.to(lora_dtype), lora_B.to(lora_dtype)
        h = torch.mm(xd2, a.t())
        if lora_dtype == out.dtype:
            out.addmm_(h, b.t(), alpha=scaling)
        else:  # no autocast: peft computes the LoRA branch in the adapter's dtype, then adds it in the base's
            out = out + (torch.mm(h, b.t()) * scaling).to(out.dtype)
        ctx.save_for_backward(xd2, h, packed, a, b, *((weight,) if keep else ()))
        ctx.quant_state, ctx.scaling, ctx.separate_xd, ctx.base_dtype = quant_state, scaling, xd is not None, base_dtype
        ctx.x_shape, ctx.x_dtype, ctx.param_dtypes = shape, x.dtype, (lora_A.dtype, lora_B.dtype)
        return out.reshape(*shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xd2, h, packed, a, b, *kept = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])
        weight = kept[0] if kept else dequantize(packed, ctx.quant_state).to(ctx.base_dtype)
        grad_x = torch.mm(g.to(weight.dtype), weight)
        del weight
        gl = g.to(h.dtype)
        gb = torch.mm(gl, b)  # (g B): the gradient of h, before the scaling
        grad_b = torch.mm(gl.t(), h).mul_(s).to(ctx.param_dtypes[1])
        grad_a = torch.mm(gb.t(), xd2).mul_(s).to(ctx.param_dtypes[0])
        grad_xd = None
        if ctx.separate_xd:  # dropout: its own node scales this by the mask
            grad_xd = torch.mm(gb, a).mul_(s).reshape(ctx.x_shape).to(ctx.x_dtype)
        elif grad_x.dtype == gb.dtype:
            grad_x.addmm_(gb, a, alpha=s)
        else:
            grad_x = grad_x + (torch.mm(gb, a) * s).to(grad_x.dtype)
        grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, grad_xd, None, None, None, grad_a, grad_b, None, None, None, None


def dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' ``dequantize_4bit(packed, state)``, with the block scales of a double-quantized weight
    dequantized once and kept (fp32, one value per 64 weights: 240 MB for Phi-3-mini) instead of at every
    call: three calls a step per layer, each two more kernels and the Python around them."""
    absmax = getattr(state, "_meowdread_absmax", None)
    if absmax is None or absmax.device != packed.device:
        if state.nested:
            import bitsandbytes.functional as bnbf

            absmax = (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
        else:
            absmax = state.absmax
        state._meowdread_absmax = absmax
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        packed, absmax, state.blocksize, state.quant_type, state.shape, state.dtype
    )


def _fused_lora_forward(self, x, *args, **kwargs):
    """A peft ``lora.Linear4bit`` forward: :class:`LoraLinear4bit` for one plain LoRA adapter, else peft's."""
    adapter = _plain_adapter(self, args, kwargs)
    if adapter is None:
        return self._meowdread_peft_forward(x, *args, **kwargs)
    base = self.get_base_layer()
    dropout = self.lora_dropout[adapter]
    xd = None if isinstance(dropout, torch.nn.Identity) else dropout(x)
    lora_A, lora_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    if torch.is_autocast_enabled(x.device.type):
        lora_dtype = torch.get_autocast_dtype(x.device.type)
    else:
        lora_dtype = lora_A.dtype
    state = base.weight.quant_state
    base_dtype = getattr(base, "compute_dtype", None) or state.dtype  # what bitsandbytes' layer computes in
    decoder = self.__dict__.get("_meowdread_decoder")  # a weak reference, not a submodule
    decoder = decoder() if decoder is not None else None
    keep = bool(decoder is not None and decoder.training and getattr(decoder, "gradient_checkpointing", False))
    with torch.autocast(x.device.type, enabled=False):
        return LoraLinear4bit.apply(
            x, xd, base.weight, state, base.bias, lora_A, lora_B, self.scaling[adapter], lora_dtype, base_dtype,
            keep,
        )  # fmt: skip


def _plain_adapter(layer, args, kwargs) -> str | None:
    """The one active adapter if this call is plain LoRA on a 4-bit base with autograd on, else None (peft's
    forward runs: without autograd, bitsandbytes' own inference kernels, which for the few rows of a decoding
    step read the 4-bit weight instead of dequantizing it)."""
    if not torch.is_grad_enabled():
        return None
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter in layer.lora_variant or layer.lora_bias.get(adapter):
        return None
    base = layer.get_base_layer()
    state = getattr(base.weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return None
    return adapter


def _fused_rms_norm_forward(self, hidden_states):
    weight = self.weight
    if weight.dtype != hidden_states.dtype:  # upcast weights: their product is fp32 in the model's own forward
        return self._meowdread_own_forward(hidden_states)
    with torch.autocast(hidden_states.device.type, enabled=False):
        return F.rms_norm(hidden_states, weight.shape, weight, self.variance_epsilon)


def is_llama_rms_norm(module: torch.nn.Module) -> bool:
    """transformers' own RMSNorm of the Llama form (``weight * normalize(x.float()).to(dtype)``, no offset or
    bias), whose output ``F.rms_norm`` computes; Liger's and other replacements are not."""
    kind = type(module)
    return (
        kind.__module__.startswith("transformers.")
        and kind.__name__.removesuffix("RMSNorm") in ("Phi3", "Llama", "Qwen2", "Mistral")
        and kind.__name__.endswith("RMSNorm")
        and hasattr(module, "variance_epsilon")
        and isinstance(getattr(module, "weight", None), torch.nn.Parameter)
    )


def apply_fused_lora(model: torch.nn.Module) -> int:
    """Route every peft 4-bit LoRA layer of ``model`` through :class:`LoraLinear4bit`; returns how many."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    def is_lora_4bit(module):
        return type(module).__name__ == "Linear4bit" and hasattr(module, "lora_A")

    count = 0
    for decoder in model.modules():  # each LoRA layer learns its decoder layer, to know if it is checkpointed
        if isinstance(decoder, GradientCheckpointingLayer):
            for module in filter(is_lora_4bit, decoder.modules()):
                module.__dict__.setdefault("_meowdread_decoder", weakref.ref(decoder))
    for module in model.modules():
        if is_lora_4bit(module):
            if not hasattr(module, "_meowdread_peft_forward"):
                module._meowdread_peft_forward = module.forward
                module.forward = types.MethodType(_fused_lora_forward, module)
            count += 1
    return count


def apply_fused_norms(base: torch.nn.Module) -> int:
    """Run the base's Llama-form RMSNorms through ``F.rms_norm``; returns how many."""
    count = 0
    for module in base.modules():
        if is_llama_rms_norm(module) and not hasattr(module, "_meowdread_own_forward"):
            module._meowdread_own_forward = module.forward
            module.forward = types.MethodType(_fused_rms_norm_forward, module)
            count += 1
    return count


class RotaryQKV(torch.autograd.Function):
    """Phi-3's fused ``qkv`` (batch, tokens, (n_q + 2 n_kv) head_dim) → queries and keys with the rotary
    embedding applied, and values, each (batch, heads, tokens, head_dim): views of one new buffer in ``qkv``'s
    layout, so that the attention kernels read them without a copy. The backward writes the gradient of
    ``qkv`` in one pass (the rotation's transpose for queries and keys, a copy for values)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_q, n_kv, head_dim):
        ctx.save_for_backward(cos, sin)
        return split_heads(_rotary(*split_heads(qkv, n_q, n_kv, head_dim), cos, sin), n_q, n_kv, head_dim)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        grads = [g if g.stride(-1) == 1 else g.contiguous() for g in (grad_q, grad_k, grad_v)]
        return _rotary(*grads, cos, sin, backward=True), None, None, None, None, None


def split_heads(qkv: torch.Tensor, n_q: int, n_kv: int, head_dim: int):
    """Views of ``qkv``'s queries, keys and values as (batch, heads, tokens, head_dim), as Phi-3 splits them."""
    batch, tokens = qkv.shape[:2]
    heads = qkv.view(batch, tokens, n_q + 2 * n_kv, head_dim)
    return tuple(heads[:, :, a:b].transpose(1, 2) for a, b in ((0, n_q), (n_q, n_q + n_kv), (n_q + n_kv, None)))


def rotary_qkv_torch(q, k, v, cos, sin, backward: bool = False) -> torch.Tensor:
    """What :func:`meowdread.triton_kernels.rotary_qkv` computes, in PyTorch: the rotation (``backward``: its
    transpose) of ``q`` and ``k`` over the first ``cos.shape[-1]`` dimensions in fp32, rounded once; the
    result and ``v`` in ``qkv_proj``'s (batch, tokens, width) layout."""
    rot = cos.shape[-1]
    half = rot // 2
    c, s = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    c1, c2, s1, s2 = c[..., :half], c[..., half:rot], s[..., :half], s[..., half:rot]

    def turn(x):
        x1, x2 = x[..., :half].float(), x[..., half:rot].float()
        if backward:
            y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
        else:
            y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
        return torch.cat([y1.to(x.dtype), y2.to(x.dtype), x[..., rot:]], dim=-1)

    batch, _, tokens, _ = q.shape
    return torch.cat([t.transpose(1, 2).reshape(batch, tokens, -1) for t in (turn(q), turn(k), v)], dim=-1)


class SiluMul(torch.autograd.Function):
    """``up * silu(gate)`` for ``gate_up`` = [gate | up] along the last dimension (Phi-3's ``gate_up_proj``
    output); saves only ``gate_up``."""

    @staticmethod
    def forward(ctx, gate_up):
        shape = gate_up.shape
        flat = gate_up.reshape(-1, shape[-1]).contiguous()
        ctx.save_for_backward(flat)
        ctx.shape = shape
        kernels = _triton(flat)
        out = kernels.silu_mul(flat) if kernels else silu_mul_torch(flat)
        return out.view(*shape[:-1], shape[-1] // 2)

    @staticmethod
    def backward(ctx, grad):
        (flat,) = ctx.saved_tensors
        grad = grad.reshape(flat.shape[0], -1).contiguous()
        kernels = _triton(flat)
        out = kernels.silu_mul_backward(flat, grad) if kernels else silu_mul_backward_torch(flat, grad)
        return out.view(ctx.shape)


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (up * F.silu(gate)).to(gate_up.dtype)


def silu_mul_backward_torch(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    g, sig = grad.float(), torch.sigmoid(gate)
    d_gate = g * up * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, g * gate * sig], dim=-1).to(gate_up.dtype)


def _rotary(q, k, v, cos, sin, backward=False):
    kernels = _triton(q)
    return (kernels.rotary_qkv if kernels else rotary_qkv_torch)(q, k, v, cos, sin, backward=backward)


def _triton(tensor: torch.Tensor):
    """:mod:`meowdread.triton_kernels` for a CUDA tensor when Triton imports, else None (PyTorch's path)."""
    return load_triton_kernels() if tensor.is_cuda else None


@functools.cache
def load_triton_kernels():
    """:mod:`meowdread.triton_kernels`, or None where Triton does not import."""
    try:
        from meowdread import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def _fused_phi3_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kw):
    """Phi-3's attention with :class:`RotaryQKV`, in training calls without a KV cache; other calls (and
    positional extras) take transformers' own forward."""
    cache = kw.get("cache", kw.get("past_key_values"))
    if args or cache is not None or position_embeddings is None or not torch.is_grad_enabled():
        return self._meowdread_own_forward(hidden_states, position_embeddings, attention_mask, *args, **kw)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    kw.pop("cache", None)
    kw.pop("past_key_values", None)
    config = self.config
    query, key, value = RotaryQKV.apply(
        self.qkv_proj(hidden_states), *position_embeddings, config.num_attention_heads, self.num_key_value_heads,
        self.head_dim,
    )  # fmt: skip
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(
        config._attn_implementation, inspect.getmodule(type(self)).eager_attention_forward
    )
    out, weights = attention(
        self, query, key, value, attention_mask,
        dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling,
        sliding_window=getattr(config, "sliding_window", None), **kw,
    )  # fmt: skip
    return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _fused_phi3_mlp_forward(self, hidden_states):
    if not torch.is_grad_enabled():
        return self._meowdread_own_forward(hidden_states)
    return self.down_proj(SiluMul.apply(self.gate_up_proj(hidden_states)))


def apply_fused_blocks(base: torch.nn.Module) -> int:
    """Phi-3's attention through :class:`RotaryQKV` and its SwiGLU MLP through :class:`SiluMul`; other models'
    attention and MLPs stay as they are. Returns how many modules changed."""
    count = 0
    act = getattr(base.config, "hidden_act", None)
    for module in base.modules():
        kind = type(module)
        if not kind.__module__.startswith("transformers.") or hasattr(module, "_meowdread_own_forward"):
            continue
        if kind.__name__ == "Phi3Attention" and hasattr(module, "qkv_proj"):
            forward = _fused_phi3_attention_forward
        elif kind.__name__ == "Phi3MLP" and hasattr(module, "gate_up_proj") and act in ("silu", "swish"):
            forward = _fused_phi3_mlp_forward
        else:
            continue
        module._meowdread_own_forward = module.forward
        module.forward = types.MethodType(forward, module)
        count += 1
    return count
