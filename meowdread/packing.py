"""Padding-free batches: a batch's examples end to end in one row, attention kept inside each example.

With ``data.padding_free: true`` the collate step (:func:`collate_packed`) puts the examples of a batch one
after another in a single row of ``sum(lengths)`` tokens, with ``position_ids`` that restart at 0 for each
example and the cumulative lengths ``cu_seq_lens`` that a variable-length attention kernel needs. The batch
holds the same examples as a padded one (the length-grouped sampler is unchanged); only the pad tokens are
gone, and with them the matmuls, norms and LoRA work spent on them (about 10% of the tokens of a padded
batch of 32 of the cat corpus, 20% at 64). The loss, its trained tokens and the gradients are those of the
padded batch (``tests/test_packing.py``).

Attention must not cross from one example into the next. :func:`make_packable` wraps the model's attention
implementation (``sdpa`` or ``eager``) so that a call carrying ``cu_seq_lens_q`` runs each example's causal
attention alone: PyTorch's FlashAttention-2 variable-length kernel (``torch.nn.attention.varlen``, torch
2.10+) on a GPU, one SDPA call per example elsewhere. Any other call (validation of padded batches, HF
``generate``) goes to the wrapped implementation unchanged. transformers' own FlashAttention backends read
``cu_seq_lens_q`` themselves and are left as they are (TRL's ``padding_free`` and transformers'
``DataCollatorWithFlattening`` pass the same keyword arguments).
"""

from __future__ import annotations

import functools
import inspect
import itertools

import torch
import torch.nn.functional as F

from meowdread.chat_format import IGNORE_INDEX


def collate_packed(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor | int]:
    """One row of ``examples`` end to end: ids, labels, per-example positions and cumulative lengths.

    The first label of each example is ignored: it is the target of the previous example's last position,
    which in a padded batch would have been a pad. (Chat examples start with a role header, which is never
    trained on, so this changes nothing for them.)
    """
    lengths = [len(e["input_ids"]) for e in examples]
    ids = torch.tensor(list(itertools.chain.from_iterable(e["input_ids"] for e in examples)))
    labels = torch.tensor(list(itertools.chain.from_iterable(e["labels"] for e in examples)))
    starts = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    labels[starts[:-1].long()] = IGNORE_INDEX
    positions = torch.cat([torch.arange(n) for n in lengths])
    return {
        "input_ids": ids.unsqueeze(0),
        "labels": labels.unsqueeze(0),
        "position_ids": positions.unsqueeze(0),
        "cu_seq_lens": starts,
        "max_length": max(lengths),
    }


def is_packed(batch: dict) -> bool:
    return "cu_seq_lens" in batch


def packed_model_kwargs(batch: dict) -> dict:
    """The keyword arguments that tell the model's layers where each example of a packed row starts."""
    if not is_packed(batch):
        return {}
    cu, longest = batch["cu_seq_lens"], batch["max_length"]
    return {
        "position_ids": batch["position_ids"],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def make_packable(base: torch.nn.Module) -> None:
    """Let ``base`` (a transformers model) attend within each example of a packed row (see the module doc).

    Registers ``packable_<implementation>`` with transformers' attention and mask interfaces and switches the
    model to it; FlashAttention implementations already handle packed rows and are left alone.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = base.config
    wrapped = config._attn_implementation
    if wrapped.startswith("packable_") or wrapped.startswith("flash_attention"):
        return
    if not packable(wrapped):
        raise ValueError(
            f"data.padding_free: true needs attention that keeps packed examples apart: sdpa, eager or "
            f"FlashAttention, not {wrapped!r}"
        )
    name = f"packable_{wrapped}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        fallback = ALL_ATTENTION_FUNCTIONS[wrapped] if wrapped != "eager" else None
        AttentionInterface.register(name, functools.partial(_packable_attention, fallback=fallback))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[wrapped])
    config._attn_implementation = name


def packable(attention: str) -> bool:
    """Whether padding-free rows can run with the transformers attention implementation ``attention``."""
    return attention in ("sdpa", "eager", "None") or attention.startswith("flash_attention")


def _packable_attention(module, query, key, value, attention_mask, *, fallback, **kwargs):
    """Attention of one layer: per example of a packed row when ``cu_seq_lens_q`` is given, else ``fallback``
    (transformers' function; None for ``eager``, which lives in each model's own module)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        if fallback is None:
            eager = inspect.getmodule(type(module)).eager_attention_forward
            return eager(module, query, key, value, attention_mask, **kwargs)
        return fallback(module, query, key, value, attention_mask, **kwargs)
    if module.training and getattr(module, "attention_dropout", 0.0):
        raise ValueError("data.padding_free: attention dropout is not supported on packed rows")
    longest, window = kwargs["max_length_q"], kwargs.get("sliding_window")
    if window is not None and longest <= window:
        window = None  # no example is long enough for the window to leave anything out
    scale = kwargs.get("scaling", getattr(module, "scaling", None))
    # transformers passes (batch 1, heads, tokens, head_dim); the kernels want (tokens, heads, head_dim).
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each key/value head serves several query heads
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _varlen() is not None:
        out = _varlen_attention(q, k, v, cu, longest, scale, window)
    else:
        out = _per_example_attention(q, k, v, cu, scale, window)
    return out.unsqueeze(0), None


def _per_example_attention(q, k, v, cu, scale, window=None):
    """Causal SDPA over each example alone (within the last ``window`` positions, as transformers' sliding
    window mask): the reference, and the path without a variable-length kernel."""
    parts = []
    for s, e in itertools.pairwise(cu.tolist()):
        mask = None
        if window is not None and e - s > window:
            mask = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).tril().triu(1 - window)
        parts.append(
            F.scaled_dot_product_attention(
                *(t[s:e].transpose(0, 1) for t in (q, k, v)), attn_mask=mask, is_causal=mask is None, scale=scale
            ).transpose(0, 1)
        )
    return torch.cat(parts)


def _varlen_attention(q, k, v, cu, longest, scale, window):
    """PyTorch's variable-length FlashAttention, causal, within a sliding ``window`` when one is given."""
    varlen, style = _varlen()
    if style == "window":
        left = -1 if window is None else window - 1  # the window counts the position itself
        return varlen(q, k, v, cu, cu, longest, longest, scale=scale, window_size=(left, 0))
    if window is not None:
        raise ValueError(
            f"data.padding_free: this torch's varlen_attn has no sliding window, and an example of {longest} "
            f"tokens is longer than the model's ({window}); set data.max_length to at most {window}"
        )
    return varlen(q, k, v, cu, cu, longest, longest, scale=scale, is_causal=True)


@functools.cache
def _varlen():
    """``torch.nn.attention.varlen.varlen_attn`` and how it is made causal (2.10+: a left-only window, 2.9:
    ``is_causal``), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params and "scale" in params:
        return varlen_attn, "window"
    if "is_causal" in params and "scale" in params:
        return varlen_attn, "is_causal"
    return None
