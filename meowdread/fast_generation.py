"""Fast sampling for Phi-3: merged bf16 weights, a static KV cache, and one CUDA graph per decode step.

HF ``generate`` on the training model pays, for every new token, a dequantization of all 4-bit weights, the
LoRA side branches, and thousands of Python-launched kernels: about 12 tokens/s for one stream on an H100.
Sampling does not need any of that. :class:`MergedPhi3` takes the weights the model *computes with*
(dequantized NF4 plus the active LoRA deltas, or the base alone inside ``disable_adapter()``) once per call,
and :func:`static_generate` decodes with a preallocated cache, so each step is a fixed sequence of kernels
that a CUDA graph replays with no Python in between (the gpt-fast recipe). The step does the arithmetic of the
model's own modules in under a third of their kernels on CUDA (:meth:`MergedPhi3.step`).

The weights are a transient copy (about 7.2 GB for Phi-3-mini in bf16), freed when the call returns; the
frozen base and the adapter are untouched. :func:`meowdread.generation.generate` picks this path on CUDA for
Phi-3 models (``sampling.engine: auto``) and HF ``generate`` elsewhere; tests check that greedy answers
are the same tokens on both.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from meowdread.fused import is_llama_rms_norm, load_triton_kernels, split_heads

log = logging.getLogger(__name__)


def decodes_architecture(model) -> bool:
    """Whether ``model`` (a peft model or a bare transformers model) is a Phi-3, whose layers this engine runs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "model_type", None) == "phi3" and hasattr(base, "model")


def unsupported(model) -> str | None:
    """Why this engine would not give ``model``'s own logits, or None when it would.

    The engine merges each linear layer into one matrix with peft's ``get_delta_weight``, which is plain
    LoRA's update only. Anything else changes the layer's output in another way and is refused: LoRA
    variants (DoRA rescales by the weight norm, so peft's bnb layer does not merge it with that formula;
    aLoRA, QA-LoRA and the like), a LoRA bias, other adapter types, and peft wrappers other than a trained copy
    (``modules_to_save``) where the engine reads a weight. Embeddings and norms run through their own
    forward, so any adapter on them is reproduced.
    """
    if not decodes_architecture(model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return f"it decodes Phi-3 models only, not {getattr(base.config, 'model_type', type(base).__name__)!r}"
    for name, config in getattr(model, "peft_config", {}).items():
        if name in model.active_adapters and getattr(config, "peft_type", "LORA") != "LORA":
            return f"adapter {name!r} is {config.peft_type}, not LoRA"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    merged = {f"model.layers.{i}.{part}": layer.get_submodule(part) for i, layer in enumerate(base.model.layers)
              for part in _MERGED_LINEARS} | {"lm_head": base.lm_head}  # fmt: skip
    for name, linear in merged.items():
        if type(linear).__name__ == "ModulesToSaveWrapper":  # its weight is the active copy's, or the original's
            active = [] if linear.disable_adapters else linear.active_adapters
            linear = linear.modules_to_save[active[0]] if active else linear.original_module
        plain = linear.get_base_layer() if hasattr(linear, "lora_A") else linear
        if type(plain).__name__ not in ("Linear", "Linear4bit"):
            return f"{name} is a {type(linear).__name__}"
        if plain.bias is not None:
            return f"{name} has a bias"
        if not hasattr(linear, "lora_A") or linear.disable_adapters or linear.merged:
            continue
        for adapter in linear.active_adapters:
            if adapter in linear.lora_variant:
                variant = type(linear.lora_variant[adapter]).__name__
                return f"{name} is a LoRA variant ({variant.removesuffix('LinearVariant')}) of adapter {adapter!r}"
            if linear.lora_bias.get(adapter):
                return f"{name} has a LoRA bias (lora_bias) in adapter {adapter!r}"
    return None


# The linear layers of a Phi-3 decoder layer whose weights the engine merges.
_MERGED_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def supports(model) -> bool:
    """Whether this engine decodes ``model`` exactly as the model itself computes (see :func:`unsupported`)."""
    return unsupported(model) is None


def effective_weight(linear: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight a (LoRA-wrapped, possibly 4-bit) linear layer computes with right now, as one matrix.

    The 4-bit weight is dequantized exactly as bitsandbytes does before its matmul; the deltas of the active
    adapters are added in fp32 unless adapters are disabled (peft's ``disable_adapter()``) or already merged.
    """
    base = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear
    weight = base.weight
    if hasattr(weight, "quant_state"):
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    weight = weight.float()
    if hasattr(linear, "lora_A") and not linear.disable_adapters and not linear.merged:
        for name in linear.active_adapters:
            if name in linear.lora_A:
                weight = weight + linear.get_delta_weight(name).float()
    return weight.to(dtype)


def compute_dtype(linear: torch.nn.Module) -> torch.dtype:
    """The dtype a linear layer multiplies in: bitsandbytes' compute dtype for 4-bit, else the weight's."""
    base = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear
    quant_state = getattr(base.weight, "quant_state", None)
    return quant_state.dtype if quant_state is not None else base.weight.dtype


class MergedPhi3:
    """Phi-3's decoder with merged weights and a static KV cache: ``step`` runs positions into the cache."""

    def __init__(self, model, batch_size: int, max_len: int, dtype: torch.dtype | None = None):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base, self.config = base, base.config
        self.dtype = dtype or compute_dtype(base.model.layers[0].self_attn.qkv_proj)
        self.device = base.model.embed_tokens.weight.device
        self.layers = []
        for layer in base.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                {
                    "qkv": effective_weight(attn.qkv_proj, self.dtype),
                    "o": effective_weight(attn.o_proj, self.dtype),
                    "gate_up": effective_weight(mlp.gate_up_proj, self.dtype),
                    "down": effective_weight(mlp.down_proj, self.dtype),
                }
            )
        self.lm_head = effective_weight(base.lm_head, self.dtype)
        cfg = self.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (batch_size, self.kv_heads, max_len, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.max_len = max_len
        self.silu = getattr(cfg, "hidden_act", None) in ("silu", "swish")

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run ``ids`` [B, T] at rotary ``positions`` [B, T] into cache ``slots`` [T]; logits of the last one.

        ``mask`` [B, 1, T, max_len] is True where a query may attend to a cache slot.

        Through the model's own modules a decode step is about 1,200 kernels for Phi-3-mini, most of them
        tiny, so the graph's replay is bound by their number more than by the 7.6 GB of weights it reads.
        Here the same arithmetic takes about 11 kernels a layer: RMSNorm as ``F.rms_norm`` (one fused kernel
        on CUDA), each residual add inside its matmul (``addmm``), and on CUDA the rotary embedding of queries
        and keys with the keys' and values' cache write in one Triton kernel and SwiGLU in another
        (:mod:`meowdread.triton_kernels`; elsewhere one ``addcmul`` for both rotations and two
        ``index_copy_``).
        """
        model = self.base.model
        batch, length = ids.shape
        h = model.embed_tokens(ids).to(self.dtype)
        cos, sin = model.rotary_emb(h, positions)
        cos, sin = cos.to(self.dtype), sin.to(self.dtype)  # [B, T, rotary dims]
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        triton = _decode_kernels(h)
        for layer, w, keys, values in zip(model.layers, self.layers, self.keys, self.values, strict=True):
            x = _rms_norm(layer.input_layernorm, h, self.dtype)
            qkv = F.linear(x, w["qkv"])
            if triton is not None:  # rotary embedding and cache write in one kernel
                q = torch.empty(batch, self.heads, length, self.head_dim, dtype=qkv.dtype, device=qkv.device)
                heads = split_heads(qkv, self.heads, self.kv_heads, self.head_dim)
                triton.rotate_into(*heads, cos, sin, q, keys, values, slots)
            else:
                qk = qkv[..., : q_width + kv_width].view(batch, length, -1, self.head_dim)
                qk = _rotate(qk, cos.unsqueeze(2), sin.unsqueeze(2))
                q, k = qk[:, :, : self.heads].transpose(1, 2), qk[:, :, self.heads :].transpose(1, 2)
                v = qkv[..., q_width + kv_width :].view(batch, length, -1, self.head_dim).transpose(1, 2)
                keys.index_copy_(2, slots, k)
                values.index_copy_(2, slots, v)
            attn = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=layer.self_attn.scaling, enable_gqa=self.heads != self.kv_heads
            )
            h = _add_linear(h, attn.transpose(1, 2).reshape(batch, length, -1), w["o"])
            x = _rms_norm(layer.post_attention_layernorm, h, self.dtype)
            gate_up = F.linear(x, w["gate_up"])
            if triton is not None and self.silu:
                act = triton.silu_mul(gate_up.view(batch * length, -1)).view(batch, length, -1)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                act = up * layer.mlp.activation_fn(gate)
            h = _add_linear(h, act, w["down"])
        h = _rms_norm(model.norm, h[:, -1], self.dtype)
        return F.linear(h, self.lm_head).float()


def _decode_kernels(h: torch.Tensor):
    """:mod:`meowdread.triton_kernels` on CUDA when Triton imports, else None (the PyTorch path)."""
    return load_triton_kernels() if h.is_cuda else None


def _rms_norm(norm: torch.nn.Module, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``norm(h)`` in ``dtype``: ``F.rms_norm`` for transformers' RMSNorms of that formula
    (:func:`meowdread.fused.is_llama_rms_norm`), the module's own forward for anything else (Liger's, one
    wrapped by an adapter, a norm of another formula)."""
    if is_llama_rms_norm(norm):
        # Normalised in fp32, rounded to h's dtype, then scaled by the weight: HF's order (and ATen's for
        # rms_norm's composite; on CUDA the fused kernel scales before it rounds, a last-bit difference).
        return F.rms_norm(h, norm.weight.shape, norm.weight.to(h.dtype), norm.variance_epsilon).to(dtype)
    return norm(h).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's ``apply_rotary_pos_emb`` on ``x`` [B, T, heads, D] (queries and keys side by side): the first
    ``cos.shape[-1]`` dims rotate in two halves, the rest pass through."""
    rotary = cos.shape[-1]
    rot, rest = x[..., :rotary], x[..., rotary:]
    first, second = rot.chunk(2, dim=-1)
    out = torch.addcmul(rot * cos, torch.cat((-second, first), dim=-1), sin)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def _add_linear(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``h + F.linear(x, weight)`` as one matmul with the residual as its C (beta = 1)."""
    out = torch.addmm(h.reshape(-1, h.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t())
    return out.view(h.shape)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """Temperature and nucleus (top-p) sampling as HF's warpers define them; ``temperature=0`` is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


class _GraphedStep:
    """One decode step (T = 1) captured in a CUDA graph over static input buffers."""

    def __init__(self, engine: MergedPhi3, ids, positions, slots, mask):
        self.inputs = (ids, positions, slots, mask)
        stream = torch.cuda.Stream(device=ids.device)
        stream.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(stream):  # warm-up outside the graph (cuBLAS handles, workspace)
            engine.step(*self.inputs)
        torch.cuda.current_stream(ids.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = engine.step(*self.inputs)

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


@torch.inference_mode()
def prefill(engine: MergedPhi3, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Run left-padded prompts into the cache: last-position logits, rotary positions, valid cache slots.

    Positions follow HF ``generate``'s rule for left padding (count of real tokens so far), so answers do
    not depend on the batch's padding.
    """
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    window = getattr(engine.config, "sliding_window", None) or engine.max_len
    valid = torch.zeros(batch, engine.max_len, dtype=torch.bool, device=device)
    valid[:, :prompt_len] = attention_mask.bool()
    slots = torch.arange(engine.max_len, device=device)
    # Causal within the window, real tokens only; each slot also sees itself so that padding rows stay
    # finite (their values are never attended to by a real token).
    query = slots[:prompt_len, None]
    causal = (slots[None, :] <= query) & (query - slots[None, :] < window)
    mask = (causal[None] & valid[:, None, :]) | (slots[None, None, :] == query[None])
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = engine.step(input_ids, positions, slots[:prompt_len], mask[:, None])
    return logits, positions, valid


@torch.inference_mode()
def static_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cuda_graph: bool | None = None,
    streamer=None,
) -> torch.Tensor:
    """New tokens [B, max_new_tokens] (``pad_id`` after a row stops) for left-padded prompts.

    ``use_cuda_graph`` defaults to whether the model is on CUDA.
    """
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    max_len = prompt_len + max_new_tokens
    engine = MergedPhi3(model, batch, max_len)
    if use_cuda_graph is None:
        use_cuda_graph = device.type == "cuda"
    window = getattr(engine.config, "sliding_window", None) or max_len
    logits, positions, valid = prefill(engine, input_ids, attention_mask)
    if streamer is not None:  # as HF generate does: the prompt first (streamers skip it), then each token
        streamer.put(input_ids.cpu())

    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    ids = torch.empty(batch, 1, dtype=torch.long, device=device)
    pos = positions[:, -1:].clone()
    slot = torch.tensor([prompt_len], device=device)
    step_mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool, device=device)
    step_mask[:, 0, 0] = valid & (torch.arange(max_len, device=device) > prompt_len - window)
    run_step = None
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out[:, i] = token
        if streamer is not None:
            streamer.put(token.cpu())
        done |= torch.isin(token, stop)
        if i == max_new_tokens - 1 or (i % 8 == 7 and bool(done.all())):
            break
        # The new token goes into slot prompt_len + i; attend to it and to the window behind it.
        ids[:, 0] = token
        pos += 1
        slot.fill_(prompt_len + i)
        step_mask[:, 0, 0, prompt_len + i] = True
        if prompt_len + i - window >= 0:
            step_mask[:, 0, 0, prompt_len + i - window] = False
        if use_cuda_graph and run_step is None:
            try:
                run_step = _GraphedStep(engine, ids, pos, slot, step_mask)
            except RuntimeError as err:  # a model whose step cannot be captured still samples, only slower
                log.warning("CUDA graph capture failed (%s); decoding without it", err)
                use_cuda_graph = False
        logits = run_step() if run_step is not None else engine.step(ids, pos, slot, step_mask)
    if streamer is not None:
        streamer.end()
    return out
